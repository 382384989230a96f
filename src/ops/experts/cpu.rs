//! The expert layer and combine on the host, on borrowed slices.
//!
//! Products go through `gemm` (cache-blocked, SIMD picked at run time): the
//! forward and dx per (expert, chunk of rows) under rayon, each chunk's rows
//! gathered and widened to f32 first; dW one task per expert, each with
//! gemm's own threads, which split the output and never the sum over rows.
//! Chunks depend on the counts only, so results do not depend on the thread
//! count. The sigmoid's e^x is a polynomial in exact f32 operations (no
//! libm), and the SwiGlu loops are compiled for AVX2 where the CPU has it.

use super::{check_plan, index_slots, Activation, CombineShape, LayerShape, PlanParts, Variant};
use crate::dtype::{DType, FloatElement};
use crate::error::Result;
use crate::ops::check_len;
use gemm::Parallelism;
use rayon::prelude::*;
use std::borrow::Cow;
use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::ops::Range;

/// Rows per task of the forward and dx products: enough for gemm to reach
/// its blocked speed, small enough to spread a few experts over the cores.
const CHUNK_ROWS: usize = 256;

/// The values as f32: borrowed when they are f32 already.
fn widened<T: FloatElement>(values: &[T]) -> Cow<'_, [f32]> {
    match bytemuck::try_cast_slice::<T, f32>(values) {
        Ok(same) if T::DTYPE == DType::F32 => Cow::Borrowed(same),
        _ => Cow::Owned(values.par_iter().map(|v| v.to_f32()).collect()),
    }
}

/// Defines `fn $name(args)` as `$body(args)`, run compiled for AVX2 where
/// the CPU has it, so that the loops in `$body` (`#[inline(always)]`)
/// vectorise 8 wide rather than 4. `$body` may only use exact IEEE
/// operations (no fused multiply-add), which give the same bits either way.
macro_rules! vectorised {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) = $body:ident;) => {
        $(#[$doc])*
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) {
                    $body($($arg),*)
                }
                // SAFETY: avx2 only needs a CPU with AVX2, checked above.
                return unsafe { avx2($($arg),*) };
            }
            $body($($arg),*)
        }
    };
}

vectorised! {
    /// `act[r] = silu(gate[r]) * up[r]` for the rows `[gate | up]` of
    /// `h: [rows, 2 dout]`, `act: [rows, dout]`.
    fn swiglu(h: &[f32], act: &mut [f32], dout: usize) = swiglu_rows;
}

vectorised! {
    /// `dh = [dgate | dup]` from the rows `[gate | up]` of
    /// `h: [rows, 2 dout]` and `dy: [rows, dout]`:
    /// `dgate = dy up silu'(gate)`, `dup = dy silu(gate)`.
    fn swiglu_backward(dy: &[f32], h: &[f32], dh: &mut [MaybeUninit<f32>], dout: usize) = swiglu_backward_rows;
}

#[inline(always)]
fn swiglu_backward_rows(dy: &[f32], h: &[f32], dh: &mut [MaybeUninit<f32>], dout: usize) {
    let rows = dh.chunks_exact_mut(2 * dout).zip(h.chunks_exact(2 * dout));
    for ((dh_row, h_row), dy_row) in rows.zip(dy.chunks_exact(dout)) {
        let (dgate, dup) = dh_row.split_at_mut(dout);
        let (gate, up) = h_row.split_at(dout);
        let columns = dgate.iter_mut().zip(dup).zip(gate.iter().zip(up));
        for (((dg, du), (&g, &u)), &d) in columns.zip(dy_row) {
            let s = sigmoid(g);
            dg.write(d * u * (s * (1.0 + g * (1.0 - s))));
            du.write(d * g * s);
        }
    }
}

#[inline(always)]
fn swiglu_rows(h: &[f32], act: &mut [f32], dout: usize) {
    for (row, act_row) in h.chunks_exact(2 * dout).zip(act.chunks_exact_mut(dout)) {
        let (gate, up) = row.split_at(dout);
        for ((a, &g), &u) in act_row.iter_mut().zip(gate).zip(up) {
            *a = g * sigmoid(g) * u;
        }
    }
}

