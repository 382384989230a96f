//! Grouping on a CUDA device (kernels/grouping.cu): 8-bit digits, each a
//! per-tile histogram, an exclusive scan and a stable scatter. No host round
//! trip and no float atomics; the result equals the CPU's bit for bit.

use super::key_bits;
use crate::cuda::{grid_stride_config, launched, tiled_config, CudaDevice};
use crate::error::{Error, Result};
use crate::tensor::alloc_uninit;
use cudarc::driver::{CudaSlice, CudaStream, CudaView, PushKernelArg};
use std::sync::Arc;

const MODULE: &str = "grouping";
/// Keys per block in every grouping and scan kernel (kTile in grouping.cu).
const TILE: u64 = 2048;
const DIGIT_BITS: u32 = 8;
const BINS: u64 = 1 << DIGIT_BITS;

/// Positions grouped by key, on the device; the layout of `cpu::Groups` with
/// room for the largest possible number of groups.
pub struct DeviceGroups {
    /// Input positions sorted by key (n).
    pub order: CudaSlice<u32>,
    /// The distinct keys other than the sentinel; the first `count` are valid (n).
    pub keys: CudaSlice<u32>,
    /// Group starts in `order`; the first `count + 1` are valid (n + 1).
    pub starts: CudaSlice<u32>,
    /// The number of groups (1 element).
    pub count: CudaSlice<u32>,
}

/// Groups the positions of `keys` (each below `key_bound`) by key; entries
/// equal to `sentinel`, the largest key, belong to no group. `keys.len()` must
/// fit in u32.
pub(crate) fn group_by_key(
    device: &CudaDevice,
    stream: &Arc<CudaStream>,
    keys: &CudaView<u32>,
    key_bound: u64,
    sentinel: Option<u32>,
) -> Result<DeviceGroups> {
    let n = u32::try_from(keys.len()).map_err(|_| Error::invalid("keys", "more than 2^32 - 1 entries"))?;
    let (sorted_keys, order) = stable_sort_by_key(device, stream, keys, key_bound)?;
    let mut heads = alloc_uninit::<u32>(stream, n as usize)?;
    let mut group_keys = alloc_uninit::<u32>(stream, n as usize)?;
    let mut starts = alloc_uninit::<u32>(stream, n as usize + 1)?;
    let mut count = alloc_uninit::<u32>(stream, 1)?;
    // No key can equal u32::MAX when there is no sentinel: keys < key_bound <= 2^32.
    let sentinel = sentinel.unwrap_or(u32::MAX);

    let heads_kernel = device.function(MODULE, "grouping_segment_heads")?;
    let mut launch = stream.launch_builder(&heads_kernel);
    launch
        .arg(&sorted_keys)
        .arg(&n)
        .arg(&sentinel)
        .arg(&mut heads)
        .arg(&mut starts)
        .arg(&mut count);
    // SAFETY: sorted_keys and heads hold n elements, starts n + 1, count 1;
    // the kernel touches heads[0..n], starts[0] and count[0].
    launched("grouping_segment_heads", unsafe {
        launch.launch(grid_stride_config(u64::from(n)))
    })?;

    scan_exclusive(device, stream, &mut heads)?;

    let write_kernel = device.function(MODULE, "grouping_segment_write")?;
    let mut launch = stream.launch_builder(&write_kernel);
    launch
        .arg(&sorted_keys)
        .arg(&heads)
        .arg(&n)
        .arg(&sentinel)
        .arg(&mut group_keys)
        .arg(&mut starts)
        .arg(&mut count);
    // SAFETY: the head ranks are < n, so group_keys[rank] (n elements) and
    // starts[rank + 1] (n + 1 elements) are in bounds.
    launched("grouping_segment_write", unsafe {
        launch.launch(grid_stride_config(u64::from(n)))
    })?;

    Ok(DeviceGroups {
        order,
        keys: group_keys,
        starts,
        count,
    })
}

