//! `apb`: long-context generation with pluggable attention backends.

use anyhow::{bail, Context, Result};
use apb_host::ranks::{self, GroupSpec, RunError};
use apb_host::runner::MAX_TEMPERATURE;
use apb_host::Method;
use apb_host::{device::parse_device, prompt, GenParams, Generation, Job, Runner};
use apb_loaders::{parse_dtype, registry::DEFAULT_MODEL, ModelSource};
use apb_plugin::Scorer;
use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "apb",
    version,
    // `--max-new-tokens -5` is then a bad value, not an "unexpected argument".
    allow_negative_numbers = true,
    about = "APB-rs: fast long-context prefill for llama-family models"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Benchmarks: prefill across attention methods, our attention kernel alone, or a load
    /// against a running server.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Train retaining heads (Locret MLPs) for a model on labels from the model itself, for
    /// `--attention apb --heads OUT`.
    TrainHeads(TrainArgs),
    /// How well retaining heads and the training-free scorer pick the keys an answer attends to:
    /// top-10 % overlap with the Locret labels on held-out synthetic documents.
    HeadsOverlap(OverlapArgs),
    /// Score methods on generated long-context tasks (RULER-style: needles, multi-key/value/query,
    /// two-hop links, variable tracking, common words), every method on the same prompts.
    Eval(EvalArgs),
    /// Generate text from a prompt (streams to stdout, or one JSON object with --json).
    #[command(allow_negative_numbers = true)]
    Generate(GenerateArgs),
    /// OpenAI-compatible HTTP server (chat completions, completions, streaming, metrics).
    ///
    /// POST /v1/chat/completions and /v1/completions (JSON or "stream": true), GET /v1/models,
    /// GET /health, GET /metrics. Up to --max-num-seqs requests generate together (one batched
    /// decode step for all of them; prefills one at a time, short prompts before long ones);
    /// more wait (--max-queued). Ranks: threads on the CPU, one process per GPU with --device
    /// cuda --world-size N.
    /// With apb / star the question is the last paragraph of the last user message, the whole
    /// last user message in a multi-turn chat, or the "question" field.
    #[command(allow_negative_numbers = true)]
    Serve(ServeArgs),
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    m: ModelArgs,
    #[command(flatten)]
    at: AttentionArgs,
    /// Address to listen on: an IP, `localhost`, or `::1` (loopback by default; other
    /// addresses expose the server to the network: set --api-key).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port; the chosen one is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// max_tokens for requests that give none.
    #[arg(long, default_value_t = 256)]
    default_max_tokens: usize,
    /// Requests that may wait for their turn; beyond it the server answers 429 with Retry-After.
    #[arg(long, default_value_t = 64)]
    max_queued: usize,
    /// Requests generating at once (one batched decode step for all of them); 1 runs one
    /// request at a time, first come, first served.
    #[arg(long, default_value_t = 16)]
    max_num_seqs: usize,
    /// Prompts of at least this many tokens are long: waiting short requests go before them
    /// (each long one is overtaken by at most --max-num-seqs short ones; none with
    /// --max-num-seqs 1).
    #[arg(long, default_value_t = 2048)]
    long_prefill_token_threshold: usize,
    /// Running requests get a decode step between a prefill's layers once they have waited this
    /// long (milliseconds; the ranks of a prefill check every layer on one rank, every 4 on
    /// several), so a long prompt does not stall every stream; 0: at every check.
    #[arg(long, default_value_t = 200)]
    max_decode_gap_ms: u64,
    /// KV memory (bytes) the running requests may hold: a request waits until its KV fits, one
    /// that never can gets 400. Per rank process, or shared by thread ranks. Default: half the
    /// memory available at start on the CPU; on a GPU, from --gpu-memory-utilization.
    #[arg(long)]
    kv_cache_memory_bytes: Option<u64>,
    /// On a GPU without --kv-cache-memory-bytes: the share of the GPU's memory the server may
    /// hold (as vLLM's flag). The KV budget is this share of the device's total less what is in
    /// use once the model is loaded (weights, CUDA context, other processes); the rest is left
    /// for the prefill's activations. Rank processes on one GPU split it. Ignored on the CPU.
    #[arg(long, default_value_t = 0.9, value_name = "FRACTION")]
    gpu_memory_utilization: f64,
    /// Require `Authorization: Bearer KEY` on every /v1 route (also from APB_API_KEY).
    #[arg(long, env = "APB_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Model name(s) clients use in "model" (repeatable; the first is reported). Default: the
    /// loaded model's name and the -m argument.
    #[arg(long)]
    served_model_name: Vec<String>,
    /// Allow browsers on this origin to call the API (CORS; repeatable; `*` for any).
    #[arg(long)]
    cors_origin: Vec<String>,
    /// Accept this Host header name too (repeatable). A loopback-bound server otherwise answers
    /// only localhost / 127.0.0.1 / ::1 (DNS-rebinding protection).
    #[arg(long)]
    allowed_host: Vec<String>,
    /// Largest request body in bytes (default: 32 bytes per context token + 1 MiB).
    #[arg(long)]
    max_body_bytes: Option<usize>,
    /// Seconds a client has to send its request headers, and its body.
    #[arg(long, default_value_t = 30)]
    read_timeout: u64,
    /// On SIGINT/SIGTERM: queued requests get 503 at once, the running one has this many
    /// seconds to finish (then it is cut, with a 503, within 10 s more), and the server exits
    /// (by default within Kubernetes' 30 s grace).
    #[arg(long, default_value_t = 20.0, value_name = "SECS")]
    shutdown_timeout: f64,
    #[command(flatten)]
    launch: apb_host::launch::LaunchArgs,
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
    /// With --json: also report the first generated token's logits (`first_logits`), to
    /// compare backends and rank modes bit for bit.
    #[arg(long, requires = "json")]
    first_logits: bool,
    #[command(flatten)]
    launch: apb_host::launch::LaunchArgs,
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// Training data: JSONL files of {"prompt", "answer"} or {"messages": [..., assistant]}.
    #[arg(long, num_args = 1..)]
    data: Vec<PathBuf>,
    /// Also generate this many long-context QA records (needles, multi-hop links, aggregation)
    /// over noise and the prose on this machine: training without a dataset.
    #[arg(long, default_value_t = 0)]
    synthetic: usize,
    /// Document length of the synthetic records, in tokens (about).
    #[arg(long, default_value_t = 2048)]
    synthetic_tokens: usize,
    /// Where to write the heads (safetensors, loadable with --heads).
    #[arg(long)]
    out: PathBuf,
    /// Optimiser steps (one record each, cycling); default: one pass over the records.
    #[arg(long)]
    steps: Option<usize>,
    /// Longest prompt in tokens (longer ones keep their end).
    #[arg(long, default_value_t = 10240)]
    max_len: usize,
    #[arg(long, default_value_t = 5e-4)]
    lr: f64,
    /// Warm-up steps; default: 10 % of the steps.
    #[arg(long)]
    warmup: Option<usize>,
    /// Hidden width of each head (Locret uses 1024 on 8B models).
    #[arg(long, default_value_t = 1024)]
    hidden: usize,
    /// Weight of the smoothness term.
    #[arg(long, default_value_t = 0.0025)]
    alpha: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Checkpoint (heads + optimiser) written every --save-every steps and resumed from if it
    /// exists; default: OUT with the extension .ckpt.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    #[arg(long, default_value_t = 50)]
    save_every: usize,
    /// dtype of the saved heads.
    #[arg(long, default_value = "bf16")]
    save_dtype: String,
}

