//! APB-rs attention plugin: the [`AttentionBackend`] trait that a model's attention layers call,
//! attention itself ([`attention`], re-exported from `apb-kernels`),
//! the per-layer KV cache, and the attention methods ([`Method`]: dense, ring, zigzag, ulysses,
//! star, apb) that lay a prompt out over ranks.
//!
//! The model file calls only [`AttentionBackend::forward`]; it never knows how many ranks there
//! are or which tokens a rank holds. Backends never know about file formats.

pub mod backend;
pub mod cache;
pub mod comm;
pub mod dense;
pub mod distributed;
pub mod error;
pub mod method;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod plan;
pub mod profile;
pub mod scorer;

/// Attention (one dispatcher, one mask type) and the layout copy around it live in the kernels
/// crate; re-exported so backends and hosts need one import.
pub use apb_kernels::{attention, contiguous, lse_merge, reference_attention, rope_split, Mask};
pub use backend::{AttentionBackend, AttnInput, Phase};
pub use cache::LayerKv;
pub use comm::{Communicator, LocalComm, LocalGroup, Pending};
pub use dense::Dense;
pub use distributed::{merge_lse, RankBackend, RankLayout};
pub use error::{Error, Result};
pub use method::{Method, PlanArgs, PromptParts, RankInputs, SeqMethod};
pub use plan::{plan, Plan, PlanRequest};
pub use scorer::{RetainingHeads, Scorer};