/// (sorted keys, positions in sorted order), digit by digit.
fn stable_sort_by_key(
    device: &CudaDevice,
    stream: &Arc<CudaStream>,
    keys: &CudaView<u32>,
    key_bound: u64,
) -> Result<(CudaSlice<u32>, CudaSlice<u32>)> {
    let n = keys.len() as u32;
    let tiles_config = tiled_config(u64::from(n), TILE)?;
    let tiles = u64::from(tiles_config.grid_dim.0);
    let mut sorted = alloc_uninit::<u32>(stream, n as usize)?;
    let mut order = alloc_uninit::<u32>(stream, n as usize)?;
    let mut sorted_next = alloc_uninit::<u32>(stream, n as usize)?;
    let mut order_next = alloc_uninit::<u32>(stream, n as usize)?;
    let mut hist = alloc_uninit::<u32>(stream, (BINS * tiles) as usize)?;

    if n > 0 {
        stream
            .memcpy_dtod(keys, &mut sorted)
            .map_err(crate::cuda::driver_error("cuMemcpyDtoDAsync"))?;
    }
    let iota = device.function(MODULE, "grouping_iota")?;
    let mut launch = stream.launch_builder(&iota);
    launch.arg(&mut order).arg(&n);
    // SAFETY: order holds n elements; the kernel writes order[0..n].
    launched("grouping_iota", unsafe {
        launch.launch(grid_stride_config(u64::from(n)))
    })?;

    let histogram = device.function(MODULE, "grouping_digit_histogram")?;
    let scatter = device.function(MODULE, "grouping_digit_scatter")?;
    let mut shift = 0u32;
    while shift < key_bits(key_bound).max(1) {
        let mut launch = stream.launch_builder(&histogram);
        launch.arg(&sorted).arg(&n).arg(&shift).arg(&mut hist);
        // SAFETY: one block per tile of TILE keys; hist holds BINS * tiles
        // counts and block b writes hist[bin * tiles + b].
        launched("grouping_digit_histogram", unsafe { launch.launch(tiles_config) })?;
        scan_exclusive(device, stream, &mut hist)?;
        let mut launch = stream.launch_builder(&scatter);
        launch
            .arg(&sorted)
            .arg(&order)
            .arg(&n)
            .arg(&shift)
            .arg(&hist)
            .arg(&mut sorted_next)
            .arg(&mut order_next);
        // SAFETY: the scanned histogram sends each of the n keys to a distinct
        // destination below n; all four key/position buffers hold n elements.
        launched("grouping_digit_scatter", unsafe { launch.launch(tiles_config) })?;
        std::mem::swap(&mut sorted, &mut sorted_next);
        std::mem::swap(&mut order, &mut order_next);
        shift += DIGIT_BITS;
    }
    Ok((sorted, order))
}

/// Exclusive scan of `data` in place: tiles, then the tile totals
/// (recursively), then the totals added back. All on the stream, no sync.
pub(crate) fn scan_exclusive(device: &CudaDevice, stream: &Arc<CudaStream>, data: &mut CudaSlice<u32>) -> Result<()> {
    let n = u32::try_from(data.len()).map_err(|_| Error::invalid("scan", "more than 2^32 - 1 entries"))?;
    if n == 0 {
        return Ok(());
    }
    let config = tiled_config(u64::from(n), TILE)?;
    let mut totals = alloc_uninit::<u32>(stream, config.grid_dim.0 as usize)?;
    let tiles_kernel = device.function(MODULE, "scan_exclusive_tiles")?;
    let mut launch = stream.launch_builder(&tiles_kernel);
    launch.arg(&mut *data).arg(&n).arg(&mut totals);
    // SAFETY: one block per tile of TILE elements of data (n); block b
    // writes totals[b], and totals has one entry per block.
    launched("scan_exclusive_tiles", unsafe { launch.launch(config) })?;
    if config.grid_dim.0 > 1 {
        scan_exclusive(device, stream, &mut totals)?;
        let add_kernel = device.function(MODULE, "scan_add_tile_offsets")?;
        let mut launch = stream.launch_builder(&add_kernel);
        launch.arg(&mut *data).arg(&n).arg(&totals);
        // SAFETY: same tiling as above; block b reads totals[b].
        launched("scan_add_tile_offsets", unsafe { launch.launch(config) })?;
    }
    Ok(())
}
