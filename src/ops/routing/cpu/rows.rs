//! The per-row score functions of a block of routing rows, in one pass the
//! CPU vectorises: each row's max, its exponentials relative to the max
//! (computed once, for the softmax, the shares and the z-loss alike), the
//! scores and the shares `q = p / sum of p`; and the ratios over a row's
//! selected experts (`Renormaliser`).
//!
//! Rows come in as f32 with the inactive experts set to -inf, so every loop
//! runs over the whole row: an inactive expert gets e^-inf = 0, score 0 and
//! share 0 without a branch. Sums run over a fixed number of lanes, so their
//! order, and so their bits, do not depend on the SIMD width the loops
//! compile to, nor on the thread count.

use super::super::Score;
use crate::ops::host::{exp_or_zero, vectorised};

/// Accumulators of a row sum; the partition of every sum over a row.
const LANES: usize = 8;

/// The logistic function, overflow-free (sigmoid(-inf) = 0) and branch-free:
/// `1 / (1 + e^-z)` for z >= 0, `e^z / (1 + e^z)` below.
#[inline(always)]
fn sigmoid(z: f32) -> f32 {
    let e = exp_or_zero(-z.abs());
    if z >= 0.0 {
        1.0 / (1.0 + e)
    } else {
        e / (1.0 + e)
    }
}

/// The sum of `values` over [`LANES`] accumulators, then the lanes in order.
#[inline(always)]
pub(super) fn lane_sum(values: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        lanes.iter_mut().zip(chunk).for_each(|(lane, &v)| *lane += v);
    }
    lanes.iter_mut().zip(tail).for_each(|(lane, &v)| *lane += v);
    lanes.iter().sum()
}

/// `sum_i a_i b_i` over [`LANES`] accumulators, then the lanes in order.
#[inline(always)]
pub(super) fn lane_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (a_tail, b_tail) = (a_chunks.remainder(), b_chunks.remainder());
    for (a, b) in a_chunks.zip(b_chunks) {
        for ((lane, &x), &y) in lanes.iter_mut().zip(a).zip(b) {
            *lane += x * y;
        }
    }
    for ((lane, &x), &y) in lanes.iter_mut().zip(a_tail).zip(b_tail) {
        *lane += x * y;
    }
    lanes.iter().sum()
}

/// The largest logit of a set, over whose score the set's scores are taken
/// (`relative`) before any ratio of them, so the ratios are exact where the
/// scores underflow f32 (sigmoids of logits below about -87), at one
/// exponential per score (as `Anchor` in kernels/routing.cu).
#[derive(Clone, Copy)]
pub(super) struct Anchor {
    value: f32,
    score: Score,
    /// For sigmoid: `sigmoid(value)` when `value >= 0`, else `e^value`.
    constant: f32,
}

impl Anchor {
    fn new(score: Score, value: f32) -> Anchor {
        let constant = match score {
            Score::Softmax => 0.0,
            Score::Sigmoid if value >= 0.0 => sigmoid(value),
            Score::Sigmoid => exp_or_zero(value),
        };
        Anchor { value, score, constant }
    }

    /// The unnormalised score of `z <= value` over the anchor's, 1 at the
    /// anchor: `e^(z - value)`, or `sigmoid(z) / sigmoid(value)`, which below
    /// 0 is `u (1 + e^value) / (1 + u e^value)` with `u = e^(z - value)`.
    fn relative(&self, z: f32) -> f32 {
        match self.score {
            Score::Softmax => exp_or_zero(z - self.value),
            Score::Sigmoid if self.value >= 0.0 => sigmoid(z) / self.constant,
            Score::Sigmoid => {
                let u = exp_or_zero(z - self.value);
                u * (1.0 + self.constant) / (1.0 + u * self.constant)
            }
        }
    }
}

/// Renormalisation over a row's selected experts: each score over the sum of
/// the selected scores, both relative to the largest selected logit, so the
/// sum is at least 1 (a valid row's best key has a finite logit).
pub(super) struct Renormaliser {
    anchor: Anchor,
    sum: f32,
}

impl Renormaliser {
    pub(super) fn new(score: Score, selected: impl Iterator<Item = f32> + Clone) -> Renormaliser {
        let anchor = Anchor::new(score, selected.clone().fold(f32::NEG_INFINITY, f32::max));
        let sum = selected.map(|z| anchor.relative(z)).sum();
        Renormaliser { anchor, sum }
    }

    pub(super) fn weight(&self, z: f32) -> f32 {
        self.anchor.relative(z) / self.sum
    }
}

