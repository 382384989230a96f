//! The expert layer and combine on the host, on borrowed slices.
//!
//! Products go through `gemm` (cache-blocked, SIMD picked at run time) on
//! (expert, chunk of rows) pieces under rayon, each chunk's rows gathered and
//! widened to f32 first. The backward's tasks are groups of an expert's
//! chunks, each taking them through dh, dx and its own sums for dW and db,
//! which are added up in group order afterwards: the rows, not the E experts,
//! spread the work over the cores. Chunks and groups depend on the counts and
//! Din only, so results do not depend on the thread count. The sigmoid's e^x
//! is a polynomial in exact f32 operations (no libm), and the SwiGlu loops
//! are compiled for the widest SIMD the CPU has (`host::vectorised`).

use super::{check_plan, index_slots, Activation, CombineShape, LayerShape, PlanParts, Variant};
use crate::dtype::{DType, FloatElement};
use crate::error::Result;
use crate::ops::check_len;
use crate::ops::host::{exp, matmul, matmul_add, matmul_uninit, vectorised, widened, widened_into, Matrix};
use rayon::prelude::*;
use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::mem::MaybeUninit;
use std::ops::Range;

/// Rows per task of the forward and dx products: enough for gemm to reach
/// its blocked speed, small enough to spread a few experts over the cores.
const CHUNK_ROWS: usize = 256;

vectorised! {
    /// `act[r] = silu(gate[r]) * up[r]` for the rows `[gate | up]` of
    /// `h: [rows, 2 dout]`, `act: [rows, dout]`.
    fn swiglu(h: &[f32], act: &mut [f32], dout: usize) = swiglu_rows;
}

vectorised! {
    /// `dh = [dgate | dup]` from the rows `[gate | up]` of
    /// `h: [rows, 2 dout]` and `dy: [rows, dout]`:
    /// `dgate = dy up silu'(gate)`, `dup = dy silu(gate)`.
    fn swiglu_backward(dy: &[f32], h: &[f32], dh: &mut [f32], dout: usize) = swiglu_backward_rows;
}

#[inline(always)]
fn swiglu_backward_rows(dy: &[f32], h: &[f32], dh: &mut [f32], dout: usize) {
    let rows = dh.chunks_exact_mut(2 * dout).zip(h.chunks_exact(2 * dout));
    for ((dh_row, h_row), dy_row) in rows.zip(dy.chunks_exact(dout)) {
        let (dgate, dup) = dh_row.split_at_mut(dout);
        let (gate, up) = h_row.split_at(dout);
        let columns = dgate.iter_mut().zip(dup).zip(gate.iter().zip(up));
        for (((dg, du), (&g, &u)), &d) in columns.zip(dy_row) {
            let (silu, grad) = silu_and_grad(g);
            *dg = d * u * grad;
            *du = d * silu;
        }
    }
}

#[inline(always)]
fn swiglu_rows(h: &[f32], act: &mut [f32], dout: usize) {
    for (row, act_row) in h.chunks_exact(2 * dout).zip(act.chunks_exact_mut(dout)) {
        let (gate, up) = row.split_at(dout);
        for ((a, &g), &u) in act_row.iter_mut().zip(gate).zip(up) {
            *a = silu(g) * u;
        }
    }
}

/// `values` rounded to the element type into `out` (of the same length).
fn narrow<T: FloatElement>(values: &[f32], out: &mut [MaybeUninit<T>]) {
    narrow_map(values, out, |v| v);
}

/// `f(values)` rounded to the element type into `out` (of the same length).
#[inline(always)]
fn narrow_map<T: FloatElement>(values: &[f32], out: &mut [MaybeUninit<T>], f: impl Fn(f32) -> f32) {
    out.iter_mut().zip(values).for_each(|(o, &v)| {
        o.write(T::from_f32(f(v)));
    });
}

/// `out` as f32 when T is f32 (the element types are sealed: f32 is the
/// only one with that tag).
fn as_f32_uninit<T: FloatElement>(out: &mut [MaybeUninit<T>]) -> Option<&mut [MaybeUninit<f32>]> {
    // SAFETY: T is f32 here, so the two slices have the same layout.
    (T::DTYPE == DType::F32).then(|| unsafe { &mut *(out as *mut [MaybeUninit<T>] as *mut [MaybeUninit<f32>]) })
}

