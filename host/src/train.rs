//! `apb train-heads`: Locret retaining heads trained on a frozen model (../shared/reference/apb.md
//! §6), on candle's autograd.
//!
//! Labels come from the model itself: for every layer, KV head and prompt key `k`, the largest
//! pre-softmax score `q·k/√d` any answer token's query (over the group's query heads) gives it.
//! A head is `fc2(SiLU(fc1([q|k|v])))` on the pre-RoPE projections of the prompt token, trained
//! with SmoothL1 to the label plus 0.0025 × a smoothness term along the sequence; AdamW (0.9, 0.95),
//! linear warm-up and decay, gradients clipped by value at 0.5. Saved as safetensors under the
//! names the loader reads (`model.layers.{i}.self_attn.fc{1,2}.weight`).

use crate::error::{bail, err, Context, Result};
use crate::tasks;
use apb_loaders::{Cache, Model};
use apb_plugin::{AttentionBackend, AttnInput, DenseBackend, LayerKv, Phase, Scorer};
use candle_core::{DType, Device, Tensor, Var, D};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// One training record: prompt and answer token ids.
#[derive(Debug, Clone)]
pub struct Record {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Answer token ids (the queries labels are taken from).
    pub answer: Vec<u32>,
}

/// What one record gives each layer: features `(P, in)` and labels `(P, n_kv)`, f32, for the `P`
/// prompt tokens.
pub struct Example {
    /// Per layer: features `(P, in)` and labels `(P, n_kv)`.
    pub layers: Vec<(Tensor, Tensor)>,
}

/// Dense attention that also records, per layer, the heads' inputs and the Locret labels.
struct Collector {
    prompt_len: usize,
    out: Mutex<Vec<(Tensor, Tensor)>>,
}

impl AttentionBackend for Collector {
    fn name(&self) -> &str {
        "dense (label collector)"
    }

    fn forward(
        &self,
        phase: Phase,
        x: &AttnInput<'_>,
        cache: &mut LayerKv,
    ) -> apb_plugin::Result<Tensor> {
        let p = self.prompt_len;
        let (_, n_h, s, d) = x.q.dims4()?;
        let n_kv = x.k.dim(1)?;
        let g = n_h / n_kv;
        let feats = Tensor::cat(&[x.q_raw, x.k_raw, x.v_raw], D::Minus1)?
            .squeeze(0)?
            .narrow(0, 0, p)?
            .to_dtype(DType::F32)?;
        // (n_kv, g·answer rows, d) · (n_kv, d, P) → max over the rows.
        let q =
            x.q.squeeze(0)?
                .narrow(1, p, s - p)?
                .to_dtype(DType::F32)?
                .reshape((n_kv, g * (s - p), d))?;
        let k = x.k.squeeze(0)?.narrow(1, 0, p)?.to_dtype(DType::F32)?;
        let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?;
        let labels = scores.max(1)?.t()?.contiguous()?; // (P, n_kv)
        self.out.lock().expect("collector").push((feats, labels));
        DenseBackend.forward(phase, x, cache)
    }

    fn decode_part(
        &self,
        x: &AttnInput<'_>,
        cache: &mut LayerKv,
        keep: bool,
    ) -> apb_plugin::Result<(Tensor, Tensor)> {
        DenseBackend.decode_part(x, cache, keep)
    }
}

/// Runs the frozen model over `prompt + answer` and returns every layer's features and labels.
pub fn example(model: &Model, rec: &Record) -> Result<Example> {
    if rec.prompt.is_empty() || rec.answer.is_empty() {
        bail!("a record needs a prompt and an answer");
    }
    let tokens: Vec<u32> = [rec.prompt.as_slice(), rec.answer.as_slice()].concat();
    let positions: Vec<u32> = (0..tokens.len() as u32).collect();
    let collector = Collector {
        prompt_len: rec.prompt.len(),
        out: Mutex::new(Vec::new()),
    };
    let mut cache = Cache::new(&model.cfg);
    model
        .forward(
            &tokens,
            &positions,
            Phase::Prefill,
            &collector,
            &mut cache,
            &mut |_| Ok(()),
        )
        .map_err(|e| err!("{e}"))?;
    Ok(Example {
        layers: collector.out.into_inner().expect("collector"),
    })
}

