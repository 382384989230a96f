//! The backward passes on tiles. One pass over the (row block, item tile)
//! grid recomputes each score tile once, turns it in place into the
//! gradient of the channel's logits (dC), and feeds both of its products to
//! gemm: `A_p += dC X_p` (dU and dG) and `dX_p += dC^T U'_p` with the item
//! bias's gradient. A task is a group of rows against a leaf of item tiles;
//! each sum runs in an order fixed by the shapes (row blocks in order within
//! a group, groups in order; tiles in order within a leaf, leaves
//! pairwise), so the bits do not depend on the thread count.

use super::super::{Mixing, RowTerms, ScoringShape};
use super::tiles::{
    add_assign, add_buffers, blocks, column_sums, softmax_scaled, weighted_rows, Pairwise, Scratch, Tiling, TILE_ITEMS,
    TILE_ROWS,
};
use super::GradientsMut;
use crate::dtype::FloatElement;
use crate::ops::host::{matmul_add, Matrix};
use rayon::prelude::*;
use std::ops::Range;

/// Rows per `dC X` product: gemm reads X in place (no packing copy per
/// tile) for up to two of its 16-row kernels.
const GEMM_ROWS: usize = 32;
/// Item tiles per backward task: a row block's `A_p` sums them in order.
/// Small, so that a catalog of a few thousand items still makes several
/// tasks and a task's dX partial (`[1024, H * D]`) stays near the cache.
pub(super) const BACKWARD_LEAF_TILES: usize = 4;
/// Rows per backward task: the dX partial of a task sums its row blocks in
/// order, and the groups' partials are added in order. Catalog-sized partials
/// for groups after the first cost `(B / GROUP_ROWS) * 1024 * H * D` floats
/// per leaf in flight.
pub(super) const GROUP_ROWS: usize = 8 * TILE_ROWS;

/// Leaves of item tiles run at once: enough tasks for every thread twice
/// over, the whole catalog at most. Changes no sum, only the memory held.
pub(super) fn wave_leaves(groups: usize, threads: usize) -> usize {
    (2 * threads).div_ceil(groups.max(1)).max(1)
}

