//! Score tiles: a block of rows against a block of items, through `gemm`.
//!
//! A *channel* is one softmax: the mixed logits (Logits mixing, one channel)
//! or one head (Probabilities mixing, H channels). A channel's tile is a sum
//! of products `U'_p X_p^T` over its *pairs* p, each a `[B, D]` user operand
//! with the scale (and for Logits the gate) folded in, against one item table:
//! Logits mixing with per-head tables has one pair per head
//! (`S = sum_h <scale g_h u_h, x_h> + bias`), with a shared table one pair
//! (`<scale sum_h g_h u_h, x>`); Probabilities mixing one pair per channel.
//! The item bias (and -inf at excluded items) is added to every channel.
//!
//! Tiles are item-major (`tile[v * rows + r]`): with the user operands
//! stored both `[D, B]` and `[B, D]`, every product the ops run (the scores
//! `X U'^T`, the backward's `dC X` and `dC^T U'`) then reads its operands in
//! the layouts gemm's kernel wants, with no packing copy per tile, and the
//! per-row work (maxima, exponentials, top-n bars) vectorises along the rows.
//!
//! Log-sum-exps are taken per tile (maximum, then a sum of exponentials per
//! row) and merged pairwise in a tree that depends only on the number of
//! tiles, so the f32 error grows with log V rather than V.

use super::super::{Mixing, ScoringShape};
use super::Operands;
use crate::dtype::FloatElement;
use crate::error::Result;
use crate::ops::host::{exp_or_zero, gemm_f32, vectorised, widened_into, Matrix};
use rayon::prelude::*;
use std::ops::Range;

/// Rows per tile: the product's m, enough for gemm to reuse each packed item
/// tile 64 times.
pub(super) const TILE_ROWS: usize = 64;
/// Items per tile: a `[TILE_ROWS, TILE_ITEMS]` f32 tile is 64 KiB, which
/// stays in L2 beside the item tile while its exponentials are taken.
pub(super) const TILE_ITEMS: usize = 256;
/// Tiles summed in order before the pairwise tree takes over: 4,096 items.
pub(super) const LEAF_TILES: usize = 16;
/// The most item chunks the log-sum-exp pass splits a row block into.
const MAX_CHUNKS: usize = 64;

/// `0..len` cut into pieces of `step` (the last may be shorter).
pub(super) fn blocks(len: usize, step: usize) -> impl Iterator<Item = Range<usize>> + Clone {
    (0..len.div_ceil(step)).map(move |i| i * step..len.min((i + 1) * step))
}

/// The item chunks of the log-sum-exp pass: whole runs of tiles, at most
/// [`MAX_CHUNKS`], at least [`LEAF_TILES`] tiles each; a function of V only.
pub(super) fn item_chunks(num_items: usize) -> Vec<Range<usize>> {
    let tiles = num_items.div_ceil(TILE_ITEMS);
    let chunk_tiles = LEAF_TILES.max(tiles.div_ceil(MAX_CHUNKS));
    blocks(num_items, chunk_tiles * TILE_ITEMS).collect()
}

/// How many item chunks [`item_chunks`] makes.
pub(super) fn chunk_count(num_items: usize) -> usize {
    let tiles = num_items.div_ceil(TILE_ITEMS);
    tiles.div_ceil(LEAF_TILES.max(tiles.div_ceil(MAX_CHUNKS)))
}

/// Sums in a fixed binary tree: item i joins a stack of partial sums like a
/// carry in a binary counter, so the tree depends only on the count. Its
/// error grows with the log of the count, a running sum's with the count.
pub(super) struct Pairwise<T> {
    stack: Vec<(u32, T)>,
}

impl<T> Pairwise<T> {
    pub(super) fn new() -> Self {
        Pairwise { stack: Vec::new() }
    }

    pub(super) fn push(&mut self, mut item: T, merge: impl Fn(T, T) -> T) {
        let mut level = 0;
        while self.stack.last().is_some_and(|(top, _)| *top == level) {
            let (_, top) = self.stack.pop().expect("checked above");
            item = merge(top, item);
            level += 1;
        }
        self.stack.push((level, item));
    }

