//! Scoring on the host, on tiles: a block of rows against a block of items
//! through `gemm` into a score tile that stays in cache ([`tiles`]); online
//! log-sum-exps merged pairwise over the tiles; the backward recomputes each
//! tile and runs its two products on gemm ([`backward`]); top-n filters each
//! tile against every row's current n-th value ([`topk`]). Nothing of size
//! `B * V` is allocated, and how work and sums are split depends on the
//! shapes only, so results are bitwise identical for any thread count.

mod backward;
mod tiles;
mod topk;

use super::{Mixing, RowTerms, ScoringShape};
use crate::dtype::FloatElement;
use crate::error::{Error, Result};
use crate::ops::check_len;
use backward::{wave_leaves, BACKWARD_LEAF_TILES, GROUP_ROWS};
use backward::{Backward, Upstream};
use rayon::prelude::*;
use tiles::{blocks, chunk_count, Lse, Scratch, Tiling, TILE_ITEMS, TILE_ROWS};

pub(crate) use topk::topk_rows;
pub use topk::{topk, HistoryRef};

/// The operands every scoring op shares, on the host.
#[derive(Clone, Copy)]
pub struct Operands<'a, T> {
    /// `[B, H, D]`
    pub user: &'a [T],
    /// `[B, H]`
    pub gate_logits: &'a [T],
    /// `[H, V, D]`, or `[V, D]` when `shape.shared`
    pub items: &'a [T],
    /// `[V]`
    pub item_bias: Option<&'a [f32]>,
    /// Item ids left out of every softmax and every top-n; duplicates allowed.
    pub excluded: &'a [u32],
    /// 1 / temperature.
    pub scale: f32,
    /// How the heads are fused.
    pub mixing: Mixing,
    /// The sizes the buffers must match.
    pub shape: ScoringShape,
}

/// Gradients of the operands, f32, in their layouts.
pub struct GradientsMut<'a> {
    /// `[B, H, D]`
    pub user: &'a mut [f32],
    /// `[B, H]`
    pub gate_logits: &'a mut [f32],
    /// The layout of the items.
    pub items: &'a mut [f32],
    /// `[V]`
    pub item_bias: &'a mut [f32],
}

/// The materialised scores `[B, V]`: S for Logits mixing (-inf at excluded
/// items), P for Probabilities mixing (0 there).
pub fn scores<T: FloatElement>(operands: Operands<'_, T>, out: &mut [f32]) -> Result<()> {
    let tiling = Tiling::new(operands)?;
    let ScoringShape { batch, num_items, .. } = tiling.shape();
    check_len("scores", out.len(), batch * num_items)?;
    let lse = match operands.mixing {
        Mixing::Logits => Vec::new(),
        Mixing::Probabilities => tiling.row_lse(),
    };
    out.par_chunks_mut(TILE_ROWS * num_items)
        .zip(blocks(batch, TILE_ROWS).collect::<Vec<_>>())
        .for_each(|(out, rows)| {
            let m = rows.len();
            let mut mixed = Vec::new();
            tiling.sweep(rows.clone(), |items, tiles| {
                let tile = match operands.mixing {
                    Mixing::Logits => tiles,
                    Mixing::Probabilities => {
                        mixed.resize(m * items.len(), 0.0);
                        tiling.probability_tile(rows.clone(), items.clone(), tiles, &lse, &mut mixed);
                        &mixed
                    }
                };
                for (j, column) in tile.chunks_exact(m).enumerate() {
                    for (r, &score) in column.iter().enumerate() {
                        out[r * num_items + items.start + j] = score;
                    }
                }
            });
        });
    Ok(())
}

/// `[V]` flags, false at the excluded items; an id >= V is
/// [`Error::IndexOutOfRange`] at its position.
pub(crate) fn eligible_items(excluded: &[u32], num_items: usize) -> Result<Vec<bool>> {
    let mut eligible = vec![true; num_items];
    for (position, &id) in excluded.iter().enumerate() {
        let slot = eligible.get_mut(id as usize).ok_or(Error::IndexOutOfRange {
            argument: "excluded",
            position: position as u64,
            index: u64::from(id),
            bound: num_items as u64,
        })?;
        *slot = false;
    }
    Ok(eligible)
}

