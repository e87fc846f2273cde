//! `apb generate`: one prompt, streamed or as one JSON object.

use crate::args::*;
use anyhow::{bail, Context, Result};
use apb_host::ranks::{self, GroupSpec, RunError};
use apb_host::runner::MAX_TEMPERATURE;
use apb_host::{device::parse_device, prompt, GenParams, Job};
use clap::Args;
use std::io::Write;
use std::path::PathBuf;

#[derive(Args)]
pub(crate) struct GenerateArgs {
    /// Prompt text.
    #[arg(
        long,
        conflicts_with = "prompt_file",
        required_unless_present = "prompt_file"
    )]
    pub(crate) prompt: Option<String>,
    /// Read the prompt from a UTF-8 file.
    #[arg(long)]
    pub(crate) prompt_file: Option<PathBuf>,
    /// Wrap the prompt as a user turn in the model's chat template.
    #[arg(long)]
    pub(crate) chat: bool,
    /// Maximum number of tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub(crate) max_new_tokens: usize,
    /// Sampling temperature; 0 = greedy (deterministic).
    #[arg(long, default_value_t = 0.0)]
    pub(crate) temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens with this much probability.
    #[arg(long, default_value_t = 1.0)]
    pub(crate) top_p: f64,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 299792458)]
    pub(crate) seed: u64,
    /// Do not stop at end-of-sequence tokens (for benchmarks needing a fixed count).
    #[arg(long)]
    pub(crate) ignore_eos: bool,
    /// The question (APB embeds it in every anchor). With --chat and no --question, the last
    /// paragraph of the prompt (after its last blank line) is the question.
    #[arg(long)]
    pub(crate) question: Option<String>,
    #[command(flatten)]
    pub(crate) m: ModelArgs,
    #[command(flatten)]
    pub(crate) at: AttentionArgs,
    /// Print one JSON object (text and timings) instead of streaming.
    #[arg(long)]
    pub(crate) json: bool,
    /// With --json: also report the first generated token's logits (`first_logits`), to
    /// compare backends and rank modes bit for bit.
    #[arg(long, requires = "json")]
    pub(crate) first_logits: bool,
    #[command(flatten)]
    pub(crate) launch: apb_host::launch::LaunchArgs,
}

pub(crate) fn read_prompt(a: &GenerateArgs) -> Result<String> {
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

pub(crate) fn check_sampling(temperature: f64, top_p: f64, max_new_tokens: usize) -> Result<()> {
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

pub(crate) fn generate(a: GenerateArgs) -> Result<()> {
    check_sampling(a.temperature, a.top_p, a.max_new_tokens)?;
    let method = parse_method(&a.at)?;
    let settings = a.at.settings(method)?;
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
        settings,
        prompt: parts,
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
        // What ran (the server's `apb` object has the same fields), and what only the CLI
        // reports; `world_size` is `ranks` under the name this output had first.
        let mut v = serde_json::json!(g.report());
        v["text"] = g.text.clone().into();
        v["prompt_tokens"] = g.stats.prompt_tokens.into();
        v["generated_tokens"] = g.stats.generated_tokens.into();
        v["attention"] = method.name().into();
        v["world_size"] = g.plan.world.into();
        v["model"] = runner.loaded.name.clone().into();
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
