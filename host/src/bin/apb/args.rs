//! The flags `generate` and `serve` share: the model and where it runs, the attention method and its ranks.

use anyhow::{bail, Result};
use apb_host::Method;
use apb_host::Runner;
use apb_loaders::{parse_dtype, registry::DEFAULT_MODEL, ModelSource};
use apb_plugin::Scorer;
use clap::Args;
use std::sync::Arc;

/// The model and where it runs (generate, serve).
#[derive(Args)]
pub(crate) struct ModelArgs {
    /// Model: a registered name (smollm2-135m-instruct), a .gguf file, a model directory
    /// (config.json + safetensors + tokenizer.json), an HF Hub id (org/name), or random:PRESET
    /// (llama-3.1-8b, qwen-2.5-14b, yi-34b or a config.json: random weights with the default
    /// model's tokenizer, to measure serving without a download).
    #[arg(short, long, default_value = DEFAULT_MODEL)]
    pub(crate) model: String,
    /// HF Hub revision (branch, tag or commit) when --model is a hub id.
    #[arg(long)]
    pub(crate) revision: Option<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
    /// Run dtype: f32, bf16 or f16 (quantized GGUF weights are dequantized to it).
    #[arg(long, default_value = "f32")]
    pub(crate) dtype: String,
    /// Replace the config's RoPE scaling with this JSON (as vLLM's flag), e.g. YaRN for
    /// Qwen-2.5 at 128K: '{"rope_type":"yarn","factor":4.0,"original_max_position_embeddings":32768}'.
    /// Types: yarn (also beta_fast, beta_slow, attention_factor, mscale, mscale_all_dim,
    /// truncate), llama3 (low_freq_factor, high_freq_factor), default; factor in [1, 1024].
    /// With YaRN the context becomes original × factor. 'null' turns scaling off.
    #[arg(long, value_name = "JSON")]
    pub(crate) rope_scaling: Option<String>,
}

impl ModelArgs {
    /// The model and tokenizer these flags name, on `device`.
    pub(crate) fn load(
        &self,
        device: &candle_core::Device,
    ) -> apb_host::error::Result<apb_loaders::Loaded> {
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
pub(crate) struct AttentionArgs {
    /// Attention method: dense (exact, 1 rank); exact over ranks: zigzag (balanced ring, any rank
    /// count), ulysses (all-to-all of heads; the KV heads must divide by the ranks), ring (simple,
    /// unbalanced); approximate: star (anchor, no passing), apb (anchor with the question +
    /// passing blocks), spava (APB over 2H zigzag chunks: balanced ranks).
    #[arg(long, default_value = "dense")]
    pub(crate) attention: String,
    /// Ranks (threads on CPU) that share the prompt (every method but dense).
    #[arg(long, default_value_t = 1)]
    pub(crate) world_size: usize,
    /// Anchor length in tokens (default: planner, block/4 rounded to 128; star: the first block).
    #[arg(long)]
    pub(crate) anchor_len: Option<usize>,
    /// Passing length per rank and KV head (default: planner, block/8 rounded to 128).
    #[arg(long)]
    pub(crate) passing_len: Option<usize>,
    /// Trained retaining heads (safetensors or PyTorch checkpoint, file, directory or HF Hub id);
    /// without them apb and spava use the training-free query-aware scorer.
    #[arg(long)]
    pub(crate) heads: Option<String>,
    /// APB's question segment on non-last ranks: full (every question token sees all of the
    /// rank's context, which precedes it) or causal (thunlp/APB's bottom-right causal mask there,
    /// for one-to-one comparisons with the reference). causal needs --attention apb.
    #[arg(long, default_value = "full", value_name = "full|causal")]
    pub(crate) apb_question_mask: String,
    /// Fewest context tokens per rank: a prompt too short for --world-size ranks at this many
    /// tokens each runs on fewer (a plan note says so). Thin blocks cost approximate methods
    /// accuracy (Star on 8 ranks answered a 30-token prompt wrongly) and exact ones speed. 0: no
    /// limit.
    #[arg(long, default_value_t = 256)]
    pub(crate) min_rank_tokens: usize,
}

impl AttentionArgs {
    /// The settings these flags give a job of `method` (`generate`, and every request `serve`
    /// runs).
    pub(crate) fn settings(&self, method: Method) -> Result<apb_host::JobSettings> {
        Ok(apb_host::JobSettings {
            method,
            world: self.world_size,
            anchor_len: self.anchor_len,
            passing_len: self.passing_len,
            question_mask: self.question_mask(method)?,
            min_rank_tokens: self.min_rank_tokens,
        })
    }

    /// The question mask, refused up front (also by `serve`) for methods other than APB.
    pub(crate) fn question_mask(&self, method: Method) -> Result<apb_plugin::QuestionMask> {
        let qm = apb_plugin::QuestionMask::parse(&self.apb_question_mask)
            .map_err(|e| anyhow::anyhow!("--apb-question-mask: {e}"))?;
        apb_host::runner::check_question_mask(method, qm)?;
        Ok(qm)
    }
}

/// The method named by `--attention`, checked against the other flags.
pub(crate) fn parse_method(at: &AttentionArgs) -> Result<Method> {
    let method = Method::parse(&at.attention)?;
    if at.world_size == 0 {
        bail!("--world-size must be at least 1");
    }
    let most = method.ranks_for(at.world_size);
    if most < at.world_size {
        let ranks = if most == 1 {
            "one rank".to_string()
        } else {
            format!("at most {most} ranks")
        };
        bail!(
            "--attention {method} runs on {ranks}; use zigzag or ulysses (exact), or apb, with --world-size {}",
            at.world_size
        );
    }
    if method.spans_ranks() && at.world_size == 1 {
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
pub(crate) fn load_runner(
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
