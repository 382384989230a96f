//! `x W + b` over the last dimension of a CPU f32 `x [.., in]` as one candle
//! op: the composed form (`reshape`, `matmul`, `broadcast_add`, `reshape`)
//! puts four nodes of the output's size on the tape, and candle's backward
//! allocates a zero gradient and adds into it at every node. Here the forward
//! is one gemm with the bias as its initial value, the backward two gemms and
//! a column sum. The gemm crate is moerec's (already in the build); its
//! products run on the calling thread, so results do not depend on the
//! thread count.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use gemm::Parallelism;

use crate::error::Result;
use crate::fused::{cpu_f32, cpu_tensor, fusable, with_f32};

/// A row-major matrix operand for [`gemm`]: `rows x cols`, optionally read transposed.
#[derive(Clone, Copy)]
struct Operand<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    transposed: bool,
}

impl Operand<'_> {
    /// (rows, cols, row stride, col stride) of the operand as used.
    fn view(&self) -> (usize, usize, isize, isize) {
        if self.transposed {
            (self.cols, self.rows, 1, self.cols as isize)
        } else {
            (self.rows, self.cols, self.cols as isize, 1)
        }
    }
}

/// `c = a b + (c if accumulate)`, `c` row-major `[m, n]`.
fn gemm(a: Operand, b: Operand, c: &mut [f32], accumulate: bool) {
    let ((m, k, a_rs, a_cs), (kb, n, b_rs, b_cs)) = (a.view(), b.view());
    // Internal invariants: the op derives every size from checked shapes.
    assert!(k == kb && c.len() == m * n && a.data.len() == m * k && b.data.len() == k * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    // SAFETY: a is m x k and b is k x n with the strides of `view` over
    // slices of exactly those lengths (checked above); c is a distinct,
    // initialised m x n row-major buffer, so reading it (accumulate) is sound.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a_cs,
            a_rs,
            b.data.as_ptr(),
            b_cs,
            b_rs,
            f32::from(u8::from(accumulate)),
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

struct LinearOp {
    rows: usize,
    inputs: usize,
    outputs: usize,
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "moerec-models-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w, bias) = (
            cpu_f32(xs, xl, "x")?,
            cpu_f32(ws, wl, "weight")?,
            cpu_f32(bs, bl, "bias")?,
        );
        let mut out: Vec<f32> = bias.iter().copied().cycle().take(self.rows * self.outputs).collect();
        gemm(self.x(x, false), self.w(w, false), &mut out, true);
        let mut shape = xl.shape().dims().to_vec();
        *shape.last_mut().expect("x has rank >= 1") = self.outputs;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = with_f32(x, "x", |x| {
            with_f32(w, "weight", |w| {
                with_f32(grad, "gradient", |dy| {
                    let dy_op = Operand {
                        data: dy,
                        rows: self.rows,
                        cols: self.outputs,
                        transposed: false,
                    };
                    let mut dx = vec![0f32; self.rows * self.inputs];
                    gemm(dy_op, self.w(w, true), &mut dx, false);
                    let mut dw = vec![0f32; self.inputs * self.outputs];
                    gemm(self.x(x, true), dy_op, &mut dw, false);
                    let mut db = vec![0f32; self.outputs];
                    for row in dy.chunks_exact(self.outputs) {
                        db.iter_mut().zip(row).for_each(|(s, &g)| *s += g);
                    }
                    (dx, dw, db)
                })
            })
        })???;
        Ok((
            Some(cpu_tensor(dx, x.shape())?),
            Some(cpu_tensor(dw, w.shape())?),
            Some(cpu_tensor(db, bias.shape())?),
        ))
    }
}

impl LinearOp {
    fn x<'a>(&self, x: &'a [f32], transposed: bool) -> Operand<'a> {
        Operand {
            data: x,
            rows: self.rows,
            cols: self.inputs,
            transposed,
        }
    }

    fn w<'a>(&self, w: &'a [f32], transposed: bool) -> Operand<'a> {
        Operand {
            data: w,
            rows: self.inputs,
            cols: self.outputs,
            transposed,
        }
    }
}

/// `x W + b` for CPU f32 `x [.., in]`, `W [in, out]`, `b [out]`; `None` when
/// the operands do not fit (the caller composes it).
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Option<Tensor>> {
    let (Some(&inputs), Ok((w_in, outputs))) = (x.dims().last(), weight.dims2()) else {
        return Ok(None);
    };
    if ![x, weight, bias].iter().all(|t| fusable(t)) || w_in != inputs || bias.dims() != [outputs] {
        return Ok(None);
    }
    if inputs == 0 || outputs == 0 || x.elem_count() == 0 {
        return Ok(None);
    }
    let rows = x.elem_count() / inputs;
    let op = LinearOp { rows, inputs, outputs };
    Ok(Some(x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        op,
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::tests::{check, random};
    use crate::rng::Rng;

    #[test]
    fn matches_the_composed_layer() {
        let mut rng = Rng::new(9);
        let leaves = [
            random(&[2, 3, 5], &mut rng),
            random(&[5, 4], &mut rng),
            random(&[4], &mut rng),
        ];
        assert!(linear(&leaves[0], &leaves[1], &leaves[2]).unwrap().is_some());
        check(
            &leaves,
            |t| match linear(&t[0], &t[1], &t[2]).unwrap() {
                Some(y) => y,
                None => t[0]
                    .reshape((6, 5))
                    .unwrap()
                    .matmul(&t[1])
                    .unwrap()
                    .broadcast_add(&t[2])
                    .unwrap()
                    .reshape((2, 3, 4))
                    .unwrap(),
            },
            "linear",
        );
    }
}
