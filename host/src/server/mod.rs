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

mod conn;

use crate::engine::scheduler::{Policy, Waiting};
use crate::engine::{self, Engine, KvBudget, Placed};
use crate::error::{err, Context};
use crate::prompt::{self, PromptParts};
use crate::ranks::{Group, GroupInfo, RunError};
use crate::runner::{prepare, Finish, GenParams, Generation, Job, MAX_TEMPERATURE};
use crate::JobSettings;
use apb_loaders::{ChatMessage, Loaded};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method as HttpMethod, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use conn::Client;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc as tmpsc, Notify, OwnedSemaphorePermit, Semaphore};

/// Requests tokenized at once (tokenizing a long document takes memory and cores).
pub const TOKENIZE_PERMITS: usize = 2;
/// Request bodies in memory at once, counted in bytes: this many times the body bound. A body
/// takes its share as its bytes arrive (in KiB), so uploads that stall hold only what they sent
/// and never keep other clients waiting for a slot; one that cannot get room within its pace
/// gets 503.
pub const BODY_PERMITS: usize = 16;
/// A body gets this long for its first bytes, and then as long again plus one second per
/// [`BODY_MIN_RATE`] bytes received; slower, it gets 408 and frees what it held: a client
/// cannot hold memory by trickling bytes until `--read-timeout`.
pub const BODY_IDLE: Duration = Duration::from_secs(3);
/// The slowest upload kept (bytes per second, on average since the headers).
pub const BODY_MIN_RATE: f64 = 16_384.0;
/// Body bytes allowed per context token (plus `BODY_SLACK`): generous for any text (English
/// averages ~4 bytes a token) yet refuses a body far beyond the context before parsing it.
pub const BODY_BYTES_PER_TOKEN: usize = 32;
const BODY_SLACK: usize = 1 << 20;

/// What the server runs every request with.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// How every request runs over the ranks (`world`: the group's ranks).
    pub settings: JobSettings,
    /// `max_tokens` when a request gives none.
    pub default_max_tokens: usize,
    /// Requests that may wait for their turn; more get 429.
    pub max_queued: usize,
    /// Requests generating at once.
    pub max_num_seqs: usize,
    /// Prompts of at least this many tokens are long (see [`crate::engine::scheduler`]).
    pub long_prefill_token_threshold: usize,
    /// Running requests get a decode step inside a prefill once they have waited this long
    /// ([`Engine::with_decode_gap`]).
    pub max_decode_gap: std::time::Duration,
    /// KV memory running requests may hold (bytes; per rank process, or shared by thread
    /// ranks). Default: half the memory available at start on the CPU; on a GPU from
    /// `gpu_memory_utilization`.
    pub kv_cache_memory_bytes: Option<u64>,
    /// On a GPU without `kv_cache_memory_bytes`: the share of the device's memory the server may
    /// hold; the KV budget is that less what is in use once the model is loaded.
    pub gpu_memory_utilization: f64,
    /// Bearer key required on `/v1` routes.
    pub api_key: Option<String>,
    /// Names a request's `model` may use; the first is reported. Empty: the loaded model's name,
    /// and `model_alias` (the `-m` spelling, e.g. `smollm2-135m-instruct`).
    pub served_model_names: Vec<String>,
    /// The `-m` spelling, also accepted as `model`.
    pub model_alias: Option<String>,
    /// Origins allowed by CORS (`*` for any); none: no CORS headers.
    pub cors_origins: Vec<String>,
    /// Extra `Host` names accepted when bound to loopback (or the only ones, when given and bound
    /// elsewhere).
    pub allowed_hosts: Vec<String>,
    /// Body bound (default: derived from the model's context).
    pub max_body_bytes: Option<usize>,
    /// Time a client has to send its request headers, and its body.
    pub header_timeout: Duration,
    /// Time a client has to send its request body.
    pub body_timeout: Duration,
    /// After SIGINT/SIGTERM: how long the request running may take to finish before it is cut
    /// (queued ones get 503 at once).
    pub shutdown_timeout: Duration,
}

/// A request waiting for the ranks.
struct Queued {
    job: Job,
    cancel: Arc<AtomicBool>,
    events: tmpsc::UnboundedSender<Ev>,
    queued_at: Instant,
    /// The scheduler's view (prompt tokens, short requests that went first).
    wait: Waiting,
}

/// A request the engine runs: where its answer goes.
struct Running {
    events: tmpsc::UnboundedSender<Ev>,
    cancel: Arc<AtomicBool>,
    /// Time it waited in the queue.
    waited: Duration,
    method: &'static str,
}