    /// The sum of everything pushed, `None` when nothing was.
    pub(super) fn finish(mut self, merge: impl Fn(T, T) -> T) -> Option<T> {
        let (_, mut sum) = self.stack.pop()?;
        while let Some((_, earlier)) = self.stack.pop() {
            sum = merge(earlier, sum);
        }
        Some(sum)
    }
}

/// `a += b`, elementwise: the merge of pairwise sums of buffers.
pub(super) fn add_buffers(mut a: Vec<f32>, b: Vec<f32>) -> Vec<f32> {
    add_assign(&mut a, &b);
    a
}

/// A log-sum-exp in two parts: the maximum and the sum of exponentials
/// relative to it. A NaN term lives in the sum, so it propagates; an empty or
/// all -inf set is (-inf, 0).
#[derive(Clone, Copy, Debug)]
pub(super) struct Lse {
    max: f32,
    sum: f32,
}

impl Lse {
    pub(super) const EMPTY: Lse = Lse {
        max: f32::NEG_INFINITY,
        sum: 0.0,
    };

    /// Of a few values (a row's gate logits, its heads' joint terms).
    pub(super) fn of(values: &[f32]) -> Lse {
        let max = values.iter().fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
        let shift = if max == f32::NEG_INFINITY { 0.0 } else { max };
        Lse {
            max,
            sum: values.iter().map(|&x| exp_or_zero(x - shift)).sum(),
        }
    }

    pub(super) fn merge(self, other: Lse) -> Lse {
        let max = if other.max > self.max { other.max } else { self.max };
        if max == f32::NEG_INFINITY {
            return Lse {
                max,
                sum: self.sum + other.sum,
            };
        }
        Lse {
            max,
            sum: self.sum * (self.max - max).exp() + other.sum * (other.max - max).exp(),
        }
    }

    pub(super) fn value(self) -> f32 {
        self.max + self.sum.ln()
    }
}

/// Merges two equally long runs of log-sum-exps elementwise.
fn merge_lse(mut a: Vec<Lse>, b: Vec<Lse>) -> Vec<Lse> {
    a.iter_mut().zip(b).for_each(|(a, b)| *a = a.merge(b));
    a
}

#[inline(always)]
fn column_stats_body(tile: &[f32], max: &mut [f32], sum: &mut [f32]) {
    let m = max.len();
    max.fill(f32::NEG_INFINITY);
    for column in tile.chunks_exact(m) {
        for (mx, &x) in max.iter_mut().zip(column) {
            *mx = if x > *mx { x } else { *mx };
        }
    }
    sum.fill(0.0);
    for column in tile.chunks_exact(m) {
        for ((s, &mx), &x) in sum.iter_mut().zip(max.iter()).zip(column) {
            let shift = if mx == f32::NEG_INFINITY { 0.0 } else { mx };
            *s += exp_or_zero(x - shift);
        }
    }
}

#[inline(always)]
fn add_bias_body(tile: &mut [f32], bias: &[f32], rows: usize) {
    for (column, &b) in tile.chunks_exact_mut(rows).zip(bias) {
        column.iter_mut().for_each(|x| *x += b);
    }
}

#[inline(always)]
fn softmax_scaled_body(tile: &mut [f32], lse: &[f32], weight: &[f32]) {
    for column in tile.chunks_exact_mut(lse.len()) {
        for ((x, &l), &w) in column.iter_mut().zip(lse).zip(weight) {
            *x = w * exp_or_zero(*x - l);
        }
    }
}

#[inline(always)]
fn mix_probability_body(acc: &mut [f32], tile: &[f32], lse: &[f32], gate: &[f32]) {
    let m = lse.len();
    for (acc, column) in acc.chunks_exact_mut(m).zip(tile.chunks_exact(m)) {
        for (((a, &s), &l), &g) in acc.iter_mut().zip(column).zip(lse).zip(gate) {
            *a += g * exp_or_zero(s - l);
        }
    }
}

