//! Routing on a CUDA device, on cudarc views and a stream
//! (kernels/routing.cu). Nothing here synchronises: the data checks go to a
//! report on the device that the caller reads when it chooses
//! ([`read_report`]).
//!
//! The forward is one fused kernel over the logits, the grouping primitive
//! for the plan, and three small kernels (plan, fixed-order reduction of the
//! per-block statistics, losses); the backward is one kernel.

use super::{LossCoefficients, RoutingBuffers, RoutingConfig, Score};
use crate::cuda::{driver_error, grid_stride_config, launched, CudaDevice, STATUS_CLEAN};
use crate::dtype::FloatElement;
use crate::error::{Error, Result};
use crate::grouping::cuda::group_by_key;
use crate::ops::{check_len, u32_arg};
use crate::tensor::{alloc_uninit, alloc_zeros};
use cudarc::driver::PushKernelArg;
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, LaunchArgs, LaunchConfig};
use std::sync::Arc;

const MODULE: &str = "routing";
/// 4-byte words per column of a routing row in a lane group's shared memory
/// (kBackwardWords).
const BACKWARD_ROW_WORDS: usize = 2;
/// Shared memory a block may use without opting in.
const DEFAULT_SHARED_BYTES: usize = 48 * 1024;
const MAX_WARPS_PER_BLOCK: usize = 8;
/// The forward aims at this many blocks (each writes one partial row of
/// statistics); a function of the shapes only, so the sums' order is too.
const FORWARD_BLOCKS: usize = 1024;
const MAX_BACKWARD_BLOCKS: usize = 65_535;
/// Threads of routing_finalize (kFinalizeThreads).
const FINALIZE_THREADS: u32 = 256;
/// Flags of the row kernels (kSigmoid, kRenormalize, kRankSelection).
const FLAG_SIGMOID: u32 = 1;
const FLAG_RENORMALIZE: u32 = 2;
const FLAG_RANK_SELECTION: u32 = 4;

/// What the kernels take for an absent optional operand: a null pointer.
static NULL_POINTER: u64 = 0;

/// The forward's outputs on the device; `token_of_row` has room for T * k
/// rows, of which the first R (`offsets[E]`, the report's third word) are
/// the plan's ([`first_rows`]).
pub type DeviceRouting = RoutingBuffers<CudaSlice<u32>, CudaSlice<f32>>;

/// A fresh report for [`forward`]: three words, the lowest flat position of a
/// non-finite logit and the lowest position of a token-mask entry other than
/// 0 or 1 (both `u64::MAX` while clean), and R, the number of dispatched rows.
pub fn new_report(stream: &Arc<CudaStream>) -> Result<CudaSlice<u64>> {
    stream
        .clone_htod(&[STATUS_CLEAN, STATUS_CLEAN, 0])
        .map_err(driver_error("cuMemcpyHtoDAsync"))
}

/// A report read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// The lowest flat position of a non-finite logit the kernel reported.
    pub non_finite: Option<u64>,
    /// The lowest position of a token mask entry that is not 0 or 1.
    pub bad_token_mask: Option<u64>,
    /// R, the dispatched rows.
    pub rows: u64,
}

/// Reads a report (a synchronisation).
pub fn read_report(stream: &Arc<CudaStream>, report: &CudaSlice<u64>) -> Result<Report> {
    let words = stream.clone_dtoh(report).map_err(driver_error("cuMemcpyDtoH"))?;
    let &[non_finite, bad_token_mask, rows] = words.as_slice() else {
        return Err(Error::shape("report", "[3]", &[words.len()]));
    };
    let flagged = |word: u64| (word != STATUS_CLEAN).then_some(word);
    Ok(Report {
        non_finite: flagged(non_finite),
        bad_token_mask: flagged(bad_token_mask),
        rows,
    })
}

