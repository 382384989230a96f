//! The grouping primitive (DESIGN 2): positions of a key list grouped by key,
//! stably, with integer work only (histogram, exclusive scan, stable
//! placement; digit by digit when the key range is large against the count).
//!
//! The lookup backward groups token positions by id; the routing plan groups
//! dispatched rows by expert. Both backends produce identical integers.

pub(crate) mod cpu;
pub mod cuda;

/// Number of bits needed for keys below `key_bound`.
pub(crate) fn key_bits(key_bound: u64) -> u32 {
    64 - key_bound.saturating_sub(1).leading_zeros()
}