/// The log-sum-exp of a few values (-inf for none or all -inf).
fn log_sum_exp(values: &[f32]) -> f32 {
    Lse::of(values).value()
}

fn check_gradients(shape: ScoringShape, grads: &GradientsMut<'_>) -> Result<()> {
    shape.check_gradient_buffers(
        grads.user.len(),
        grads.gate_logits.len(),
        grads.items.len(),
        grads.item_bias.len(),
    )
}

/// Gradients of `L = sum over eligible (b, v) of dscores[b, v] * scores[b, v]`.
pub fn scores_backward<T: FloatElement>(
    operands: Operands<'_, T>,
    dscores: &[f32],
    grads: GradientsMut<'_>,
) -> Result<()> {
    let tiling = Tiling::new(operands)?;
    check_len(
        "dscores",
        dscores.len(),
        tiling.shape().batch * tiling.shape().num_items,
    )?;
    check_gradients(tiling.shape(), &grads)?;
    Backward::new(tiling, Upstream::Scores(dscores)).run(grads);
    Ok(())
}

/// Targets with ignored rows as u32::MAX, after checking each active one:
/// below V and not excluded; the lowest offending row wins.
fn active_targets(tiling: &Tiling<'_, impl FloatElement>, targets: &[u32], ignore: Option<u32>) -> Result<Vec<u32>> {
    check_len("targets", targets.len(), tiling.shape().batch)?;
    targets
        .iter()
        .enumerate()
        .map(|(row, &target)| {
            if Some(target) == ignore {
                Ok(u32::MAX)
            } else if target as usize >= tiling.shape().num_items {
                Err(Error::IndexOutOfRange {
                    argument: "targets",
                    position: row as u64,
                    index: u64::from(target),
                    bound: tiling.shape().num_items as u64,
                })
            } else if !tiling.eligible[target as usize] {
                Err(Error::invalid(
                    "targets",
                    format!("targets[{row}] = {target} is an excluded item"),
                ))
            } else {
                Ok(target)
            }
        })
        .collect()
}

/// `loss[b] = -log P[b, targets[b]]` (0 for ignored rows) and the row terms
/// the backward needs: `[B]` each for Logits mixing, `[B, H]` for
/// Probabilities.
pub fn cross_entropy<T: FloatElement>(
    operands: Operands<'_, T>,
    targets: &[u32],
    ignore: Option<u32>,
    loss: &mut [f32],
    saved: RowTerms<&mut [f32]>,
) -> Result<()> {
    let tiling = Tiling::new(operands)?;
    let ScoringShape { batch, heads, .. } = tiling.shape();
    let targets = active_targets(&tiling, targets, ignore)?;
    let per_row = lse_per_row(operands.mixing, heads);
    check_len("loss", loss.len(), batch)?;
    check_len("lse", saved.lse.len(), batch * per_row)?;
    check_len("target_logits", saved.target_logits.len(), batch * per_row)?;
    let (row_lse, target_logits) = tiling.row_lse_and_target_logits(&targets);
    saved.lse.copy_from_slice(&row_lse);
    saved.target_logits.copy_from_slice(&target_logits);
    loss.par_iter_mut()
        .zip(row_lse.par_chunks(per_row))
        .zip(target_logits.par_chunks(per_row))
        .enumerate()
        .for_each(|(b, ((loss, lse), s))| {
            if targets[b] == u32::MAX {
                *loss = 0.0;
                return;
            }
            *loss = match operands.mixing {
                Mixing::Logits => lse[0] - s[0],
                // -log sum_h g_h q_h(y) as lse_h(G_h) - lse_h(G_h + s_h(y) - lse_h):
                // the gates' normaliser cancels exactly, so a row whose
                // target is its only eligible item has loss exactly 0.
                Mixing::Probabilities => {
                    let gates: Vec<f32> = operands.gate_logits[b * heads..(b + 1) * heads]
                        .iter()
                        .map(|g| g.to_f32())
                        .collect();
                    let joint: Vec<f32> = (0..heads).map(|h| gates[h] + (s[h] - lse[h])).collect();
                    log_sum_exp(&gates) - log_sum_exp(&joint)
                }
            };
        });
    Ok(())
}

