//! `apb serve`: an OpenAI-compatible HTTP server over the engine — `POST /v1/chat/completions`
//! (JSON or server-sent-event streaming), `GET /v1/models`, `GET /health`.
//!
//! One model, loaded once. Requests run one at a time on a blocking thread (a long prefill
//! occupies every rank). With `--attention ring|star|apb` the ranks are threads on the server's
//! device, as in `apb generate` without GPUs per rank; such requests are single-turn (one user
//! message: the document, a blank line, the question — or the question in the `question` field,
//! an extension of the OpenAI schema), since APB needs to know which part is the question.

use crate::dist::{self, DistConfig};
use crate::{prompt, Engine, GenParams, Generation};
use apb_loaders::ChatMessage;
use apb_plugin::Kind;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// Largest request body accepted.
const MAX_BODY_BYTES: usize = 64 << 20;

/// What the server runs every request with.
pub struct ServeConfig {
    /// None: dense attention on one rank.
    pub dist: Option<DistConfig>,
    /// `max_tokens` when a request gives none.
    pub default_max_tokens: usize,
}

struct Server {
    engine: Engine,
    cfg: ServeConfig,
    model_id: String,
    /// One generation at a time.
    busy: Mutex<()>,
}

/// Binds `addr`, prints `listening on http://ADDR` to stderr (port 0 picks a free one), serves
/// until the process ends.
pub async fn serve(engine: Engine, cfg: ServeConfig, addr: SocketAddr) -> anyhow::Result<()> {
    let model_id = engine.loaded.name.clone();
    let state = Arc::new(Server {
        engine,
        cfg,
        model_id,
        busy: Mutex::new(()),
    });
    let app = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        // Long-context prompts are megabytes of text (axum's default cap is 2 MB).
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    eprintln!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}

