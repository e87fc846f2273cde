//! `apb serve`: an OpenAI-compatible HTTP server over a group of ranks.
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions` (JSON or server-sent events),
//! `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text).
//!
//! Rank 0 serves HTTP and runs the engine ([`crate::engine`]); the other ranks (threads on the
//! CPU, one process per GPU) run the same rank program on the steps rank 0 relays
//! ([`crate::ranks`]). Requests wait in one bounded queue (429 with `Retry-After` beyond it);
//! the scheduler picks the next one to prefill (short prompts first) while up to
//! `--max-num-seqs` decode together in one batch; a client that goes away cancels its request,
//! queued or running (it leaves the batch at the next step). A rank that fails answers every
//! request in flight with 500 naming the cause, turns `/health` unhealthy, and stops the server
//! with a non-zero exit, so a supervisor restarts it.
//!
//! Safety: bodies are bounded by a size derived from the model's context before any parsing,
//! tokenization runs at most [`TOKENIZE_PERMITS`] at a time, `--api-key` guards every `/v1`
//! route, POSTs must be `application/json` (no cross-site form posts), and a server bound to
//! loopback answers only loopback `Host` names (no DNS rebinding).
//!
//! A request's path through the files: `guard` (Host, API key, counting) → `validate` (the
//! one gate: body, JSON, parameters, tokens, plan) → `queue` → `engine_loop` (the engine
//! thread: placement within the KV budget, prefill, batched decode steps) → `stream` (the JSON
//! answer or server-sent events, in `openai`'s shapes); `metrics` and `conn` (a client
//! that half-closed its socket from one that left) serve them all. Here: the configuration,
//! start-up, shutdown and the routes; `state` holds what they share.

mod conn;
mod engine_loop;
mod guard;
mod metrics;
mod openai;
mod queue;
mod state;
mod stream;
mod validate;

