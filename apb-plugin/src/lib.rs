#![warn(missing_docs)]
//! APB-rs attention plugin: the [`AttentionBackend`] trait that a model's attention layers call,
//! attention itself ([`attention()`], re-exported from `apb-kernels`),
//! the per-layer KV cache, and the attention methods ([`Method`]: dense, ring, zigzag, ulysses,
//! star, apb) that lay a prompt out over ranks.
//!
//! The model file calls only [`AttentionBackend::forward`]; it never knows how many ranks there
//! are or which tokens a rank holds. Backends never know about file formats. The crate's README
//! is the guide for hosts.
//!
//! How a method lays a prompt out over ranks (what each rank then runs through the model):
//!
//! ```
//! use apb_plugin::{Method, PlanArgs, PromptParts, Scorer};
//!
//! let prompt = PromptParts {
//!     context: (0..1000).collect(),
//!     query_segment: vec![7, 8, 9],
//!     ..Default::default()
//! };
//! let zigzag = Method::parse("zigzag")?;
//! let args = PlanArgs { world: 4, n_heads: 32, n_kv_heads: 8, ..Default::default() };
//! let plan = zigzag.imp().plan(&prompt, &args)?;
//! assert_eq!((plan.world, plan.l_b), (4, 250));
//! // Rank 1 holds chunks 1 and 6 of 8 (125 tokens each): positions 125.. and 750..
//! let r = zigzag.imp().rank_inputs(&prompt, &plan, 1, &Scorer::QueryAware);
//! assert_eq!((r.positions[0], r.positions[125]), (125, 750));
//! // The same causal work on every rank.
//! let pairs: Vec<f64> = (0..4)
//!     .map(|h| {
//!         let l = zigzag.imp().rank_inputs(&prompt, &plan, h, &Scorer::QueryAware).layout;
//!         zigzag.imp().pairs(&plan, &l, h)
//!     })
//!     .collect();
//! assert!(pairs.iter().all(|p| *p == pairs[0]));
//! # Ok::<(), apb_plugin::Error>(())
//! ```

pub mod backend;
pub mod cache;
pub mod comm;
/// The crate's error type.
pub mod error;
pub mod method;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod plan;
pub mod profile;
pub mod scorer;

/// Attention (one dispatcher, one mask type) and the layout copy around it live in the kernels
/// crate; re-exported so backends and hosts need one import.
pub use apb_kernels::{
    attention, attention_with_lse, contiguous, lse_merge, reference_attention, rope_split, Mask,
};
pub use backend::{AttentionBackend, AttnInput, Phase};
pub use cache::LayerKv;
pub use comm::{Communicator, HostComm, LocalComm, LocalGroup, Pending};
pub use error::{Error, Result};
pub use method::{
    gather_merge, generated_kv_rank, merge_lse, new_kv_rows, nothing_attended, DenseBackend,
    Method, PlanArgs, PromptParts, QuestionMask, RankBackend, RankInputs, RankLayout, SeqMethod,
};
pub use plan::{plan, Plan, PlanRequest};
pub use scorer::{RetainingHeads, Scorer};
