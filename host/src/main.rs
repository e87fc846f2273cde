//! `apb`: long-context generation with pluggable attention backends.

use anyhow::{bail, Context, Result};
use apb_host::dist::{self, DistConfig};
use apb_host::{device::parse_device, prompt, Engine, GenParams, Generation};
use apb_loaders::{load, parse_dtype, registry::DEFAULT_MODEL, ModelSource};
use apb_plugin::{Kind, Scorer};
use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "apb",
    version,
    about = "APB-rs: fast long-context prefill for llama-family models"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Benchmarks: prefill across attention methods, or our attention kernel alone.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Generate text from a prompt (streams to stdout, or one JSON object with --json).
    Generate(GenerateArgs),
    /// OpenAI-compatible HTTP server (chat completions, streaming).
    ///
    /// POST /v1/chat/completions (JSON or "stream": true), GET /v1/models, GET /health. One
    /// request at a time; ring / star / apb ranks are threads on the one device and take
    /// single-turn requests (document, blank line, question).
    Serve(ServeArgs),
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    m: ModelArgs,
    #[command(flatten)]
    at: AttentionArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port; the chosen one is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// max_tokens for requests that give none.
    #[arg(long, default_value_t = 256)]
    default_max_tokens: usize,
}

#[derive(Args)]
struct GenerateArgs {
    /// Prompt text.
    #[arg(
        long,
        conflicts_with = "prompt_file",
        required_unless_present = "prompt_file"
    )]
    prompt: Option<String>,
    /// Read the prompt from a UTF-8 file.
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// Wrap the prompt as a user turn in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Maximum number of tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 = greedy (deterministic).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens with this much probability.
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 299792458)]
    seed: u64,
    /// Do not stop at end-of-sequence tokens (for benchmarks needing a fixed count).
    #[arg(long)]
    ignore_eos: bool,
    /// The question (APB embeds it in every anchor). With --chat and no --question, the last
    /// paragraph of the prompt (after its last blank line) is the question.
    #[arg(long)]
    question: Option<String>,
    #[command(flatten)]
    m: ModelArgs,
    #[command(flatten)]
    at: AttentionArgs,
    /// Print one JSON object (text and timings) instead of streaming.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    launch: apb_host::launch::LaunchArgs,
}

/// The model and where it runs (generate, serve).
#[derive(Args)]
struct ModelArgs {
    /// Model: a registered name (smollm2-135m-instruct), a .gguf file, a model directory
    /// (config.json + safetensors + tokenizer.json) or an HF Hub id (org/name).
    #[arg(short, long, default_value = DEFAULT_MODEL)]
    model: String,
    /// HF Hub revision (branch, tag or commit) when --model is a hub id.
    #[arg(long)]
    revision: Option<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Run dtype: f32, bf16 or f16 (quantized GGUF weights are dequantized to it).
    #[arg(long, default_value = "f32")]
    dtype: String,
}