/// A worker's f32 buffers for one chunk task, kept across tasks and calls:
/// fresh ones would fault in new pages for every chunk.
#[derive(Default)]
struct Scratch {
    /// The chunk's rows of x.
    rows: Vec<f32>,
    /// Their product with the expert's weights (forward).
    product: Vec<f32>,
    /// The activation's output (SwiGlu forward).
    act: Vec<f32>,
    /// The chunk's rows of h widened to f32 (backward, other types than f32).
    h: Vec<f32>,
    /// The chunk's rows of dh (backward).
    dh: Vec<f32>,
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
        .map(|(_, rows)| take_front(&mut data, rows.len() * width))
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

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

// The activations at +-inf are their limits (x -> +inf: act = +inf and
// act' = 1; x -> -inf: act = act' = 0), on both backends; the formulas
// alone would give inf * 0 = NaN there.

/// `x sigmoid(x)`.
#[inline(always)]
fn silu(x: f32) -> f32 {
    if x.is_infinite() {
        x.max(0.0)
    } else {
        x * sigmoid(x)
    }
}

/// `silu'(x) = s (1 + x (1 - s))`, s = sigmoid(x).
#[inline(always)]
fn silu_grad(x: f32) -> f32 {
    silu_and_grad(x).1
}

/// `(silu(x), silu'(x))` from one sigmoid, with the same bits as the two
/// functions.
#[inline(always)]
fn silu_and_grad(x: f32) -> (f32, f32) {
    if x.is_infinite() {
        (x.max(0.0), f32::from(x > 0.0))
    } else {
        let s = sigmoid(x);
        (x * s, s * (1.0 + x * (1.0 - s)))
    }
}

/// `x Phi(x)`, exact (erf).
fn gelu(x: f32) -> f32 {
    if x.is_infinite() {
        x.max(0.0)
    } else {
        x * normal_cdf(x)
    }
}

/// Phi(x), the standard normal CDF.
fn normal_cdf(x: f32) -> f32 {
    0.5 * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// `y = act(h)` in the element type for the element-wise activations, one
/// loop per activation so that each vectorises.
fn activate_into<T: FloatElement>(activation: Activation, h: &[f32], y: &mut [MaybeUninit<T>]) {
    match activation {
        Activation::Relu => narrow_map(h, y, |v| v.max(0.0)),
        Activation::Gelu => narrow_map(h, y, gelu),
        Activation::Silu => narrow_map(h, y, silu),
        Activation::None | Activation::SwiGlu => narrow(h, y),
    }
}

/// act'(h); relu'(0) = 0.
fn activate_grad(activation: Activation, h: f32) -> f32 {
    match activation {
        Activation::Relu => f32::from(h > 0.0),
        Activation::Gelu if h.is_infinite() => f32::from(h > 0.0),
        Activation::Gelu => {
            let pdf = (-0.5 * h * h).exp() * (0.5 * std::f32::consts::FRAC_2_SQRT_PI * std::f32::consts::FRAC_1_SQRT_2);
            normal_cdf(h) + h * pdf
        }
        Activation::Silu => silu_grad(h),
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
    let x_f32 = f32_rows(x, shape);
    // The chunks cover rows 0..R (check_plan), so every element is written.
    let chunks = row_chunks(plan.offsets);
    let outputs = split_rows(h, width, &chunks)
        .into_iter()
        .zip(split_rows(y, dout, &chunks));
    chunks
        .par_iter()
        .zip(outputs.collect::<Vec<_>>())
        .for_each(|((expert, rows), (h_chunk, y_chunk))| {
            Scratch::with(|scratch| {
                let (gathered, product, act) = (&mut scratch.rows, &mut scratch.product, &mut scratch.act);
                let a = rows_of(x, x_f32.as_deref(), sources, din, rows.clone(), gathered);
                let a = Matrix::row_major(a, rows.len(), din);
                let w = Matrix::row_major(&weights[expert * din * width..][..din * width], din, width);
                // f32 h takes the product in place; other types round it
                // into h after the bias (y comes from the unrounded h).
                let (h_f32, rounded) = match as_f32_uninit(h_chunk) {
                    Some(h_f32) => (matmul_uninit(a, w, h_f32), None),
                    None => {
                        product.resize(rows.len() * width, 0.0);
                        matmul(a, w, product);
                        (&mut product[..], Some(h_chunk))
                    }
                };
                if let Some(bias) = &bias {
                    let bias = &bias[expert * width..][..width];
                    for row in h_f32.chunks_exact_mut(width) {
                        row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
                    }
                }
                if let Some(h_chunk) = rounded {
                    narrow(h_f32, h_chunk);
                }
                if shape.activation == Activation::SwiGlu {
                    act.resize(rows.len() * dout, 0.0);
                    swiglu(h_f32, act, dout);
                    narrow(act, y_chunk);
                } else {
                    activate_into(shape.activation, h_f32, y_chunk);
                }
            })
        });
    Ok(())
}

/// x as f32 where its rows can be read in place: borrowed when f32; for the
/// rows variant of other types widened once rather than chunk by chunk;
/// None otherwise (the tokens variant gathers and widens each chunk).
fn f32_rows<'a, T: FloatElement>(x: &'a [T], shape: &LayerShape) -> Option<Cow<'a, [f32]>> {
    (T::DTYPE == DType::F32 || shape.variant == Variant::Rows).then(|| widened(x))
}

/// x's rows for plan rows `rows` (non-empty) as f32 `[rows.len(), din]`:
/// read in place from `x_f32` (see [`f32_rows`]) when they are consecutive
/// rows of x (the rows variant, or consecutive tokens, as every expert's
/// rows of a dense plan are), else gathered into `buffer`.
fn rows_of<'a, T: FloatElement>(
    x: &[T],
    x_f32: Option<&'a [f32]>,
    sources: Option<&[u32]>,
    din: usize,
    rows: Range<usize>,
    buffer: &'a mut Vec<f32>,
) -> &'a [f32] {
    let first = match sources {
        None => Some(rows.start),
        Some(tokens) => {
            let tokens = &tokens[rows.clone()];
            let first = tokens[0] as usize;
            let consecutive = tokens.iter().zip(first..).all(|(&t, expected)| t as usize == expected);
            consecutive.then_some(first)
        }
    };
    match (x_f32, first) {
        // The plan's tokens are < T (check_plan), so the run lies in x.
        (Some(x_f32), Some(first)) => &x_f32[first * din..][..rows.len() * din],
        _ => {
            gather_rows(x, sources, din, rows, buffer);
            buffer
        }
    }
}

