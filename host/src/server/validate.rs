//! The one gate a completion request passes before it is queued: content type, body size and
//! upload pace, JSON, parameters, tokenization (bounded) and the plan. Every refusal is an
//! [`ApiError`] naming the problem (4xx).

use super::metrics::Gauged;
use super::openai::{
    ApiError, ChatRequest, Common, CompletionRequest, Endpoint, PromptField, Stop,
};
use super::state::{ready, Server, BODY_BYTES_PER_TOKEN, BODY_IDLE, BODY_MIN_RATE};
use crate::prompt;
use crate::prompt::PromptParts;
use crate::runner::{prepare, GenParams, Job, MAX_TEMPERATURE};
use apb_loaders::ChatMessage;
use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A request checked and tokenized, ready to queue.
pub(super) struct Checked {
    pub(super) job: Job,
    pub(super) stream: bool,
    pub(super) include_usage: bool,
}

/// The body, at most `limit` bytes (Err(None): over it), within `whole` and at the pace
/// [`BODY_IDLE`] and [`BODY_MIN_RATE`] set, with the share of `budget` (KiB) it holds.
pub(super) async fn read_body(
    body: Body,
    limit: usize,
    whole: Duration,
    budget: &Arc<Semaphore>,
) -> Result<(Vec<u8>, Option<OwnedSemaphorePermit>), Option<ApiError>> {
    use futures_util::StreamExt;
    let start = Instant::now();
    let deadline = start + whole;
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    let mut held: Option<OwnedSemaphorePermit> = None;
    loop {
        // What has arrived so far buys time at the minimum rate.
        let paced = start + BODY_IDLE + Duration::from_secs_f64(buf.len() as f64 / BODY_MIN_RATE);
        let until = deadline.min(paced);
        let left = until.saturating_duration_since(Instant::now());
        let late = |why: String| Some(ApiError::new(StatusCode::REQUEST_TIMEOUT, why));
        match tokio::time::timeout(left, stream.next()).await {
            Err(_) if until == deadline => {
                return Err(late(format!(
                    "the request body did not arrive within {whole:?}"
                )))
            }
            Err(_) => {
                return Err(late(format!(
                    "the request body is arriving too slowly (under {} KiB/s after {BODY_IDLE:?})",
                    BODY_MIN_RATE / 1024.0
                )))
            }
            Ok(None) => return Ok((buf, held)),
            Ok(Some(Err(e))) => {
                return Err(Some(ApiError::bad(format!(
                    "could not read the request body: {e}"
                ))))
            }
            Ok(Some(Ok(chunk))) => {
                if buf.len() + chunk.len() > limit {
                    return Err(None);
                }
                buf.extend_from_slice(&chunk);
                let have = held.as_ref().map_or(0, |p| p.num_permits());
                let need = buf.len().div_ceil(1024);
                if need > have {
                    let more = budget.clone().acquire_many_owned((need - have) as u32);
                    let busy = |why: &str| {
                        Some(ApiError::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            why.to_string(),
                        ))
                    };
                    // As long as the pace allows with what has arrived.
                    let paced = start
                        + BODY_IDLE
                        + Duration::from_secs_f64(buf.len() as f64 / BODY_MIN_RATE);
                    let left = deadline
                        .min(paced)
                        .saturating_duration_since(Instant::now());
                    match tokio::time::timeout(left, more).await {
                        Ok(Ok(p)) => match &mut held {
                            Some(h) => h.merge(p),
                            None => held = Some(p),
                        },
                        Ok(Err(_)) => return Err(busy("the server is stopping")),
                        Err(_) => return Err(busy(
                            "the server holds as many request bodies as it keeps in memory; retry",
                        )),
                    }
                }
            }
        }
    }
}