/// `values` as f32: borrowed when they are f32 already, else widened into
/// `buffer`.
fn widened_into<'a, T: FloatElement>(values: &'a [T], buffer: &'a mut Vec<f32>) -> &'a [f32] {
    match bytemuck::try_cast_slice::<T, f32>(values) {
        Ok(same) if T::DTYPE == DType::F32 => same,
        _ => {
            buffer.clear();
            buffer.extend(values.iter().map(|v| v.to_f32()));
            buffer
        }
    }
}

/// `values` rounded to the element type into `out` (of the same length).
fn narrow<T: FloatElement>(values: &[f32], out: &mut [MaybeUninit<T>]) {
    out.iter_mut().zip(values).for_each(|(o, &v)| {
        o.write(T::from_f32(v));
    });
}

/// A worker's f32 buffers for one chunk task, kept across tasks and calls:
/// fresh ones would fault in new pages for every chunk.
#[derive(Default)]
struct Scratch {
    /// The chunk's rows of x (or of dh).
    rows: Vec<f32>,
    /// Their product with the expert's weights.
    product: Vec<f32>,
    /// The activation's output (SwiGlu).
    act: Vec<f32>,
}

impl Scratch {
    /// Runs `f` on this thread's buffers. `f` must not re-enter, so it must
    /// not wait on rayon work either (a waiting worker runs other tasks).
    fn with<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
        thread_local! {
            static SCRATCH: RefCell<Scratch> = RefCell::default();
        }
        SCRATCH.with(|scratch| f(&mut scratch.borrow_mut()))
    }
}