/// Which gradient flows into the scores.
pub(super) enum Upstream<'a> {
    /// From dS `[B, V]` of `scores`.
    Scores(&'a [f32]),
    /// From dloss `[B]` of the cross-entropy with these targets (u32::MAX for
    /// ignored rows) and the forward's row terms `[B, channels]`.
    CrossEntropy {
        dloss: &'a [f32],
        targets: Vec<u32>,
        saved: RowTerms<&'a [f32]>,
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
    /// `[B, H]`, Probabilities cross-entropy only: dG = `dloss * (g_h - r_h)`.
    gate_grads: Vec<f32>,
}

impl<'a, T: FloatElement> Backward<'a, T> {
    pub(super) fn new(tiling: Tiling<'a, T>, upstream: Upstream<'a>) -> Self {
        let ScoringShape { batch, heads, .. } = tiling.shape();
        let channels = tiling.channels();
        let mut gate_grads = Vec::new();
        let (lse, coef) = match (&upstream, tiling.operands.mixing) {
            (Upstream::Scores(_), Mixing::Logits) => (Vec::new(), Vec::new()),
            (Upstream::Scores(dscores), Mixing::Probabilities) => {
                let lse = tiling.row_lse();
                let coef = probability_dots(&tiling, &lse, dscores);
                (lse, coef)
            }
            (Upstream::CrossEntropy { dloss, targets, saved }, mixing) => {
                let mut coef = vec![0f32; batch * channels];
                if mixing == Mixing::Probabilities {
                    gate_grads = vec![0f32; batch * heads];
                    let rows = coef.chunks_mut(heads).zip(gate_grads.chunks_mut(heads));
                    for (b, (coef, gate_grads)) in rows.enumerate().filter(|&(b, _)| targets[b] != u32::MAX) {
                        let at = b * heads..(b + 1) * heads;
                        let log_q: Vec<f32> = saved.target_logits[at.clone()]
                            .iter()
                            .zip(&saved.lse[at.clone()])
                            .map(|(s, lse)| s - lse)
                            .collect();
                        let terms = MixtureTerms::new(&tiling.log_gates[at.clone()], &tiling.gates[at], &log_q);
                        for h in 0..heads {
                            coef[h] = dloss[b] * terms.responsibility[h];
                            gate_grads[h] = dloss[b] * terms.gate_minus_responsibility[h];
                        }
                    }
                }
                (saved.lse.to_vec(), coef)
            }
        };
        let mut backward = Backward {
            tiling,
            upstream,
            lse,
            coef,
            gate_grads,
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
        let sums = self.products(grads.items, grads.item_bias);
        self.user_and_gates(sums, grads.user, grads.gate_logits);
    }

    /// One pass over the (row block, item tile) grid that recomputes each
    /// tile once and runs both of its products: `A_p += dC X_p` (summed per
    /// row block over the tiles of a leaf of [`BACKWARD_LEAF_TILES`] in
    /// order, leaves pairwise; returned per row block, with `dC . bias` after
    /// the pairs' `A^T`) and `dX_p += dC^T U'_p` with the item bias's
    /// gradient (per item tile over the row blocks of a group of
    /// [`GROUP_ROWS`] in order, groups in order). A task is one (row group,
    /// leaf); how many leaves run at once (a wave) bounds the partials held
    /// and changes no sum.
    fn products(&self, d_items: &mut [f32], d_bias: &mut [f32]) -> Vec<Vec<f32>> {
        let ScoringShape {
            batch,
            width,
            num_items,
            ..
        } = self.tiling.shape();
        let leaf_items = BACKWARD_LEAF_TILES * TILE_ITEMS;
        let leaves: Vec<Range<usize>> = blocks(num_items, leaf_items).collect();
        let groups: Vec<Range<usize>> = blocks(batch, GROUP_ROWS).collect();
        if groups.is_empty() {
            // No rows: no products, and the gradients are exact zeros.
            d_items.fill(0.0);
            d_bias.fill(0.0);
            return Vec::new();
        }
        let tables = d_items.len() / (num_items * width).max(1);
        let mut stacks: Vec<Pairwise<Vec<f32>>> = blocks(batch, TILE_ROWS).map(|_| Pairwise::new()).collect();
        let wave = wave_leaves(groups.len(), rayon::current_num_threads());
        for wave_leaves in leaves.chunks(wave) {
            // Group 0 of each leaf writes dX and dbias in place; later
            // groups into partials added in group order below.
            let mut in_place: Vec<(Vec<&mut [f32]>, &mut [f32])> = wave_leaves
                .iter()
                .map(|_| (Vec::with_capacity(tables), &mut [][..]))
                .collect();
            let span = wave_leaves[0].start..wave_leaves[wave_leaves.len() - 1].end;
            for table in d_items.chunks_mut(num_items * width) {
                let table = &mut table[span.start * width..span.end * width];
                for (target, rows) in in_place.iter_mut().zip(table.chunks_mut(leaf_items * width)) {
                    target.0.push(rows);
                }
            }
            for (target, bias) in in_place.iter_mut().zip(d_bias[span.clone()].chunks_mut(leaf_items)) {
                target.1 = bias;
            }
            let mut tasks = Vec::with_capacity(wave_leaves.len() * groups.len());
            for (items, target) in wave_leaves.iter().zip(in_place) {
                tasks.push((groups[0].clone(), items.clone(), Some(target)));
                tasks.extend(groups[1..].iter().map(|rows| (rows.clone(), items.clone(), None)));
            }
            let results: Vec<(Vec<Vec<f32>>, Vec<f32>)> = tasks
                .into_par_iter()
                .map(|(rows, items, target)| {
                    let n = items.len();
                    match target {
                        Some((mut d_tables, d_bias)) => {
                            (self.leaf_products(rows, items, &mut d_tables, d_bias), Vec::new())
                        }
                        None => {
                            let mut partial = vec![0f32; (tables * width + 1) * n];
                            let (tables_part, bias_part) = partial.split_at_mut(tables * width * n);
                            let mut d_tables: Vec<&mut [f32]> = tables_part.chunks_mut(width * n).collect();
                            let sums = self.leaf_products(rows, items, &mut d_tables, bias_part);
                            (sums, partial)
                        }
                    }
                })
                .collect();
            let mut results = results.into_iter();
            for items in wave_leaves {
                let n = items.len();
                for rows in &groups {
                    let (sums, partial) = results.next().expect("one result per (leaf, group)");
                    let first = rows.start / TILE_ROWS;
                    for (stack, sum) in stacks[first..].iter_mut().zip(sums) {
                        stack.push(sum, add_buffers);
                    }
                    if partial.is_empty() {
                        continue;
                    }
                    for (table, part) in partial.chunks_exact(width * n).take(tables).enumerate() {
                        let at = (table * num_items + items.start) * width;
                        add_assign(&mut d_items[at..at + width * n], part);
                    }
                    add_assign(&mut d_bias[items.clone()], &partial[tables * width * n..]);
                }
            }
        }
        // Excluded items get exact zeros whatever the user states hold
        // (their dC is 0; 0 * inf would be NaN).
        for (v, _) in self.tiling.eligible.iter().enumerate().filter(|(_, &e)| !e) {
            for table in d_items.chunks_mut(num_items * width) {
                table[v * width..(v + 1) * width].fill(0.0);
            }
        }
        let pairs = self.tiling.pairs.len();
        blocks(batch, TILE_ROWS)
            .zip(stacks)
            .map(|(rows, stack)| {
                stack
                    .finish(add_buffers)
                    .unwrap_or_else(|| vec![0f32; (pairs * width + 1) * rows.len()])
            })
            .collect()
    }

    /// One task of [`Backward::products`]: rows `rows` (a group) against the
    /// items of one leaf. Adds `dC^T U'_p` into `d_tables[table]` (`[leaf
    /// items, D]`, zeroed first) and the columns of dC into `d_bias`; returns
    /// per row block the leaf's `A^T` of every pair (`[pairs, D, rows]` in
    /// halves of [`GEMM_ROWS`]) followed by `dC . bias` (Logits mixing).
    fn leaf_products(
        &self,
        rows: Range<usize>,
        items: Range<usize>,
        d_tables: &mut [&mut [f32]],
        d_bias: &mut [f32],
    ) -> Vec<Vec<f32>> {
        let width = self.tiling.shape().width;
        let pairs = self.tiling.pairs.len();
        let mixing = self.tiling.operands.mixing;
        let item_bias = self.tiling.operands.item_bias.filter(|_| mixing == Mixing::Logits);
        d_tables.iter_mut().for_each(|d| d.fill(0.0));
        d_bias.fill(0.0);
        let mut scratch = Scratch::new();
        blocks(rows.len(), TILE_ROWS)
            .map(|block| {
                let rows = rows.start + block.start..rows.start + block.end;
                let m = rows.len();
                let mut leaf = vec![0f32; pairs * m * width + m];
                for tile in blocks(items.len(), TILE_ITEMS) {
                    let local = tile.clone();
                    let tile_items = items.start + tile.start..items.start + tile.end;
                    let n = tile_items.len();
                    for channel in 0..self.tiling.channels() {
                        self.tiling
                            .channel_tile(channel, rows.clone(), tile_items.clone(), &mut scratch);
                        let tile = &mut scratch.tile[..m * n];
                        self.form_grad(channel, rows.clone(), tile_items.clone(), tile);
                        for (p, pair) in self.tiling.pairs_of(channel) {
                            let x = self
                                .tiling
                                .items_f32(pair.table, tile_items.clone(), &mut scratch.items);
                            let x_t = Matrix::row_major(x, n, width).transposed();
                            let a_t = &mut leaf[p * m * width..(p + 1) * m * width];
                            // A^T [D, rows] += X^T dC^T, in halves of at most
                            // GEMM_ROWS rows so that gemm reads X in place.
                            for half in blocks(m, GEMM_ROWS) {
                                let d_c = Matrix::strided(&tile[half.start..], n, half.len(), m, 1);
                                let a_t = &mut a_t[half.start * width..half.end * width];
                                matmul_add(x_t, d_c, a_t);
                            }
                            // dX [items, D] += dC^T U' with dC^T item-major.
                            matmul_add(
                                Matrix::row_major(tile, n, m),
                                Matrix::row_major(&pair.user[rows.start * width..rows.end * width], m, width),
                                &mut d_tables[pair.table][local.start * width..local.end * width],
                            );
                        }
                        if let Some(bias) = item_bias {
                            let masked = &mut scratch.bias;
                            masked.clear();
                            masked.extend(
                                bias[tile_items.clone()]
                                    .iter()
                                    .zip(&self.tiling.eligible[tile_items.clone()])
                                    .map(|(&b, &e)| if e { b } else { 0.0 }),
                            );
                            weighted_rows(&mut leaf[pairs * m * width..], tile, masked);
                        }
                        column_sums(&mut d_bias[local.clone()], tile, m);
                    }
                }
                leaf
            })
            .collect()
    }

    /// dU and dG of every row block from its sums of [`Backward::products`].
    fn user_and_gates(&self, sums: Vec<Vec<f32>>, d_user: &mut [f32], d_gates: &mut [f32]) {
        let ScoringShape {
            batch,
            heads,
            width,
            shared,
            ..
        } = self.tiling.shape();
        let pairs = self.tiling.pairs.len();
        let mixing = self.tiling.operands.mixing;
        let row_blocks: Vec<Range<usize>> = blocks(batch, TILE_ROWS).collect();
        d_user
            .par_chunks_mut(TILE_ROWS * heads * width)
            .zip(d_gates.par_chunks_mut(TILE_ROWS * heads))
            .zip(row_blocks)
            .zip(sums)
            .for_each(|(((d_user, d_gates), rows), sums)| {
                let m = rows.len();
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
                        (Upstream::CrossEntropy { .. }, Mixing::Probabilities) => {
                            d_gates.copy_from_slice(&self.gate_grads[b * heads..(b + 1) * heads]);
                        }
                        // Through the gate softmax, g_h (dg_h - sum_k g_k dg_k),
                        // relative to dg_0 (the gates sum to 1): exactly 0
                        // when every head's dg is the same (Probabilities
                        // scores of a row with one eligible item), where
                        // dg_h - sum_k g_k dg_k leaves rounding noise.
                        // kernels/scoring.cu computes the same.
                        _ => {
                            let mean: f32 = gates.iter().zip(&dg).map(|(g, d)| g * (d - dg[0])).sum();
                            for h in 0..heads {
                                d_gates[h] = gates[h] * ((dg[h] - dg[0]) - mean);
                            }
                        }
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

/// The mixture's share of each head in the target, from `log g` and
/// `g` of the gates and the heads' log-probabilities of the target
/// `l_h = log q_h(y) = s_h(y) - lse_h` (kernels/scoring.cu computes the same).
struct MixtureTerms {
    /// `r_h = g_h q_h(y) / P(y)`, in log space so that a P that underflows
    /// still gives finite responsibilities.
    responsibility: Vec<f32>,
    /// `g_h - r_h = g_h t_h / (1 + t_h)` with `t_h = sum_k g_k expm1(l_k - l_h)`
    /// (`= P / q_h - 1`, as the gates sum to 1): exactly 0 when every head
    /// gives the target the same probability (one eligible item: every
    /// `l_h = 0`), and accurate when r is close to g, where `g_h - r_h`
    /// would be rounding noise. Outside `t_h` in [-1/2, 1] (or for a
    /// non-finite `t_h`) the difference does not cancel: taken directly.
    gate_minus_responsibility: Vec<f32>,
}

impl MixtureTerms {
    fn new(log_gates: &[f32], gates: &[f32], log_q: &[f32]) -> Self {
        let log_joint: Vec<f32> = log_gates.iter().zip(log_q).map(|(g, l)| g + l).collect();
        let log_p = super::log_sum_exp(&log_joint);
        let responsibility: Vec<f32> = log_joint.iter().map(|x| (x - log_p).exp()).collect();
        let gate_minus_responsibility = (0..gates.len())
            .map(|h| {
                let t: f32 = gates.iter().zip(log_q).map(|(g, l)| g * (l - log_q[h]).exp_m1()).sum();
                if (-0.5..=1.0).contains(&t) {
                    gates[h] * (t / (1.0 + t))
                } else {
                    gates[h] - responsibility[h]
                }
            })
            .collect();
        MixtureTerms {
            responsibility,
            gate_minus_responsibility,
        }
    }
}
