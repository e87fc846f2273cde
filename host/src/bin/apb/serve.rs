//! `apb serve`: the OpenAI-compatible server.

use crate::args::*;
use anyhow::{bail, Context, Result};
use apb_host::device::parse_device;
use apb_host::ranks::{self, GroupSpec};
use apb_loaders::{parse_dtype, ModelSource};
use clap::Args;

#[derive(Args)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    pub(crate) m: ModelArgs,
    #[command(flatten)]
    pub(crate) at: AttentionArgs,
    /// Address to listen on: an IP, `localhost`, or `::1` (loopback by default; other
    /// addresses expose the server to the network: set --api-key).
    #[arg(long, default_value = "127.0.0.1")]
    pub(crate) host: String,
    /// Port to listen on (0: any free port; the chosen one is printed).
    #[arg(long, default_value_t = 8080)]
    pub(crate) port: u16,
    /// max_tokens for requests that give none.
    #[arg(long, default_value_t = 256)]
    pub(crate) default_max_tokens: usize,
    /// Requests that may wait for their turn; beyond it the server answers 429 with Retry-After.
    #[arg(long, default_value_t = 64)]
    pub(crate) max_queued: usize,
    /// Requests generating at once (one batched decode step for all of them); 1 runs one
    /// request at a time, first come, first served.
    #[arg(long, default_value_t = 16)]
    pub(crate) max_num_seqs: usize,
    /// Prompts of at least this many tokens are long: waiting short requests go before them
    /// (each long one is overtaken by at most --max-num-seqs short ones; none with
    /// --max-num-seqs 1).
    #[arg(long, default_value_t = 2048)]
    pub(crate) long_prefill_token_threshold: usize,
    /// Running requests get a decode step between a prefill's layers once they have waited this
    /// long (milliseconds; the ranks of a prefill check every layer on one rank, every 4 on
    /// several), so a long prompt does not stall every stream; 0: at every check.
    #[arg(long, default_value_t = 200)]
    pub(crate) max_decode_gap_ms: u64,
    /// Short requests (prompts the plan runs on one rank, shorter than
    /// --long-prefill-token-threshold): `on` spreads them over the ranks, each prefilled beside
    /// the others' on its own rank and decoded there (data parallel inside the group, while long
    /// requests span ranks); `off` runs them all on rank 0. `auto`: on where every rank process
    /// has a GPU of its own; off elsewhere, since a side-by-side prefill does not yield to
    /// running requests (on 2 CPU cores `on` gave 1.12-1.20x the throughput of 64-token
    /// requests but twice the longest stall between tokens).
    #[arg(long, value_enum, default_value_t = Spread::Auto)]
    pub(crate) spread_short_requests: Spread,
    /// KV memory (bytes) the running requests may hold, and the prefill running beside them its
    /// activations while they last: a request waits until its KV and its prefill fit, one that
    /// never can gets 400. Per rank process, or shared by thread ranks. Default: half the memory
    /// available at start on the CPU; on a GPU, from --gpu-memory-utilization.
    #[arg(long)]
    pub(crate) kv_cache_memory_bytes: Option<u64>,
    /// On a GPU without --kv-cache-memory-bytes: the share of the GPU's memory the server may
    /// hold (as vLLM's flag). The KV budget is this share of the device's total less what is in
    /// use once the model is loaded (weights, CUDA context, other processes); a prefill's
    /// activations count within it, the rest is headroom (the GEMM library's workspace,
    /// allocator slack). Rank processes on one GPU split it. Ignored on the CPU.
    #[arg(long, default_value_t = 0.9, value_name = "FRACTION")]
    pub(crate) gpu_memory_utilization: f64,
    /// Require `Authorization: Bearer KEY` on every /v1 route (also from APB_API_KEY).
    #[arg(long, env = "APB_API_KEY", hide_env_values = true)]
    pub(crate) api_key: Option<String>,
    /// Model name(s) clients use in "model" (repeatable; the first is reported). Default: the
    /// loaded model's name and the -m argument.
    #[arg(long)]
    pub(crate) served_model_name: Vec<String>,
    /// Allow browsers on this origin to call the API (CORS; repeatable; `*` for any).
    #[arg(long)]
    pub(crate) cors_origin: Vec<String>,
    /// Accept this Host header name too (repeatable). A loopback-bound server otherwise answers
    /// only localhost / 127.0.0.1 / ::1 (DNS-rebinding protection).
    #[arg(long)]
    pub(crate) allowed_host: Vec<String>,
    /// Largest request body in bytes (default: 32 bytes per context token + 1 MiB).
    #[arg(long)]
    pub(crate) max_body_bytes: Option<usize>,
    /// Seconds a client has to send its request headers, and its body.
    #[arg(long, default_value_t = 30)]
    pub(crate) read_timeout: u64,
    /// On SIGINT/SIGTERM: queued requests get 503 at once, the running one has this many
    /// seconds to finish (then it is cut, with a 503, within 10 s more), and the server exits
    /// (by default within Kubernetes' 30 s grace).
    #[arg(long, default_value_t = 20.0, value_name = "SECS")]
    pub(crate) shutdown_timeout: f64,
    #[command(flatten)]
    pub(crate) launch: apb_host::launch::LaunchArgs,
}

/// `--spread-short-requests`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Spread {
    Auto,
    On,
    Off,
}

