//! The crate's one error type: every variant names what was wrong and where.

use std::path::PathBuf;

/// Everything the models crate can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A data file's content is invalid: names the file, the 1-based line and the value.
    #[error("{file}:{line}: {message}")]
    Data {
        /// The file (or the name given to in-memory text).
        file: String,
        /// 1-based line number; 0 when the problem is the file as a whole.
        line: usize,
        /// What was found and what was expected.
        message: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A checkpoint or results file is already there and overwriting was not asked for.
    #[error("{path} exists; pass --overwrite to replace it, or --resume to continue from it")]
    WouldOverwrite {
        /// The file that would have been replaced.
        path: PathBuf,
    },
    /// A checkpoint does not fit the model or run it is loaded into.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What did not match.
        message: String,
    },
    /// A caller-supplied value is out of its domain.
    #[error("{name}: expected {expected}, got {actual}")]
    InvalidArgument {
        /// The argument.
        name: String,
        /// What it must be.
        expected: String,
        /// What it was.
        actual: String,
    },
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

/// Shorthand for [`Error::InvalidArgument`].
pub(crate) fn invalid(name: &str, expected: impl ToString, actual: impl ToString) -> Error {
    Error::InvalidArgument {
        name: name.to_string(),
        expected: expected.to_string(),
        actual: actual.to_string(),
    }
}
