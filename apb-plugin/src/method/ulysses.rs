//! `ulysses` (exact; DeepSpeed-Ulysses): contiguous blocks; one all-to-all turns each rank's
//! q/k/v for its rows and all heads into all rows for `1/H` of the heads, every rank runs full
//! causal attention on its heads, and a second all-to-all brings each rank its rows back for all
//! heads. Balanced by construction; moves q, k, v and the output once each.
//!
//! The KV heads are split over ranks, so their number must divide by the ranks (GQA groups stay
//! whole); where it does not, `zigzag` runs exactly on any rank count.

use super::RankLayout;
use super::{
    block_inputs, block_plan, tri, PlanArgs, PrefillCtx, PromptParts, RankInputs, SeqMethod,
};
use crate::plan::Plan;
use crate::profile::{span, Bucket};
use crate::scorer::Scorer;
use crate::{attention, AttnInput, Error, Mask, Result};
use candle_core::Tensor;

pub struct Ulysses;

/// The rank counts that divide `n_kv` KV heads, as "1, 3".
fn divisors(n_kv: usize) -> String {
    (1..=n_kv)
        .filter(|d| n_kv.is_multiple_of(*d))
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl SeqMethod for Ulysses {
    fn name(&self) -> &'static str {
        "ulysses"
    }
    fn exact(&self) -> bool {
        true
    }
    fn plan(&self, parts: &PromptParts, a: &PlanArgs) -> Result<Plan> {
        let n_kv = a.n_kv_heads;
        if n_kv == 0 {
            return Err(Error::Config(
                "ulysses needs the model's number of KV heads to plan".into(),
            ));
        }
        if a.world > 0 && !n_kv.is_multiple_of(a.world) {
            return Err(Error::Config(format!(
                "ulysses splits the model's {n_kv} KV heads over the ranks, and {} ranks do not divide them: use {} ranks, or zigzag (exact, any number of ranks)",
                a.world,
                divisors(n_kv)
            )));
        }
        let p = block_plan(parts, a.world)?;
        if n_kv.is_multiple_of(p.world) {
            return Ok(p);
        }
        // A short prompt fell back to a rank count that does not divide the heads: the largest
        // dividing count that the prompt fills (fewer ranks do not always fit better).
        let mut q = (1..p.world)
            .rev()
            .filter(|w| n_kv.is_multiple_of(*w))
            .map(|w| block_plan(parts, w))
            .find(|q| q.as_ref().is_ok_and(|q| n_kv.is_multiple_of(q.world)))
            .unwrap_or_else(|| block_plan(parts, 1))?;
        q.notes = vec![format!(
            "{} context tokens are too few for {} ranks of ulysses; using {} rank{} (a count that divides the {n_kv} KV heads)",
            p.n,
            a.world,
            q.world,
            if q.world == 1 { "" } else { "s" }
        )];
        Ok(q)
    }
    fn rank_inputs(&self, parts: &PromptParts, p: &Plan, h: usize, _s: &Scorer) -> RankInputs {
        block_inputs(parts, p, h)
    }
    fn prefill(&self, r: &PrefillCtx<'_>, x: &AttnInput<'_>) -> Result<Tensor> {
        let world = r.comm.world_size();
        let dev = x.q.device();
        let (n_h, n_kv, s) = (x.q.dim(1)?, x.k.dim(1)?, x.q.dim(2)?);
        if !n_kv.is_multiple_of(world) {
            return Err(Error::Config(format!(
                "ulysses: {n_kv} KV heads do not divide over {world} ranks"
            )));
        }
        let (hq, hk) = (n_h / world, n_kv / world);
        // To rank r: its heads of q|k|v for our rows (packed along heads: one all-to-all).
        let send = (0..world)
            .map(|r| {
                Ok(Tensor::cat(
                    &[
                        x.q.narrow(1, r * hq, hq)?,
                        x.k.narrow(1, r * hk, hk)?,
                        x.v.narrow(1, r * hk, hk)?,
                    ],
                    1,
                )?)
            })
            .collect::<Result<Vec<_>>>()?;
        let got = span(Bucket::Communication, dev, || r.comm.all_to_all(&send))?;
        // Blocks arrive in rank order, which is sequence order.
        let all = Tensor::cat(&got, 2)?;
        let (q, k, v) = (
            all.narrow(1, 0, hq)?,
            all.narrow(1, hq, hk)?,
            all.narrow(1, hq + hk, hk)?,
        );
        let o = span(Bucket::Attention, dev, || {
            attention(&q, &k, &v, Mask::causal())
        })?;
        let send = (0..world)
            .map(|r| Ok(o.narrow(2, r * s, s)?))
            .collect::<Result<Vec<_>>>()?;
        let back = span(Bucket::Communication, dev, || r.comm.all_to_all(&send))?;
        Ok(Tensor::cat(&back, 1)?)
    }
    fn pairs(&self, p: &Plan, l: &RankLayout, _h: usize) -> f64 {
        tri(p.world * l.local) / p.world as f64
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::parts;
    use super::*;

    #[test]
    fn heads_must_divide() {
        let args = |world| PlanArgs {
            world,
            n_heads: 9,
            n_kv_heads: 3,
            ..Default::default()
        };
        let e = Ulysses
            .plan(&parts(1000, 0), &args(4))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("3 KV heads") && e.contains("1, 3") && e.contains("zigzag"),
            "{e}"
        );
        assert_eq!(Ulysses.plan(&parts(1000, 0), &args(3)).unwrap().world, 3);
        // Too short for 3 ranks: falls back to 1 (2 does not divide 3 heads), with a note.
        let p = Ulysses.plan(&parts(2, 0), &args(3)).unwrap();
        assert_eq!(p.world, 1);
        assert!(!p.notes.is_empty());
        // Every fallback divides the heads, even where a dividing count does not fit either
        // (8 heads, 8 ranks, 9 tokens: 5 fits, 4 does not, 2 does).
        for n in 1..200 {
            for world in [2, 4, 8] {
                let a = PlanArgs {
                    world,
                    n_heads: 32,
                    n_kv_heads: 8,
                    ..Default::default()
                };
                let p = Ulysses.plan(&parts(n, 0), &a).unwrap();
                assert!(
                    8 % p.world == 0 && p.world <= world,
                    "n {n} world {world}: {p:?}"
                );
                assert!(
                    (p.world - 1) * p.l_b < n,
                    "n {n}: a rank of padding only: {p:?}"
                );
                assert_eq!(p.notes.is_empty(), p.world == world, "{p:?}");
            }
        }
    }
}
