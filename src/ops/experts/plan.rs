//! The dispatch plan as the expert ops read it: its four arrays in a
//! backend's buffers, and its checks against the operands. The host check is
//! the one source of plan errors: the CPU runs it, and on CUDA, where the
//! kernels only flag a bad plan in the status word, the op API runs it on
//! copies to name the argument and position.

use crate::cuda::read_status;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::routing::DispatchPlan;
use cudarc::driver::{CudaSlice, CudaStream, CudaView};
use std::sync::Arc;

/// A dispatch plan's four arrays in a backend's buffers (`&[u32]` on the
/// host, `CudaView<u32>` on a device); layouts as in [`DispatchPlan`].
#[derive(Debug, Clone, Copy)]
pub struct PlanParts<B> {
    /// `[E]`: rows per expert.
    pub counts: B,
    /// `[E + 1]`: expert e's rows are `offsets[e]..offsets[e + 1]`.
    pub offsets: B,
    /// `[R]`: the token of each row.
    pub token_of_row: B,
    /// `[T, k]`: the row of each (token, slot), `u32::MAX` for an empty slot.
    pub row_of_slot: B,
}

pub(super) fn host_plan(plan: &DispatchPlan) -> Result<PlanParts<&[u32]>> {
    Ok(PlanParts {
        counts: plan.counts.host()?,
        offsets: plan.offsets.host()?,
        token_of_row: plan.token_of_row.host()?,
        row_of_slot: plan.row_of_slot.host()?,
    })
}

pub(super) fn device_plan(plan: &DispatchPlan) -> Result<PlanParts<CudaView<'_, u32>>> {
    Ok(PlanParts {
        counts: plan.counts.device_slice()?.as_view(),
        offsets: plan.offsets.device_slice()?.as_view(),
        token_of_row: plan.token_of_row.device_slice()?.as_view(),
        row_of_slot: plan.row_of_slot.device_slice()?.as_view(),
    })
}

/// The plan's shapes against E and the device; returns R. `slots`: the op
/// reads `row_of_slot`, which must be `[tokens, k >= 1]`; returns k too (0
/// when not read).
pub(super) fn check_plan_shapes(
    plan: &DispatchPlan,
    experts: usize,
    device: &Device,
    slots: Option<usize>,
) -> Result<(usize, usize)> {
    for (argument, part) in [
        ("plan.counts", &plan.counts),
        ("plan.offsets", &plan.offsets),
        ("plan.token_of_row", &plan.token_of_row),
        ("plan.row_of_slot", &plan.row_of_slot),
    ] {
        part.expect_device(argument, device)?;
    }
    plan.counts.expect_shape("plan.counts", &[experts])?;
    plan.offsets.expect_shape("plan.offsets", &[experts + 1])?;
    let rows = match *plan.token_of_row.shape() {
        [rows] => u32_count("plan.token_of_row", "R", rows)?,
        _ => return Err(Error::shape("plan.token_of_row", "[R]", plan.token_of_row.shape())),
    };
    let k = match (slots, plan.row_of_slot.shape()) {
        (None, _) => 0,
        (Some(tokens), &[t, k]) if t == tokens && k >= 1 => k,
        (Some(tokens), actual) => {
            return Err(Error::shape("plan.row_of_slot", format!("[{tokens}, k >= 1]"), actual));
        }
    };
    Ok((rows, k))
}

/// A count of rows or tokens, which u32 indices must address with
/// `u32::MAX` left free for empty slots.
pub(super) fn u32_count(argument: &'static str, name: &str, count: usize) -> Result<usize> {
    if count < u32::MAX as usize {
        Ok(count)
    } else {
        Err(Error::invalid(
            argument,
            format!("{name} = {count}: indices are u32 (u32::MAX marks an empty slot), so it must be < 2^32 - 1"),
        ))
    }
}

/// The op's one synchronisation on CUDA: reads the status word of the
/// device plan check and, when it is dirty, returns the host check's error.
pub(super) fn await_plan_check(
    stream: &Arc<CudaStream>,
    status: &CudaSlice<u64>,
    plan: &DispatchPlan,
    rows: usize,
    tokens: Option<usize>,
    k: Option<usize>,
) -> Result<()> {
    match read_status(stream, status)? {
        None => Ok(()),
        Some(_) => Err(plan_rejection(plan, rows, tokens, k)?),
    }
}

