//! `zigzag` (exact, balanced; ring-flash-attention's zigzag ring): the context is cut into 2H
//! chunks and rank h holds chunks h and 2H−1−h, so every rank attends the same number of causal
//! pairs. K/V blocks travel around the ring by point-to-point passes
//! ([`Communicator::ring_pass`]), each sent on before the block in hand is attended, and partial
//! results are merged by log-sum-exp in f32.
//!
//! Against rank `src`'s block `[chunk src | chunk 2H−1−src]`, with our rows `[chunk h | chunk
//! 2H−1−h]`: if `src < h`, its first chunk precedes all our rows and its second follows them
//! (all our rows × its first chunk); if `src > h`, both its chunks lie between our two (our second
//! chunk × all of it). Either way c × 2c pairs per step.
//!
//! [`Communicator::ring_pass`]: crate::Communicator::ring_pass

use super::RankLayout;
use super::{
    block_inputs, push_zigzag_chunks, tri, Parts, PlanArgs, PrefillCtx, PromptParts, RankInputs,
    SeqMethod,
};
use crate::plan::Plan;
use crate::profile::{span, Bucket};
use crate::scorer::Scorer;
use crate::{attention, attention_with_lse, AttnInput, Error, Mask, Result};
use candle_core::{Tensor, D};

pub struct Zigzag;

