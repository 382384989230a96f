//! Scoring on a CUDA device (kernels/scoring.cu, kernels/scoring_topk.cu), on
//! cudarc views and a stream. Every kernel takes one parameter block of raw
//! device pointers and sizes (`params.rs`, `ScoringParams` in
//! kernels/scoring.cuh). How the work is cut into tiles and item chunks
//! ([`Plan`]) depends on the shapes only, so every reduction runs in the same
//! order on every GPU. Data errors (excluded ids, targets, histories) go to
//! the device-side status word and stay there: nothing here synchronises, and
//! [`decode_status`] says what a reported code means.

mod launch;
mod params;
mod plan;

pub use params::{decode_status, DataError};
pub use plan::{cross_entropy_workspace_bytes, Pass, Plan};

use super::{Mixing, RowTerms, ScoringShape};
use crate::cuda::{driver_error, grid_stride_config, CudaDevice};
use crate::dtype::FloatElement;
use crate::error::{Error, Result};
use crate::ops::check_len;
use crate::tensor::alloc_zeros;
use cudarc::driver::{CudaStream, CudaView, CudaViewMut};
use launch::{Launcher, Pointers, MODULE, TOPK_MODULE};
use params::{Params, FLAG_CROSS_ENTROPY, FLAG_IGNORE};
use plan::{too_large, Lens, Workspace, MAX_SIZE};
use std::sync::Arc;

/// The operands every scoring op shares, on the device.
pub struct Operands<'a, T> {
    /// `[B, H, D]`
    pub user: CudaView<'a, T>,
    /// `[B, H]`
    pub gate_logits: CudaView<'a, T>,
    /// `[H, V, D]`, or `[V, D]` when `shape.shared`
    pub items: CudaView<'a, T>,
    /// `[V]`
    pub item_bias: Option<CudaView<'a, f32>>,
    /// Item ids left out of every softmax and every top-n; duplicates allowed.
    pub excluded: Option<CudaView<'a, u32>>,
    /// 1 / temperature.
    pub scale: f32,
    /// How the heads are fused.
    pub mixing: Mixing,
    /// The sizes the buffers must match.
    pub shape: ScoringShape,
}

/// Gradients of the operands on the device, f32, in their layouts; every
/// element is written.
pub struct GradientsMut<'a> {
    /// `[B, H, D]`
    pub user: CudaViewMut<'a, f32>,
    /// `[B, H]`
    pub gate_logits: CudaViewMut<'a, f32>,
    /// The layout of the items.
    pub items: CudaViewMut<'a, f32>,
    /// `[V]`
    pub item_bias: CudaViewMut<'a, f32>,
}

impl<'a, T: FloatElement> Operands<'a, T> {
    fn check(&self) -> Result<()> {
        self.shape.check_buffers(
            self.user.len(),
            self.gate_logits.len(),
            self.items.len(),
            self.item_bias.as_ref().map(|bias| bias.len()),
        )?;
        let excluded = self.excluded.as_ref().map_or(0, |e| e.len());
        if excluded > u32::MAX as usize {
            return Err(too_large("excluded", format!("{excluded} ids must be below 2^32")));
        }
        Ok(())
    }

    fn bind<'p>(&'p self, params: &mut Params, pointers: &mut Pointers<'p>) {
        params.user = pointers.read(&self.user);
        params.gate_logits = pointers.read(&self.gate_logits);
        params.items = pointers.read(&self.items);
        params.item_bias = pointers.read_optional(self.item_bias.as_ref());
        if let Some(excluded) = &self.excluded {
            params.excluded = pointers.read(excluded);
            params.num_excluded = excluded.len() as u32; // checked in `check`
        }
    }
}

/// One call's plan, workspace and parameter block, checked against the
/// operands and the status word.
fn start<T: FloatElement>(operands: &Operands<'_, T>, status: &CudaViewMut<u64>, pass: Pass) -> Result<(Plan, Lens)> {
    let plan = Plan::new(operands.shape, operands.mixing)?;
    operands.check()?;
    check_len("status", status.len(), 1)?;
    Ok((plan, plan.lens(pass)))
}

fn targets_flags(params: &mut Params, ignore: Option<u32>) {
    params.flags |= FLAG_CROSS_ENTROPY;
    if let Some(ignore) = ignore {
        params.flags |= FLAG_IGNORE;
        params.ignore = ignore;
    }
}

