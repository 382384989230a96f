//! The expert layer and combine on a CUDA device, on cudarc views and a
//! stream (kernels/experts.cu). The plan is checked on the device into the
//! status word; the GEMMs are scheduled from the plan's offsets on the device
//! (a row-block count per expert, then the grouping scan), so nothing here
//! synchronises or reads the plan back. Kernels that trust the plan do
//! nothing once the status is dirty.

use super::{CombineShape, LayerShape, PlanParts, Variant};
use crate::cuda::{grid_stride_config, launched, CudaDevice, Pointers};
use crate::dtype::{DType, FloatElement};
use crate::error::{Error, Result};
use crate::grouping::cuda::scan_exclusive;
use crate::ops::{check_len, u32_arg};
use crate::tensor::{alloc_uninit, alloc_zeros};
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, LaunchConfig, PushKernelArg};
use std::sync::Arc;

const MODULE: &str = "experts";
/// The SIMT GEMM tile (kSimtM x kSimtN, kSimtThreads).
const SIMT_ROWS: usize = 64;
const SIMT_COLS: usize = 64;
const SIMT_THREADS: u32 = 256;
/// The tensor-core forward tile (kMmaM x kMmaN, kMmaThreads).
const MMA_ROWS: usize = 128;
const MMA_COLS: usize = 64;
const MMA_THREADS: u32 = 128;
/// GEMM kernels loop over their tiles, so the grid may stop here.
const MAX_GEMM_BLOCKS: u64 = 1 << 20;
/// dW splits each expert's rows into chunks until about this many blocks
/// share the work (the chunk size is a function of the shapes only).
const DWEIGHTS_BLOCKS: usize = 1024;
const MIN_CHUNK_ROWS: usize = 256;
/// Threads of experts_util (kUtilThreads).
const UTIL_THREADS: u32 = 256;
const WARP: u64 = 32;

/// A plan's arrays on the device.
pub type DevicePlan<'a> = PlanParts<CudaView<'a, u32>>;

/// Checks the plan's offsets against its counts and `rows`, and
/// `token_of_row < tokens` when given; reports to `status`.
fn check_plan(
    device: &CudaDevice,
    stream: &Arc<CudaStream>,
    plan: &DevicePlan<'_>,
    rows: usize,
    tokens: Option<usize>,
    status: &mut CudaViewMut<u64>,
) -> Result<()> {
    let experts = plan.counts.len();
    check_len("plan.offsets", plan.offsets.len(), experts + 1)?;
    check_len("plan.token_of_row", plan.token_of_row.len(), rows)?;
    check_len("status", status.len(), 1)?;
    // Row blocks of every schedule sum to at most rows + experts.
    u32_arg("rows + experts", rows + experts)?;
    let (experts_arg, rows_arg) = (u32_arg("experts", experts)?, u32_arg("rows", rows)?);
    let tokens_arg = u32_arg("tokens", tokens.unwrap_or(0))?;
    let check_tokens = u32::from(tokens.is_some());
    let function = device.function(MODULE, "experts_check_plan")?;
    let mut launch = stream.launch_builder(&function);
    launch
        .arg(&plan.counts)
        .arg(&plan.offsets)
        .arg(&plan.token_of_row)
        .arg(&experts_arg)
        .arg(&rows_arg)
        .arg(&tokens_arg)
        .arg(&check_tokens)
        .arg(status);
    // SAFETY: counts holds E and offsets E + 1 elements, token_of_row R
    // (checked above); the kernel reads no further.
    launched("experts_check_plan", unsafe {
        launch.launch(grid_stride_config(experts.max(rows) as u64 + 1))
    })
}

