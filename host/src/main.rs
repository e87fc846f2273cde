//! `apb`: long-context generation with pluggable attention backends.

use anyhow::{bail, Context, Result};
use apb_host::{device::parse_device, Engine, GenParams};
use apb_loaders::{load, parse_dtype, registry::DEFAULT_MODEL, ModelSource};
use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

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
    /// Generate text from a prompt (streams to stdout, or one JSON object with --json).
    Generate(GenerateArgs),
}

#[derive(Args)]
struct GenerateArgs {
    /// Model: a registered name (smollm2-135m-instruct), a .gguf file, a model directory
    /// (config.json + safetensors + tokenizer.json) or an HF Hub id (org/name).
    #[arg(short, long, default_value = DEFAULT_MODEL)]
    model: String,
    /// HF Hub revision (branch, tag or commit) when --model is a hub id.
    #[arg(long)]
    revision: Option<String>,
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
    /// Attention backend.
    #[arg(long, default_value = "dense")]
    attention: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Run dtype: f32, bf16 or f16 (quantized GGUF weights are dequantized to it).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Print one JSON object (text and timings) instead of streaming.
    #[arg(long)]
    json: bool,
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

fn generate(a: GenerateArgs) -> Result<()> {
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1], got {}", a.top_p);
    }
    if a.temperature < 0.0 || !a.temperature.is_finite() {
        bail!("--temperature must be >= 0, got {}", a.temperature);
    }
    let backend = apb_plugin::backend_by_name(&a.attention)?;
    let device = parse_device(&a.device)?;
    let dtype = parse_dtype(&a.dtype)?;
    let prompt = read_prompt(&a)?;
    let source = ModelSource::parse(&a.model, a.revision.as_deref())?;
    let loaded = load(&source, dtype, &device)?;
    let engine = Engine::new(loaded, backend);
    let ids = engine.prompt_ids(&prompt, a.chat)?;
    let params = GenParams {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
    };
    let stdout = std::io::stdout();
    let mut on_text = |s: &str| {
        if !a.json {
            let mut out = stdout.lock();
            let _ = out.write_all(s.as_bytes());
            let _ = out.flush();
        }
    };
    let g = engine.generate(&ids, &params, &mut on_text)?;
    if a.json {
        let v = serde_json::json!({
            "text": g.text,
            "prompt_tokens": g.stats.prompt_tokens,
            "generated_tokens": g.stats.generated_tokens,
            "prefill_ms": g.stats.prefill_ms,
            "decode_tokens_per_s": g.stats.decode_tokens_per_s,
            "attention": engine.backend.name(),
            "world_size": 1,
            "model": engine.loaded.name,
        });
        println!("{v}");
    } else {
        println!();
    }
    Ok(())
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
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}
