//! apb-host's one error type. The binary wraps it in `anyhow`; the library does not, so a host
//! that embeds the engine can match on what failed.

use std::fmt::Display;

/// What went wrong in the engine, the ranks, the server's engine thread or a task.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The attention backends, ranks or communicators (apb-plugin).
    #[error(transparent)]
    Plugin(#[from] apb_plugin::Error),
    /// Loading a model, tokenizer or heads (apb-loaders).
    #[error(transparent)]
    Load(#[from] apb_loaders::LoadError),
    /// A tensor operation.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    /// Reading or writing a file, a pipe or a socket.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Malformed JSON (jobs between rank processes, task and result files).
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// Bad input or a failed step, said in words; a cause, if any, follows after `: `.
    #[error("{0}")]
    Msg(String),
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error that is only a message.
    pub fn msg(m: impl Display) -> Self {
        Error::Msg(m.to_string())
    }
}

/// Says what was being done when an error happened (as anyhow's `Context`): the message becomes
/// `what: cause`, on one line.
pub trait Context<T> {
    /// Wraps the error (or a `None`) with `what`.
    fn context(self, what: impl Display) -> Result<T>;
    /// As [`Context::context`], the message built only on failure.
    fn with_context<D: Display>(self, what: impl FnOnce() -> D) -> Result<T>;
}

impl<T, E: Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl Display) -> Result<T> {
        self.map_err(|e| Error::Msg(format!("{what}: {e}")))
    }
    fn with_context<D: Display>(self, what: impl FnOnce() -> D) -> Result<T> {
        self.map_err(|e| Error::Msg(format!("{}: {e}", what())))
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, what: impl Display) -> Result<T> {
        self.ok_or_else(|| Error::msg(what))
    }
    fn with_context<D: Display>(self, what: impl FnOnce() -> D) -> Result<T> {
        self.ok_or_else(|| Error::msg(what()))
    }
}

/// Returns early with an [`Error::Msg`] built by `format!`.
macro_rules! bail {
    ($($t:tt)*) => {
        return Err($crate::error::Error::Msg(format!($($t)*)))
    };
}
pub(crate) use bail;

/// An [`Error::Msg`] built by `format!`.
macro_rules! err {
    ($($t:tt)*) => {
        $crate::error::Error::Msg(format!($($t)*))
    };
}
pub(crate) use err;
