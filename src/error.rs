//! The one error type of the crate. Every message names the argument, the
//! expected and the actual value.

use crate::dtype::DType;

/// `Result<T, moerec::Error>`.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything an op can refuse or fail with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// A tensor's shape does not match what the op needs.
    #[error("shape mismatch for `{argument}`: expected {expected}, got {actual}")]
    ShapeMismatch {
        argument: &'static str,
        expected: String,
        actual: String,
    },
    /// A tensor's element type does not match the op's element type.
    #[error("dtype mismatch for `{argument}`: expected {expected}, got {actual}")]
    DtypeMismatch {
        argument: &'static str,
        expected: DType,
        actual: DType,
    },
    /// Two operands of one op live on different devices.
    #[error("device mismatch for `{argument}`: expected {expected}, got {actual}")]
    DeviceMismatch {
        argument: &'static str,
        expected: String,
        actual: String,
    },
    /// A size, count or option the op cannot take.
    #[error("invalid argument `{argument}`: {message}")]
    InvalidArgument { argument: &'static str, message: String },
    /// An id or index outside its range; `position` is the lowest offending
    /// flat position in `argument`.
    #[error("`{argument}` holds {index} at position {position}, out of range (must be < {bound})")]
    IndexOutOfRange {
        argument: &'static str,
        position: u64,
        index: u64,
        bound: u64,
    },
    /// A NaN or infinity where the op needs finite values; the lowest
    /// offending (row, column).
    #[error("non-finite value in `{argument}` at row {row}, column {column}")]
    NonFinite {
        argument: &'static str,
        row: u64,
        column: u64,
    },
    /// The CUDA backend was asked for work but the build had no nvcc.
    #[error(
        "CUDA kernels were not compiled into this build (no nvcc at build time): \
         run scripts/install-nvcc.sh or set NVCC, then rebuild"
    )]
    KernelsNotCompiled,
    /// A requested device cannot be used.
    #[error("device `{requested}` is not available: {reason}")]
    DeviceUnavailable { requested: String, reason: String },
    /// A CUDA driver call failed.
    #[error("CUDA call `{call}` failed: {message}")]
    Cuda { call: &'static str, message: String },
}

impl Error {
    pub(crate) fn shape(argument: &'static str, expected: impl Into<String>, actual: &[usize]) -> Self {
        Error::ShapeMismatch {
            argument,
            expected: expected.into(),
            actual: format!("{actual:?}"),
        }
    }

    pub(crate) fn invalid(argument: &'static str, message: impl Into<String>) -> Self {
        Error::InvalidArgument {
            argument,
            message: message.into(),
        }
    }
}
