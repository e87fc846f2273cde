#![warn(missing_docs)]
//! The APB-rs engine: one per-rank generation program ([`runner`]) for every attention method,
//! the ranks that run it ([`ranks`]: threads or one process per GPU), the prompt split APB needs
//! ([`prompt`]), and the OpenAI-compatible server ([`server`]). The `apb` binary (src/bin/apb/:
//! one file per subcommand) parses arguments and dispatches.

pub mod bench;
pub mod bench_serve;
pub mod device;
pub mod engine;
pub mod error;
pub mod eval;
pub mod launch;
pub mod prompt;
pub mod ranks;
pub mod runner;
pub mod sampling;
pub mod server;
pub mod tasks;
pub mod train;

pub use apb_plugin::Method;
pub use runner::{Finish, GenParams, GenStats, Generation, Job, JobSettings, Runner};
