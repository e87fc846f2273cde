//! `star` (Star Attention, approximate): rank h > 0 prepends an anchor (by default the whole first
//! block) to its local block and attends causally over both; no K/V crosses ranks in prefill.

use super::RankLayout;
use super::{block_inputs, tri, PlanArgs, PromptParts, RankInputs, SeqMethod};
use crate::plan::{plan, Plan, PlanRequest};
use crate::scorer::Scorer;
use crate::Result;

pub struct Star;

impl SeqMethod for Star {
    fn name(&self) -> &'static str {
        "star"
    }
    fn exact(&self) -> bool {
        false
    }
    fn needs_question(&self) -> bool {
        true
    }
    fn plan(&self, parts: &PromptParts, a: &PlanArgs) -> Result<Plan> {
        plan(&PlanRequest {
            n: parts.context.len(),
            world: a.world,
            anchor_len: a.anchor_len,
            passing_len: a.passing_len,
            anchor_min: 0,
            uses_anchor: true,
            uses_passing: false,
            anchor_is_first_block: true,
        })
    }
    /// `[context[..l_a] | block h]` on ranks h > 0; rank 0 runs its block alone.
    fn rank_inputs(&self, parts: &PromptParts, p: &Plan, h: usize, _s: &Scorer) -> RankInputs {
        let block = block_inputs(parts, p, h);
        let anchor = if h > 0 { p.l_a } else { 0 };
        let mut r = RankInputs {
            tokens: parts.context[..anchor].to_vec(),
            positions: (0..anchor as u32).collect(),
            ..block.clone()
        };
        r.tokens.extend(block.tokens);
        r.positions.extend(block.positions);
        r.layout.anchor = anchor;
        r.layout.exclude_front = if h == 0 {
            p.l_a.min(r.layout.local)
        } else {
            anchor
        };
        r
    }
    fn pairs(&self, _plan: &Plan, l: &RankLayout, _h: usize) -> f64 {
        tri(l.rows())
    }
}