/// What the engine thread tells a request's handler.
enum Ev {
    Text(String),
    Done(Box<Generation>),
    Fail(ApiError),
}

/// The model, once loaded.
struct Ready {
    loaded: Arc<Loaded>,
    model_names: Vec<String>,
    max_body: usize,
    /// How the ranks run (reported in every answer's `apb` object).
    group: GroupInfo,
}

/// What the engine finds in the queue.
enum Pick {
    Item(Box<Queued>),
    /// Nothing waits now.
    Empty,
    /// Closed and empty: stop.
    Closed,
}

/// The requests waiting for the ranks (the scheduler picks from it). Entries whose client left are dropped as soon as
/// the queue is touched, so they never hold a place a live client could take.
#[derive(Default)]
struct Queue {
    items: VecDeque<Queued>,
    /// No new entries (shutdown); the engine finishes what is queued.
    closed: bool,
}

struct Server {
    cfg: ServeConfig,
    ready: OnceLock<Ready>,
    /// Set when a rank failed: the server answers 503 and stops.
    fatal: Mutex<Option<String>>,
    shutdown: Notify,
    queue: Mutex<Queue>,
    queued: Condvar,
    /// The requests running on the ranks (their events and cancel flags): answered at once if
    /// the group fails under them, cut at the end of a shutdown's grace.
    current: Mutex<Vec<(tmpsc::UnboundedSender<Ev>, Arc<AtomicBool>)>>,
    /// Set when a shutdown's grace ran out: the request cut then gets 503, not a short answer.
    cut_by_shutdown: AtomicBool,
    running: AtomicBool,
    /// KiB of request bodies held at once ([`BODY_PERMITS`] times the body bound, added when the
    /// model is ready): bounds the memory requests can take.
    bodies: Arc<Semaphore>,
    tokenize: Arc<Semaphore>,
    created: u64,
    allowed_hosts: Option<Vec<String>>,
    metrics: Metrics,
}

struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    cancelled: IntCounterVec,
    queue_depth: IntGauge,
    running: IntGauge,
    kv_used: IntGaugeVec,
    steps: IntCounterVec,
    batch: prometheus::Histogram,
    spanning: prometheus::Histogram,
    step: prometheus::Histogram,
    gap: prometheus::Histogram,
    tpot: HistogramVec,
    bodies_reading: IntGauge,
    prompt_tokens: IntCounterVec,
    generated_tokens: IntCounterVec,
    ttft: HistogramVec,
    prefill_tps: HistogramVec,
    profile: prometheus::GaugeVec,
}

