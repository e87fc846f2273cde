//! The OpenAI wire format: request bodies (refusing the fields we do not implement rather than
//! ignoring them), response envelopes and chunks, and [`ApiError`], the one error type every
//! refusal uses.

use crate::ranks::GroupInfo;
use crate::runner::{Finish, Generation};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

/// An OpenAI-style error: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.
/// Every refusal the server makes is one of these; its `type` follows the status, its `code`
/// is set by the constructor that knows it (never read back from the message).
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    /// OpenAI's machine-readable `code` (`model_not_found`, `invalid_api_key`,
    /// `rate_limit_exceeded`), where one applies.
    code: Option<&'static str>,
    /// The request field the error is about, where known.
    pub(super) param: Option<String>,
    pub(super) retry_after: Option<u64>,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            code: None,
            param: None,
            retry_after: None,
        }
    }

    /// 400: the request is wrong (the message says how).
    pub(super) fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 404 for a `model` this server does not serve, naming those it does.
    pub(super) fn model_not_found(asked: &str, served: &[String]) -> Self {
        Self {
            code: Some("model_not_found"),
            ..Self::new(
                StatusCode::NOT_FOUND,
                format!(
                    "model '{asked}' is not served here; this server runs '{}'",
                    served.join("', '")
                ),
            )
        }
    }

    /// 401 for a missing or wrong `--api-key`.
    pub(super) fn unauthorized(message: impl Into<String>) -> Self {
        Self {
            code: Some("invalid_api_key"),
            ..Self::new(StatusCode::UNAUTHORIZED, message)
        }
    }

    /// 429: come back in `retry_after` seconds.
    pub(super) fn too_many(message: impl Into<String>, retry_after: u64) -> Self {
        Self {
            code: Some("rate_limit_exceeded"),
            retry_after: Some(retry_after),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, message)
        }
    }

    /// The HTTP status it answers with.
    #[cfg(test)]
    pub(super) fn status(&self) -> StatusCode {
        self.status
    }

    pub(super) fn body(&self) -> Value {
        let kind = match self.status.as_u16() {
            401 => "authentication_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        };
        json!({"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

/// Sampling fields shared by both endpoints, and the OpenAI fields we refuse rather than ignore.
#[derive(Deserialize)]
pub(super) struct Common {
    pub(super) model: Option<String>,
    pub(super) max_tokens: Option<usize>,
    pub(super) max_completion_tokens: Option<usize>,
    pub(super) temperature: Option<f64>,
    pub(super) top_p: Option<f64>,
    pub(super) seed: Option<u64>,
    #[serde(default)]
    pub(super) stream: bool,
    pub(super) stream_options: Option<StreamOptions>,
    pub(super) stop: Option<Stop>,
    pub(super) n: Option<usize>,
    /// Extension: the question APB and Star embed in their anchors.
    pub(super) question: Option<String>,
    /// Extension (as in vLLM): keep generating through end-of-sequence tokens.
    #[serde(default)]
    pub(super) ignore_eos: bool,
    pub(super) logprobs: Option<Value>,
    pub(super) top_logprobs: Option<Value>,
    pub(super) presence_penalty: Option<f64>,
    pub(super) frequency_penalty: Option<f64>,
    pub(super) logit_bias: Option<Value>,
    pub(super) response_format: Option<Value>,
    pub(super) tools: Option<Value>,
    pub(super) tool_choice: Option<Value>,
    pub(super) functions: Option<Value>,
    pub(super) echo: Option<bool>,
    pub(super) suffix: Option<Value>,
    pub(super) best_of: Option<usize>,
    /// vLLM-style sampling extras, refused unless neutral.
    pub(super) top_k: Option<i64>,
    pub(super) min_p: Option<f64>,
    pub(super) repetition_penalty: Option<f64>,
}

#[derive(Deserialize)]
pub(super) struct StreamOptions {
    #[serde(default)]
    pub(super) include_usage: bool,
}

#[derive(Deserialize)]
#[serde(untagged, expecting = "'stop' must be a string or a list of strings")]
pub(super) enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
pub(super) struct ChatRequest {
    pub(super) messages: Vec<Message>,
    #[serde(flatten)]
    pub(super) common: Common,
}

#[derive(Deserialize)]
pub(super) struct CompletionRequest {
    pub(super) prompt: PromptField,
    #[serde(flatten)]
    pub(super) common: Common,
}

#[derive(Deserialize)]
#[serde(untagged, expecting = "'prompt' must be a string or a list of strings")]
pub(super) enum PromptField {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
pub(super) struct Message {
    pub(super) role: String,
    pub(super) content: Content,
}

/// A message's content: a string, or OpenAI's list of parts (text parts only).
#[derive(Deserialize)]
#[serde(
    untagged,
    expecting = "a message's 'content' must be a string or a list of text parts"
)]
pub(super) enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
pub(super) struct Part {
    #[serde(rename = "type")]
    pub(super) kind: String,
    pub(super) text: Option<String>,
}

impl Content {
    pub(super) fn text(&self) -> Result<String, ApiError> {
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

/// Which endpoint a request came through (its response shapes differ).
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Endpoint {
    Chat,
    Completion,
}

pub(super) struct Meta {
    pub(super) id: String,
    pub(super) created: u64,
    pub(super) model: String,
    pub(super) method: &'static str,
    pub(super) group: Option<GroupInfo>,
    pub(super) ep: Endpoint,
}

impl Meta {
    pub(super) fn object(&self, chunk: bool) -> &'static str {
        match (self.ep, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    /// One choice: a message / delta (chat) or text (completions).
    pub(super) fn choice(&self, text: Option<&str>, chunk: bool, finish: Option<&str>) -> Value {
        match (self.ep, chunk) {
            (Endpoint::Chat, false) => json!({"index": 0, "finish_reason": finish,
                "message": {"role": "assistant", "content": text.unwrap_or("")}}),
            (Endpoint::Chat, true) => json!({"index": 0, "finish_reason": finish,
                "delta": match text { Some(t) => json!({"content": t}), None => json!({}) }}),
            (Endpoint::Completion, _) => json!({"index": 0, "finish_reason": finish,
                "text": text.unwrap_or(""), "logprobs": null}),
        }
    }

    pub(super) fn envelope(&self, chunk: bool, choices: Value) -> Value {
        json!({"id": self.id, "object": self.object(chunk), "created": self.created,
               "model": self.model, "choices": choices})
    }
}

pub(super) fn finish_reason(g: &Generation) -> &'static str {
    match g.finish {
        Finish::Length => "length",
        Finish::Stop | Finish::Cancelled => "stop",
    }
}

pub(super) fn usage(g: &Generation) -> Value {
    json!({"prompt_tokens": g.stats.prompt_tokens, "completion_tokens": g.stats.generated_tokens,
           "total_tokens": g.stats.prompt_tokens + g.stats.generated_tokens})
}

/// Extension field: what ran (method, APB's scorer, ranks and how they run, plan, time to first
/// token).
pub(super) fn apb_info(g: &Generation, meta: &Meta) -> Value {
    let (rank_mode, comm) = meta.group.map_or(("", ""), |i| (i.rank_mode, i.comm));
    let mut v = json!(g.report());
    v["requested_method"] = meta.method.into();
    v["rank_mode"] = rank_mode.into();
    v["comm"] = comm.into();
    v
}
