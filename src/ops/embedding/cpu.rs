//! The lookup on the host, on borrowed slices (rayon across tokens / rows).

use super::{check_rates, row_error, TableShape};
use crate::dtype::FloatElement;
use crate::error::{Error, Result};
use crate::grouping::cpu::group_by_key;
use crate::ops::check_len;
use crate::tensor::host_uninit;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Unique rows per task of the backward: enough to amortise a task, few
/// enough to spread a batch over the cores.
const ROWS_PER_TASK: usize = 256;

/// Tokens per task of the forward: enough for the prefetch to run ahead.
const TOKENS_PER_TASK: usize = 512;

/// How many tokens (rows) ahead the forward prefetches table rows, the
/// backward gradient rows and the updates table rows.
const PREFETCH_TOKENS: usize = 8;

/// Hints that `row` will be read soon (every cache line of it).
#[inline]
fn prefetch<T>(row: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        let bytes = std::mem::size_of_val(row);
        let base = row.as_ptr() as *const i8;
        for offset in (0..bytes).step_by(64) {
            // SAFETY: a prefetch hint at an address inside `row`; it reads
            // nothing architecturally and cannot fault.
            unsafe { std::arch::x86_64::_mm_prefetch(base.add(offset), std::arch::x86_64::_MM_HINT_T0) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = row;
}

/// The lowest position whose id is neither the padding nor below `num_rows`.
fn first_bad_id(ids: &[u32], padding: Option<u32>, num_rows: usize) -> Option<usize> {
    ids.iter()
        .position(|&id| Some(id) != padding && id as usize >= num_rows)
}

fn out_of_range(ids: &[u32], position: usize, num_rows: usize) -> Error {
    Error::IndexOutOfRange {
        argument: "ids",
        position: position as u64,
        index: u64::from(ids[position]),
        bound: num_rows as u64,
    }
}

/// `out[t, h, :] = table[h, ids[t], :]`, zeros for the padding id.
/// `table` is `[H, V, D]`, `out` is `[T, H, D]`.
pub fn forward<T: FloatElement>(
    table: &[T],
    ids: &[u32],
    padding: Option<u32>,
    shape: TableShape,
    out: &mut [T],
) -> Result<()> {
    // SAFETY: MaybeUninit<T> has T's layout, and gather writes only
    // initialised values of T, so `out` stays valid throughout.
    let out = unsafe { &mut *(out as *mut [T] as *mut [MaybeUninit<T>]) };
    gather(table, ids, padding, shape, out)
}

/// [`forward`] into uninitialised memory (a fresh output: a zero fill first
/// would be a second pass over it); every element is written on `Ok`.
pub(crate) fn gather<T: FloatElement>(
    table: &[T],
    ids: &[u32],
    padding: Option<u32>,
    shape: TableShape,
    out: &mut [MaybeUninit<T>],
) -> Result<()> {
    let TableShape { heads, num_rows, width } = shape;
    check_len("table", table.len(), shape.table_len())?;
    check_len("out", out.len(), ids.len() * heads * width)?;
    if let Some(position) = first_bad_id(ids, padding, num_rows) {
        return Err(out_of_range(ids, position, num_rows));
    }
    let row_of = |h: usize, id: u32| &table[(h * num_rows + id as usize) * width..][..width];
    out.par_chunks_mut(TOKENS_PER_TASK * heads * width)
        .zip(ids.par_chunks(TOKENS_PER_TASK))
        .for_each(|(block, block_ids)| {
            for (t, (token_rows, &id)) in block.chunks_mut(heads * width).zip(block_ids).enumerate() {
                // Rows are scattered over the tables (a cache and TLB miss
                // each): ask for a later token's while this one's are copied.
                if let Some(&ahead) = block_ids.get(t + PREFETCH_TOKENS) {
                    if Some(ahead) != padding {
                        (0..heads).for_each(|h| prefetch(row_of(h, ahead)));
                    }
                }
                for (h, row) in token_rows.chunks_mut(width).enumerate() {
                    if Some(id) == padding {
                        row.fill(MaybeUninit::new(T::default()));
                    } else {
                        let source = row_of(h, id);
                        // SAFETY: `row` and `source` are `width` elements
                        // each (MaybeUninit<T> has T's layout), `row` lies in
                        // the output and `source` in the table, which do
                        // not overlap. A memcpy: the widest stores the
                        // processor has, where the loop would be SSE only.
                        unsafe { std::ptr::copy_nonoverlapping(source.as_ptr(), row.as_mut_ptr().cast::<T>(), width) };
                    }
                }
            }
        });
    Ok(())
}

/// The sparse gradient of the table: (sorted unique ids without the padding
/// `[U]`, values `[H, U, D]`), each row summed over its tokens in ascending
/// position, in f32. `dy` is `[T, H, D]`.
pub fn backward(dy: &[f32], ids: &[u32], padding: Option<u32>, shape: TableShape) -> Result<(Vec<u32>, Vec<f32>)> {
    let TableShape { heads, num_rows, width } = shape;
    check_len("dy", dy.len(), ids.len() * heads * width)?;
    if let Some(position) = first_bad_id(ids, padding, num_rows) {
        return Err(out_of_range(ids, position, num_rows));
    }
    // The padding maps to the sentinel key num_rows, which forms no group.
    let sentinel = num_rows as u32;
    let keys: Vec<u32> = ids
        .iter()
        .map(|&id| if Some(id) == padding { sentinel } else { id })
        .collect();
    let groups = group_by_key(&keys, num_rows as u64 + 1, Some(sentinel));
    let unique = groups.keys.len();
    let len = heads * unique * width;
    // Written once per element from a row accumulator, never zeroed first: a
    // zeroed buffer of this size costs a read fault and a copy-on-write
    // fault per page, which dominated the backward.
    let mut values: Vec<f32> = host_uninit("dy", len)?;
    // Blocks of unique rows in parallel, each with its rows of every head:
    // a token's gradient `[H, D]` is read once, in one piece.
    let mut blocks: Vec<Vec<&mut [MaybeUninit<f32>]>> =
        (0..unique.div_ceil(ROWS_PER_TASK)).map(|_| Vec::new()).collect();
    for head in values.spare_capacity_mut()[..len].chunks_mut((unique * width).max(1)) {
        for (block, rows) in blocks.iter_mut().zip(head.chunks_mut(ROWS_PER_TASK * width)) {
            block.push(rows);
        }
    }
    blocks.into_par_iter().enumerate().for_each(|(block, mut heads_rows)| {
        let first = block * ROWS_PER_TASK;
        let last = unique.min(first + ROWS_PER_TASK);
        let token_of = |t: u32| &dy[t as usize * heads * width..][..heads * width];
        // The block's tokens in the order they are summed: scattered over
        // dy, so a later one's gradient is prefetched while one is added.
        let order = &groups.order[groups.starts[first] as usize..groups.starts[last] as usize];
        let offset = groups.starts[first] as usize;
        let mut sum = vec![0f32; heads * width];
        for (i, u) in (first..last).enumerate() {
            sum.fill(0.0);
            for j in groups.starts[u] as usize - offset..groups.starts[u + 1] as usize - offset {
                if let Some(&ahead) = order.get(j + PREFETCH_TOKENS) {
                    prefetch(token_of(ahead));
                }
                sum.iter_mut().zip(token_of(order[j])).for_each(|(acc, &g)| *acc += g);
            }
            for (rows, sum) in heads_rows.iter_mut().zip(sum.chunks_exact(width)) {
                for (out, &v) in rows[i * width..(i + 1) * width].iter_mut().zip(sum) {
                    out.write(v);
                }
            }
        }
    });
    // SAFETY: the blocks cover rows 0..unique of every head, each element of
    // the first `len` written exactly once above.
    unsafe { values.set_len(len) };
    Ok((groups.keys, values))
}

/// Rows must be strictly ascending and below `num_rows`.
fn check_rows(rows: &[u32], num_rows: usize) -> Result<()> {
    match rows
        .iter()
        .enumerate()
        .position(|(u, &row)| row as usize >= num_rows || (u > 0 && row <= rows[u - 1]))
    {
        Some(position) => Err(row_error(position, rows[position], num_rows)),
        None => Ok(()),
    }
}

fn check_sparse(rows: &[u32], values: &[f32], shape: TableShape) -> Result<()> {
    check_len("values", values.len(), shape.heads * rows.len() * shape.width)?;
    check_rows(rows, shape.num_rows)
}

/// Calls `update(h, u, table row, values[h, u, :])` for every head and sparse row.
/// Rows must have passed [`check_rows`]. The table is cut into disjoint
/// pieces, one per head and block of `ROWS_PER_TASK` rows (from the block's
/// first row to the next block's), updated in parallel: a single table
/// (H = 1) spreads over the cores too.
fn for_each_row<T: Send>(
    table: &mut [T],
    rows: &[u32],
    values: &[f32],
    shape: TableShape,
    update: impl Fn(usize, usize, &mut [T], &[f32]) + Sync,
) {
    let TableShape { num_rows, width, .. } = shape;
    let unique = rows.len();
    let block_start = |first: usize| rows.get(first).map_or(num_rows, |&row| row as usize);
    let mut pieces = Vec::new();
    for (h, head_table) in table.chunks_mut(num_rows * width).enumerate() {
        let (mut rest, mut rest_start) = (head_table, 0);
        for first in (0..unique).step_by(ROWS_PER_TASK) {
            let (start, end) = (block_start(first), block_start(first + ROWS_PER_TASK));
            let (_, tail) = std::mem::take(&mut rest).split_at_mut((start - rest_start) * width);
            let (piece, tail) = tail.split_at_mut((end - start) * width);
            (rest, rest_start) = (tail, end);
            pieces.push((h, first, piece));
        }
    }
    pieces.into_par_iter().for_each(|(h, first, piece)| {
        let block = &rows[first..unique.min(first + ROWS_PER_TASK)];
        let start = block[0] as usize;
        let row_in = |row: u32| (row as usize - start) * width..(row as usize - start + 1) * width;
        for (i, &row) in block.iter().enumerate() {
            // Rows are scattered over the table: fetch a later one early.
            if let Some(&ahead) = block.get(i + PREFETCH_TOKENS) {
                prefetch(&piece[row_in(ahead)]);
            }
            let u = first + i;
            update(
                h,
                u,
                &mut piece[row_in(row)],
                &values[(h * unique + u) * width..][..width],
            );
        }
    });
}

/// `dense[h, rows[u], :] = values[h, u, :]`, zeros elsewhere; `dense` is
/// `[H, V, D]`.
pub fn densify(rows: &[u32], values: &[f32], shape: TableShape, dense: &mut [f32]) -> Result<()> {
    check_len("dense", dense.len(), shape.table_len())?;
    check_sparse(rows, values, shape)?;
    dense.fill(0.0);
    for_each_row(dense, rows, values, shape, |_, _, target, g| target.copy_from_slice(g));
    Ok(())
}

/// `table[h, rows[u], :] -= lr * values[h, u, :]`, rounded to nearest even.
pub fn sgd<T: FloatElement>(table: &mut [T], rows: &[u32], values: &[f32], shape: TableShape, lr: f32) -> Result<()> {
    check_len("table", table.len(), shape.table_len())?;
    check_rates(lr, None)?;
    check_sparse(rows, values, shape)?;
    for_each_row(table, rows, values, shape, |_, _, target, g| {
        for (w, &g) in target.iter_mut().zip(g) {
            *w = T::from_f32(w.to_f32() - lr * g);
        }
    });
    Ok(())
}

/// Row-wise Adagrad: `state[h, n] += mean_d g^2`, then
/// `table[h, n, :] -= lr * g / (sqrt(state[h, n]) + eps)`.
pub fn adagrad<T: FloatElement>(
    table: &mut [T],
    state: &mut [f32],
    rows: &[u32],
    values: &[f32],
    shape: TableShape,
    lr: f32,
    eps: f32,
) -> Result<()> {
    check_len("table", table.len(), shape.table_len())?;
    check_len("state", state.len(), shape.heads * shape.num_rows)?;
    check_rates(lr, Some(eps))?;
    check_sparse(rows, values, shape)?;
    let TableShape { num_rows, width, .. } = shape;
    let unique = rows.len();
    // First each (head, row)'s accumulated state and step size, heads in
    // parallel; then the table rows.
    let mut steps = vec![0f32; shape.heads * unique];
    steps
        .par_chunks_mut(unique.max(1))
        .zip(state.par_chunks_mut(num_rows))
        .enumerate()
        .for_each(|(h, (head_steps, head_state))| {
            for (u, (step, &row)) in head_steps.iter_mut().zip(rows).enumerate() {
                let g = &values[(h * unique + u) * width..][..width];
                let cell = &mut head_state[row as usize];
                *cell += g.iter().map(|x| x * x).sum::<f32>() / width as f32;
                *step = lr / (cell.sqrt() + eps);
            }
        });
    for_each_row(table, rows, values, shape, |h, u, target, g| {
        let step = steps[h * unique + u];
        for (w, &g) in target.iter_mut().zip(g) {
            *w = T::from_f32(w.to_f32() - step * g);
        }
    });
    Ok(())
}
