//! Top-n on tiles: each row keeps its best candidates so far, and a tile's scores
//! are compared with the row's current n-th before anything else is done.

use super::super::Mixing;
use super::tiles::{blocks, Tiling, TILE_ROWS};
use super::Operands;
use crate::dtype::FloatElement;
use crate::error::{Error, Result};
use crate::ops::check_len;
use crate::ops::host::vectorised;
use rayon::prelude::*;

/// A candidate of a top-n. Its key orders candidates best first as one
/// integer compare (selection and the final sort compare candidates some
/// thousands of times per row): numbers before NaN, larger first, then the
/// lower id.
#[derive(Clone, Copy)]
struct Candidate {
    key: u64,
    value: f32,
}

impl Candidate {
    fn new(value: f32, id: u32) -> Self {
        // `value + 0.0` maps -0 to +0 (they tie, broken by id); the rest of
        // the f32 order is the order of these bits: negatives flipped
        // whole, non-negatives with the sign bit set. NaN goes to 0, below
        // -inf's 0x007f_ffff. Complemented so that the best sorts first.
        let bits = (value + 0.0).to_bits();
        let ordered = if value.is_nan() {
            0
        } else if bits >> 31 == 1 {
            !bits
        } else {
            bits | 1 << 31
        };
        Candidate {
            key: u64::from(!ordered) << 32 | u64::from(id),
            value,
        }
    }

    fn id(&self) -> u32 {
        self.key as u32
    }
}

/// Per-row history lists in CSR form: row b's items are
/// `ids[offsets[b]..offsets[b + 1]]`.
#[derive(Clone, Copy)]
pub struct HistoryRef<'a> {
    /// `[B + 1]`: row b's ids are `ids[offsets[b]..offsets[b + 1]]`.
    pub offsets: &'a [u32],
    /// The history item ids, each below V.
    pub ids: &'a [u32],
}

/// Sorted history ids of every row, after checking the CSR structure.
fn history_rows(history: Option<HistoryRef<'_>>, batch: usize, num_items: usize) -> Result<Vec<Vec<u32>>> {
    let Some(HistoryRef { offsets, ids }) = history else {
        return Ok(vec![Vec::new(); batch]);
    };
    check_len("history.offsets", offsets.len(), batch + 1)?;
    let well_formed =
        offsets[0] == 0 && offsets.windows(2).all(|w| w[0] <= w[1]) && offsets[batch] as usize == ids.len();
    if !well_formed {
        return Err(Error::invalid(
            "history.offsets",
            format!(
                "expected 0, non-decreasing, ending at {} (the number of history ids); got {:?}...",
                ids.len(),
                &offsets[..offsets.len().min(8)]
            ),
        ));
    }
    if let Some(position) = ids.iter().position(|&id| id as usize >= num_items) {
        return Err(Error::IndexOutOfRange {
            argument: "history.ids",
            position: position as u64,
            index: u64::from(ids[position]),
            bound: num_items as u64,
        });
    }
    Ok(offsets
        .windows(2)
        .map(|w| {
            let mut row = ids[w[0] as usize..w[1] as usize].to_vec();
            row.sort_unstable();
            row.dedup();
            row
        })
        .collect())
}

/// Each row's candidates (the n best so far among them), and the value a
/// new item must beat, so that most of a tile is passed over with one
/// compare. A row collects up to 2n candidates, then keeps its n best
/// (a selection, O(n)) and raises its bar to their n-th: a few compares per
/// candidate where a heap of n takes ~2 log2 n.
struct Best {
    n: usize,
    kept: Vec<Vec<Candidate>>,
    /// Per row: the n-th value at the last selection, or NaN before the first
    /// or when that n-th is NaN (every value passes `!(value <= bar)` then).
    /// An item equal to the bar comes after it in id order, so it ranks below
    /// n kept ones and is rightly passed over.
    bars: Vec<f32>,
}

impl Best {
    fn new(rows: usize, n: usize) -> Self {
        Best {
            n,
            kept: (0..rows).map(|_| Vec::with_capacity(2 * n)).collect(),
            bars: vec![f32::NAN; rows],
        }
    }

