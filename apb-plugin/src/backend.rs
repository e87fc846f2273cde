//! The one trait a llama-family model calls for attention.
//!
//! Why this shape: APB and its relatives need more than `softmax(QKᵀ)V`. A rank may add an anchor
//! and passing blocks, score its keys with retaining heads on the *pre-RoPE* projections, keep
//! only part of its KV in the cache, and merge decode outputs across ranks by log-sum-exp. So the
//! backend gets both the post-RoPE q/k/v and the raw projections, owns what goes into the layer's
//! cache, and is told whether this is the prompt pass or a generation step.

use crate::{LayerKv, Result};
use candle_core::Tensor;

/// Which pass of generation the model is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The prompt (or, for a distributed backend, this rank's share of it).
    Prefill,
    /// New tokens after the prompt: the question segment and generated tokens.
    Decode,
}

/// What one attention layer hands to the backend.
///
/// Shapes: `q` is `(batch, n_heads, seq, head_dim)`, `k`/`v` are `(batch, n_kv_heads, seq, head_dim)`,
/// all post-RoPE. `q_raw`/`k_raw`/`v_raw` are the pre-RoPE projections `(batch, seq, heads·head_dim)`
/// (bias included), which retaining heads score.
pub struct AttnInput<'a> {
    /// The layer index (retaining heads are per layer).
    pub layer: usize,
    /// Post-RoPE queries `(batch, n_heads, seq, head_dim)`.
    pub q: &'a Tensor,
    /// Post-RoPE keys `(batch, n_kv_heads, seq, head_dim)`.
    pub k: &'a Tensor,
    /// Values `(batch, n_kv_heads, seq, head_dim)`.
    pub v: &'a Tensor,
    /// Pre-RoPE query projection `(batch, seq, n_heads·head_dim)`.
    pub q_raw: &'a Tensor,
    /// Pre-RoPE key projection `(batch, seq, n_kv_heads·head_dim)`.
    pub k_raw: &'a Tensor,
    /// Value projection `(batch, seq, n_kv_heads·head_dim)`.
    pub v_raw: &'a Tensor,
}

/// An attention implementation. Returns the attention output `(batch, n_heads, seq, head_dim)`
/// in the dtype of `q`.
///
/// Implementations must be usable from several threads at once (one per rank in a process).
pub trait AttentionBackend: Send + Sync {
    /// Registry name, e.g. `dense`.
    fn name(&self) -> &str;

    /// Attend `input.q` to this layer's keys. The backend decides what it appends to `cache`.
    fn forward(&self, phase: Phase, input: &AttnInput<'_>, cache: &mut LayerKv) -> Result<Tensor>;

    /// This rank's part of a decode step of one sequence (new rows after all of its prompt):
    /// the output `(b, n_heads, s, head_dim)` and LSE `(b, n_heads, s)` over the keys this rank
    /// holds, the rows' K/V appended first where `keep` (the host says which rank keeps each
    /// generated token: [`crate::generated_kv_rank`]). The parts of all ranks are merged by LSE
    /// ([`crate::gather_merge`]): a host batching many sequences gathers all their parts in one
    /// collective.
    fn decode_part(
        &self,
        input: &AttnInput<'_>,
        cache: &mut LayerKv,
        keep: bool,
    ) -> Result<(Tensor, Tensor)>;

    /// For hosts that run the decode rows of many sequences in one attention kernel
    /// ([`apb_kernels::attention_rows`]): true when this rank's decode part is "append the row's
    /// K/V here if `keep`, then attend every key held here", which is what
    /// [`decode_part`](Self::decode_part) then does row by row. False (the default): the host
    /// calls `decode_part` for each row.
    fn fuses_decode_rows(&self) -> bool {
        false
    }
}