/// `dh = dy * act'(h)` for rows of `h: [rows, Dout']` f32 and
/// `dy: [rows, Dout]`, one loop per activation so that each vectorises.
fn activation_backward(activation: Activation, dy: &[f32], h: &[f32], dh: &mut [f32], dout: usize) {
    #[inline(always)]
    fn times_grad(dy: &[f32], h: &[f32], dh: &mut [f32], grad: impl Fn(f32) -> f32) {
        for ((d, &g), &v) in dh.iter_mut().zip(dy).zip(h) {
            *d = g * grad(v);
        }
    }
    match activation {
        Activation::SwiGlu => swiglu_backward(dy, h, dh, dout),
        Activation::None => times_grad(dy, h, dh, |v| activate_grad(Activation::None, v)),
        Activation::Relu => times_grad(dy, h, dh, |v| activate_grad(Activation::Relu, v)),
        Activation::Gelu => times_grad(dy, h, dh, |v| activate_grad(Activation::Gelu, v)),
        Activation::Silu => times_grad(dy, h, dh, |v| activate_grad(Activation::Silu, v)),
    }
}

/// About how many tasks the backward cuts the rows into: a constant, as
/// the results may not depend on the thread count, enough to keep a few
/// dozen cores busy whatever E is, and few enough that the partial dW sums
/// they add stay small next to the products.
const BACKWARD_TASKS: usize = 32;

/// Elements per task when the partial dW sums are added up.
const REDUCE_BLOCK: usize = 4096;