/// Trainable heads: per layer `fc1 (hidden, in)`, `fc2 (n_kv, hidden)`.
pub struct Heads {
    /// Per layer `(hidden, in)`.
    pub fc1: Vec<Var>,
    /// Per layer `(n_kv, hidden)`.
    pub fc2: Vec<Var>,
}

impl Heads {
    /// PyTorch `Linear`'s default init: uniform in ±1/√fan_in, from `seed`.
    pub fn new(
        layers: usize,
        in_dim: usize,
        hidden: usize,
        n_kv: usize,
        seed: u64,
        dev: &Device,
    ) -> Result<Self> {
        // Our own generator: candle cannot seed its CPU RNG, and heads must not depend on it.
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut init = |out: usize, inp: usize| -> Result<Var> {
            let b = 1.0 / (inp as f64).sqrt();
            let v: Vec<f32> = (0..out * inp)
                .map(|_| {
                    x ^= x >> 12;
                    x ^= x << 25;
                    x ^= x >> 27;
                    let u =
                        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64;
                    ((2.0 * u - 1.0) * b) as f32
                })
                .collect();
            Ok(Var::from_tensor(&Tensor::from_vec(v, (out, inp), dev)?)?)
        };
        let mut fc1 = Vec::new();
        let mut fc2 = Vec::new();
        for _ in 0..layers {
            fc1.push(init(hidden, in_dim)?);
            fc2.push(init(n_kv, hidden)?);
        }
        Ok(Self { fc1, fc2 })
    }

    fn vars(&self) -> Vec<&Var> {
        self.fc1.iter().chain(&self.fc2).collect()
    }

    /// Scores `(P, n_kv)` of layer `l` for features `(P, in)`.
    pub fn predict(&self, l: usize, feats: &Tensor) -> Result<Tensor> {
        let h = feats.matmul(&self.fc1[l].as_tensor().t()?)?.silu()?;
        Ok(h.matmul(&self.fc2[l].as_tensor().t()?)?)
    }

    /// Writes the heads in the loader's layout, in `dtype`.
    pub fn save(&self, path: &Path, dtype: DType) -> Result<()> {
        let mut map = HashMap::new();
        for (i, (a, b)) in self.fc1.iter().zip(&self.fc2).enumerate() {
            map.insert(
                format!("model.layers.{i}.self_attn.fc1.weight"),
                a.as_tensor().to_dtype(dtype)?.to_device(&Device::Cpu)?,
            );
            map.insert(
                format!("model.layers.{i}.self_attn.fc2.weight"),
                b.as_tensor().to_dtype(dtype)?.to_device(&Device::Cpu)?,
            );
        }
        candle_core::safetensors::save(&map, path)
            .with_context(|| format!("cannot write {}", path.display()))
    }
}

/// Locret's loss over every layer: mean SmoothL1 (β = 1) to the labels, plus `alpha` × the mean
/// squared difference of neighbouring predictions. Returns the loss and the mean top-10 % overlap
/// of predictions and labels (per layer and head, the monitoring metric).
pub fn loss(heads: &Heads, ex: &Example, alpha: f64) -> Result<(Tensor, f64)> {
    let mut total: Option<Tensor> = None;
    let mut overlap = 0.0;
    let mut n = 0usize;
    for (l, (feats, labels)) in ex.layers.iter().enumerate() {
        let pred = heads.predict(l, feats)?;
        let a = (&pred - labels)?.abs()?;
        let m = a.clamp(0f32, 1f32)?;
        let smooth_l1 = ((m.sqr()? * 0.5)? + (a - &m)?)?.mean_all()?;
        let p = pred.dim(0)?;
        let mut term = smooth_l1;
        if p > 1 {
            let diff = (pred.narrow(0, 1, p - 1)? - pred.narrow(0, 0, p - 1)?)?;
            term = (term + (diff.sqr()?.mean_all()? * alpha)?)?;
        }
        total = Some(match total {
            Some(t) => (t + term)?,
            None => term,
        });
        let (o, c) = top_overlap(&pred, labels, 0.1)?;
        overlap += o;
        n += c;
    }
    let layers = ex.layers.len().max(1) as f64;
    let total = (total.context("no layers")? / layers)?;
    Ok((total, overlap / n.max(1) as f64))
}

