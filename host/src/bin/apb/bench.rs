//! `apb bench`: prefill, attention, projections, and a load against a running server.

use anyhow::{bail, Context, Result};
use apb_host::device::parse_device;
use apb_host::ranks::GroupSpec;
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Subcommand)]
pub(crate) enum BenchCmd {
    /// Prefill wall time of dense (1 GPU) vs the sequence-parallel methods (--world-size GPUs,
    /// one process each), side by side, on a model of real shapes with random weights; per-rank
    /// time and attended pairs.
    Prefill(PrefillArgs),
    /// Our fused attention alone (causal, bf16, GQA) per length and head dim: time and TFLOP/s,
    /// one JSON line each. APB_ATTENTION=mma times our own kernel instead of cuDNN's on Hopper.
    /// With --decode-rows: a decode step's attention instead (that many rows, each one query
    /// against its own cache of each length), seconds a call and KV GB/s.
    Attention(AttentionBenchArgs),
    /// A decode step's projections (q|k|v, o_proj, gate|up with SiLU, down, lm_head) of a
    /// model's shapes for a few rows: our few-rows kernels (each shape on CUDA) against candle's
    /// GEMM (cuBLAS), seconds a call and weight GB/s, one JSON line each.
    Linear(LinearBenchArgs),
    /// Load a running `apb serve`: N streaming completions at a fixed concurrency, prompts of
    /// --input-len tokens, --output-len tokens each (ignore_eos); time to first token, time per
    /// output token, end-to-end latency (mean, p50, p90, p99) and throughput, as a table (and
    /// JSON with --json).
    Serve(ServeBenchArgs),
}

#[derive(Args)]
pub(crate) struct ServeBenchArgs {
    /// The server.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub(crate) url: String,
    /// Requests in all.
    #[arg(long, default_value_t = 16)]
    pub(crate) num_prompts: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 16)]
    pub(crate) concurrency: usize,
    /// Requests a second, arriving as a Poisson process (as vllm bench serve's; seeded by
    /// --seed), at most --concurrency in flight. Default: all at once.
    #[arg(long)]
    pub(crate) request_rate: Option<f64>,
    /// Prompt tokens per request (one-token words; the server's usage gives the exact count).
    #[arg(long, default_value_t = 256)]
    pub(crate) input_len: usize,
    /// Tokens generated per request (ignore_eos).
    #[arg(long, default_value_t = 128)]
    pub(crate) output_len: usize,
    /// Prompt seed.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Append this question after a blank line to every prompt (an APB or Star server takes
    /// the last paragraph as the question; without one it runs the zigzag fallback).
    #[arg(long)]
    pub(crate) question: Option<String>,
    /// Bearer key (also from APB_API_KEY).
    #[arg(long, env = "APB_API_KEY", hide_env_values = true)]
    pub(crate) api_key: Option<String>,
    /// Also write the results (every request's timings included) as JSON to this file.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
}