/// Attention backend and ranks (generate, serve).
#[derive(Args)]
struct AttentionArgs {
    /// Attention backend: dense (exact, 1 rank), ring (exact, sequence-parallel), star (Star
    /// Attention: anchor, no passing), apb (anchor with the question + passing blocks).
    #[arg(long, default_value = "dense")]
    attention: String,
    /// Ranks (threads on CPU) that share the prompt (ring, star, apb).
    #[arg(long, default_value_t = 1)]
    world_size: usize,
    /// Anchor length in tokens (default: planner, block/4 rounded to 128; star: the first block).
    #[arg(long)]
    anchor_len: Option<usize>,
    /// Passing length per rank and KV head (default: planner, block/8 rounded to 128).
    #[arg(long)]
    passing_len: Option<usize>,
    /// Trained retaining heads (safetensors or PyTorch checkpoint, file, directory or HF Hub id);
    /// without them APB uses the training-free query-aware scorer.
    #[arg(long)]
    heads: Option<String>,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Prefill wall time of dense (1 GPU) vs ring / star / apb (--world-size GPUs, one process
    /// each), side by side, on a model of real shapes with random weights.
    Prefill(PrefillArgs),
    /// Our fused attention kernel alone (causal, bf16) at one shape: time and TFLOP/s.
    Attention(AttentionBenchArgs),
}

#[derive(Args)]
struct PrefillArgs {
    /// Model shapes: llama-3.1-8b, qwen-2.5-14b, yi-34b, or a path to a config.json.
    #[arg(long, default_value = "llama-3.1-8b")]
    config: String,
    /// Random weights of the config's shapes (the only mode today: timings do not depend on values).
    #[arg(long, default_value_t = true)]
    random_weights: bool,
    /// Prompt lengths in tokens, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "32768,65536,131072")]
    lengths: Vec<usize>,
    /// Methods to compare, comma-separated (dense runs on one GPU).
    #[arg(long, value_delimiter = ',', default_value = "dense,ring,star,apb")]
    attention: Vec<String>,
    /// GPUs (ranks) for ring / star / apb.
    #[arg(long, default_value_t = 4)]
    world_size: usize,
    /// Also run each case once more with device synchronisation per part for a time breakdown.
    #[arg(long)]
    breakdown: bool,
    #[arg(long, default_value = "cuda")]
    device: String,
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Write all results as JSON here (rank 0).
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    launch: apb_host::launch::LaunchArgs,
}

#[derive(Args)]
struct AttentionBenchArgs {
    #[arg(long, default_value_t = 32768)]
    seq: usize,
    #[arg(long, default_value_t = 32)]
    heads: usize,
    #[arg(long, default_value_t = 8)]
    kv_heads: usize,
    #[arg(long, default_value_t = 128)]
    head_dim: usize,
    #[arg(long, default_value = "cuda")]
    device: String,
}

fn bench_prefill(a: PrefillArgs) -> Result<()> {
    use apb_host::bench::{gemm_peak, PrefillBench};
    if !a.random_weights {
        bail!("apb bench prefill runs random weights only (--random-weights)");
    }
    let device = parse_device(&a.device)?;
    let dtype = parse_dtype(&a.dtype)?;
    let cfg = apb_loaders::random::config_by_name(&a.config)?;
    let processes = device.is_cuda() && a.world_size > 1;
    a.launch.validate(a.world_size, processes)?;
    let group = if processes {
        Some(apb_host::launch::join(&a.launch, a.world_size)?)
    } else {
        None
    };
    let (device, comm) = match &group {
        Some(g) => {
            let dev = candle_core::Device::new_cuda(g.local_rank)?;
            let comm = apb_host::launch::communicator(g, &dev)?;
            (dev, comm)
        }
        None => {
            if a.world_size > 1 {
                bail!(
                    "--world-size {} needs --device cuda (one GPU per rank)",
                    a.world_size
                );
            }
            let comm: Arc<dyn apb_plugin::Communicator> = apb_plugin::LocalGroup::new(1).remove(0);
            (device, comm)
        }
    };
    let root = comm.rank() == 0;
    let model = apb_loaders::random::random_model(&cfg, dtype, &device)?;
    let peak = if device.is_cuda() {
        Some(gemm_peak(&device)?)
    } else {
        None
    };
    let bench = PrefillBench {
        model: &model,
        comm: comm.clone(),
        breakdown: a.breakdown,
    };
    // Warm-up: loads kernels and fills allocator pools, per method.
    for m in &a.attention {
        bench.run(
            8192.min(a.lengths.iter().copied().min().unwrap_or(8192)),
            m,
            a.world_size,
        )?;
    }
    let mut results = Vec::new();
    for &len in &a.lengths {
        let mut dense_s = None;
        for m in &a.attention {
            let mut v = bench.run(len, m, a.world_size)?;
            let wall = v["wall_s"].as_f64().unwrap_or(f64::NAN);
            if m == "dense" {
                dense_s = Some(wall);
            }
            if let Some(d) = dense_s {
                v["speedup_vs_dense"] = (d / wall).into();
            }
            if let Some(p) = peak {
                v["mfu"] = (v["slowest_rank_tflops"].as_f64().unwrap_or(0.0) / p).into();
            }
            if root {
                eprintln!(
                    "{len:>7} {m:>5}: {:.3} s  ({:.0} tok/s, {:.0} TFLOP/s slowest rank)",
                    wall,
                    v["tokens_per_s"].as_f64().unwrap_or(0.0),
                    v["slowest_rank_tflops"].as_f64().unwrap_or(0.0)
                );
            }
            results.push(v);
        }
    }
    if root {
        let out = serde_json::json!({
            "config": a.config,
            "dtype": a.dtype,
            "world_size": a.world_size,
            "gemm_peak_tflops": peak,
            "breakdown_buckets": apb_host::bench::BUCKETS,
            "results": results,
        });
        match &a.json {
            Some(p) => std::fs::write(p, serde_json::to_string_pretty(&out)?)
                .with_context(|| format!("cannot write {}", p.display()))?,
            None => println!("{}", serde_json::to_string_pretty(&out)?),
        }
    }
    if let Some(g) = group {
        g.finish()?;
    }
    Ok(())
}

fn bench_attention(a: AttentionBenchArgs) -> Result<()> {
    let device = parse_device(&a.device)?;
    if ![64, 128].contains(&a.head_dim) || a.kv_heads == 0 || !a.heads.is_multiple_of(a.kv_heads) {
        bail!("--head-dim must be 64 or 128 and --heads a multiple of --kv-heads");
    }
    let (s, tflops) =
        apb_host::bench::attention_kernel(&device, a.seq, a.heads, a.kv_heads, a.head_dim)?;
    println!(
        "{}",
        serde_json::json!({"seq": a.seq, "heads": a.heads, "kv_heads": a.kv_heads,
            "head_dim": a.head_dim, "causal": true, "seconds": s, "tflops": tflops})
    );
    Ok(())
}

fn read_prompt(a: &GenerateArgs) -> Result<String> {
    if let Some(p) = &a.prompt {
        return Ok(p.clone());
    }
    let path = a
        .prompt_file
        .as_ref()
        .context("give --prompt or --prompt-file")?;
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read prompt file {}", path.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "prompt file {} is not valid UTF-8 (at byte {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

/// The backend named by `--attention`, checked against the other flags (None = dense).
fn parse_kind(at: &AttentionArgs) -> Result<Option<Kind>> {
    let kind = match at.attention.as_str() {
        "dense" => None,
        "ring" => Some(Kind::Ring),
        "star" => Some(Kind::Star),
        "apb" => Some(Kind::Apb),
        other => bail!(
            "unknown attention backend '{other}' (available: {})",
            apb_plugin::BACKEND_NAMES.join(", ")
        ),
    };
    if at.world_size == 0 {
        bail!("--world-size must be at least 1");
    }
    if kind.is_none() && at.world_size > 1 {
        bail!(
            "--attention dense runs on one rank; use ring, star or apb with --world-size {}",
            at.world_size
        );
    }
    if kind.is_none() && at.heads.is_some() {
        bail!("--heads is only used by --attention apb");
    }
    Ok(kind)
}

/// Ranks, lengths and scorer for a distributed backend (loads `--heads` if given).
fn dist_config(
    at: &AttentionArgs,
    kind: Kind,
    loaded: &apb_loaders::Loaded,
    dtype: candle_core::DType,
    device: &candle_core::Device,
) -> Result<DistConfig> {
    let scorer = match &at.heads {
        Some(spec) => Scorer::Heads(Arc::new(apb_loaders::heads::load_heads(
            spec,
            &loaded.model.cfg,
            dtype,
            device,
        )?)),
        None => Scorer::QueryAware,
    };
    Ok(DistConfig {
        kind,
        world: at.world_size,
        anchor_len: at.anchor_len,
        passing_len: at.passing_len,
        scorer,
    })
}

fn generate(a: GenerateArgs) -> Result<()> {
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1], got {}", a.top_p);
    }
    if a.temperature < 0.0 || !a.temperature.is_finite() {
        bail!("--temperature must be >= 0, got {}", a.temperature);
    }
    let kind = parse_kind(&a.at)?;
    let device = parse_device(&a.m.device)?;
    // On GPUs each rank is a process with its own GPU (threads share one device otherwise).
    let processes = device.is_cuda() && kind.is_some() && a.at.world_size > 1;
    a.launch.validate(a.at.world_size, processes)?;
    let group = if processes {
        Some(apb_host::launch::join(&a.launch, a.at.world_size)?)
    } else {
        None
    };
    let device = match &group {
        Some(g) => candle_core::Device::new_cuda(g.local_rank)?,
        None => device,
    };
    let dtype = parse_dtype(&a.m.dtype)?;
    let prompt = read_prompt(&a)?;
    let source = ModelSource::parse(&a.m.model, a.m.revision.as_deref())?;
    let loaded = load(&source, dtype, &device)?;
    let parts = prompt::build(&loaded.tok, &prompt, a.question.as_deref(), a.chat)?;
    if matches!(kind, Some(Kind::Apb) | Some(Kind::Star))
        && parts.question.is_empty()
        && a.at.anchor_len != Some(0)
    {
        bail!("--attention {} needs the question: pass --question TEXT (or --chat with the question as the last paragraph)", a.at.attention);
    }
    let params = GenParams {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        ignore_eos: a.ignore_eos,
    };
    let stdout = std::io::stdout();
    let json = a.json;
    let mut on_text = move |s: &str| {
        if !json {
            let mut out = stdout.lock();
            let _ = out.write_all(s.as_bytes());
            let _ = out.flush();
        }
    };
    let mut v = match kind {
        None => {
            let engine = Engine::new(loaded, apb_plugin::backend_by_name("dense")?);
            let g = engine.generate(&parts.all(), &params, &mut on_text)?;
            summary(&g, "dense", 1, &engine.loaded.name)
        }
        Some(kind) => {
            let cfg = dist_config(&a.at, kind, &loaded, dtype, &device)?;
            let d = match &group {
                None => dist::generate(
                    &loaded.model,
                    &loaded.tok,
                    &parts,
                    &cfg,
                    &params,
                    &mut on_text,
                )?,
                Some(g) => dist::generate_on_rank(
                    &loaded.model,
                    &loaded.tok,
                    &parts,
                    &cfg,
                    &params,
                    apb_host::launch::communicator(g, &device)?,
                    0,
                    &mut on_text,
                )?,
            };
            for note in &d.plan.notes {
                eprintln!("note: {note}");
            }
            let mut v = summary(&d.generation, kind.name(), d.plan.world, &loaded.name);
            let extra = serde_json::json!({
                "anchor_len": d.plan.l_a,
                "passing_len": d.plan.l_p,
                "block_len": d.plan.l_b,
                "scorer": d.scorer,
                "rank_prefill_tokens": d.rank_prefill_tokens,
                "plan_notes": d.plan.notes,
            });
            if let (Some(v), serde_json::Value::Object(extra)) = (v.as_object_mut(), extra) {
                v.extend(extra);
            }
            v
        }
    };
    if let Some(g) = group {
        v["processes"] = g.world.into();
        g.finish()?;
    }
    if json {
        v["requested_world_size"] = a.at.world_size.into();
        println!("{v}");
    } else {
        println!();
    }
    Ok(())
}

fn serve(a: ServeArgs) -> Result<()> {
    let kind = parse_kind(&a.at)?;
    if a.default_max_tokens == 0 {
        bail!("--default-max-tokens must be at least 1");
    }
    let addr: std::net::SocketAddr = format!("{}:{}", a.host, a.port)
        .parse()
        .with_context(|| format!("--host {} --port {} is not an address", a.host, a.port))?;
    let device = parse_device(&a.m.device)?;
    let dtype = parse_dtype(&a.m.dtype)?;
    let source = ModelSource::parse(&a.m.model, a.m.revision.as_deref())?;
    let loaded = load(&source, dtype, &device)?;
    let dist = match kind {
        Some(kind) => Some(dist_config(&a.at, kind, &loaded, dtype, &device)?),
        None => None,
    };
    let engine = Engine::new(loaded, apb_plugin::backend_by_name("dense")?);
    let cfg = apb_host::server::ServeConfig {
        dist,
        default_max_tokens: a.default_max_tokens,
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(apb_host::server::serve(engine, cfg, addr))
}

/// The `--json` fields every backend reports.
fn summary(g: &Generation, attention: &str, world_size: usize, model: &str) -> serde_json::Value {
    serde_json::json!({
        "text": g.text,
        "prompt_tokens": g.stats.prompt_tokens,
        "generated_tokens": g.stats.generated_tokens,
        "prefill_ms": g.stats.prefill_ms,
        "decode_tokens_per_s": g.stats.decode_tokens_per_s,
        "attention": attention,
        "world_size": world_size,
        "model": model,
    })
}

/// The error chain on one line. Library errors may carry a captured backtrace after their first
/// line (candle does when `RUST_BACKTRACE` is set); users get the message, not the trace.
fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let line = cause
            .to_string()
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string();
        if !line.is_empty() && !parts.iter().any(|p| p.contains(&line)) {
            parts.push(line);
        }
    }
    parts.join(": ")
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("APB_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Generate(a) => generate(a),
        Cmd::Serve(a) => serve(a),
        Cmd::Bench(BenchCmd::Prefill(a)) => bench_prefill(a),
        Cmd::Bench(BenchCmd::Attention(a)) => bench_attention(a),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match std::env::var("APB_RANK") {
                Ok(r) => eprintln!("error: rank {r}: {}", one_line(&e)),
                Err(_) => eprintln!("error: {}", one_line(&e)),
            }
            ExitCode::FAILURE
        }
    }
}