impl Metrics {
    fn new() -> prometheus::Result<Self> {
        let registry = Registry::new_custom(Some("apb".into()), None)?;
        let requests = IntCounterVec::new(
            Opts::new(
                "requests_total",
                "Requests answered (refusals and unknown routes included), by endpoint (chat, completions, models, health, metrics, other), attention method and HTTP status",
            ),
            &["endpoint", "method", "status"],
        )?;
        let cancelled = IntCounterVec::new(
            Opts::new(
                "cancelled_total",
                "Requests whose client went away, by where they were (queued or running)",
            ),
            &["stage"],
        )?;
        let queue_depth = IntGauge::new("queue_depth", "Requests waiting for the ranks")?;
        let running = IntGauge::new(
            "running_sequences",
            "Requests generating (in the decode batch)",
        )?;
        let kv_used = IntGaugeVec::new(
            Opts::new(
                "kv_positions_used",
                "KV positions the running requests hold, by rank (admission keeps each within the budget)",
            ),
            &["rank"],
        )?;
        let steps = IntCounterVec::new(
            Opts::new(
                "engine_steps_total",
                "Engine steps, by kind: prefill, decode, or decode_in_prefill (a decode step run between a prefill's layers)",
            ),
            &["kind"],
        )?;
        let batch = prometheus::Histogram::with_opts(
            HistogramOpts::new("decode_batch_size", "Sequences per decode step")
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
        )?;
        let secs = vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ];
        let step = prometheus::Histogram::with_opts(
            HistogramOpts::new("decode_step_seconds", "Time of one batched decode step")
                .buckets(secs.clone()),
        )?;
        let gap = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "decode_gap_seconds",
                "Time running requests went without a decode step (a prefill in between included)",
            )
            .buckets(secs.clone()),
        )?;
        let tpot = HistogramVec::new(
            HistogramOpts::new(
                "time_per_output_token_seconds",
                "Decode time per token after the first, of completed requests",
            )
            .buckets(secs),
            &["method"],
        )?;
        let spanning = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "decode_spanning_sequences",
                "Sequences spanning several ranks per decode step (all in one collective per layer)",
            )
            .buckets(vec![0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]),
        )?;
        let bodies_reading = IntGauge::new(
            "bodies_reading",
            "Request bodies being read or parsed (at most 16 at a time)",
        )?;
        let prompt_tokens = IntCounterVec::new(
            Opts::new("prompt_tokens_total", "Prompt tokens of completed requests"),
            &["method"],
        )?;
        let generated_tokens = IntCounterVec::new(
            Opts::new(
                "generated_tokens_total",
                "Generated tokens of completed requests",
            ),
            &["method"],
        )?;
        let buckets = vec![
            0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
        ];
        let ttft = HistogramVec::new(
            HistogramOpts::new(
                "time_to_first_token_seconds",
                "Time from arrival (queue wait included) to the first token",
            )
            .buckets(buckets),
            &["method"],
        )?;
        let prefill_tps = HistogramVec::new(
            HistogramOpts::new(
                "prefill_tokens_per_second",
                "Prompt tokens per prefill second",
            )
            .buckets(prometheus::exponential_buckets(100.0, 2.0, 16)?),
            &["method"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(cancelled.clone()))?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(running.clone()))?;
        registry.register(Box::new(kv_used.clone()))?;
        registry.register(Box::new(steps.clone()))?;
        registry.register(Box::new(batch.clone()))?;
        registry.register(Box::new(spanning.clone()))?;
        registry.register(Box::new(step.clone()))?;
        registry.register(Box::new(gap.clone()))?;
        registry.register(Box::new(tpot.clone()))?;
        registry.register(Box::new(bodies_reading.clone()))?;
        registry.register(Box::new(prompt_tokens.clone()))?;
        registry.register(Box::new(generated_tokens.clone()))?;
        registry.register(Box::new(ttft.clone()))?;
        let profile = prometheus::GaugeVec::new(
            Opts::new(
                "profile_seconds",
                "Time spent in each profiled span since the start (only with APB_PROFILE=host or synced: see docs/serving.md)",
            ),
            &["span"],
        )?;
        registry.register(Box::new(prefill_tps.clone()))?;
        registry.register(Box::new(profile.clone()))?;
        Ok(Self {
            registry,
            requests,
            cancelled,
            queue_depth,
            running,
            kv_used,
            steps,
            batch,
            spanning,
            step,
            gap,
            tpot,
            bodies_reading,
            prompt_tokens,
            generated_tokens,
            ttft,
            prefill_tps,
            profile,
        })
    }
}

/// An OpenAI-style error: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    /// The request field the error is about, where known.
    param: Option<String>,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }
    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    fn body(&self) -> Value {
        let kind = match self.status.as_u16() {
            401 => "authentication_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        };
        let code = match self.status.as_u16() {
            401 => json!("invalid_api_key"),
            404 if self.message.starts_with("model") => json!("model_not_found"),
            429 => json!("rate_limit_exceeded"),
            _ => Value::Null,
        };
        json!({"error": {"message": self.message, "type": kind, "param": self.param, "code": code}})
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

/// Sets a request's cancel flag when dropped: the handler future or the event stream goes away
/// with its client.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

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

impl Server {
    /// No more requests: queued ones are answered 503 with `why`.
    fn close_queue(&self, why: &str) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        for item in q.items.drain(..) {
            let _ = item.events.send(Ev::Fail(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                why,
            )));
        }
        q.closed = true;
        self.metrics.queue_depth.set(0);
        drop(q);
        self.queued.notify_all();
    }

    /// The group failed: answer the request in flight (500) and every queued one (503), turn
    /// `/health` unhealthy, and stop serving.
    fn fail(&self, why: &str) {
        let why = self
            .fatal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(|| why.to_string())
            .clone();
        for (tx, _) in self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = tx.send(Ev::Fail(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("a rank failed: {why}"),
            )));
        }
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        for item in q.items.drain(..) {
            let _ = item.events.send(Ev::Fail(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the server is stopping after a rank failure: {why}"),
            )));
        }
        q.closed = true;
        self.metrics.queue_depth.set(0);
        drop(q);
        self.queued.notify_all();
        self.shutdown.notify_one();
        self.shutdown.notify_waiters();
    }

    /// The next request to prefill, as the scheduler picks it, dropping those whose client
    /// left. With `wait`, blocks until one comes; Closed: closed and empty.
    fn next_queued(&self, wait: bool) -> Pick {
        let policy = Policy::new(self.cfg.long_prefill_token_threshold, self.cfg.max_num_seqs);
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            self.drop_cancelled(&mut q);
            let mut waiting: Vec<Waiting> = q.items.iter().map(|i| i.wait).collect();
            if let Some(i) = policy.pick(&mut waiting) {
                for (item, w) in q.items.iter_mut().zip(waiting) {
                    item.wait = w;
                }
                let item = q.items.remove(i).expect("picked within the queue");
                self.metrics.queue_depth.set(q.items.len() as i64);
                return Pick::Item(Box::new(item));
            }
            if q.closed {
                return Pick::Closed;
            }
            if !wait {
                return Pick::Empty;
            }
            q = self
                .queued
                .wait_timeout(q, Duration::from_millis(500))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn drop_cancelled(&self, q: &mut Queue) {
        let before = q.items.len();
        q.items.retain(|i| !i.cancel.load(Ordering::SeqCst));
        let gone = before - q.items.len();
        if gone > 0 {
            // Their clients left while they waited.
            self.metrics
                .cancelled
                .with_label_values(&["queued"])
                .inc_by(gone as u64);
            self.metrics.queue_depth.set(q.items.len() as i64);
        }
    }

    fn queue_depth(&self) -> usize {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        self.drop_cancelled(&mut q);
        q.items.len()
    }

    fn fatal_cause(&self) -> Option<String> {
        self.fatal.lock().expect("fatal").clone()
    }
}

