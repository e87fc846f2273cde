//! `spava` (approximate, balanced; Spava, arXiv 2601.21444, apb.md §11): APB over 2H virtual
//! hosts placed zigzag. The context is cut into 2H chunks; rank r runs chunks r and 2H−1−r, so
//! every rank attends (2H−1)·l_p passing keys in all and the last rank no longer sets the time to
//! first token.
//!
//! Each rank runs APB's anchor (the document's start with the question embedded) once, rank 0
//! included, since its second chunk is the last. Chunk 0 attends only itself, causally, as APB's
//! rank 0 does (with its question probe for the training-free scorer); chunk c > 0 attends [the
//! picks of chunks 0..c−1 | anchor | itself] with APB's mask. l_a and l_p follow the planner's rule
//! on the chunk length n/2H. So `spava` on H ranks computes what `apb` computes on 2H ranks; only
//! the placement differs, and the second chunk's picks are gathered while the first chunk's
//! attention runs ([`crate::Communicator::all_gather_pending`]).
//!
//! Rows of rank r: `[anchor | chunk r | chunk 2H−1−r | probe (rank 0, training-free scorer)]`;
//! only the last chunk (rank 0's second) is padded, at its end.

use super::apb::apb_plan_request;
use super::RankLayout;
use super::{
    block_inputs, push_anchor, push_zigzag_chunks, tri, PlanArgs, PrefillCtx, PromptParts,
    RankInputs, SeqMethod,
};
use crate::plan::{plan, Plan};
use crate::profile::{span, Bucket};
use crate::scorer::{select_top, Scorer};
use crate::{attention, AttnInput, Error, Mask, Result};
use candle_core::Tensor;

pub struct Spava;