#[derive(Args)]
struct OverlapArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// Retaining heads to compare with the training-free scorer (file, directory or HF Hub id).
    #[arg(long)]
    heads: String,
    /// Held-out documents (tasks cycled).
    #[arg(long, default_value_t = 16)]
    cases: usize,
    /// Document length in tokens (about).
    #[arg(long, default_value_t = 2048)]
    tokens: usize,
    /// First document seed (the default is clear of training's seeds, like `apb eval`'s).
    #[arg(long, default_value_t = 1_000_000)]
    seed: u64,
}

fn heads_overlap(a: OverlapArgs) -> Result<()> {
    if a.cases == 0 || a.tokens < 16 {
        bail!("--cases must be positive and --tokens at least 16");
    }
    let device = parse_device(&a.m.device)?;
    let dtype = parse_dtype(&a.m.dtype)?;
    let loaded = a.m.load(&device)?;
    let heads = Scorer::Heads(Arc::new(apb_loaders::heads::load_heads(
        &a.heads,
        &loaded.model.cfg,
        dtype,
        &device,
    )?));
    let cases: Vec<_> =
        apb_host::train::synthetic_cases(&loaded.tok, a.cases, a.tokens, a.seed, usize::MAX)?
            .into_iter()
            .filter_map(|(r, rows)| rows.map(|q| (r, q)))
            .collect();
    if cases.is_empty() {
        bail!("no held-out case had its question tokens where expected");
    }
    let o = apb_host::train::scorer_overlap(&loaded.model, &cases, &[&heads, &Scorer::QueryAware])?;
    println!(
        "{}",
        serde_json::json!({
            "cases": cases.len(),
            "tokens": a.tokens,
            "seed": a.seed,
            "top10_overlap": {"heads": o[0], "query_aware": o[1]},
        })
    );
    Ok(())
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// Tasks, comma-separated, or `all`. Known: niah_noise, niah_prose, multikey, multivalue,
    /// multiquery, two_hop, vartrack, common_words. The default leaves out multikey and
    /// common_words, which SmolLM2-135M cannot do even densely.
    #[arg(long, value_delimiter = ',', default_values_t = apb_host::tasks::DEFAULT_TASKS.map(String::from))]
    tasks: Vec<String>,
    /// Prompt lengths in tokens (about), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "4096")]
    lengths: Vec<usize>,
    /// Cases per task and length.
    #[arg(long, default_value_t = 5)]
    cases: usize,
    /// Columns, comma-separated: dense, ring, zigzag, ulysses, star, apb, spava (apb and spava
    /// with the training-free scorer); `M-heads` runs a selecting method with the retaining heads
    /// of --heads (apb-heads); `M@N` on N ranks instead of --world-size (apb@8).
    #[arg(long, value_delimiter = ',', default_value = "dense,star,apb")]
    attention: Vec<String>,
    /// Ranks (threads) of the sequence-parallel methods.
    #[arg(long, default_value_t = 4)]
    world_size: usize,
    /// Retaining heads for apb-heads (file, directory or HF Hub id).
    #[arg(long)]
    heads: Option<String>,
    /// Tokens each answer may have (at least 1).
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// First case seed. The default keeps clear of `apb train-heads --synthetic` (seeds from 0),
    /// so heads are never scored on cases they were trained on.
    #[arg(long, default_value_t = 1_000_000)]
    seed: u64,
    /// Results file, one JSON row per case and method (JSONL); an existing file is resumed.
    #[arg(long, value_name = "FILE")]
    json: PathBuf,
}

