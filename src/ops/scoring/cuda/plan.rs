//! How a scoring problem maps onto the kernels — the GEMM operand, the
//! tiles, and the item chunks of every chunked kernel, all functions of the
//! shapes only — and the workspace each pass allocates.

use super::launch::Pointers;
use super::params::{Params, FLAG_PROBABILITIES, FLAG_SHARED};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::ops::scoring::{Mixing, ScoringShape};
use crate::tensor::{alloc_uninit, alloc_zeros};
use cudarc::driver::{CudaSlice, CudaStream, LaunchConfig};
use std::sync::Arc;

/// Rows and items of a score tile (kTile); threads of a tile block (kThreads).
const TILE: usize = 64;
pub(super) const TILE_THREADS: u32 = 256;
/// The chunked kernels aim at this many blocks: two waves on a 132-SM H100.
/// A constant rather than the device's SM count, so that how the reductions
/// are split depends on the shapes only.
const TARGET_BLOCKS: usize = 264;
/// The y and z grid dimensions of a launch.
const MAX_GRID_YZ: usize = 65_535;
/// Item chunks of topk at most (kMaxTopkChunks: the merge keeps one count per
/// chunk in shared memory).
const MAX_TOPK_CHUNKS: usize = 256;
/// K slices one backward block covers at most (a K group): its sums take
/// 64 * (3 * 64 + 16) floats of dynamic shared memory, which with the
/// kernels' ~43 KB of static shared memory fits the 99 KB a block may opt
/// into on every GPU the PTX targets (sm_80 and later).
const MAX_GROUP_SLICES: usize = 3;
/// Sizes the kernels index with 32-bit arithmetic stay below this.
pub(super) const MAX_SIZE: usize = i32::MAX as usize;

/// Item tiles split into chunks, one block (per row tile and head) each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Chunks {
    pub(super) count: usize,
    pub(super) tiles_per_chunk: usize,
}

impl Chunks {
    /// Enough chunks that `other_blocks` blocks per chunk reach
    /// TARGET_BLOCKS, at most `max` and one per tile, none empty.
    fn new(item_tiles: usize, other_blocks: usize, max: usize) -> Chunks {
        let wanted = TARGET_BLOCKS
            .div_ceil(other_blocks.max(1))
            .clamp(1, item_tiles.min(max).max(1));
        let tiles_per_chunk = item_tiles.div_ceil(wanted).max(1);
        Chunks {
            count: item_tiles.div_ceil(tiles_per_chunk).max(1),
            tiles_per_chunk,
        }
    }
}

/// How a scoring problem maps onto the kernels: the GEMM operand
/// `A [B, heads_out * K]` (see kernels/scoring.cuh), the tiles, and the item
/// chunks of each chunked kernel. A function of the shapes only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub(super) shape: ScoringShape,
    pub(super) mixing: Mixing,
    pub(super) heads_out: usize,
    pub(super) k: usize,
    pub(super) row_tiles: usize,
    pub(super) item_tiles: usize,
    pub(super) k_slices: usize,
    /// K slices per backward block, and the number of such K groups: each
    /// score tile is recomputed once per group in the two backward kernels.
    pub(super) group_slices: usize,
    pub(super) k_groups: usize,
    pub(super) reduce: Chunks,
    pub(super) user: Chunks,
    pub(super) topk: Chunks,
}

/// The passes, for their workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// The materialised scores.
    Scores,
    /// Their backward.
    ScoresBackward,
    /// The cross-entropy forward.
    CrossEntropy,
    /// Its backward.
    CrossEntropyBackward,
    /// The top-n.
    TopK {
        /// Items per row.
        n: usize,
    },
}

/// Element counts of the workspace buffers of one pass (0 = not needed).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Lens {
    flag_words: usize,
    gates: usize,
    mixed_user: usize,
    row_partials: usize,
    row_lse: usize,
    row_coef: usize,
    rows: usize,
    user_partials: usize,
    bias_partials: usize,
    candidates: usize,
    candidate_counts: usize,
}

impl Lens {
    fn bytes(&self) -> usize {
        4 * (self.flag_words
            + 2 * self.gates
            + self.mixed_user
            + self.row_partials
            + self.row_lse
            + self.row_coef
            + 2 * self.rows
            + self.user_partials
            + self.bias_partials
            + 2 * self.candidates
            + self.candidate_counts)
            + std::mem::size_of::<u64>() // the status word
    }
}