/// The slot naming each row, plus one (`row_slot`, R entries), checking that
/// `row_of_slot [tokens, k]` names every row once, by a slot of its token.
fn index_slots(
    device: &CudaDevice,
    stream: &Arc<CudaStream>,
    plan: &DevicePlan<'_>,
    tokens: usize,
    k: usize,
    rows: usize,
    status: &mut CudaViewMut<u64>,
) -> Result<CudaSlice<u32>> {
    let slots = tokens * k;
    check_len("plan.row_of_slot", plan.row_of_slot.len(), slots)?;
    let (k_arg, rows_arg, slots_arg) = (u32_arg("k", k)?, u32_arg("rows", rows)?, slots as u64);
    let mut row_slot = alloc_zeros::<u32>(stream, rows)?;
    let function = device.function(MODULE, "experts_index_slots")?;
    let mut launch = stream.launch_builder(&function);
    launch
        .arg(&plan.row_of_slot)
        .arg(&plan.token_of_row)
        .arg(&slots_arg)
        .arg(&k_arg)
        .arg(&rows_arg)
        .arg(&mut row_slot)
        .arg(&mut *status);
    // SAFETY: row_of_slot holds T*k entries; token_of_row and row_slot are
    // indexed by rows below R only.
    launched("experts_index_slots", unsafe {
        launch.launch(grid_stride_config(slots_arg))
    })?;
    let function = device.function(MODULE, "experts_check_named")?;
    let mut launch = stream.launch_builder(&function);
    launch.arg(&row_slot).arg(&rows_arg).arg(status);
    // SAFETY: row_slot holds R entries.
    launched("experts_check_named", unsafe {
        launch.launch(grid_stride_config(rows as u64))
    })?;
    Ok(row_slot)
}

/// Row-block offsets `[E + 1]` for blocks of `rows_per_block` rows: each
/// expert's block count (zero once the plan is rejected), scanned on the
/// device.
fn schedule(
    device: &CudaDevice,
    stream: &Arc<CudaStream>,
    offsets: &CudaView<u32>,
    rows_per_block: usize,
    status: &CudaViewMut<u64>,
) -> Result<CudaSlice<u32>> {
    let experts = offsets.len() - 1;
    let (experts_arg, rows_per_block) = (u32_arg("experts", experts)?, u32_arg("rows_per_block", rows_per_block)?);
    let mut blocks = alloc_uninit::<u32>(stream, experts + 1)?;
    let function = device.function(MODULE, "experts_row_blocks")?;
    let mut launch = stream.launch_builder(&function);
    let status = status.as_view();
    launch
        .arg(offsets)
        .arg(&experts_arg)
        .arg(&rows_per_block)
        .arg(&status)
        .arg(&mut blocks);
    // SAFETY: offsets and blocks hold E + 1 entries.
    launched("experts_row_blocks", unsafe {
        launch.launch(grid_stride_config(experts as u64 + 1))
    })?;
    scan_exclusive(device, stream, &mut blocks)?;
    Ok(blocks)
}

