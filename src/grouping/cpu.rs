//! Grouping on the host: a stable LSD counting sort.

use super::key_bits;

/// Positions grouped by key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Groups {
    /// Input positions sorted by key, ascending position within a key; the
    /// sentinel's positions come last.
    pub order: Vec<u32>,
    /// The distinct keys other than the sentinel, ascending.
    pub keys: Vec<u32>,
    /// Group g is `order[starts[g]..starts[g + 1]]`; `keys.len() + 1` entries.
    pub starts: Vec<u32>,
}

/// Groups the positions of `keys` (each below `key_bound`, which callers
/// guarantee) by key. Entries equal to `sentinel`, which must be the largest
/// key, belong to no group. `keys.len()` fits in u32 (checked by the ops).
pub(crate) fn group_by_key(keys: &[u32], key_bound: u64, sentinel: Option<u32>) -> Groups {
    let (sorted_keys, order) = stable_sort_by_key(keys, key_bound);
    let mut group_keys = Vec::new();
    let mut starts = Vec::new();
    let mut end = 0u32;
    for (i, &key) in sorted_keys.iter().enumerate() {
        if Some(key) == sentinel {
            break;
        }
        if i == 0 || sorted_keys[i - 1] != key {
            group_keys.push(key);
            starts.push(i as u32);
        }
        end = i as u32 + 1;
    }
    starts.push(end);
    Groups {
        order,
        keys: group_keys,
        starts,
    }
}

/// (sorted keys, positions in sorted order). One counting pass when the key
/// range is small against the count, else digit by digit.
fn stable_sort_by_key(keys: &[u32], key_bound: u64) -> (Vec<u32>, Vec<u32>) {
    let n = keys.len();
    let total_bits = key_bits(key_bound);
    let count_bits = usize::BITS - n.leading_zeros();
    let digit_bits = count_bits.clamp(8, 16).min(total_bits.max(1));
    let mut sorted: Vec<u32> = keys.to_vec();
    let mut order: Vec<u32> = (0..n as u32).collect();
    let mut sorted_next = vec![0u32; n];
    let mut order_next = vec![0u32; n];
    let mut shift = 0;
    while shift < total_bits {
        let mask = (1u32 << digit_bits) - 1;
        let mut next_slot = vec![0u32; 1usize << digit_bits];
        for &key in &sorted {
            next_slot[((key >> shift) & mask) as usize] += 1;
        }
        let mut running = 0;
        for slot in next_slot.iter_mut() {
            let count = *slot;
            *slot = running;
            running += count;
        }
        for (&key, &position) in sorted.iter().zip(&order) {
            let slot = &mut next_slot[((key >> shift) & mask) as usize];
            sorted_next[*slot as usize] = key;
            order_next[*slot as usize] = position;
            *slot += 1;
        }
        std::mem::swap(&mut sorted, &mut sorted_next);
        std::mem::swap(&mut order, &mut order_next);
        shift += digit_bits;
    }
    (sorted, order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_stable_and_skip_the_sentinel() {
        let keys = [5, 1, 5, 9, 1, 0, 9, 5];
        let groups = group_by_key(&keys, 10, Some(9));
        assert_eq!(groups.order, vec![5, 1, 4, 0, 2, 7, 3, 6]);
        assert_eq!(groups.keys, vec![0, 1, 5]);
        assert_eq!(groups.starts, vec![0, 1, 3, 6]);
    }

    #[test]
    fn multi_digit_keys_sort_like_a_stable_sort() {
        let mut state = 0x9e3779b97f4a7c15u64;
        let keys: Vec<u32> = (0..5000)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 33) % 3_000_000) as u32
            })
            .collect();
        let groups = group_by_key(&keys, 3_000_000, None);
        let mut expected: Vec<u32> = (0..keys.len() as u32).collect();
        expected.sort_by_key(|&i| keys[i as usize]);
        assert_eq!(groups.order, expected);
        assert_eq!(groups.starts.len(), groups.keys.len() + 1);
        assert_eq!(*groups.starts.last().unwrap() as usize, keys.len());
    }

    #[test]
    fn empty_and_all_sentinel_lists_have_no_group() {
        assert_eq!(group_by_key(&[], 4, None).starts, vec![0]);
        let all = group_by_key(&[3, 3], 4, Some(3));
        assert!(all.keys.is_empty());
        assert_eq!(all.starts, vec![0]);
        assert_eq!(all.order, vec![0, 1]);
    }
}
