//! Scoring on the host: rows in parallel for the forward passes and dU/dG,
//! items in parallel for dX and ditem_bias. Scores are recomputed tile by
//! tile (one item at a time) and never stored as `[B, V]`.

use super::{Mixing, ScoringShape};
use crate::dtype::FloatElement;
use crate::error::{Error, Result};
use crate::ops::check_len;
use rayon::prelude::*;
use std::cmp::Ordering;
use std::collections::BinaryHeap;

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

/// Online log-sum-exp: the running maximum and the sum of exponentials
/// relative to it. -inf terms are skipped; NaN propagates.
#[derive(Clone, Copy)]
struct LogSumExp {
    max: f32,
    sum: f32,
}

impl LogSumExp {
    const EMPTY: LogSumExp = LogSumExp {
        max: f32::NEG_INFINITY,
        sum: 0.0,
    };

    fn push(&mut self, x: f32) {
        if x == f32::NEG_INFINITY {
            return;
        }
        if x > self.max {
            self.sum = self.sum * (self.max - x).exp() + 1.0;
            self.max = x;
        } else {
            self.sum += (x - self.max).exp();
        }
    }

    fn value(self) -> f32 {
        if self.max == f32::NEG_INFINITY {
            f32::NEG_INFINITY
        } else {
            self.max + self.sum.ln()
        }
    }
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

/// Validated operands with the per-row constants every pass needs.
struct Prepared<'a, T> {
    operands: Operands<'a, T>,
    user: Vec<f32>,
    gates: Vec<f32>,
    log_gates: Vec<f32>,
    eligible: Vec<bool>,
}

impl<'a, T: FloatElement> Prepared<'a, T> {
    fn new(operands: Operands<'a, T>) -> Result<Self> {
        let ScoringShape { heads, num_items, .. } = operands.shape;
        operands.shape.check_buffers(
            operands.user.len(),
            operands.gate_logits.len(),
            operands.items.len(),
            operands.item_bias.map(<[f32]>::len),
        )?;
        let eligible = eligible_items(operands.excluded, num_items)?;
        let user = operands.user.iter().map(|x| x.to_f32()).collect();
        let mut log_gates: Vec<f32> = operands.gate_logits.iter().map(|x| x.to_f32()).collect();
        for row in log_gates.chunks_mut(heads) {
            let mut lse = LogSumExp::EMPTY;
            row.iter().for_each(|&x| lse.push(x));
            let lse = lse.value();
            row.iter_mut().for_each(|x| *x -= lse);
        }
        let gates = log_gates.iter().map(|x| x.exp()).collect();
        Ok(Prepared {
            operands,
            user,
            gates,
            log_gates,
            eligible,
        })
    }

    fn shape(&self) -> ScoringShape {
        self.operands.shape
    }

    /// The item row of head h.
    fn item_row(&self, h: usize, v: usize) -> &[T] {
        let ScoringShape {
            width,
            num_items,
            shared,
            ..
        } = self.shape();
        let row = if shared { v } else { h * num_items + v };
        &self.operands.items[row * width..(row + 1) * width]
    }

    fn user_row(&self, b: usize, h: usize) -> &[f32] {
        let width = self.shape().width;
        let start = (b * self.shape().heads + h) * width;
        &self.user[start..start + width]
    }

    fn gates(&self, b: usize) -> &[f32] {
        let heads = self.shape().heads;
        &self.gates[b * heads..(b + 1) * heads]
    }

    /// `s[h] = scale * <U[b, h], X[h, v]> + item_bias[v]` for every head.
    fn head_logits(&self, b: usize, v: usize, s: &mut [f32]) {
        let bias = self.operands.item_bias.map_or(0.0, |bias| bias[v]);
        for (h, s_h) in s.iter_mut().enumerate() {
            let dot: f32 = self
                .user_row(b, h)
                .iter()
                .zip(self.item_row(h, v))
                .map(|(u, x)| u * x.to_f32())
                .sum();
            *s_h = self.operands.scale * dot + bias;
        }
    }

    /// `S = sum_h g[b, h] s[h]`.
    fn mixed(&self, b: usize, s: &[f32]) -> f32 {
        self.gates(b).iter().zip(s).map(|(g, s)| g * s).sum()
    }