/// A grid for a GEMM over `rows` rows in blocks of `rows_per_block` and
/// `col_tiles` column tiles: the upper bound of the scheduled tiles
/// (`ceil(R / rows_per_block) + E` row blocks), capped.
fn gemm_config(rows: usize, experts: usize, rows_per_block: usize, col_tiles: usize, threads: u32) -> LaunchConfig {
    let row_blocks = rows.div_ceil(rows_per_block) as u64 + experts as u64;
    let blocks = (row_blocks * col_tiles as u64).clamp(1, MAX_GEMM_BLOCKS);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn check_layer_lens<T>(
    x: &CudaView<T>,
    plan: &DevicePlan<'_>,
    weights: &CudaView<T>,
    shape: &LayerShape,
) -> Result<()> {
    check_len("x", x.len(), shape.inputs * shape.din)?;
    check_len("weights", weights.len(), shape.experts * shape.din * shape.width())?;
    check_len("plan.counts", plan.counts.len(), shape.experts)
}

/// The shape arguments every layer kernel takes: E, Din, Dout, Dout', the
/// activation code.
struct LayerArgs {
    experts: u32,
    din: u32,
    dout: u32,
    width: u32,
    activation: u32,
}

impl LayerArgs {
    fn of(shape: &LayerShape) -> Result<LayerArgs> {
        Ok(LayerArgs {
            experts: u32_arg("experts", shape.experts)?,
            din: u32_arg("din", shape.din)?,
            dout: u32_arg("dout", shape.dout)?,
            width: u32_arg("width", shape.width())?,
            activation: shape.activation.code(),
        })
    }
}

/// Whether the forward can take the tensor-core tile: bf16/f16, Din and Dout
/// multiples of 8 and 16-byte aligned x and W, so that every 16-byte copy is
/// whole.
fn tensor_cores<T: FloatElement>(
    stream: &Arc<CudaStream>,
    x: &CudaView<T>,
    weights: &CudaView<T>,
    shape: &LayerShape,
) -> bool {
    // Only the addresses are wanted: the guards may record their events now,
    // the launch's own arguments record them again after the kernel.
    let aligned = |address: u64| address % 16 == 0;
    T::DTYPE != DType::F32
        && shape.din % 8 == 0
        && shape.dout % 8 == 0
        && aligned(x.device_ptr(stream).0)
        && aligned(weights.device_ptr(stream).0)
}

/// `h = x[token_of_row] W[e] + b[e]`, `y = act(h)`, rows in plan order, one
/// GEMM launch for all experts. `x` is `[T, Din]` (or `[R, Din]` for the rows
/// variant), `weights` `[E, Din, Dout']`, `bias` `[E, Dout']`, `h`
/// `[R, Dout']`, `y` `[R, Dout]`. A plan that does not fit is reported to
/// `status` and leaves h and y unwritten.
#[allow(clippy::too_many_arguments)]
pub fn layer_forward<T: FloatElement>(
    device: &CudaDevice,
    stream: &Arc<CudaStream>,
    x: &CudaView<T>,
    plan: &DevicePlan<'_>,
    weights: &CudaView<T>,
    bias: Option<&CudaView<T>>,
    shape: &LayerShape,
    h: &mut CudaViewMut<T>,
    y: &mut CudaViewMut<T>,
    status: &mut CudaViewMut<u64>,
) -> Result<()> {
    check_layer_lens(x, plan, weights, shape)?;
    if let Some(bias) = bias {
        check_len("bias", bias.len(), shape.experts * shape.width())?;
    }
    check_len("h", h.len(), shape.rows * shape.width())?;
    check_len("y", y.len(), shape.rows * shape.dout)?;
    check_plan(device, stream, plan, shape.rows, shape.tokens(), status)?;
    let (engine, tile_rows, tile_cols, threads) = if tensor_cores(stream, x, weights, shape) {
        ("mma", MMA_ROWS, MMA_COLS, MMA_THREADS)
    } else {
        ("simt", SIMT_ROWS, SIMT_COLS, SIMT_THREADS)
    };
    let row_blocks = schedule(device, stream, &plan.offsets, tile_rows, status)?;
    // SwiGlu tiles hold (gate, up) column pairs.
    let per_tile = tile_cols / (shape.width() / shape.dout);
    let config = gemm_config(
        shape.rows,
        shape.experts,
        tile_rows,
        shape.dout.div_ceil(per_tile),
        threads,
    );
    let args = LayerArgs::of(shape)?;
    // Optional operands go in as raw addresses (null when absent).
    let mut pointers = Pointers::new(stream);
    let sources = pointers.read_optional(shape.tokens().map(|_| &plan.token_of_row));
    let bias = pointers.read_optional(bias);
    let name = format!("experts_forward_{engine}_{}", T::DTYPE.kernel_suffix());
    let function = device.function(MODULE, &name)?;
    let mut launch = stream.launch_builder(&function);
    launch
        .arg(x)
        .arg(&sources)
        .arg(weights)
        .arg(&bias)
        .arg(&plan.offsets)
        .arg(&row_blocks)
        .arg(&args.experts)
        .arg(&args.din)
        .arg(&args.dout)
        .arg(&args.activation)
        .arg(h)
        .arg(y);
    // SAFETY: lengths checked above. Tiles exist only when the plan check
    // passed (else row_blocks are all zero), so every row is below R, every
    // gathered token below T, every expert below E; columns stay below
    // Dout' and k below Din. The mma engine runs only when its 16-byte copies
    // are aligned and whole (tensor_cores).
    launched("experts_forward", unsafe { launch.launch(config) })
}

/// How dW cuts each expert's rows: chunks of `chunk_rows`, and whether that
/// leaves at most one chunk per expert (then the kernel writes dW directly).
fn dweights_chunks(rows: usize, tiles_per_chunk: usize) -> (usize, bool) {
    let splits = DWEIGHTS_BLOCKS.div_ceil(tiles_per_chunk.max(1));
    let chunk_rows = rows.div_ceil(splits).max(MIN_CHUNK_ROWS).next_multiple_of(16);
    (chunk_rows, chunk_rows >= rows)
}

/// The layer's gradients from `dy [R, Dout]`: `dh = dy act'(h)`, `dx`
/// (`[T, Din]`, each token's rows summed in slot order through
/// `row_of_slot [T, k]`; `[R, Din]` for the rows variant), `dweights`
/// `[E, Din, Dout']` and `dbias` `[E, Dout']` (rows summed in plan order, in
/// chunks merged in order), all f32. A plan that does not fit is reported to
/// `status`; the outputs are then unspecified.
#[allow(clippy::too_many_arguments)]
pub fn layer_backward<T: FloatElement>(
    device: &CudaDevice,
    stream: &Arc<CudaStream>,
    dy: &CudaView<f32>,
    x: &CudaView<T>,
    plan: &DevicePlan<'_>,
    weights: &CudaView<T>,
    h: &CudaView<T>,
    shape: &LayerShape,
    k: usize,
    dx: &mut CudaViewMut<f32>,
    dweights: &mut CudaViewMut<f32>,
    mut dbias: Option<&mut CudaViewMut<f32>>,
    status: &mut CudaViewMut<u64>,
) -> Result<()> {
    let (rows, din, width) = (shape.rows, shape.din, shape.width());
    check_layer_lens(x, plan, weights, shape)?;
    check_len("dy", dy.len(), rows * shape.dout)?;
    check_len("h", h.len(), rows * width)?;
    check_len("dx", dx.len(), shape.inputs * din)?;
    check_len("dweights", dweights.len(), weights.len())?;
    if let Some(dbias) = &dbias {
        check_len("dbias", dbias.len(), shape.experts * width)?;
    }
    check_plan(device, stream, plan, rows, shape.tokens(), status)?;
    if let Some(tokens) = shape.tokens() {
        index_slots(device, stream, plan, tokens, k, rows, status)?;
    }
    let args = LayerArgs::of(shape)?;
    let suffix = T::DTYPE.kernel_suffix();

    let mut dh = alloc_uninit::<f32>(stream, rows * width)?;
    let rows_arg = rows as u64;
    let function = device.function(MODULE, &format!("experts_dh_{suffix}"))?;
    let mut launch = stream.launch_builder(&function);
    launch
        .arg(dy)
        .arg(h)
        .arg(&rows_arg)
        .arg(&args.dout)
        .arg(&args.activation)
        .arg(&mut dh);
    // SAFETY: dy holds R*Dout, h and dh R*Dout' elements.
    launched("experts_dh", unsafe {
        launch.launch(grid_stride_config(rows_arg * u64::from(args.dout)))
    })?;

    // dx_rows = dh W^T, into dx itself for the rows variant.
    let row_blocks = schedule(device, stream, &plan.offsets, SIMT_ROWS, status)?;
    let mut dx_rows = match shape.variant {
        Variant::Tokens => Some(alloc_uninit::<f32>(stream, rows * din)?),
        Variant::Rows => None,
    };
    let function = device.function(MODULE, &format!("experts_dx_rows_{suffix}"))?;
    let mut launch = stream.launch_builder(&function);
    launch
        .arg(&dh)
        .arg(weights)
        .arg(&plan.offsets)
        .arg(&row_blocks)
        .arg(&args.experts)
        .arg(&args.din)
        .arg(&args.width);
    match dx_rows.as_mut() {
        Some(buffer) => launch.arg(buffer),
        None => launch.arg(&mut *dx),
    };
    let config = gemm_config(rows, shape.experts, SIMT_ROWS, din.div_ceil(SIMT_COLS), SIMT_THREADS);
    // SAFETY: tiles exist only for a plan that passed the check: rows below
    // R, experts below E, columns below Din, k below Dout'; the target holds
    // R*Din elements (dx for the rows variant, checked above).
    launched("experts_dx_rows", unsafe { launch.launch(config) })?;
    if let (Some(dx_rows), Some(tokens)) = (&dx_rows, shape.tokens()) {
        let (tokens_arg, k_arg, rows_arg) = (u32_arg("tokens", tokens)?, u32_arg("k", k)?, u32_arg("rows", rows)?);
        let function = device.function(MODULE, "experts_gather_dx")?;
        let mut launch = stream.launch_builder(&function);
        let status_view = status.as_view();
        launch
            .arg(dx_rows)
            .arg(&plan.row_of_slot)
            .arg(&tokens_arg)
            .arg(&k_arg)
            .arg(&args.din)
            .arg(&rows_arg)
            .arg(&status_view)
            .arg(&mut *dx);
        // SAFETY: row_of_slot holds T*k entries (index_slots checked), rows
        // read are below R; dx holds T*Din elements.
        launched("experts_gather_dx", unsafe {
            launch.launch(grid_stride_config(tokens as u64 * din as u64))
        })?;
    }

    // dW (and db as the row of ones' output) over row chunks.
    let has_bias = u32::from(dbias.is_some());
    let m_total = din + has_bias as usize;
    let tiles_per_chunk = m_total.div_ceil(SIMT_ROWS) * width.div_ceil(SIMT_COLS);
    let (chunk_rows, direct) = dweights_chunks(rows, tiles_per_chunk);
    let chunk_offsets = schedule(device, stream, &plan.offsets, chunk_rows, status)?;
    let mut partials = if direct {
        // Experts without rows get no chunk: their gradients stay zero.
        stream
            .memset_zeros(&mut *dweights)
            .map_err(crate::cuda::driver_error("cuMemsetD8Async"))?;
        if let Some(dbias) = dbias.as_mut() {
            stream
                .memset_zeros(&mut **dbias)
                .map_err(crate::cuda::driver_error("cuMemsetD8Async"))?;
        }
        None
    } else {
        let chunks = rows.div_ceil(chunk_rows) + shape.experts;
        Some(alloc_uninit::<f32>(stream, chunks * m_total * width)?)
    };
    let chunk_rows_arg = u32_arg("chunk_rows", chunk_rows)?;
    let mut pointers = Pointers::new(stream);
    let partials_address = pointers.write_optional(partials.as_mut());
    let dweights_address = pointers.write(dweights);
    let dbias_address = pointers.write_optional(dbias);
    let sources = pointers.read_optional(shape.tokens().map(|_| &plan.token_of_row));
    let function = device.function(MODULE, &format!("experts_dweights_{suffix}"))?;
    let mut launch = stream.launch_builder(&function);
    launch
        .arg(x)
        .arg(&sources)
        .arg(&dh)
        .arg(&plan.offsets)
        .arg(&chunk_offsets)
        .arg(&args.experts)
        .arg(&args.din)
        .arg(&args.width)
        .arg(&has_bias)
        .arg(&chunk_rows_arg)
        .arg(&partials_address)
        .arg(&dweights_address)
        .arg(&dbias_address);
    let config = gemm_config(rows, shape.experts, chunk_rows, tiles_per_chunk, SIMT_THREADS);
    // SAFETY: chunks exist only for a plan that passed the check (rows below
    // R, tokens below T). Chunk c < ceil(R / chunk_rows) + E, the partial
    // buffers allocated; without them each expert has at most one chunk and
    // writes its own dW (E*Din*Dout') and db (E*Dout', present iff has_bias).
    launched("experts_dweights", unsafe { launch.launch(config) })?;
    if !direct {
        let function = device.function(MODULE, "experts_merge_dweights")?;
        let mut launch = stream.launch_builder(&function);
        launch
            .arg(&partials_address)
            .arg(&chunk_offsets)
            .arg(&args.experts)
            .arg(&args.din)
            .arg(&args.width)
            .arg(&has_bias)
            .arg(&dweights_address)
            .arg(&dbias_address);
        let outputs = (m_total * width * shape.experts) as u64;
        // SAFETY: chunk_offsets[E] chunks were written above (fewer than
        // allocated); the outputs hold E*Din*Dout' and E*Dout' elements.
        launched("experts_merge_dweights", unsafe {
            launch.launch(grid_stride_config(outputs))
        })?;
    }
    // The guards record after the merge; the partial buffers are freed in
    // stream order after it.
    drop(pointers);
    drop(partials);
    Ok(())
}

/// The combine's lengths, the plan checks and the slot of each row (plus one).
#[allow(clippy::too_many_arguments)]
fn check_combine<T>(
    device: &CudaDevice,
    stream: &Arc<CudaStream>,
    y: &CudaView<T>,
    weights: &CudaView<f32>,
    plan: &DevicePlan<'_>,
    res: Option<&CudaView<T>>,
    rho: Option<&CudaView<f32>>,
    shape: &CombineShape,
    status: &mut CudaViewMut<u64>,
) -> Result<CudaSlice<u32>> {
    check_len("y", y.len(), shape.rows * shape.dout)?;
    check_len("weights", weights.len(), shape.tokens * shape.k)?;
    check_len("plan.counts", plan.counts.len(), shape.experts)?;
    if let Some(res) = res {
        check_len("res", res.len(), shape.tokens * shape.dout)?;
    }
    if let Some(rho) = rho {
        check_len("rho", rho.len(), shape.tokens)?;
        if res.is_none() {
            return Err(Error::invalid("rho", "given without res (it scales res)"));
        }
    }
    check_plan(device, stream, plan, shape.rows, Some(shape.tokens), status)?;
    index_slots(device, stream, plan, shape.tokens, shape.k, shape.rows, status)
}

/// The combine's size arguments: T, k, Dout, R.
fn combine_args(shape: &CombineShape) -> Result<[u32; 4]> {
    Ok([
        u32_arg("tokens", shape.tokens)?,
        u32_arg("k", shape.k)?,
        u32_arg("dout", shape.dout)?,
        u32_arg("rows", shape.rows)?,
    ])
}

/// `out[t] = rho[t] res[t] + sum_j weights[t, j] y[row_of_slot[t, j]]` (slots
/// in order) and `util[e]` = the sum over e's rows of `|w| ||y[r]||_2`. `y` is
/// `[R, Dout]`, `weights` `[T, k]`, `res` and `out` `[T, Dout]`, `rho` `[T]`,
/// `util` `[E]`.
#[allow(clippy::too_many_arguments)]
pub fn combine<T: FloatElement>(
    device: &CudaDevice,
    stream: &Arc<CudaStream>,
    y: &CudaView<T>,
    weights: &CudaView<f32>,
    plan: &DevicePlan<'_>,
    res: Option<&CudaView<T>>,
    rho: Option<&CudaView<f32>>,
    shape: &CombineShape,
    out: &mut CudaViewMut<T>,
    util: &mut CudaViewMut<f32>,
    status: &mut CudaViewMut<u64>,
) -> Result<()> {
    let row_slot = check_combine(device, stream, y, weights, plan, res, rho, shape, status)?;
    check_len("out", out.len(), shape.tokens * shape.dout)?;
    check_len("util", util.len(), shape.experts)?;
    let [tokens, k, dout, rows] = combine_args(shape)?;
    let suffix = T::DTYPE.kernel_suffix();
    let status = status.as_view();
    let mut pointers = Pointers::new(stream);
    let (res, rho) = (pointers.read_optional(res), pointers.read_optional(rho));
    let function = device.function(MODULE, &format!("experts_combine_{suffix}"))?;
    let mut launch = stream.launch_builder(&function);
    launch
        .arg(y)
        .arg(weights)
        .arg(&plan.row_of_slot)
        .arg(&res)
        .arg(&rho)
        .arg(&tokens)
        .arg(&k)
        .arg(&dout)
        .arg(&rows)
        .arg(&status)
        .arg(out);
    // SAFETY: weights and row_of_slot hold T*k entries, res and out T*Dout,
    // rho T; rows read are below R (the kernel skips others), y holds R*Dout.
    launched("experts_combine", unsafe {
        launch.launch(grid_stride_config(u64::from(tokens) * u64::from(dout)))
    })?;

    let mut norms = alloc_uninit::<f32>(stream, shape.rows)?;
    let function = device.function(MODULE, &format!("experts_row_norms_{suffix}"))?;
    let mut launch = stream.launch_builder(&function);
    launch
        .arg(y)
        .arg(weights)
        .arg(&row_slot)
        .arg(&rows)
        .arg(&dout)
        .arg(&status)
        .arg(&mut norms);
    // SAFETY: runs only for a clean plan, whose row_slot entries are slots
    // below T*k plus one; y holds R*Dout, norms R.
    launched("experts_row_norms", unsafe {
        launch.launch(grid_stride_config(u64::from(rows) * WARP))
    })?;

    let experts = u32_arg("experts", shape.experts)?;
    let function = device.function(MODULE, "experts_util")?;
    let mut launch = stream.launch_builder(&function);
    launch
        .arg(&norms)
        .arg(&plan.offsets)
        .arg(&experts)
        .arg(&status)
        .arg(util);
    let config = LaunchConfig {
        grid_dim: (experts.clamp(1, u16::MAX.into()), 1, 1),
        block_dim: (UTIL_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: runs only for a clean plan, whose offsets lie within R (norms);
    // util holds E entries.
    launched("experts_util", unsafe { launch.launch(config) })
}

/// The gradients of [`combine`] from `dout [T, Dout]`: `dy [R, Dout]`,
/// `dweights [T, k]` (0 for empty slots), `dres [T, Dout]` (with res),
/// `drho [T]` (with rho), all f32.
#[allow(clippy::too_many_arguments)]
pub fn combine_backward<T: FloatElement>(
    device: &CudaDevice,
    stream: &Arc<CudaStream>,
    dout: &CudaView<f32>,
    y: &CudaView<T>,
    weights: &CudaView<f32>,
    plan: &DevicePlan<'_>,
    res: Option<&CudaView<T>>,
    rho: Option<&CudaView<f32>>,
    shape: &CombineShape,
    dy: &mut CudaViewMut<f32>,
    dweights: &mut CudaViewMut<f32>,
    dres: Option<&mut CudaViewMut<f32>>,
    drho: Option<&mut CudaViewMut<f32>>,
    status: &mut CudaViewMut<u64>,
) -> Result<()> {
    let row_slot = check_combine(device, stream, y, weights, plan, res, rho, shape, status)?;
    check_len("dout", dout.len(), shape.tokens * shape.dout)?;
    check_len("dy", dy.len(), shape.rows * shape.dout)?;
    check_len("dweights", dweights.len(), shape.tokens * shape.k)?;
    let [tokens, k, width, rows] = combine_args(shape)?;
    let suffix = T::DTYPE.kernel_suffix();
    let status = status.as_view();

    let function = device.function(MODULE, "experts_combine_backward_rows")?;
    let mut launch = stream.launch_builder(&function);
    launch
        .arg(dout)
        .arg(weights)
        .arg(&row_slot)
        .arg(&rows)
        .arg(&k)
        .arg(&width)
        .arg(&status)
        .arg(dy);
    // SAFETY: runs only for a clean plan: row_slot names slots below T*k,
    // their tokens below T; dy holds R*Dout.
    launched("experts_combine_backward_rows", unsafe {
        launch.launch(grid_stride_config(u64::from(rows) * u64::from(width)))
    })?;

    let slots = u64::from(tokens) * u64::from(k);
    let function = device.function(MODULE, &format!("experts_combine_backward_slots_{suffix}"))?;
    let mut launch = stream.launch_builder(&function);
    launch
        .arg(dout)
        .arg(y)
        .arg(&plan.row_of_slot)
        .arg(&slots)
        .arg(&k)
        .arg(&width)
        .arg(&rows)
        .arg(&status)
        .arg(dweights);
    // SAFETY: row_of_slot and dweights hold T*k entries; rows read are below R.
    launched("experts_combine_backward_slots", unsafe {
        launch.launch(grid_stride_config(slots * WARP))
    })?;

    let (Some(res), Some(dres)) = (res, dres) else {
        return Ok(());
    };
    check_len("dres", dres.len(), shape.tokens * shape.dout)?;
    if let Some(drho) = &drho {
        check_len("drho", drho.len(), shape.tokens)?;
    }
    let mut pointers = Pointers::new(stream);
    let (rho, drho) = (pointers.read_optional(rho), pointers.write_optional(drho));
    let function = device.function(MODULE, &format!("experts_combine_backward_tokens_{suffix}"))?;
    let mut launch = stream.launch_builder(&function);
    launch
        .arg(dout)
        .arg(res)
        .arg(&rho)
        .arg(&tokens)
        .arg(&width)
        .arg(dres)
        .arg(&drho);
    // SAFETY: dout, res and dres hold T*Dout elements, rho and drho T (or
    // are null).
    launched("experts_combine_backward_tokens", unsafe {
        launch.launch(grid_stride_config(u64::from(tokens) * WARP))
    })
}
