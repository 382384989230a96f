//! Queuing the scoring kernels: the launch sequences the ops share.

use super::params::{Params, FLAG_REDUCE_DOT};
use super::plan::Plan;
pub(super) use crate::cuda::Pointers;
use crate::cuda::{grid_stride_config, launched, CudaDevice};
use crate::dtype::DType;
use crate::error::Result;
use cudarc::driver::{CudaStream, LaunchConfig, PushKernelArg};
use std::sync::Arc;

pub(super) const MODULE: &str = "scoring";
pub(super) const TOPK_MODULE: &str = "scoring_topk";
/// Queues the scoring kernels of one call.
pub(super) struct Launcher<'a> {
    device: &'a CudaDevice,
    stream: &'a Arc<CudaStream>,
    dtype: DType,
    plan: Plan,
}

impl<'a> Launcher<'a> {
    pub(super) fn new(device: &'a CudaDevice, stream: &'a Arc<CudaStream>, dtype: DType, plan: Plan) -> Self {
        Launcher {
            device,
            stream,
            dtype,
            plan,
        }
    }

    /// Launches `name` (with the dtype suffix when `typed`) of `module`.
    ///
    /// # Safety
    /// Every pointer in `params` that kernel reads or writes points to a live
    /// buffer of at least the length `ScoringParams` (kernels/scoring.cuh)
    /// documents for the sizes in `params`, and `config` is the grid the
    /// kernel expects (a tile grid of 256-thread blocks, or any grid-stride
    /// grid).
    pub(super) unsafe fn launch(
        &self,
        module: &'static str,
        name: &'static str,
        typed: bool,
        config: LaunchConfig,
        params: &Params,
    ) -> Result<()> {
        let function = if typed {
            self.device
                .function(module, &format!("{name}_{}", self.dtype.kernel_suffix()))?
        } else {
            self.device.function(module, name)?
        };
        let mut args = self.stream.launch_builder(&function);
        args.arg(params);
        launched(name, args.launch(config))
    }

    /// `grid` with `dynamic` bytes of dynamic shared memory for the typed
    /// kernel `name`, after allowing the kernel that much (beyond the
    /// default 48 KB a block gets without opting in).
    fn with_dynamic_shared(&self, name: &'static str, grid: LaunchConfig, dynamic: usize) -> Result<LaunchConfig> {
        let function = self
            .device
            .function(MODULE, &format!("{name}_{}", self.dtype.kernel_suffix()))?;
        self.device
            .allow_dynamic_shared(&function, dynamic, "items", &format!("{name} (CUDA scoring limit)"))?;
        Ok(LaunchConfig {
            shared_mem_bytes: dynamic as u32,
            ..grid
        })
    }

    /// Exclusion flags, then (B > 0) the gates and the GEMM operand A.
    ///
    /// # Safety
    /// `params` is bound to the operands (lengths checked by
    /// `Operands::check`), a workspace of `Plan::lens` and the status word.
    pub(super) unsafe fn prepare(&self, params: &Params) -> Result<()> {
        let batch = self.plan.shape.batch as u64;
        if params.num_excluded > 0 {
            // SAFETY: reads `num_excluded` ids, writes flags below V and the status.
            self.launch(
                MODULE,
                "scoring_flag_excluded",
                false,
                grid_stride_config(u64::from(params.num_excluded)),
                params,
            )?;
        }
        if batch == 0 {
            return Ok(());
        }
        // SAFETY: reads G [B, H], writes gates and log_gates [B, H].
        self.launch(MODULE, "scoring_gates", true, grid_stride_config(batch), params)?;
        // SAFETY: reads U [B, H, D] and the gates, writes A [B, a_width].
        self.launch(
            MODULE,
            "scoring_mixed_user",
            true,
            grid_stride_config(batch * self.plan.a_width() as u64),
            params,
        )
    }

    /// Per-row log-sum-exps into `row_lse`, or (`dot`) <q_h, dS> into
    /// `row_coef`: chunk partials, then their merge in chunk order.
    ///
    /// # Safety
    /// As for `prepare`, after it; `row_partials` holds
    /// heads_out * B * reduce_chunks float pairs, `row_lse` (and for `dot`
    /// `row_coef`, `dscores` [B, V]) B * heads_out floats.
    pub(super) unsafe fn row_reduction(&self, params: &mut Params, dot: bool) -> Result<()> {
        let plan = &self.plan;
        if dot {
            params.flags |= FLAG_REDUCE_DOT;
        }
        // SAFETY: tiles of A [B, a_width] and X, partials indexed (head, row < B, chunk).
        self.launch(
            MODULE,
            "scoring_row_reduce",
            true,
            Plan::tile_grid(plan.reduce.count, plan.row_tiles, plan.heads_out),
            params,
        )?;
        // SAFETY: one thread per (head, row < B), reading the chunks it owns.
        self.launch(
            MODULE,
            "scoring_row_merge",
            false,
            grid_stride_config((plan.heads_out * plan.shape.batch) as u64),
            params,
        )?;
        params.flags &= !FLAG_REDUCE_DOT;
        Ok(())
    }

    /// The backward after `prepare` (and, for Probabilities scores, both row
    /// reductions): per-row constants, dA partials, dX, then dU and dG.
    ///
    /// # Safety
    /// As for `prepare`, with a workspace of the backward pass, the gradient
    /// outputs bound (dU [B, H, D], dG [B, H], dX the layout of X, d bias [V]),
    /// and `row_lse` holding B * heads_out log-sum-exps.
    pub(super) unsafe fn backward(&self, params: &Params) -> Result<()> {
        let plan = &self.plan;
        let batch = plan.shape.batch as u64;
        // SAFETY: one thread per row < B: targets, dloss, row constants, and
        // for Probabilities cross-entropy target_logits and dG [B, H].
        self.launch(MODULE, "scoring_backward_rows", true, grid_stride_config(batch), params)?;
        // SAFETY: tiles of A and X; user_partials [user_chunks, B, a_width], bias_partials [user_chunks, B];
        // the dynamic shared memory Plan::backward_user_shared_bytes names.
        let user_grid = Plan::tile_grid(plan.user.count, plan.row_tiles, plan.heads_out * plan.k_groups);
        self.launch(
            MODULE,
            "scoring_backward_user",
            true,
            self.with_dynamic_shared(
                "scoring_backward_user",
                user_grid,
                plan.backward_user_shared_bytes(self.dtype),
            )?,
            params,
        )?;
        // SAFETY: tiles of A and X; writes dX (item < V, k < K) and d bias (item < V); group sums as above.
        let items_grid = Plan::tile_grid(plan.item_tiles, plan.k_groups, 1);
        self.launch(
            MODULE,
            "scoring_backward_items",
            true,
            self.with_dynamic_shared("scoring_backward_items", items_grid, plan.group_shared_bytes())?,
            params,
        )?;
        // SAFETY: one thread per element of A [B, a_width]; writes dU [B, H, D].
        self.launch(
            MODULE,
            "scoring_backward_finish_user",
            false,
            grid_stride_config(batch * plan.a_width() as u64),
            params,
        )?;
        // SAFETY: one thread per row < B; reads U, the summed dA, writes dG [B, H].
        self.launch(
            MODULE,
            "scoring_backward_finish_gates",
            true,
            grid_stride_config(batch),
            params,
        )
    }
}