    /// Per-head log-sum-exps of row b over the eligible items.
    fn head_lse(&self, b: usize) -> Vec<f32> {
        let heads = self.shape().heads;
        let mut lse = vec![LogSumExp::EMPTY; heads];
        let mut s = vec![0f32; heads];
        for v in (0..self.shape().num_items).filter(|&v| self.eligible[v]) {
            self.head_logits(b, v, &mut s);
            lse.iter_mut().zip(&s).for_each(|(l, &x)| l.push(x));
        }
        lse.into_iter().map(LogSumExp::value).collect()
    }

    /// The log-sum-exp of the mixed logits of row b over the eligible items.
    fn mixed_lse(&self, b: usize) -> f32 {
        let mut lse = LogSumExp::EMPTY;
        let mut s = vec![0f32; self.shape().heads];
        for v in (0..self.shape().num_items).filter(|&v| self.eligible[v]) {
            self.head_logits(b, v, &mut s);
            lse.push(self.mixed(b, &s));
        }
        lse.value()
    }

    /// The row's log-sum-exps the cross-entropy keeps: `[1]` for Logits
    /// mixing, `[H]` for Probabilities.
    fn row_lse(&self, b: usize) -> Vec<f32> {
        match self.operands.mixing {
            Mixing::Logits => vec![self.mixed_lse(b)],
            Mixing::Probabilities => self.head_lse(b),
        }
    }

    /// What [`Prepared::score`] needs beyond the head logits: nothing for
    /// Logits mixing, the per-head log-sum-exps for Probabilities.
    fn score_lse(&self, b: usize) -> Vec<f32> {
        match self.operands.mixing {
            Mixing::Logits => Vec::new(),
            Mixing::Probabilities => self.head_lse(b),
        }
    }

    /// The score `topk` ranks by and `scores` returns: S (Logits), or
    /// `P = sum_h g_h exp(s_h - lse_h)` (Probabilities, with `lse` from
    /// [`Prepared::score_lse`]).
    fn score(&self, b: usize, s: &[f32], lse: &[f32]) -> f32 {
        match self.operands.mixing {
            Mixing::Logits => self.mixed(b, s),
            Mixing::Probabilities => self
                .gates(b)
                .iter()
                .zip(s.iter().zip(lse))
                .map(|(g, (s, l))| g * (s - l).exp())
                .sum(),
        }
    }

    fn excluded_score(&self) -> f32 {
        match self.operands.mixing {
            Mixing::Logits => f32::NEG_INFINITY,
            Mixing::Probabilities => 0.0,
        }
    }
}

/// The materialised scores `[B, V]`: S for Logits mixing (-inf at excluded
/// items), P for Probabilities mixing (0 there).
pub fn scores<T: FloatElement>(operands: Operands<'_, T>, out: &mut [f32]) -> Result<()> {
    let prepared = Prepared::new(operands)?;
    let ScoringShape { heads, num_items, .. } = prepared.shape();
    check_len("scores", out.len(), prepared.shape().batch * num_items)?;
    out.par_chunks_mut(num_items).enumerate().for_each(|(b, row)| {
        let lse = prepared.score_lse(b);
        let mut s = vec![0f32; heads];
        for (v, score) in row.iter_mut().enumerate() {
            *score = if prepared.eligible[v] {
                prepared.head_logits(b, v, &mut s);
                prepared.score(b, &s, &lse)
            } else {
                prepared.excluded_score()
            };
        }
    });
    Ok(())
}

/// Which gradient flows into the per-head logits s[b, h, v].
enum Upstream<'a> {
    /// From dS `[B, V]` of [`scores`].
    Scores(&'a [f32]),
    /// From dloss `[B]` of the cross-entropy with these targets (u32::MAX for
    /// ignored rows) and forward log-sum-exps.
    CrossEntropy {
        dloss: &'a [f32],
        targets: Vec<u32>,
        lse: &'a [f32],
    },
}