/// The shortest `apb eval --lengths` entry.
const MIN_EVAL_TOKENS: usize = 128;

fn eval(a: EvalArgs) -> Result<()> {
    if a.cases == 0 || a.lengths.is_empty() || a.world_size == 0 {
        bail!("--cases, --lengths and --world-size must be positive");
    }
    if let Some(l) = a.lengths.iter().find(|l| **l < MIN_EVAL_TOKENS) {
        bail!("--lengths {l}: every prompt length must be at least {MIN_EVAL_TOKENS} tokens (room for a task's facts and question)");
    }
    if a.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    if a.json.is_dir() {
        bail!(
            "--json {} is a directory: give the results file (e.g. {}/eval.jsonl)",
            a.json.display(),
            a.json.display()
        );
    }
    let device = parse_device(&a.m.device)?;
    let dtype = parse_dtype(&a.m.dtype)?;
    let base = Runner::new(a.m.load(&device)?, Scorer::QueryAware);
    let mut arms = Vec::new();
    let mut heads = None;
    for name in &a.attention {
        let (column, ranks) = match name.split_once('@') {
            Some((c, n)) => (
                c,
                Some(
                    n.parse::<usize>()
                        .ok()
                        .filter(|&n| n > 0)
                        .with_context(|| {
                            format!("--attention {name}: ranks after @ must be a number above 0")
                        })?,
                ),
            ),
            None => (name.as_str(), None),
        };
        let (method, runner) = match column.strip_suffix("-heads") {
            Some(m) => {
                let method = Method::parse(m)?;
                if !method.selects() {
                    bail!(
                        "--attention {name}: retaining heads are for {} only",
                        Method::selecting_names()
                    );
                }
                let spec = a
                    .heads
                    .as_deref()
                    .with_context(|| format!("{name} needs --heads"))?;
                if heads.is_none() {
                    heads = Some(Arc::new(apb_loaders::heads::load_heads(
                        spec,
                        &base.model().cfg,
                        dtype,
                        &device,
                    )?));
                }
                let mut r = base.clone();
                r.scorer = Scorer::Heads(heads.clone().expect("loaded above"));
                (method, r)
            }
            None => (Method::parse(column)?, base.clone()),
        };
        let world = if method == Method::DENSE {
            1
        } else {
            ranks.unwrap_or(a.world_size)
        };
        arms.push(apb_host::eval::Arm {
            label: name.clone(),
            method,
            world,
            runner,
        });
    }
    let table = apb_host::eval::run(
        &arms,
        &apb_host::eval::EvalConfig {
            tasks: if a.tasks.iter().any(|t| t == "all") {
                apb_host::tasks::TASKS.map(String::from).to_vec()
            } else {
                a.tasks
            },
            lengths: a.lengths,
            cases: a.cases,
            seed: a.seed,
            max_new_tokens: a.max_new_tokens,
            out: a.json,
            setup: format!(
                "model {}{}, heads {}, world {}, max_new_tokens {}, dtype {}{}",
                a.m.model,
                a.m.revision
                    .as_deref()
                    .map(|r| format!("@{r}"))
                    .unwrap_or_default(),
                a.heads.as_deref().unwrap_or("-"),
                a.world_size,
                a.max_new_tokens,
                a.m.dtype,
                a.m.rope_scaling
                    .as_deref()
                    .map(|r| format!(", rope_scaling {r}"))
                    .unwrap_or_default(),
            ),
        },
    )?;
    println!("{table}");
    Ok(())
}

