//! The backend every sequence-parallel [`Method`] runs on each rank. One instance per rank per
//! request; ranks talk only through a [`Communicator`].
//!
//! Prefill: rank `h` runs `[anchor | local | probe]` rows (see [`RankLayout`]) through the
//! method's attention; the cache keeps the local rows only (padding trimmed). Decode (the question
//! segment and generated tokens), the same for every method: every rank runs the new tokens,
//! attends its own cache (all of it precedes them), and the outputs are merged by log-sum-exp.
//! The question segment's KV stays on the last rank (its rows attend each other causally there);
//! generated tokens' KV goes round robin over the ranks ([`generated_kv_rank`]), so a long
//! generation does not pile up on one rank.

use super::{Method, PrefillCtx};
use crate::comm::Communicator;
use crate::scorer::Scorer;
use crate::{attention_with_lse, Mask};
use crate::{AttentionBackend, AttnInput, Error, LayerKv, Phase, Result};
use candle_core::Tensor;
use std::sync::Arc;

/// Where this rank's prefill rows come from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RankLayout {
    /// Anchor rows at the front (Star and APB on ranks > 0).
    pub anchor: usize,
    /// Local rows (the rank's share of the context), padding included.
    pub local: usize,
    /// Padding rows at the end of the local rows.
    pub pad: usize,
    /// Extra rows after the local block whose KV is dropped (rank 0's question probe).
    pub probe: usize,
    /// Passing length per rank and KV head (`apb`).
    pub l_p: usize,
    /// Rows excluded from selection at the front: the anchor, or on rank 0 its first `l_a` tokens.
    pub exclude_front: usize,
    /// Rows holding the clean question (training-free scorer).
    pub question_rows: std::ops::Range<usize>,
    /// How the question segment attends this rank's cache on a non-last rank.
    pub question_mask: QuestionMask,
}

/// How the question segment (several new rows at once) attends a non-last rank's cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuestionMask {
    /// Every question row sees all of the rank's context, which all precedes the question: the
    /// exact semantics, and what a single decode token gets under either mask.
    #[default]
    Full,
    /// Bottom-right-aligned causal, as thunlp/APB does (inherited from Star Attention's code):
    /// question row `i` of `q` misses the rank's last `q − 1 − i` keys. For one-to-one
    /// comparisons with the reference only.
    Causal,
}

impl QuestionMask {
    /// `full` or `causal`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "full" => Ok(Self::Full),
            "causal" => Ok(Self::Causal),
            _ => Err(Error::Config(format!(
                "unknown question mask '{s}' (use full or causal)"
            ))),
        }
    }
}

impl RankLayout {
    /// Prefill rows of the rank: anchor, local and probe.
    pub fn rows(&self) -> usize {
        self.anchor + self.local + self.probe
    }
}

/// One rank's backend for one request.
pub struct RankBackend {
    method: Method,
    comm: Arc<dyn Communicator>,
    layout: RankLayout,
    scorer: Scorer,
}

impl RankBackend {
    /// The backend of rank `comm.rank()` for one request of `method`.
    pub fn new(
        method: Method,
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
            method,
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
        let ctx = PrefillCtx {
            comm: self.comm.as_ref(),
            layout: &self.layout,
            scorer: &self.scorer,
        };
        let out = self.method.imp().prefill(&ctx, x)?;
        self.keep_local(x, cache)?;
        Ok(out)
    }

    fn is_last(&self) -> bool {
        self.comm.rank() + 1 == self.comm.world_size()
    }

    /// The question segment (the model's decode pass outside batched steps): the last rank keeps
    /// its K/V.
    fn decode(&self, x: &AttnInput<'_>, cache: &mut LayerKv) -> Result<Tensor> {
        let (out, lse) = self.decode_part(x, cache, self.is_last())?;
        Ok(gather_merge(self.comm.as_ref(), &out, &lse)?.to_dtype(x.q.dtype())?)
    }
}

impl AttentionBackend for RankBackend {
    fn name(&self) -> &str {
        self.method.name()
    }
    fn forward(&self, phase: Phase, x: &AttnInput<'_>, cache: &mut LayerKv) -> Result<Tensor> {
        match phase {
            Phase::Prefill => self.prefill(x, cache),
            Phase::Decode => self.decode(x, cache),
        }
    }

    /// Every rank's rows see all its keys: a single new row is past every cached position, so
    /// even the reference's causal question mask sees them all.
    fn fuses_decode_rows(&self) -> bool {
        true
    }