/// Per-row constants of the backward, computed once per row: `lse` is the
/// row's log-sum-exps, `coef` per head: for Probabilities mixing of scores
/// `<q_h, dS>`, for Probabilities cross-entropy `dloss * r_h` (the
/// responsibilities), unused otherwise.
struct RowGrad {
    active: bool,
    weight: f32,
    target: u32,
    lse: Vec<f32>,
    coef: Vec<f32>,
}

struct Backward<'a, T> {
    prepared: Prepared<'a, T>,
    upstream: Upstream<'a>,
    rows: Vec<RowGrad>,
}

impl<'a, T: FloatElement> Backward<'a, T> {
    fn new(prepared: Prepared<'a, T>, upstream: Upstream<'a>) -> Self {
        let heads = prepared.shape().heads;
        let rows = (0..prepared.shape().batch)
            .into_par_iter()
            .map(|b| {
                let mut row = RowGrad {
                    active: true,
                    weight: 1.0,
                    target: u32::MAX,
                    lse: Vec::new(),
                    coef: vec![0.0; heads],
                };
                match (&upstream, prepared.operands.mixing) {
                    (Upstream::Scores(_), Mixing::Logits) => {}
                    (Upstream::Scores(dscores), Mixing::Probabilities) => {
                        row.lse = prepared.head_lse(b);
                        row.coef = Self::probability_dot(&prepared, b, &row.lse, dscores);
                    }
                    (Upstream::CrossEntropy { dloss, targets, lse }, mixing) => {
                        row.target = targets[b];
                        row.active = row.target != u32::MAX;
                        row.weight = dloss[b];
                        let per_row = match mixing {
                            Mixing::Logits => 1,
                            Mixing::Probabilities => heads,
                        };
                        row.lse = lse[b * per_row..(b + 1) * per_row].to_vec();
                        if row.active && mixing == Mixing::Probabilities {
                            row.coef = Self::responsibilities(&prepared, b, row.target, &row.lse)
                                .into_iter()
                                .map(|r| row.weight * r)
                                .collect();
                        }
                    }
                }
                row
            })
            .collect();
        Backward {
            prepared,
            upstream,
            rows,
        }
    }

    /// `<q_h, dS[b]>` with `q_h = softmax_v s[b, h, .]` over eligible items.
    fn probability_dot(prepared: &Prepared<'_, T>, b: usize, lse: &[f32], dscores: &[f32]) -> Vec<f32> {
        let ScoringShape { heads, num_items, .. } = prepared.shape();
        let mut dot = vec![0f32; heads];
        let mut s = vec![0f32; heads];
        for v in (0..num_items).filter(|&v| prepared.eligible[v]) {
            prepared.head_logits(b, v, &mut s);
            let ds = dscores[b * num_items + v];
            for h in 0..heads {
                dot[h] += (s[h] - lse[h]).exp() * ds;
            }
        }
        dot
    }

    /// `r_h = g_h q_h(y) / P(y)`, in log space so that a P that underflows
    /// still gives finite responsibilities.
    fn responsibilities(prepared: &Prepared<'_, T>, b: usize, target: u32, lse: &[f32]) -> Vec<f32> {
        let heads = prepared.shape().heads;
        let mut s = vec![0f32; heads];
        prepared.head_logits(b, target as usize, &mut s);
        let log_gates = &prepared.log_gates[b * heads..(b + 1) * heads];
        let log_joint: Vec<f32> = (0..heads).map(|h| log_gates[h] + s[h] - lse[h]).collect();
        let mut log_p = LogSumExp::EMPTY;
        log_joint.iter().for_each(|&x| log_p.push(x));
        let log_p = log_p.value();
        log_joint.iter().map(|x| (x - log_p).exp()).collect()
    }