/// Log-sum-exps kept per row by the cross-entropy.
pub fn lse_per_row(mixing: Mixing, heads: usize) -> usize {
    match mixing {
        Mixing::Logits => 1,
        Mixing::Probabilities => heads,
    }
}

/// Gradients of `L = sum_b dloss[b] * loss[b]`, from the forward's row terms.
pub fn cross_entropy_backward<T: FloatElement>(
    operands: Operands<'_, T>,
    targets: &[u32],
    ignore: Option<u32>,
    dloss: &[f32],
    saved: RowTerms<&[f32]>,
    grads: GradientsMut<'_>,
) -> Result<()> {
    let tiling = Tiling::new(operands)?;
    let shape = tiling.shape();
    let targets = active_targets(&tiling, targets, ignore)?;
    check_len("dloss", dloss.len(), shape.batch)?;
    let per_row = shape.batch * lse_per_row(operands.mixing, shape.heads);
    check_len("lse", saved.lse.len(), per_row)?;
    check_len("target_logits", saved.target_logits.len(), per_row)?;
    check_gradients(shape, &grads)?;
    Backward::new(tiling, Upstream::CrossEntropy { dloss, targets, saved }).run(grads);
    Ok(())
}

/// Bytes the cross-entropy (forward or backward) allocates on the host
/// beyond its inputs and outputs: O(B * H * D) of per-row constants and
/// folded user states, V bytes of exclusion flags, the log-sum-exp pass's
/// partials per (row, head, item chunk) with at most 64 chunks and its
/// targets' logits (an index and a value per row and head), per worker a
/// score tile and an item tile, and the backward's partial sums: per row
/// block a pairwise stack of `[64, H, D]` (log2 of V / 1024 deep) and, for
/// the leaves in flight, the rows' `[B, H, D]` and the later row groups'
/// `[1024, H, D]` dX partials.
pub fn workspace_bytes(shape: ScoringShape) -> usize {
    let ScoringShape {
        batch,
        heads,
        width,
        num_items,
        ..
    } = shape;
    let word = std::mem::size_of::<f32>();
    let vec = std::mem::size_of::<Vec<f32>>();
    let threads = rayon::current_num_threads();
    let tiling = word * (2 * batch * heads * width + 2 * batch * heads) + num_items + heads * vec;
    let row_constants = word * (batch + 2 * batch * heads);
    let row_blocks = batch.div_ceil(TILE_ROWS);
    let chunks = chunk_count(num_items);
    let target_logits = (word + std::mem::size_of::<(usize, f32)>()) * batch * heads;
    let lse_pass = row_blocks * chunks * (4 * std::mem::size_of::<usize>() + 2 * vec)
        + 2 * word * batch * heads * chunks
        + target_logits;
    let levels = (usize::BITS - chunks.leading_zeros()) as usize + 2;
    let pairwise_lse = levels * (2 * word * TILE_ROWS * heads + 2 * vec);
    let forward = lse_pass + threads * (Scratch::bytes(width) + pairwise_lse);
    let leaf_items = BACKWARD_LEAF_TILES * TILE_ITEMS;
    let leaves = num_items.div_ceil(leaf_items);
    let groups = batch.div_ceil(GROUP_ROWS);
    let wave = wave_leaves(groups, threads).min(leaves);
    let per_row = word * (heads * width + 1);
    let stack_levels = (usize::BITS - leaves.leading_zeros()) as usize + 1;
    let stacks = batch * per_row * stack_levels + row_blocks * (stack_levels + 1) * (vec + 2 * word);
    let in_flight = wave * (batch * per_row + row_blocks * vec)
        + wave * groups.saturating_sub(1) * (leaf_items * per_row + 2 * vec)
        + wave * groups * (3 * vec + 4 * std::mem::size_of::<usize>()) * 2;
    let backward = stacks + in_flight + threads * Scratch::bytes(width);
    tiling + row_constants + forward.max(backward)
}