#[inline(always)]
fn weighted_rows_body(acc: &mut [f32], tile: &[f32], weights: &[f32]) {
    for (column, &w) in tile.chunks_exact(acc.len()).zip(weights) {
        acc.iter_mut().zip(column).for_each(|(a, &x)| *a += x * w);
    }
}

#[inline(always)]
fn column_sums_body(acc: &mut [f32], tile: &[f32], rows: usize) {
    for (acc, column) in acc.iter_mut().zip(tile.chunks_exact(rows)) {
        // Eight running sums, one per lane, then a fixed tree: a single
        // running sum is a chain of dependent adds that does not vectorise.
        let mut lanes = [0f32; 8];
        let mut chunks = column.chunks_exact(8);
        for chunk in &mut chunks {
            lanes.iter_mut().zip(chunk).for_each(|(l, &x)| *l += x);
        }
        let [l0, l1, l2, l3, l4, l5, l6, l7] = lanes;
        let tail: f32 = chunks.remainder().iter().sum();
        *acc += (((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))) + tail;
    }
}

#[inline(always)]
fn add_assign_body(acc: &mut [f32], values: &[f32]) {
    acc.iter_mut().zip(values).for_each(|(a, v)| *a += v);
}

vectorised! {
    /// Per row of an item-major tile (`max`, `sum` one entry per row): the
    /// largest value ignoring NaN (-inf for none) and `sum e^(x - max)` with
    /// -inf terms exactly 0.
    fn column_stats(tile: &[f32], max: &mut [f32], sum: &mut [f32]) = column_stats_body;
}
vectorised! {
    /// `tile[v, r] += bias[v]`.
    fn add_bias(tile: &mut [f32], bias: &[f32], rows: usize) = add_bias_body;
}
vectorised! {
    /// `tile[v, r] = weight[r] * e^(tile[v, r] - lse[r])`: softmax
    /// probabilities, scaled per row.
    pub(super) fn softmax_scaled(tile: &mut [f32], lse: &[f32], weight: &[f32]) = softmax_scaled_body;
}
vectorised! {
    /// `acc[v, r] += gate[r] * e^(tile[v, r] - lse[r])`: one head's term of
    /// the mixture of softmaxes.
    fn mix_probability(acc: &mut [f32], tile: &[f32], lse: &[f32], gate: &[f32]) = mix_probability_body;
}
vectorised! {
    /// `acc[r] += sum_v tile[v, r] * weights[v]`.
    pub(super) fn weighted_rows(acc: &mut [f32], tile: &[f32], weights: &[f32]) = weighted_rows_body;
}
vectorised! {
    /// `acc[v] += sum_r tile[v, r]` of an item-major tile of `rows` rows.
    pub(super) fn column_sums(acc: &mut [f32], tile: &[f32], rows: usize) = column_sums_body;
}
vectorised! {
    /// `acc += values`.
    pub(super) fn add_assign(acc: &mut [f32], values: &[f32]) = add_assign_body;
}

/// One product of a channel: a folded `[B, D]` user operand against a table.
pub(super) struct Pair {
    pub(super) channel: usize,
    /// The item table's head (0 for a shared table).
    pub(super) table: usize,
    /// `[B, D]`: the right operand of `dX += dC^T U'`.
    pub(super) user: Vec<f32>,
    /// `[D, B]`: the right operand of the scores `X U'^T`.
    pub(super) user_t: Vec<f32>,
}

impl Pair {
    fn new(channel: usize, table: usize, user: Vec<f32>, width: usize) -> Self {
        let batch = user.len() / width;
        let mut user_t = vec![0f32; user.len()];
        for (b, row) in user.chunks_exact(width).enumerate() {
            for (d, &u) in row.iter().enumerate() {
                user_t[d * batch + b] = u;
            }
        }
        Pair {
            channel,
            table,
            user,
            user_t,
        }
    }
}

/// A worker's buffers for one task.
pub(super) struct Scratch {
    /// A channel's score tile, item-major: `[items, rows]`.
    pub(super) tile: Vec<f32>,
    /// An item tile widened to f32 (bf16/f16 tables).
    pub(super) items: Vec<f32>,
    /// The bias of the tile's items, 0 at excluded ones (the backward's
    /// `dC . bias`).
    pub(super) bias: Vec<f32>,
}

