//! The server's state: its configuration, the loaded model, the queue and the requests in flight,
//! and what every part does with them (queue a request, pick the next, answer all on a stop).
//! The routes and handlers above take it whole; it knows none of them.

use super::metrics::Metrics;
use super::openai::ApiError;
use super::queue::{Ev, Pick, Queue, Queued};
use crate::engine::scheduler::Policy;
use crate::ranks::GroupInfo;
use crate::JobSettings;
use apb_loaders::Loaded;
use axum::http::StatusCode;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc as tmpsc, Notify, Semaphore};

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
pub(super) const BODY_SLACK: usize = 1 << 20;

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
    /// ([`crate::engine::Engine::with_decode_gap`]).
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

/// The model, once loaded.
pub(super) struct Ready {
    pub(super) loaded: Arc<Loaded>,
    pub(super) model_names: Vec<String>,
    pub(super) max_body: usize,
    /// How the ranks run (reported in every answer's `apb` object).
    pub(super) group: GroupInfo,
}

pub(super) struct Server {
    pub(super) cfg: ServeConfig,
    pub(super) ready: OnceLock<Ready>,
    /// Set when a rank failed: the server answers 503 and stops.
    pub(super) fatal: Mutex<Option<String>>,
    pub(super) shutdown: Notify,
    pub(super) queue: Mutex<Queue>,
    pub(super) queued: Condvar,
    /// The requests running on the ranks (their events and cancel flags): answered at once if
    /// the group fails under them, cut at the end of a shutdown's grace.
    pub(super) current: Mutex<Vec<(tmpsc::UnboundedSender<Ev>, Arc<AtomicBool>)>>,
    /// Set when a shutdown's grace ran out: the request cut then gets 503, not a short answer.
    pub(super) cut_by_shutdown: AtomicBool,
    pub(super) running: AtomicBool,
    /// KiB of request bodies held at once ([`BODY_PERMITS`] times the body bound, added when the
    /// model is ready): bounds the memory requests can take.
    pub(super) bodies: Arc<Semaphore>,
    pub(super) tokenize: Arc<Semaphore>,
    pub(super) created: u64,
    pub(super) allowed_hosts: Option<Vec<String>>,
    pub(super) metrics: Metrics,
}

impl Server {
    /// No more requests: queued ones are answered 503 with `why`.
    pub(super) fn close_queue(&self, why: &str) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        for item in q.close() {
            let _ = item.events.send(Ev::Fail(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                why,
            )));
        }
        self.metrics.queue_depth.set(0);
        drop(q);
        self.queued.notify_all();
    }

    /// The group failed: answer the request in flight (500) and every queued one (503), turn
    /// `/health` unhealthy, and stop serving.
    pub(super) fn fail(&self, why: &str) {
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
        self.close_queue(&format!(
            "the server is stopping after a rank failure: {why}"
        ));
        self.shutdown.notify_one();
        self.shutdown.notify_waiters();
    }

    /// The next request to prefill, as the scheduler picks it, dropping those whose client
    /// left. With `wait`, blocks until one comes; Closed: closed and empty.
    pub(super) fn next_queued(&self, wait: bool) -> Pick {
        let policy = Policy::new(self.cfg.long_prefill_token_threshold, self.cfg.max_num_seqs);
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            self.drop_cancelled(&mut q);
            if let Some(item) = q.pick(&policy) {
                self.metrics.queue_depth.set(q.len() as i64);
                return Pick::Item(Box::new(item));
            }
            if q.is_closed() {
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

    /// Drops the queued requests whose client left, and counts them.
    pub(super) fn drop_cancelled(&self, q: &mut Queue) {
        let gone = q.drop_cancelled();
        if gone > 0 {
            self.metrics
                .cancelled
                .with_label_values(&["queued"])
                .inc_by(gone as u64);
            self.metrics.queue_depth.set(q.len() as i64);
        }
    }

    /// Requests waiting whose client is still there.
    pub(super) fn queue_depth(&self) -> usize {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        self.drop_cancelled(&mut q);
        q.len()
    }

    /// Why the group failed, once it has.
    pub(super) fn fatal_cause(&self) -> Option<String> {
        self.fatal.lock().expect("fatal").clone()
    }
}

/// Queues a checked request (a place freed by a client that left first counts as free).
pub(super) fn enqueue(s: &Server, item: Queued) -> Result<(), ApiError> {
    ready(s)?;
    let mut q = s.queue.lock().unwrap_or_else(|p| p.into_inner());
    s.drop_cancelled(&mut q);
    q.push(item, s.cfg.max_queued)?;
    s.metrics.queue_depth.set(q.len() as i64);
    drop(q);
    s.queued.notify_one();
    Ok(())
}

/// The loaded model, or the 503 that says why there is none yet (loading, or a failed group).
pub(super) fn ready(s: &Server) -> Result<&Ready, ApiError> {
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

pub(super) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
