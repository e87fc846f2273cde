//! APB-rs attention plugin: the [`AttentionBackend`] trait that a model's attention layers call,
//! the exact reference attention ([`ops::attention`]) every backend and kernel is checked against,
//! the per-layer KV cache, and a registry that picks a backend by name.
//!
//! The model file calls only [`AttentionBackend::forward`]; it never knows how many ranks there
//! are or which tokens a rank holds. Backends never know about file formats.

pub mod backend;
pub mod cache;
pub mod comm;
pub mod cpu_flash;
pub mod dense;
pub mod distributed;
pub mod error;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod ops;
pub mod plan;
pub mod profile;
pub mod registry;
pub mod scorer;

pub use backend::{AttentionBackend, AttnInput, Phase};
pub use cache::LayerKv;
pub use comm::{Communicator, LocalComm, LocalGroup};
pub use dense::Dense;
pub use distributed::{merge_lse, Kind, RankBackend, RankLayout};
pub use error::{Error, Result};
pub use ops::{attention, MaskSpec};
pub use plan::{plan, Plan, PlanRequest};
pub use registry::{backend_by_name, BACKEND_NAMES};
pub use scorer::{RetainingHeads, Scorer};
