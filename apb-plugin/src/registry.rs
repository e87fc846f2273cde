//! Backends by name, as the CLI and server select them.

use crate::{AttentionBackend, Dense, Error, Result};
use std::sync::Arc;

/// Names accepted by [`backend_by_name`].
pub const BACKEND_NAMES: &[&str] = &["dense"];

/// Builds a single-rank backend by its registry name.
pub fn backend_by_name(name: &str) -> Result<Arc<dyn AttentionBackend>> {
    match name {
        "dense" => Ok(Arc::new(Dense)),
        _ => Err(Error::UnknownBackend {
            name: name.to_string(),
            available: BACKEND_NAMES.join(", "),
        }),
    }
}