    /// Offers an item-major tile of scores for items `first..`, in id order
    /// (so an equal value never beats the n-th); `seen(r, id)` says whether
    /// the item is in row r's history. A vectorised pass first marks, per
    /// column and run of [`LANES`] rows, the rows whose value beats their
    /// n-th as it stood before the tile (one bit each); only those rows
    /// reach the scalar check against the current n-th and the candidates.
    fn offer(
        &mut self,
        tile: &[f32],
        first: usize,
        eligible: &[bool],
        masks: &mut Vec<u16>,
        seen: impl Fn(usize, u32) -> bool,
    ) {
        let rows = self.bars.len();
        let runs = rows.div_ceil(LANES);
        masks.resize(runs * tile.len() / rows, 0);
        survivors(tile, &self.bars, masks);
        for (j, (column, masks)) in tile.chunks_exact(rows).zip(masks.chunks_exact(runs)).enumerate() {
            for (run, &mask) in masks.iter().enumerate() {
                let mut mask = mask;
                while mask != 0 {
                    let r = run * LANES + mask.trailing_zeros() as usize;
                    mask &= mask - 1;
                    let value = column[r];
                    if value <= self.bars[r] {
                        continue;
                    }
                    let id = first + j;
                    if !eligible[id] || seen(r, id as u32) {
                        continue;
                    }
                    let kept = &mut self.kept[r];
                    kept.push(Candidate::new(value, id as u32));
                    if kept.len() == 2 * self.n {
                        self.bars[r] = keep_best(kept, self.n).value;
                    }
                }
            }
        }
    }
}

/// Keeps the n best of `kept` (n >= 1, at least n of them), unordered;
/// returns the n-th.
fn keep_best(kept: &mut Vec<Candidate>, n: usize) -> Candidate {
    let (_, nth, _) = kept.select_nth_unstable_by_key(n - 1, |c| c.key);
    let nth = *nth;
    kept.truncate(n);
    nth
}

/// Rows per mask of [`survivors`].
const LANES: usize = 16;

/// Bit i set where `!(values[i] <= bars[i])`: also for a NaN value or bar,
/// as in [`Best::offer`].
// `!(v <= bar)` is meant: true where either is NaN, which `v > bar` is not.
#[allow(clippy::neg_cmp_op_on_partial_ord)]
#[inline(always)]
fn beats(values: &[f32], bars: &[f32]) -> u16 {
    // Each lane's bit on its own, then an OR over the lanes: both vectorise,
    // where a running OR of shifted bits is a chain.
    let mut bits = [0u16; LANES];
    for (i, ((bit, &v), &b)) in bits.iter_mut().zip(values).zip(bars).enumerate() {
        *bit = u16::from(!(v <= b)) << i;
    }
    bits.iter().fold(0, |mask, &bit| mask | bit)
}

#[inline(always)]
fn survivors_body(tile: &[f32], bars: &[f32], masks: &mut [u16]) {
    let rows = bars.len();
    let runs = rows.div_ceil(LANES);
    for (column, masks) in tile.chunks_exact(rows).zip(masks.chunks_exact_mut(runs)) {
        for ((values, bars), mask) in column.chunks(LANES).zip(bars.chunks(LANES)).zip(masks) {
            // Whole runs with their length known, so that the compares
            // vectorise; a short last run of a short row block, as it comes.
            *mask = match (<&[f32; LANES]>::try_from(values), <&[f32; LANES]>::try_from(bars)) {
                (Ok(values), Ok(bars)) => beats(values, bars),
                _ => beats(values, bars),
            };
        }
    }
}

vectorised! {
    /// Per column of an item-major tile and run of [`LANES`] rows: the bits
    /// of the rows whose value is not at most their bar.
    fn survivors(tile: &[f32], bars: &[f32], masks: &mut [u16]) = survivors_body;
}

/// The checks of a top-n request that need no scores, after the excluded
/// ids (`eligible` from [`super::eligible_items`]): the history's structure
/// and ids, then at least n eligible items in every row. Returns each row's
/// sorted history.
pub(crate) fn topk_rows(
    eligible: &[bool],
    n: usize,
    history: Option<HistoryRef<'_>>,
    batch: usize,
) -> Result<Vec<Vec<u32>>> {
    let history = history_rows(history, batch, eligible.len())?;
    let eligible_count = eligible.iter().filter(|&&e| e).count();
    for (row, seen) in history.iter().enumerate() {
        let available = eligible_count - seen.iter().filter(|&&id| eligible[id as usize]).count();
        if available < n {
            return Err(Error::invalid(
                "n",
                format!("row {row} has {available} eligible items, fewer than n = {n}"),
            ));
        }
    }
    Ok(history)
}

