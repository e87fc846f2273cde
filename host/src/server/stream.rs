//! Answering a queued request: one JSON response, or server-sent events as text is decoded; a
//! client that leaves cancels its request ([`CancelOnDrop`]).

use super::conn::Client;
use super::openai::{apb_info, finish_reason, usage, ApiError, Endpoint, Meta};
use super::queue::{Ev, Queued};
use super::state::{enqueue, now_secs, Server};
use super::validate::Checked;
use crate::engine::scheduler::Waiting;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc as tmpsc;

/// Sets a request's cancel flag when dropped: the handler future or the event stream goes away
/// with its client.
pub(super) struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Queues the request and answers as JSON or as a stream.
pub(super) async fn respond(
    s: Arc<Server>,
    c: Checked,
    ep: Endpoint,
    client: Option<Client>,
) -> Response {
    let (tx, rx) = tmpsc::unbounded_channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let guard = CancelOnDrop(cancel.clone());
    let method = c.job.settings.method.name();
    let queued = Queued {
        wait: Waiting {
            tokens: c.job.prompt.len(),
            overtaken: 0,
        },
        job: c.job,
        cancel,
        events: tx,
        queued_at: Instant::now(),
    };
    if let Err(e) = enqueue(&s, queued) {
        return e.into_response();
    }
    let meta = Meta {
        id: format!(
            "{}-{:x}",
            if ep == Endpoint::Chat {
                "chatcmpl"
            } else {
                "cmpl"
            },
            rand::random::<u64>()
        ),
        created: now_secs(),
        model: s
            .ready
            .get()
            .map(|r| r.model_names[0].clone())
            .unwrap_or_default(),
        method,
        group: s.ready.get().map(|r| r.group),
        ep,
    };
    if c.stream {
        stream(rx, guard, meta, c.include_usage)
    } else {
        // The answer, unless the client leaves first (dropping `guard` cancels the request).
        let answer = whole(rx, guard, meta);
        match client {
            Some(c) => tokio::select! {
                r = answer => r,
                _ = c.gone() => StatusCode::REQUEST_TIMEOUT.into_response(),
            },
            None => answer.await,
        }
    }
}

pub(super) async fn whole(
    mut rx: tmpsc::UnboundedReceiver<Ev>,
    guard: CancelOnDrop,
    meta: Meta,
) -> Response {
    // `guard` lives in this future: a client that disconnects drops it and cancels the request.
    let _guard = guard;
    while let Some(ev) = rx.recv().await {
        match ev {
            Ev::Text(_) => {}
            Ev::Done(g) => {
                let mut v = meta.envelope(
                    false,
                    json!([meta.choice(Some(&g.text), false, Some(finish_reason(&g)))]),
                );
                v["usage"] = usage(&g);
                v["apb"] = apb_info(&g, &meta);
                return Json(v).into_response();
            }
            Ev::Fail(e) => return e.into_response(),
        }
    }
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "the server stopped before answering",
    )
    .into_response()
}

/// Server-sent events: chunks as text is decoded, a final chunk with `finish_reason`, optionally
/// a usage chunk, then `[DONE]`; a failure mid-stream sends an error event, then `[DONE]`.
pub(super) fn stream(
    rx: tmpsc::UnboundedReceiver<Ev>,
    guard: CancelOnDrop,
    meta: Meta,
    include_usage: bool,
) -> Response {
    let first = if meta.ep == Endpoint::Chat {
        Some(meta.envelope(
            true,
            json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]),
        ))
    } else {
        None
    };
    struct St {
        rx: tmpsc::UnboundedReceiver<Ev>,
        _guard: CancelOnDrop,
        meta: Meta,
        pending: std::collections::VecDeque<String>,
        done: bool,
        include_usage: bool,
    }
    let st = St {
        rx,
        _guard: guard,
        meta,
        pending: first.map(|v| v.to_string()).into_iter().collect(),
        done: false,
        include_usage,
    };
    let events = futures_util::stream::unfold(st, |mut st: St| async move {
        loop {
            if let Some(data) = st.pending.pop_front() {
                return Some((
                    Ok::<_, std::convert::Infallible>(Event::default().data(data)),
                    st,
                ));
            }
            if st.done {
                return None;
            }
            match st.rx.recv().await {
                Some(Ev::Text(t)) => {
                    let v = st
                        .meta
                        .envelope(true, json!([st.meta.choice(Some(&t), true, None)]));
                    st.pending.push_back(v.to_string());
                }
                Some(Ev::Done(g)) => {
                    let mut v = st.meta.envelope(
                        true,
                        json!([st.meta.choice(None, true, Some(finish_reason(&g)))]),
                    );
                    v["apb"] = apb_info(&g, &st.meta);
                    st.pending.push_back(v.to_string());
                    if st.include_usage {
                        let mut u = st.meta.envelope(true, json!([]));
                        u["usage"] = usage(&g);
                        st.pending.push_back(u.to_string());
                    }
                    st.pending.push_back("[DONE]".into());
                    st.done = true;
                }
                Some(Ev::Fail(e)) => {
                    st.pending.push_back(e.body().to_string());
                    st.pending.push_back("[DONE]".into());
                    st.done = true;
                }
                None => {
                    let e = ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the server stopped before finishing",
                    );
                    st.pending.push_back(e.body().to_string());
                    st.pending.push_back("[DONE]".into());
                    st.done = true;
                }
            }
        }
    });
    // Frequent keep-alive comments: a client that left during a long prefill is noticed (the
    // write fails) within seconds, which cancels its prefill.
    let mut r = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(2)))
        .into_response();
    // Proxies must pass events through as they come.
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}