/// Per column (KV head): |top-`frac` of `pred` ∩ top-`frac` of `label`| / k; returns (sum, columns).
fn top_overlap(pred: &Tensor, label: &Tensor, frac: f64) -> Result<(f64, usize)> {
    let p = pred.t()?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let l = label.t()?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let mut sum = 0.0;
    for (a, b) in p.iter().zip(&l) {
        let k = ((a.len() as f64 * frac).ceil() as usize).max(1);
        let top = |v: &[f32]| {
            let mut idx: Vec<usize> = (0..v.len()).collect();
            idx.sort_by(|&x, &y| v[y].total_cmp(&v[x]));
            idx.truncate(k);
            idx
        };
        let ta = top(a);
        let tb: std::collections::HashSet<usize> = top(b).into_iter().collect();
        sum += ta.iter().filter(|i| tb.contains(i)).count() as f64 / k as f64;
    }
    Ok((sum, p.len()))
}

/// AdamW with the schedule and clipping of the recipe; its state saves and loads with the heads.
pub struct AdamW {
    /// Peak learning rate.
    pub lr: f64,
    /// Moment decay rates.
    pub betas: (f64, f64),
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Gradient value clip.
    pub clip: f64,
    /// Linear warm-up steps.
    pub warmup: usize,
    /// Steps in all (the rate decays linearly to 0).
    pub total: usize,
    /// Steps taken.
    pub step: usize,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl AdamW {
    /// Zeroed moments for `heads`.
    pub fn new(heads: &Heads, lr: f64, warmup: usize, total: usize) -> Result<Self> {
        let zeros = |v: &&Var| v.as_tensor().zeros_like();
        let vars = heads.vars();
        Ok(Self {
            lr,
            betas: (0.9, 0.95),
            eps: 1e-8,
            weight_decay: 0.01,
            clip: 0.5,
            warmup,
            total,
            step: 0,
            m: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
            v: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
        })
    }

    /// Learning rate at the current step: linear warm-up to `lr`, then linear decay to 0.
    pub fn rate(&self) -> f64 {
        let s = self.step as f64;
        if self.step < self.warmup {
            self.lr * (s + 1.0) / self.warmup as f64
        } else {
            let rest = (self.total.saturating_sub(self.warmup)).max(1) as f64;
            self.lr * (1.0 - (s - self.warmup as f64) / rest).max(0.0)
        }
    }

    /// One update from the gradients of `loss`.
    pub fn step(&mut self, heads: &Heads, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        let lr = self.rate();
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = self.betas;
        for (i, var) in heads.vars().into_iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let g = g.clamp(-self.clip as f32, self.clip as f32)?;
            self.m[i] = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?;
            self.v[i] = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let mh = (&self.m[i] / (1.0 - b1.powi(t)))?;
            let vh = (&self.v[i] / (1.0 - b2.powi(t)))?;
            let upd = (mh / (vh.sqrt()? + self.eps)?)?;
            let w = var.as_tensor();
            let new = ((w * (1.0 - lr * self.weight_decay))? - (upd * lr)?)?;
            var.set(&new)?;
        }
        Ok(())
    }

    /// Moments and step under `opt.*` names, beside the heads.
    fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut map = HashMap::new();
        for (i, (m, v)) in self.m.iter().zip(&self.v).enumerate() {
            map.insert(format!("opt.m.{i}"), m.to_device(&Device::Cpu)?);
            map.insert(format!("opt.v.{i}"), v.to_device(&Device::Cpu)?);
        }
        map.insert(
            "opt.step".into(),
            Tensor::new(&[self.step as u32], &Device::Cpu)?,
        );
        Ok(map)
    }
}