fn train_heads(a: TrainArgs) -> Result<()> {
    if a.data.is_empty() && a.synthetic == 0 {
        bail!("give training data (--data FILE.jsonl ...) or --synthetic N");
    }
    if a.hidden == 0 || a.max_len < 16 || !(a.lr > 0.0 && a.lr.is_finite()) {
        bail!("--hidden must be positive, --max-len at least 16 and --lr a positive number");
    }
    let device = parse_device(&a.m.device)?;
    let save_dtype = parse_dtype(&a.save_dtype)?;
    let loaded = a.m.load(&device)?;
    let mut records = apb_host::train::read_jsonl(&loaded.tok, &a.data, a.max_len)?;
    records.extend(apb_host::train::synthetic(
        &loaded.tok,
        a.synthetic,
        a.synthetic_tokens,
        a.seed,
        a.max_len,
    )?);
    let steps = a.steps.unwrap_or(records.len());
    if steps == 0 {
        bail!("--steps must be at least 1");
    }
    let out_dir = a
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    if !out_dir.is_dir() {
        bail!(
            "--out {}: the folder {} does not exist",
            a.out.display(),
            out_dir.display()
        );
    }
    let cfg = apb_host::train::TrainConfig {
        records,
        checkpoint: a
            .checkpoint
            .clone()
            .unwrap_or_else(|| a.out.with_extension("ckpt")),
        out: a.out.clone(),
        steps,
        lr: a.lr,
        warmup: a.warmup.unwrap_or(steps / 10),
        hidden: a.hidden,
        alpha: a.alpha,
        seed: a.seed,
        save_every: a.save_every,
        save_dtype,
    };
    eprintln!(
        "training {} steps on {} records of {} ({}), heads of width {}",
        steps,
        cfg.records.len(),
        loaded.name,
        a.m.device,
        a.hidden
    );
    let (loss, overlap) = apb_host::train::train(&loaded.model, &cfg)?;
    eprintln!(
        "wrote {} (last loss {loss:.4}, top-10% overlap {:.1}%)",
        a.out.display(),
        100.0 * overlap
    );
    Ok(())
}

