//! Which KV a rank passes on: retaining-head scores (Locret MLPs on pre-RoPE q|k|v) or, without
//! trained heads, a training-free query-aware score; then max-pool 5 and top-`l_p` per KV head.

use crate::{Error, Result};
use candle_core::{DType, Tensor, D};
use std::sync::Arc;

/// Per-layer Locret retaining heads: `fc2(SiLU(fc1([q|k|v])))`, no biases.
#[derive(Debug)]
pub struct RetainingHeads {
    /// `(fc1 (hidden, in), fc2 (n_kv, hidden))` per layer.
    layers: Vec<(Tensor, Tensor)>,
}

impl RetainingHeads {
    /// Checks every layer's shapes against the model: `fc1: (_, (n_h + 2·n_kv)·d)`,
    /// `fc2: (n_kv, fc1 rows)`.
    pub fn new(
        layers: Vec<(Tensor, Tensor)>,
        n_layers: usize,
        n_h: usize,
        n_kv: usize,
        d: usize,
    ) -> Result<Self> {
        if layers.len() != n_layers {
            return Err(Error::Config(format!(
                "retaining heads have {} layers, the model has {n_layers}",
                layers.len()
            )));
        }
        let in_dim = (n_h + 2 * n_kv) * d;
        for (i, (fc1, fc2)) in layers.iter().enumerate() {
            let (h1, i1) = fc1.dims2()?;
            let (o2, h2) = fc2.dims2()?;
            if i1 != in_dim || h2 != h1 || o2 != n_kv {
                return Err(Error::Config(format!(
                    "retaining head layer {i}: fc1 {:?}, fc2 {:?}; the model needs fc1 (_, {in_dim}) and fc2 ({n_kv}, fc1 rows)",
                    fc1.dims(),
                    fc2.dims()
                )));
            }
        }
        Ok(Self { layers })
    }

    /// Scores `(seq, n_kv)` (f32) for batch 0 from the raw projections `(1, seq, ·)`.
    pub fn score(
        &self,
        layer: usize,
        q_raw: &Tensor,
        k_raw: &Tensor,
        v_raw: &Tensor,
    ) -> Result<Tensor> {
        let (fc1, fc2) = &self.layers[layer];
        let x = Tensor::cat(&[q_raw, k_raw, v_raw], D::Minus1)?
            .squeeze(0)?
            .to_dtype(fc1.dtype())?;
        let h = x.matmul(&fc1.t()?)?;
        let h = h.silu()?;
        Ok(h.matmul(&fc2.t()?)?.to_dtype(DType::F32)?)
    }
}

/// The score a rank ranks its KV by.
#[derive(Debug, Clone)]
pub enum Scorer {
    /// Trained Locret heads.
    Heads(Arc<RetainingHeads>),
    /// Training-free: per KV head, mean over the question's query vectors (all query heads of
    /// the group) of `q·k`, on pre-RoPE projections so relative position plays no part.
    QueryAware,
}

impl Scorer {
    /// Name for logs and results.
    pub fn name(&self) -> &'static str {
        match self {
            Scorer::Heads(_) => "retaining-heads",
            Scorer::QueryAware => {
                "training-free selector (query-aware; not the paper's retaining heads)"
            }
        }
    }

    /// Scores `(seq, n_kv)` f32. `question_rows` are the rows of this rank's sequence that hold
    /// the question (QueryAware; empty → all zeros).
    pub fn score(
        &self,
        layer: usize,
        q_raw: &Tensor,
        k_raw: &Tensor,
        v_raw: &Tensor,
        n_kv: usize,
        question_rows: std::ops::Range<usize>,
    ) -> Result<Tensor> {
        match self {
            Scorer::Heads(h) => h.score(layer, q_raw, k_raw, v_raw),
            Scorer::QueryAware => {
                let (_, s, hd) = k_raw.dims3()?;
                let d = hd / n_kv;
                if question_rows.is_empty() {
                    return Ok(Tensor::zeros((s, n_kv), DType::F32, k_raw.device())?);
                }
                let n_h = q_raw.dim(2)? / d;
                let g = n_h / n_kv;
                let q = q_raw
                    .squeeze(0)?
                    .narrow(0, question_rows.start, question_rows.len())?
                    .to_dtype(DType::F32)?;
                // (t, n_kv, g, d) → mean over t and g → (n_kv, d)
                let q_mean = q
                    .reshape((question_rows.len(), n_kv, g, d))?
                    .mean(2)?
                    .mean(0)?;
                let k = k_raw
                    .squeeze(0)?
                    .to_dtype(DType::F32)?
                    .reshape((s, n_kv, d))?
                    .transpose(0, 1)?
                    .contiguous()?; // (n_kv, s, d)
                let sc = k.matmul(&q_mean.unsqueeze(2)?)?.squeeze(2)?; // (n_kv, s)
                Ok(sc.t()?.contiguous()?)
            }
        }
    }
}

/// Max-pool (kernel 5, stride 1, padding 2) along the sequence, then the top `l_p` positions of
/// `candidates` per KV head. `scores` is `(seq, n_kv)`; returns `(n_kv, l_p)` u32 positions in
/// ascending order, on the scores' device (CUDA kernels on GPUs). If a head has fewer candidates
/// than `l_p`, the list is padded by repeating its last pick (only the last rank can be short, and
/// nobody reads its block).
pub fn select_top(
    scores: &Tensor,
    candidates: std::ops::Range<usize>,
    l_p: usize,
) -> Result<Tensor> {
    let pooled = apb_kernels::pool5_mask(scores, candidates.start, candidates.end)?;
    Ok(apb_kernels::topk_positions(
        &pooled,
        candidates.start,
        candidates.end,
        l_p,
    )?)
}
