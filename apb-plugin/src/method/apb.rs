//! `apb` (APB, approximate; apb.md §3–§4): rank h > 0 prepends an anchor (the document's start
//! with the question embedded) to its local block; per layer a scorer (retaining heads, or the
//! training-free query-aware scorer) picks the top `l_p` K/V of each KV head among its candidates,
//! the picks are all-gathered, and rank h attends over [passing blocks of ranks < h | anchor |
//! local] with APB's mask, then drops the passing blocks.

use super::RankLayout;
use super::{
    block_inputs, push_anchor, tri, PlanArgs, PrefillCtx, PromptParts, RankInputs, SeqMethod,
};
use crate::plan::{plan, Plan, PlanRequest};
use crate::profile::{span, Bucket};
use crate::scorer::{select_top, Scorer};
use crate::{attention, AttnInput, Error, Mask, Result};
use candle_core::Tensor;

pub struct Apb;

/// APB's planner request for `world` hosts (Spava plans its 2H virtual hosts with it).
pub(crate) fn apb_plan_request(parts: &PromptParts, a: &PlanArgs, world: usize) -> PlanRequest {
    PlanRequest {
        n: parts.context.len(),
        world,
        anchor_len: a.anchor_len,
        passing_len: a.passing_len,
        anchor_min: parts.prefix_len + parts.question.len(),
        uses_anchor: true,
        uses_passing: true,
        anchor_is_first_block: false,
    }
}

impl SeqMethod for Apb {
    fn name(&self) -> &'static str {
        "apb"
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
    fn has_reference_question_mask(&self) -> bool {
        true
    }
    fn plan(&self, parts: &PromptParts, a: &PlanArgs) -> Result<Plan> {
        plan(&apb_plan_request(parts, a, a.world))
    }
    /// `[anchor | block h]` on ranks h > 0, the anchor being `prefix ++ question ++
    /// context[prefix .. l_a − |question|]`; rank 0 runs its block and, for the training-free
    /// scorer, a question probe after it.
    fn rank_inputs(&self, parts: &PromptParts, p: &Plan, h: usize, scorer: &Scorer) -> RankInputs {
        let block = block_inputs(parts, p, h);
        let mut r = RankInputs {
            tokens: vec![],
            positions: vec![],
            ..block.clone()
        };
        r.layout.l_p = p.l_p;
        if h > 0 && p.l_a > 0 {
            push_anchor(&mut r, parts, p.l_a);
            r.layout.anchor = p.l_a;
        }
        r.tokens.extend(block.tokens);
        r.positions.extend(block.positions);
        r.layout.exclude_front = if h == 0 {
            p.l_a.min(r.layout.local)
        } else {
            r.layout.anchor
        };
        if h == 0
            && p.world > 1
            && matches!(scorer, Scorer::QueryAware)
            && !parts.question.is_empty()
        {
            // Rank 0 has no anchor: a question probe after its block gives the training-free
            // scorer the question's queries; its rows are never selected and its KV is dropped.
            let end = p.block(0).1 as u32;
            r.layout.question_rows = r.tokens.len()..r.tokens.len() + parts.question.len();
            r.tokens.extend(&parts.question);
            r.positions.extend(end..end + parts.question.len() as u32);
            r.layout.probe = parts.question.len();
        }
        r
    }
    fn prefill(&self, r: &PrefillCtx<'_>, x: &AttnInput<'_>) -> Result<Tensor> {
        let (l, rank) = (r.layout, r.comm.rank());
        let n_kv = x.k.dim(1)?;
        let dev = x.q.device();
        let scores = span(Bucket::RetainingHeads, dev, || {
            r.scorer.score(
                x.layer,
                x.q_raw,
                x.k_raw,
                x.v_raw,
                n_kv,
                l.question_rows.clone(),
            )
        })?;
        let picks = span(Bucket::TopK, dev, || {
            select_top(&scores, l.exclude_front..l.anchor + l.local - l.pad, l.l_p)
        })?;
        if rank + 1 < r.comm.world_size() && l.anchor + l.local - l.pad - l.exclude_front < l.l_p {
            return Err(Error::Config(format!(
                "rank {rank} has fewer candidates than l_p = {}",
                l.l_p
            )));
        }
        // (1, n_kv, l_p, 2d): per KV head its own positions, post-RoPE K next to V.
        let packed = span(Bucket::TopK, dev, || {
            apb_kernels::gather_kv(x.k, x.v, &picks)
        })?;
        let all = span(Bucket::Communication, dev, || r.comm.all_gather(&packed))?;
        if rank == 0 || l.l_p == 0 {
            return Ok(span(Bucket::Attention, dev, || {
                attention(x.q, x.k, x.v, Mask::causal())
            })?);
        }
        let passing = Tensor::cat(&all[..rank], 2)?;
        let d = x.k.dim(3)?;
        let k = Tensor::cat(&[&passing.narrow(3, 0, d)?.to_dtype(x.k.dtype())?, x.k], 2)?;
        let v = Tensor::cat(&[&passing.narrow(3, d, d)?.to_dtype(x.v.dtype())?, x.v], 2)?;
        Ok(span(Bucket::Attention, dev, || {
            attention(x.q, &k, &v, Mask::apb(l.anchor, rank * l.l_p))
        })?)
    }
    fn pairs(&self, _plan: &Plan, l: &RankLayout, h: usize) -> f64 {
        let local = l.local + l.probe;
        tri(l.anchor) + (local * (h * l.l_p + l.anchor)) as f64 + tri(local)
    }
}
