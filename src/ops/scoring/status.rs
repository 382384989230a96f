//! CUDA data errors back into the errors the CPU gives: the op API reads the
//! status word once per call and, on an error path only, the offending id.

use super::{cuda, History, Scoring};
use crate::cuda::{read_element, read_status};
use crate::dtype::FloatElement;
use crate::error::{Error, Result};
use crate::tensor_ref::TensorRef;
use cudarc::driver::{CudaSlice, CudaStream};
use std::sync::Arc;

/// What a CUDA status word may point back to, to rebuild the CPU's error.
#[derive(Default)]
pub(super) struct StatusSources<'a> {
    pub(super) excluded: Option<&'a TensorRef<'a, u32>>,
    pub(super) targets: Option<&'a TensorRef<'a, u32>>,
    pub(super) history: Option<&'a History<'a>>,
    pub(super) n: usize,
}

/// Reads the status word (the one synchronisation of a CUDA op) and turns a
/// reported data error into the error the CPU gives for the same input.
pub(super) fn check_status(
    stream: &Arc<CudaStream>,
    status: &CudaSlice<u64>,
    num_items: usize,
    sources: StatusSources<'_>,
) -> Result<()> {
    let Some(code) = read_status(stream, status)? else {
        return Ok(());
    };
    let bound = num_items as u64;
    let unexpected = || Error::Cuda {
        call: "scoring status",
        message: format!("status code {code:#x} names an operand this op does not have"),
    };
    Err(match cuda::decode_status(code) {
        cuda::DataError::Excluded { position } => {
            let excluded = sources.excluded.ok_or_else(unexpected)?.cuda_view()?;
            Error::IndexOutOfRange {
                argument: "excluded",
                position,
                index: u64::from(read_element(stream, &excluded, position)?),
                bound,
            }
        }
        cuda::DataError::Target { row, excluded } => {
            let targets = sources.targets.ok_or_else(unexpected)?.cuda_view()?;
            let target = read_element(stream, &targets, row)?;
            if excluded {
                Error::invalid("targets", format!("targets[{row}] = {target} is an excluded item"))
            } else {
                Error::IndexOutOfRange {
                    argument: "targets",
                    position: row,
                    index: u64::from(target),
                    bound,
                }
            }
        }
        cuda::DataError::HistoryOffsets => {
            let history = sources.history.ok_or_else(unexpected)?;
            let offsets = history.offsets.to_vec()?;
            Error::invalid(
                "history.offsets",
                format!(
                    "expected 0, non-decreasing, ending at {} (the number of history ids); got {:?}...",
                    history.ids.len(),
                    &offsets[..offsets.len().min(8)]
                ),
            )
        }
        cuda::DataError::HistoryId { position } => {
            let ids = sources.history.ok_or_else(unexpected)?.ids.cuda_view()?;
            Error::IndexOutOfRange {
                argument: "history.ids",
                position,
                index: u64::from(read_element(stream, &ids, position)?),
                bound,
            }
        }
        cuda::DataError::TooFew { row, available } => Error::invalid(
            "n",
            format!("row {row} has {available} eligible items, fewer than n = {}", sources.n),
        ),
    })
}

/// The sources of every op: the excluded ids.
pub(super) fn excluded_sources<'a, T: FloatElement>(inputs: &'a Scoring<'a, T>) -> StatusSources<'a> {
    StatusSources {
        excluded: inputs.excluded.as_ref(),
        ..StatusSources::default()
    }
}