/// The model and where it runs (generate, serve).
#[derive(Args)]
struct ModelArgs {
    /// Model: a registered name (smollm2-135m-instruct), a .gguf file, a model directory
    /// (config.json + safetensors + tokenizer.json), an HF Hub id (org/name), or random:PRESET
    /// (llama-3.1-8b, qwen-2.5-14b, yi-34b or a config.json: random weights with the default
    /// model's tokenizer, to measure serving without a download).
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
    /// Replace the config's RoPE scaling with this JSON (as vLLM's flag), e.g. YaRN for
    /// Qwen-2.5 at 128K: '{"rope_type":"yarn","factor":4.0,"original_max_position_embeddings":32768}'.
    /// Types: yarn (also beta_fast, beta_slow, attention_factor, mscale, mscale_all_dim,
    /// truncate), llama3 (low_freq_factor, high_freq_factor), default; factor in [1, 1024].
    /// With YaRN the context becomes original × factor. 'null' turns scaling off.
    #[arg(long, value_name = "JSON")]
    rope_scaling: Option<String>,
}

impl ModelArgs {
    /// The model and tokenizer these flags name, on `device`.
    fn load(&self, device: &candle_core::Device) -> apb_host::error::Result<apb_loaders::Loaded> {
        let dtype = parse_dtype(&self.dtype)?;
        let source = ModelSource::parse(&self.model, self.revision.as_deref())?;
        let ov = apb_loaders::Overrides {
            rope_scaling: self.rope_scaling.clone(),
        };
        Ok(apb_loaders::load_with(&source, dtype, device, &ov)?)
    }
}

/// Attention backend and ranks (generate, serve).
#[derive(Args)]
struct AttentionArgs {
    /// Attention method: dense (exact, 1 rank); exact over ranks: zigzag (balanced ring, any rank
    /// count), ulysses (all-to-all of heads; the KV heads must divide by the ranks), ring (simple,
    /// unbalanced); approximate: star (anchor, no passing), apb (anchor with the question +
    /// passing blocks), spava (APB over 2H zigzag chunks: balanced ranks).
    #[arg(long, default_value = "dense")]
    attention: String,
    /// Ranks (threads on CPU) that share the prompt (every method but dense).
    #[arg(long, default_value_t = 1)]
    world_size: usize,
    /// Anchor length in tokens (default: planner, block/4 rounded to 128; star: the first block).
    #[arg(long)]
    anchor_len: Option<usize>,
    /// Passing length per rank and KV head (default: planner, block/8 rounded to 128).
    #[arg(long)]
    passing_len: Option<usize>,
    /// Trained retaining heads (safetensors or PyTorch checkpoint, file, directory or HF Hub id);
    /// without them apb and spava use the training-free query-aware scorer.
    #[arg(long)]
    heads: Option<String>,
    /// APB's question segment on non-last ranks: full (every question token sees all of the
    /// rank's context, which precedes it) or causal (thunlp/APB's bottom-right causal mask there,
    /// for one-to-one comparisons with the reference). causal needs --attention apb.
    #[arg(long, default_value = "full", value_name = "full|causal")]
    apb_question_mask: String,
    /// Fewest context tokens per rank: a prompt too short for --world-size ranks at this many
    /// tokens each runs on fewer (a plan note says so). Thin blocks cost approximate methods
    /// accuracy (Star on 8 ranks answered a 30-token prompt wrongly) and exact ones speed. 0: no
    /// limit.
    #[arg(long, default_value_t = 256)]
    min_rank_tokens: usize,
}

