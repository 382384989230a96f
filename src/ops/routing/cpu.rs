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
use rows::{lane_dot, Block, Renormaliser};
use select::{expert, select};

mod rows;
mod select;

/// Routing rows per chunk: the partition of every statistic's sum, and the
/// block whose scores are computed in one vectorised pass.
const CHUNK_ROWS: usize = 256;

/// The forward's outputs on the host.
pub type HostRouting = RoutingBuffers<Vec<u32>, Vec<f32>>;

/// The active and the inactive experts of each group, as columns within the
/// group, ascending.
struct Columns {
    active: Vec<Vec<usize>>,
    inactive: Vec<Vec<usize>>,
    /// Per group and column, u64::MAX when active, else 0 (the selection's
    /// mask of candidates).
    keep: Vec<Vec<u64>>,
}

impl Columns {
    fn new(expert_mask: Option<&[u32]>, config: &RoutingConfig) -> Columns {
        let group_experts = config.group_experts();
        let of_group = |g: usize, value: bool| -> Vec<usize> {
            (0..group_experts)
                .filter(|&c| expert_mask.map_or(true, |mask| mask[g * group_experts + c] == 1) == value)
                .collect()
        };
        let inactive: Vec<Vec<usize>> = (0..config.groups).map(|g| of_group(g, false)).collect();
        let keep = inactive
            .iter()
            .map(|inactive| {
                let mut keep = vec![u64::MAX; group_experts];
                inactive.iter().for_each(|&c| keep[c] = 0);
                keep
            })
            .collect();
        Columns {
            active: (0..config.groups).map(|g| of_group(g, true)).collect(),
            inactive,
            keep,
        }
    }

    /// Loads routing rows `first..` (as many as `z` holds; row r is token
    /// r / G within group r % G, logits `r * N..(r + 1) * N`) into `z` as
    /// f32, inactive experts -inf; the rows of invalid tokens are 0 (never
    /// read).
    fn load<T: FloatElement>(&self, logits: &[T], token_mask: Option<&[u32]>, first: usize, z: &mut [f32]) {
        let n = self.active[0].len() + self.inactive[0].len();
        let groups = self.active.len();
        let len = z.len();
        z.iter_mut()
            .zip(&logits[first * n..first * n + len])
            .for_each(|(z, logit)| *z = logit.to_f32());
        for (i, row) in z.chunks_exact_mut(n).enumerate() {
            let r = first + i;
            if token_mask.is_some_and(|mask| mask[r / groups] != 1) {
                row.fill(0.0);
            } else {
                self.inactive[r % groups]
                    .iter()
                    .for_each(|&c| row[c] = f32::NEG_INFINITY);
            }
        }
    }
}

/// The column to report for a non-finite row (inactive experts -inf): the
/// lowest NaN/+inf, else (all active logits -inf) the first active one.
fn bad_column(row: &[f32], active: &[usize]) -> usize {
    row.iter()
        .position(|&z| z.is_nan() || z == f32::INFINITY)
        .unwrap_or(active[0])
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
    columns: &'a Columns,
    config: &'a RoutingConfig,
}

/// Per-thread scratch of the forward.
struct ForwardScratch {
    block: Block,
    /// A row's selection keys as candidates.
    keys: Vec<u64>,
    /// The k best of them.
    candidates: Vec<u64>,
    /// The bias of a row without one.
    zeros: Vec<f32>,
}

