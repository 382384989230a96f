//! Building blocks the CPU backends share: f32 views of the element types,
//! strided matrix products on the `gemm` crate, a vectorisable e^x and a
//! macro that compiles a loop for the widest SIMD the CPU has.

use crate::dtype::{DType, FloatElement};
use gemm::Parallelism;
use rayon::prelude::*;
use std::borrow::Cow;
use std::mem::MaybeUninit;

/// The values as f32: borrowed when they are f32 already.
pub(crate) fn widened<T: FloatElement>(values: &[T]) -> Cow<'_, [f32]> {
    match bytemuck::try_cast_slice::<T, f32>(values) {
        Ok(same) if T::DTYPE == DType::F32 => Cow::Borrowed(same),
        _ => Cow::Owned(values.par_iter().map(|v| v.to_f32()).collect()),
    }
}

/// Defines `fn $name(args)` as `$body(args)`, run compiled for AVX-512 or
/// AVX2 where the CPU has it, so that the loops in `$body`
/// (`#[inline(always)]`) vectorise 16 or 8 wide rather than 4. `$body` may
/// only use exact IEEE operations (no fused multiply-add), which give the
/// same bits either way.
macro_rules! vectorised {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? = $body:ident;) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f") {
                    #[target_feature(enable = "avx512f")]
                    unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                        $body($($arg),*)
                    }
                    // SAFETY: avx512f only needs a CPU with AVX-512F, checked above.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    #[target_feature(enable = "avx2")]
                    unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                        $body($($arg),*)
                    }
                    // SAFETY: avx2 only needs a CPU with AVX2, checked above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}
pub(crate) use vectorised;

/// `values` as f32: borrowed when they are f32 already, else widened into
/// `buffer`.
pub(crate) fn widened_into<'a, T: FloatElement>(values: &'a [T], buffer: &'a mut Vec<f32>) -> &'a [f32] {
    match bytemuck::try_cast_slice::<T, f32>(values) {
        Ok(same) if T::DTYPE == DType::F32 => same,
        _ => {
            buffer.clear();
            buffer.extend(values.iter().map(|v| v.to_f32()));
            buffer
        }
    }
}

/// A strided f32 matrix: element (i, j) at `i * row_stride + j * col_stride`.
#[derive(Clone, Copy)]
pub(crate) struct Matrix<'a> {
    pub(crate) data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Matrix<'a> {
    pub(crate) fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Matrix {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// Element (i, j) at `i * row_stride + j * col_stride` of `data`.
    pub(crate) fn strided(data: &'a [f32], rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> Self {
        Matrix {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }

    pub(crate) fn transposed(self) -> Self {
        Matrix {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Whether every element lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride < self.data.len()
    }
}

/// `c = a b`, `c` row-major `[a.rows, b.cols]`, on the calling thread.
pub(crate) fn matmul(a: Matrix<'_>, b: Matrix<'_>, c: &mut [f32]) {
    gemm_f32(a, b, c, false);
}

/// `c += a b`, as [`matmul`]: the product summed over its own k first, then
/// added to c.
pub(crate) fn matmul_add(a: Matrix<'_>, b: Matrix<'_>, c: &mut [f32]) {
    gemm_f32(a, b, c, true);
}

/// `c = a b` into uninitialised `c`, every element of which it writes;
/// returns `c` as initialised.
pub(crate) fn matmul_uninit<'c>(a: Matrix<'_>, b: Matrix<'_>, c: &'c mut [MaybeUninit<f32>]) -> &'c mut [f32] {
    if a.cols == 0 {
        c.fill(MaybeUninit::new(0.0));
    } else {
        // SAFETY: with add = false gemm only writes c (every element, k >= 1),
        // never reads it.
        unsafe { gemm_raw(a, b, c.as_mut_ptr().cast(), c.len(), false) };
    }
    // SAFETY: every element was written above.
    unsafe { &mut *(c as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// `c = a b + (c if add)`.
pub(crate) fn gemm_f32(a: Matrix<'_>, b: Matrix<'_>, c: &mut [f32], add: bool) {
    if a.cols == 0 {
        if !add {
            c.fill(0.0);
        }
        return;
    }
    // SAFETY: c is initialised (readable when add) and writable, c.len() long.
    unsafe { gemm_raw(a, b, c.as_mut_ptr(), c.len(), add) }
}

/// `c = a b + (c if add)` for `a.cols >= 1`, `c` row-major `[a.rows, b.cols]`.
///
/// # Safety
/// `c` must be valid for writes of `c_len` f32 and must not overlap `a` or
/// `b`; with `add` its elements must also be initialised.
unsafe fn gemm_raw(a: Matrix<'_>, b: Matrix<'_>, c: *mut f32, c_len: usize, add: bool) {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    // Internal invariants: every caller derives the sizes from checked shapes.
    assert!(k > 0 && b.rows == k && c_len == m * n && a.in_bounds() && b.in_bounds());
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: a and b hold every element the strides address (checked
    // above); c holds m * n elements, does not alias a or b and is
    // initialised when read (add), by the caller's contract: c = add * c + 1 * a b.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            n as isize,
            add,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            f32::from(add),
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

/// e^x in f32 arithmetic, within 2 ulp of the exact value for x in
/// [-87, 88] (x is clamped to that range first, so e^-87 stands in for
/// smaller values and e^88 for larger ones); NaN stays NaN. Plain multiplies
/// and adds with no calls or table lookups, so loops over it vectorise, with
/// the same bits on every machine.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    // x = n ln2 + r with |r| <= ln2 / 2: n rounded by the 1.5 * 2^23 trick,
    // ln2 split in two so n ln2 is exact enough (Cody-Waite), then Cephes'
    // degree-6 polynomial for e^r and 2^n built in the exponent bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    // n + 127 in 1..=254 (x clamped), the biased exponent of 2^n.
    let two_n = f32::from_bits(shifted.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23);
    e_r * two_n
}

/// e^x, exactly 0 below -87 (where [`exp`] would stand in e^-87) so that
/// -inf logits (excluded items, experts, scores) weigh nothing.
#[inline(always)]
pub(crate) fn exp_or_zero(x: f32) -> f32 {
    let e = exp(x);
    if x < -87.0 {
        0.0
    } else {
        e
    }
}
