//! The backward passes on tiles. Each recomputes the score tiles, turns
//! them in place into the gradient of the channel's logits (dC), and feeds
//! gemm: a pass over row blocks sums `A_p += dC X_p` (dU and dG), a pass over
//! item tiles sums `dX_p += dC^T U'_p` and the item bias's gradient. Each
//! pass owns its outputs, so the work splits by shape alone and the bits do
//! not depend on the thread count.

use super::super::{Mixing, ScoringShape};
use super::tiles::{
    add_buffers, blocks, softmax_scaled, weighted_rows, Pairwise, Scratch, Tiling, LEAF_TILES, TILE_ITEMS, TILE_ROWS,
};
use super::GradientsMut;
use crate::dtype::FloatElement;
use crate::ops::host::{matmul_add, Matrix};
use rayon::prelude::*;
use std::ops::Range;

/// Rows per `dC X` product: gemm reads X in place (no packing copy per
/// tile) for up to two of its 16-row kernels.
const GEMM_ROWS: usize = 32;

/// Which gradient flows into the scores.
pub(super) enum Upstream<'a> {
    /// From dS `[B, V]` of `scores`.
    Scores(&'a [f32]),
    /// From dloss `[B]` of the cross-entropy with these targets (u32::MAX for
    /// ignored rows) and the forward's log-sum-exps `[B, channels]`.
    CrossEntropy {
        dloss: &'a [f32],
        targets: Vec<u32>,
        lse: &'a [f32],
    },
}

pub(super) struct Backward<'a, T> {
    tiling: Tiling<'a, T>,
    upstream: Upstream<'a>,
    /// `[B, channels]`: the channels' log-sum-exps (not for Logits scores).
    lse: Vec<f32>,
    /// `[B, channels]`: for Probabilities mixing of scores `<q_h, dS>`, for
    /// Probabilities cross-entropy `dloss * r_h` (the responsibilities).
    coef: Vec<f32>,
}

impl<'a, T: FloatElement> Backward<'a, T> {
    pub(super) fn new(tiling: Tiling<'a, T>, upstream: Upstream<'a>) -> Self {
        let ScoringShape { batch, heads, .. } = tiling.shape();
        let channels = tiling.channels();
        let (lse, coef) = match (&upstream, tiling.operands.mixing) {
            (Upstream::Scores(_), Mixing::Logits) => (Vec::new(), Vec::new()),
            (Upstream::Scores(dscores), Mixing::Probabilities) => {
                let lse = tiling.row_lse();
                let coef = probability_dots(&tiling, &lse, dscores);
                (lse, coef)
            }
            (Upstream::CrossEntropy { dloss, targets, lse }, mixing) => {
                let mut coef = vec![0f32; batch * channels];
                if mixing == Mixing::Probabilities {
                    for (b, coef) in coef.chunks_mut(heads).enumerate() {
                        if targets[b] != u32::MAX {
                            let r = responsibilities(&tiling, b, targets[b], &lse[b * heads..(b + 1) * heads]);
                            coef.iter_mut().zip(r).for_each(|(c, r)| *c = dloss[b] * r);
                        }
                    }
                }
                (lse.to_vec(), coef)
            }
        };
        let mut backward = Backward {
            tiling,
            upstream,
            lse,
            coef,
        };
        // Ignored rows contribute exact zeros to dX whatever they hold: their
        // dC is 0, and so is their user operand of `dC^T U'`.
        let width = backward.tiling.shape().width;
        let inactive: Vec<usize> = (0..batch).filter(|&b| !backward.active(b)).collect();
        for pair in &mut backward.tiling.pairs {
            for &b in &inactive {
                pair.user[b * width..(b + 1) * width].fill(0.0);
            }
        }
        backward
    }

    fn active(&self, b: usize) -> bool {
        match &self.upstream {
            Upstream::Scores(_) => true,
            Upstream::CrossEntropy { targets, .. } => targets[b] != u32::MAX,
        }
    }

