//! `apb train-heads` and `apb heads-overlap`: retaining heads, trained and judged.

use crate::args::*;
use anyhow::{bail, Result};
use apb_host::device::parse_device;
use apb_loaders::parse_dtype;
use apb_plugin::Scorer;
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Args)]
pub(crate) struct TrainArgs {
    #[command(flatten)]
    pub(crate) m: ModelArgs,
    /// Training data: JSONL files of {"prompt", "answer"} or {"messages": [..., assistant]}.
    #[arg(long, num_args = 1..)]
    pub(crate) data: Vec<PathBuf>,
    /// Also generate this many long-context QA records (needles, multi-hop links, aggregation)
    /// over noise and the prose on this machine: training without a dataset.
    #[arg(long, default_value_t = 0)]
    pub(crate) synthetic: usize,
    /// Document length of the synthetic records, in tokens (about).
    #[arg(long, default_value_t = 2048)]
    pub(crate) synthetic_tokens: usize,
    /// Where to write the heads (safetensors, loadable with --heads).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Optimiser steps (one record each, cycling); default: one pass over the records.
    #[arg(long)]
    pub(crate) steps: Option<usize>,
    /// Longest prompt in tokens (longer ones keep their end).
    #[arg(long, default_value_t = 10240)]
    pub(crate) max_len: usize,
    #[arg(long, default_value_t = 5e-4)]
    pub(crate) lr: f64,
    /// Warm-up steps; default: 10 % of the steps.
    #[arg(long)]
    pub(crate) warmup: Option<usize>,
    /// Hidden width of each head (Locret uses 1024 on 8B models).
    #[arg(long, default_value_t = 1024)]
    pub(crate) hidden: usize,
    /// Weight of the smoothness term.
    #[arg(long, default_value_t = 0.0025)]
    pub(crate) alpha: f64,
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Checkpoint (heads + optimiser) written every --save-every steps and resumed from if it
    /// exists; default: OUT with the extension .ckpt.
    #[arg(long)]
    pub(crate) checkpoint: Option<PathBuf>,
    #[arg(long, default_value_t = 50)]
    pub(crate) save_every: usize,
    /// dtype of the saved heads.
    #[arg(long, default_value = "bf16")]
    pub(crate) save_dtype: String,
}

#[derive(Args)]
pub(crate) struct OverlapArgs {
    #[command(flatten)]
    pub(crate) m: ModelArgs,
    /// Retaining heads to compare with the training-free scorer (file, directory or HF Hub id).
    #[arg(long)]
    pub(crate) heads: String,
    /// Held-out documents (tasks cycled).
    #[arg(long, default_value_t = 16)]
    pub(crate) cases: usize,
    /// Document length in tokens (about).
    #[arg(long, default_value_t = 2048)]
    pub(crate) tokens: usize,
    /// First document seed (the default is clear of training's seeds, like `apb eval`'s).
    #[arg(long, default_value_t = 1_000_000)]
    pub(crate) seed: u64,
}

pub(crate) fn heads_overlap(a: OverlapArgs) -> Result<()> {
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

pub(crate) fn train_heads(a: TrainArgs) -> Result<()> {
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
