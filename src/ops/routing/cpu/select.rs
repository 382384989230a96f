//! The selection of a row's k best experts: keys `float32(z) + bias` as
//! ordered integers, joined with the expert so that ties go to the lower one
//! (as in kernels/routing.cu), then the k largest. For k up to [`LANE_K`]
//! each of [`LANES`] lanes keeps its own k best with branch-free min/max,
//! compiled for the widest SIMD the CPU has, and the lanes' bests are merged;
//! larger k go by insertion or selection. All give the same integers.

use crate::ops::host::vectorised;

/// Columns a lane pass takes at once.
const LANES: usize = 8;

/// Up to this k, the lanes pass.
const LANE_K: usize = 4;

/// Up to this k, the best k candidates are kept by insertion in one pass;
/// beyond, by a selection.
const INSERTION_K: usize = 8;

/// float32(z) + bias as an unsigned integer of the same order; -0 reads as +0
/// (as `selection_key` in kernels/routing.cu).
#[inline(always)]
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
#[inline(always)]
fn candidate(key: u32, expert: usize) -> u64 {
    (u64::from(key) << 32) | u64::from(!(expert as u32))
}

/// The expert of a candidate.
pub(super) fn expert(candidate: u64) -> usize {
    !(candidate as u32) as usize
}

/// The k best candidates of a row of logits `z` (columns within the group),
/// largest first, into `best`. `keep` is u64::MAX for an active expert and 0
/// for an inactive one, whose candidate 0 is below every active one (a key
/// is above 0 even at -inf); `keys` is scratch of the row's length. k is at
/// most the number of active experts.
pub(super) fn select(z: &[f32], bias: &[f32], keep: &[u64], k: usize, keys: &mut [u64], best: &mut Vec<u64>) {
    best.clear();
    if k <= LANE_K {
        let mut lanes = [[0u64; LANES]; LANE_K];
        lane_best(z, bias, keep, k, &mut lanes);
        insert_best(lanes[..k].iter().flatten().copied(), k, best);
        return;
    }
    keys.iter_mut()
        .zip(z)
        .zip(bias)
        .zip(keep)
        .enumerate()
        .for_each(|(c, (((key, &z), &b), &keep))| *key = candidate(selection_key(z, b), c) & keep);
    if k <= INSERTION_K {
        insert_best(keys.iter().copied(), k, best);
        return;
    }
    best.extend_from_slice(keys);
    if k < best.len() {
        best.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
        best.truncate(k);
    }
    best.sort_unstable_by(|a, b| b.cmp(a));
}

/// The k (at most [`INSERTION_K`]) largest of `candidates`, at least k of
/// which are above 0, into `best`, largest first.
fn insert_best(candidates: impl Iterator<Item = u64>, k: usize, best: &mut Vec<u64>) {
    // The k-th best stays in a register for the common rejection.
    let mut top = [0u64; INSERTION_K];
    let mut kth = 0;
    for candidate in candidates {
        if candidate > kth {
            let mut j = k - 1;
            while j > 0 && top[j - 1] < candidate {
                top[j] = top[j - 1];
                j -= 1;
            }
            top[j] = candidate;
            kth = top[k - 1];
        }
    }
    best.extend_from_slice(&top[..k]);
}

vectorised! {
    /// `lanes[j][l]`: the (j+1)-th best candidate among the columns
    /// `c = l mod LANES`, for j < k (0 where a lane has fewer).
    fn lane_best(z: &[f32], bias: &[f32], keep: &[u64], k: usize, lanes: &mut [[u64; LANES]; LANE_K]) = lane_best_body;
}

#[inline(always)]
fn lane_best_body(z: &[f32], bias: &[f32], keep: &[u64], k: usize, lanes: &mut [[u64; LANES]; LANE_K]) {
    let whole = z.len() / LANES * LANES;
    for start in (0..whole).step_by(LANES) {
        let end = start + LANES;
        lane_step(
            start,
            &z[start..end],
            &bias[start..end],
            &keep[start..end],
            &mut lanes[..k],
        );
    }
    // The tail, padded with candidates 0.
    let mut tail_keep = [0u64; LANES];
    let mut tail_z = [0f32; LANES];
    let mut tail_bias = [0f32; LANES];
    let rest = z.len() - whole;
    tail_keep[..rest].copy_from_slice(&keep[whole..]);
    tail_z[..rest].copy_from_slice(&z[whole..]);
    tail_bias[..rest].copy_from_slice(&bias[whole..]);
    lane_step(whole, &tail_z, &tail_bias, &tail_keep, &mut lanes[..k]);
}

/// Columns `start..start + LANES` into each lane's sorted column of bests.
#[inline(always)]
fn lane_step(start: usize, z: &[f32], bias: &[f32], keep: &[u64], levels: &mut [[u64; LANES]]) {
    let mut c = [0u64; LANES];
    for (l, ((c, &z), (&b, &keep))) in c.iter_mut().zip(z).zip(bias.iter().zip(keep)).enumerate() {
        *c = candidate(selection_key(z, b), start + l) & keep;
    }
    for level in levels {
        for (best, c) in level.iter_mut().zip(c.iter_mut()) {
            let high = if *c > *best { *c } else { *best };
            *c = if *c > *best { *best } else { *c };
            *best = high;
        }
    }
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

    #[test]
    fn every_path_selects_the_k_largest_keys_ties_to_the_lower_expert() {
        // 37 columns (a tail after 4 lanes passes), few distinct values (ties),
        // a bias, -inf and two inactive experts.
        let n = 37;
        let z: Vec<f32> = (0..n)
            .map(|c| {
                if c == 5 {
                    f32::NEG_INFINITY
                } else {
                    ((c * 7919) % 5) as f32 - 2.0
                }
            })
            .collect();
        let bias: Vec<f32> = (0..n).map(|c| if c % 9 == 0 { 1.0 } else { 0.0 }).collect();
        let keep: Vec<u64> = (0..n).map(|c| if c == 3 || c == 30 { 0 } else { u64::MAX }).collect();
        let mut expected: Vec<(f32, usize)> = (0..n).filter(|&c| keep[c] != 0).map(|c| (z[c] + bias[c], c)).collect();
        expected.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let (mut keys, mut best) = (vec![0; n], Vec::new());
        for k in 1..=n - 2 {
            select(&z, &bias, &keep, k, &mut keys, &mut best);
            let experts: Vec<usize> = best.iter().map(|&b| expert(b)).collect();
            let want: Vec<usize> = expected[..k].iter().map(|&(_, c)| c).collect();
            assert_eq!(experts, want, "k = {k}");
        }
    }
}