use crate::error::{err, Context};
use crate::ranks::Group;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method as HttpMethod, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{middleware, Extension, Json, Router};
use conn::Client;
use engine_loop::engine;
pub use engine_loop::gpu_memory_utilization;
use guard::{allowed_hosts, check_host, check_key, count};
use metrics::Metrics;
pub use openai::ApiError;
use openai::Endpoint;
use queue::Queue;
use serde_json::json;
use state::{now_secs, ready, Server};
pub use state::{
    ServeConfig, BODY_BYTES_PER_TOKEN, BODY_IDLE, BODY_MIN_RATE, BODY_PERMITS, TOKENIZE_PERMITS,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;
use stream::respond;
use tokio::sync::{Notify, Semaphore};
use validate::admit;

/// Serves on `listener` until SIGINT/SIGTERM (then finishes the requests in flight) or until a
/// rank fails. `start_ranks` loads the model and starts the group on a background thread while
/// the port already answers (`/health` says loading, requests get 503). Returns the process exit
/// status: Ok after a clean stop, Err naming the failure otherwise.
pub async fn serve(
    listener: tokio::net::TcpListener,
    cfg: ServeConfig,
    start_ranks: impl FnOnce() -> crate::error::Result<Group> + Send + 'static,
) -> crate::error::Result<()> {
    let local = listener.local_addr()?;
    let allowed_hosts = allowed_hosts(&local, &cfg.allowed_hosts);
    let state = Arc::new(Server {
        cfg,
        ready: OnceLock::new(),
        fatal: Mutex::new(None),
        shutdown: Notify::new(),
        queue: Mutex::new(Queue::default()),
        queued: Condvar::new(),
        current: Mutex::new(Vec::new()),
        cut_by_shutdown: AtomicBool::new(false),
        running: AtomicBool::new(false),
        bodies: Arc::new(Semaphore::new(0)),
        tokenize: Arc::new(Semaphore::new(TOKENIZE_PERMITS)),
        created: now_secs(),
        allowed_hosts,
        metrics: Metrics::new().context("cannot register the metrics")?,
    });
    eprintln!("listening on http://{local}");

    // Load and run the ranks on their own thread; the engine loop owns the group.
    let (engine_done_tx, engine_done) = tokio::sync::oneshot::channel::<crate::error::Result<()>>();
    {
        let s = state.clone();
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    start_ranks().and_then(|group| engine(&s, group))
                }))
                .unwrap_or_else(|_| Err(err!("the engine thread panicked")));
                if let Err(e) = &r {
                    s.fail(&format!("{e:#}"));
                }
                let _ = engine_done_tx.send(r);
            })?;
    }
    // A failing GPU rank process stops the group: answer first, then the launcher exits.
    {
        let s = state.clone();
        crate::launch::on_group_failure(move |why| s.fail(why));
    }

    let app = router(state.clone());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let stop = {
        let s = state.clone();
        async move {
            tokio::select! {
                _ = shutdown_signal() => eprintln!("shutting down: finishing the requests in flight"),
                _ = s.shutdown.notified() => {}
            }
        }
    };
    tokio::pin!(stop);
    let http = {
        let header_timeout = state.cfg.header_timeout;
        move || {
            let mut b = hyper::server::conn::http1::Builder::new();
            // A client may half-close its socket after its request and still wait for the
            // answer; `conn` tells it from one that left.
            b.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .half_close(true);
            b
        }
    };
    loop {
        tokio::select! {
            conn = listener.accept() => {
                let Ok((stream, _)) = conn else { continue };
                let (io, svc) = connection(&app, stream);
                let conn = graceful.watch(http().serve_connection(io, svc));
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            _ = &mut stop => break,
        }
    }
    let fatal = state.fatal_cause().is_some();
    if fatal {
        // A failed group: keep answering until the process exits (`/health` says failed, new
        // requests get 503), so clients and probes learn why instead of a refused connection.
        let app = app.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (io, svc) = connection(&app, stream);
                tokio::spawn(http().serve_connection(io, svc));
            }
        });
    } else {
        drop(listener);
    }
    // A second SIGINT/SIGTERM while requests finish stops at once.
    tokio::spawn(async {
        shutdown_signal().await;
        eprintln!("second signal: stopping now");
        std::process::exit(1);
    });
    // Queued requests get 503 at once; the one running finishes within --shutdown-timeout (a
    // failed group answered everything already); then the engine thread stops the ranks.
    state.close_queue("the server is shutting down; retry on another instance");
    // Requests still uploading or waiting to be tokenized get 503 instead of a place.
    state.bodies.close();
    state.tokenize.close();
    // A failed group answered every request already (`fail`): its connections are left open,
    // since a graceful shutdown would close one just accepted (a probe's) without an answer.
    let grace = state.cfg.shutdown_timeout;
    let drained = graceful.shutdown();
    tokio::pin!(drained);
    if fatal {
        // The answers `fail` queued still have to reach their sockets before the runtime drops.
        tokio::time::sleep(crate::launch::FAILURE_GRACE).await;
    } else if tokio::time::timeout(grace, &mut drained).await.is_err() {
        // Set before looking: a request the engine is just starting sees it and stops itself.
        state.cut_by_shutdown.store(true, Ordering::SeqCst);
        let cancels: Vec<Arc<AtomicBool>> = state
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(_, c)| c.clone())
            .collect();
        if !cancels.is_empty() {
            eprintln!(
                "shutdown timeout ({grace:?}): cutting the {} request(s) in flight",
                cancels.len()
            );
        }
        for cancel in cancels {
            cancel.store(true, Ordering::SeqCst);
        }
        // The ranks stop at the next layer or token; their clients get the 503.
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut drained).await;
    }
    let engine = match tokio::time::timeout(Duration::from_secs(30), engine_done).await {
        Ok(Ok(r)) => r,
        _ => Err(err!("the ranks did not stop within 30 s")),
    };
    match state.fatal_cause() {
        Some(why) => Err(err!("{why}")),
        None => engine,
    }
}

/// hyper's IO and service for one accepted connection: its requests carry its [`Client`].
#[allow(clippy::type_complexity)]
fn connection(
    app: &Router,
    stream: tokio::net::TcpStream,
) -> (
    hyper_util::rt::TokioIo<conn::ConnIo>,
    hyper_util::service::TowerToHyperService<
        tower::util::MapRequest<
            Router,
            impl FnMut(Request<hyper::body::Incoming>) -> Request<hyper::body::Incoming> + Clone,
        >,
    >,
) {
    let (io, client) = conn::split(stream);
    let svc = tower::ServiceExt::map_request(
        app.clone(),
        move |mut r: Request<hyper::body::Incoming>| {
            r.extensions_mut().insert(client.clone());
            r
        },
    );
    (
        hyper_util::rt::TokioIo::new(io),
        hyper_util::service::TowerToHyperService::new(svc),
    )
}

