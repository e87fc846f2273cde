//! `ring` (exact): contiguous blocks; every rank's K/V block reaches every later rank (here by one
//! all-gather), each rank attends its queries to the blocks before it (no mask) and to its own
//! (causal), merging block results by log-sum-exp as ring attention does.
//!
//! Kept as the simple exact reference (and the baseline of the APB paper). Under a causal mask it
//! is unbalanced: the last rank attends 2H−1 times the first rank's pairs, and all ranks wait for
//! it; `zigzag` does the same work balanced.

use super::{
    block_inputs, block_plan, tri, PlanArgs, PrefillCtx, PromptParts, RankInputs, SeqMethod,
};
use super::{Parts, RankLayout};
use crate::plan::Plan;
use crate::profile::{span, Bucket};
use crate::scorer::Scorer;
use crate::{attention_with_lse, AttnInput, Mask, Result};
use candle_core::{Tensor, D};

pub struct Ring;

impl SeqMethod for Ring {
    fn name(&self) -> &'static str {
        "ring"
    }
    fn exact(&self) -> bool {
        true
    }
    fn plan(&self, parts: &PromptParts, a: &PlanArgs) -> Result<Plan> {
        block_plan(parts, a.world)
    }
    fn rank_inputs(&self, parts: &PromptParts, p: &Plan, h: usize, _s: &Scorer) -> RankInputs {
        block_inputs(parts, p, h)
    }
    fn prefill(&self, r: &PrefillCtx<'_>, x: &AttnInput<'_>) -> Result<Tensor> {
        let rank = r.comm.rank();
        let d = x.k.dim(3)?;
        let dev = x.q.device();
        let kv = Tensor::cat(&[x.k, x.v], D::Minus1)?;
        let blocks = span(Bucket::Communication, dev, || r.comm.all_gather(&kv))?;
        let mut parts = Parts::default();
        for (src, kv) in blocks.iter().enumerate().take(rank + 1) {
            let (k, v) = (kv.narrow(3, 0, d)?, kv.narrow(3, d, d)?);
            let mask = if src == rank {
                Mask::causal()
            } else {
                Mask::full()
            };
            let (o, l) = span(Bucket::Attention, dev, || {
                attention_with_lse(x.q, &k, &v, mask)
            })?;
            parts.push(o, l)?;
        }
        Ok(parts.merge()?.to_dtype(x.q.dtype())?)
    }
    fn pairs(&self, _plan: &Plan, l: &RankLayout, h: usize) -> f64 {
        (h * l.local * l.local) as f64 + tri(l.local)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{causal_pairs_from_positions, parts};
    use super::super::Method;
    use super::*;

    #[test]
    fn ring_is_unbalanced() {
        // The imbalance zigzag removes: the last of 4 ranks attends ~7× the first's pairs.
        let p = parts(4096, 0);
        let args = PlanArgs {
            world: 4,
            ..Default::default()
        };
        let plan = Ring.plan(&p, &args).unwrap();
        let work: Vec<f64> = (0..4)
            .map(|h| {
                causal_pairs_from_positions(&Method::RING.imp().rank_inputs(
                    &p,
                    &plan,
                    h,
                    &Scorer::QueryAware,
                ))
            })
            .collect();
        let ratio = work[3] / work[0];
        assert!((6.9..7.1).contains(&ratio), "{work:?}");
    }
}