/// Content type, body bound and timeout, JSON, parameters, tokenization (bounded), plan.
pub(super) async fn admit(
    s: &Arc<Server>,
    headers: &HeaderMap,
    body: Body,
    ep: Endpoint,
) -> Result<Checked, ApiError> {
    let ready = ready(s)?;
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct
        .trim_start()
        .to_ascii_lowercase()
        .starts_with("application/json")
    {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Type must be application/json, got '{ct}'"),
        ));
    }
    // A compressed body would reach the JSON parser as bytes it cannot read: say why instead.
    if let Some(enc) = headers.get(header::CONTENT_ENCODING) {
        let enc = enc.to_str().unwrap_or("?").trim();
        if !enc.eq_ignore_ascii_case("identity") {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "Content-Encoding '{enc}' is not supported: send the JSON body uncompressed"
                ),
            ));
        }
    }
    let limit = ready.max_body;
    let too_large = || {
        let why = match s.cfg.max_body_bytes {
            Some(_) => "the server's --max-body-bytes".to_string(),
            None => format!(
                "more than the model's context of {} tokens can hold ({BODY_BYTES_PER_TOKEN} bytes a token)",
                ready.loaded.model.cfg.context_len()
            ),
        };
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is over {limit} bytes, {why}; shorten the prompt"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let stopping = |_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the server is stopping");
    // The body's share of the memory budget is held until it is parsed and tokenized.
    let reading = Gauged::new(&s.metrics.bodies_reading);
    let (bytes, body_permit) = read_body(body, limit, s.cfg.body_timeout, &s.bodies)
        .await
        .map_err(|e| e.unwrap_or_else(too_large))?;
    // Owned permits move into the blocking task: a client that leaves mid-tokenization does not
    // free its slot before the work ends.
    let permit = s.tokenize.clone().acquire_owned().await.map_err(stopping)?;
    let s2 = s.clone();
    tokio::task::spawn_blocking(move || {
        let _held = (permit, body_permit, reading);
        check(&s2, &bytes, ep)
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

pub(super) fn check(s: &Server, body: &[u8], ep: Endpoint) -> Result<Checked, ApiError> {
    let ready = ready(s)?;
    let tok = &ready.loaded.tok;
    let (common, parts) = match ep {
        Endpoint::Chat => {
            let req: ChatRequest = parse_json(body)?;
            if req.messages.is_empty() {
                return Err(ApiError::bad("'messages' is empty"));
            }
            let mut messages = Vec::with_capacity(req.messages.len());
            for m in &req.messages {
                let role = match m.role.as_str() {
                    "system" | "developer" => "system",
                    "user" => "user",
                    "assistant" => "assistant",
                    other => {
                        return Err(ApiError::bad(format!(
                            "unsupported role '{other}' (system, developer, user, assistant)"
                        )))
                    }
                };
                messages.push(ChatMessage {
                    role: role.into(),
                    content: m.content.text()?,
                });
            }
            check_common(&ready.model_names, &req.common)?;
            let parts = prompt::build_chat(tok, &messages, req.common.question.as_deref())
                .map_err(|e| ApiError::bad(format!("{e:#}")))?;
            (req.common, parts)
        }
        Endpoint::Completion => {
            let req: CompletionRequest = parse_json(body)?;
            let text = match &req.prompt {
                PromptField::One(t) => t.clone(),
                PromptField::Many(v) if v.len() == 1 => v[0].clone(),
                PromptField::Many(_) => {
                    return Err(ApiError::bad(
                        "'prompt' must be one string (batches of prompts are not supported)",
                    ))
                }
            };
            check_common(&ready.model_names, &req.common)?;
            let split = s.cfg.settings.method.imp().needs_question();
            let parts = prompt::build_text(tok, &text, req.common.question.as_deref(), split)
                .map_err(|e| ApiError::bad(format!("{e:#}")))?;
            (req.common, parts)
        }
    };
    let params = GenParams {
        max_new_tokens: common
            .max_completion_tokens
            .or(common.max_tokens)
            .unwrap_or(s.cfg.default_max_tokens),
        // Greedy unless asked (documented; OpenAI's default is 1).
        temperature: common.temperature.unwrap_or(0.0),
        top_p: common.top_p.unwrap_or(1.0),
        // No seed: a fresh one per request (a fixed default would repeat the same sample).
        seed: common.seed.unwrap_or_else(rand::random),
        ignore_eos: common.ignore_eos,
        stop: match common.stop {
            None => vec![],
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        },
    };
    if params.stop.len() > 4 {
        return Err(ApiError::bad("'stop' takes at most 4 strings"));
    }
    params.validate().map_err(ApiError::bad)?;
    let asked = common.max_completion_tokens.or(common.max_tokens);
    let job = job(s, parts, params);
    prepare(&ready.loaded.model, &job).map_err(|e| ApiError::bad(e.0))?;
    // As vLLM: an explicit max_tokens must fit the context beside the prompt (without one, the
    // server's default is cut to the room left).
    let (ctx, prompt_tokens) = (ready.loaded.model.cfg.context_len(), job.prompt.len());
    if let Some(n) = asked.filter(|&n| prompt_tokens.saturating_add(n) > ctx) {
        return Err(ApiError::bad(format!(
            "the model's context is {ctx} tokens, but {} were asked for ({prompt_tokens} in the prompt, {n} in max_tokens); lower max_tokens to at most {}",
            prompt_tokens.saturating_add(n),
            ctx - prompt_tokens
        )));
    }
    Ok(Checked {
        job,
        stream: common.stream,
        include_usage: common.stream_options.is_some_and(|o| o.include_usage),
    })
}

/// The request body as `T`; an error names the field it is about (in the message and as
/// `param`), e.g. `'max_tokens': invalid type: string "2", expected usize`.
pub(super) fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad(format!("invalid request JSON: {e}")))?;
    let bad = |e: serde_path_to_error::Error<serde_json::Error>| {
        let path = e.path().to_string();
        let mut a = ApiError::bad(match path.as_str() {
            "" | "." => format!("invalid request JSON: {}", e.inner()),
            p => format!("invalid request JSON: '{p}': {}", e.inner()),
        });
        a.param = (!matches!(path.as_str(), "" | ".")).then_some(path);
        a
    };
    // The shared fields alone first: behind `#[serde(flatten)]` an error loses its field.
    serde_path_to_error::deserialize::<_, Common>(&v).map_err(bad)?;
    serde_path_to_error::deserialize(&v).map_err(bad)
}

