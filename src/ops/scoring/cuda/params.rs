//! The interface between the scoring kernels and the host: the parameter
//! block every kernel takes (`ScoringParams` in kernels/scoring.cuh), its
//! flags, and the codes of the data-error status word.

use cudarc::driver::DeviceRepr;

/// ScoringParams::flags (kProbabilities, ...).
pub(super) const FLAG_PROBABILITIES: u32 = 1;
pub(super) const FLAG_SHARED: u32 = 2;
pub(super) const FLAG_CROSS_ENTROPY: u32 = 4;
pub(super) const FLAG_IGNORE: u32 = 8;
pub(super) const FLAG_REDUCE_DOT: u32 = 16;

/// Status codes (kHistoryOffsetsError, ...): the lowest reported wins.
const STATUS_HISTORY_OFFSETS: u64 = 1 << 60;
const STATUS_HISTORY_ID: u64 = STATUS_HISTORY_OFFSETS + 1;
const STATUS_TARGET: u64 = 1 << 61;
const STATUS_TOO_FEW: u64 = 1 << 62;
const TOO_FEW_ROW_SHIFT: u32 = 31;

/// The parameter block of every scoring kernel: `ScoringParams` in
/// kernels/scoring.cuh, field by field (pointers as u64, null when unused).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Params {
    pub(super) user: u64,
    pub(super) gate_logits: u64,
    pub(super) items: u64,
    pub(super) item_bias: u64,
    pub(super) excluded: u64,
    pub(super) targets: u64,
    pub(super) dscores: u64,
    pub(super) dloss: u64,
    pub(super) history_offsets: u64,
    pub(super) history_ids: u64,
    pub(super) excluded_flags: u64,
    pub(super) gates: u64,
    pub(super) log_gates: u64,
    pub(super) mixed_user: u64,
    pub(super) row_partials: u64,
    pub(super) row_lse: u64,
    pub(super) row_coef: u64,
    pub(super) row_weight: u64,
    pub(super) row_target: u64,
    pub(super) target_logits: u64,
    pub(super) user_partials: u64,
    pub(super) bias_partials: u64,
    pub(super) out: u64,
    pub(super) d_user: u64,
    pub(super) d_gates: u64,
    pub(super) d_items: u64,
    pub(super) d_bias: u64,
    pub(super) candidate_values: u64,
    pub(super) candidate_ids: u64,
    pub(super) candidate_counts: u64,
    pub(super) topk_ids: u64,
    pub(super) topk_values: u64,
    pub(super) status: u64,
    pub(super) batch: u32,
    pub(super) heads: u32,
    pub(super) width: u32,
    pub(super) num_items: u32,
    pub(super) num_excluded: u32,
    pub(super) k: u32,
    pub(super) a_width: u32,
    pub(super) heads_out: u32,
    pub(super) row_tiles: u32,
    pub(super) item_tiles: u32,
    pub(super) reduce_chunks: u32,
    pub(super) reduce_tiles_per_chunk: u32,
    pub(super) user_chunks: u32,
    pub(super) user_tiles_per_chunk: u32,
    pub(super) k_slices: u32,
    pub(super) group_slices: u32,
    pub(super) k_groups: u32,
    pub(super) flags: u32,
    pub(super) ignore: u32,
    pub(super) history_len: u32,
    pub(super) n: u32,
    pub(super) topk_chunks: u32,
    pub(super) topk_tiles_per_chunk: u32,
    pub(super) scale: f32,
}

const _: () = assert!(std::mem::size_of::<Params>() == 33 * 8 + 24 * 4);

// SAFETY: `Params` is `repr(C)` with only u64, u32 and f32 fields, pointers
// first, and no padding (its size is asserted above and in scoring.cuh), so
// its bytes are exactly the `ScoringParams` the kernels take by value.
unsafe impl DeviceRepr for Params {}

/// A data error the scoring kernels reported, decoded from the status word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataError {
    /// `excluded[position]` is >= V.
    Excluded {
        /// The lowest offending position.
        position: u64,
    },
    /// The history offsets do not start at 0, decrease, or do not end at the
    /// number of history ids.
    HistoryOffsets,
    /// `history.ids[position]` is >= V.
    HistoryId {
        /// The lowest offending position.
        position: u64,
    },
    /// `targets[row]` is >= V (`excluded` false) or an excluded item.
    Target {
        /// The lowest offending row.
        row: u64,
        /// Whether the target is excluded (else >= V).
        excluded: bool,
    },
    /// Row `row` has only `available` eligible items, fewer than n.
    TooFew {
        /// The lowest such row.
        row: u64,
        /// Its eligible items.
        available: u64,
    },
}

/// What a status word other than clean means.
pub fn decode_status(code: u64) -> DataError {
    if code >= STATUS_TOO_FEW {
        let rest = code - STATUS_TOO_FEW;
        DataError::TooFew {
            row: rest >> TOO_FEW_ROW_SHIFT,
            available: rest & ((1 << TOO_FEW_ROW_SHIFT) - 1),
        }
    } else if code >= STATUS_TARGET {
        let rest = code - STATUS_TARGET;
        DataError::Target {
            row: rest / 2,
            excluded: rest % 2 == 1,
        }
    } else if code >= STATUS_HISTORY_ID {
        DataError::HistoryId {
            position: code - STATUS_HISTORY_ID,
        }
    } else if code == STATUS_HISTORY_OFFSETS {
        DataError::HistoryOffsets
    } else {
        DataError::Excluded { position: code }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_decode_in_the_cpu_order() {
        assert_eq!(decode_status(3), DataError::Excluded { position: 3 });
        assert_eq!(decode_status(STATUS_HISTORY_OFFSETS), DataError::HistoryOffsets);
        assert_eq!(
            decode_status(STATUS_HISTORY_ID + 9),
            DataError::HistoryId { position: 9 }
        );
        assert_eq!(
            decode_status(STATUS_TARGET + 2 * 5 + 1),
            DataError::Target { row: 5, excluded: true }
        );
        assert_eq!(
            decode_status(STATUS_TOO_FEW + (7 << TOO_FEW_ROW_SHIFT) + 2),
            DataError::TooFew { row: 7, available: 2 }
        );
        // A lower row wins over a higher one whatever the kind.
        const { assert!(STATUS_TARGET + 2 * 3 + 1 < STATUS_TARGET + 2 * 4) };
    }
}
