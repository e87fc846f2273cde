//! Sequence-parallel backends, side by side with one signature: `ring` (exact), `star` (Star
//! Attention: anchor, no passing) and `apb` (anchor with the question + passing blocks chosen by a
//! scorer). One instance per rank per request; ranks talk only through a [`Communicator`].
//!
//! Prefill: rank `h` runs `[anchor | local | probe]` rows (see [`RankLayout`]); the cache keeps
//! the local block only (padding trimmed). Decode (the question segment and generated tokens):
//! every rank runs the new tokens, attends its own cache, and the outputs are merged by
//! log-sum-exp; only the last rank appends the new tokens' KV.

use crate::comm::Communicator;
use crate::profile::span;
use crate::scorer::{select_top, Scorer};
use crate::{attention, Mask};
use crate::{AttentionBackend, AttnInput, Error, LayerKv, Phase, Result};
use candle_core::{DType, Tensor, D};
use std::sync::Arc;

/// Where this rank's prefill rows come from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RankLayout {
    /// Anchor rows at the front (0 on rank 0 and for `ring`).
    pub anchor: usize,
    /// Local block rows, padding included.
    pub local: usize,
    /// Padding rows at the end of the local block (last rank).
    pub pad: usize,
    /// Extra rows after the local block whose KV is dropped (rank 0's question probe).
    pub probe: usize,
    /// Passing length per rank and KV head (`apb`).
    pub l_p: usize,
    /// Rows excluded from selection at the front: the anchor, or on rank 0 its first `l_a` tokens.
    pub exclude_front: usize,
    /// Rows holding the clean question (training-free scorer).
    pub question_rows: std::ops::Range<usize>,
}

impl RankLayout {
    pub fn rows(&self) -> usize {
        self.anchor + self.local + self.probe
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Ring,
    Star,
    Apb,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Ring => "ring",
            Kind::Star => "star",
            Kind::Apb => "apb",
        }
    }
}

/// One rank's backend for one request.
pub struct RankBackend {
    kind: Kind,
    comm: Arc<dyn Communicator>,
    layout: RankLayout,
    scorer: Scorer,
}

impl RankBackend {
    pub fn new(
        kind: Kind,
        comm: Arc<dyn Communicator>,
        layout: RankLayout,
        scorer: Scorer,
    ) -> Result<Self> {
        if layout.pad > layout.local || layout.exclude_front > layout.rows() {
            return Err(Error::Config(format!(
                "inconsistent rank layout {layout:?}"
            )));
        }
        Ok(Self {
            kind,
            comm,
            layout,
            scorer,
        })
    }

    fn check_rows(&self, q: &Tensor) -> Result<()> {
        let s = q.dim(2)?;
        if s != self.layout.rows() {
            return Err(Error::Shape(format!(
                "rank {} got {s} prefill rows, its layout has {}",
                self.comm.rank(),
                self.layout.rows()
            )));
        }
        Ok(())
    }

    /// Keeps the real local tokens' KV in the cache.
    fn keep_local(&self, x: &AttnInput<'_>, cache: &mut LayerKv) -> Result<()> {
        let l = &self.layout;
        let n = l.local - l.pad;
        if n > 0 {
            cache.append(&x.k.narrow(2, l.anchor, n)?, &x.v.narrow(2, l.anchor, n)?)?;
        }
        Ok(())
    }

    fn prefill(&self, x: &AttnInput<'_>, cache: &mut LayerKv) -> Result<Tensor> {
        self.check_rows(x.q)?;
        let rank = self.comm.rank();
        let out = match self.kind {
            Kind::Star => {
                span("attention", x.q.device(), || {
                    attention(x.q, x.k, x.v, Mask::causal(), false)
                })?
                .0
            }
            Kind::Ring => ring_prefill(self.comm.as_ref(), x)?,
            Kind::Apb => {
                let l = &self.layout;
                let n_kv = x.k.dim(1)?;
                let dev = x.q.device();
                let scores = span("retaining_heads", dev, || {
                    self.scorer.score(
                        x.layer,
                        x.q_raw,
                        x.k_raw,
                        x.v_raw,
                        n_kv,
                        l.question_rows.clone(),
                    )
                })?;
                let picks = span("topk", dev, || {
                    select_top(&scores, l.exclude_front..l.anchor + l.local - l.pad, l.l_p)
                })?;
                if rank + 1 < self.comm.world_size()
                    && l.anchor + l.local - l.pad - l.exclude_front < l.l_p
                {
                    return Err(Error::Config(format!(
                        "rank {rank} has fewer candidates than l_p = {}",
                        l.l_p
                    )));
                }
                // (1, n_kv, l_p, 2d): per KV head its own positions, post-RoPE K next to V.
                let packed = span("topk", dev, || apb_kernels::gather_kv(x.k, x.v, &picks))?;
                let all = span("communication", dev, || self.comm.all_gather(&packed))?;
                if rank == 0 || l.l_p == 0 {
                    span("attention", dev, || {
                        attention(x.q, x.k, x.v, Mask::causal(), false)
                    })?
                    .0
                } else {
                    let passing = Tensor::cat(&all[..rank], 2)?;
                    let d = x.k.dim(3)?;
                    let k =
                        Tensor::cat(&[&passing.narrow(3, 0, d)?.to_dtype(x.k.dtype())?, x.k], 2)?;
                    let v =
                        Tensor::cat(&[&passing.narrow(3, d, d)?.to_dtype(x.v.dtype())?, x.v], 2)?;
                    span("attention", dev, || {
                        attention(x.q, &k, &v, Mask::apb(l.anchor, rank * l.l_p), false)
                    })?
                    .0
                }
            }
        };
        self.keep_local(x, cache)?;
        Ok(out)
    }