/// A strided f32 matrix: element (i, j) at `i * row_stride + j * col_stride`.
#[derive(Clone, Copy)]
struct Matrix<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Matrix<'a> {
    fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Matrix {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    fn transposed(self) -> Self {
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

/// `c = a b`, `c` row-major `[a.rows, b.cols]`.
fn matmul(a: Matrix<'_>, b: Matrix<'_>, c: &mut [f32], parallelism: Parallelism) {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    // Internal invariants: every caller derives the sizes from checked shapes.
    assert!(b.rows == k && c.len() == m * n && a.in_bounds() && b.in_bounds());
    if k == 0 {
        c.fill(0.0);
        return;
    }
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: a, b and c hold every element the strides address (checked
    // above); c does not alias a or b (it is a distinct &mut). read_dst is
    // false, so c is only written: c = 1 * a b.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// (expert, rows) of every chunk, in plan order: each expert's rows cut into
/// CHUNK_ROWS pieces.
fn row_chunks(offsets: &[u32]) -> Vec<(usize, Range<usize>)> {
    offsets
        .windows(2)
        .enumerate()
        .flat_map(|(expert, bounds)| {
            let (begin, end) = (bounds[0] as usize, bounds[1] as usize);
            (begin..end)
                .step_by(CHUNK_ROWS)
                .map(move |start| (expert, start..end.min(start + CHUNK_ROWS)))
        })
        .collect()
}

/// `data` ([R, width] row-major) cut into the chunks' rows, which cover
/// 0..R in order.
fn split_rows<'a, V>(mut data: &'a mut [V], width: usize, chunks: &[(usize, Range<usize>)]) -> Vec<&'a mut [V]> {
    chunks
        .iter()
        .map(|(_, rows)| {
            let (head, tail) = std::mem::take(&mut data).split_at_mut(rows.len() * width);
            data = tail;
            head
        })
        .collect()
}

/// x's rows for plan rows `rows`, as f32 `[rows.len(), din]` into `out`:
/// gathered through token_of_row for the tokens variant.
fn gather_rows<T: FloatElement>(
    x: &[T],
    token_of_row: Option<&[u32]>,
    din: usize,
    rows: Range<usize>,
    out: &mut Vec<f32>,
) {
    out.clear();
    for r in rows {
        let source = token_of_row.map_or(r, |tokens| tokens[r] as usize);
        out.extend(x[source * din..][..din].iter().map(|v| v.to_f32()));
    }
}

/// e^x in f32 arithmetic, within 2 ulp of the exact value for x in
/// [-87, 88] (x is clamped to that range first, so e^-87 stands in for
/// smaller values and e^88 for larger ones); NaN stays NaN. Plain multiplies
/// and adds with no calls or table lookups, so loops over it vectorise, with
/// the same bits on every machine.
#[inline(always)]
fn exp(x: f32) -> f32 {
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

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// Phi(x), the standard normal CDF.
fn normal_cdf(x: f32) -> f32 {
    0.5 * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// `h = act(h)` for the element-wise activations, one loop per activation
/// so that each vectorises.
fn activate(activation: Activation, h: &mut [f32]) {
    match activation {
        Activation::Relu => h.iter_mut().for_each(|v| *v = v.max(0.0)),
        Activation::Gelu => h.iter_mut().for_each(|v| *v *= normal_cdf(*v)),
        Activation::Silu => h.iter_mut().for_each(|v| *v *= sigmoid(*v)),
        Activation::None | Activation::SwiGlu => {}
    }
}

/// act'(h); relu'(0) = 0.
fn activate_grad(activation: Activation, h: f32) -> f32 {
    match activation {
        Activation::Relu => f32::from(h > 0.0),
        Activation::Gelu => {
            let pdf = (-0.5 * h * h).exp() * (0.5 * std::f32::consts::FRAC_2_SQRT_PI * std::f32::consts::FRAC_1_SQRT_2);
            normal_cdf(h) + h * pdf
        }
        Activation::Silu => {
            let s = sigmoid(h);
            s * (1.0 + h * (1.0 - s))
        }
        Activation::None | Activation::SwiGlu => 1.0,
    }
}

fn check_layer_lens<T>(x: &[T], plan: &PlanParts<&[u32]>, weights: &[T], shape: &LayerShape) -> Result<()> {
    check_len("x", x.len(), shape.inputs * shape.din)?;
    check_len("weights", weights.len(), shape.experts * shape.din * shape.width())?;
    check_len("plan.counts", plan.counts.len(), shape.experts)?;
    check_plan(plan, shape.rows, shape.tokens())
}

fn token_of_row<'a>(plan: &PlanParts<&'a [u32]>, shape: &LayerShape) -> Option<&'a [u32]> {
    (shape.variant == Variant::Tokens).then_some(plan.token_of_row)
}

/// `h = x[token_of_row] W[e] + b[e]`, `y = act(h)` (y from the unrounded h).
/// `x` is `[T, Din]` (or `[R, Din]` for the rows variant), `weights`
/// `[E, Din, Dout']`, `bias` `[E, Dout']`, `h` `[R, Dout']`, `y` `[R, Dout]`.
pub fn layer_forward<T: FloatElement>(
    x: &[T],
    plan: &PlanParts<&[u32]>,
    weights: &[T],
    bias: Option<&[T]>,
    shape: &LayerShape,
    h: &mut [T],
    y: &mut [T],
) -> Result<()> {
    // SAFETY: MaybeUninit<T> has T's layout, and layer_forward_uninit only
    // writes initialised values, so h and y stay valid.
    let (h, y) = unsafe {
        (
            &mut *(h as *mut [T] as *mut [MaybeUninit<T>]),
            &mut *(y as *mut [T] as *mut [MaybeUninit<T>]),
        )
    };
    layer_forward_uninit(x, plan, weights, bias, shape, h, y)
}

/// [`layer_forward`] into uninitialised `h` and `y`, every element of which
/// it writes when it returns `Ok` (so the op API need not zero them first).
pub(crate) fn layer_forward_uninit<T: FloatElement>(
    x: &[T],
    plan: &PlanParts<&[u32]>,
    weights: &[T],
    bias: Option<&[T]>,
    shape: &LayerShape,
    h: &mut [MaybeUninit<T>],
    y: &mut [MaybeUninit<T>],
) -> Result<()> {
    let (din, dout, width) = (shape.din, shape.dout, shape.width());
    check_layer_lens(x, plan, weights, shape)?;
    if let Some(bias) = bias {
        check_len("bias", bias.len(), shape.experts * width)?;
    }
    check_len("h", h.len(), shape.rows * width)?;
    check_len("y", y.len(), shape.rows * dout)?;
    let weights = widened(weights);
    let bias = bias.map(widened);
    let sources = token_of_row(plan, shape);
    // The chunks cover rows 0..R (check_plan), so every element is written.
    let chunks = row_chunks(plan.offsets);
    let outputs = split_rows(h, width, &chunks)
        .into_iter()
        .zip(split_rows(y, dout, &chunks));
    chunks
        .par_iter()
        .zip(outputs.collect::<Vec<_>>())
        .for_each(|((expert, rows), (h_chunk, y_chunk))| {
            Scratch::with(|Scratch { rows: a, product, act }| {
                gather_rows(x, sources, din, rows.clone(), a);
                let w = &weights[expert * din * width..][..din * width];
                product.resize(rows.len() * width, 0.0);
                matmul(
                    Matrix::row_major(a, rows.len(), din),
                    Matrix::row_major(w, din, width),
                    product,
                    Parallelism::None,
                );
                if let Some(bias) = &bias {
                    let bias = &bias[expert * width..][..width];
                    for row in product.chunks_exact_mut(width) {
                        row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
                    }
                }
                narrow(product, h_chunk);
                if shape.activation == Activation::SwiGlu {
                    act.resize(rows.len() * dout, 0.0);
                    swiglu(product, act, dout);
                    narrow(act, y_chunk);
                } else {
                    activate(shape.activation, product);
                    narrow(product, y_chunk);
                }
            })
        });
    Ok(())
}

/// `dh = dy * act'(h)` `[R, Dout']` f32 at the saved h, in blocks of
/// CHUNK_ROWS rows.
fn activation_backward<T: FloatElement>(dy: &[f32], h: &[T], shape: &LayerShape) -> Vec<f32> {
    let (dout, width) = (shape.dout, shape.width());
    let mut dh = Vec::with_capacity(h.len());
    dh.spare_capacity_mut()[..h.len()]
        .par_chunks_mut(CHUNK_ROWS * width)
        .zip(h.par_chunks(CHUNK_ROWS * width))
        .zip(dy.par_chunks(CHUNK_ROWS * dout))
        .for_each(|((dh_block, h_block), dy_block)| {
            Scratch::with(|scratch| {
                let h_block = widened_into(h_block, &mut scratch.rows);
                if shape.activation == Activation::SwiGlu {
                    swiglu_backward(dy_block, h_block, dh_block, dout);
                } else {
                    for ((d, &g), &v) in dh_block.iter_mut().zip(dy_block).zip(h_block) {
                        d.write(g * activate_grad(shape.activation, v));
                    }
                }
            })
        });
    // SAFETY: the blocks cover all h.len() elements, and each was written.
    unsafe { dh.set_len(h.len()) };
    dh
}

/// The layer's gradients: `dx` `[T, Din]` (tokens variant: each token's rows
/// summed in slot order through `row_of_slot [T, k]`) or `[R, Din]` (rows
/// variant), `dweights` `[E, Din, Dout']`, `dbias` `[E, Dout']`, all f32;
/// `dy` is `[R, Dout]`, `h` the forward's `[R, Dout']`.
#[allow(clippy::too_many_arguments)]
pub fn layer_backward<T: FloatElement>(
    dy: &[f32],
    x: &[T],
    plan: &PlanParts<&[u32]>,
    weights: &[T],
    h: &[T],
    shape: &LayerShape,
    k: usize,
    dx: &mut [f32],
    dweights: &mut [f32],
    dbias: Option<&mut [f32]>,
) -> Result<()> {
    let (din, width, rows) = (shape.din, shape.width(), shape.rows);
    check_layer_lens(x, plan, weights, shape)?;
    check_len("dy", dy.len(), rows * shape.dout)?;
    check_len("h", h.len(), rows * width)?;
    check_len("dx", dx.len(), shape.inputs * din)?;
    check_len("dweights", dweights.len(), weights.len())?;
    if let Some(tokens) = shape.tokens() {
        check_len("plan.row_of_slot", plan.row_of_slot.len(), tokens * k)?;
        index_slots(plan, k, rows)?;
    }
    let dh = activation_backward(dy, h, shape);
    let weights = widened(weights);
    let chunks = row_chunks(plan.offsets);

    // dx_rows[r] = dh[r] W[e]^T; the rows variant writes dx directly.
    let mut dx_rows = match shape.variant {
        Variant::Tokens => vec![0f32; rows * din],
        Variant::Rows => Vec::new(),
    };
    let dx_rows_out = if shape.variant == Variant::Tokens {
        &mut dx_rows[..]
    } else {
        &mut *dx
    };
    let targets = split_rows(dx_rows_out, din, &chunks);
    chunks.par_iter().zip(targets).for_each(|((expert, range), target)| {
        let w = &weights[expert * din * width..][..din * width];
        matmul(
            Matrix::row_major(&dh[range.start * width..range.end * width], range.len(), width),
            Matrix::row_major(w, din, width).transposed(),
            target,
            Parallelism::None,
        );
    });
    if shape.variant == Variant::Tokens {
        dx.par_chunks_mut(din)
            .zip(plan.row_of_slot.par_chunks(k.max(1)))
            .for_each(|(dx_token, slots)| {
                dx_token.fill(0.0);
                for &row in slots.iter().filter(|&&row| row != u32::MAX) {
                    dx_token
                        .iter_mut()
                        .zip(&dx_rows[row as usize * din..][..din])
                        .for_each(|(d, v)| *d += v);
                }
            });
    }

    // dW[e] = x_e^T dh_e, one task per expert: gemm sums the rows in order
    // and threads over the [Din, Dout'] output.
    let sources = token_of_row(plan, shape);
    dweights
        .par_chunks_mut(din * width)
        .zip(plan.offsets.par_windows(2))
        .for_each(|(target, bounds)| {
            let range = bounds[0] as usize..bounds[1] as usize;
            let mut a = Vec::new();
            gather_rows(x, sources, din, range.clone(), &mut a);
            matmul(
                Matrix::row_major(&a, range.len(), din).transposed(),
                Matrix::row_major(&dh[range.start * width..range.end * width], range.len(), width),
                target,
                Parallelism::Rayon(0),
            );
        });
    if let Some(dbias) = dbias {
        check_len("dbias", dbias.len(), shape.experts * width)?;
        dbias
            .par_chunks_mut(width)
            .zip(plan.offsets.par_windows(2))
            .for_each(|(db, bounds)| {
                db.fill(0.0);
                for dh_row in dh[bounds[0] as usize * width..bounds[1] as usize * width].chunks(width) {
                    db.iter_mut().zip(dh_row).for_each(|(d, v)| *d += v);
                }
            });
    }
    Ok(())
}

fn check_combine_lens<T>(
    y: &[T],
    weights: &[f32],
    plan: &PlanParts<&[u32]>,
    res: Option<&[T]>,
    rho: Option<&[f32]>,
    shape: &CombineShape,
) -> Result<Vec<u32>> {
    check_len("y", y.len(), shape.rows * shape.dout)?;
    check_len("weights", weights.len(), shape.tokens * shape.k)?;
    check_len("plan.counts", plan.counts.len(), shape.experts)?;
    check_len("plan.row_of_slot", plan.row_of_slot.len(), shape.tokens * shape.k)?;
    if let Some(res) = res {
        check_len("res", res.len(), shape.tokens * shape.dout)?;
    }
    match rho {
        Some(rho) if res.is_none() || rho.len() != shape.tokens => Err(crate::error::Error::invalid(
            "rho",
            format!("expected [{}] f32 with res, got {} elements", shape.tokens, rho.len()),
        )),
        _ => {
            check_plan(plan, shape.rows, Some(shape.tokens))?;
            index_slots(plan, shape.k, shape.rows)
        }
    }
}

/// `<a, b>` in f32.
fn dot(a: &[f32], b: impl Iterator<Item = f32>) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `out[t] = rho[t] res[t] + sum_j weights[t, j] y[row_of_slot[t, j]]` (slots
/// in order) and `util[e] = sum over e's rows of |w| ||y[r]||_2` (rows in plan
/// order). `y` is `[R, Dout]`, `weights` `[T, k]`, `res` and `out` `[T, Dout]`,
/// `rho` `[T]`, `util` `[E]`.
#[allow(clippy::too_many_arguments)]
pub fn combine<T: FloatElement>(
    y: &[T],
    weights: &[f32],
    plan: &PlanParts<&[u32]>,
    res: Option<&[T]>,
    rho: Option<&[f32]>,
    shape: &CombineShape,
    out: &mut [T],
    util: &mut [f32],
) -> Result<()> {
    let slot_of_row = check_combine_lens(y, weights, plan, res, rho, shape)?;
    let CombineShape { k, dout, .. } = *shape;
    check_len("out", out.len(), shape.tokens * dout)?;
    check_len("util", util.len(), shape.experts)?;
    out.par_chunks_mut(dout).enumerate().for_each(|(t, out_row)| {
        let mut acc = vec![0f32; dout];
        if let Some(res) = res {
            let scale = rho.map_or(1.0, |rho| rho[t]);
            acc.iter_mut()
                .zip(&res[t * dout..][..dout])
                .for_each(|(a, r)| *a = scale * r.to_f32());
        }
        for j in 0..k {
            let row = plan.row_of_slot[t * k + j];
            if row == u32::MAX {
                continue;
            }
            let w = weights[t * k + j];
            acc.iter_mut()
                .zip(&y[row as usize * dout..][..dout])
                .for_each(|(a, v)| *a += w * v.to_f32());
        }
        out_row.iter_mut().zip(&acc).for_each(|(o, &a)| *o = T::from_f32(a));
    });
    let norms: Vec<f32> = y
        .par_chunks(dout)
        .zip(slot_of_row.par_iter())
        .map(|(row, &slot)| {
            weights[slot as usize].abs() * row.iter().map(|v| v.to_f32() * v.to_f32()).sum::<f32>().sqrt()
        })
        .collect();
    for (u, bounds) in util.iter_mut().zip(plan.offsets.windows(2)) {
        *u = norms[bounds[0] as usize..bounds[1] as usize].iter().sum();
    }
    Ok(())
}

/// The gradients of [`combine`] from `dout [T, Dout]`: `dy [R, Dout]`,
/// `dweights [T, k]` (0 for empty slots), `dres [T, Dout]` (with res),
/// `drho [T]` (with rho), all f32.
#[allow(clippy::too_many_arguments)]
pub fn combine_backward<T: FloatElement>(
    dout: &[f32],
    y: &[T],
    weights: &[f32],
    plan: &PlanParts<&[u32]>,
    res: Option<&[T]>,
    rho: Option<&[f32]>,
    shape: &CombineShape,
    dy: &mut [f32],
    dweights: &mut [f32],
    dres: Option<&mut [f32]>,
    drho: Option<&mut [f32]>,
) -> Result<()> {
    let slot_of_row = check_combine_lens(y, weights, plan, res, rho, shape)?;
    let CombineShape { k, dout: width, .. } = *shape;
    check_len("dout", dout.len(), shape.tokens * width)?;
    check_len("dy", dy.len(), shape.rows * width)?;
    check_len("dweights", dweights.len(), shape.tokens * k)?;
    dy.par_chunks_mut(width)
        .zip(slot_of_row.par_iter())
        .for_each(|(dy_row, &slot)| {
            let (w, t) = (weights[slot as usize], slot as usize / k);
            dy_row
                .iter_mut()
                .zip(&dout[t * width..][..width])
                .for_each(|(d, g)| *d = w * g);
        });
    dweights.par_iter_mut().enumerate().for_each(|(slot, dw)| {
        let row = plan.row_of_slot[slot];
        *dw = if row == u32::MAX {
            0.0
        } else {
            let y_row = y[row as usize * width..][..width].iter().map(|v| v.to_f32());
            dot(&dout[slot / k * width..][..width], y_row)
        };
    });
    if let (Some(dres), Some(res)) = (dres, res) {
        check_len("dres", dres.len(), shape.tokens * width)?;
        dres.par_chunks_mut(width).enumerate().for_each(|(t, dres_row)| {
            let scale = rho.map_or(1.0, |rho| rho[t]);
            dres_row
                .iter_mut()
                .zip(&dout[t * width..][..width])
                .for_each(|(d, g)| *d = scale * g);
        });
        if let Some(drho) = drho {
            check_len("drho", drho.len(), shape.tokens)?;
            drho.par_iter_mut().enumerate().for_each(|(t, d)| {
                *d = dot(
                    &dout[t * width..][..width],
                    res[t * width..][..width].iter().map(|v| v.to_f32()),
                );
            });
        }
    }
    Ok(())
}
