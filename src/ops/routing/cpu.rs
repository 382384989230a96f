//! Routing on the host, on borrowed slices: rayon over chunks of token rows.
//! Per-expert statistics are summed per chunk, then over the chunks in order,
//! so the result does not depend on the thread count.

use super::{
    check_selection_bias, mask_value_error, non_finite, LossCoefficients, RoutingBuffers, RoutingConfig, Score, TopK,
};
use crate::dtype::FloatElement;
use crate::error::{Error, Result};
use crate::grouping::cpu::group_by_key;
use crate::ops::check_len;
use rayon::prelude::*;

/// Token rows per chunk of the forward: the partition of every statistic's sum.
const CHUNK_ROWS: usize = 256;

/// The forward's outputs on the host.
pub type HostRouting = RoutingBuffers<Vec<u32>, Vec<f32>>;

/// float32(z) + bias as an unsigned integer of the same order; -0 reads as +0
/// (as `selection_key` in kernels/routing.cu).
fn selection_key(z: f32, bias: f32) -> u32 {
    let bits = (z + bias).to_bits();
    let bits = if bits << 1 == 0 { 0 } else { bits };
    if bits & 0x8000_0000 != 0 {
        !bits
    } else {
        bits | 0x8000_0000
    }
}

/// Larger = selected first: larger key, then lower expert.
fn candidate(key: u32, expert: usize) -> u64 {
    (u64::from(key) << 32) | u64::from(!(expert as u32))
}

/// Overflow-free logistic function (sigmoid(-inf) = 0).
fn sigmoid(z: f32) -> f32 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// The largest logit of a set, over whose score the set's scores are taken
/// (`relative`) before any ratio of them, so the ratios are exact where the
/// scores underflow f32 (sigmoids of logits below about -87), at one
/// exponential per score (as `Anchor` in kernels/routing.cu).
#[derive(Clone, Copy)]
struct Anchor {
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
            Score::Sigmoid => value.exp(),
        };
        Anchor { value, score, constant }
    }

    /// The unnormalised score of `z <= value` over the anchor's, 1 at the
    /// anchor: `e^(z - value)`, or `sigmoid(z) / sigmoid(value)`, which below
    /// 0 is `u (1 + e^value) / (1 + u e^value)` with `u = e^(z - value)`.
    fn relative(&self, z: f32) -> f32 {
        match self.score {
            Score::Softmax => (z - self.value).exp(),
            Score::Sigmoid if self.value >= 0.0 => sigmoid(z) / self.constant,
            Score::Sigmoid => {
                let u = (z - self.value).exp();
                u * (1.0 + self.constant) / (1.0 + u * self.constant)
            }
        }
    }
}

/// A row's statistics over its active logits.
struct RowStats {
    /// The row's max.
    anchor: Anchor,
    sum_exp: f32,
    /// The sum of the scores relative to the row's max: at least 1, so the
    /// shares `p / sum of p` never divide by an underflowed sum.
    relative_sum: f32,
}

impl RowStats {
    /// The active logits of a row, or the column to report as non-finite:
    /// the lowest NaN/+inf one, else the first active one if all are -inf.
    fn of<T: FloatElement>(row: &[T], active: &[usize], score: Score) -> std::result::Result<RowStats, usize> {
        let mut max = f32::NEG_INFINITY;
        for &c in active {
            let z = row[c].to_f32();
            if z.is_nan() || z == f32::INFINITY {
                return Err(c);
            }
            max = max.max(z);
        }
        if max == f32::NEG_INFINITY {
            return Err(active[0]);
        }
        let anchor = Anchor::new(score, max);
        let sum_exp = active.iter().map(|&c| (row[c].to_f32() - max).exp()).sum();
        let relative_sum = match score {
            Score::Softmax => sum_exp,
            Score::Sigmoid => active.iter().map(|&c| anchor.relative(row[c].to_f32())).sum(),
        };
        Ok(RowStats {
            anchor,
            sum_exp,
            relative_sum,
        })
    }

    fn softmax(&self, z: f32) -> f32 {
        (z - self.anchor.value).exp() / self.sum_exp
    }

    fn score(&self, z: f32) -> f32 {
        match self.anchor.score {
            Score::Softmax => self.softmax(z),
            Score::Sigmoid => sigmoid(z),
        }
    }

    /// q = p / (sum of p), the row's share of z's expert.
    fn share(&self, z: f32) -> f32 {
        self.anchor.relative(z) / self.relative_sum
    }

