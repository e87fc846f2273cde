//! `dense`: the whole prompt on one rank, exact causal attention. What every other method is
//! checked against.

use super::RankLayout;
use super::{tri, Method, PlanArgs, PromptParts, RankInputs, SeqMethod};
use crate::comm::Communicator;
use crate::plan::Plan;
use crate::scorer::Scorer;
use crate::{attention, AttentionBackend, AttnInput, LayerKv, Mask, Phase, Result};
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
            query_left: 0,
        }
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
        Ok(Box::new(DenseBackend))
    }
}

#[derive(Debug, Default, Clone, Copy)]
/// The dense method's backend (also what a host runs for a model alone): exact causal
/// attention that caches every token it sees.
pub struct DenseBackend;

impl AttentionBackend for DenseBackend {
    fn name(&self) -> &str {
        "dense"
    }

    fn forward(&self, _phase: Phase, x: &AttnInput<'_>, cache: &mut LayerKv) -> Result<Tensor> {
        cache.append(x.k, x.v)?;
        let (k, v) = cache
            .kv()?
            .ok_or_else(|| crate::Error::Shape("empty cache after append".into()))?;
        // New rows are the last `seq` positions of the cache: bottom-right causal covers both the
        // prompt pass and every decode step.
        Ok(crate::profile::span(
            crate::profile::Bucket::Attention,
            x.q.device(),
            || attention(x.q, &k, &v, Mask::causal()),
        )?)
    }

    fn fuses_decode_rows(&self) -> bool {
        true
    }

    /// One rank: it keeps every token (`keep` is always true for it).
    fn decode_part(
        &self,
        x: &AttnInput<'_>,
        cache: &mut LayerKv,
        keep: bool,
    ) -> Result<(Tensor, Tensor)> {
        super::rank_backend::decode_over_cache(x, cache, keep, Mask::causal())
    }
}