impl Scratch {
    pub(super) fn new() -> Self {
        Scratch {
            tile: vec![0.0; TILE_ROWS * TILE_ITEMS],
            items: Vec::new(),
            bias: Vec::with_capacity(TILE_ITEMS),
        }
    }

    /// Bytes one scratch holds at most, for a width D.
    pub(super) fn bytes(width: usize) -> usize {
        4 * (TILE_ROWS * TILE_ITEMS + TILE_ITEMS * width + TILE_ITEMS)
    }
}

/// Validated operands with the per-row constants and folded user operands
/// every pass needs.
pub(super) struct Tiling<'a, T> {
    pub(super) operands: Operands<'a, T>,
    /// U widened to f32, `[B, H, D]`.
    pub(super) user: Vec<f32>,
    /// `g = softmax_h G`, `[B, H]`.
    pub(super) gates: Vec<f32>,
    /// `log g`, `[B, H]`.
    pub(super) log_gates: Vec<f32>,
    /// `[V]`: not excluded.
    pub(super) eligible: Vec<bool>,
    pub(super) pairs: Vec<Pair>,
}

impl<'a, T: FloatElement> Tiling<'a, T> {
    pub(super) fn new(operands: Operands<'a, T>) -> Result<Self> {
        let ScoringShape {
            batch,
            heads,
            width,
            num_items,
            shared,
        } = operands.shape;
        operands.shape.check_buffers(
            operands.user.len(),
            operands.gate_logits.len(),
            operands.items.len(),
            operands.item_bias.map(<[f32]>::len),
        )?;
        let eligible = super::eligible_items(operands.excluded, num_items)?;
        let user: Vec<f32> = operands.user.iter().map(|x| x.to_f32()).collect();
        let mut log_gates: Vec<f32> = operands.gate_logits.iter().map(|x| x.to_f32()).collect();
        for row in log_gates.chunks_mut(heads) {
            let lse = Lse::of(row).value();
            row.iter_mut().for_each(|x| *x -= lse);
        }
        let gates: Vec<f32> = log_gates.iter().map(|x| x.exp()).collect();
        let scale = operands.scale;
        let fold = |weight: &dyn Fn(usize, usize) -> f32, heads_of_pair: Range<usize>| -> Vec<f32> {
            let mut folded = vec![0f32; batch * width];
            for (b, row) in folded.chunks_mut(width).enumerate() {
                for h in heads_of_pair.clone() {
                    let w = weight(b, h);
                    let u = &user[(b * heads + h) * width..][..width];
                    row.iter_mut().zip(u).for_each(|(f, &u)| *f += w * u);
                }
            }
            folded
        };
        let gated = |b: usize, h: usize| scale * gates[b * heads + h];
        let plain = |_: usize, _: usize| scale;
        let pairs = match (operands.mixing, shared) {
            (Mixing::Logits, true) => vec![Pair::new(0, 0, fold(&gated, 0..heads), width)],
            (Mixing::Logits, false) => (0..heads)
                .map(|h| Pair::new(0, h, fold(&gated, h..h + 1), width))
                .collect(),
            (Mixing::Probabilities, _) => (0..heads)
                .map(|h| Pair::new(h, if shared { 0 } else { h }, fold(&plain, h..h + 1), width))
                .collect(),
        };
        Ok(Tiling {
            operands,
            user,
            gates,
            log_gates,
            eligible,
            pairs,
        })
    }

    pub(super) fn shape(&self) -> ScoringShape {
        self.operands.shape
    }

    /// Softmaxes per row: 1 (Logits mixing) or H (Probabilities).
    pub(super) fn channels(&self) -> usize {
        super::lse_per_row(self.operands.mixing, self.shape().heads)
    }

    pub(super) fn pairs_of(&self, channel: usize) -> impl Iterator<Item = (usize, &Pair)> {
        self.pairs.iter().enumerate().filter(move |(_, p)| p.channel == channel)
    }