/// The first `rows` entries of `token_of_row` in a buffer of their own (the
/// buffer itself when it holds exactly that many).
pub fn first_rows(stream: &Arc<CudaStream>, token_of_row: CudaSlice<u32>, rows: usize) -> Result<CudaSlice<u32>> {
    if rows == token_of_row.len() {
        return Ok(token_of_row);
    }
    let source = token_of_row
        .try_slice(..rows)
        .ok_or_else(|| Error::invalid("rows", format!("{rows} rows, but room for {}", token_of_row.len())))?;
    let mut exact = alloc_uninit::<u32>(stream, rows)?;
    if rows > 0 {
        stream
            .memcpy_dtod(&source, &mut exact)
            .map_err(driver_error("cuMemcpyDtoDAsync"))?;
    }
    Ok(exact)
}

/// The forward's shared words per lane group (kForwardRowWords per column,
/// kForwardExpertWords per expert, one for the z-loss sum).
fn forward_words(config: &RoutingConfig) -> usize {
    3 * config.group_experts() + 2 * config.experts + 1
}

/// How the row kernels are launched: lane groups of `group_size` lanes, each
/// routing one row of N columns at a time with `words` words of shared memory.
struct RowLayout {
    group_size: u32,
    groups_per_block: usize,
    shared_bytes: u32,
}

impl RowLayout {
    /// Fills a block with as many lane groups as fit in the default shared
    /// memory (at most 8 warps); one warp that needs more opts the function in.
    fn new(device: &CudaDevice, function: &CudaFunction, config: &RoutingConfig, words: usize) -> Result<RowLayout> {
        let (columns, experts) = (config.group_experts(), config.experts);
        let group_size = columns.next_power_of_two().min(32);
        let groups_per_warp = 32 / group_size;
        let warp_bytes = groups_per_warp * words * 4;
        let warps = (DEFAULT_SHARED_BYTES / warp_bytes).clamp(1, MAX_WARPS_PER_BLOCK);
        let shared_bytes = warps * warp_bytes;
        if shared_bytes > DEFAULT_SHARED_BYTES {
            device.allow_dynamic_shared(
                function,
                shared_bytes,
                "logits",
                &format!("one row of {columns} experts (of {experts})"),
            )?;
        }
        Ok(RowLayout {
            group_size: group_size as u32,
            groups_per_block: warps * groups_per_warp,
            shared_bytes: shared_bytes as u32,
        })
    }

    fn launch_config(&self, blocks: usize) -> Result<LaunchConfig> {
        Ok(LaunchConfig {
            grid_dim: (u32_arg("blocks", blocks)?, 1, 1),
            block_dim: (self.groups_per_block as u32 * self.group_size, 1, 1),
            shared_mem_bytes: self.shared_bytes,
        })
    }
}

/// The row kernels' flags; rank selection when its N comparisons per column
/// cost less than k lane-group arg-maxes.
fn row_flags(config: &RoutingConfig, group_size: u32) -> u32 {
    let columns = config.group_experts();
    let columns_per_lane = columns.div_ceil(group_size as usize);
    let round_cost = config.k * (columns_per_lane + 2 * group_size.trailing_zeros() as usize);
    let rank_cost = columns_per_lane * columns;
    let mut flags = 0;
    if config.score == Score::Sigmoid {
        flags |= FLAG_SIGMOID;
    }
    if config.renormalize {
        flags |= FLAG_RENORMALIZE;
    }
    if rank_cost < round_cost {
        flags |= FLAG_RANK_SELECTION;
    }
    flags
}

/// Pushes an optional operand, or a null pointer when it is absent.
fn push_optional<'a, 'b: 'a, 'c: 'b, T>(launch: &mut LaunchArgs<'a>, operand: Option<&'b CudaView<'c, T>>) {
    match operand {
        Some(view) => launch.arg(view),
        None => launch.arg(&NULL_POINTER),
    };
}

/// Checks the lengths of the operands both passes take.
fn check_operands<T>(
    logits: &CudaView<T>,
    expert_mask: Option<&CudaView<u32>>,
    token_mask: Option<&CudaView<u32>>,
    config: &RoutingConfig,
) -> Result<()> {
    check_len("logits", logits.len(), config.tokens * config.experts)?;
    if let Some(mask) = expert_mask {
        check_len("expert_mask", mask.len(), config.experts)?;
    }
    if let Some(mask) = token_mask {
        check_len("token_mask", mask.len(), config.tokens)?;
    }
    Ok(())
}