/// An OpenAI-style error: `{"error": {"message", "type", "code"}}` with an HTTP status.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn bad(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
    fn internal(e: impl std::fmt::Display) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: e.to_string(),
        }
    }
    fn body(&self) -> Value {
        let kind = if self.status.is_client_error() {
            "invalid_request_error"
        } else {
            "server_error"
        };
        json!({"error": {"message": self.message, "type": kind, "code": null}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

#[derive(Deserialize)]
struct ChatRequest {
    model: Option<String>,
    messages: Vec<Message>,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<u64>,
    #[serde(default)]
    stream: bool,
    /// Extension: the question APB embeds in its anchors (default: the last paragraph of the
    /// user message).
    question: Option<String>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: Content,
}

/// A message's content: a string, or OpenAI's list of parts (text parts only).
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

impl Content {
    fn text(&self) -> Result<String, ApiError> {
        match self {
            Content::Text(t) => Ok(t.clone()),
            Content::Parts(parts) => parts
                .iter()
                .map(|p| match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => Ok(t.as_str()),
                    (k, _) => Err(ApiError::bad(format!(
                        "unsupported content part type '{k}' (text only)"
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(|v| v.concat()),
        }
    }
}

/// A validated request, ready to generate.
struct Job {
    prompt: Prompt,
    params: GenParams,
    stream: bool,
}

enum Prompt {
    Dense(Vec<u32>),
    Dist(prompt::PromptParts),
}

async fn models(State(s): State<Arc<Server>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [
        {"id": s.model_id, "object": "model", "created": 0, "owned_by": "apb-rs"}
    ]}))
}

async fn chat_completions(State(s): State<Arc<Server>>, body: Bytes) -> Response {
    // The request's own checks, then tokenization, off the async threads.
    let s2 = s.clone();
    let job = match tokio::task::spawn_blocking(move || prepare(&s2, &body)).await {
        Ok(Ok(job)) => job,
        Ok(Err(e)) => return e.into_response(),
        Err(e) => return ApiError::internal(e).into_response(),
    };
    let id = format!(
        "chatcmpl-{}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if job.stream {
        stream_response(s, job, id, created)
    } else {
        let s2 = s.clone();
        let params = job.params.clone();
        let out =
            tokio::task::spawn_blocking(move || run(&s2, &job.prompt, &params, &mut |_| {})).await;
        match out {
            Ok(Ok(g)) => {
                let finish = finish_reason(&g, &job.params);
                Json(json!({
                    "id": id, "object": "chat.completion", "created": created, "model": s.model_id,
                    "choices": [{"index": 0, "finish_reason": finish,
                                 "message": {"role": "assistant", "content": g.text}}],
                    "usage": usage(&g),
                }))
                .into_response()
            }
            Ok(Err(e)) => e.into_response(),
            Err(e) => ApiError::internal(e).into_response(),
        }
    }
}

fn stream_response(s: Arc<Server>, job: Job, id: String, created: u64) -> Response {
    let (tx, rx) =
        tokio::sync::mpsc::unbounded_channel::<Result<Event, std::convert::Infallible>>();
    let chunk = {
        let (id, model) = (id.clone(), s.model_id.clone());
        move |delta: Value, finish: Option<&str>| {
            let v = json!({"id": id, "object": "chat.completion.chunk", "created": created,
                "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
            Ok(Event::default().data(v.to_string()))
        }
    };
    tokio::task::spawn_blocking(move || {
        let _ = tx.send(chunk(json!({"role": "assistant", "content": ""}), None));
        let tx2 = tx.clone();
        let c2 = chunk.clone();
        let mut on_text = move |t: &str| {
            // A client that went away only stops receiving; the generation runs to its end.
            let _ = tx2.send(c2(json!({"content": t}), None));
        };
        match run(&s, &job.prompt, &job.params, &mut on_text) {
            Ok(g) => {
                let _ = tx.send(chunk(json!({}), Some(finish_reason(&g, &job.params))));
            }
            Err(e) => {
                let _ = tx.send(Ok(Event::default().data(e.body().to_string())));
            }
        }
        let _ = tx.send(Ok(Event::default().data("[DONE]")));
    });
    Sse::new(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn finish_reason(g: &Generation, p: &GenParams) -> &'static str {
    if g.stats.generated_tokens >= p.max_new_tokens {
        "length"
    } else {
        "stop"
    }
}

fn usage(g: &Generation) -> Value {
    json!({"prompt_tokens": g.stats.prompt_tokens, "completion_tokens": g.stats.generated_tokens,
           "total_tokens": g.stats.prompt_tokens + g.stats.generated_tokens})
}

/// Parses and checks a request and tokenizes its prompt.
fn prepare(s: &Server, body: &[u8]) -> Result<Job, ApiError> {
    let req: ChatRequest = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad(format!("invalid request JSON: {e}")))?;
    if let Some(m) = &req.model {
        if m != &s.model_id {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!(
                    "model '{m}' is not served here; this server runs '{}'",
                    s.model_id
                ),
            });
        }
    }
    if req.messages.is_empty() {
        return Err(ApiError::bad("'messages' is empty"));
    }
    let temperature = req.temperature.unwrap_or(0.0);
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(ApiError::bad(format!(
            "'temperature' must be >= 0, got {temperature}"
        )));
    }
    let top_p = req.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad(format!(
            "'top_p' must be in (0, 1], got {top_p}"
        )));
    }
    let max_new_tokens = req
        .max_completion_tokens
        .or(req.max_tokens)
        .unwrap_or(s.cfg.default_max_tokens);
    if max_new_tokens == 0 {
        return Err(ApiError::bad("'max_tokens' must be at least 1"));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for m in &req.messages {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
            return Err(ApiError::bad(format!(
                "unsupported role '{}' (system, user, assistant)",
                m.role
            )));
        }
        messages.push((m.role.clone(), m.content.text()?));
    }
    let tok = &s.engine.loaded.tok;
    let ctx = s.engine.loaded.model.cfg.max_position_embeddings;
    let prompt = match &s.cfg.dist {
        None => {
            let msgs: Vec<ChatMessage> = messages
                .iter()
                .map(|(role, content)| ChatMessage {
                    role: role.clone(),
                    content: content.clone(),
                })
                .collect();
            let text = tok
                .apply_chat_template(&msgs)
                .map_err(|e| ApiError::bad(format!("cannot render the chat template: {e:#}")))?;
            let ids = tok.encode(&text).map_err(ApiError::internal)?;
            check_context(ids.len(), ctx)?;
            Prompt::Dense(ids)
        }
        Some(d) => {
            let [(role, text)] = messages.as_slice() else {
                return Err(ApiError::bad(format!(
                    "--attention {} serves single-turn requests: one user message (document, blank line, question)",
                    d.kind.name()
                )));
            };
            if role != "user" {
                return Err(ApiError::bad("the one message must have role 'user'"));
            }
            let parts = prompt::build(tok, text, req.question.as_deref(), true)
                .map_err(|e| ApiError::bad(format!("{e:#}")))?;
            if matches!(d.kind, Kind::Apb | Kind::Star)
                && parts.question.is_empty()
                && d.anchor_len != Some(0)
            {
                return Err(ApiError::bad(format!(
                    "--attention {} needs the question: end the user message with a blank line and the question, or pass \"question\"",
                    d.kind.name()
                )));
            }
            check_context(parts.context.len() + parts.query.len(), ctx)?;
            Prompt::Dist(parts)
        }
    };
    Ok(Job {
        prompt,
        params: GenParams {
            max_new_tokens,
            temperature,
            top_p,
            seed: req.seed.unwrap_or(GenParams::default().seed),
            ignore_eos: false,
        },
        stream: req.stream,
    })
}

fn check_context(tokens: usize, ctx: usize) -> Result<(), ApiError> {
    if tokens >= ctx {
        return Err(ApiError::bad(format!(
            "the prompt has {tokens} tokens but the model's context is {ctx}; shorten the prompt"
        )));
    }
    Ok(())
}

/// Generates (one request at a time), streaming text pieces to `on_text`.
fn run(
    s: &Server,
    prompt: &Prompt,
    params: &GenParams,
    on_text: &mut (dyn FnMut(&str) + Send),
) -> Result<Generation, ApiError> {
    let _one_at_a_time = s.busy.lock().unwrap_or_else(|p| p.into_inner());
    match (prompt, &s.cfg.dist) {
        (Prompt::Dense(ids), _) => s
            .engine
            .generate(ids, params, on_text)
            .map_err(|e| ApiError::internal(format!("{e:#}"))),
        (Prompt::Dist(parts), Some(d)) => {
            let loaded = &s.engine.loaded;
            dist::generate(&loaded.model, &loaded.tok, parts, d, params, on_text)
                .map(|g| g.generation)
                .map_err(|e| ApiError::internal(format!("{e:#}")))
        }
        (Prompt::Dist(_), None) => Err(ApiError::internal("no distributed configuration")),
    }
}