    fn lse(&self) -> f32 {
        self.anchor.value + self.sum_exp.ln()
    }
}

/// Renormalisation over a row's selected experts: each score over the sum of
/// the selected scores, both relative to the largest selected logit, so the
/// sum is at least 1 (a valid row's best key has a finite logit).
struct Renormaliser {
    anchor: Anchor,
    sum: f32,
}

impl Renormaliser {
    fn new(score: Score, selected: impl Iterator<Item = f32> + Clone) -> Renormaliser {
        let anchor = Anchor::new(score, selected.clone().fold(f32::NEG_INFINITY, f32::max));
        let sum = selected.map(|z| anchor.relative(z)).sum();
        Renormaliser { anchor, sum }
    }

    fn weight(&self, z: f32) -> f32 {
        self.anchor.relative(z) / self.sum
    }
}

/// The active experts of each group, as columns within the group, ascending.
fn active_lists(expert_mask: Option<&[u32]>, config: &RoutingConfig) -> Vec<Vec<usize>> {
    let group_experts = config.group_experts();
    (0..config.groups)
        .map(|g| {
            (0..group_experts)
                .filter(|&c| expert_mask.map_or(true, |mask| mask[g * group_experts + c] == 1))
                .collect()
        })
        .collect()
}

/// Checks the backend operands against `config`: lengths, mask values and the
/// active experts.
fn check_operands<T>(
    logits: &[T],
    expert_mask: Option<&[u32]>,
    token_mask: Option<&[u32]>,
    config: &RoutingConfig,
) -> Result<()> {
    let checked = RoutingConfig::new_grouped(
        config.tokens,
        config.experts,
        config.groups,
        TopK::K(config.k),
        config.score,
        config.renormalize,
        expert_mask,
    )?;
    if checked != *config {
        return Err(Error::invalid(
            "config",
            format!("{config:?} does not match the expert mask, which gives {checked:?}"),
        ));
    }
    check_len("logits", logits.len(), config.tokens * config.experts)?;
    if let Some(mask) = token_mask {
        check_len("token_mask", mask.len(), config.tokens)?;
        if let Some(position) = mask.iter().position(|&m| m > 1) {
            return Err(mask_value_error("token_mask", position, mask[position]));
        }
    }
    Ok(())
}

/// Per-expert sums over one chunk of routing rows.
struct ChunkSums {
    /// Sum over the rows of q = p / (sum of p), per expert.
    share: Vec<f32>,
    /// Sum of the weights routed to each expert.
    gate: Vec<f32>,
    /// Sum of lse^2.
    z: f32,
    /// The chunk's first non-finite flat position in the logits.
    non_finite: Option<usize>,
}

/// The operands of one forward, borrowed.
struct Forward<'a, T> {
    logits: &'a [T],
    token_mask: Option<&'a [u32]>,
    selection_bias: Option<&'a [f32]>,
    /// Per group.
    active: &'a [Vec<usize>],
    config: &'a RoutingConfig,
}

impl<T: FloatElement> Forward<'_, T> {
    /// Routes routing rows `first..` (row r: token r / G within group r % G)
    /// into the chunk's `indices` and `weights`.
    fn chunk(&self, first: usize, indices: &mut [u32], weights: &mut [f32]) -> ChunkSums {
        let RoutingConfig { experts, groups, k, .. } = *self.config;
        let group_experts = self.config.group_experts();
        let mut sums = ChunkSums {
            share: vec![0.0; experts],
            gate: vec![0.0; experts],
            z: 0.0,
            non_finite: None,
        };
        let mut candidates = Vec::with_capacity(group_experts);
        for (i, (row_indices, row_weights)) in indices.chunks_mut(k).zip(weights.chunks_mut(k)).enumerate() {
            let r = first + i;
            if self.token_mask.is_some_and(|mask| mask[r / groups] != 1) {
                continue; // indices u32::MAX and weights 0 already
            }
            let base = (r % groups) * group_experts;
            let active = &self.active[r % groups];
            let row = &self.logits[r * group_experts..(r + 1) * group_experts];
            let stats = match RowStats::of(row, active, self.config.score) {
                Ok(stats) => stats,
                Err(column) => {
                    sums.non_finite = Some(r * group_experts + column);
                    return sums;
                }
            };
            sums.z += stats.lse() * stats.lse();
            for &c in active {
                sums.share[base + c] += stats.share(row[c].to_f32());
            }
            candidates.clear();
            candidates.extend(active.iter().map(|&c| {
                let bias = self.selection_bias.map_or(0.0, |b| b[base + c]);
                candidate(selection_key(row[c].to_f32(), bias), c)
            }));
            if k < candidates.len() {
                candidates.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
                candidates.truncate(k);
            }
            candidates.sort_unstable_by(|a, b| b.cmp(a));
            let z = |c: u32| row[c as usize].to_f32();
            let local = || candidates.iter().map(|&winner| !(winner as u32));
            let renormaliser = self
                .config
                .renormalize
                .then(|| Renormaliser::new(self.config.score, local().map(z)));
            for ((index, weight), c) in row_indices.iter_mut().zip(row_weights.iter_mut()).zip(local()) {
                *index = (base + c as usize) as u32;
                *weight = match &renormaliser {
                    Some(renormaliser) => renormaliser.weight(z(c)),
                    None => stats.score(z(c)),
                };
                sums.gate[*index as usize] += *weight;
            }
        }
        sums
    }
}