/// The engine loop: between decode steps of the running batch, prefills one waiting request
/// while there is room; when the queue closes and the batch is empty, stops the ranks.
fn engine(s: &Arc<Server>, group: Group) -> crate::error::Result<()> {
    let loaded = group.runner().loaded.clone();
    let mut model_names = s.cfg.served_model_names.clone();
    if model_names.is_empty() {
        model_names.push(loaded.name.clone());
        model_names.extend(
            s.cfg
                .model_alias
                .iter()
                .filter(|a| **a != loaded.name)
                .cloned(),
        );
    }
    let ctx = loaded.model.cfg.context_len();
    let max_body = s.cfg.max_body_bytes.unwrap_or(
        ctx.saturating_mul(BODY_BYTES_PER_TOKEN)
            .saturating_add(BODY_SLACK),
    );
    let budget = match kv_budget(&s.cfg, &group) {
        Ok(b) => b,
        Err(why) => {
            let _ = group.shutdown();
            crate::error::bail!("{why}");
        }
    };
    let _ = s.ready.set(Ready {
        loaded,
        model_names,
        max_body,
        group: group.info(),
    });
    s.bodies.add_permits(BODY_PERMITS * max_body.div_ceil(1024));
    let info = group.info();
    eprintln!(
        "ready: {} with {} on {} rank{}{}",
        s.ready
            .get()
            .map(|r| r.model_names[0].as_str())
            .unwrap_or(""),
        s.cfg.settings.method.name(),
        group.world(),
        if group.world() == 1 { "" } else { "s" },
        if group.world() == 1 {
            String::new()
        } else {
            format!(" ({}, comm {})", info.rank_mode, info.comm)
        }
    );
    if let Some(b) = &budget {
        eprintln!(
            "KV budget: {:.2} GiB = {} positions{} ({} bytes a position)",
            (b.positions * b.bytes_per_position) as f64 / (1u64 << 30) as f64,
            b.positions,
            if b.shared {
                " shared by the ranks"
            } else {
                " per rank"
            },
            b.bytes_per_position
        );
    }
    let answer_now = s.clone();
    let mut eng: Engine<Running> = if s.cfg.max_num_seqs > 1 {
        Engine::batching(budget)
            .with_decode_gap(s.cfg.max_decode_gap)
            .on_done_inside_prefill(move |(r, g)| answer(&answer_now, r, Ok(g)))
    } else {
        Engine::with_budget(budget)
    };
    // A request waiting for KV room: it keeps its turn (nothing overtakes it).
    let mut held: Option<Placed<Running>> = None;
    // The per-rank KV gauges, looked up once (set after every step).
    let kv_gauges: Vec<IntGauge> = (0..group.world())
        .map(|rank| s.metrics.kv_used.with_label_values(&[&rank.to_string()]))
        .collect();
    loop {
        if let Some(p) = held.take() {
            if let Some(why) = s.fatal_cause() {
                answer(s, p.into_tag(), Err(RunError::Failed(why)));
            } else if p.cancelled() {
                gone_while_queued(s, p.into_tag());
            } else if eng.fits(&p) {
                start_seq(s, &group, &mut eng, p);
            } else {
                held = Some(p);
            }
        }
        // Prefill one waiting request between decode steps while there is room; with nothing
        // running, wait for one.
        let next = if held.is_none() && eng.running() < s.cfg.max_num_seqs {
            s.next_queued(eng.running() == 0)
        } else {
            Pick::Empty
        };
        match next {
            Pick::Item(q) => {
                if let Some(req) = running_request(s, *q) {
                    match eng.place(&group, req) {
                        Ok(p) if eng.fits(&p) => start_seq(s, &group, &mut eng, p),
                        Ok(p) => held = Some(p),
                        Err((r, e)) => answer(s, r, Err(e)),
                    }
                }
            }
            Pick::Closed if eng.running() == 0 && held.is_none() => break,
            Pick::Empty | Pick::Closed => {}
        }
        if eng.running() > 0 {
            s.metrics.running.set(eng.running() as i64);
            match eng.step(&group) {
                Ok(done) => done.into_iter().for_each(|(r, g)| answer(s, r, Ok(g))),
                Err(e) => {
                    for r in eng.drain() {
                        answer(s, r, Err(RunError::Failed(format!("{e}"))));
                    }
                }
            }
        }
        record_steps(s, &mut eng, "decode");
        s.metrics.running.set(eng.running() as i64);
        for (g, &used) in kv_gauges.iter().zip(eng.kv_used()) {
            g.set(used as i64);
        }
        s.running.store(eng.running() > 0, Ordering::SeqCst);
    }
    group.shutdown()
}