    /// Turns the item-major logits tile of `channel` in place into dL/dC.
    fn form_grad(&self, channel: usize, rows: Range<usize>, items: Range<usize>, tile: &mut [f32]) {
        let ScoringShape { num_items, heads, .. } = self.tiling.shape();
        let channels = self.tiling.channels();
        let m = rows.len();
        let at = |b: usize| b * channels + channel;
        match &self.upstream {
            Upstream::Scores(dscores) => {
                // Small catalogs only (dS is [B, V]): plain loops.
                for (j, v) in items.clone().enumerate() {
                    let column = &mut tile[j * m..(j + 1) * m];
                    for (x, b) in column.iter_mut().zip(rows.clone()) {
                        let d = dscores[b * num_items + v];
                        *x = match self.tiling.operands.mixing {
                            _ if !self.tiling.eligible[v] => 0.0,
                            Mixing::Logits => d,
                            Mixing::Probabilities => {
                                let q = (*x - self.lse[at(b)]).exp();
                                self.tiling.gates[b * heads + channel] * q * (d - self.coef[at(b)])
                            }
                        };
                    }
                }
            }
            Upstream::CrossEntropy { dloss, targets, .. } => {
                let weight: Vec<f32> = rows
                    .clone()
                    .map(|b| match (self.active(b), self.tiling.operands.mixing) {
                        (false, _) => 0.0,
                        (true, Mixing::Logits) => dloss[b],
                        (true, Mixing::Probabilities) => self.coef[at(b)],
                    })
                    .collect();
                let lse: Vec<f32> = rows.clone().map(|b| self.lse[at(b)]).collect();
                softmax_scaled(tile, &lse, &weight);
                for (r, b) in rows.clone().enumerate() {
                    let target = targets[b] as usize;
                    if !self.active(b) {
                        // Exact zeros whatever the saved lse holds.
                        (0..items.len()).for_each(|j| tile[j * m + r] = 0.0);
                    } else if items.contains(&target) {
                        tile[(target - items.start) * m + r] -= weight[r];
                    }
                }
            }
        }
    }

    pub(super) fn run(&self, grads: GradientsMut<'_>) {
        self.user_and_gates(grads.user, grads.gate_logits);
        self.items_and_bias(grads.items, grads.item_bias);
    }