pub(super) fn too_large(argument: &'static str, message: String) -> Error {
    Error::invalid(argument, format!("{message} (CUDA scoring limit)"))
}

impl Plan {
    /// The plan of a problem, or `InvalidArgument` for sizes past the
    /// kernels' 32-bit indexing or the grid limits.
    pub fn new(shape: ScoringShape, mixing: Mixing) -> Result<Plan> {
        let ScoringShape {
            batch,
            heads,
            width,
            num_items,
            shared,
        } = shape;
        if batch > MAX_SIZE {
            return Err(too_large("user", format!("B = {batch} must be below 2^31")));
        }
        if num_items > MAX_SIZE {
            return Err(too_large("items", format!("V = {num_items} must be below 2^31")));
        }
        let head_width = heads
            .checked_mul(width)
            .filter(|&hw| hw <= MAX_SIZE)
            .ok_or_else(|| too_large("user", format!("H * D = {heads} * {width} must be below 2^31")))?;
        let (heads_out, k) = match (mixing, shared) {
            (Mixing::Logits, false) => (1, head_width),
            (Mixing::Logits, true) => (1, width),
            (Mixing::Probabilities, _) => (heads, width),
        };
        let row_tiles = batch.div_ceil(TILE);
        let item_tiles = num_items.div_ceil(TILE);
        let k_slices = k.div_ceil(TILE);
        // As few groups as the shared memory allows, as even as possible.
        let k_groups = k_slices.div_ceil(MAX_GROUP_SLICES);
        let group_slices = k_slices.div_ceil(k_groups);
        if row_tiles > MAX_GRID_YZ {
            return Err(too_large(
                "user",
                format!("B = {batch} needs {row_tiles} row tiles, more than {MAX_GRID_YZ}"),
            ));
        }
        if heads_out * k_groups > MAX_GRID_YZ {
            return Err(too_large(
                "user",
                format!("{heads_out} heads of {k_groups} K groups exceed {MAX_GRID_YZ} blocks"),
            ));
        }
        Ok(Plan {
            shape,
            mixing,
            heads_out,
            k,
            row_tiles,
            item_tiles,
            k_slices,
            group_slices,
            k_groups,
            reduce: Chunks::new(item_tiles, row_tiles * heads_out, usize::MAX),
            user: Chunks::new(item_tiles, row_tiles * heads_out * k_groups, usize::MAX),
            topk: Chunks::new(item_tiles, row_tiles, MAX_TOPK_CHUNKS),
        })
    }

    pub(super) fn probabilities(&self) -> bool {
        self.mixing == Mixing::Probabilities
    }

    pub(super) fn a_width(&self) -> usize {
        self.heads_out * self.k
    }

    /// Entries a topk candidate list of one (row, chunk) holds.
    pub(super) fn topk_capacity(&self, n: usize) -> usize {
        n.min(self.topk.tiles_per_chunk * TILE)
    }

    pub(super) fn lens(&self, pass: Pass) -> Lens {
        let ScoringShape {
            batch,
            heads,
            num_items,
            ..
        } = self.shape;
        let per_row_heads = batch * self.heads_out;
        let reduction = batch * self.heads_out * self.reduce.count * 2;
        let mut lens = Lens {
            flag_words: num_items.div_ceil(4),
            gates: batch * heads,
            mixed_user: batch * self.a_width(),
            ..Lens::default()
        };
        let prob = self.probabilities();
        match pass {
            Pass::Scores | Pass::TopK { .. } if prob => {
                lens.row_partials = reduction;
                lens.row_lse = per_row_heads;
            }
            Pass::Scores | Pass::TopK { .. } => {}
            // The lse and the target logits are the pass's outputs.
            Pass::CrossEntropy => lens.row_partials = reduction,
            Pass::ScoresBackward | Pass::CrossEntropyBackward => {
                if prob {
                    lens.row_coef = per_row_heads;
                    if pass == Pass::ScoresBackward {
                        lens.row_partials = reduction;
                        lens.row_lse = per_row_heads;
                    }
                }
                lens.rows = batch;
                lens.user_partials = self.user.count * batch * self.a_width();
                lens.bias_partials = self.user.count * batch;
            }
        }
        if let Pass::TopK { n } = pass {
            lens.candidates = batch * self.topk.count * self.topk_capacity(n);
            lens.candidate_counts = batch * self.topk.count;
        }
        lens
    }