/// `--gpu-memory-utilization`: a share of the device, in (0, 1] (checked at launch and again
/// where the budget is made, for a `ServeConfig` built by hand).
pub fn gpu_memory_utilization(f: f64) -> Result<f64, String> {
    if f > 0.0 && f <= 1.0 {
        Ok(f)
    } else {
        Err(format!("--gpu-memory-utilization {f}: give a fraction of the GPU's memory, above 0 and at most 1 (e.g. 0.9)"))
    }
}

/// The KV budget: `--kv-cache-memory-bytes`, else on the CPU half the memory available at
/// start (thread ranks share it; rank processes split it by the ranks on the node), on a GPU
/// `--gpu-memory-utilization` of its memory less what is in use now that the model is loaded
/// (rank processes split it by the ranks on rank 0's GPU). An error when that leaves nothing.
fn kv_budget(cfg: &ServeConfig, group: &Group) -> Result<Option<KvBudget>, String> {
    let model = group.runner().model();
    let c = &model.cfg;
    let bytes_per_position = 2
        * c.num_hidden_layers
        * c.num_key_value_heads
        * c.head_dim
        * model.dtype().size_in_bytes();
    // A prefill row's largest transient tensors in one layer: the hidden state and residual,
    // the norm's output, q|k|v and the attention output, and the MLP's gate, up and their
    // product (an estimate of the peak; the layers run one after another).
    let prefill_bytes_per_row = (4 * c.hidden_size
        + 3 * c.intermediate_size
        + (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim)
        * model.dtype().size_in_bytes();
    let shared = group.info().rank_mode == "threads";
    let bytes = match cfg.kv_cache_memory_bytes {
        Some(b) => b,
        None if model.device().is_cpu() => {
            let Some(avail_kib) = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemAvailable:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            }) else {
                return Ok(None);
            };
            let avail = avail_kib * 1024;
            let per = if shared { 1 } else { group.world() as u64 };
            avail / 2 / per
        }
        None => {
            gpu_memory_utilization(cfg.gpu_memory_utilization)?;
            let Some((free, total)) = crate::device::memory(model.device())? else {
                return Ok(None);
            };
            let allowed = (cfg.gpu_memory_utilization * total as f64) as u64;
            let used = total - free;
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            if allowed <= used {
                return Err(format!(
                    "--gpu-memory-utilization {} allows {:.2} GiB of the GPU's {:.2} GiB, but {:.2} GiB are in use with the model loaded: no room for KV (raise it, or set --kv-cache-memory-bytes)",
                    cfg.gpu_memory_utilization,
                    gib(allowed),
                    gib(total),
                    gib(used)
                ));
            }
            let per = if shared {
                1
            } else {
                group.world().div_ceil(crate::launch::gpu_count().max(1)) as u64
            };
            (allowed - used) / per
        }
    };
    Ok(Some(KvBudget {
        positions: (bytes / bytes_per_position as u64) as usize,
        shared,
        bytes_per_position,
        prefill_bytes_per_row,
    }))
}

/// A queued request's client left while it waited for KV room.
fn gone_while_queued(s: &Server, r: Running) {
    s.current
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|(_, c)| !Arc::ptr_eq(c, &r.cancel));
    s.metrics.cancelled.with_label_values(&["queued"]).inc();
}