/// Each expert's rows (plan order) as the backward's groups, in order: runs
/// of whole CHUNK_ROWS chunks, about `BACKWARD_TASKS * rows_e / R` of them
/// (at least one per expert with rows), but no more than `rows_e / Din`, so
/// that the partial dW sums (`[Din, Dout']` per group after the first) take
/// less memory than the expert's dh would. A function of the counts and Din
/// only.
fn row_groups(offsets: &[u32], din: usize) -> Vec<Vec<Range<usize>>> {
    let total_rows = offsets.last().map_or(0, |&r| r as usize).max(1);
    offsets
        .windows(2)
        .map(|bounds| {
            let rows = bounds[0] as usize..bounds[1] as usize;
            let chunks = rows.len().div_ceil(CHUNK_ROWS);
            let groups = (rows.len() * BACKWARD_TASKS)
                .div_ceil(total_rows)
                .min(rows.len() / din)
                .max(1)
                .min(chunks);
            let row_of_chunk = |chunk: usize| rows.end.min(rows.start + chunk * CHUNK_ROWS);
            (0..groups)
                .map(|group| row_of_chunk(chunks * group / groups)..row_of_chunk(chunks * (group + 1) / groups))
                .collect()
        })
        .collect()
}

/// The first `len` elements of `rest`, which keeps the others.
fn take_front<'a, V>(rest: &mut &'a mut [V], len: usize) -> &'a mut [V] {
    let (front, back) = std::mem::take(rest).split_at_mut(len);
    *rest = back;
    front
}

/// `buffer[..len]`, grown (with zeros) as needed; what it held is left.
fn at_least(buffer: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buffer.capacity() < len {
        // A fresh zeroed allocation, rather than a copy of the old contents.
        *buffer = vec![0.0; len];
    } else if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
    &mut buffer[..len]
}

/// The backward's buffers shared by all its tasks, kept by the calling
/// thread across calls: fresh ones fault in new pages on every call, which
/// at Din = 64 costs about as much as the products. A call takes them out
/// of the thread-local (a nested call on the same thread, e.g. by a rayon
/// worker waiting for this call's tasks, finds none and allocates its own)
/// and puts them back unless they outgrew RETAINED_BYTES.
#[derive(Default)]
struct BackwardBuffers {
    /// `dh W^T` per row (tokens variant), summed into dx in slot order.
    dx_rows: Vec<f32>,
    /// `[Din, Dout']` sums of each expert's groups after its first.
    weight_partials: Vec<f32>,
    /// `[Dout']` sums of each expert's groups after its first.
    bias_partials: Vec<f32>,
}

/// The most [`BackwardBuffers`] a thread keeps between calls.
const RETAINED_BYTES: usize = 256 << 20;

thread_local! {
    static BACKWARD_BUFFERS: Cell<BackwardBuffers> = Cell::default();
}

impl BackwardBuffers {
    fn take() -> Self {
        BACKWARD_BUFFERS.with(Cell::take)
    }

    fn keep(self) {
        let elements = self.dx_rows.capacity() + self.weight_partials.capacity() + self.bias_partials.capacity();
        if elements * std::mem::size_of::<f32>() <= RETAINED_BYTES {
            BACKWARD_BUFFERS.with(|buffers| buffers.set(self));
        }
    }
}

/// One task of the backward: a group of one expert's rows and where its
/// results go.
struct GroupTask<'a> {
    expert: usize,
    rows: Range<usize>,
    /// `dh W^T` for the group's rows: dx itself in the rows variant.
    dx_rows: &'a mut [f32],
    /// The group's `x^T dh`: `dW[e]` for the expert's first group, else a
    /// partial sum added to it afterwards.
    dweights: &'a mut [f32],
    /// The group's sum of dh rows, placed like `dweights`.
    dbias: Option<&'a mut [f32]>,
}

