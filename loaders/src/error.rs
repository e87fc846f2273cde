//! Loading errors: each names the problem and, where there is one, the fix.

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}")]
    Msg(String),
    #[error("unsupported architecture '{found}' (supported: LlamaForCausalLM, Qwen2ForCausalLM, GGUF 'llama')")]
    UnsupportedArch { found: String },
    #[error("{path}: {msg}")]
    File { path: String, msg: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl LoadError {
    pub fn file(path: impl AsRef<std::path::Path>, msg: impl std::fmt::Display) -> Self {
        Self::File {
            path: path.as_ref().display().to_string(),
            msg: msg.to_string(),
        }
    }
}

pub type Result<T> = std::result::Result<T, LoadError>;

/// `bail!`-style helper.
macro_rules! load_err {
    ($($t:tt)*) => { $crate::error::LoadError::Msg(format!($($t)*)) };
}
pub(crate) use load_err;
