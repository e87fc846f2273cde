/// Errors raised by attention backends.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    /// A tensor operation failed.
    Candle(#[from] candle_core::Error),
    #[error("attention shapes: {0}")]
    /// Tensors of the wrong shape for the layout.
    Shape(String),
    #[error("communication: {0}")]
    /// A collective failed, timed out or the group was aborted.
    Comm(String),
    #[error("{0}")]
    /// A layout or method that cannot run (the message names the setting).
    Config(String),
    /// No method of that name.
    #[error("unknown attention method '{name}' (available: {available})")]
    UnknownMethod {
        /// The name asked for.
        name: String,
        /// The names there are, comma-separated.
        available: String,
    },
    /// The caller stopped the pass (its client went away).
    #[error("cancelled")]
    Cancelled,
}

/// This crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