/// One group of the backward, CHUNK_ROWS rows at a time so that dh, x's rows
/// and the products stay in cache: dh, then its rows' `dh W^T`, and the sums
/// `x^T dh` and `sum dh` over the group's rows, chunks in order.
#[allow(clippy::too_many_arguments)]
fn backward_group<T: FloatElement>(
    task: GroupTask<'_>,
    dy: &[f32],
    x: &[T],
    sources: Option<&[u32]>,
    x_f32: Option<&[f32]>,
    expert_weights: &[f32],
    h: &[T],
    shape: &LayerShape,
    scratch: &mut Scratch,
) {
    let (din, dout, width) = (shape.din, shape.dout, shape.width());
    let (gathered, h_rows, dh_buffer) = (&mut scratch.rows, &mut scratch.h, &mut scratch.dh);
    let GroupTask {
        rows: group,
        mut dx_rows,
        dweights,
        mut dbias,
        ..
    } = task;
    let weights_t = Matrix::row_major(expert_weights, din, width).transposed();
    for (index, start) in group.clone().step_by(CHUNK_ROWS).enumerate() {
        let chunk = start..group.end.min(start + CHUNK_ROWS);
        let dy_chunk = &dy[chunk.start * dout..chunk.end * dout];
        // Without an activation dh is dy (act' = 1): read in place.
        let dh = if shape.activation == Activation::None {
            dy_chunk
        } else {
            let h_chunk = widened_into(&h[chunk.start * width..chunk.end * width], h_rows);
            dh_buffer.resize(chunk.len() * width, 0.0);
            activation_backward(shape.activation, dy_chunk, h_chunk, dh_buffer, dout);
            &dh_buffer[..]
        };
        let dh = Matrix::row_major(dh, chunk.len(), width);
        matmul(dh, weights_t, take_front(&mut dx_rows, chunk.len() * din));
        let x_rows = rows_of(x, x_f32, sources, din, chunk.clone(), gathered);
        let x_t = Matrix::row_major(x_rows, chunk.len(), din).transposed();
        if index == 0 {
            matmul(x_t, dh, dweights);
        } else {
            matmul_add(x_t, dh, dweights);
        }
        if let Some(db) = dbias.as_deref_mut() {
            if index == 0 {
                db.fill(0.0);
            }
            for dh_row in dh.data.chunks_exact(width) {
                db.iter_mut().zip(dh_row).for_each(|(d, v)| *d += v);
            }
        }
    }
}