/// The row's max, and whether it holds a NaN or +inf.
#[inline(always)]
fn max_and_bad(row: &[f32]) -> (f32, bool) {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut bad = [false; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    let mut step = |chunk: &[f32]| {
        for ((lane, flag), &z) in lanes.iter_mut().zip(&mut bad).zip(chunk) {
            *lane = if z > *lane { z } else { *lane };
            *flag |= z.is_nan() | (z == f32::INFINITY);
        }
    };
    chunks.for_each(&mut step);
    step(tail);
    let max = lanes.iter().fold(f32::NEG_INFINITY, |m, &z| if z > m { z } else { m });
    (max, bad.iter().any(|&b| b))
}

/// A row's statistics over its active logits.
#[derive(Clone, Copy, Default)]
pub(super) struct RowSums {
    /// The row's max.
    pub(super) max: f32,
    /// The sum of e^(z - max).
    pub(super) sum_exp: f32,
    /// A NaN or +inf logit, or no finite one: the row is non-finite and its
    /// other fields are meaningless.
    pub(super) bad: bool,
}

impl RowSums {
    pub(super) fn lse(&self) -> f32 {
        self.max + self.sum_exp.ln()
    }
}

/// The score functions of a block of rows of width `n`, all `[rows, n]`.
pub(super) struct Block {
    /// The logits (inactive experts -inf), filled by the caller.
    pub(super) z: Vec<f32>,
    /// e^(z - row max).
    pub(super) exps: Vec<f32>,
    /// Sigmoid scores (unused for softmax, whose scores are the shares).
    pub(super) sigmoids: Vec<f32>,
    /// q = p / (sum of p), each p relative to the row max's score first, so
    /// the ratio is exact where the scores underflow.
    pub(super) shares: Vec<f32>,
    pub(super) rows: Vec<RowSums>,
}

/// Cells (rows x experts) of a block: 64 KiB per array, so a block's
/// arrays stay in L2 whatever E.
const BLOCK_CELLS: usize = 16 * 1024;

impl Block {
    /// Room for as many rows of width `n` as fit [`BLOCK_CELLS`] (at least
    /// one, at most a chunk).
    pub(super) fn new(n: usize) -> Block {
        let rows = (BLOCK_CELLS / n).clamp(1, super::CHUNK_ROWS);
        Block {
            z: vec![0.0; rows * n],
            exps: vec![0.0; rows * n],
            sigmoids: vec![0.0; rows * n],
            shares: vec![0.0; rows * n],
            rows: vec![RowSums::default(); rows],
        }
    }

    /// `rows` rows cut into spans `(start, end)` of at most the block's rows.
    pub(super) fn spans(&self, rows: usize) -> impl Iterator<Item = (usize, usize)> {
        let step = self.rows.len();
        (0..rows)
            .step_by(step)
            .map(move |start| (start, rows.min(start + step)))
    }

    /// Computes everything from `z` for the first `rows` rows.
    pub(super) fn compute(&mut self, rows: usize, n: usize, sigmoid: bool) {
        let len = rows * n;
        block_scores(
            &self.z[..len],
            n,
            sigmoid,
            &mut self.exps[..len],
            &mut self.sigmoids[..len],
            &mut self.shares[..len],
            &mut self.rows[..rows],
        );
    }
}

vectorised! {
    fn block_scores(
        z: &[f32],
        n: usize,
        sigmoid: bool,
        exps: &mut [f32],
        sigmoids: &mut [f32],
        shares: &mut [f32],
        rows: &mut [RowSums],
    ) = block_scores_body;
}

#[inline(always)]
fn block_scores_body(
    z: &[f32],
    n: usize,
    use_sigmoid: bool,
    exps: &mut [f32],
    sigmoids: &mut [f32],
    shares: &mut [f32],
    rows: &mut [RowSums],
) {
    let blocks = z
        .chunks_exact(n)
        .zip(exps.chunks_exact_mut(n))
        .zip(sigmoids.chunks_exact_mut(n))
        .zip(shares.chunks_exact_mut(n));
    for ((((z, exps), sigmoids), shares), sums) in blocks.zip(rows) {
        let (max, bad) = max_and_bad(z);
        if bad || max == f32::NEG_INFINITY {
            sums.bad = true;
            continue;
        }
        exps.iter_mut().zip(z).for_each(|(e, &z)| *e = exp_or_zero(z - max));
        let sum_exp = lane_sum(exps);
        *sums = RowSums {
            max,
            sum_exp,
            bad: false,
        };
        // Relative to the max's score: 1 there, so the sum is at least 1.
        if !use_sigmoid {
            shares.iter_mut().zip(&*exps).for_each(|(q, &e)| *q = e / sum_exp);
            continue;
        }
        sigmoids.iter_mut().zip(z).for_each(|(s, &z)| *s = sigmoid(z));
        if max >= 0.0 {
            let anchor = sigmoid(max);
            shares.iter_mut().zip(&*sigmoids).for_each(|(q, &s)| *q = s / anchor);
        } else {
            // sigmoid(z) / sigmoid(max) = u (1 + e^max) / (1 + u e^max), u = e^(z - max).
            let c = exp_or_zero(max);
            shares
                .iter_mut()
                .zip(&*exps)
                .for_each(|(q, &u)| *q = u * (1.0 + c) / (1.0 + u * c));
        }
        let relative_sum = lane_sum(shares);
        shares.iter_mut().for_each(|q| *q /= relative_sum);
    }
}
