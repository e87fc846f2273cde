//! `apb eval`: methods scored on generated long-context tasks.

use crate::args::*;
use anyhow::{bail, Context, Result};
use apb_host::Method;
use apb_host::{device::parse_device, Runner};
use apb_loaders::parse_dtype;
use apb_plugin::Scorer;
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Args)]
pub(crate) struct EvalArgs {
    #[command(flatten)]
    pub(crate) m: ModelArgs,
    /// Tasks, comma-separated, or `all`. Known: niah_noise, niah_prose, multikey, multivalue,
    /// multiquery, two_hop, vartrack, common_words. The default leaves out multikey and
    /// common_words, which SmolLM2-135M cannot do even densely.
    #[arg(long, value_delimiter = ',', default_values_t = apb_host::tasks::DEFAULT_TASKS.map(String::from))]
    pub(crate) tasks: Vec<String>,
    /// Prompt lengths in tokens (about), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "4096")]
    pub(crate) lengths: Vec<usize>,
    /// Cases per task and length.
    #[arg(long, default_value_t = 5)]
    pub(crate) cases: usize,
    /// Columns, comma-separated: dense, ring, zigzag, ulysses, star, apb, spava (apb and spava
    /// with the training-free scorer); `M-heads` runs a selecting method with the retaining heads
    /// of --heads (apb-heads); `M@N` on N ranks instead of --world-size (apb@8).
    #[arg(long, value_delimiter = ',', default_value = "dense,star,apb")]
    pub(crate) attention: Vec<String>,
    /// Ranks (threads) of the sequence-parallel methods.
    #[arg(long, default_value_t = 4)]
    pub(crate) world_size: usize,
    /// Retaining heads for apb-heads (file, directory or HF Hub id).
    #[arg(long)]
    pub(crate) heads: Option<String>,
    /// Tokens each answer may have (at least 1).
    #[arg(long, default_value_t = 32)]
    pub(crate) max_new_tokens: usize,
    /// First case seed. The default keeps clear of `apb train-heads --synthetic` (seeds from 0),
    /// so heads are never scored on cases they were trained on.
    #[arg(long, default_value_t = 1_000_000)]
    pub(crate) seed: u64,
    /// Results file, one JSON row per case and method (JSONL); an existing file is resumed.
    #[arg(long, value_name = "FILE")]
    pub(crate) json: PathBuf,
}

/// The shortest `apb eval --lengths` entry.
pub(crate) const MIN_EVAL_TOKENS: usize = 128;

pub(crate) fn eval(a: EvalArgs) -> Result<()> {
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
        let world = method.ranks_for(ranks.unwrap_or(a.world_size));
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