/// Routes `logits: [T, E]` within each of the config's groups: indices,
/// weights, the plan (grouped by expert with the grouping primitive) and the
/// statistics. Checks every operand against `config`; the lowest non-finite
/// logit is [`Error::NonFinite`].
pub fn forward<T: FloatElement>(
    logits: &[T],
    expert_mask: Option<&[u32]>,
    token_mask: Option<&[u32]>,
    selection_bias: Option<&[f32]>,
    config: &RoutingConfig,
) -> Result<HostRouting> {
    check_operands(logits, expert_mask, token_mask, config)?;
    check_selection_bias(selection_bias, config.experts)?;
    let RoutingConfig { experts, k, .. } = *config;
    let active = active_lists(expert_mask, config);
    let routing = Forward {
        logits,
        token_mask,
        selection_bias,
        active: &active,
        config,
    };
    let mut indices = vec![u32::MAX; config.slots()];
    let mut weights = vec![0f32; config.slots()];
    let chunks: Vec<ChunkSums> = indices
        .par_chunks_mut(CHUNK_ROWS * k)
        .zip(weights.par_chunks_mut(CHUNK_ROWS * k))
        .enumerate()
        .map(|(chunk, (indices, weights))| routing.chunk(chunk * CHUNK_ROWS, indices, weights))
        .collect();
    if let Some(position) = chunks.iter().find_map(|chunk| chunk.non_finite) {
        return Err(non_finite(position as u64, experts));
    }
    let mut share = vec![0f32; experts];
    let mut gate_mass = vec![0f32; experts];
    let mut z_sum = 0f32;
    for chunk in &chunks {
        share.iter_mut().zip(&chunk.share).for_each(|(total, s)| *total += s);
        gate_mass.iter_mut().zip(&chunk.gate).for_each(|(total, g)| *total += g);
        z_sum += chunk.z;
    }

    // Grouping keys: the expert of each (routing row, slot), E (no group) for
    // the slots of invalid tokens; grouped stably, so ascending row per expert.
    let keys: Vec<u32> = indices
        .iter()
        .map(|&e| if e == u32::MAX { experts as u32 } else { e })
        .collect();
    let groups = group_by_key(&keys, experts as u64 + 1, Some(experts as u32));
    let rows = groups.starts.last().copied().unwrap_or(0) as usize;
    let mut counts = vec![0u32; experts];
    for (g, &key) in groups.keys.iter().enumerate() {
        counts[key as usize] = groups.starts[g + 1] - groups.starts[g];
    }
    let offsets: Vec<u32> = std::iter::once(0)
        .chain(counts.iter().scan(0u32, |running, &count| {
            *running += count;
            Some(*running)
        }))
        .collect();
    let token_of_row: Vec<u32> = groups.order[..rows].iter().map(|&slot| slot / k as u32).collect();
    let mut row_of_slot = vec![u32::MAX; config.slots()];
    for (row, &slot) in groups.order[..rows].iter().enumerate() {
        row_of_slot[slot as usize] = row as u32;
    }

    let losses = Losses::new(&share, z_sum, &counts, rows, &active, config);
    Ok(HostRouting {
        indices,
        weights,
        counts,
        offsets,
        token_of_row,
        row_of_slot,
        gate_mass,
        lb_loss: vec![losses.lb_loss],
        z_loss: vec![losses.z_loss],
        grad_scales: losses.grad_scales,
    })
}

/// The losses and the backward's scales from the summed statistics (as
/// `routing_finalize` in kernels/routing.cu).
struct Losses {
    lb_loss: f32,
    z_loss: f32,
    grad_scales: Vec<f32>,
}

