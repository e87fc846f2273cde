//! `dense`: the whole prompt on one rank, exact causal attention. What every other method is
//! checked against.

use super::{tri, Method, PlanArgs, PromptParts, RankCtx, RankInputs, SeqMethod};
use crate::comm::Communicator;
use crate::distributed::RankLayout;
use crate::plan::Plan;
use crate::scorer::Scorer;
use crate::{attention, AttentionBackend, AttnInput, Mask, Result};
use candle_core::Tensor;
use std::sync::Arc;

pub struct Dense;

impl SeqMethod for Dense {
    fn name(&self) -> &'static str {
        "dense"
    }
    fn exact(&self) -> bool {
        true
    }
    fn max_world(&self) -> Option<usize> {
        Some(1)
    }
    fn plan(&self, parts: &PromptParts, _args: &PlanArgs) -> Result<Plan> {
        Ok(Plan::one_rank(parts.context.len(), vec![]))
    }
    /// The whole prompt, question included (nothing runs after prefill).
    fn rank_inputs(&self, parts: &PromptParts, _plan: &Plan, _h: usize, _s: &Scorer) -> RankInputs {
        let tokens = parts.all();
        RankInputs {
            positions: (0..tokens.len() as u32).collect(),
            layout: RankLayout {
                local: tokens.len(),
                ..Default::default()
            },
            tokens,
            after: 0,
        }
    }
    fn prefill(&self, _r: &RankCtx<'_>, x: &AttnInput<'_>) -> Result<Tensor> {
        Ok(attention(x.q, x.k, x.v, Mask::causal(), false)?.0)
    }
    fn pairs(&self, _plan: &Plan, layout: &RankLayout, _h: usize) -> f64 {
        tri(layout.rows())
    }
    /// One rank that caches every token it sees (prompt and generated).
    fn backend(
        &self,
        _m: Method,
        _comm: Arc<dyn Communicator>,
        _layout: RankLayout,
        _scorer: Scorer,
    ) -> Result<Box<dyn AttentionBackend>> {
        Ok(Box::new(crate::dense::Dense))
    }
}
