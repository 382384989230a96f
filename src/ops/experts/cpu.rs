//! The expert layer and combine on the host, on borrowed slices.
//!
//! Products go through `gemm` (cache-blocked, SIMD picked at run time): the
//! forward and dx per (expert, chunk of rows) under rayon, each chunk's rows
//! gathered and widened to f32 first; dW per expert with gemm's own threads,
//! which split the output and never the sum over rows. Chunks depend on the
//! counts only, so results do not depend on the thread count.

use super::{check_plan, index_slots, Activation, CombineShape, LayerShape, PlanParts, Variant};
use crate::dtype::{DType, FloatElement};
use crate::error::Result;
use crate::ops::check_len;
use gemm::Parallelism;
use rayon::prelude::*;
use std::borrow::Cow;
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

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Phi(x), the standard normal CDF.
fn normal_cdf(x: f32) -> f32 {
    0.5 * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// act(h) for the element-wise activations.
fn activate(activation: Activation, h: f32) -> f32 {
    match activation {
        Activation::Relu => h.max(0.0),
        Activation::Gelu => h * normal_cdf(h),
        Activation::Silu => h * sigmoid(h),
        Activation::None | Activation::SwiGlu => h,
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
    let chunks = row_chunks(plan.offsets);
    let outputs = split_rows(h, width, &chunks)
        .into_iter()
        .zip(split_rows(y, dout, &chunks));
    chunks
        .par_iter()
        .zip(outputs.collect::<Vec<_>>())
        // Each worker reuses its buffers: fresh ones would fault in new pages
        // for every chunk.
        .for_each_init(
            || (Vec::new(), Vec::<f32>::new()),
            |(a, acc), ((expert, rows), (h_chunk, y_chunk))| {
                gather_rows(x, sources, din, rows.clone(), a);
                let w = &weights[expert * din * width..][..din * width];
                acc.resize(rows.len() * width, 0.0);
                matmul(
                    Matrix::row_major(a, rows.len(), din),
                    Matrix::row_major(w, din, width),
                    acc,
                    Parallelism::None,
                );
                let rows_out = acc
                    .chunks_mut(width)
                    .zip(h_chunk.chunks_mut(width))
                    .zip(y_chunk.chunks_mut(dout));
                for ((row, h_row), y_row) in rows_out {
                    if let Some(bias) = &bias {
                        row.iter_mut().zip(&bias[expert * width..]).for_each(|(v, b)| *v += b);
                    }
                    h_row.iter_mut().zip(row.iter()).for_each(|(h, &v)| *h = T::from_f32(v));
                    if shape.activation == Activation::SwiGlu {
                        let (gate, up) = row.split_at(dout);
                        for ((y, &g), &u) in y_row.iter_mut().zip(gate).zip(up) {
                            *y = T::from_f32(g * sigmoid(g) * u);
                        }
                    } else {
                        for (y, &v) in y_row.iter_mut().zip(row.iter()) {
                            *y = T::from_f32(activate(shape.activation, v));
                        }
                    }
                }
            },
        );
    Ok(())
}

/// `dh = dy * act'(h)` `[R, Dout']` f32 at the saved h.
fn activation_backward<T: FloatElement>(dy: &[f32], h: &[T], shape: &LayerShape) -> Vec<f32> {
    let (dout, width) = (shape.dout, shape.width());
    let mut dh = vec![0f32; h.len()];
    dh.par_chunks_mut(width)
        .zip(h.par_chunks(width))
        .zip(dy.par_chunks(dout))
        .for_each(|((dh_row, h_row), dy_row)| {
            if shape.activation == Activation::SwiGlu {
                let (dgate, dup) = dh_row.split_at_mut(dout);
                let (gate, up) = h_row.split_at(dout);
                for c in 0..dout {
                    let (g, u) = (gate[c].to_f32(), up[c].to_f32());
                    let s = sigmoid(g);
                    dgate[c] = dy_row[c] * u * (s * (1.0 + g * (1.0 - s)));
                    dup[c] = dy_row[c] * g * s;
                }
            } else {
                for ((d, &g), v) in dh_row.iter_mut().zip(dy_row).zip(h_row) {
                    *d = g * activate_grad(shape.activation, v.to_f32());
                }
            }
        });
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

    // dW[e] = x_e^T dh_e: gemm sums the rows in order and threads over the
    // [Din, Dout'] output.
    let sources = token_of_row(plan, shape);
    let mut a = Vec::new();
    for (expert, target) in dweights.chunks_mut(din * width).enumerate() {
        let range = plan.offsets[expert] as usize..plan.offsets[expert + 1] as usize;
        gather_rows(x, sources, din, range.clone(), &mut a);
        matmul(
            Matrix::row_major(&a, range.len(), din).transposed(),
            Matrix::row_major(&dh[range.start * width..range.end * width], range.len(), width),
            target,
            Parallelism::Rayon(0),
        );
    }
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