impl SeqMethod for Zigzag {
    fn name(&self) -> &'static str {
        "zigzag"
    }
    fn exact(&self) -> bool {
        true
    }
    /// Chunks of `c = ⌈n / 2H⌉` (block `2c`); the padding lands at the end of the last chunk,
    /// which must hold a real token, else fewer ranks are used.
    fn plan(&self, parts: &PromptParts, a: &PlanArgs) -> Result<Plan> {
        let n = parts.context.len();
        if a.world == 0 {
            return Err(Error::Config("world size must be at least 1".into()));
        }
        if n == 0 {
            return Err(Error::Config("empty context".into()));
        }
        let mut misfit: Option<String> = None;
        let mut world = a.world;
        while world > 1 {
            let c = n.div_ceil(2 * world);
            if (2 * world - 1) * c < n {
                return Ok(Plan {
                    world,
                    n,
                    l_b: 2 * c,
                    l_a: 0,
                    l_p: 0,
                    notes: Plan::fallback_note(misfit, world),
                });
            }
            misfit.get_or_insert_with(|| {
                format!(
                    "{n} context tokens are too few for {world} ranks ({} chunks of {c})",
                    2 * world
                )
            });
            world -= 1;
        }
        Ok(Plan::one_rank(n, Plan::fallback_note(misfit, 1)))
    }
    fn rank_inputs(&self, parts: &PromptParts, p: &Plan, h: usize, _s: &Scorer) -> RankInputs {
        if p.world == 1 {
            return block_inputs(parts, p, h);
        }
        let c = p.l_b / 2;
        let mut r = RankInputs {
            query_left: parts.query_segment.len(),
            ..Default::default()
        };
        push_zigzag_chunks(&mut r, parts, p, h);
        // Only the last chunk (rank 0's second) has padding, at its end.
        r.layout = RankLayout {
            local: 2 * c,
            pad: if h == 0 { p.pad() } else { 0 },
            ..Default::default()
        };
        r
    }
    fn prefill(&self, r: &PrefillCtx<'_>, x: &AttnInput<'_>) -> Result<Tensor> {
        let (rank, world) = (r.comm.rank(), r.comm.world_size());
        let dev = x.q.device();
        if world == 1 {
            return Ok(span(Bucket::Attention, dev, || {
                attention(x.q, x.k, x.v, Mask::causal())
            })?);
        }
        let rows = x.q.dim(2)?;
        let (c, d) = (rows / 2, x.k.dim(3)?);
        if rows != 2 * c {
            return Err(Error::Shape(format!(
                "zigzag rank {rank}: odd block {rows}"
            )));
        }
        // Partial results for our first and second chunk: (output in f32, LSE).
        let (mut front, mut back) = (Parts::default(), Parts::default());
        let kv = Tensor::cat(&[x.k, x.v], D::Minus1)?;
        let mut pending = Some(span(Bucket::Communication, dev, || r.comm.ring_pass(&kv))?);
        let (o, l) = span(Bucket::Attention, dev, || {
            attention_with_lse(x.q, x.k, x.v, Mask::causal())
        })?;
        front.push(o.narrow(2, 0, c)?, l.narrow(2, 0, c)?)?;
        back.push(o.narrow(2, c, c)?, l.narrow(2, c, c)?)?;
        for step in 1..world {
            let cur = span(Bucket::Communication, dev, || {
                pending.take().expect("a pass per step").wait()
            })?;
            if step + 1 < world {
                pending = Some(span(Bucket::Communication, dev, || r.comm.ring_pass(&cur))?);
            }
            let src = (rank + world - step) % world;
            if src < rank {
                let first = cur.narrow(2, 0, c)?;
                let (k, v) = (first.narrow(3, 0, d)?, first.narrow(3, d, d)?);
                let (o, l) = span(Bucket::Attention, dev, || {
                    attention_with_lse(x.q, &k, &v, Mask::full())
                })?;
                front.push(o.narrow(2, 0, c)?, l.narrow(2, 0, c)?)?;
                back.push(o.narrow(2, c, c)?, l.narrow(2, c, c)?)?;
            } else {
                let (k, v) = (cur.narrow(3, 0, d)?, cur.narrow(3, d, d)?);
                let q2 = x.q.narrow(2, c, c)?;
                let (o, l) = span(Bucket::Attention, dev, || {
                    attention_with_lse(&q2, &k, &v, Mask::full())
                })?;
                back.push(o, l)?;
            }
        }
        let out = Tensor::cat(&[front.merge()?, back.merge()?], 2)?;
        Ok(out.to_dtype(x.q.dtype())?)
    }
    fn pairs(&self, p: &Plan, l: &RankLayout, _h: usize) -> f64 {
        let c = (l.local / 2) as f64;
        if p.world == 1 {
            tri(l.local)
        } else {
            tri(l.local) + (p.world - 1) as f64 * 2.0 * c * c
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{causal_pairs_from_positions, parts};
    use super::super::Method;
    use super::*;

    #[test]
    fn chunks_and_padding() {
        // 10 tokens on 2 ranks: chunks of 3 (the last holds 1 real token and 2 padding).
        let p = parts(10, 0);
        let plan = Zigzag
            .plan(
                &p,
                &PlanArgs {
                    world: 2,
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!((plan.world, plan.l_b, plan.pad()), (2, 6, 2));
        let r0 = Zigzag.rank_inputs(&p, &plan, 0, &Scorer::QueryAware);
        assert_eq!(r0.positions, [0, 1, 2, 9, 0, 0]);
        assert_eq!(r0.tokens, [1, 2, 3, 10, 0, 0]);
        assert_eq!((r0.layout.local, r0.layout.pad), (6, 2));
        let r1 = Zigzag.rank_inputs(&p, &plan, 1, &Scorer::QueryAware);
        assert_eq!(r1.positions, [3, 4, 5, 6, 7, 8]);
        assert_eq!(r1.layout.pad, 0);
        // 7 tokens on 4 ranks: chunks of 1 leave the last chunk empty; fewer ranks, one note.
        let plan = Zigzag
            .plan(
                &parts(7, 0),
                &PlanArgs {
                    world: 4,
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(plan.world, 2);
        assert_eq!(plan.notes.len(), 1, "{:?}", plan.notes);
    }

    #[test]
    fn causal_work_is_balanced() {
        // Attended pairs counted from each rank's positions (independent of `pairs`): max/min
        // within 1.05 at 2–4 ranks, odd lengths included; and `pairs` agrees with the count
        // (it also counts padding rows).
        for (n, world) in [(4096, 4), (4001, 3), (1001, 2), (8191, 4)] {
            let p = parts(n, 0);
            let args = PlanArgs {
                world,
                ..Default::default()
            };
            let plan = Zigzag.plan(&p, &args).unwrap();
            assert_eq!(plan.world, world);
            let work: Vec<f64> = (0..world)
                .map(|h| {
                    let r = Method::ZIGZAG
                        .imp()
                        .rank_inputs(&p, &plan, h, &Scorer::QueryAware);
                    let counted = causal_pairs_from_positions(&r);
                    // `pairs` also counts the padding rows, at positions n, n + 1, ...
                    let pad_rows: f64 = if h == 0 {
                        (n..n + plan.pad()).map(|p| p as f64 + 1.0).sum()
                    } else {
                        0.0
                    };
                    let formula = Zigzag.pairs(&plan, &r.layout, h);
                    assert_eq!(counted + pad_rows, formula, "rank {h}");
                    counted
                })
                .collect();
            let (max, min) = (
                work.iter().cloned().fold(0.0, f64::max),
                work.iter().cloned().fold(f64::MAX, f64::min),
            );
            assert!(max / min <= 1.05, "n {n} world {world}: {work:?}");
        }
    }
}