impl Losses {
    /// With T' valid tokens, `lb_loss = sum_e N'_g(e) / G * f_e * P_e`
    /// (`f_e = counts_e / (T' k)`, `P_e = share_e / T'`), the mean over the
    /// groups of each group's loss; `grad_scales[e] = N'_g / G * f_e / T'`
    /// for active experts, then `1 / (T' G)`, over which z_loss averages.
    fn new(
        share: &[f32],
        z_sum: f32,
        counts: &[u32],
        rows: usize,
        active: &[Vec<usize>],
        config: &RoutingConfig,
    ) -> Losses {
        let RoutingConfig { experts, groups, k, .. } = *config;
        let group_experts = config.group_experts();
        let mut grad_scales = vec![0f32; experts + 1];
        if rows == 0 {
            return Losses {
                lb_loss: 0.0,
                z_loss: 0.0,
                grad_scales,
            };
        }
        let valid_rows = (rows / k) as f32;
        let valid_tokens = (rows / k / groups) as f32;
        let mut lb_loss = 0f32;
        for (g, active) in active.iter().enumerate() {
            let scale = active.len() as f32 / groups as f32;
            for &c in active {
                let e = g * group_experts + c;
                let fraction = counts[e] as f32 / (valid_tokens * k as f32);
                lb_loss += scale * fraction * (share[e] / valid_tokens);
                grad_scales[e] = scale * fraction / valid_tokens;
            }
        }
        grad_scales[experts] = 1.0 / valid_rows;
        Losses {
            lb_loss,
            z_loss: z_sum / valid_rows,
            grad_scales,
        }
    }
}

/// `dZ [T, E]`: the gradient of `sum(dweights * weights) + lb * lb_loss +
/// z * z_loss` with the forward's `indices [T * G, k]` and `grad_scales
/// [E + 1]` held fixed (routing rows in parallel; each is independent).
#[allow(clippy::too_many_arguments)]
pub fn backward<T: FloatElement>(
    logits: &[T],
    expert_mask: Option<&[u32]>,
    token_mask: Option<&[u32]>,
    indices: &[u32],
    dweights: &[f32],
    grad_scales: &[f32],
    coefficients: LossCoefficients,
    config: &RoutingConfig,
) -> Result<Vec<f32>> {
    check_operands(logits, expert_mask, token_mask, config)?;
    let RoutingConfig { experts, groups, k, .. } = *config;
    let group_experts = config.group_experts();
    check_len("indices", indices.len(), config.slots())?;
    check_len("dweights", dweights.len(), config.slots())?;
    check_len("grad_scales", grad_scales.len(), experts + 1)?;
    let active = active_lists(expert_mask, config);
    let mut dlogits = vec![0f32; config.tokens * experts];
    let first_bad = dlogits
        .par_chunks_mut(group_experts)
        .enumerate()
        .map_init(
            || RowScratch {
                selected: Vec::with_capacity(k),
                grad: vec![0.0; group_experts],
                shares: vec![0.0; group_experts],
                scores: vec![0.0; group_experts],
            },
            |scratch, (r, out)| {
                if token_mask.is_some_and(|mask| mask[r / groups] != 1) {
                    return None; // zeros already
                }
                let base = (r % groups) * group_experts;
                let slots = r * k..(r + 1) * k;
                let inputs = BackwardRow {
                    row: &logits[r * group_experts..(r + 1) * group_experts],
                    active: &active[r % groups],
                    base,
                    indices: &indices[slots.clone()],
                    dweights: &dweights[slots],
                    grad_scales: &grad_scales[base..base + group_experts],
                    inv_valid_rows: grad_scales[experts],
                    coefficients,
                    renormalize: config.renormalize,
                };
                inputs
                    .write(config.score, scratch, out)
                    .err()
                    .map(|column| r * group_experts + column)
            },
        )
        .find_map_first(|bad| bad);
    match first_bad {
        Some(position) => Err(non_finite(position as u64, experts)),
        None => Ok(dlogits),
    }
}

/// One valid routing row's backward operands; columns within its group.
struct BackwardRow<'a, T> {
    row: &'a [T],
    active: &'a [usize],
    /// The group's first expert: `indices` are global.
    base: usize,
    indices: &'a [u32],
    dweights: &'a [f32],
    /// The group's.
    grad_scales: &'a [f32],
    inv_valid_rows: f32,
    coefficients: LossCoefficients,
    renormalize: bool,
}