    /// Device bytes a pass allocates beyond its inputs and outputs.
    pub fn workspace_bytes(&self, pass: Pass) -> usize {
        self.lens(pass).bytes()
    }

    /// The sizes, flags and scale of the parameter block; no pointers yet.
    pub(super) fn params(&self, scale: f32) -> Params {
        let ScoringShape {
            batch,
            heads,
            width,
            num_items,
            shared,
        } = self.shape;
        let mut flags = 0;
        if self.probabilities() {
            flags |= FLAG_PROBABILITIES;
        }
        if shared {
            flags |= FLAG_SHARED;
        }
        // Every size was bounded by MAX_SIZE (or the grid limits) in `new`.
        Params {
            batch: batch as u32,
            heads: heads as u32,
            width: width as u32,
            num_items: num_items as u32,
            k: self.k as u32,
            a_width: self.a_width() as u32,
            heads_out: self.heads_out as u32,
            row_tiles: self.row_tiles as u32,
            item_tiles: self.item_tiles as u32,
            reduce_chunks: self.reduce.count as u32,
            reduce_tiles_per_chunk: self.reduce.tiles_per_chunk as u32,
            user_chunks: self.user.count as u32,
            user_tiles_per_chunk: self.user.tiles_per_chunk as u32,
            k_slices: self.k_slices as u32,
            group_slices: self.group_slices as u32,
            k_groups: self.k_groups as u32,
            topk_chunks: self.topk.count as u32,
            topk_tiles_per_chunk: self.topk.tiles_per_chunk as u32,
            flags,
            scale,
            ..Params::default()
        }
    }

    /// Dynamic shared memory of a scoring_backward_items block: its K
    /// group's sums for 64 items, rows `group_slices * 64 + 16` floats apart
    /// (kernels/scoring.cu, group_pitch). Also scoring_backward_user's for f32.
    pub(super) fn group_shared_bytes(&self) -> usize {
        TILE * (self.group_slices * TILE + 16) * std::mem::size_of::<f32>()
    }

    /// Dynamic shared memory of a scoring_backward_user block: the group sums
    /// (f32), or the bf16 pieces of the gradient tile (3) and of the X slice
    /// (1 for bf16, 2 for f16), 64 rows of 72 each (backward_user_mma).
    pub(super) fn backward_user_shared_bytes(&self, dtype: DType) -> usize {
        let piece_tile = TILE * (TILE + 8) * 2;
        match dtype {
            DType::BF16 => (3 + 1) * piece_tile,
            DType::F16 => (3 + 2) * piece_tile,
            _ => self.group_shared_bytes(),
        }
    }