    /// ds[h] = dL/ds[b, h, v] from the head logits `s`, and the gradient of the
    /// mixed logit dL/dS[b, v] (Logits mixing; 0 otherwise).
    fn head_grads(&self, b: usize, v: usize, s: &[f32], ds: &mut [f32]) -> f32 {
        let row = &self.rows[b];
        let gates = self.prepared.gates(b);
        let is_target = row.target as usize == v;
        match (&self.upstream, self.prepared.operands.mixing) {
            (Upstream::Scores(dscores), Mixing::Logits) => {
                let d_mixed = dscores[b * self.prepared.shape().num_items + v];
                ds.iter_mut().zip(gates).for_each(|(d, g)| *d = g * d_mixed);
                d_mixed
            }
            (Upstream::Scores(dscores), Mixing::Probabilities) => {
                let d_score = dscores[b * self.prepared.shape().num_items + v];
                for h in 0..ds.len() {
                    let q = (s[h] - row.lse[h]).exp();
                    ds[h] = gates[h] * q * (d_score - row.coef[h]);
                }
                0.0
            }
            (Upstream::CrossEntropy { .. }, Mixing::Logits) => {
                let p = (self.prepared.mixed(b, s) - row.lse[0]).exp();
                let d_mixed = row.weight * (p - if is_target { 1.0 } else { 0.0 });
                ds.iter_mut().zip(gates).for_each(|(d, g)| *d = g * d_mixed);
                d_mixed
            }
            (Upstream::CrossEntropy { .. }, Mixing::Probabilities) => {
                for h in 0..ds.len() {
                    let q = (s[h] - row.lse[h]).exp();
                    ds[h] = row.coef[h] * (q - if is_target { 1.0 } else { 0.0 });
                }
                0.0
            }
        }
    }

    /// dL/dG of row b from dL/dg (`dg`) through the gate softmax, or directly
    /// for Probabilities cross-entropy (`dloss * (g - r)`).
    fn gate_grad(&self, b: usize, dg: &[f32], out: &mut [f32]) {
        let row = &self.rows[b];
        let gates = self.prepared.gates(b);
        match (&self.upstream, self.prepared.operands.mixing) {
            (Upstream::CrossEntropy { .. }, Mixing::Probabilities) => {
                for h in 0..out.len() {
                    out[h] = row.weight * gates[h] - row.coef[h];
                }
            }
            _ => {
                let mean: f32 = gates.iter().zip(dg).map(|(g, d)| g * d).sum();
                for h in 0..out.len() {
                    out[h] = gates[h] * (dg[h] - mean);
                }
            }
        }
    }

    fn run(&self, grads: GradientsMut<'_>) {
        let ScoringShape {
            heads,
            width,
            num_items,
            shared,
            ..
        } = self.prepared.shape();
        let scale = self.prepared.operands.scale;
        let prepared = &self.prepared;

        // dU and dG: rows in parallel, items in order.
        grads
            .user
            .par_chunks_mut(heads * width)
            .zip(grads.gate_logits.par_chunks_mut(heads))
            .enumerate()
            .for_each(|(b, (du, dgate))| {
                du.fill(0.0);
                dgate.fill(0.0);
                if !self.rows[b].active {
                    return;
                }
                let (mut s, mut ds, mut dg) = (vec![0f32; heads], vec![0f32; heads], vec![0f32; heads]);
                for v in (0..num_items).filter(|&v| prepared.eligible[v]) {
                    prepared.head_logits(b, v, &mut s);
                    let d_mixed = self.head_grads(b, v, &s, &mut ds);
                    for h in 0..heads {
                        dg[h] += d_mixed * s[h];
                        let coef = scale * ds[h];
                        for (acc, x) in du[h * width..(h + 1) * width].iter_mut().zip(prepared.item_row(h, v)) {
                            *acc += coef * x.to_f32();
                        }
                    }
                }
                if prepared.operands.mixing == Mixing::Probabilities {
                    if let Upstream::Scores(_) = self.upstream {
                        dg.copy_from_slice(&self.rows[b].coef);
                    }
                }
                self.gate_grad(b, &dg, dgate);
            });

        // dX and ditem_bias: items in parallel, rows in order.
        let table_heads = if shared { 1 } else { heads };
        let logits = prepared.operands.mixing == Mixing::Logits;
        let dx = SharedRows(grads.items.as_mut_ptr());
        grads.items.fill(0.0);
        grads.item_bias.par_iter_mut().enumerate().for_each(|(v, dbias)| {
            *dbias = 0.0;
            if !prepared.eligible[v] {
                return;
            }
            let (mut s, mut ds) = (vec![0f32; heads], vec![0f32; heads]);
            let mut dx_v = vec![0f32; table_heads * width];
            for b in (0..prepared.shape().batch).filter(|&b| self.rows[b].active) {
                prepared.head_logits(b, v, &mut s);
                let d_mixed = self.head_grads(b, v, &s, &mut ds);
                // Logits mixing: d item_bias is dL/dS itself (the gates sum
                // to 1), as the CUDA kernels take it; summing g_h * dS would
                // turn a non-finite gate into NaN where the gradient has none.
                if logits {
                    *dbias += d_mixed;
                }
                for (h, &ds_h) in ds.iter().enumerate() {
                    if !logits {
                        *dbias += ds_h;
                    }
                    let target = if shared { 0 } else { h };
                    let coef = scale * ds_h;
                    for (acc, u) in dx_v[target * width..(target + 1) * width]
                        .iter_mut()
                        .zip(prepared.user_row(b, h))
                    {
                        *acc += coef * u;
                    }
                }
            }
            for (h, values) in dx_v.chunks(width).enumerate() {
                // SAFETY: row (h, v) of dX belongs to item v alone, and each
                // item is visited by exactly one task, so no two tasks write
                // the same element; the range lies inside `grads.items`
                // (checked to be table_heads * V * D long).
                unsafe { dx.write((h * num_items + v) * width, values) };
            }
        });
    }
}