pub(super) fn job(s: &Server, prompt: PromptParts, params: GenParams) -> Job {
    Job {
        prompt,
        settings: s.cfg.settings.clone(),
        params,
    }
}

/// The model name (one of `served`) and the parameters we do not implement (refused, never
/// silently ignored).
pub(super) fn check_common(served: &[String], c: &Common) -> Result<(), ApiError> {
    if let Some(m) = &c.model {
        if !served.iter().any(|n| n == m) {
            return Err(ApiError::model_not_found(m, served));
        }
    }
    if c.stream_options.is_some() && !c.stream {
        return Err(ApiError::bad(
            "'stream_options' is only allowed with \"stream\": true",
        ));
    }
    if c.n.is_some_and(|n| n != 1) || c.best_of.is_some_and(|n| n != 1) {
        return Err(ApiError::bad(
            "'n' and 'best_of' must be 1: one choice per request (send several requests instead)",
        ));
    }
    if let Some(t) = c.temperature {
        if !(t.is_finite() && (0.0..=MAX_TEMPERATURE).contains(&t)) {
            return Err(ApiError::bad(format!(
                "'temperature' must be in [0, {MAX_TEMPERATURE}], got {t}"
            )));
        }
    }
    // Neutral values (null, false, 0, an empty list) are what clients send for "none".
    let truthy = |v: &Option<Value>| {
        v.as_ref().is_some_and(|v| {
            !(v.is_null()
                || *v == json!(false)
                || *v == json!(0)
                || v.as_array().is_some_and(|a| a.is_empty()))
        })
    };
    let mut unsupported = Vec::new();
    if truthy(&c.logprobs) || truthy(&c.top_logprobs) {
        unsupported.push("logprobs");
    }
    if c.presence_penalty.is_some_and(|p| p != 0.0) {
        unsupported.push("presence_penalty");
    }
    if c.frequency_penalty.is_some_and(|p| p != 0.0) {
        unsupported.push("frequency_penalty");
    }
    if c.logit_bias
        .as_ref()
        .is_some_and(|v| !(v.is_null() || v.as_object().is_some_and(|o| o.is_empty())))
    {
        unsupported.push("logit_bias");
    }
    if c.response_format
        .as_ref()
        .is_some_and(|v| !(v.is_null() || v["type"] == "text"))
    {
        unsupported.push("response_format (only {\"type\": \"text\"})");
    }
    if truthy(&c.tools) {
        unsupported.push("tools");
    }
    if truthy(&c.functions) {
        unsupported.push("functions");
    }
    if c.tool_choice
        .as_ref()
        .is_some_and(|v| !(v.is_null() || v == "none"))
    {
        unsupported.push("tool_choice");
    }
    if c.top_k.is_some_and(|k| k > 0) {
        unsupported.push("top_k");
    }
    if c.min_p.is_some_and(|p| p != 0.0) {
        unsupported.push("min_p");
    }
    if c.repetition_penalty.is_some_and(|p| p != 1.0) {
        unsupported.push("repetition_penalty");
    }
    if c.echo == Some(true) {
        unsupported.push("echo");
    }
    if truthy(&c.suffix) {
        unsupported.push("suffix");
    }
    if !unsupported.is_empty() {
        return Err(ApiError::bad(format!(
            "not supported by this server: {}",
            unsupported.join(", ")
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::openai::{ChatRequest, Common};
    use super::*;

    fn common(v: Value) -> Result<(), ApiError> {
        let c: Common = parse_json(v.to_string().as_bytes())?;
        check_common(&["m".to_string(), "alias".to_string()], &c)
    }

    fn message(r: Result<(), ApiError>) -> (u16, String) {
        let e = r.unwrap_err();
        let body = e.body();
        (
            e.status().as_u16(),
            body["error"]["message"].as_str().unwrap().to_string(),
        )
    }

    /// The gate's answers without a model: a served name passes, another is 404
    /// `model_not_found` naming those served; features we lack are refused by name (neutral
    /// values pass); `n` > 1 and a bad temperature are 400.
    #[test]
    fn common_fields() {
        assert!(common(json!({"model": "alias", "temperature": 0.7})).is_ok());
        assert!(common(json!({"logprobs": false, "tools": [], "presence_penalty": 0})).is_ok());
        let e = common(json!({"model": "gpt-4"})).unwrap_err();
        assert_eq!(e.status().as_u16(), 404);
        assert_eq!(e.body()["error"]["code"], "model_not_found");
        assert!(e.body()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("'m', 'alias'"));
        let (code, m) = message(common(json!({"logprobs": true, "top_k": 5})));
        assert_eq!(code, 400);
        assert!(m.contains("logprobs") && m.contains("top_k"), "{m}");
        assert_eq!(message(common(json!({"n": 2}))).0, 400);
        assert_eq!(message(common(json!({"temperature": 3.0}))).0, 400);
        let (code, m) = message(common(json!({"stream_options": {"include_usage": true}})));
        assert!(code == 400 && m.contains("stream"), "{m}");
    }

    /// A wrong field is named in the message and as `param`, also behind the flattened shared
    /// fields; bad JSON says so.
    #[test]
    fn json_errors_name_the_field() {
        let e = parse_json::<ChatRequest>(br#"{"messages": [], "max_tokens": "2"}"#)
            .err()
            .unwrap();
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        assert!(e.body()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("'max_tokens'"));
        let e = parse_json::<ChatRequest>(br#"{"messages": [{"role": "user", "content": 5}]}"#)
            .err()
            .unwrap();
        assert!(e.param.as_deref().unwrap().starts_with("messages"), "{e:?}");
        let e = parse_json::<ChatRequest>(b"{not json").err().unwrap();
        assert_eq!(e.status().as_u16(), 400);
        assert_eq!(e.param, None);
    }
}