    pub(super) fn tile_grid(x: usize, y: usize, z: usize) -> LaunchConfig {
        // x <= ceil(2^31 / 64) tiles, y and z checked against MAX_GRID_YZ in `new`.
        LaunchConfig {
            grid_dim: (x as u32, y as u32, z as u32),
            block_dim: (TILE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// Device bytes the cross-entropy (forward or backward) allocates beyond its
/// inputs and outputs: per-row constants and the user operand (O(B * H * D)),
/// item-chunk partials (bounded by the chunk count, a function of the shapes)
/// and one byte per item for the exclusion flags.
pub fn cross_entropy_workspace_bytes(shape: ScoringShape, mixing: Mixing) -> Result<usize> {
    let plan = Plan::new(shape, mixing)?;
    Ok(plan
        .workspace_bytes(Pass::CrossEntropy)
        .max(plan.workspace_bytes(Pass::CrossEntropyBackward)))
}

/// The buffers of one call beyond its inputs and outputs (`Plan::lens`).
pub(super) struct Workspace {
    excluded_flags: CudaSlice<u32>,
    gates: CudaSlice<f32>,
    log_gates: CudaSlice<f32>,
    mixed_user: CudaSlice<f32>,
    row_partials: CudaSlice<f32>,
    row_lse: CudaSlice<f32>,
    row_coef: CudaSlice<f32>,
    row_weight: CudaSlice<f32>,
    row_target: CudaSlice<u32>,
    user_partials: CudaSlice<f32>,
    bias_partials: CudaSlice<f32>,
    candidate_values: CudaSlice<f32>,
    candidate_ids: CudaSlice<u32>,
    candidate_counts: CudaSlice<u32>,
}

impl Workspace {
    /// Every buffer but the flags is written by a kernel before it is read;
    /// all are allocated (and the flags zeroed) in order on `stream`, the
    /// stream the call runs on.
    pub(super) fn new(stream: &Arc<CudaStream>, lens: Lens) -> Result<Workspace> {
        fn uninit<T: Element>(stream: &Arc<CudaStream>, len: usize) -> Result<CudaSlice<T>> {
            alloc_uninit::<T>(stream, len)
        }
        Ok(Workspace {
            excluded_flags: alloc_zeros(stream, lens.flag_words)?,
            gates: uninit(stream, lens.gates)?,
            log_gates: uninit(stream, lens.gates)?,
            mixed_user: uninit(stream, lens.mixed_user)?,
            row_partials: uninit(stream, lens.row_partials)?,
            row_lse: uninit(stream, lens.row_lse)?,
            row_coef: uninit(stream, lens.row_coef)?,
            row_weight: uninit(stream, lens.rows)?,
            row_target: uninit(stream, lens.rows)?,
            user_partials: uninit(stream, lens.user_partials)?,
            bias_partials: uninit(stream, lens.bias_partials)?,
            candidate_values: uninit(stream, lens.candidates)?,
            candidate_ids: uninit(stream, lens.candidates)?,
            candidate_counts: uninit(stream, lens.candidate_counts)?,
        })
    }

    pub(super) fn bind<'p>(&'p mut self, params: &mut Params, pointers: &mut Pointers<'p>) {
        params.excluded_flags = pointers.write(&mut self.excluded_flags);
        params.gates = pointers.write(&mut self.gates);
        params.log_gates = pointers.write(&mut self.log_gates);
        params.mixed_user = pointers.write(&mut self.mixed_user);
        params.row_partials = pointers.write(&mut self.row_partials);
        params.row_lse = pointers.write(&mut self.row_lse);
        params.row_coef = pointers.write(&mut self.row_coef);
        params.row_weight = pointers.write(&mut self.row_weight);
        params.row_target = pointers.write(&mut self.row_target);
        params.user_partials = pointers.write(&mut self.user_partials);
        params.bias_partials = pointers.write(&mut self.bias_partials);
        params.candidate_values = pointers.write(&mut self.candidate_values);
        params.candidate_ids = pointers.write(&mut self.candidate_ids);
        params.candidate_counts = pointers.write(&mut self.candidate_counts);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(batch: usize, heads: usize, width: usize, num_items: usize, shared: bool) -> ScoringShape {
        ScoringShape {
            batch,
            heads,
            width,
            num_items,
            shared,
        }
    }

    #[test]
    fn chunks_cover_every_tile_and_none_is_empty() {
        for item_tiles in [1, 2, 7, 64, 263, 264, 265, 10_000] {
            for other in [1, 3, 8, 64, 264, 1000] {
                for max in [usize::MAX, MAX_TOPK_CHUNKS] {
                    let c = Chunks::new(item_tiles, other, max);
                    assert!(c.count >= 1 && c.count <= max && c.count <= item_tiles);
                    assert!(c.count * c.tiles_per_chunk >= item_tiles);
                    assert!(
                        (c.count - 1) * c.tiles_per_chunk < item_tiles,
                        "{item_tiles} {other}: {c:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn plans_map_mixings_onto_one_gemm() {
        let per_head = Plan::new(shape(100, 8, 64, 1000, false), Mixing::Logits).unwrap();
        assert_eq!((per_head.heads_out, per_head.k, per_head.k_slices), (1, 512, 8));
        assert_eq!((per_head.k_groups, per_head.group_slices), (3, 3));
        let shared = Plan::new(shape(100, 8, 64, 1000, true), Mixing::Logits).unwrap();
        assert_eq!((shared.heads_out, shared.k), (1, 64));
        let mixture = Plan::new(shape(100, 8, 17, 1000, false), Mixing::Probabilities).unwrap();
        assert_eq!((mixture.heads_out, mixture.k, mixture.a_width()), (8, 17, 136));
        assert!(Plan::new(shape(65_535 * 64 + 1, 1, 1, 10, false), Mixing::Logits).is_err());
    }

    #[test]
    fn the_workspace_does_not_grow_with_the_batch_times_the_catalog() {
        let s = shape(64, 2, 8, 200_000, false);
        for mixing in [Mixing::Logits, Mixing::Probabilities] {
            let bytes = cross_entropy_workspace_bytes(s, mixing).unwrap();
            assert!(bytes * 10 < s.batch * s.num_items * 4, "{mixing:?}: {bytes}");
        }
    }
}
