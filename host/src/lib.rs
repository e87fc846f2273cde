//! The APB-rs engine: prompt → prefill → decode loop, sampling and streaming, over any
//! [`apb_plugin::AttentionBackend`]. The `apb` binary (src/main.rs) is a thin CLI on top.

pub mod bench;
pub mod device;
pub mod dist;
pub mod engine;
pub mod launch;
pub mod prompt;
pub mod sampling;
pub mod server;

pub use engine::{Engine, GenParams, GenStats, Generation};