    fn decode(&self, x: &AttnInput<'_>, cache: &mut LayerKv) -> Result<Tensor> {
        let last = self.comm.rank() + 1 == self.comm.world_size();
        let (out, lse) = if last {
            cache.append(x.k, x.v)?;
            let (k, v) = cache
                .kv()?
                .ok_or_else(|| Error::Shape("empty cache after append".into()))?;
            attention(x.q, &k, &v, Mask::causal(), true)?
        } else {
            match cache.kv()? {
                // Every new token follows all of a non-last rank's context: no mask.
                Some((k, v)) => attention(x.q, &k, &v, Mask::full(), true)?,
                None => {
                    let (b, h, s, _) = x.q.dims4()?;
                    (
                        x.q.zeros_like()?,
                        Some(Tensor::full(f32::NEG_INFINITY, (b, h, s), x.q.device())?),
                    )
                }
            }
        };
        let lse = lse.ok_or_else(|| Error::Shape("attention returned no LSE".into()))?;
        let outs = self.comm.all_gather(&out.to_dtype(DType::F32)?)?;
        let lses = self.comm.all_gather(&lse)?;
        Ok(merge_lse(&outs, &lses)?.to_dtype(x.q.dtype())?)
    }
}

impl AttentionBackend for RankBackend {
    fn name(&self) -> &str {
        self.kind.name()
    }
    fn forward(&self, phase: Phase, x: &AttnInput<'_>, cache: &mut LayerKv) -> Result<Tensor> {
        match phase {
            Phase::Prefill => self.prefill(x, cache),
            Phase::Decode => self.decode(x, cache),
        }
    }
}

/// Exact sequence parallelism: every rank's K/V block reaches every later rank (here by one
/// all-gather), each rank attends its queries to the blocks before it (no mask) and its own
/// (causal), merging block results by log-sum-exp as ring attention does.
fn ring_prefill(comm: &dyn Communicator, x: &AttnInput<'_>) -> Result<Tensor> {
    let rank = comm.rank();
    let d = x.k.dim(3)?;
    let dev = x.q.device();
    let kv = Tensor::cat(&[x.k, x.v], D::Minus1)?;
    let blocks = span("communication", dev, || comm.all_gather(&kv))?;
    let mut outs = Vec::with_capacity(rank + 1);
    let mut lses = Vec::with_capacity(rank + 1);
    for (src, kv) in blocks.iter().enumerate().take(rank + 1) {
        let (k, v) = (kv.narrow(3, 0, d)?, kv.narrow(3, d, d)?);
        let mask = if src == rank {
            Mask::causal()
        } else {
            Mask::full()
        };
        let (o, l) = span("attention", dev, || attention(x.q, &k, &v, mask, true))?;
        outs.push(o.to_dtype(DType::F32)?);
        lses.push(l.ok_or_else(|| Error::Shape("no LSE".into()))?);
    }
    Ok(merge_lse(&outs, &lses)?.to_dtype(x.q.dtype())?)
}

/// Log-sum-exp merge of partial attention results (f32): `outs[i]` `(b, h, s, d)`,
/// `lses[i]` `(b, h, s)`. Parts with LSE `-inf` (nothing attended) get weight 0; a row no part
/// attended to comes out 0.
pub fn merge_lse(outs: &[Tensor], lses: &[Tensor]) -> Result<Tensor> {
    let dims = outs
        .first()
        .ok_or_else(|| Error::Shape("merge_lse of no parts".into()))?
        .dims4()?;
    let (b, h, s, d) = dims;
    let o = Tensor::stack(outs, 0)?.reshape((outs.len(), b * h * s, d))?;
    let l = Tensor::stack(lses, 0)?.reshape((lses.len(), b * h * s))?;
    let (out, _) = apb_kernels::lse_merge(&o, &l)?;
    Ok(out.reshape(dims)?)
}
