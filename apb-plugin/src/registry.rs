//! Backends by name, as the CLI and server select them.

use crate::{AttentionBackend, Dense, Error, Result};
use std::sync::Arc;

/// All backends the CLI accepts; `ring`, `star` and `apb` run over ranks (see `distributed`).
pub const BACKEND_NAMES: &[&str] = &["dense", "ring", "star", "apb"];

/// Builds a single-rank backend by its registry name.
pub fn backend_by_name(name: &str) -> Result<Arc<dyn AttentionBackend>> {
    match name {
        "dense" => Ok(Arc::new(Dense)),
        "ring" | "star" | "apb" => Err(Error::Config(format!(
            "'{name}' runs over ranks: build it per rank with distributed::RankBackend"
        ))),
        _ => Err(Error::UnknownBackend {
            name: name.to_string(),
            available: BACKEND_NAMES.join(", "),
        }),
    }
}
