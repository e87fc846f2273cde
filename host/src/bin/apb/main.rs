//! `apb`: long-context generation with pluggable attention backends.

mod args;
mod bench;
mod eval;
mod generate;
mod serve;
mod train;

use bench::*;
use clap::{Parser, Subcommand};
use eval::*;
use generate::*;
use serve::*;
use std::process::ExitCode;
use train::*;

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