/// A request picked from the queue as the engine takes it (None: answered already).
fn running_request<'a>(s: &Arc<Server>, q: Queued) -> Option<engine::Request<'a, Running>> {
    if let Some(why) = s.fatal_cause() {
        let _ = q.events.send(Ev::Fail(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the server is stopping after a rank failure: {why}"),
        )));
        return None;
    }
    s.current
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((q.events.clone(), q.cancel.clone()));
    if s.cut_by_shutdown.load(Ordering::SeqCst) {
        q.cancel.store(true, Ordering::SeqCst);
    }
    let events = q.events.clone();
    Some(engine::Request {
        tag: Running {
            events: q.events,
            cancel: q.cancel.clone(),
            waited: q.queued_at.elapsed(),
            method: q.job.settings.method.name(),
        },
        job: q.job,
        cancel: q.cancel,
        on_text: Box::new(move |t: &str| {
            let _ = events.send(Ev::Text(t.to_string()));
        }),
    })
}

/// Prefills a placed request (its first token comes with it).
fn start_seq<'a>(
    s: &Arc<Server>,
    group: &Group,
    eng: &mut Engine<'a, Running>,
    p: Placed<'a, Running>,
) {
    s.running.store(true, Ordering::SeqCst);
    s.metrics.steps.with_label_values(&["prefill"]).inc();
    let started = eng.start(group, p);
    record_steps(s, eng, "decode_in_prefill");
    match started {
        Ok(None) => {}
        Ok(Some((r, g))) => answer(s, r, Ok(g)),
        Err((r, e)) => {
            let failed = matches!(e, RunError::Failed(_));
            answer(s, r, Err(e));
            if failed {
                for r in eng.drain() {
                    answer(s, r, Err(RunError::Failed("the group failed".into())));
                }
            }
        }
    }
}

/// The decode steps the engine ran since the last call, into the metrics (`kind`: `decode`, or
/// `decode_in_prefill` for those run between a prefill's layers).
fn record_steps(s: &Server, eng: &mut Engine<'_, Running>, kind: &str) {
    let m = &s.metrics;
    for st in eng.take_stats() {
        m.steps.with_label_values(&[kind]).inc();
        m.batch.observe(st.rows as f64);
        m.spanning.observe(st.spanning as f64);
        if let Some(g) = st.gap_s {
            m.gap.observe(g);
        }
        m.step.observe(st.secs);
    }
}

/// Answers a request the engine is done with, and counts it.
fn answer(s: &Server, r: Running, res: Result<Generation, RunError>) {
    s.current
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|(_, c)| !Arc::ptr_eq(c, &r.cancel));
    let method = r.method;
    match res {
        // The group failed under it: `fail` answered it already (its cancel flag may have
        // been set by its client leaving after that answer, not before).
        _ if s.fatal_cause().is_some() => {}
        Ok(g) if g.finish == Finish::Cancelled && s.cut_by_shutdown.load(Ordering::SeqCst) => {
            let _ = r.events.send(Ev::Fail(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the server shut down before this request finished (--shutdown-timeout {:?}); retry",
                    s.cfg.shutdown_timeout
                ),
            )));
        }
        Ok(g) => {
            let m = &s.metrics;
            if g.finish == Finish::Cancelled {
                m.cancelled.with_label_values(&["running"]).inc();
                tracing::info!(
                    "request cancelled by its client after {} tokens",
                    g.stats.generated_tokens
                );
            } else {
                // Token counters and latency histograms are of completed requests.
                m.prompt_tokens
                    .with_label_values(&[method])
                    .inc_by(g.stats.prompt_tokens as u64);
                m.generated_tokens
                    .with_label_values(&[method])
                    .inc_by(g.stats.generated_tokens as u64);
                m.ttft
                    .with_label_values(&[method])
                    .observe(r.waited.as_secs_f64() + g.stats.prefill_ms / 1e3);
                if g.stats.decode_tokens_per_s > 0.0 {
                    m.tpot
                        .with_label_values(&[method])
                        .observe(1.0 / g.stats.decode_tokens_per_s);
                }
                if g.stats.prefill_ms > 0.0 {
                    m.prefill_tps
                        .with_label_values(&[method])
                        .observe(g.stats.prompt_tokens as f64 / (g.stats.prefill_ms / 1e3));
                }
            }
            let _ = r.events.send(Ev::Done(Box::new(g)));
        }
        Err(RunError::Input(m)) => {
            let _ = r.events.send(Ev::Fail(ApiError::bad(m)));
        }
        Err(RunError::Failed(why)) => {
            let why = format!("a rank failed: {why}");
            eprintln!("error: {why}; stopping the server");
            // The server fails first: a client told of the failure then finds /health saying
            // so (answered first, it could ask before `fail` ran and hear "ok").
            s.fail(&why);
            let _ = r.events.send(Ev::Fail(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                why,
            )));
        }
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
        .route("/metrics", get(metrics))
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

