//! The op families. Each lives in one folder: its API in `mod.rs`, its CPU
//! backend in `cpu.rs`, its CUDA backend in `cuda.rs`, its kernels in
//! `kernels/<op>.cu`.

pub mod embedding;
pub mod experts;
pub(crate) mod host;
pub mod routing;
pub mod scoring;

use crate::error::{Error, Result};

/// A buffer length check for the backend layer.
pub(crate) fn check_len(argument: &'static str, actual: usize, expected: usize) -> Result<()> {
    if actual == expected {
        Ok(())
    } else {
        Err(Error::ShapeMismatch {
            argument,
            expected: format!("{expected} elements"),
            actual: format!("{actual} elements"),
        })
    }
}

/// A size as a 32-bit kernel argument.
pub(crate) fn u32_arg(argument: &'static str, value: usize) -> Result<u32> {
    u32::try_from(value).map_err(|_| Error::invalid(argument, format!("{value} does not fit in 32 bits")))
}
