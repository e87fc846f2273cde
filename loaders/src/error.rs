//! Loading errors: each names the problem and, where there is one, the fix.

#[derive(Debug, thiserror::Error)]
/// Why a model, tokenizer or heads file could not be loaded.
pub enum LoadError {
    #[error("{0}")]
    /// A problem described in full.
    Msg(String),
    #[error("unsupported architecture '{found}' (supported: LlamaForCausalLM, Qwen2ForCausalLM, GGUF 'llama')")]
    /// An architecture this crate does not run.
    UnsupportedArch {
        /// The architecture the config names.
        found: String,
    },
    #[error("{path}: {msg}")]
    /// A file that is missing, unreadable or malformed.
    File {
        /// The file.
        path: String,
        /// What is wrong with it.
        msg: String,
    },
    #[error(transparent)]
    /// A tensor operation failed.
    Candle(#[from] candle_core::Error),
}

impl LoadError {
    /// A file error naming `path`.
    pub fn file(path: impl AsRef<std::path::Path>, msg: impl std::fmt::Display) -> Self {
        Self::File {
            path: path.as_ref().display().to_string(),
            msg: msg.to_string(),
        }
    }
}

/// This crate's result type.
pub type Result<T> = std::result::Result<T, LoadError>;

/// `bail!`-style helper.
macro_rules! load_err {
    ($($t:tt)*) => { $crate::error::LoadError::Msg(format!($($t)*)) };
}
pub(crate) use load_err;
