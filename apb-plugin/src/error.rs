/// Errors raised by attention backends.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("attention shapes: {0}")]
    Shape(String),
    #[error("communication: {0}")]
    Comm(String),
    #[error("{0}")]
    Config(String),
    #[error("unknown attention backend '{name}' (available: {available})")]
    UnknownBackend { name: String, available: String },
    /// The caller stopped the pass (its client went away).
    #[error("cancelled")]
    Cancelled,
}

pub type Result<T> = std::result::Result<T, Error>;