/// The error for a plan the device rejected: the host check on copies, so
/// both backends name the same argument and position.
fn plan_rejection(plan: &DispatchPlan, rows: usize, tokens: Option<usize>, k: Option<usize>) -> Result<Error> {
    let (counts, offsets) = (plan.counts.to_vec()?, plan.offsets.to_vec()?);
    let (token_of_row, row_of_slot) = (plan.token_of_row.to_vec()?, plan.row_of_slot.to_vec()?);
    let host = PlanParts {
        counts: counts.as_slice(),
        offsets: offsets.as_slice(),
        token_of_row: token_of_row.as_slice(),
        row_of_slot: row_of_slot.as_slice(),
    };
    let checked = check_plan(&host, rows, tokens).and_then(|()| match k {
        Some(k) => index_slots(&host, k, rows).map(drop),
        None => Ok(()),
    });
    Ok(checked
        .err()
        .unwrap_or_else(|| Error::invalid("plan", "rejected by the device check")))
}

/// Offsets consistent with counts and R; `token_of_row < tokens` when given.
pub(crate) fn check_plan(plan: &PlanParts<&[u32]>, rows: usize, tokens: Option<usize>) -> Result<()> {
    let PlanParts {
        counts,
        offsets,
        token_of_row,
        ..
    } = *plan;
    crate::ops::check_len("plan.offsets", offsets.len(), counts.len() + 1)?;
    crate::ops::check_len("plan.token_of_row", token_of_row.len(), rows)?;
    for e in 0..offsets.len() {
        let expected = if e == 0 {
            0
        } else {
            u64::from(offsets[e - 1]) + u64::from(counts[e - 1])
        };
        if u64::from(offsets[e]) != expected {
            let rule = if e == 0 {
                "offsets[0] must be 0".to_string()
            } else {
                format!("offsets[{e}] must be offsets[{0}] + counts[{0}] = {expected}", e - 1)
            };
            return Err(Error::invalid("plan.offsets", format!("{rule}, got {}", offsets[e])));
        }
    }
    let total = offsets[counts.len()] as usize;
    if total != rows {
        return Err(Error::invalid(
            "plan.offsets",
            format!("offsets[E] must be R = {rows} (the rows of token_of_row), got {total}"),
        ));
    }
    if let Some(tokens) = tokens {
        if let Some(position) = token_of_row.iter().position(|&t| t as usize >= tokens) {
            return Err(Error::IndexOutOfRange {
                argument: "plan.token_of_row",
                position: position as u64,
                index: u64::from(token_of_row[position]),
                bound: tokens as u64,
            });
        }
    }
    Ok(())
}

/// The slot `t * k + j` naming each row, checking that every slot is empty
/// (`u32::MAX`) or names a row below R of its own token not named before, and
/// that every row is named.
pub(crate) fn index_slots(plan: &PlanParts<&[u32]>, k: usize, rows: usize) -> Result<Vec<u32>> {
    const UNNAMED: u32 = u32::MAX;
    let mut slot_of_row = vec![UNNAMED; rows];
    for (slot, &row) in plan.row_of_slot.iter().enumerate() {
        if row == UNNAMED {
            continue;
        }
        if row as usize >= rows {
            return Err(Error::IndexOutOfRange {
                argument: "plan.row_of_slot",
                position: slot as u64,
                index: u64::from(row),
                bound: rows as u64,
            });
        }
        let (token, j) = (slot / k, slot % k);
        let owner = plan.token_of_row[row as usize];
        if owner as usize != token {
            return Err(Error::invalid(
                "plan.row_of_slot",
                format!("row_of_slot[{token}, {j}] = {row}, but token_of_row[{row}] = {owner}"),
            ));
        }
        let named = &mut slot_of_row[row as usize];
        if *named != UNNAMED {
            return Err(Error::invalid(
                "plan.row_of_slot",
                format!("row {row} is named by slots {} and {slot}", *named),
            ));
        }
        *named = slot as u32;
    }
    match slot_of_row.iter().position(|&slot| slot == UNNAMED) {
        Some(row) => Err(Error::invalid(
            "plan.row_of_slot",
            format!("row {row} is named by no slot"),
        )),
        None => Ok(slot_of_row),
    }
}