impl<T: FloatElement> BackwardRow<'_, T> {
    /// Writes the row's dZ into `out` (inactive entries stay 0), with
    /// `selected` and `grad` as scratch; Err(column) for a non-finite row.
    ///
    /// Each score-dependent term is differentiated through v = the log of
    /// the unnormalised score (z, or log sigmoid(z)): a ratio y = u / sum of
    /// u over a set gives dL/dv_i = y_i (g_i - <g, y>), and dz = dv/dz dL/dv.
    /// Nothing is divided by a sum of scores, which may underflow.
    fn write(&self, score: Score, scratch: &mut RowScratch, out: &mut [f32]) -> std::result::Result<(), usize> {
        let stats = RowStats::of(self.row, self.active, score)?;
        let group_experts = self.row.len();
        let z = |c: usize| self.row[c].to_f32();
        let RowScratch {
            selected,
            grad,
            shares,
            scores,
        } = scratch;
        selected.clear();
        selected.extend(
            self.indices
                .iter()
                .zip(self.dweights)
                .map(|(&e, &dw)| ((e as usize).wrapping_sub(self.base), dw))
                .filter(|&(c, _)| c < group_experts),
        );
        for &c in self.active {
            shares[c] = stats.share(z(c));
            scores[c] = match score {
                Score::Softmax => shares[c],
                Score::Sigmoid => sigmoid(z(c)),
            };
        }
        let LossCoefficients { lb, z: z_coef } = self.coefficients;
        // Load balance: sum_e c_e q_e with c_e = lb * grad_scales[e] and
        // q = p / (sum of p) over the active experts.
        let balance: f32 = self.active.iter().map(|&c| lb * self.grad_scales[c] * shares[c]).sum();
        grad.fill(0.0);
        for &c in self.active {
            grad[c] = shares[c] * (lb * self.grad_scales[c] - balance);
        }
        // The weights: renormalised, a ratio over the selected experts; else
        // the scores, a ratio over the active experts for softmax and
        // independent sigmoids.
        if self.renormalize {
            let renormaliser = Renormaliser::new(score, selected.iter().map(|&(e, _)| z(e)));
            let weighted: f32 = selected.iter().map(|&(e, dw)| dw * renormaliser.weight(z(e))).sum();
            for &(e, dw) in selected.iter() {
                grad[e] += renormaliser.weight(z(e)) * (dw - weighted);
            }
        } else {
            for &(e, dw) in selected.iter() {
                grad[e] += dw * scores[e];
            }
            if score == Score::Softmax {
                let weighted: f32 = selected.iter().map(|&(e, dw)| dw * scores[e]).sum();
                for &c in self.active {
                    grad[c] -= weighted * scores[c];
                }
            }
        }
        // z-loss: d lse^2 / dz = 2 lse softmax(z), averaged over valid tokens.
        let z_scale = z_coef * 2.0 * stats.lse() * self.inv_valid_rows;
        for &c in self.active {
            // d log(unnormalised score) / dz: 1 for e^z, 1 - p for a sigmoid.
            let (log_slope, softmax) = match score {
                Score::Softmax => (1.0, shares[c]),
                Score::Sigmoid if z_scale == 0.0 => (1.0 - scores[c], 0.0),
                Score::Sigmoid => (1.0 - scores[c], stats.softmax(z(c))),
            };
            out[c] = log_slope * grad[c] + z_scale * softmax;
        }
        Ok(())
    }
}

/// Per-thread scratch of the backward: a row's selected (column, dweight)
/// pairs, and per column dL/dv, the share and the score.
struct RowScratch {
    selected: Vec<(usize, f32)>,
    grad: Vec<f32>,
    shares: Vec<f32>,
    scores: Vec<f32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_keys_order_like_the_floats_and_merge_the_zeros() {
        let values = [f32::NEG_INFINITY, -3.5, -1e-40, -0.0, 0.0, 1e-40, 2.0, f32::INFINITY];
        let keys: Vec<u32> = values.iter().map(|&v| selection_key(v, 0.0)).collect();
        assert!(keys.windows(2).all(|w| w[0] <= w[1]), "{keys:?}");
        assert_eq!(selection_key(-0.0, 0.0), selection_key(0.0, 0.0));
        assert!(keys[0] > 0, "-inf keeps a key above 0 (reserved for inactive experts)");
        assert!(candidate(7, 1) > candidate(7, 2), "ties go to the lower expert");
        assert!(candidate(8, 9) > candidate(7, 0));
    }
}