    fn decode_part(
        &self,
        x: &AttnInput<'_>,
        cache: &mut LayerKv,
        keep: bool,
    ) -> Result<(Tensor, Tensor)> {
        // Every new row follows all of this rank's context: no mask where it keeps none of the
        // new rows (unless the reference's causal quirk is asked for on a non-last rank).
        let unkept = match self.layout.question_mask {
            QuestionMask::Causal => Mask::causal(),
            QuestionMask::Full => Mask::full(),
        };
        decode_over_cache(x, cache, keep, unkept)
    }
}

/// A decode part over one rank's cache: the rows' K/V appended first where `keep` (then the rows
/// are its last positions and bottom-right causal lets the question segment's rows see each
/// other in order and a generated row every key), else attended under `unkept`; nothing cached:
/// output 0, LSE `-inf`.
pub(crate) fn decode_over_cache(
    x: &AttnInput<'_>,
    cache: &mut LayerKv,
    keep: bool,
    unkept: Mask,
) -> Result<(Tensor, Tensor)> {
    if keep {
        cache.append(x.k, x.v)?;
    }
    let Some((k, v)) = cache.kv()? else {
        return nothing_attended(x.q);
    };
    let mask = if keep { Mask::causal() } else { unkept };
    Ok(attention_with_lse(x.q, &k, &v, mask)?)
}

/// The rank, of a sequence's `world` ranks, that keeps the K/V of the `j`-th generated token fed
/// back (`j` from 0): round robin, so `max_tokens`' KV spreads evenly over the sequence's ranks.
pub fn generated_kv_rank(j: usize, world: usize) -> usize {
    j % world.max(1)
}

/// The new tokens' K/V positions that rank `rank` (< `world`) keeps for a sequence whose
/// question segment has `question` rows and which generates up to `max_new` tokens: the question
/// on the last rank, the generated tokens by [`generated_kv_rank`]. What a host that spreads
/// generated tokens so allocates and admits beside the rank's share of the prompt (a host that
/// decodes through `forward(Phase::Decode)` keeps every new row on the last rank instead).
pub fn new_kv_rows(rank: usize, world: usize, question: usize, max_new: usize) -> usize {
    let world = world.max(1);
    let q = if rank + 1 == world { question } else { 0 };
    q + (max_new + world - 1 - rank.min(world - 1)) / world
}

/// The part of a rank that holds no keys for these rows: output 0, LSE `-inf` (weight 0).
pub fn nothing_attended(q: &Tensor) -> Result<(Tensor, Tensor)> {
    let (b, h, s, _) = q.dims4()?;
    Ok((
        q.zeros_like()?,
        Tensor::full(f32::NEG_INFINITY, (b, h, s), q.device())?,
    ))
}

/// Every rank's part of decode rows (`out` `(b, h, s, d)`, `lse` `(b, h, s)`) in one
/// all-gather (packed in f32 as `(b, h, s, d + 1)`), merged by log-sum-exp: the merged output
/// (f32), the same on every rank.
pub fn gather_merge(comm: &dyn Communicator, out: &Tensor, lse: &Tensor) -> Result<Tensor> {
    let d = out.dim(3)?;
    let packed = Tensor::cat(
        &[
            out.to_dtype(candle_core::DType::F32)?,
            lse.to_dtype(candle_core::DType::F32)?.unsqueeze(3)?,
        ],
        3,
    )?;
    let all = comm.all_gather(&packed)?;
    let outs = all
        .iter()
        .map(|t| t.narrow(3, 0, d))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let lses = all
        .iter()
        .map(|t| t.narrow(3, d, 1)?.squeeze(3))
        .collect::<candle_core::Result<Vec<_>>>()?;
    merge_lse(&outs, &lses)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The rows each rank allocates for new tokens hold exactly the question segment and every
    /// generated token the round robin sends it, and the ranks' shares differ by at most one.
    #[test]
    fn new_tokens_kv_spreads_over_ranks_as_allocated() {
        for world in 1..=5 {
            for question in [0, 1, 7] {
                for max_new in [1, 2, 5, 9, 128] {
                    let mut kept = vec![0; world];
                    kept[world - 1] += question;
                    for j in 0..max_new {
                        kept[generated_kv_rank(j, world)] += 1;
                    }
                    let rows: Vec<usize> = (0..world)
                        .map(|h| new_kv_rows(h, world, question, max_new))
                        .collect();
                    assert_eq!(
                        rows, kept,
                        "world {world} question {question} max {max_new}"
                    );
                    let generated: Vec<usize> = (0..world)
                        .map(|h| rows[h] - if h + 1 == world { question } else { 0 })
                        .collect();
                    let (lo, hi) = (generated.iter().min(), generated.iter().max());
                    assert!(hi.unwrap() - lo.unwrap() <= 1, "{generated:?}");
                }
            }
        }
    }
}