impl<T: FloatElement> Forward<'_, T> {
    /// Routes routing rows `first..` (row r: token r / G within group r % G)
    /// into the chunk's `indices` and `weights`.
    fn chunk(&self, scratch: &mut ForwardScratch, first: usize, indices: &mut [u32], weights: &mut [f32]) -> ChunkSums {
        let RoutingConfig {
            experts,
            groups,
            k,
            score,
            ..
        } = *self.config;
        let n = self.config.group_experts();
        let rows = indices.len() / k;
        let mut sums = ChunkSums {
            share: vec![0.0; experts],
            gate: vec![0.0; experts],
            z: 0.0,
            non_finite: None,
        };
        let ForwardScratch {
            block,
            keys,
            candidates,
            zeros,
        } = scratch;
        for (start, end) in block.spans(rows) {
            self.columns.load(
                self.logits,
                self.token_mask,
                first + start,
                &mut block.z[..(end - start) * n],
            );
            block.compute(end - start, n, score == Score::Sigmoid);
            for i in start..end {
                let r = first + i;
                if self.token_mask.is_some_and(|mask| mask[r / groups] != 1) {
                    continue; // indices u32::MAX and weights 0 already
                }
                let b = i - start;
                let (row_indices, row_weights) = (&mut indices[i * k..(i + 1) * k], &mut weights[i * k..(i + 1) * k]);
                let base = (r % groups) * n;
                let active = &self.columns.active[r % groups];
                let cells = b * n..(b + 1) * n;
                let row = &block.z[cells.clone()];
                let stats = block.rows[b];
                if stats.bad {
                    sums.non_finite = Some(r * n + bad_column(row, active));
                    return sums;
                }
                sums.z += stats.lse() * stats.lse();
                let shares = &block.shares[cells.clone()];
                sums.share[base..base + n]
                    .iter_mut()
                    .zip(shares)
                    .for_each(|(total, q)| *total += q);
                let bias = self.selection_bias.map_or(&zeros[..], |b| &b[base..base + n]);
                select(row, bias, &self.columns.keep[r % groups], k, keys, candidates);
                let local = || candidates.iter().map(|&winner| expert(winner));
                let renormaliser = self
                    .config
                    .renormalize
                    .then(|| Renormaliser::new(score, local().map(|c| row[c])));
                let scores = match score {
                    Score::Softmax => shares,
                    Score::Sigmoid => &block.sigmoids[cells],
                };
                for ((index, weight), c) in row_indices.iter_mut().zip(row_weights.iter_mut()).zip(local()) {
                    *index = (base + c) as u32;
                    *weight = match &renormaliser {
                        Some(renormaliser) => renormaliser.weight(row[c]),
                        None => scores[c],
                    };
                    sums.gate[base + c] += *weight;
                }
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
    let columns = Columns::new(expert_mask, config);
    let routing = Forward {
        logits,
        token_mask,
        selection_bias,
        columns: &columns,
        config,
    };
    let n = config.group_experts();
    let mut indices = vec![u32::MAX; config.slots()];
    let mut weights = vec![0f32; config.slots()];
    let chunks: Vec<ChunkSums> = indices
        .par_chunks_mut(CHUNK_ROWS * k)
        .zip(weights.par_chunks_mut(CHUNK_ROWS * k))
        .enumerate()
        .map_init(
            || ForwardScratch {
                block: Block::new(n),
                keys: vec![0; n],
                candidates: Vec::with_capacity(n),
                zeros: vec![0.0; n],
            },
            |scratch, (chunk, (indices, weights))| routing.chunk(scratch, chunk * CHUNK_ROWS, indices, weights),
        )
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

    let losses = Losses::new(&share, z_sum, &counts, rows, &columns.active, config);
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
    let columns = Columns::new(expert_mask, config);
    let sigmoid_scores = config.score == Score::Sigmoid;
    // The load-balance loss's gradient per expert, lb * grad_scales[e].
    let balance_scales: Vec<f32> = grad_scales[..experts].iter().map(|&g| coefficients.lb * g).collect();
    let mut dlogits = vec![0f32; config.tokens * experts];
    let first_bad = dlogits
        .par_chunks_mut(CHUNK_ROWS * group_experts)
        .enumerate()
        .map_init(
            || Block::new(group_experts),
            |block, (chunk, out)| {
                let first = chunk * CHUNK_ROWS;
                let rows = out.len() / group_experts;
                let cells_of = |rows: std::ops::Range<usize>| rows.start * group_experts..rows.end * group_experts;
                for (start, end) in block.spans(rows) {
                    columns.load(
                        logits,
                        token_mask,
                        first + start,
                        &mut block.z[cells_of(0..end - start)],
                    );
                    block.compute(end - start, group_experts, sigmoid_scores);
                    for i in start..end {
                        let r = first + i;
                        if token_mask.is_some_and(|mask| mask[r / groups] != 1) {
                            continue; // zeros already
                        }
                        let b = i - start;
                        let base = (r % groups) * group_experts;
                        let cells = cells_of(b..b + 1);
                        let stats = block.rows[b];
                        let active = &columns.active[r % groups];
                        if stats.bad {
                            return Some(r * group_experts + bad_column(&block.z[cells], active));
                        }
                        let slots = r * k..(r + 1) * k;
                        let inputs = BackwardRow {
                            z: &block.z[cells.clone()],
                            exps: &block.exps[cells.clone()],
                            sigmoids: &block.sigmoids[cells.clone()],
                            shares: &block.shares[cells],
                            sum_exp: stats.sum_exp,
                            base,
                            indices: &indices[slots.clone()],
                            dweights: &dweights[slots],
                            balance_scales: &balance_scales[base..base + group_experts],
                            z_scale: coefficients.z * 2.0 * stats.lse() * grad_scales[experts],
                        };
                        let out = &mut out[cells_of(i..i + 1)];
                        inputs.write(config.score, config.renormalize, out);
                        columns.inactive[r % groups].iter().for_each(|&c| out[c] = 0.0);
                    }
                }
                None
            },
        )
        .find_map_first(|bad| bad);
    match first_bad {
        Some(position) => Err(non_finite(position as u64, experts)),
        None => Ok(dlogits),
    }
}

/// One valid routing row's backward operands; columns within its group,
/// inactive experts with logit -inf and exponential, score and share 0.
struct BackwardRow<'a> {
    z: &'a [f32],
    /// e^(z - row max), and its sum.
    exps: &'a [f32],
    sum_exp: f32,
    /// Unused for softmax.
    sigmoids: &'a [f32],
    shares: &'a [f32],
    /// The group's first expert: `indices` are global.
    base: usize,
    indices: &'a [u32],
    dweights: &'a [f32],
    /// The group's lb * grad_scales.
    balance_scales: &'a [f32],
    /// z_coef * 2 lse / T', the z-loss gradient over softmax(z).
    z_scale: f32,
}

impl BackwardRow<'_> {
    /// Writes the row's dZ into `out` (the caller zeroes the inactive
    /// entries).
    ///
    /// Each score-dependent term is differentiated through v = the log of
    /// the unnormalised score (z, or log sigmoid(z)): a ratio y = u / sum of
    /// u over a set gives dL/dv_i = y_i (g_i - <g, y>), and dz = dv/dz dL/dv.
    /// Nothing is divided by a sum of scores, which may underflow.
    fn write(&self, score: Score, renormalize: bool, out: &mut [f32]) {
        let n = self.z.len();
        let selected = || {
            self.indices
                .iter()
                .zip(self.dweights)
                .map(|(&e, &dw)| ((e as usize).wrapping_sub(self.base), dw))
                .filter(move |&(c, _)| c < n)
        };
        let scores = match score {
            Score::Softmax => self.shares,
            Score::Sigmoid => self.sigmoids,
        };
        // Load balance: sum_e c_e q_e with c_e = lb * grad_scales[e] and
        // q = p / (sum of p) over the active experts.
        let balance = lane_dot(self.balance_scales, self.shares);
        for ((g, &q), &c) in out.iter_mut().zip(self.shares).zip(self.balance_scales) {
            *g = q * (c - balance);
        }
        // The weights: renormalised, a ratio over the selected experts; else
        // the scores, a ratio over the active experts for softmax and
        // independent sigmoids.
        if renormalize {
            let renormaliser = Renormaliser::new(score, selected().map(|(e, _)| self.z[e]));
            let weighted: f32 = selected().map(|(e, dw)| dw * renormaliser.weight(self.z[e])).sum();
            for (e, dw) in selected() {
                out[e] += renormaliser.weight(self.z[e]) * (dw - weighted);
            }
        } else {
            for (e, dw) in selected() {
                out[e] += dw * scores[e];
            }
            if score == Score::Softmax {
                let weighted: f32 = selected().map(|(e, dw)| dw * scores[e]).sum();
                out.iter_mut().zip(scores).for_each(|(g, &p)| *g -= weighted * p);
            }
        }
        // z-loss: d lse^2 / dz = 2 lse softmax(z), averaged over valid tokens;
        // d log(unnormalised score) / dz: 1 for e^z, 1 - p for a sigmoid.
        let z_scale = self.z_scale;
        match score {
            Score::Softmax => out.iter_mut().zip(self.shares).for_each(|(g, &q)| *g += z_scale * q),
            Score::Sigmoid => {
                let sum_exp = self.sum_exp;
                for ((g, &s), &u) in out.iter_mut().zip(self.sigmoids).zip(self.exps) {
                    *g = (1.0 - s) * *g + z_scale * (u / sum_exp);
                }
            }
        }
    }
}
