//! Prometheus metrics (`/metrics`): requests by route and status, the queue, the running batch,
//! KV use per rank, engine steps, latency histograms and profiled spans.

use super::openai::ApiError;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use prometheus::Encoder;
use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub(super) struct Metrics {
    pub(super) registry: Registry,
    pub(super) requests: IntCounterVec,
    pub(super) cancelled: IntCounterVec,
    pub(super) queue_depth: IntGauge,
    pub(super) running: IntGauge,
    pub(super) kv_used: IntGaugeVec,
    pub(super) steps: IntCounterVec,
    pub(super) batch: prometheus::Histogram,
    pub(super) spanning: prometheus::Histogram,
    pub(super) step: prometheus::Histogram,
    pub(super) gap: prometheus::Histogram,
    pub(super) tpot: HistogramVec,
    pub(super) bodies_reading: IntGauge,
    pub(super) prompt_tokens: IntCounterVec,
    pub(super) generated_tokens: IntCounterVec,
    pub(super) ttft: HistogramVec,
    pub(super) prefill_tps: HistogramVec,
    pub(super) profile: prometheus::GaugeVec,
}

impl Metrics {
    pub(super) fn new() -> prometheus::Result<Self> {
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

    /// The Prometheus text of every metric (the profile's spans read at this moment).
    pub(super) fn render(&self) -> Response {
        for (bucket, secs) in apb_plugin::profile::snapshot() {
            self.profile.with_label_values(&[bucket.name()]).set(secs);
        }
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
        }
        ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], buf).into_response()
    }
}

/// An in-use count (a gauge up while this lives).
pub(super) struct Gauged(IntGauge);

impl Gauged {
    pub(super) fn new(g: &IntGauge) -> Self {
        g.inc();
        Self(g.clone())
    }
}

impl Drop for Gauged {
    fn drop(&mut self) {
        self.0.dec();
    }
}