/// The materialised scores `[B, V]` into `out`: S (Logits mixing, -inf at
/// excluded items) or P (Probabilities, 0 there). An excluded id >= V goes to
/// `status` (its position).
pub fn scores<T: FloatElement>(
    device: &CudaDevice,
    stream: &Arc<CudaStream>,
    operands: &Operands<'_, T>,
    out: &mut CudaViewMut<f32>,
    status: &mut CudaViewMut<u64>,
) -> Result<()> {
    let (plan, lens) = start(operands, status, Pass::Scores)?;
    let ScoringShape { batch, num_items, .. } = plan.shape;
    check_len("scores", out.len(), batch * num_items)?;
    let mut workspace = Workspace::new(stream, lens)?;
    let mut params = plan.params(operands.scale);
    let mut pointers = Pointers::new(stream);
    operands.bind(&mut params, &mut pointers);
    workspace.bind(&mut params, &mut pointers);
    params.out = pointers.write(out);
    params.status = pointers.write(status);
    let launcher = Launcher::new(device, stream, T::DTYPE, plan);
    // SAFETY: bound above: operands checked, the Scores workspace, status [1].
    unsafe { launcher.prepare(&params)? };
    if batch == 0 {
        return Ok(());
    }
    if plan.probabilities() {
        // SAFETY: the Scores workspace of Probabilities mixing has the row
        // partials and row_lse.
        unsafe { launcher.row_reduction(&mut params, false)? };
    }
    // SAFETY: one block per (item tile, row tile); writes out [B, V] (checked).
    unsafe {
        launcher.launch(
            MODULE,
            "scoring_scores",
            true,
            Plan::tile_grid(plan.item_tiles, plan.row_tiles, 1),
            &params,
        )
    }
}

fn check_gradients(shape: ScoringShape, grads: &GradientsMut<'_>) -> Result<()> {
    shape.check_gradient_buffers(
        grads.user.len(),
        grads.gate_logits.len(),
        grads.items.len(),
        grads.item_bias.len(),
    )
}

/// Binds the gradients; with B = 0 zeroes dX and d bias (nothing else runs).
fn bind_gradients<'p>(
    stream: &Arc<CudaStream>,
    batch: usize,
    grads: &'p mut GradientsMut<'_>,
    params: &mut Params,
    pointers: &mut Pointers<'p>,
) -> Result<()> {
    if batch == 0 {
        for buffer in [&mut grads.items, &mut grads.item_bias] {
            if !buffer.is_empty() {
                stream.memset_zeros(buffer).map_err(driver_error("cuMemsetD8Async"))?;
            }
        }
    }
    params.d_user = pointers.write(&mut grads.user);
    params.d_gates = pointers.write(&mut grads.gate_logits);
    params.d_items = pointers.write(&mut grads.items);
    params.d_bias = pointers.write(&mut grads.item_bias);
    Ok(())
}

/// Gradients of `sum over eligible (b, v) of dscores[b, v] * scores[b, v]`
/// (`dscores` `[B, V]`); excluded items contribute exact zeros.
pub fn scores_backward<T: FloatElement>(
    device: &CudaDevice,
    stream: &Arc<CudaStream>,
    operands: &Operands<'_, T>,
    dscores: &CudaView<f32>,
    grads: &mut GradientsMut<'_>,
    status: &mut CudaViewMut<u64>,
) -> Result<()> {
    let (plan, lens) = start(operands, status, Pass::ScoresBackward)?;
    let batch = plan.shape.batch;
    check_len("dscores", dscores.len(), batch * plan.shape.num_items)?;
    check_gradients(plan.shape, grads)?;
    let mut workspace = Workspace::new(stream, lens)?;
    let mut params = plan.params(operands.scale);
    let mut pointers = Pointers::new(stream);
    operands.bind(&mut params, &mut pointers);
    workspace.bind(&mut params, &mut pointers);
    params.dscores = pointers.read(dscores);
    bind_gradients(stream, batch, grads, &mut params, &mut pointers)?;
    params.status = pointers.write(status);
    let launcher = Launcher::new(device, stream, T::DTYPE, plan);
    // SAFETY: bound above: operands checked, the ScoresBackward workspace, status [1].
    unsafe { launcher.prepare(&params)? };
    if batch == 0 {
        return Ok(());
    }
    if plan.probabilities() {
        // SAFETY: this workspace has the row partials, row_lse and row_coef;
        // dscores is [B, V] (checked).
        unsafe {
            launcher.row_reduction(&mut params, false)?;
            launcher.row_reduction(&mut params, true)?;
        }
    }
    // SAFETY: the gradients are checked against the shape; row_lse was just
    // computed (Probabilities) or is unused (Logits scores).
    unsafe { launcher.backward(&params) }
}