/// The layer's gradients: `dx` `[T, Din]` (tokens variant: each token's rows
/// summed in slot order through `row_of_slot [T, k]`) or `[R, Din]` (rows
/// variant), `dweights` `[E, Din, Dout']`, `dbias` `[E, Dout']`, all f32;
/// `dy` is `[R, Dout]`, `h` the forward's `[R, Dout']`.
///
/// Each task takes a group of an expert's rows (see [`row_groups`]) through
/// dh, dx and its own dW and db sums; an expert's groups after the first
/// sum into partials added to its dW and db afterwards, in group order.
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
    mut dbias: Option<&mut [f32]>,
) -> Result<()> {
    let (din, width, rows) = (shape.din, shape.width(), shape.rows);
    let weight_len = din * width;
    check_layer_lens(x, plan, weights, shape)?;
    check_len("dy", dy.len(), rows * shape.dout)?;
    check_len("h", h.len(), rows * width)?;
    check_len("dx", dx.len(), shape.inputs * din)?;
    check_len("dweights", dweights.len(), weights.len())?;
    if let Some(dbias) = dbias.as_deref() {
        check_len("dbias", dbias.len(), shape.experts * width)?;
    }
    if let Some(tokens) = shape.tokens() {
        check_len("plan.row_of_slot", plan.row_of_slot.len(), tokens * k)?;
        index_slots(plan, k, rows)?;
    }
    let weights = widened(weights);
    let sources = token_of_row(plan, shape);
    let x_f32 = f32_rows(x, shape);
    let groups = row_groups(plan.offsets, din);
    let partial_count: usize = groups.iter().map(|g| g.len().saturating_sub(1)).sum();

    let mut buffers = BackwardBuffers::take();
    let BackwardBuffers {
        dx_rows,
        weight_partials,
        bias_partials,
    } = &mut buffers;
    // The groups cover rows 0..R in order (check_plan).
    let mut dx_rows_rest = match shape.variant {
        Variant::Tokens => at_least(dx_rows, rows * din),
        Variant::Rows => &mut *dx,
    };
    let mut weight_partials_rest = at_least(weight_partials, partial_count * weight_len);
    let mut bias_partials_rest = at_least(bias_partials, if dbias.is_some() { partial_count * width } else { 0 });
    let mut dbias_rest = dbias.as_deref_mut();
    let mut tasks = Vec::new();
    let mut partials_of_expert = Vec::with_capacity(shape.experts);
    let mut next_partial = 0;
    for (expert, (expert_groups, expert_dweights)) in
        groups.iter().zip(dweights.chunks_exact_mut(weight_len)).enumerate()
    {
        let mut expert_dbias = dbias_rest.as_mut().map(|rest| take_front(rest, width));
        if expert_groups.is_empty() {
            expert_dweights.fill(0.0);
            if let Some(db) = expert_dbias.as_deref_mut() {
                db.fill(0.0);
            }
        }
        let mut expert_dweights = Some(expert_dweights);
        for group in expert_groups {
            let (dweights, dbias) = match expert_dweights.take() {
                Some(first) => (first, expert_dbias.take()),
                None => (
                    take_front(&mut weight_partials_rest, weight_len),
                    dbias_rest.is_some().then(|| take_front(&mut bias_partials_rest, width)),
                ),
            };
            tasks.push(GroupTask {
                expert,
                rows: group.clone(),
                dx_rows: take_front(&mut dx_rows_rest, group.len() * din),
                dweights,
                dbias,
            });
        }
        let later_groups = expert_groups.len().saturating_sub(1);
        partials_of_expert.push(next_partial..next_partial + later_groups);
        next_partial += later_groups;
    }
    tasks.into_par_iter().for_each(|task| {
        let expert_weights = &weights[task.expert * weight_len..][..weight_len];
        Scratch::with(|scratch| {
            backward_group(
                task,
                dy,
                x,
                sources,
                x_f32.as_deref(),
                expert_weights,
                h,
                shape,
                scratch,
            )
        });
    });

    // dW[e] and db[e] += the sums of the expert's later groups, in order.
    dweights
        .par_chunks_exact_mut(weight_len)
        .zip(&partials_of_expert)
        .filter(|(_, partials)| !partials.is_empty())
        .for_each(|(sum, partials)| {
            sum.par_chunks_mut(REDUCE_BLOCK)
                .enumerate()
                .for_each(|(block, sum_block)| {
                    for partial in partials.clone() {
                        let source = &weight_partials[partial * weight_len + block * REDUCE_BLOCK..][..sum_block.len()];
                        sum_block.iter_mut().zip(source).for_each(|(s, v)| *s += v);
                    }
                })
        });
    if let Some(dbias) = dbias {
        for (sum, partials) in dbias.chunks_exact_mut(width).zip(&partials_of_expert) {
            for partial in partials.clone() {
                let source = &bias_partials[partial * width..][..width];
                sum.iter_mut().zip(source).for_each(|(s, v)| *s += v);
            }
        }
    }
    // dx[t] = the sum of its rows' dh W^T, in slot order.
    if shape.variant == Variant::Tokens {
        let dx_rows = &dx_rows[..rows * din];
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
    buffers.keep();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_groups_cut_each_expert_into_whole_chunks_in_order() {
        // Experts of 0, 1, 3000 (11 chunks and a short one), 255 and 20000 rows.
        let counts = [0u32, 1, 3000, 255, 20000];
        let offsets: Vec<u32> = std::iter::once(0)
            .chain(counts.iter().scan(0, |end, &count| {
                *end += count;
                Some(*end)
            }))
            .collect();
        for din in [1, 64, 4096] {
            let groups = row_groups(&offsets, din);
            assert_eq!(groups.len(), counts.len());
            for (expert, expert_groups) in groups.iter().enumerate() {
                let rows = offsets[expert] as usize..offsets[expert + 1] as usize;
                assert_eq!(expert_groups.is_empty(), rows.is_empty(), "din {din}, expert {expert}");
                let mut next = rows.start;
                for group in expert_groups {
                    assert_eq!(group.start, next, "din {din}, expert {expert}: in order, no gaps");
                    assert!(!group.is_empty() && (group.start - rows.start) % CHUNK_ROWS == 0);
                    next = group.end;
                }
                assert_eq!(next, rows.end, "din {din}, expert {expert}: every row");
                assert!(
                    expert_groups.len() <= (rows.len() / din).max(1),
                    "din {din}, expert {expert}"
                );
            }
        }
        // The large expert, 20000 of the 23256 rows, gets most of the ~32 groups.
        assert!(row_groups(&offsets, 64)[4].len() > 16);
    }
}
