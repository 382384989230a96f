//! Keeping freed tensor memory in the process between training steps.
//!
//! A CPU training step allocates and frees the same tensors every step (a few
//! MB to tens of MB each, FAME's attention weights ~40 MB). glibc serves
//! blocks above its mmap threshold (128 KiB at start, raised as blocks are
//! freed, never above 32 MiB) with fresh `mmap`s and returns them on free, and
//! trims the heap top above 128 KiB, so every step faults in and zeroes its
//! memory again: a third of a FAME step and an eighth of a SASRec step on the
//! CPU here. [`keep_freed_memory`] raises both limits once at start-up.

/// Raises glibc's mmap threshold to its maximum (32 MiB), its trim threshold
/// to 1 GiB and its top pad (the heap grows by at least this much) to
/// 256 MiB, so the blocks a training step frees are reused by the
/// next step instead of being unmapped and faulted in again. The process's
/// peak memory is unchanged; up to 1 GiB of freed memory may stay resident
/// after the peak. Returns whether all three settings were accepted (always false
/// off glibc, where it does nothing).
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_TOP_PAD: i32 = -2;
        const M_MMAP_THRESHOLD: i32 = -3;
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        // SAFETY: mallopt is glibc's (this cfg), takes two ints and only
        // changes allocator parameters; it returns 0 for a rejected value.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 32 << 20) != 0
                && mallopt(M_TRIM_THRESHOLD, 1 << 30) != 0
                && mallopt(M_TOP_PAD, 256 << 20) != 0
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn glibc_accepts_the_settings() {
        assert_eq!(
            super::keep_freed_memory(),
            cfg!(all(target_os = "linux", target_env = "gnu"))
        );
    }
}