/// Routes `logits: [T, E]` within the config's expert groups. `config` must
/// come from [`RoutingConfig::new`] or [`RoutingConfig::new_grouped`] with
/// this expert mask (entries 0 or 1: k fits every group), and the bias must
/// be finite: the op API checks both on the host. `report` is a fresh [`new_report`]; a bad
/// token-mask entry or a non-finite logit is recorded there, not returned.
#[allow(clippy::too_many_arguments)]
pub fn forward<T: FloatElement>(
    device: &CudaDevice,
    stream: &Arc<CudaStream>,
    logits: &CudaView<T>,
    expert_mask: Option<&CudaView<u32>>,
    token_mask: Option<&CudaView<u32>>,
    selection_bias: Option<&CudaView<f32>>,
    config: &RoutingConfig,
    report: &mut CudaViewMut<u64>,
) -> Result<DeviceRouting> {
    let RoutingConfig { tokens, experts, .. } = *config;
    let rows = config.routing_rows();
    check_operands(logits, expert_mask, token_mask, config)?;
    if let Some(bias) = selection_bias {
        check_len("selection_bias", bias.len(), experts)?;
    }
    check_len("report", report.len(), 3)?;
    let slots = config.slots();
    let experts_arg = u32_arg("experts", experts)?;
    let k_arg = u32_arg("k", config.k)?;
    let slots_arg = u32_arg("T * k", slots)?;
    let mut out = DeviceRouting {
        indices: alloc_uninit(stream, slots)?,
        weights: alloc_uninit(stream, slots)?,
        counts: alloc_zeros(stream, experts)?,
        offsets: alloc_zeros(stream, experts + 1)?,
        token_of_row: alloc_uninit(stream, slots)?,
        row_of_slot: alloc_uninit(stream, slots)?,
        gate_mass: alloc_zeros(stream, experts)?,
        lb_loss: alloc_zeros(stream, 1)?,
        z_loss: alloc_zeros(stream, 1)?,
        grad_scales: alloc_zeros(stream, experts + 1)?,
    };
    if tokens == 0 {
        stream
            .memset_zeros(&mut report.slice_mut(2..3))
            .map_err(driver_error("cuMemsetD8Async"))?;
        return Ok(out);
    }

    // 1. The fused row kernel: indices, weights, grouping keys, partial sums.
    let function = device.function(MODULE, &format!("routing_forward_{}", T::DTYPE.kernel_suffix()))?;
    let layout = RowLayout::new(device, &function, config, forward_words(config))?;
    let rows_per_group = rows.div_ceil(layout.groups_per_block * FORWARD_BLOCKS);
    let blocks = rows.div_ceil(layout.groups_per_block * rows_per_group);
    let columns = 2 * experts + 1;
    let mut expert_keys = alloc_uninit::<u32>(stream, slots)?;
    let mut partials = alloc_uninit::<f32>(stream, blocks * columns)?;
    let (groups_arg, group_experts_arg) = (u32_arg("groups", config.groups)?, u32_arg("N", config.group_experts())?);
    let (flags, rows_per_group_arg) = (row_flags(config, layout.group_size), u32_arg("rows", rows_per_group)?);
    let mut launch = stream.launch_builder(&function);
    launch.arg(logits);
    push_optional(&mut launch, expert_mask);
    push_optional(&mut launch, token_mask);
    push_optional(&mut launch, selection_bias);
    let rows_arg = rows as u64;
    launch
        .arg(&rows_arg)
        .arg(&experts_arg)
        .arg(&groups_arg)
        .arg(&group_experts_arg)
        .arg(&k_arg)
        .arg(&flags)
        .arg(&layout.group_size)
        .arg(&rows_per_group_arg)
        .arg(&mut out.indices)
        .arg(&mut out.weights)
        .arg(&mut expert_keys)
        .arg(&mut partials)
        .arg(&mut *report);
    // SAFETY: logits hold T*E = (T*G)*N elements, the masks E and T, the bias
    // E (checked above); indices, weights and expert_keys hold T*G*k,
    // partials blocks * (2E + 1), report 3 words. Block b routes rows below
    // T*G only (token r / G < T, experts (r % G) * N + c < E), and each
    // selected slot is < k. The dynamic shared memory holds every lane
    // group's words (forward_words, RowLayout), opted in when above the
    // default.
    launched("routing_forward", unsafe {
        launch.launch(layout.launch_config(blocks)?)
    })?;

    // 2. The plan: (routing row, slot) positions grouped by expert, E = no
    // group.
    let groups = group_by_key(
        device,
        stream,
        &expert_keys.as_view(),
        experts as u64 + 1,
        Some(experts_arg),
    )?;
    let mut rows_word = report.slice_mut(2..3);
    let plan_counts = device.function(MODULE, "routing_plan_counts")?;
    let mut launch = stream.launch_builder(&plan_counts);
    launch
        .arg(&groups.keys)
        .arg(&groups.starts)
        .arg(&groups.count)
        .arg(&experts_arg)
        .arg(&mut out.counts)
        .arg(&mut out.offsets)
        .arg(&mut rows_word);
    // SAFETY: the first `count` group keys and `count + 1` starts are valid
    // (T*G*k and T*G*k + 1 allocated), the binary search stays in 0..=count;
    // counts holds E, offsets E + 1 entries, rows_word one.
    launched("routing_plan_counts", unsafe {
        launch.launch(grid_stride_config(experts as u64 + 1))
    })?;
    let plan_rows = device.function(MODULE, "routing_plan_rows")?;
    let mut launch = stream.launch_builder(&plan_rows);
    launch
        .arg(&groups.order)
        .arg(&slots_arg)
        .arg(&k_arg)
        .arg(&out.offsets)
        .arg(&experts_arg)
        .arg(&mut out.token_of_row)
        .arg(&mut out.row_of_slot);
    // SAFETY: order is a permutation of 0..T*G*k, and R = offsets[E] <=
    // T*G*k, so every write lands in token_of_row or row_of_slot (T*G*k each).
    launched("routing_plan_rows", unsafe {
        launch.launch(grid_stride_config(slots as u64))
    })?;

    // 3. The statistics: partial rows summed in a fixed order, then the losses.
    let mut totals = alloc_uninit::<f32>(stream, columns)?;
    let (blocks_arg, columns_arg) = (u32_arg("blocks", blocks)?, u32_arg("2E + 1", columns)?);
    let reduce = device.function(MODULE, "routing_reduce_partials")?;
    let mut launch = stream.launch_builder(&reduce);
    launch
        .arg(&partials)
        .arg(&blocks_arg)
        .arg(&columns_arg)
        .arg(&mut totals);
    let reduce_config = LaunchConfig {
        grid_dim: (u32_arg("columns", columns.div_ceil(32))?, 1, 1),
        block_dim: (32, 32, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: partials holds blocks * columns floats, totals columns; block x
    // covers columns 32x..32x + 31 and checks each against columns.
    launched("routing_reduce_partials", unsafe { launch.launch(reduce_config) })?;
    let finalize = device.function(MODULE, "routing_finalize")?;
    let mut launch = stream.launch_builder(&finalize);
    launch.arg(&totals).arg(&out.counts).arg(&out.offsets);
    push_optional(&mut launch, expert_mask);
    launch
        .arg(&experts_arg)
        .arg(&groups_arg)
        .arg(&group_experts_arg)
        .arg(&k_arg)
        .arg(&mut out.gate_mass)
        .arg(&mut out.lb_loss)
        .arg(&mut out.z_loss)
        .arg(&mut out.grad_scales);
    let finalize_config = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (FINALIZE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: one block; totals holds 2E + 1 floats, counts and gate_mass E,
    // offsets and grad_scales E + 1, the losses one each, the mask E = G*N;
    // k >= 1 and G >= 1.
    launched("routing_finalize", unsafe { launch.launch(finalize_config) })?;
    Ok(out)
}

/// `dlogits [T, E]` from the forward's `indices [T * G, k]` and `grad_scales
/// [E + 1]`, `dweights [T * G, k]` and the loss coefficients. The lowest
/// non-finite logit position goes to `status` (one word).
#[allow(clippy::too_many_arguments)]
pub fn backward<T: FloatElement>(
    device: &CudaDevice,
    stream: &Arc<CudaStream>,
    logits: &CudaView<T>,
    expert_mask: Option<&CudaView<u32>>,
    token_mask: Option<&CudaView<u32>>,
    indices: &CudaView<u32>,
    dweights: &CudaView<f32>,
    grad_scales: &CudaView<f32>,
    coefficients: LossCoefficients,
    config: &RoutingConfig,
    dlogits: &mut CudaViewMut<f32>,
    status: &mut CudaViewMut<u64>,
) -> Result<()> {
    let RoutingConfig { tokens, experts, .. } = *config;
    check_operands(logits, expert_mask, token_mask, config)?;
    check_len("indices", indices.len(), config.slots())?;
    check_len("dweights", dweights.len(), config.slots())?;
    check_len("grad_scales", grad_scales.len(), experts + 1)?;
    check_len("dlogits", dlogits.len(), tokens * experts)?;
    check_len("status", status.len(), 1)?;
    if tokens == 0 {
        return Ok(());
    }
    let function = device.function(MODULE, &format!("routing_backward_{}", T::DTYPE.kernel_suffix()))?;
    let rows = config.routing_rows();
    let layout = RowLayout::new(device, &function, config, BACKWARD_ROW_WORDS * config.group_experts())?;
    let blocks = rows.div_ceil(layout.groups_per_block).min(MAX_BACKWARD_BLOCKS);
    let (rows_arg, experts_arg, k_arg) = (rows as u64, u32_arg("experts", experts)?, u32_arg("k", config.k)?);
    let (groups_arg, group_experts_arg) = (u32_arg("groups", config.groups)?, u32_arg("N", config.group_experts())?);
    let flags = row_flags(config, layout.group_size);
    let mut launch = stream.launch_builder(&function);
    launch.arg(logits);
    push_optional(&mut launch, expert_mask);
    push_optional(&mut launch, token_mask);
    launch
        .arg(indices)
        .arg(dweights)
        .arg(grad_scales)
        .arg(&coefficients.lb)
        .arg(&coefficients.z)
        .arg(&rows_arg)
        .arg(&experts_arg)
        .arg(&groups_arg)
        .arg(&group_experts_arg)
        .arg(&k_arg)
        .arg(&flags)
        .arg(&layout.group_size)
        .arg(dlogits)
        .arg(status);
    // SAFETY: logits and dlogits hold T*E = (T*G)*N elements, indices and
    // dweights T*G*k, grad_scales E + 1, the masks E and T, status one word
    // (checked above); lane groups stride over routing rows below T*G, and an
    // index outside the row's group is skipped.
    launched("routing_backward", unsafe {
        launch.launch(layout.launch_config(blocks)?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(experts: usize, k: usize) -> RoutingConfig {
        RoutingConfig::new(64, experts, super::super::TopK::K(k), Score::Softmax, false, None).unwrap()
    }

    #[test]
    fn small_k_selects_by_rounds_and_large_k_by_rank() {
        assert_eq!(row_flags(&config(256, 2), 32) & FLAG_RANK_SELECTION, 0);
        assert_eq!(row_flags(&config(160, 8), 32) & FLAG_RANK_SELECTION, 0);
        assert_ne!(row_flags(&config(160, 160), 32) & FLAG_RANK_SELECTION, 0);
        assert_ne!(row_flags(&config(8, 8), 8) & FLAG_RANK_SELECTION, 0);
    }
}
