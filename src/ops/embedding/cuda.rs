//! The lookup on a CUDA device, on cudarc views and a stream
//! (kernels/embedding.cu). Data errors (bad ids, bad sparse rows) go to the
//! device-side status word and stay there: nothing here synchronises.

use super::{check_rates, TableShape};
use crate::cuda::{grid_stride_config, launched, tiled_config, CudaDevice};
use crate::dtype::FloatElement;
use crate::error::{Error, Result};
use crate::grouping::cuda::group_by_key;
pub use crate::grouping::cuda::DeviceGroups as GroupedIds;
use crate::ops::{check_len, u32_arg};
use cudarc::driver::{CudaStream, CudaView, CudaViewMut, DevicePtr, PushKernelArg};
use std::sync::Arc;

const MODULE: &str = "embedding";
/// Output units per block of the forward kernels (kUnitsPerBlock).
const FORWARD_UNITS_PER_BLOCK: u64 = 2048;

/// The padding id as the kernels take it: a u64 that no u32 id equals when
/// there is no padding.
fn padding_arg(padding: Option<u32>) -> u64 {
    padding.map_or(u64::MAX, u64::from)
}

/// The widest copy unit (bytes) that divides the row and both base pointers.
fn copy_unit(row_bytes: usize, pointers: [u64; 2], element_bytes: usize) -> usize {
    [16, 8, 4, 2]
        .into_iter()
        .filter(|&unit| unit >= element_bytes)
        .find(|&unit| row_bytes % unit == 0 && pointers.iter().all(|p| p % unit as u64 == 0))
        .unwrap_or(element_bytes)
}

/// `out[t, h, :] = table[h, ids[t], :]`, zeros for the padding id; the lowest
/// position of an id that is neither the padding nor below `num_rows` goes to
/// `status`. `table` is `[H, V, D]`, `out` is `[T, H, D]`.
#[allow(clippy::too_many_arguments)]
pub fn forward<T: FloatElement>(
    device: &CudaDevice,
    stream: &Arc<CudaStream>,
    table: &CudaView<T>,
    ids: &CudaView<u32>,
    padding: Option<u32>,
    shape: TableShape,
    out: &mut CudaViewMut<T>,
    status: &mut CudaViewMut<u64>,
) -> Result<()> {
    let TableShape { heads, num_rows, width } = shape;
    check_len("table", table.len(), shape.table_len())?;
    check_len("out", out.len(), ids.len() * heads * width)?;
    check_len("status", status.len(), 1)?;
    if ids.is_empty() {
        return Ok(());
    }
    let element_bytes = std::mem::size_of::<T>();
    let row_bytes = width * element_bytes;
    let unit = {
        let (table_ptr, _table_sync) = table.device_ptr(stream);
        let (out_ptr, _out_sync) = out.device_ptr(stream);
        copy_unit(row_bytes, [table_ptr, out_ptr], element_bytes)
    };
    let kernel = match unit {
        16 => "embedding_forward_u128",
        8 => "embedding_forward_u64",
        4 => "embedding_forward_u32",
        _ => "embedding_forward_u16",
    };
    let units_per_row = u32_arg("width", row_bytes / unit)?;
    u32_arg("heads * width", heads * width)?;
    let num_tokens = ids.len() as u64;
    let heads_arg = u32_arg("heads", heads)?;
    let rows_arg = u32_arg("num_rows", num_rows)?;
    let padding = padding_arg(padding);
    let function = device.function(MODULE, kernel)?;
    let config = tiled_config(
        num_tokens * heads as u64 * u64::from(units_per_row),
        FORWARD_UNITS_PER_BLOCK,
    )?;
    let mut launch = stream.launch_builder(&function);
    launch
        .arg(table)
        .arg(ids)
        .arg(&padding)
        .arg(&num_tokens)
        .arg(&heads_arg)
        .arg(&rows_arg)
        .arg(&units_per_row)
        .arg(out)
        .arg(status);
    // SAFETY: table holds H*V*D and out T*H*D elements (checked above), both
    // viewed as units that divide the row and the base pointers; every read
    // row is an id below num_rows, every write lands below T*H*D.
    launched("embedding_forward", unsafe { launch.launch(config) })
}