/// `loss [B]` and the row terms the backward needs (`[B]` each for Logits,
/// `[B, H]` for Probabilities). Targets >= V and excluded targets go to
/// `status`.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy<T: FloatElement>(
    device: &CudaDevice,
    stream: &Arc<CudaStream>,
    operands: &Operands<'_, T>,
    targets: &CudaView<u32>,
    ignore: Option<u32>,
    loss: &mut CudaViewMut<f32>,
    saved: RowTerms<&mut CudaViewMut<f32>>,
    status: &mut CudaViewMut<u64>,
) -> Result<()> {
    let (plan, lens) = start(operands, status, Pass::CrossEntropy)?;
    let batch = plan.shape.batch;
    check_len("targets", targets.len(), batch)?;
    check_len("loss", loss.len(), batch)?;
    check_len("lse", saved.lse.len(), batch * plan.heads_out)?;
    check_len("target_logits", saved.target_logits.len(), batch * plan.heads_out)?;
    let mut workspace = Workspace::new(stream, lens)?;
    let mut params = plan.params(operands.scale);
    let mut pointers = Pointers::new(stream);
    operands.bind(&mut params, &mut pointers);
    workspace.bind(&mut params, &mut pointers);
    targets_flags(&mut params, ignore);
    params.targets = pointers.read(targets);
    params.out = pointers.write(loss);
    params.row_lse = pointers.write(saved.lse);
    params.target_logits = pointers.write(saved.target_logits);
    params.status = pointers.write(status);
    let launcher = Launcher::new(device, stream, T::DTYPE, plan);
    // SAFETY: bound above: operands checked, the CrossEntropy workspace, status [1].
    unsafe { launcher.prepare(&params)? };
    if batch == 0 {
        return Ok(());
    }
    // SAFETY: row_lse and target_logits are the outputs, B * heads_out (checked).
    unsafe { launcher.row_reduction(&mut params, false)? };
    // SAFETY: one thread per row: targets [B], loss [B] (checked); X is read
    // only at targets below V.
    unsafe {
        launcher.launch(
            MODULE,
            "scoring_ce_loss",
            true,
            grid_stride_config(batch as u64),
            &params,
        )
    }
}

/// Gradients of `sum_b dloss[b] * loss[b]` from the forward's row terms;
/// ignored rows and excluded items contribute exact zeros.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_backward<T: FloatElement>(
    device: &CudaDevice,
    stream: &Arc<CudaStream>,
    operands: &Operands<'_, T>,
    targets: &CudaView<u32>,
    ignore: Option<u32>,
    dloss: &CudaView<f32>,
    saved: RowTerms<&CudaView<f32>>,
    grads: &mut GradientsMut<'_>,
    status: &mut CudaViewMut<u64>,
) -> Result<()> {
    let (plan, lens) = start(operands, status, Pass::CrossEntropyBackward)?;
    let batch = plan.shape.batch;
    check_len("targets", targets.len(), batch)?;
    check_len("dloss", dloss.len(), batch)?;
    check_len("lse", saved.lse.len(), batch * plan.heads_out)?;
    check_len("target_logits", saved.target_logits.len(), batch * plan.heads_out)?;
    check_gradients(plan.shape, grads)?;
    let mut workspace = Workspace::new(stream, lens)?;
    let mut params = plan.params(operands.scale);
    let mut pointers = Pointers::new(stream);
    operands.bind(&mut params, &mut pointers);
    workspace.bind(&mut params, &mut pointers);
    targets_flags(&mut params, ignore);
    params.targets = pointers.read(targets);
    params.dloss = pointers.read(dloss);
    // Read only: the backward kernels never write row_lse or target_logits.
    params.row_lse = pointers.read(saved.lse);
    params.target_logits = pointers.read(saved.target_logits);
    bind_gradients(stream, batch, grads, &mut params, &mut pointers)?;
    params.status = pointers.write(status);
    let launcher = Launcher::new(device, stream, T::DTYPE, plan);
    // SAFETY: bound above: operands checked, the CrossEntropyBackward workspace, status [1].
    unsafe { launcher.prepare(&params)? };
    if batch == 0 {
        return Ok(());
    }
    // SAFETY: targets and dloss [B], lse and target_logits [B, heads_out]
    // (checked), gradients checked.
    unsafe { launcher.backward(&params) }
}