/// A training checkpoint: heads (f32) and optimiser state, resumable with [`load_checkpoint`].
pub fn save_checkpoint(path: &Path, heads: &Heads, opt: &AdamW) -> Result<()> {
    let mut map = opt.state()?;
    for (i, (a, b)) in heads.fc1.iter().zip(&heads.fc2).enumerate() {
        map.insert(format!("fc1.{i}"), a.as_tensor().to_device(&Device::Cpu)?);
        map.insert(format!("fc2.{i}"), b.as_tensor().to_device(&Device::Cpu)?);
    }
    let tmp = path.with_extension("tmp");
    candle_core::safetensors::save(&map, &tmp)
        .with_context(|| format!("cannot write checkpoint {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// Restores heads and optimiser from a checkpoint written by [`save_checkpoint`].
pub fn load_checkpoint(path: &Path, heads: &Heads, opt: &mut AdamW, dev: &Device) -> Result<()> {
    let map = candle_core::safetensors::load(path, dev)
        .with_context(|| format!("cannot read checkpoint {}", path.display()))?;
    let get = |k: String| {
        map.get(&k)
            .cloned()
            .with_context(|| format!("checkpoint {} has no '{k}'", path.display()))
    };
    for (i, (a, b)) in heads.fc1.iter().zip(&heads.fc2).enumerate() {
        let (ta, tb) = (get(format!("fc1.{i}"))?, get(format!("fc2.{i}"))?);
        if ta.dims() != a.dims() || tb.dims() != b.dims() {
            bail!(
                "checkpoint {} is for other shapes (layer {i}: {:?} vs {:?})",
                path.display(),
                ta.dims(),
                a.dims()
            );
        }
        a.set(&ta)?;
        b.set(&tb)?;
    }
    for i in 0..opt.m.len() {
        opt.m[i] = get(format!("opt.m.{i}"))?;
        opt.v[i] = get(format!("opt.v.{i}"))?;
    }
    opt.step = get("opt.step".into())?
        .to_device(&Device::Cpu)?
        .to_vec1::<u32>()?[0] as usize;
    Ok(())
}

/// Training records: JSONL `{"prompt": ..., "answer": ...}` (or `{"messages": [...]}` whose last
/// message is the assistant's answer) from `files`, chat-formatted by the model's template.
pub fn read_jsonl(
    tok: &apb_loaders::Tokenizer,
    files: &[PathBuf],
    max_len: usize,
) -> Result<Vec<Record>> {
    use apb_loaders::ChatMessage;
    let mut out = Vec::new();
    for f in files {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
        for (n, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not JSON", f.display(), n + 1))?;
            let (messages, answer) = if let Some(p) = v["prompt"].as_str() {
                let a = v["answer"]
                    .as_str()
                    .with_context(|| format!("{}:{}: no 'answer'", f.display(), n + 1))?;
                (vec![ChatMessage::user(p)], a.to_string())
            } else if let Some(m) = v["messages"].as_array() {
                let mut msgs: Vec<ChatMessage> =
                    serde_json::from_value(serde_json::Value::Array(m.clone()))
                        .with_context(|| format!("{}:{}: bad 'messages'", f.display(), n + 1))?;
                let last = msgs
                    .pop()
                    .filter(|m| m.role == "assistant")
                    .with_context(|| {
                        format!(
                            "{}:{}: the last message must be the assistant's answer",
                            f.display(),
                            n + 1
                        )
                    })?;
                (msgs, last.content)
            } else {
                bail!(
                    "{}:{}: needs 'prompt' and 'answer', or 'messages'",
                    f.display(),
                    n + 1
                );
            };
            out.push(
                chat_record(tok, &messages, &answer, max_len)
                    .with_context(|| format!("{}:{}", f.display(), n + 1))?,
            );
        }
    }
    Ok(out)
}

/// Answer tokens kept per record.
const MAX_ANSWER_TOKENS: usize = 512;

/// The model's chat template around `messages` (generation prompt included), then `answer` (its
/// first `MAX_ANSWER_TOKENS`); the prompt is cut from the front to `max_len` tokens.
pub fn chat_record(
    tok: &apb_loaders::Tokenizer,
    messages: &[apb_loaders::ChatMessage],
    answer: &str,
    max_len: usize,
) -> Result<Record> {
    let text = tok.apply_chat_template(messages)?;
    let mut prompt = tok.encode(&text)?;
    if prompt.len() > max_len {
        prompt.drain(..prompt.len() - max_len);
    }
    let mut answer = tok.encode_plain(answer)?;
    if answer.is_empty() {
        bail!("the answer is empty");
    }
    // Labels take the max over answer queries: a few hundred tokens say all they can.
    answer.truncate(MAX_ANSWER_TOKENS);
    Ok(Record { prompt, answer })
}

/// `n` synthetic records from the task generator (tasks cycled, seeds from `seed`), documents of
/// about `tokens` tokens.
pub fn synthetic(
    tok: &apb_loaders::Tokenizer,
    n: usize,
    tokens: usize,
    seed: u64,
    max_len: usize,
) -> Result<Vec<Record>> {
    Ok(synthetic_cases(tok, n, tokens, seed, max_len)?
        .into_iter()
        .map(|(r, _)| r)
        .collect())
}

/// [`synthetic`]'s records with the rows of the question's last copy in each prompt (what the
/// training-free scorer reads; None where the question's own tokens do not appear as such).
pub fn synthetic_cases(
    tok: &apb_loaders::Tokenizer,
    n: usize,
    tokens: usize,
    seed: u64,
    max_len: usize,
) -> Result<Vec<(Record, Option<std::ops::Range<usize>>)>> {
    let prose = tasks::prose_corpus().unwrap_or_default();
    let names: Vec<&str> = tasks::TASKS
        .iter()
        .copied()
        .filter(|t| *t != "niah_prose" || !prose.is_empty())
        .collect();
    (0..n)
        .map(|i| {
            let c = tasks::generate(
                names[i % names.len()],
                seed.wrapping_add(i as u64),
                tokens.saturating_mul(4),
                &prose,
            )?;
            // The question before the document too (Locret-Q): under APB the anchor carries the
            // question, so the keys a rank scores have seen it.
            let msg = apb_loaders::ChatMessage::user(&format!(
                "{}\n\n{}\n\n{}",
                c.question, c.document, c.question
            ));
            let rec = chat_record(tok, &[msg], &c.answers.join(", "), max_len)?;
            let q = tok.encode_plain(&c.question)?;
            let at = (0..rec.prompt.len().saturating_sub(q.len()) + 1)
                .rev()
                .find(|&i| rec.prompt[i..].starts_with(&q));
            Ok((rec, at.map(|a| a..a + q.len())))
        })
        .collect()
}

/// How well each scorer ranks the keys the answer attends to: per scorer, the mean over cases,
/// layers and KV heads of the top-10 % overlap between its scores and the Locret labels (the
/// training metric), on `cases` with their question rows.
pub fn scorer_overlap(
    model: &Model,
    cases: &[(Record, std::ops::Range<usize>)],
    scorers: &[&Scorer],
) -> Result<Vec<f64>> {
    let c = &model.cfg;
    let (n_h, n_kv, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
    let mut sums = vec![0.0; scorers.len()];
    let mut count = 0usize;
    for (rec, rows) in cases {
        let ex = example(model, rec)?;
        for (l, (feats, labels)) in ex.layers.iter().enumerate() {
            let f = feats.unsqueeze(0)?;
            let q = f.narrow(2, 0, n_h * d)?;
            let k = f.narrow(2, n_h * d, n_kv * d)?;
            let v = f.narrow(2, (n_h + n_kv) * d, n_kv * d)?;
            let mut cols = 0;
            for (sum, scorer) in sums.iter_mut().zip(scorers) {
                let sc = scorer.score(l, &q, &k, &v, n_kv, rows.clone())?;
                let (o, c) = top_overlap(&sc, labels, 0.1)?;
                *sum += o;
                cols = c;
            }
            count += cols;
        }
    }
    Ok(sums.iter().map(|s| s / count.max(1) as f64).collect())
}

/// What `apb train-heads` does.
pub struct TrainConfig {
    /// Training records, cycled in order.
    pub records: Vec<Record>,
    /// Where the heads go.
    pub out: PathBuf,
    /// Optimiser steps.
    pub steps: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Warm-up steps.
    pub warmup: usize,
    /// Hidden width of the heads.
    pub hidden: usize,
    /// Weight of the smoothness term.
    pub alpha: f64,
    /// Seed of the initial weights.
    pub seed: u64,
    /// Resumable checkpoint (heads and optimiser).
    pub checkpoint: PathBuf,
    /// Checkpoint every this many steps.
    pub save_every: usize,
    /// Dtype of the saved heads.
    pub save_dtype: DType,
}

/// Trains heads for `model` over `cfg.records` (cycled in order), resuming from the checkpoint if
/// one is there; returns the last loss and top-10 % overlap.
pub fn train(model: &Model, cfg: &TrainConfig) -> Result<(f64, f64)> {
    if cfg.records.is_empty() {
        bail!("no training records");
    }
    let c = &model.cfg;
    let dev = model.device().clone();
    let in_dim = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim;
    let heads = Heads::new(
        c.num_hidden_layers,
        in_dim,
        cfg.hidden,
        c.num_key_value_heads,
        cfg.seed,
        &dev,
    )?;
    let mut opt = AdamW::new(&heads, cfg.lr, cfg.warmup, cfg.steps)?;
    if cfg.checkpoint.exists() {
        load_checkpoint(&cfg.checkpoint, &heads, &mut opt, &dev)?;
        if opt.step >= cfg.steps {
            bail!(
                "the checkpoint {} is already at step {} of --steps {}: raise --steps to train on, or delete it to start over",
                cfg.checkpoint.display(),
                opt.step,
                cfg.steps
            );
        }
        eprintln!(
            "resuming from {} at step {}",
            cfg.checkpoint.display(),
            opt.step
        );
    }
    let bar = indicatif::ProgressBar::new(cfg.steps as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps {elapsed_precise} (eta {eta}) {msg}",
        )
        .expect("template"),
    );
    bar.set_position(opt.step as u64);
    let (mut last_loss, mut last_overlap) = (f64::NAN, f64::NAN);
    while opt.step < cfg.steps {
        let rec = &cfg.records[opt.step % cfg.records.len()];
        let ex = example(model, rec)?;
        let (l, overlap) = loss(&heads, &ex, cfg.alpha)?;
        last_loss = l.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        last_overlap = overlap;
        if !last_loss.is_finite() {
            bail!("the loss is {last_loss} at step {}", opt.step);
        }
        opt.step(&heads, &l)?;
        bar.set_message(format!(
            "loss {last_loss:.4}  top-10% overlap {:.1}%  lr {:.2e}",
            100.0 * overlap,
            opt.rate()
        ));
        bar.inc(1);
        if bar.is_hidden() && (opt.step % 10 == 0 || opt.step == cfg.steps) {
            eprintln!(
                "step {}/{}: loss {last_loss:.4}, top-10% overlap {:.1}%",
                opt.step,
                cfg.steps,
                100.0 * overlap
            );
        }
        if opt.step % cfg.save_every.max(1) == 0 || opt.step == cfg.steps {
            save_checkpoint(&cfg.checkpoint, &heads, &opt)?;
        }
    }
    bar.finish();
    heads.save(&cfg.out, cfg.save_dtype)?;
    Ok((last_loss, last_overlap))
}