/// A raw pointer to rows written by disjoint parallel tasks.
struct SharedRows(*mut f32);
// SAFETY: only used for writes to disjoint rows (see the one call site).
unsafe impl Sync for SharedRows {}

impl SharedRows {
    /// # Safety
    /// `start..start + values.len()` is in bounds and written by no one else.
    unsafe fn write(&self, start: usize, values: &[f32]) {
        std::ptr::copy_nonoverlapping(values.as_ptr(), self.0.add(start), values.len());
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

/// Gradients of `L = sum over eligible (b, v) of dscores[b, v] * scores[b, v]`.
pub fn scores_backward<T: FloatElement>(
    operands: Operands<'_, T>,
    dscores: &[f32],
    grads: GradientsMut<'_>,
) -> Result<()> {
    let prepared = Prepared::new(operands)?;
    check_len(
        "dscores",
        dscores.len(),
        prepared.shape().batch * prepared.shape().num_items,
    )?;
    check_gradients(prepared.shape(), &grads)?;
    Backward::new(prepared, Upstream::Scores(dscores)).run(grads);
    Ok(())
}

/// Targets with ignored rows as u32::MAX, after checking each active one:
/// below V and not excluded; the lowest offending row wins.
fn active_targets(
    prepared: &Prepared<'_, impl FloatElement>,
    targets: &[u32],
    ignore: Option<u32>,
) -> Result<Vec<u32>> {
    check_len("targets", targets.len(), prepared.shape().batch)?;
    targets
        .iter()
        .enumerate()
        .map(|(row, &target)| {
            if Some(target) == ignore {
                Ok(u32::MAX)
            } else if target as usize >= prepared.shape().num_items {
                Err(Error::IndexOutOfRange {
                    argument: "targets",
                    position: row as u64,
                    index: u64::from(target),
                    bound: prepared.shape().num_items as u64,
                })
            } else if !prepared.eligible[target as usize] {
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

/// `loss[b] = -log P[b, targets[b]]` (0 for ignored rows) and the row
/// log-sum-exps the backward needs: `lse` is `[B]` for Logits mixing, `[B, H]`
/// for Probabilities.
pub fn cross_entropy<T: FloatElement>(
    operands: Operands<'_, T>,
    targets: &[u32],
    ignore: Option<u32>,
    loss: &mut [f32],
    lse: &mut [f32],
) -> Result<()> {
    let prepared = Prepared::new(operands)?;
    let ScoringShape { batch, heads, .. } = prepared.shape();
    let targets = active_targets(&prepared, targets, ignore)?;
    let per_row = lse_per_row(operands.mixing, heads);
    check_len("loss", loss.len(), batch)?;
    check_len("lse", lse.len(), batch * per_row)?;
    loss.par_iter_mut()
        .zip(lse.par_chunks_mut(per_row.max(1)))
        .enumerate()
        .for_each(|(b, (loss, lse))| {
            lse.copy_from_slice(&prepared.row_lse(b));
            let target = targets[b];
            if target == u32::MAX {
                *loss = 0.0;
                return;
            }
            let mut s = vec![0f32; heads];
            prepared.head_logits(b, target as usize, &mut s);
            *loss = match operands.mixing {
                Mixing::Logits => lse[0] - prepared.mixed(b, &s),
                Mixing::Probabilities => {
                    let log_gates = &prepared.log_gates[b * heads..(b + 1) * heads];
                    let mut log_p = LogSumExp::EMPTY;
                    for h in 0..heads {
                        log_p.push(log_gates[h] + s[h] - lse[h]);
                    }
                    -log_p.value()
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

/// Gradients of `L = sum_b dloss[b] * loss[b]`, from the forward's `lse`.
pub fn cross_entropy_backward<T: FloatElement>(
    operands: Operands<'_, T>,
    targets: &[u32],
    ignore: Option<u32>,
    dloss: &[f32],
    lse: &[f32],
    grads: GradientsMut<'_>,
) -> Result<()> {
    let prepared = Prepared::new(operands)?;
    let shape = prepared.shape();
    let targets = active_targets(&prepared, targets, ignore)?;
    check_len("dloss", dloss.len(), shape.batch)?;
    check_len(
        "lse",
        lse.len(),
        shape.batch * lse_per_row(operands.mixing, shape.heads),
    )?;
    check_gradients(shape, &grads)?;
    Backward::new(prepared, Upstream::CrossEntropy { dloss, targets, lse }).run(grads);
    Ok(())
}

/// A candidate of a top-n: ordered so that the heap's top is the worst kept.
#[derive(Clone, Copy)]
struct Candidate {
    value: f32,
    id: u32,
}

impl Candidate {
    /// Less = better: numbers before NaN, larger first, then the lower id.
    fn rank(&self, other: &Self) -> Ordering {
        match (self.value.is_nan(), other.value.is_nan()) {
            (false, true) => Ordering::Less,
            (true, false) => Ordering::Greater,
            (true, true) => self.id.cmp(&other.id),
            (false, false) => other
                .value
                .partial_cmp(&self.value)
                .unwrap_or(Ordering::Equal)
                .then(self.id.cmp(&other.id)),
        }
    }
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.rank(other) == Ordering::Equal
    }
}
impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.rank(other)
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

/// The checks of a top-n request that need no scores, after the excluded
/// ids (`eligible` from [`eligible_items`]): the history's structure and
/// ids, then at least n eligible items in every row. Returns each row's
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
    let prepared = Prepared::new(operands)?;
    let ScoringShape {
        batch,
        heads,
        num_items,
        ..
    } = prepared.shape();
    if n == 0 {
        return Err(Error::invalid("n", "expected n >= 1, got 0"));
    }
    let output_len = batch
        .checked_mul(n)
        .ok_or_else(|| Error::invalid("n", format!("B * n = {batch} * {n} overflows")))?;
    check_len("ids", ids.len(), output_len)?;
    check_len("values", values.len(), output_len)?;
    let history = topk_rows(&prepared.eligible, n, history, batch)?;
    ids.par_chunks_mut(n)
        .zip(values.par_chunks_mut(n))
        .enumerate()
        .for_each(|(b, (row_ids, row_values))| {
            let lse = prepared.score_lse(b);
            let mut best = BinaryHeap::with_capacity(n + 1);
            let mut s = vec![0f32; heads];
            for v in 0..num_items {
                if !prepared.eligible[v] || history[b].binary_search(&(v as u32)).is_ok() {
                    continue;
                }
                prepared.head_logits(b, v, &mut s);
                let candidate = Candidate {
                    value: prepared.score(b, &s, &lse),
                    id: v as u32,
                };
                if best.len() < n {
                    best.push(candidate);
                } else if best.peek().is_some_and(|worst| candidate < *worst) {
                    best.pop();
                    best.push(candidate);
                }
            }
            for (j, candidate) in best.into_sorted_vec().into_iter().enumerate() {
                row_ids[j] = candidate.id;
                row_values[j] = candidate.value;
            }
        });
    Ok(())
}