/// Only the check of the excluded ids (for a call that fails on the host
/// afterwards, so that the CPU's order of errors holds).
pub fn check_excluded<T: FloatElement>(
    device: &CudaDevice,
    stream: &Arc<CudaStream>,
    operands: &Operands<'_, T>,
    status: &mut CudaViewMut<u64>,
) -> Result<()> {
    let plan = Plan::new(operands.shape, operands.mixing)?;
    operands.check()?;
    check_len("status", status.len(), 1)?;
    let Some(excluded) = &operands.excluded else {
        return Ok(());
    };
    if excluded.is_empty() {
        return Ok(());
    }
    let mut flags = alloc_zeros::<u32>(stream, plan.shape.num_items.div_ceil(4))?;
    let mut params = plan.params(operands.scale);
    let mut pointers = Pointers::new(stream);
    operands.bind(&mut params, &mut pointers);
    params.excluded_flags = pointers.write(&mut flags);
    params.status = pointers.write(status);
    let launcher = Launcher::new(device, stream, T::DTYPE, plan);
    // SAFETY: reads `num_excluded` ids, writes flags (V bytes) below V only
    // and the status word.
    unsafe {
        launcher.launch(
            MODULE,
            "scoring_flag_excluded",
            false,
            grid_stride_config(u64::from(params.num_excluded)),
            &params,
        )
    }
}

/// Per-row history lists in CSR form on the device.
pub struct DeviceHistory<'a> {
    /// `[B + 1]`
    pub offsets: CudaView<'a, u32>,
    /// The history item ids, each below V.
    pub ids: CudaView<'a, u32>,
}

/// The n best eligible items of every row (`ids`, `values` `[B, n]`), best
/// first, ties to the lower id, NaN below every number, skipping excluded
/// items and the row's history. Malformed histories, history ids >= V and rows
/// with fewer than n eligible items go to `status`. `n` must be >= 1.
#[allow(clippy::too_many_arguments)]
pub fn topk<T: FloatElement>(
    device: &CudaDevice,
    stream: &Arc<CudaStream>,
    operands: &Operands<'_, T>,
    n: usize,
    history: Option<&DeviceHistory<'_>>,
    ids: &mut CudaViewMut<u32>,
    values: &mut CudaViewMut<f32>,
    status: &mut CudaViewMut<u64>,
) -> Result<()> {
    if n == 0 || n > MAX_SIZE {
        return Err(Error::invalid("n", format!("expected 1 <= n < 2^31, got {n}")));
    }
    let (plan, lens) = start(operands, status, Pass::TopK { n })?;
    let batch = plan.shape.batch;
    check_len("ids", ids.len(), batch * n)?;
    check_len("values", values.len(), batch * n)?;
    if let Some(history) = history {
        check_len("history.offsets", history.offsets.len(), batch + 1)?;
        if history.ids.len() > u32::MAX as usize {
            return Err(too_large(
                "history.ids",
                format!("{} ids must be below 2^32", history.ids.len()),
            ));
        }
    }
    let mut workspace = Workspace::new(stream, lens)?;
    let mut params = plan.params(operands.scale);
    let mut pointers = Pointers::new(stream);
    operands.bind(&mut params, &mut pointers);
    workspace.bind(&mut params, &mut pointers);
    if let Some(history) = history {
        params.history_offsets = pointers.read(&history.offsets);
        params.history_ids = pointers.read(&history.ids);
        params.history_len = history.ids.len() as u32;
    }
    params.n = n as u32;
    params.topk_ids = pointers.write(ids);
    params.topk_values = pointers.write(values);
    params.status = pointers.write(status);
    let launcher = Launcher::new(device, stream, T::DTYPE, plan);
    // SAFETY: bound above: operands checked, the TopK workspace, status [1].
    unsafe { launcher.prepare(&params)? };
    if history.is_some() {
        // SAFETY: offsets [B + 1] (checked) and history_len ids; reports only.
        unsafe {
            launcher.launch(
                TOPK_MODULE,
                "scoring_topk_check_history",
                false,
                grid_stride_config((batch as u64 + 1).max(u64::from(params.history_len))),
                &params,
            )?
        };
    }
    if batch == 0 {
        return Ok(());
    }
    if plan.probabilities() {
        // SAFETY: the TopK workspace of Probabilities mixing has the row
        // partials and row_lse.
        unsafe { launcher.row_reduction(&mut params, false)? };
    }
    // SAFETY: one block per (item chunk, row tile); candidate lists
    // [B, topk_chunks, capacity] and counts [B, topk_chunks]; history ranges
    // are clamped to history_len on the device.
    unsafe {
        launcher.launch(
            TOPK_MODULE,
            "scoring_topk_chunks",
            true,
            Plan::tile_grid(plan.topk.count, plan.row_tiles, 1),
            &params,
        )?
    };
    // SAFETY: one block per row < B (x <= 2^31); writes ids and values [B, n].
    unsafe {
        launcher.launch(
            TOPK_MODULE,
            "scoring_topk_merge",
            false,
            Plan::tile_grid(batch, 1, 1),
            &params,
        )
    }
}