/// `Host` names a loopback-bound server answers (DNS rebinding: a web page's JavaScript reaching
/// 127.0.0.1 through a hostile name would carry that name). None: any.
fn allowed_hosts(local: &SocketAddr, extra: &[String]) -> Option<Vec<String>> {
    if local.ip().is_loopback() {
        let mut hosts: Vec<String> = ["localhost", "127.0.0.1", "::1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        hosts.extend(extra.iter().cloned());
        Some(hosts)
    } else if !extra.is_empty() {
        Some(extra.to_vec())
    } else {
        None
    }
}

/// The host part of a `Host` header (`name`, `name:port`, `[v6]:port`).
fn host_name(h: &str) -> &str {
    if let Some(rest) = h.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match h.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => h,
    }
}

async fn check_host(State(s): State<Arc<Server>>, req: Request, next: Next) -> Response {
    if let Some(allowed) = &s.allowed_hosts {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(host_name)
            .unwrap_or("");
        if !allowed.iter().any(|a| a.eq_ignore_ascii_case(host)) {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                format!("Host '{host}' is not served here (DNS rebinding protection); allow it with --allowed-host"),
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// Counts every answer (`apb_requests_total`), refusals by the host and key checks and unknown
/// routes included, by the route it was for.
async fn count(State(s): State<Arc<Server>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let endpoint = match path {
        "/v1/chat/completions" => "chat",
        "/v1/completions" => "completions",
        "/health" => "health",
        "/metrics" => "metrics",
        p if p == "/v1/models" || p.starts_with("/v1/models/") => "models",
        _ => "other",
    };
    let r = next.run(req).await;
    s.metrics
        .requests
        .with_label_values(&[endpoint, s.cfg.settings.method.name(), r.status().as_str()])
        .inc();
    r
}

async fn check_key(State(s): State<Arc<Server>>, req: Request, next: Next) -> Response {
    let guarded = req.uri().path().starts_with("/v1");
    if let (true, Some(key)) = (guarded, &s.cfg.api_key) {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, key)| key);
        if !given.is_some_and(|g| constant_time_eq(g.trim().as_bytes(), key.as_bytes())) {
            let mut r = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API key: send 'Authorization: Bearer <key>'",
            )
            .into_response();
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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

async fn metrics(State(s): State<Arc<Server>>) -> Response {
    for (span, secs) in apb_plugin::profile::snapshot() {
        s.metrics.profile.with_label_values(&[span]).set(secs);
    }
    let mut buf = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&s.metrics.registry.gather(), &mut buf) {
        return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], buf).into_response()
}

fn ready(s: &Server) -> Result<&Ready, ApiError> {
    if let Some(why) = s.fatal_cause() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the server is stopping after a rank failure: {why}"),
        ));
    }
    s.ready.get().ok_or_else(|| {
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the model is still loading",
        );
        e.retry_after = Some(5);
        e
    })
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
        Ok(r) => ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "model '{id}' is not served here; this server runs '{}'",
                r.model_names.join("', '")
            ),
        )
        .into_response(),
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

/// Sampling fields shared by both endpoints, and the OpenAI fields we refuse rather than ignore.
#[derive(Deserialize)]
struct Common {
    model: Option<String>,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<u64>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    stop: Option<Stop>,
    n: Option<usize>,
    /// Extension: the question APB and Star embed in their anchors.
    question: Option<String>,
    /// Extension (as in vLLM): keep generating through end-of-sequence tokens.
    #[serde(default)]
    ignore_eos: bool,
    logprobs: Option<Value>,
    top_logprobs: Option<Value>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    logit_bias: Option<Value>,
    response_format: Option<Value>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    functions: Option<Value>,
    echo: Option<bool>,
    suffix: Option<Value>,
    best_of: Option<usize>,
    /// vLLM-style sampling extras, refused unless neutral.
    top_k: Option<i64>,
    min_p: Option<f64>,
    repetition_penalty: Option<f64>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
#[serde(untagged, expecting = "'stop' must be a string or a list of strings")]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<Message>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: PromptField,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
#[serde(untagged, expecting = "'prompt' must be a string or a list of strings")]
enum PromptField {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: Content,
}

/// A message's content: a string, or OpenAI's list of parts (text parts only).
#[derive(Deserialize)]
#[serde(
    untagged,
    expecting = "a message's 'content' must be a string or a list of text parts"
)]
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

