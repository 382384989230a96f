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
        /// The argument, as the op's signature names it.
        argument: &'static str,
        /// What the op needs.
        expected: String,
        /// What it was given.
        actual: String,
    },
    /// A tensor's element type does not match the op's element type.
    #[error("dtype mismatch for `{argument}`: expected {expected}, got {actual}")]
    DtypeMismatch {
        /// The argument, as the op's signature names it.
        argument: &'static str,
        /// The op's element type.
        expected: DType,
        /// The tensor's.
        actual: DType,
    },
    /// Two operands of one op live on different devices.
    #[error("device mismatch for `{argument}`: expected {expected}, got {actual}")]
    DeviceMismatch {
        /// The argument, as the op's signature names it.
        argument: &'static str,
        /// What the op needs.
        expected: String,
        /// What it was given.
        actual: String,
    },
    /// A size, count or option the op cannot take.
    #[error("invalid argument `{argument}`: {message}")]
    InvalidArgument {
        /// The argument, as the op's signature names it.
        argument: &'static str,
        /// The expected and the actual value.
        message: String,
    },
    /// An id or index outside its range; `position` is the lowest offending
    /// flat position in `argument`.
    #[error("`{argument}` holds {index} at position {position}, out of range (must be < {bound})")]
    IndexOutOfRange {
        /// The argument, as the op's signature names it.
        argument: &'static str,
        /// The lowest offending flat position.
        position: u64,
        /// The id found there.
        index: u64,
        /// The bound it must stay below.
        bound: u64,
    },
    /// A NaN or infinity where the op needs finite values; the lowest
    /// offending (row, column).
    #[error("non-finite value in `{argument}` at row {row}, column {column}")]
    NonFinite {
        /// The argument, as the op's signature names it.
        argument: &'static str,
        /// The row of the lowest offending element.
        row: u64,
        /// Its column.
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
    DeviceUnavailable {
        /// The device asked for (`cpu`, `cuda`, `cuda:N`).
        requested: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// A CUDA driver call failed.
    #[error("CUDA call `{call}` failed: {message}")]
    Cuda {
        /// The driver call.
        call: &'static str,
        /// The driver's message.
        message: String,
    },
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