/// Groups the token positions by id (padding excluded), reporting bad ids to
/// `status`. The group count stays on the device (`GroupedIds::count`).
pub fn backward_group(
    device: &CudaDevice,
    stream: &Arc<CudaStream>,
    ids: &CudaView<u32>,
    padding: Option<u32>,
    shape: TableShape,
    status: &mut CudaViewMut<u64>,
) -> Result<GroupedIds> {
    check_len("status", status.len(), 1)?;
    let num_tokens = u32_arg("ids length", ids.len())?;
    let num_rows = u32_arg("num_rows", shape.num_rows)?;
    let mut keys = crate::tensor::alloc_uninit::<u32>(stream, ids.len())?;
    let padding = padding_arg(padding);
    let function = device.function(MODULE, "embedding_backward_keys")?;
    let mut launch = stream.launch_builder(&function);
    launch
        .arg(ids)
        .arg(&num_tokens)
        .arg(&padding)
        .arg(&num_rows)
        .arg(&mut keys)
        .arg(status);
    // SAFETY: ids and keys hold num_tokens elements; status one.
    launched("embedding_backward_keys", unsafe {
        launch.launch(grid_stride_config(u64::from(num_tokens)))
    })?;
    // Keys are ids below num_rows or the sentinel num_rows.
    group_by_key(device, stream, &keys.as_view(), u64::from(num_rows) + 1, Some(num_rows))
}

/// `values[h, u, :]` = the sum of `dy[t, h, :]` over group u's tokens in
/// ascending position, for the first `unique_rows` groups. `dy` is `[T, H, D]`,
/// `values` `[H, unique_rows, D]`.
pub fn backward_values(
    device: &CudaDevice,
    stream: &Arc<CudaStream>,
    dy: &CudaView<f32>,
    groups: &GroupedIds,
    unique_rows: usize,
    shape: TableShape,
    values: &mut CudaViewMut<f32>,
) -> Result<()> {
    let TableShape { heads, width, .. } = shape;
    let num_tokens = groups.order.len();
    check_len("dy", dy.len(), num_tokens * heads * width)?;
    check_len("values", values.len(), heads * unique_rows * width)?;
    if unique_rows > num_tokens {
        return Err(Error::invalid(
            "unique_rows",
            format!("{unique_rows} groups cannot come from {num_tokens} tokens"),
        ));
    }
    let elements = values.len() as u64;
    if elements == 0 {
        return Ok(());
    }
    let (heads_arg, width_arg, unique_arg) = (
        u32_arg("heads", heads)?,
        u32_arg("width", width)?,
        u32_arg("unique_rows", unique_rows)?,
    );
    let function = device.function(MODULE, "embedding_backward_values")?;
    let mut launch = stream.launch_builder(&function);
    launch
        .arg(dy)
        .arg(&groups.order)
        .arg(&groups.starts)
        .arg(&heads_arg)
        .arg(&width_arg)
        .arg(&unique_arg)
        .arg(values);
    // SAFETY: the first unique_rows + 1 group starts are valid positions in
    // order (T entries, each a token < T), so dy reads stay below T*H*D;
    // values holds H*U*D elements.
    launched("embedding_backward_values", unsafe {
        launch.launch(grid_stride_config(elements))
    })
}

/// Which in-place update a sparse gradient drives.
pub enum Update<'a, 'b, T> {
    /// `dense[h, rows[u], :] = values[h, u, :]`; `dense` must be zeroed.
    Densify {
        /// `[H, V, D]` f32, zeroed.
        dense: &'a mut CudaViewMut<'b, f32>,
    },
    /// `table -= lr * g` on the rows.
    Sgd {
        /// `[H, V, D]`, updated in place.
        table: &'a mut CudaViewMut<'b, T>,
        /// The learning rate, finite.
        lr: f32,
    },
    /// Row-wise Adagrad with `state: [H, V]`.
    Adagrad {
        /// `[H, V, D]`, updated in place.
        table: &'a mut CudaViewMut<'b, T>,
        /// `[H, V]` f32, the accumulated mean squares.
        state: &'a mut CudaViewMut<'b, f32>,
        /// The learning rate, finite.
        lr: f32,
        /// Added to the root of the state, finite and > 0.
        eps: f32,
    },
}