    /// dU and dG: row blocks in parallel, each summing `A_p = dC X_p` (and
    /// for Logits mixing `dC . bias`) over the items, tiles in order within a
    /// leaf of [`LEAF_TILES`], leaves pairwise.
    fn user_and_gates(&self, d_user: &mut [f32], d_gates: &mut [f32]) {
        let ScoringShape {
            batch,
            heads,
            width,
            num_items,
            shared,
        } = self.tiling.shape();
        let pairs = self.tiling.pairs.len();
        let mixing = self.tiling.operands.mixing;
        let item_bias = self.tiling.operands.item_bias.filter(|_| mixing == Mixing::Logits);
        let row_blocks: Vec<Range<usize>> = blocks(batch, TILE_ROWS).collect();
        d_user
            .par_chunks_mut(TILE_ROWS * heads * width)
            .zip(d_gates.par_chunks_mut(TILE_ROWS * heads))
            .zip(row_blocks)
            .for_each(|((d_user, d_gates), rows)| {
                let m = rows.len();
                let leaf_len = pairs * m * width + m;
                let mut leaf = vec![0f32; leaf_len];
                let mut sum = Pairwise::new();
                let mut scratch = Scratch::new();
                let tiles = num_items.div_ceil(TILE_ITEMS);
                for (t, items) in blocks(num_items, TILE_ITEMS).enumerate() {
                    let n = items.len();
                    for channel in 0..self.tiling.channels() {
                        self.tiling
                            .channel_tile(channel, rows.clone(), items.clone(), &mut scratch);
                        let tile = &mut scratch.tile[..m * n];
                        self.form_grad(channel, rows.clone(), items.clone(), tile);
                        for (p, pair) in self.tiling.pairs_of(channel) {
                            let x = self.tiling.items_f32(pair.table, items.clone(), &mut scratch.items);
                            let x_t = Matrix::row_major(x, n, width).transposed();
                            let a_t = &mut leaf[p * m * width..(p + 1) * m * width];
                            // A^T [D, rows] += X^T dC^T, in halves of at most
                            // GEMM_ROWS rows so that gemm reads X in place.
                            for half in blocks(m, GEMM_ROWS) {
                                let d_c = Matrix::strided(&tile[half.start..], n, half.len(), m, 1);
                                let a_t = &mut a_t[half.start * width..half.end * width];
                                matmul_add(x_t, d_c, a_t);
                            }
                        }
                        if let Some(bias) = item_bias {
                            let masked = &mut scratch.bias;
                            masked.clear();
                            masked.extend(
                                bias[items.clone()]
                                    .iter()
                                    .zip(&self.tiling.eligible[items.clone()])
                                    .map(|(&b, &e)| if e { b } else { 0.0 }),
                            );
                            weighted_rows(&mut leaf[pairs * m * width..], tile, masked);
                        }
                    }
                    if (t + 1) % LEAF_TILES == 0 || t + 1 == tiles {
                        sum.push(std::mem::replace(&mut leaf, vec![0f32; leaf_len]), add_buffers);
                    }
                }
                let sums = sum.finish(add_buffers).unwrap_or_else(|| vec![0f32; leaf_len]);
                for (r, b) in rows.enumerate() {
                    let d_user = &mut d_user[r * heads * width..(r + 1) * heads * width];
                    let d_gates = &mut d_gates[r * heads..(r + 1) * heads];
                    if !self.active(b) {
                        d_user.fill(0.0);
                        d_gates.fill(0.0);
                        continue;
                    }
                    // A^T of pair p, rows in halves: column r of its half.
                    let half = blocks(m, GEMM_ROWS).find(|h| h.contains(&r)).expect("r < m");
                    let a = |p: usize| {
                        let a_t = &sums[(p * m + half.start) * width..(p * m + half.end) * width];
                        a_t.iter()
                            .skip(r - half.start)
                            .step_by(half.len())
                            .copied()
                            .collect::<Vec<f32>>()
                    };
                    let gates = self.tiling.gates(b);
                    let scale = self.tiling.operands.scale;
                    let mut dg = vec![0f32; heads];
                    for h in 0..heads {
                        let du = &mut d_user[h * width..(h + 1) * width];
                        match mixing {
                            Mixing::Logits => {
                                let a = a(if shared { 0 } else { h });
                                let u = &self.tiling.user[(b * heads + h) * width..][..width];
                                du.iter_mut().zip(&a).for_each(|(d, a)| *d = scale * gates[h] * a);
                                // A zero term stays zero whatever u holds
                                // (no eligible item: the gradient is 0).
                                let dot: f32 = u
                                    .iter()
                                    .zip(&a)
                                    .map(|(&u, &a)| if a == 0.0 { 0.0 } else { u * a })
                                    .sum();
                                dg[h] = scale * dot + sums[pairs * m * width + r];
                            }
                            Mixing::Probabilities => {
                                du.iter_mut().zip(a(h)).for_each(|(d, a)| *d = scale * a);
                                dg[h] = self.coef[b * heads + h];
                            }
                        }
                    }
                    match (&self.upstream, mixing) {
                        (Upstream::CrossEntropy { dloss, .. }, Mixing::Probabilities) => {
                            for h in 0..heads {
                                d_gates[h] = dloss[b] * gates[h] - dg[h];
                            }
                        }
                        _ => {
                            let mean: f32 = gates.iter().zip(&dg).map(|(g, d)| g * d).sum();
                            for h in 0..heads {
                                d_gates[h] = gates[h] * (dg[h] - mean);
                            }
                        }
                    }
                }
            });
    }