impl AttentionArgs {
    /// The question mask, refused up front (also by `serve`) for methods other than APB.
    fn question_mask(&self, method: Method) -> Result<apb_plugin::QuestionMask> {
        let qm = apb_plugin::QuestionMask::parse(&self.apb_question_mask)
            .map_err(|e| anyhow::anyhow!("--apb-question-mask: {e}"))?;
        apb_host::runner::check_question_mask(method, qm)?;
        Ok(qm)
    }
}

#[derive(Subcommand)]
enum BenchCmd {
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
struct ServeBenchArgs {
    /// The server.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Requests in all.
    #[arg(long, default_value_t = 16)]
    num_prompts: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Requests a second, arriving as a Poisson process (as vllm bench serve's; seeded by
    /// --seed), at most --concurrency in flight. Default: all at once.
    #[arg(long)]
    request_rate: Option<f64>,
    /// Prompt tokens per request (one-token words; the server's usage gives the exact count).
    #[arg(long, default_value_t = 256)]
    input_len: usize,
    /// Tokens generated per request (ignore_eos).
    #[arg(long, default_value_t = 128)]
    output_len: usize,
    /// Prompt seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Append this question after a blank line to every prompt (an APB or Star server takes
    /// the last paragraph as the question; without one it runs the zigzag fallback).
    #[arg(long)]
    question: Option<String>,
    /// Bearer key (also from APB_API_KEY).
    #[arg(long, env = "APB_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Also write the results (every request's timings included) as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn bench_serve(a: ServeBenchArgs) -> Result<()> {
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
struct PrefillArgs {
    /// Model shapes: llama-3.1-8b, qwen-2.5-14b, yi-34b, or a path to a config.json (random
    /// weights: timings do not depend on their values).
    #[arg(long, default_value = "llama-3.1-8b")]
    config: String,
    /// Prompt lengths in tokens, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "32768,65536,131072")]
    lengths: Vec<usize>,
    /// Methods to compare, comma-separated: dense (one GPU), zigzag, ulysses, ring, star, apb,
    /// spava.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "dense,zigzag,ring,star,apb"
    )]
    attention: Vec<String>,
    /// GPUs (ranks) for the sequence-parallel methods.
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
    /// Run only rank H's share of a sequence-parallel method (of --world-size ranks) on this one
    /// GPU, the other ranks' blocks standing in at their planned size: the slowest rank's compute
    /// time and MFU without several GPUs (communication excluded).
    #[arg(long, value_name = "H")]
    only_rank: Option<usize>,
    #[command(flatten)]
    launch: apb_host::launch::LaunchArgs,
}

#[derive(Args)]
struct AttentionBenchArgs {
    /// Sequence lengths (queries = keys), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "8192,32768,131072")]
    lengths: Vec<usize>,
    #[arg(long, default_value_t = 32)]
    heads: usize,
    #[arg(long, default_value_t = 8)]
    kv_heads: usize,
    /// Head dimensions (64 and/or 128), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "128,64")]
    head_dims: Vec<usize>,
    /// Time decode rows instead (comma-separated counts: the sequences of a decode step), each
    /// with its own KV cache of every --lengths keys; caches rotate past the GPU's L2.
    #[arg(long, value_delimiter = ',')]
    decode_rows: Vec<usize>,
    #[arg(long, default_value = "cuda")]
    device: String,
}

#[derive(Args)]
struct LinearBenchArgs {
    /// Model shapes: llama-3.1-8b, qwen-2.5-14b, yi-34b, or a path to a config.json.
    #[arg(long, default_value = "llama-3.1-8b")]
    config: String,
    /// Rows (sequences in a decode step), comma-separated; at most 64.
    #[arg(long, value_delimiter = ',', default_value = "1,8,16,24,32,64")]
    rows: Vec<usize>,
    #[arg(long, default_value = "cuda")]
    device: String,
}

fn bench_linear(a: LinearBenchArgs) -> Result<()> {
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

fn bench_prefill(a: PrefillArgs) -> Result<()> {
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

fn bench_attention(a: AttentionBenchArgs) -> Result<()> {
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

/// The method named by `--attention`, checked against the other flags.
fn parse_method(at: &AttentionArgs) -> Result<Method> {
    let method = Method::parse(&at.attention)?;
    if at.world_size == 0 {
        bail!("--world-size must be at least 1");
    }
    if method == Method::DENSE && at.world_size > 1 {
        bail!(
            "--attention dense runs on one rank; use zigzag or ulysses (exact), or apb, with --world-size {}",
            at.world_size
        );
    }
    if method != Method::DENSE && at.world_size == 1 {
        eprintln!(
            "warning: --attention {method} on one rank is dense attention: a method splits a \
             prompt over several ranks; give --world-size N (2 or more) to use it"
        );
    }
    if !method.selects() && at.heads.is_some() {
        bail!(
            "--heads is only used by --attention {}",
            Method::selecting_names()
        );
    }
    Ok(method)
}

/// Loads the model (and `--heads`) on `device`: what every rank holds.
/// The library's error type: ranks::start calls this on every rank.
fn load_runner(
    m: &ModelArgs,
    at: &AttentionArgs,
    device: &candle_core::Device,
) -> apb_host::error::Result<Runner> {
    let dtype = parse_dtype(&m.dtype)?;
    let loaded = m.load(device)?;
    let scorer = match &at.heads {
        Some(spec) => Scorer::Heads(Arc::new(apb_loaders::heads::load_heads(
            spec,
            &loaded.model.cfg,
            dtype,
            device,
        )?)),
        None => Scorer::QueryAware,
    };
    Ok(Runner::new(loaded, scorer))
}

fn check_sampling(temperature: f64, top_p: f64, max_new_tokens: usize) -> Result<()> {
    if !(top_p > 0.0 && top_p <= 1.0) {
        bail!("--top-p must be in (0, 1], got {top_p}");
    }
    if !(temperature.is_finite() && (0.0..=MAX_TEMPERATURE).contains(&temperature)) {
        bail!("--temperature must be in [0, {MAX_TEMPERATURE}], got {temperature}");
    }
    if max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    Ok(())
}

fn generate(a: GenerateArgs) -> Result<()> {
    check_sampling(a.temperature, a.top_p, a.max_new_tokens)?;
    let method = parse_method(&a.at)?;
    let question_mask = a.at.question_mask(method)?;
    // Read the prompt before starting ranks: a bad file fails fast, with no processes started.
    let prompt = read_prompt(&a)?;
    let spec = GroupSpec {
        world: a.at.world_size,
        device: parse_device(&a.m.device)?,
        launch: a.launch.clone(),
    };
    spec.limit_threads();
    let Some(group) = ranks::start(&spec, |dev| load_runner(&a.m, &a.at, dev))? else {
        return Ok(()); // a GPU worker rank: it served rank 0's job
    };
    let runner = group.runner().clone();
    let parts = prompt::build(
        runner.tok(),
        &prompt,
        a.question.as_deref(),
        a.chat,
        method.imp().needs_question(),
    )?;
    let job = Job {
        prompt: parts,
        method,
        world: a.at.world_size,
        anchor_len: a.at.anchor_len,
        passing_len: a.at.passing_len,
        question_mask,
        min_rank_tokens: a.at.min_rank_tokens,
        params: GenParams {
            max_new_tokens: a.max_new_tokens,
            temperature: a.temperature,
            top_p: a.top_p,
            seed: a.seed,
            ignore_eos: a.ignore_eos,
            stop: vec![],
        },
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
    let never = std::sync::atomic::AtomicBool::new(false);
    let g = match group.run(&job, &never, &mut on_text) {
        Ok(g) => g,
        Err(RunError::Input(m)) => {
            // The ranks are fine: stop them in order before reporting.
            let _ = group.shutdown();
            bail!("{m}")
        }
        Err(RunError::Failed(m)) => bail!("{m}"),
    };
    for note in &g.plan.notes {
        eprintln!("note: {note}");
    }
    let info = group.info();
    group.shutdown()?;
    if json {
        let mut v = summary(&g, method.name(), g.plan.world, &runner.loaded.name);
        if method != Method::DENSE {
            let extra = serde_json::json!({
                "anchor_len": g.plan.l_a,
                "passing_len": g.plan.l_p,
                "block_len": g.plan.l_b,
                "scorer": g.scorer,
                "question_mask": g.question_mask,
                "rank_prefill_tokens": g.rank_prefill_tokens,
                "plan_notes": g.plan.notes,
            });
            if let (Some(v), serde_json::Value::Object(extra)) = (v.as_object_mut(), extra) {
                v.extend(extra);
            }
        }
        v["method"] = g.method.name().into();
        v["rank_mode"] = info.rank_mode.into();
        v["comm"] = info.comm.into();
        if a.first_logits {
            v["first_logits"] = serde_json::json!(g.first_logits);
        }
        v["requested_world_size"] = a.at.world_size.into();
        v["finish_reason"] = serde_json::json!(g.finish);
        println!("{v}");
    } else {
        println!();
    }
    Ok(())
}

/// A `--cors-origin`: `*`, or `scheme://host[:port]` as browsers send it (no path, no slash).
fn check_origin(o: &str) -> Result<()> {
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
fn listen_addr(host: &str, port: u16) -> Result<std::net::SocketAddr> {
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

fn serve(a: ServeArgs) -> Result<()> {
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
        method,
        world: a.at.world_size,
        anchor_len: a.at.anchor_len,
        passing_len: a.at.passing_len,
        question_mask: a.at.question_mask(method)?,
        min_rank_tokens: a.at.min_rank_tokens,
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
            ranks::start(&spec, |dev| load_runner(&a.m, &a.at, dev))?
                .ok_or_else(|| apb_host::error::Error::msg("rank 0 did not start"))
        })
        .await?;
        Ok(())
    })
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
    let cli = Cli::parse();
    // The server logs each request at info unless APB_LOG says otherwise; the rest, errors only.
    let default = if matches!(cli.cmd, Cmd::Serve(_)) {
        "info"
    } else {
        "error"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("APB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    // Commands that start ranks fix their thread count as their ranks share the cores.
    if !matches!(
        cli.cmd,
        Cmd::Generate(_) | Cmd::Serve(_) | Cmd::Bench(BenchCmd::Prefill(_))
    ) {
        apb_host::launch::fix_threads();
    }
    match apb_plugin::profile::Mode::from_env() {
        Ok(m) => apb_plugin::profile::set_mode(m),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    }
    let res = match cli.cmd {
        Cmd::Generate(a) => generate(a),
        Cmd::TrainHeads(a) => train_heads(a),
        Cmd::HeadsOverlap(a) => heads_overlap(a),
        Cmd::Eval(a) => eval(a),
        Cmd::Serve(a) => serve(a),
        Cmd::Bench(BenchCmd::Prefill(a)) => bench_prefill(a),
        Cmd::Bench(BenchCmd::Attention(a)) => bench_attention(a),
        Cmd::Bench(BenchCmd::Linear(a)) => bench_linear(a),
        Cmd::Bench(BenchCmd::Serve(a)) => bench_serve(a),
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
