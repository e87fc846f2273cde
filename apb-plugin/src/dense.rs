//! `dense`: exact causal attention on one rank. The baseline every other backend reduces to.

use crate::{attention, AttentionBackend, AttnInput, LayerKv, Mask, Phase, Result};
use candle_core::Tensor;

#[derive(Debug, Default, Clone, Copy)]
/// Exact causal attention that caches every token it sees.
pub struct Dense;

impl AttentionBackend for Dense {
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
        let (out, _lse) = crate::profile::span("attention", x.q.device(), || {
            attention(x.q, &k, &v, Mask::causal(), false)
        })?;
        Ok(out)
    }

    fn decode_appends(&self) -> Option<bool> {
        Some(true)
    }

    fn decode_part(&self, x: &AttnInput<'_>, cache: &mut LayerKv) -> Result<(Tensor, Tensor)> {
        cache.append(x.k, x.v)?;
        let (k, v) = cache
            .kv()?
            .ok_or_else(|| crate::Error::Shape("empty cache after append".into()))?;
        let (out, lse) = attention(x.q, &k, &v, Mask::causal(), true)?;
        Ok((
            out,
            lse.ok_or_else(|| crate::Error::Shape("attention returned no LSE".into()))?,
        ))
    }
}