/// Applies a sparse gradient (`rows [U]`, `values [H, U, D]`). The rows are
/// checked first (strictly ascending, below V; the lowest bad position goes to
/// `status`) and the update does nothing when the check failed.
pub fn apply_sparse<T: FloatElement>(
    device: &CudaDevice,
    stream: &Arc<CudaStream>,
    rows: &CudaView<u32>,
    values: &CudaView<f32>,
    shape: TableShape,
    update: Update<'_, '_, T>,
    status: &mut CudaViewMut<u64>,
) -> Result<()> {
    let TableShape { heads, num_rows, width } = shape;
    check_len("status", status.len(), 1)?;
    check_len("values", values.len(), heads * rows.len() * width)?;
    let unique = u32_arg("rows length", rows.len())?;
    let num_rows_arg = u32_arg("num_rows", num_rows)?;
    let (heads_arg, width_arg) = (u32_arg("heads", heads)?, u32_arg("width", width)?);
    match update {
        Update::Densify { .. } => {}
        Update::Sgd { lr, .. } => check_rates(lr, None)?,
        Update::Adagrad { lr, eps, .. } => check_rates(lr, Some(eps))?,
    }
    if unique == 0 {
        return Ok(());
    }
    let check = device.function(MODULE, "embedding_check_rows")?;
    let mut launch = stream.launch_builder(&check);
    launch.arg(rows).arg(&unique).arg(&num_rows_arg).arg(&mut *status);
    // SAFETY: rows holds `unique` elements, status one.
    launched("embedding_check_rows", unsafe {
        launch.launch(grid_stride_config(u64::from(unique)))
    })?;

    let status_view = status.as_view();
    let elements = values.len() as u64;
    let suffix = T::DTYPE.kernel_suffix();
    match update {
        Update::Densify { dense } => {
            check_len("dense", dense.len(), shape.table_len())?;
            let function = device.function(MODULE, "embedding_densify")?;
            let mut launch = stream.launch_builder(&function);
            launch
                .arg(rows)
                .arg(values)
                .arg(&heads_arg)
                .arg(&unique)
                .arg(&num_rows_arg)
                .arg(&width_arg)
                .arg(dense)
                .arg(&status_view);
            // SAFETY: runs only if every row is below num_rows (status clean),
            // so writes stay inside dense ([H, V, D]); values holds H*U*D.
            launched("embedding_densify", unsafe {
                launch.launch(grid_stride_config(elements))
            })
        }
        Update::Sgd { table, lr } => {
            check_len("table", table.len(), shape.table_len())?;
            let function = device.function(MODULE, &format!("embedding_sgd_{suffix}"))?;
            let mut launch = stream.launch_builder(&function);
            launch
                .arg(table)
                .arg(rows)
                .arg(values)
                .arg(&heads_arg)
                .arg(&unique)
                .arg(&num_rows_arg)
                .arg(&width_arg)
                .arg(&lr)
                .arg(&status_view);
            // SAFETY: as for densify; distinct rows, so no two threads write
            // one element.
            launched("embedding_sgd", unsafe { launch.launch(grid_stride_config(elements)) })
        }
        Update::Adagrad { table, state, lr, eps } => {
            check_len("table", table.len(), shape.table_len())?;
            check_len("state", state.len(), heads * num_rows)?;
            let function = device.function(MODULE, &format!("embedding_adagrad_{suffix}"))?;
            let mut launch = stream.launch_builder(&function);
            launch
                .arg(table)
                .arg(state)
                .arg(rows)
                .arg(values)
                .arg(&heads_arg)
                .arg(&unique)
                .arg(&num_rows_arg)
                .arg(&width_arg)
                .arg(&lr)
                .arg(&eps)
                .arg(&status_view);
            // SAFETY: one warp per (head, row), rows distinct and below
            // num_rows once the check passed; state holds H*V cells.
            launched("embedding_adagrad", unsafe {
                launch.launch(grid_stride_config(u64::from(heads_arg) * u64::from(unique) * 32))
            })
        }
    }
}