/// The n best eligible items of every row by score (best first, ties to the
/// lower id, NaN below every number), skipping excluded items and the row's
/// history. `ids` and `values` are `[B, n]`.
pub fn topk<T: FloatElement>(
    operands: Operands<'_, T>,
    n: usize,
    history: Option<HistoryRef<'_>>,
    ids: &mut [u32],
    values: &mut [f32],
) -> Result<()> {
    let tiling = Tiling::new(operands)?;
    let batch = tiling.shape().batch;
    if n == 0 {
        return Err(Error::invalid("n", "expected n >= 1, got 0"));
    }
    let output_len = batch
        .checked_mul(n)
        .ok_or_else(|| Error::invalid("n", format!("B * n = {batch} * {n} overflows")))?;
    check_len("ids", ids.len(), output_len)?;
    check_len("values", values.len(), output_len)?;
    let history = topk_rows(&tiling.eligible, n, history, batch)?;
    if batch == 0 {
        return Ok(());
    }
    let lse = match operands.mixing {
        Mixing::Logits => Vec::new(),
        Mixing::Probabilities => tiling.row_lse(),
    };
    // At most B * n (checked above), never 0: TILE_ROWS * n could wrap.
    let block = TILE_ROWS.min(batch) * n;
    ids.par_chunks_mut(block)
        .zip(values.par_chunks_mut(block))
        .zip(blocks(batch, TILE_ROWS).collect::<Vec<_>>())
        .for_each(|((block_ids, block_values), rows)| {
            let m = rows.len();
            let mut best = Best::new(m, n);
            let mut mixed = Vec::new();
            let mut masks = Vec::new();
            tiling.sweep(rows.clone(), |items, tiles| {
                let scores = match operands.mixing {
                    Mixing::Logits => tiles,
                    Mixing::Probabilities => {
                        mixed.resize(m * items.len(), 0.0);
                        tiling.probability_tile(rows.clone(), items.clone(), tiles, &lse, &mut mixed);
                        &mixed
                    }
                };
                best.offer(scores, items.start, &tiling.eligible, &mut masks, |r, id| {
                    history[rows.start + r].binary_search(&id).is_ok()
                });
            });
            for ((mut kept, ids), values) in best
                .kept
                .into_iter()
                .zip(block_ids.chunks_exact_mut(n))
                .zip(block_values.chunks_exact_mut(n))
            {
                // Every row has at least n eligible items (checked above).
                keep_best(&mut kept, n);
                kept.sort_unstable_by_key(|c| c.key);
                for (j, candidate) in kept.into_iter().enumerate() {
                    ids[j] = candidate.id();
                    values[j] = candidate.value;
                }
            }
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Candidate;

    /// The keys order candidates as DESIGN ranks them: numbers before NaN
    /// (of either sign), larger first, ties (-0 and +0 among them) to the
    /// lower id.
    #[test]
    fn keys_rank_numbers_first_larger_first_ties_to_the_lower_id() {
        let values = [
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN,
            1.0,
            -1.0,
            0.0,
            -0.0,
            f32::from_bits(1),
            -f32::from_bits(1),
            f32::MIN_POSITIVE,
            2.5,
        ];
        let candidates: Vec<(f32, u32)> = values
            .iter()
            .enumerate()
            .flat_map(|(i, &v)| [(v, i as u32), (v, 100 - i as u32)])
            .collect();
        // The rank written out: NaN last, then by value (== for -0 and +0), then id.
        let rank = |a: &(f32, u32), b: &(f32, u32)| {
            a.0.is_nan()
                .cmp(&b.0.is_nan())
                .then(b.0.partial_cmp(&a.0).unwrap_or(std::cmp::Ordering::Equal))
                .then(a.1.cmp(&b.1))
        };
        for a in &candidates {
            for b in &candidates {
                let (ka, kb) = (Candidate::new(a.0, a.1), Candidate::new(b.0, b.1));
                assert_eq!(ka.key.cmp(&kb.key), rank(a, b), "{a:?} against {b:?}");
                assert_eq!((ka.id(), ka.value.to_bits()), (a.1, a.0.to_bits()));
            }
        }
    }
}