    /// dX and ditem_bias: item tiles in parallel, each summing
    /// `dX_p += dC^T U'_p` over the row blocks in order.
    fn items_and_bias(&self, d_items: &mut [f32], d_bias: &mut [f32]) {
        let ScoringShape {
            batch,
            width,
            num_items,
            ..
        } = self.tiling.shape();
        let tiles = num_items.div_ceil(TILE_ITEMS);
        let mut per_tile: Vec<Vec<&mut [f32]>> = (0..tiles).map(|_| Vec::new()).collect();
        for table in d_items.chunks_mut(num_items * width) {
            for (t, rows) in table.chunks_mut(TILE_ITEMS * width).enumerate() {
                per_tile[t].push(rows);
            }
        }
        per_tile
            .into_par_iter()
            .zip(d_bias.par_chunks_mut(TILE_ITEMS))
            .zip(blocks(num_items, TILE_ITEMS).collect::<Vec<_>>())
            .for_each(|((mut d_tables, d_bias), items)| {
                d_tables.iter_mut().for_each(|d| d.fill(0.0));
                d_bias.fill(0.0);
                let n = items.len();
                let mut scratch = Scratch::new();
                for rows in blocks(batch, TILE_ROWS) {
                    let m = rows.len();
                    for channel in 0..self.tiling.channels() {
                        self.tiling
                            .channel_tile(channel, rows.clone(), items.clone(), &mut scratch);
                        let tile = &mut scratch.tile[..m * n];
                        self.form_grad(channel, rows.clone(), items.clone(), tile);
                        for (_, pair) in self.tiling.pairs_of(channel) {
                            // dX [items, D] += dC^T U' with dC^T item-major.
                            matmul_add(
                                Matrix::row_major(tile, n, m),
                                Matrix::row_major(&pair.user[rows.start * width..rows.end * width], m, width),
                                d_tables[pair.table],
                            );
                        }
                        for (db, column) in d_bias.iter_mut().zip(tile.chunks_exact(m)) {
                            *db += column.iter().sum::<f32>();
                        }
                    }
                }
                // Excluded items get exact zeros whatever the user states
                // hold (their dC is 0; 0 * inf would be NaN).
                for (j, _) in self.tiling.eligible[items].iter().enumerate().filter(|(_, &e)| !e) {
                    for d_table in d_tables.iter_mut() {
                        d_table[j * width..(j + 1) * width].fill(0.0);
                    }
                }
            });
    }
}

/// `<q_h, dS[b]>` per row and head, with `q_h = softmax_v s[b, h, .]`
/// over the eligible items.
fn probability_dots<T: FloatElement>(tiling: &Tiling<'_, T>, lse: &[f32], dscores: &[f32]) -> Vec<f32> {
    let ScoringShape {
        batch,
        heads,
        num_items,
        ..
    } = tiling.shape();
    let mut dots = vec![0f32; batch * heads];
    dots.par_chunks_mut(TILE_ROWS * heads)
        .zip(blocks(batch, TILE_ROWS).collect::<Vec<_>>())
        .for_each(|(dots, rows)| {
            let m = rows.len();
            tiling.sweep(rows.clone(), |items, tiles| {
                let size = m * items.len();
                for (h, tile) in tiles.chunks_exact(size).enumerate() {
                    for (v, column) in items.clone().zip(tile.chunks_exact(m)) {
                        if !tiling.eligible[v] {
                            continue;
                        }
                        for ((r, b), &s) in rows.clone().enumerate().zip(column) {
                            let q = (s - lse[b * heads + h]).exp();
                            dots[r * heads + h] += q * dscores[b * num_items + v];
                        }
                    }
                }
            });
        });
    dots
}

/// `r_h = g_h q_h(y) / P(y)`, in log space so that a P that underflows
/// still gives finite responsibilities.
fn responsibilities<T: FloatElement>(tiling: &Tiling<'_, T>, b: usize, target: u32, lse: &[f32]) -> Vec<f32> {
    let heads = tiling.shape().heads;
    let mut s = vec![0f32; heads];
    tiling.head_logits(b, target as usize, &mut s);
    let log_gates = &tiling.log_gates[b * heads..(b + 1) * heads];
    let log_joint: Vec<f32> = (0..heads).map(|h| log_gates[h] + s[h] - lse[h]).collect();
    let log_p = super::log_sum_exp(&log_joint);
    log_joint.iter().map(|x| (x - log_p).exp()).collect()
}