fn router(state: Arc<Server>) -> Router {
    let v1 = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions));
    let mut app = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(|State(s): State<Arc<Server>>| async move { s.metrics.render() }))
        .merge(v1)
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "no such route (see /v1/models, /v1/chat/completions, /v1/completions, /health, /metrics)")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this route")
        })
        .layer(middleware::from_fn_with_state(state.clone(), check_key))
        .layer(middleware::from_fn_with_state(state.clone(), check_host))
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .layer(
            tower_http::trace::TraceLayer::new_for_http()
                .make_span_with(
                    tower_http::trace::DefaultMakeSpan::new().level(tracing::Level::INFO),
                )
                .on_response(
                    tower_http::trace::DefaultOnResponse::new().level(tracing::Level::INFO),
                )
                // 5xx answers include the expected 503 "loading" of a starting server; the
                // engine logs real failures itself.
                .on_failure(
                    tower_http::trace::DefaultOnFailure::new().level(tracing::Level::WARN),
                ),
        );
    if !state.cfg.cors_origins.is_empty() {
        use tower_http::cors::{AllowOrigin, CorsLayer};
        let origin = if state.cfg.cors_origins.iter().any(|o| o == "*") {
            AllowOrigin::any()
        } else {
            AllowOrigin::list(
                state
                    .cfg
                    .cors_origins
                    .iter()
                    .filter_map(|o| HeaderValue::from_str(o).ok()),
            )
        };
        app = app.layer(
            CorsLayer::new()
                .allow_origin(origin)
                .allow_methods([HttpMethod::GET, HttpMethod::POST])
                .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]),
        );
    }
    app.with_state(state)
}

async fn health(State(s): State<Arc<Server>>) -> Response {
    let depth = s.queue_depth();
    if let Some(why) = s.fatal_cause() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "failed", "error": why})),
        )
            .into_response();
    }
    if s.ready.get().is_none() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading"})),
        )
            .into_response();
    }
    Json(json!({"status": "ok", "queue_depth": depth,
                "bodies_reading": s.metrics.bodies_reading.get(),
                "running": s.running.load(Ordering::SeqCst),
                "running_sequences": s.metrics.running.get(),
                "kv_positions_used": (0..s.cfg.settings.world)
                    .map(|r| s.metrics.kv_used.with_label_values(&[&r.to_string()]).get())
                    .collect::<Vec<_>>(),
                "max_num_seqs": s.cfg.max_num_seqs,
                "max_queued": s.cfg.max_queued}))
    .into_response()
}

async fn model(
    State(s): State<Arc<Server>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    match ready(&s) {
        Ok(r) if r.model_names.contains(&id) => {
            Json(json!({"id": id, "object": "model", "created": s.created, "owned_by": "apb-rs"}))
                .into_response()
        }
        Ok(r) => ApiError::model_not_found(&id, &r.model_names).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn models(State(s): State<Arc<Server>>) -> Response {
    match ready(&s) {
        Ok(r) => Json(json!({"object": "list", "data": [
            {"id": r.model_names[0], "object": "model", "created": s.created, "owned_by": "apb-rs"}
        ]}))
        .into_response(),
        Err(e) => e.into_response(),
    }
}

async fn chat_completions(
    State(s): State<Arc<Server>>,
    client: Option<Extension<Client>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(s, client, headers, body, Endpoint::Chat).await
}

async fn completions(
    State(s): State<Arc<Server>>,
    client: Option<Extension<Client>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(s, client, headers, body, Endpoint::Completion).await
}

async fn handle(
    s: Arc<Server>,
    client: Option<Extension<Client>>,
    headers: HeaderMap,
    body: Body,
    ep: Endpoint,
) -> Response {
    match admit(&s, &headers, body, ep).await {
        Ok(checked) => respond(s.clone(), checked, ep, client.map(|c| c.0)).await,
        Err(e) => e.into_response(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