/// A `--cors-origin`: `*`, or `scheme://host[:port]` as browsers send it (no path, no slash).
pub(crate) fn check_origin(o: &str) -> Result<()> {
    if o == "*" {
        return Ok(());
    }
    let ok = o
        .split_once("://")
        .filter(|(scheme, _)| matches!(*scheme, "http" | "https"))
        .is_some_and(|(_, rest)| {
            !rest.is_empty()
                && !rest.contains(['/', '?', '#', ' ', '*'])
                && axum::http::HeaderValue::from_str(o).is_ok()
        });
    if !ok {
        bail!("--cors-origin {o:?} is not an origin: give `*` or scheme://host[:port] (e.g. http://localhost:3000)");
    }
    Ok(())
}

/// `--host` as an address: an IP (v4 or v6, brackets allowed) or a name that resolves.
pub(crate) fn listen_addr(host: &str, port: u16) -> Result<std::net::SocketAddr> {
    use std::net::ToSocketAddrs;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<std::net::IpAddr>() {
        return Ok((ip, port).into());
    }
    (bare, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .with_context(|| format!("--host {host} is not an address or a name that resolves"))
}

pub(crate) fn serve(a: ServeArgs) -> Result<()> {
    let method = parse_method(&a.at)?;
    if a.default_max_tokens == 0 {
        bail!("--default-max-tokens must be at least 1");
    }
    if a.max_num_seqs == 0 {
        bail!("--max-num-seqs must be at least 1");
    }
    if a.max_queued == 0 {
        bail!("--max-queued must be at least 1");
    }
    if a.read_timeout == 0 {
        bail!("--read-timeout must be at least 1 second");
    }
    if !(a.shutdown_timeout.is_finite() && (0.0..=86_400.0).contains(&a.shutdown_timeout)) {
        bail!(
            "--shutdown-timeout must be between 0 and 86400 seconds, got {}",
            a.shutdown_timeout
        );
    }
    if let Some(json) = &a.m.rope_scaling {
        // Checked before the port is bound; the model loads after.
        apb_loaders::RopeScaling::parse_override(json)?;
    }
    if a.max_body_bytes == Some(0) {
        bail!("--max-body-bytes must be at least 1");
    }
    // clap reads an empty APB_API_KEY as no key at all: that must not turn authentication off.
    let env_empty = std::env::var_os("APB_API_KEY").is_some_and(|v| v.is_empty());
    if (env_empty && a.api_key.is_none())
        || a.api_key.as_deref().is_some_and(|k| k.trim().is_empty())
    {
        bail!("--api-key (or APB_API_KEY) is empty: give a key, or leave the flag and the variable out to serve without one");
    }
    if a.served_model_name.iter().any(|n| n.trim().is_empty()) {
        bail!("--served-model-name must not be empty");
    }
    for o in &a.cors_origin {
        check_origin(o)?;
    }
    if a.allowed_host.iter().any(|h| h.trim().is_empty()) {
        bail!("--allowed-host must not be empty");
    }
    // Argument errors before the port is bound (only loading the model comes after it).
    parse_dtype(&a.m.dtype)?;
    ModelSource::parse(&a.m.model, a.m.revision.as_deref())?;
    let spec = GroupSpec {
        world: a.at.world_size,
        device: parse_device(&a.m.device)?,
        launch: a.launch.clone(),
    };
    spec.validate()?;
    // Before the server's threads start.
    spec.limit_threads();
    if spec.processes() && apb_host::launch::is_worker(&a.launch) {
        // A worker rank process (started by rank 0, or another node's launcher): serves rank 0's
        // jobs, no HTTP.
        ranks::start(&spec, |dev| load_runner(&a.m, &a.at, dev))?;
        return Ok(());
    }
    let addr = listen_addr(&a.host, a.port)?;
    if !addr.ip().is_loopback() && a.api_key.as_deref().unwrap_or("").is_empty() {
        eprintln!(
            "warning: listening on {addr} without --api-key: anyone who can reach it can use the model"
        );
    }
    let cfg = apb_host::server::ServeConfig {
        settings: a.at.settings(method)?,
        default_max_tokens: a.default_max_tokens,
        max_queued: a.max_queued,
        max_num_seqs: a.max_num_seqs,
        long_prefill_token_threshold: a.long_prefill_token_threshold,
        max_decode_gap: std::time::Duration::from_millis(a.max_decode_gap_ms),
        kv_cache_memory_bytes: a.kv_cache_memory_bytes,
        gpu_memory_utilization: apb_host::server::gpu_memory_utilization(a.gpu_memory_utilization)
            .map_err(anyhow::Error::msg)?,
        api_key: a.api_key.clone(),
        served_model_names: a.served_model_name.clone(),
        model_alias: Some(a.m.model.clone()),
        cors_origins: a.cors_origin.clone(),
        allowed_hosts: a.allowed_host.clone(),
        max_body_bytes: a.max_body_bytes,
        header_timeout: std::time::Duration::from_secs(a.read_timeout),
        body_timeout: std::time::Duration::from_secs(a.read_timeout),
        shutdown_timeout: std::time::Duration::from_secs_f64(a.shutdown_timeout),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        // Bind first: the port answers (503, "loading") while the model loads.
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        apb_host::server::serve(listener, cfg, move || {
            let mut group = ranks::start(&spec, |dev| load_runner(&a.m, &a.at, dev))?
                .ok_or_else(|| apb_host::error::Error::msg("rank 0 did not start"))?;
            match a.spread_short_requests {
                Spread::Auto => {}
                forced => group.set_spread(forced == Spread::On),
            }
            Ok(group)
        })
        .await?;
        Ok(())
    })
}