impl SeqMethod for Spava {
    fn name(&self) -> &'static str {
        "spava"
    }
    fn exact(&self) -> bool {
        false
    }
    fn needs_question(&self) -> bool {
        true
    }
    fn selects(&self) -> bool {
        true
    }
    /// APB's plan for 2H virtual hosts (chunk length `c = ⌈n/2H⌉`, l_a and l_p from it), as a
    /// plan of H ranks with blocks of 2c; a prompt too short for 2H chunks gets fewer ranks, and
    /// one rank is dense.
    fn plan(&self, parts: &PromptParts, a: &PlanArgs) -> Result<Plan> {
        let n = parts.context.len();
        if a.world == 0 {
            return Err(Error::Config("world size must be at least 1".into()));
        }
        let mut misfit: Option<String> = None;
        for world in (2..=a.world).rev() {
            let virt = plan(&apb_plan_request(parts, a, 2 * world))?;
            if virt.world == 2 * world {
                return Ok(Plan {
                    world,
                    n,
                    l_b: 2 * virt.l_b,
                    l_a: virt.l_a,
                    l_p: virt.l_p,
                    notes: Plan::fallback_note(misfit, world),
                });
            }
            misfit.get_or_insert_with(|| {
                let c = n.div_ceil(2 * world);
                format!(
                    "{n} context tokens are too few for {world} ranks ({} chunks of {c}, each holding an anchor and leaving room for its passing keys)",
                    2 * world
                )
            });
        }
        if n == 0 {
            return Err(Error::Config("empty context".into()));
        }
        Ok(Plan::one_rank(n, Plan::fallback_note(misfit, 1)))
    }
    fn rank_inputs(&self, parts: &PromptParts, p: &Plan, h: usize, scorer: &Scorer) -> RankInputs {
        if p.world == 1 {
            return block_inputs(parts, p, h);
        }
        let c = p.l_b / 2;
        let mut r = RankInputs {
            query_left: parts.query_segment.len(),
            ..Default::default()
        };
        push_anchor(&mut r, parts, p.l_a);
        push_zigzag_chunks(&mut r, parts, p, h);
        r.layout = RankLayout {
            anchor: p.l_a,
            local: 2 * c,
            pad: if h == 0 { p.pad() } else { 0 },
            l_p: p.l_p,
            // Chunk 0's first l_a tokens are the anchor's source: never passed (APB's rank 0).
            exclude_front: p.l_a + if h == 0 { p.l_a.min(c) } else { 0 },
            question_rows: r.layout.question_rows.clone(),
            ..Default::default()
        };
        if h == 0 && matches!(scorer, Scorer::QueryAware) && !parts.question.is_empty() {
            // Chunk 0 sees no anchor: a question probe after it (its rows attend only chunk 0)
            // gives the training-free scorer chunk 0's view of the question, as APB's rank 0.
            let q = parts.question.len();
            r.tokens.extend(&parts.question);
            r.positions.extend(c as u32..(c + q) as u32);
            r.layout.probe = q;
        }
        r
    }
    fn prefill(&self, r: &PrefillCtx<'_>, x: &AttnInput<'_>) -> Result<Tensor> {
        let (l, rank, world) = (r.layout, r.comm.rank(), r.comm.world_size());
        let dev = x.q.device();
        if world == 1 {
            return Ok(span(Bucket::Attention, dev, || {
                attention(x.q, x.k, x.v, Mask::causal())
            })?);
        }
        let (a, c, n_kv, d) = (l.anchor, l.local / 2, x.k.dim(1)?, x.k.dim(3)?);
        let second = 2 * world - 1 - rank;
        let rows = |t: &Tensor, at: usize, len: usize| t.narrow(2, at, len);
        // Chunk B's rows as APB's host 2H−1−r sees them: [anchor | chunk B].
        let b_view = |t: &Tensor| -> Result<Tensor> {
            Ok(Tensor::cat(&[&rows(t, 0, a)?, &rows(t, a + c, c)?], 2)?)
        };

        // Picks of both chunks, gathered in two collectives: chunk r's now, chunk 2H−1−r's in
        // flight while chunk r attends.
        let (mut first, mut later) = (None, None);
        if l.l_p > 0 {
            let score = |question: std::ops::Range<usize>| {
                span(Bucket::RetainingHeads, dev, || {
                    r.scorer
                        .score(x.layer, x.q_raw, x.k_raw, x.v_raw, n_kv, question)
                })
            };
            let scores = score(l.question_rows.clone())?;
            // Rank 0's chunk 0 is scored from its probe (the last rows), as APB's rank 0.
            let scores_a = if l.probe > 0 {
                score(a + 2 * c..a + 2 * c + l.probe)?
            } else {
                scores.clone()
            };
            // Chunk A's rows start at `from_a`: on rank 0 the anchor is not in front of chunk 0
            // (its pooling must not read the anchor's rows, as APB's rank 0 has none).
            let from_a = if rank == 0 { a } else { 0 };
            let scores_a = scores_a.narrow(0, from_a, scores_a.dim(0)? - from_a)?;
            let (cands_a, cands_b) = (l.exclude_front - from_a..a + c - from_a, a..a + c - l.pad);
            for (chunk, cands) in [(rank, &cands_a), (second, &cands_b)] {
                if chunk + 1 < 2 * world && cands.len() < l.l_p {
                    return Err(Error::Config(format!(
                        "chunk {chunk} has fewer candidates than l_p = {}",
                        l.l_p
                    )));
                }
            }
            let (picks_a, picks_b) = span(Bucket::TopK, dev, || -> Result<_> {
                // Max-pooling reads two rows before the candidates: for chunk B, the anchor's.
                let scores_b =
                    Tensor::cat(&[&scores.narrow(0, 0, a)?, &scores.narrow(0, a + c, c)?], 0)?;
                Ok((
                    select_top(&scores_a, cands_a.clone(), l.l_p)?,
                    select_top(&scores_b, cands_b.clone(), l.l_p)?,
                ))
            })?;
            // (1, n_kv, l_p, 2d): per KV head its own positions, post-RoPE K next to V.
            let packed_a = span(Bucket::TopK, dev, || {
                let len = a + c - from_a;
                apb_kernels::gather_kv(&rows(x.k, from_a, len)?, &rows(x.v, from_a, len)?, &picks_a)
            })?;
            // Chunk B's picks index [anchor | chunk B]; all are ≥ a, so rows c.. of x map them.
            let packed_b = span(Bucket::TopK, dev, || {
                apb_kernels::gather_kv(&rows(x.k, c, a + c)?, &rows(x.v, c, a + c)?, &picks_b)
            })?;
            first = Some(span(Bucket::Communication, dev, || {
                r.comm.all_gather(&packed_a)
            })?);
            later = Some(span(Bucket::Communication, dev, || {
                r.comm.all_gather_pending(&packed_b)
            })?);
        }
        // Passing K and V of the given picks, in chunk order, in x's dtype.
        let passing = |picks: &[&Tensor]| -> Result<Option<(Tensor, Tensor)>> {
            if picks.is_empty() {
                return Ok(None);
            }
            let p = Tensor::cat(picks, 2)?;
            Ok(Some((
                p.narrow(3, 0, d)?.to_dtype(x.k.dtype())?,
                p.narrow(3, d, d)?.to_dtype(x.v.dtype())?,
            )))
        };
        let with = |pass: &Option<(Tensor, Tensor)>, k: Tensor, v: Tensor| -> Result<_> {
            Ok(match pass {
                Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
                None => (k, v),
            })
        };
        let attend = |q: &Tensor, k: &Tensor, v: &Tensor, mask: Mask| -> Result<Tensor> {
            Ok(span(Bucket::Attention, dev, || attention(q, k, v, mask))?)
        };

        // The first chunk, with the anchor rows.
        let mut out = Vec::with_capacity(4);
        let mut probe_out = None;
        if rank == 0 {
            if a > 0 {
                let (q, k, v) = (rows(x.q, 0, a)?, rows(x.k, 0, a)?, rows(x.v, 0, a)?);
                out.push(attend(&q, &k, &v, Mask::causal())?);
            }
            // Chunk 0 and the probe: causal over themselves only.
            let pick = |t: &Tensor| -> Result<Tensor> {
                Ok(Tensor::cat(
                    &[&rows(t, a, c)?, &rows(t, a + 2 * c, l.probe)?],
                    2,
                )?)
            };
            let o = attend(&pick(x.q)?, &pick(x.k)?, &pick(x.v)?, Mask::causal())?;
            out.push(o.narrow(2, 0, c)?);
            probe_out = (l.probe > 0).then(|| o.narrow(2, c, l.probe)).transpose()?;
        } else {
            let pass = match &first {
                Some(all) => passing(&all[..rank].iter().collect::<Vec<_>>())?,
                None => None,
            };
            let (k, v) = with(&pass, rows(x.k, 0, a + c)?, rows(x.v, 0, a + c)?)?;
            let mask = Mask::apb(a, rank * l.l_p);
            out.push(attend(&rows(x.q, 0, a + c)?, &k, &v, mask)?);
        }

        // The second chunk: [picks of chunks 0..2H−2−r | anchor | chunk]; its rows only (the
        // anchor's are done), bottom-right causal.
        let pass = match later {
            Some(p) => {
                let all_b = span(Bucket::Communication, dev, || p.wait())?;
                let all_a = first.as_ref().expect("gathered with the second");
                // Chunks 0..H−1 are the first chunks of ranks 0..H−1; chunks H..2H−2−r the
                // second chunks of ranks H−1 down to r+1.
                let mut picks: Vec<&Tensor> = all_a.iter().collect();
                picks.extend(all_b[rank + 1..].iter().rev());
                passing(&picks)?
            }
            None => None,
        };
        let (k, v) = with(&pass, b_view(x.k)?, b_view(x.v)?)?;
        out.push(attend(&rows(x.q, a + c, c)?, &k, &v, Mask::causal())?);
        out.extend(probe_out);
        Ok(Tensor::cat(&out, 2)?)
    }
    fn pairs(&self, plan: &Plan, l: &RankLayout, h: usize) -> f64 {
        if plan.world == 1 {
            return tri(l.local);
        }
        let (a, c) = (l.anchor, l.local / 2);
        // Chunk i > 0: c rows × (i·l_p passing + anchor) + causal over itself.
        let chunk = |i: usize| (c * (i * l.l_p + a)) as f64 + tri(c);
        let first = if h == 0 { tri(c + l.probe) } else { chunk(h) };
        // The anchor once per rank.
        tri(a) + first + chunk(2 * plan.world - 1 - h)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::parts;
    use super::super::{Method, PlanArgs};
    use super::*;

    fn args(world: usize) -> PlanArgs {
        PlanArgs {
            world,
            n_heads: 32,
            n_kv_heads: 8,
            ..Default::default()
        }
    }

    /// Attended pairs of every rank of `m` at `n` context tokens over `world` ranks.
    fn rank_pairs(m: Method, n: usize, world: usize) -> Vec<f64> {
        let p = parts(n, 20);
        let plan = m.plan(&p, &args(world)).unwrap();
        assert_eq!(plan.world, world, "{m}: {:?}", plan.notes);
        (0..world)
            .map(|h| {
                let r = m.imp().rank_inputs(&p, &plan, h, &Scorer::QueryAware);
                m.imp().pairs(&plan, &r.layout, h)
            })
            .collect()
    }

    #[test]
    fn plans_chunks_of_n_over_2h_with_the_paper_rule() {
        // 128K over 4 ranks: chunks of 16K, so APB's 8-host values 4096 / 2048.
        let p = parts(128 * 1024, 20);
        let plan = Method::SPAVA.plan(&p, &args(4)).unwrap();
        assert_eq!(
            (plan.world, plan.l_b, plan.l_a, plan.l_p, plan.pad()),
            (4, 32768, 4096, 2048, 0)
        );
        // Too short for 8 chunks: fewer ranks, one note; one rank is dense.
        let plan = Method::SPAVA.plan(&parts(1200, 20), &args(4)).unwrap();
        assert!(plan.world < 4 && plan.notes.len() == 1, "{plan:?}");
        let plan = Method::SPAVA.plan(&parts(100, 20), &args(4)).unwrap();
        assert_eq!((plan.world, plan.l_a, plan.l_p), (1, 0, 0));
    }

    #[test]
    fn ranks_are_balanced_where_apb_is_not() {
        // 16K over 4 ranks, from each rank's layout.
        let ratio = |v: &[f64]| {
            v.iter().cloned().fold(0.0, f64::max) / v.iter().cloned().fold(f64::MAX, f64::min)
        };
        let spava = ratio(&rank_pairs(Method::SPAVA, 16 * 1024, 4));
        let apb = ratio(&rank_pairs(Method::APB, 16 * 1024, 4));
        assert!(spava <= 1.15, "spava max/min {spava}");
        assert!(apb > 2.0, "apb max/min {apb}");
    }

    #[test]
    fn does_the_work_of_apb_on_twice_the_ranks() {
        // Same chunks and lengths, so the same pairs, except that each rank runs the anchor once
        // (APB's 2H − 1 hosts with an anchor, Spava's H ranks).
        for (n, world) in [(16 * 1024, 4), (10_000, 2), (33_001, 3)] {
            let spava: f64 = rank_pairs(Method::SPAVA, n, world).iter().sum();
            let apb: f64 = rank_pairs(Method::APB, n, 2 * world).iter().sum();
            let p = parts(n, 20);
            let l_a = Method::SPAVA.plan(&p, &args(world)).unwrap().l_a;
            let want = apb - (world - 1) as f64 * tri(l_a);
            assert!(
                (spava - want).abs() < 1e-6 * want,
                "n {n} H {world}: {spava} vs {want}"
            );
        }
    }

    #[test]
    fn each_rank_runs_the_rows_of_its_two_virtual_hosts() {
        // Rank r's chunks are APB's hosts r and 2H−1−r of 2H: same tokens at the same positions.
        let (p, world) = (parts(5000, 20), 3);
        {
            let scorer = Scorer::QueryAware;
            let plan = Method::SPAVA.plan(&p, &args(world)).unwrap();
            let virt = Method::APB.plan(&p, &args(2 * world)).unwrap();
            assert_eq!(
                (plan.l_a, plan.l_p, plan.l_b),
                (virt.l_a, virt.l_p, 2 * virt.l_b)
            );
            for h in 0..world {
                let r = Method::SPAVA.imp().rank_inputs(&p, &plan, h, &scorer);
                let (a, c) = (r.layout.anchor, r.layout.local / 2);
                for (i, host) in [h, 2 * world - 1 - h].into_iter().enumerate() {
                    let v = Method::APB.imp().rank_inputs(&p, &virt, host, &scorer);
                    let va = v.layout.anchor;
                    let local = va..va + v.layout.local;
                    let ours = a + i * c..a + (i + 1) * c;
                    assert_eq!(
                        r.tokens[ours.clone()],
                        v.tokens[local.clone()],
                        "h{h} host {host}"
                    );
                    assert_eq!(r.positions[ours], v.positions[local], "h{h} host {host}");
                    if host > 0 {
                        assert_eq!(r.tokens[..a], v.tokens[..va], "anchor");
                    } else {
                        // Chunk 0's probe, as APB's rank 0.
                        let probe = r.tokens.len() - r.layout.probe..;
                        assert_eq!(
                            r.tokens[probe.clone()],
                            v.tokens[v.tokens.len() - v.layout.probe..]
                        );
                        assert_eq!(
                            r.positions[probe],
                            v.positions[v.positions.len() - v.layout.probe..]
                        );
                    }
                }
            }
        }
    }
}