/// Which endpoint a request came through (its response shapes differ).
#[derive(Clone, Copy, PartialEq)]
enum Endpoint {
    Chat,
    Completion,
}

/// A request checked and tokenized, ready to queue.
struct Checked {
    job: Job,
    stream: bool,
    include_usage: bool,
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

/// An in-use count (a gauge up while this lives).
struct Gauged(IntGauge);

impl Gauged {
    fn new(g: &IntGauge) -> Self {
        g.inc();
        Self(g.clone())
    }
}

impl Drop for Gauged {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The body, at most `limit` bytes (Err(None): over it), within `whole` and at the pace
/// [`BODY_IDLE`] and [`BODY_MIN_RATE`] set, with the share of `budget` (KiB) it holds.
async fn read_body(
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
async fn admit(
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

fn check(s: &Server, body: &[u8], ep: Endpoint) -> Result<Checked, ApiError> {
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
            check_common(ready, &req.common)?;
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
            check_common(ready, &req.common)?;
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
fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
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

fn job(s: &Server, prompt: PromptParts, params: GenParams) -> Job {
    Job {
        prompt,
        settings: s.cfg.settings.clone(),
        params,
    }
}

/// The model name and the parameters we do not implement (refused, never silently ignored).
fn check_common(ready: &Ready, c: &Common) -> Result<(), ApiError> {
    if let Some(m) = &c.model {
        if !ready.model_names.iter().any(|n| n == m) {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "model '{m}' is not served here; this server runs '{}'",
                    ready.model_names.join("', '")
                ),
            ));
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

/// Queues the request and answers as JSON or as a stream.
async fn respond(s: Arc<Server>, c: Checked, ep: Endpoint, client: Option<Client>) -> Response {
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

fn enqueue(s: &Server, item: Queued) -> Result<(), ApiError> {
    ready(s)?;
    let mut q = s.queue.lock().unwrap_or_else(|p| p.into_inner());
    if q.closed {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is stopping",
        ));
    }
    s.drop_cancelled(&mut q);
    if q.items.len() >= s.cfg.max_queued {
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "the queue is full ({} requests waiting); retry later",
                s.cfg.max_queued
            ),
        );
        e.retry_after = Some(1);
        return Err(e);
    }
    q.items.push_back(item);
    s.metrics.queue_depth.set(q.items.len() as i64);
    drop(q);
    s.queued.notify_one();
    Ok(())
}

struct Meta {
    id: String,
    created: u64,
    model: String,
    method: &'static str,
    group: Option<GroupInfo>,
    ep: Endpoint,
}

impl Meta {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.ep, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    /// One choice: a message / delta (chat) or text (completions).
    fn choice(&self, text: Option<&str>, chunk: bool, finish: Option<&str>) -> Value {
        match (self.ep, chunk) {
            (Endpoint::Chat, false) => json!({"index": 0, "finish_reason": finish,
                "message": {"role": "assistant", "content": text.unwrap_or("")}}),
            (Endpoint::Chat, true) => json!({"index": 0, "finish_reason": finish,
                "delta": match text { Some(t) => json!({"content": t}), None => json!({}) }}),
            (Endpoint::Completion, _) => json!({"index": 0, "finish_reason": finish,
                "text": text.unwrap_or(""), "logprobs": null}),
        }
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Value {
        json!({"id": self.id, "object": self.object(chunk), "created": self.created,
               "model": self.model, "choices": choices})
    }
}

fn finish_reason(g: &Generation) -> &'static str {
    match g.finish {
        Finish::Length => "length",
        Finish::Stop | Finish::Cancelled => "stop",
    }
}

fn usage(g: &Generation) -> Value {
    json!({"prompt_tokens": g.stats.prompt_tokens, "completion_tokens": g.stats.generated_tokens,
           "total_tokens": g.stats.prompt_tokens + g.stats.generated_tokens})
}

/// Extension field: what ran (method, APB's scorer, ranks and how they run, plan, time to first
/// token).
fn apb_info(g: &Generation, meta: &Meta) -> Value {
    let (rank_mode, comm) = meta.group.map_or(("", ""), |i| (i.rank_mode, i.comm));
    let mut v = json!(g.report());
    v["requested_method"] = meta.method.into();
    v["rank_mode"] = rank_mode.into();
    v["comm"] = comm.into();
    v
}

async fn whole(mut rx: tmpsc::UnboundedReceiver<Ev>, guard: CancelOnDrop, meta: Meta) -> Response {
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
fn stream(
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

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