pub(crate) fn bench_serve(a: ServeBenchArgs) -> Result<()> {
    let load = apb_host::bench_serve::Load {
        url: a.url,
        num_prompts: a.num_prompts,
        concurrency: a.concurrency,
        request_rate: a.request_rate,
        input_len: a.input_len,
        output_len: a.output_len,
        seed: a.seed,
        question: a.question,
        api_key: a.api_key.filter(|k| !k.is_empty()),
    };
    let report = apb_host::bench_serve::run(&load)?;
    print!("{}", report.table());
    if let Some(path) = a.json {
        let v = serde_json::json!({
            "num_prompts": load.num_prompts, "concurrency": load.concurrency,
            "request_rate": load.request_rate,
            "input_len": load.input_len, "output_len": load.output_len, "url": load.url,
            "report": report,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

#[derive(Args)]
pub(crate) struct PrefillArgs {
    /// Model shapes: llama-3.1-8b, qwen-2.5-14b, yi-34b, or a path to a config.json (random
    /// weights: timings do not depend on their values).
    #[arg(long, default_value = "llama-3.1-8b")]
    pub(crate) config: String,
    /// Prompt lengths in tokens, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "32768,65536,131072")]
    pub(crate) lengths: Vec<usize>,
    /// Methods to compare, comma-separated: dense (one GPU), zigzag, ulysses, ring, star, apb,
    /// spava.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "dense,zigzag,ring,star,apb"
    )]
    pub(crate) attention: Vec<String>,
    /// GPUs (ranks) for the sequence-parallel methods.
    #[arg(long, default_value_t = 4)]
    pub(crate) world_size: usize,
    /// Also run each case once more with device synchronisation per part for a time breakdown.
    #[arg(long)]
    pub(crate) breakdown: bool,
    #[arg(long, default_value = "cuda")]
    pub(crate) device: String,
    #[arg(long, default_value = "bf16")]
    pub(crate) dtype: String,
    /// Write all results as JSON here (rank 0).
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// Run only rank H's share of a sequence-parallel method (of --world-size ranks) on this one
    /// GPU, the other ranks' blocks standing in at their planned size: the slowest rank's compute
    /// time and MFU without several GPUs (communication excluded).
    #[arg(long, value_name = "H")]
    pub(crate) only_rank: Option<usize>,
    #[command(flatten)]
    pub(crate) launch: apb_host::launch::LaunchArgs,
}

#[derive(Args)]
pub(crate) struct AttentionBenchArgs {
    /// Sequence lengths (queries = keys), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "8192,32768,131072")]
    pub(crate) lengths: Vec<usize>,
    #[arg(long, default_value_t = 32)]
    pub(crate) heads: usize,
    #[arg(long, default_value_t = 8)]
    pub(crate) kv_heads: usize,
    /// Head dimensions (64 and/or 128), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "128,64")]
    pub(crate) head_dims: Vec<usize>,
    /// Time decode rows instead (comma-separated counts: the sequences of a decode step), each
    /// with its own KV cache of every --lengths keys; caches rotate past the GPU's L2.
    #[arg(long, value_delimiter = ',')]
    pub(crate) decode_rows: Vec<usize>,
    #[arg(long, default_value = "cuda")]
    pub(crate) device: String,
}

#[derive(Args)]
pub(crate) struct LinearBenchArgs {
    /// Model shapes: llama-3.1-8b, qwen-2.5-14b, yi-34b, or a path to a config.json.
    #[arg(long, default_value = "llama-3.1-8b")]
    pub(crate) config: String,
    /// Rows (sequences in a decode step), comma-separated; at most 64.
    #[arg(long, value_delimiter = ',', default_value = "1,8,16,24,32,64")]
    pub(crate) rows: Vec<usize>,
    #[arg(long, default_value = "cuda")]
    pub(crate) device: String,
}

pub(crate) fn bench_linear(a: LinearBenchArgs) -> Result<()> {
    let device = parse_device(&a.device)?;
    if a.rows
        .iter()
        .any(|&m| m == 0 || m > apb_kernels::linear::MAX_ROWS)
    {
        bail!(
            "--rows must be between 1 and {}",
            apb_kernels::linear::MAX_ROWS
        );
    }
    let cfg = apb_loaders::random::config_by_name(&a.config)?;
    for t in apb_host::bench::linear_rows(&cfg, &device, &a.rows)? {
        let mut v = serde_json::to_value(&t)?;
        v["ours_gbps"] = serde_json::json!(t.bytes as f64 / t.ours_s / 1e9);
        v["gemm_gbps"] = serde_json::json!(t.bytes as f64 / t.gemm_s / 1e9);
        v["speedup"] = serde_json::json!(t.gemm_s / t.ours_s);
        println!("{v}");
    }
    Ok(())
}

pub(crate) fn bench_prefill(a: PrefillArgs) -> Result<()> {
    let spec = GroupSpec {
        world: a.world_size,
        device: parse_device(&a.device)?,
        launch: a.launch.clone(),
    };
    spec.limit_threads();
    apb_host::bench::prefill_sweep(&apb_host::bench::Sweep {
        config: a.config,
        dtype: a.dtype,
        lengths: a.lengths,
        methods: a.attention,
        breakdown: a.breakdown,
        json: a.json,
        spec,
        only_rank: a.only_rank,
    })?;
    Ok(())
}

pub(crate) fn bench_attention(a: AttentionBenchArgs) -> Result<()> {
    let device = parse_device(&a.device)?;
    if a.head_dims.iter().any(|d| ![64, 128].contains(d))
        || a.kv_heads == 0
        || !a.heads.is_multiple_of(a.kv_heads)
    {
        bail!("--head-dims must be 64 or 128 and --heads a multiple of --kv-heads");
    }
    if a.decode_rows.contains(&0) {
        bail!("--decode-rows must be at least 1");
    }
    for &d in &a.head_dims {
        for &seq in &a.lengths {
            for &rows in &a.decode_rows {
                let t = apb_host::bench::decode_rows_kernel(
                    &device, rows, seq, a.heads, a.kv_heads, d,
                )?;
                println!(
                    "{}",
                    serde_json::json!({"decode_rows": rows, "keys": seq, "heads": a.heads,
                        "kv_heads": a.kv_heads, "head_dim": d, "dtype": "bf16",
                        "seconds": t.seconds, "kv_bytes": t.kv_bytes,
                        "kv_gbps": t.kv_bytes as f64 / t.seconds / 1e9})
                );
            }
            if !a.decode_rows.is_empty() {
                continue;
            }
            let r = apb_host::bench::attention_kernel(&device, seq, a.heads, a.kv_heads, d)?;
            println!(
                "{}",
                serde_json::json!({"seq": seq, "heads": a.heads, "kv_heads": a.kv_heads,
                    "head_dim": d, "causal": true, "dtype": "bf16", "kernel": r.kernel,
                    "seconds": r.seconds, "tflops": r.tflops})
            );
        }
    }
    Ok(())
}