    /// Rows `items` of item table `table`.
    pub(super) fn item_rows(&self, table: usize, items: Range<usize>) -> &'a [T] {
        let ScoringShape { width, num_items, .. } = self.shape();
        let start = table * num_items + items.start;
        &self.operands.items[start * width..(start + items.len()) * width]
    }

    pub(super) fn gates(&self, b: usize) -> &[f32] {
        let heads = self.shape().heads;
        &self.gates[b * heads..(b + 1) * heads]
    }

    /// The f32 rows `items` of table `table`, borrowed or widened into
    /// `buffer`; rows of excluded items are zeros, so that whatever they hold
    /// reaches no product.
    pub(super) fn items_f32<'s>(&self, table: usize, items: Range<usize>, buffer: &'s mut Vec<f32>) -> &'s [f32]
    where
        'a: 's,
    {
        let rows = self.item_rows(table, items.clone());
        let eligible = &self.eligible[items];
        if eligible.iter().all(|&e| e) {
            return widened_into(rows, buffer);
        }
        let width = self.shape().width;
        buffer.clear();
        buffer.extend(rows.iter().map(|x| x.to_f32()));
        for (row, _) in buffer.chunks_exact_mut(width).zip(eligible).filter(|(_, &e)| !e) {
            row.fill(0.0);
        }
        buffer
    }

    /// The item-major tile `[items, rows]` of `channel`'s logits: its
    /// pairs' products, plus the item bias; -inf at excluded items.
    pub(super) fn channel_tile(&self, channel: usize, rows: Range<usize>, items: Range<usize>, scratch: &mut Scratch) {
        let ScoringShape { batch, width, .. } = self.shape();
        let (m, n) = (rows.len(), items.len());
        let tile = &mut scratch.tile[..m * n];
        for (i, (_, pair)) in self.pairs_of(channel).enumerate() {
            let x = self.items_f32(pair.table, items.clone(), &mut scratch.items);
            let user_t = Matrix::strided(&pair.user_t[rows.start..], width, m, batch, 1);
            gemm_f32(Matrix::row_major(x, n, width), user_t, tile, i > 0);
        }
        if let Some(item_bias) = self.operands.item_bias {
            add_bias(tile, &item_bias[items.clone()], m);
        }
        // Excluded items' logits are -inf whatever their bias holds.
        for (column, _) in tile.chunks_exact_mut(m).zip(&self.eligible[items]).filter(|(_, &e)| !e) {
            column.fill(f32::NEG_INFINITY);
        }
    }

    /// Per-row log-sum-exps `[B, channels]` over the eligible items: tiles
    /// pairwise within item chunks, chunks pairwise in order. Tasks are
    /// (row block, item chunk), fixed by the shape.
    pub(super) fn row_lse(&self) -> Vec<f32> {
        self.row_lse_and_target_logits(&[]).0
    }

    /// [`Tiling::row_lse`], and the logits `[B, channels]` of each row's
    /// target (`targets` `[B]`, or empty for none) as they entered the lse:
    /// `loss = lse - s(target)` then cancels exactly (0 for a row with one
    /// eligible item) instead of leaving the rounding difference of two
    /// evaluations of s. Rows whose target is not an eligible item get 0.
    pub(super) fn row_lse_and_target_logits(&self, targets: &[u32]) -> (Vec<f32>, Vec<f32>) {
        let ScoringShape { batch, num_items, .. } = self.shape();
        let channels = self.channels();
        let chunks = item_chunks(num_items);
        let tasks: Vec<(Range<usize>, Range<usize>)> = blocks(batch, TILE_ROWS)
            .flat_map(|rows| chunks.iter().map(move |items| (rows.clone(), items.clone())))
            .collect();
        // Per task: its lse partials and the (index, logit) of the targets in its items.
        type TaskResult = (Vec<Lse>, Vec<(usize, f32)>);
        let partial: Vec<TaskResult> = tasks
            .par_iter()
            .map(|(rows, items)| {
                let mut scratch = Scratch::new();
                let mut sum = Pairwise::new();
                let mut found = Vec::new();
                for tile_items in blocks(items.len(), TILE_ITEMS) {
                    let tile_items = items.start + tile_items.start..items.start + tile_items.end;
                    let n = tile_items.len();
                    let m = rows.len();
                    let mut tile_lse = vec![Lse::EMPTY; m * channels];
                    let (mut max, mut total) = (vec![0f32; m], vec![0f32; m]);
                    for channel in 0..channels {
                        self.channel_tile(channel, rows.clone(), tile_items.clone(), &mut scratch);
                        column_stats(&scratch.tile[..m * n], &mut max, &mut total);
                        for (r, (&max, &sum)) in max.iter().zip(&total).enumerate() {
                            tile_lse[r * channels + channel] = Lse { max, sum };
                        }
                        for (r, b) in rows.clone().enumerate().filter(|&(_, b)| b < targets.len()) {
                            let target = targets[b] as usize;
                            if tile_items.contains(&target) && self.eligible[target] {
                                found.push((
                                    b * channels + channel,
                                    scratch.tile[(target - tile_items.start) * m + r],
                                ));
                            }
                        }
                    }
                    sum.push(tile_lse, merge_lse);
                }
                (sum.finish(merge_lse).expect("every chunk has items"), found)
            })
            .collect();
        let mut target_logits = vec![0f32; if targets.is_empty() { 0 } else { batch * channels }];
        for (at, logit) in partial.iter().flat_map(|(_, found)| found) {
            target_logits[*at] = *logit;
        }
        let mut lse = vec![0f32; batch * channels];
        for (rows, per_chunk) in blocks(batch, TILE_ROWS).zip(partial.chunks(chunks.len())) {
            let mut sum = Pairwise::new();
            per_chunk.iter().for_each(|(p, _)| sum.push(p.clone(), merge_lse));
            let merged = sum.finish(merge_lse).expect("every row block has chunks");
            for (out, l) in lse[rows.start * channels..rows.end * channels].iter_mut().zip(merged) {
                *out = l.value();
            }
        }
        (lse, target_logits)
    }

    /// Calls `visit(items, tiles)` for every item tile in order, `tiles`
    /// holding the channels' item-major logit tiles one after another.
    pub(super) fn sweep(&self, rows: Range<usize>, mut visit: impl FnMut(Range<usize>, &[f32])) {
        let channels = self.channels();
        let mut scratch = Scratch::new();
        let mut tiles = vec![0f32; channels * rows.len() * TILE_ITEMS];
        for items in blocks(self.shape().num_items, TILE_ITEMS) {
            let size = rows.len() * items.len();
            for channel in 0..channels {
                self.channel_tile(channel, rows.clone(), items.clone(), &mut scratch);
                tiles[channel * size..(channel + 1) * size].copy_from_slice(&scratch.tile[..size]);
            }
            visit(items, &tiles[..channels * size]);
        }
    }

    /// `out = P`, item-major, from the heads' logit tiles of rows `rows`
    /// (as [`Tiling::sweep`] gives them) and the heads' log-sum-exps
    /// `lse: [B, H]`: `P[v, r] = sum_h g[b, h] e^(s[b, h, v] - lse[b, h])`.
    pub(super) fn probability_tile(
        &self,
        rows: Range<usize>,
        items: Range<usize>,
        tiles: &[f32],
        lse: &[f32],
        out: &mut [f32],
    ) {
        let heads = self.shape().heads;
        out.fill(0.0);
        for (h, tile) in tiles.chunks_exact(out.len()).enumerate() {
            let lse: Vec<f32> = rows.clone().map(|b| lse[b * heads + h]).collect();
            let gate: Vec<f32> = rows.clone().map(|b| self.gates[b * heads + h]).collect();
            mix_probability(out, tile, &lse, &gate);
        }
        // P is 0 at excluded items by definition, not by e^(-inf - lse): a row
        // with no eligible item has lse = -inf, and -inf - -inf is NaN.
        for (column, _) in out
            .chunks_exact_mut(rows.len())
            .zip(&self.eligible[items])
            .filter(|(_, &e)| !e)
        {
            column.fill(0.0);
        }
    }
}
