//! Generation: tokenize, prefill the prompt in one pass, then decode token by token.

use crate::sampling::Sampler;
use anyhow::{bail, Context, Result};
use apb_loaders::{Cache, Loaded, Model, Tok};
use apb_plugin::{AttentionBackend, Phase};
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct GenParams {
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    /// Keep generating through EOS (benchmarks that need a fixed token count).
    pub ignore_eos: bool,
}

impl Default for GenParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            temperature: 0.0,
            top_p: 1.0,
            seed: 299792458,
            ignore_eos: false,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct GenStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_ms: f64,
    pub decode_tokens_per_s: f64,
}

impl GenStats {
    /// `steps` decode forward passes took `decode_s` seconds.
    pub fn new(
        prompt_tokens: usize,
        generated_tokens: usize,
        prefill_ms: f64,
        steps: usize,
        decode_s: f64,
    ) -> Self {
        let decode_tokens_per_s = if steps > 0 && decode_s > 0.0 {
            steps as f64 / decode_s
        } else {
            0.0
        };
        Self {
            prompt_tokens,
            generated_tokens,
            prefill_ms,
            decode_tokens_per_s,
        }
    }
}

/// Streams generated text in whole characters: a piece is held back while the decoded tail is
/// an incomplete UTF-8 sequence.
#[derive(Debug, Default)]
pub struct TextStream {
    printed: usize,
}

impl TextStream {
    /// Emits what `ids` decode to beyond what was already emitted.
    pub fn push(&mut self, tok: &Tok, ids: &[u32], emit: &mut dyn FnMut(&str)) -> Result<()> {
        let text = tok.decode(ids)?;
        if !text.ends_with('\u{FFFD}') && text.len() > self.printed {
            emit(&text[self.printed..]);
            self.printed = text.len();
        }
        Ok(())
    }

    /// Emits the rest and returns the whole text.
    pub fn finish(self, tok: &Tok, ids: &[u32], emit: &mut dyn FnMut(&str)) -> Result<String> {
        let text = tok.decode(ids)?;
        if text.len() > self.printed {
            emit(&text[self.printed..]);
        }
        Ok(text)
    }
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<u32>,
    /// Logits (f32) that chose the first generated token: what backends are compared on.
    pub first_logits: Vec<f32>,
    pub stats: GenStats,
}

pub struct Engine {
    pub loaded: Loaded,
    pub backend: Arc<dyn AttentionBackend>,
}

/// Prompts at least this long get a prefill progress bar (on a terminal).
const PROGRESS_MIN_TOKENS: usize = 2048;

impl Engine {
    pub fn new(loaded: Loaded, backend: Arc<dyn AttentionBackend>) -> Self {
        Self { loaded, backend }
    }

    /// Tokens of `text`, or of `text` as a user turn rendered with the chat template.
    pub fn prompt_ids(&self, text: &str, chat: bool) -> Result<Vec<u32>> {
        let tok = &self.loaded.tok;
        let rendered;
        let text = if chat {
            rendered = tok.apply_chat_template(&[apb_loaders::ChatMessage::user(text)])?;
            rendered.as_str()
        } else {
            text
        };
        let ids = tok.encode(text)?;
        if ids.is_empty() {
            bail!("the prompt is empty");
        }
        Ok(ids)
    }

    /// Generates from `prompt` token ids; `on_text` receives each new piece of text as it is
    /// decoded (for streaming).
    pub fn generate(
        &self,
        prompt: &[u32],
        p: &GenParams,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        generate(
            &self.loaded.model,
            &self.loaded.tok,
            self.backend.as_ref(),
            prompt,
            p,
            on_text,
        )
    }
}

/// A layer-by-layer prefill progress bar for prompts of at least [`PROGRESS_MIN_TOKENS`] tokens
/// (indicatif draws it only when stderr is a terminal).
pub(crate) fn prefill_bar(prompt_tokens: usize, layers: usize) -> Option<indicatif::ProgressBar> {
    (prompt_tokens >= PROGRESS_MIN_TOKENS).then(|| {
        let b = indicatif::ProgressBar::new(layers as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "prefill {pos}/{len} layers {bar:30} {elapsed}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    })
}

/// Single-rank generation with any backend (what [`Engine::generate`] runs).
pub fn generate(
    model: &Model,
    tok: &Tok,
    backend: &dyn AttentionBackend,
    prompt: &[u32],
    p: &GenParams,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    let ctx = model.cfg.max_position_embeddings;
    if prompt.len() >= ctx {
        bail!(
            "the prompt has {} tokens but the model's context is {ctx}; shorten the prompt",
            prompt.len()
        );
    }
    let max_new = p.max_new_tokens.min(ctx - prompt.len());
    let mut cache = Cache::new(&model.cfg);
    let mut sampler = Sampler::new(p.temperature, p.top_p, p.seed);

    let t0 = Instant::now();
    let positions: Vec<u32> = (0..prompt.len() as u32).collect();
    let bar = prefill_bar(prompt.len(), model.cfg.num_hidden_layers);
    let mut tick = |_: usize| {
        if let Some(b) = &bar {
            b.inc(1)
        }
    };
    let hidden = model
        .forward(
            prompt,
            &positions,
            Phase::Prefill,
            backend,
            &mut cache,
            &mut tick,
        )
        .context("prefill")?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let logits = model.last_logits(&hidden)?.to_vec1::<f32>()?;
    let prefill_ms = t0.elapsed().as_secs_f64() * 1e3;

    let t1 = Instant::now();
    let mut out: Vec<u32> = Vec::new();
    let mut stream = TextStream::default();
    let mut steps = 0usize;
    let mut next = sampler.sample(&logits);
    while out.len() < max_new && (p.ignore_eos || !tok.stop_ids.contains(&next)) {
        out.push(next);
        stream.push(tok, &out, on_text)?;
        if out.len() == max_new {
            break;
        }
        let pos = (prompt.len() + out.len() - 1) as u32;
        let hidden = model
            .forward(
                &[next],
                &[pos],
                Phase::Decode,
                backend,
                &mut cache,
                &mut |_| {},
            )
            .context("decode")?;
        steps += 1;
        next = sampler.sample(&model.last_logits(&hidden)?.to_vec1::<f32>()?);
    }
    let text = stream.finish(tok, &out, on_text)?;
    let stats = GenStats::new(
        prompt.len(),
        out.len(),
        prefill_ms,
        steps,
        t1.elapsed().as_secs_f64(),
    );
    Ok(Generation {
        text,
        tokens: out,
        first_logits: logits,
        stats,
    })
}
