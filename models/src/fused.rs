//! CPU kernels with a backward for the element-wise layers of [`crate::nn`]:
//! layer norm, softmax over the last dimension, a bias added to rows, and
//! dropout. Written from candle's primitives, each of these is a chain of
//! five to ten ops whose backward allocates a zero gradient per node, sums
//! broadcast dimensions with candle's strided reduce and copies every
//! broadcast operand; that was most of a SASRec training step on the CPU.
//! Here each is one candle custom op whose backward is one pass too.
//!
//! Same functions as the composed forms (which remain the path for non-CPU
//! tensors and other dtypes, and the reference the tests compare against).
//! Every kernel is a sequential loop over rows, so results do not depend on
//! the thread count.
//!
//! What runs where (this module, [`crate::attention`] and [`crate::dense`]):
//! each fused op is taken only for f32 tensors on the CPU ([`fusable`]); on a
//! CUDA tensor the caller in [`crate::nn`] composes the same function from
//! candle ops, which candle runs on the GPU (none of these ops has a
//! `cuda_fwd`: the composed forms are candle's own CUDA kernels and cuBLAS).
//!
//! | op | CPU f32 | CUDA |
//! |---|---|---|
//! | layer norm ([`layer_norm`]) | fused | composed: mean, centre, variance, scale |
//! | softmax, masked softmax | fused | composed: max-shifted exp over its sum |
//! | bias add ([`add_bias`]) | fused | composed `broadcast_add` |
//! | dropout ([`apply_mask`]) | fused | `x * mask`, the mask uploaded |
//! | attention ([`crate::attention`]) | fused, visible keys only | composed split-head `softmax(q kᵀ/√dh + bias) v` |
//! | linear ([`crate::dense`]) | fused gemm | `matmul` (cuBLAS) + bias add |
//!
//! Dropout masks are drawn on the host from the run's seeded generator on
//! every device (and uploaded on CUDA), so a seed gives the same masks
//! everywhere. [`composed`] makes the CPU take the composed forms too (the
//! reference for the fused path).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Shape, Storage, Tensor};

use crate::error::Result;

thread_local! {
    static COMPOSED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with every fused op of this crate stepping aside for its composed
/// candle form on this thread, as on a CUDA device: the reference a fused
/// training step is compared with (`models/tests/devices.rs`).
pub fn composed<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            COMPOSED.set(self.0);
        }
    }
    let _restore = Restore(COMPOSED.replace(true));
    f()
}

/// Whether `t` can take the fused path: an f32 tensor on the CPU, outside [`composed`].
pub fn fusable(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32 && !COMPOSED.get()
}

/// The contiguous f32 elements of a CPU storage under `layout`.
pub(crate) fn cpu_f32<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(values), Some((start, end))) => Ok(&values[start..end]),
        _ => candle_core::bail!("{what}: expected a contiguous f32 CPU tensor"),
    }
}

/// Runs `f` on the contiguous f32 elements of `t` (copied only when `t` is strided).
pub(crate) fn with_f32<R>(t: &Tensor, what: &str, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => Ok(f(cpu_f32(cpu, layout, what)?)),
        _ => candle_core::bail!("{what}: expected a CPU tensor"),
    }
}

pub(crate) fn cpu_tensor(values: Vec<f32>, shape: &Shape) -> candle_core::Result<Tensor> {
    Tensor::from_vec(values, shape.clone(), &Device::Cpu)
}

/// How a per-feature parameter (a layer norm's gain or bias) lines up with
/// `x [rows, D]`: `groups` consecutive blocks of rows, block `g` using row `g`
/// of the parameter `[groups, D]`.
#[derive(Clone, Copy)]
struct Groups {
    rows: usize,
    dim: usize,
    groups: usize,
}

impl Groups {
    /// `Some` when `param` is `[D]`, or `[g_0, .., g_k, 1, .., 1, D]` matching
    /// x's leading dimensions (FAME's per-head norms); other broadcasts take
    /// the composed path.
    fn of(x: &Tensor, param: &Tensor) -> Option<Self> {
        let (xd, pd) = (x.dims(), param.dims());
        let dim = *xd.last()?;
        if dim == 0 || pd.last() != Some(&dim) {
            return None;
        }
        let rows = x.elem_count() / dim;
        let groups = if pd.len() == 1 {
            1
        } else {
            if pd.len() != xd.len() {
                return None;
            }
            let lead = pd[..pd.len() - 1].iter().take_while(|&&d| d != 1).count();
            if pd[..lead] != xd[..lead] || pd[lead..pd.len() - 1].iter().any(|&d| d != 1) {
                return None;
            }
            pd[..lead].iter().product()
        };
        Some(Self { rows, dim, groups })
    }

    /// The parameter row of each x row.
    fn group(&self, row: usize) -> usize {
        row / (self.rows / self.groups)
    }
}

/// `(x - mean) / sqrt(var + eps) * gain + bias` over the last dimension.
struct LayerNormOp {
    groups: Groups,
    eps: f32,
}

impl LayerNormOp {
    /// The row's mean and `1 / sqrt(var + eps)` (biased variance, centred first).
    fn stats(&self, row: &[f32]) -> (f32, f32) {
        let n = row.len() as f32;
        let mean = row.iter().sum::<f32>() / n;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
        (mean, 1.0 / (var + self.eps).sqrt())
    }
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "moerec-models-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, gain, bias) = (
            cpu_f32(xs, xl, "x")?,
            cpu_f32(gs, gl, "gain")?,
            cpu_f32(bs, bl, "bias")?,
        );
        let d = self.groups.dim;
        let mut out = vec![0f32; x.len()];
        for (r, (row, y)) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)).enumerate() {
            let g = self.groups.group(r) * d;
            let (mean, rstd) = self.stats(row);
            for (((y, &v), &w), &b) in y.iter_mut().zip(row).zip(&gain[g..g + d]).zip(&bias[g..g + d]) {
                *y = (v - mean) * rstd * w + b;
            }
        }
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gain: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = self.groups.dim;
        let (dx, dgain, dbias) = with_f32(x, "x", |x| {
            with_f32(gain, "gain", |gain| {
                with_f32(grad, "gradient", |dy| {
                    let mut dx = vec![0f32; x.len()];
                    let mut dgain = vec![0f32; gain.len()];
                    let mut dbias = vec![0f32; gain.len()];
                    let mut xhat = vec![0f32; d];
                    let mut dxhat = vec![0f32; d];
                    for (r, ((row, dy), dx)) in x
                        .chunks_exact(d)
                        .zip(dy.chunks_exact(d))
                        .zip(dx.chunks_exact_mut(d))
                        .enumerate()
                    {
                        let g = self.groups.group(r) * d;
                        let (mean, rstd) = self.stats(row);
                        let (mut sum_dxhat, mut sum_dxhat_xhat) = (0f32, 0f32);
                        for i in 0..d {
                            xhat[i] = (row[i] - mean) * rstd;
                            dxhat[i] = dy[i] * gain[g + i];
                            dgain[g + i] += dy[i] * xhat[i];
                            dbias[g + i] += dy[i];
                            sum_dxhat += dxhat[i];
                            sum_dxhat_xhat += dxhat[i] * xhat[i];
                        }
                        let (mean_dxhat, mean_dxhat_xhat) = (sum_dxhat / d as f32, sum_dxhat_xhat / d as f32);
                        for i in 0..d {
                            dx[i] = rstd * (dxhat[i] - mean_dxhat - xhat[i] * mean_dxhat_xhat);
                        }
                    }
                    (dx, dgain, dbias)
                })
            })
        })???;
        Ok((
            Some(cpu_tensor(dx, x.shape())?),
            Some(cpu_tensor(dgain, gain.shape())?),
            Some(cpu_tensor(dbias, bias.shape())?),
        ))
    }
}

/// Fused layer norm over the last dimension of a CPU f32 `x` with `gain` and
/// `bias` of shape `[D]` or per leading group (`[G.., 1.., D]`); `None` when
/// the operands do not fit (the caller composes it from candle ops).
pub fn layer_norm(x: &Tensor, gain: &Tensor, bias: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    if !(fusable(x) && fusable(gain) && fusable(bias)) || gain.dims() != bias.dims() {
        return Ok(None);
    }
    let Some(groups) = Groups::of(x, gain) else {
        return Ok(None);
    };
    let op = LayerNormOp {
        groups,
        eps: eps as f32,
    };
    Ok(Some(x.contiguous()?.apply_op3(
        &gain.contiguous()?,
        &bias.contiguous()?,
        op,
    )?))
}

/// Softmax over the last dimension of `scale * x + bias`, `bias` broadcast
/// over the middle dimensions (`x [B, M.., T, S]`, `bias [B, 1.., T, S]`, the
/// attention mask; it gets no gradient) or absent.
struct SoftmaxOp {
    dim: usize,
    scale: f32,
    /// With a bias: T and M (the product of the middle dimensions of x).
    mask_rows: Option<(usize, usize)>,
}

impl SoftmaxOp {
    fn forward(&self, x: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
        let d = self.dim;
        let mut out = vec![0f32; x.len()];
        for (r, (row, y)) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)).enumerate() {
            match (bias, self.mask_rows) {
                (Some(bias), Some((t, m))) => {
                    // Row r is (b, middle, t') of x; it reads row (b, t') of the bias.
                    let start = ((r / (m * t)) * t + r % t) * d;
                    for ((y, &v), &b) in y.iter_mut().zip(row).zip(&bias[start..start + d]) {
                        *y = self.scale * v + b;
                    }
                }
                _ => y.iter_mut().zip(row).for_each(|(y, &v)| *y = self.scale * v),
            }
            let max = y.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for v in y.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            let inv = 1.0 / sum;
            y.iter_mut().for_each(|v| *v *= inv);
        }
        out
    }

    /// `dx = scale * y * (dy - sum(dy * y))` per row.
    fn backward(&self, res: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor> {
        let d = self.dim;
        let dx = with_f32(res, "softmax", |y| {
            with_f32(grad, "gradient", |dy| {
                let mut dx = vec![0f32; y.len()];
                for ((y, dy), dx) in y.chunks_exact(d).zip(dy.chunks_exact(d)).zip(dx.chunks_exact_mut(d)) {
                    let dot: f32 = y.iter().zip(dy).map(|(a, b)| a * b).sum();
                    for ((dx, &y), &dy) in dx.iter_mut().zip(y).zip(dy) {
                        *dx = self.scale * y * (dy - dot);
                    }
                }
                dx
            })
        })??;
        cpu_tensor(dx, res.shape())
    }
}

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "moerec-models-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((
            CpuStorage::F32(self.forward(cpu_f32(s, l, "x")?, None)),
            l.shape().clone(),
        ))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.backward(res, grad)?))
    }
}

impl CustomOp2 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "moerec-models-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = self.forward(cpu_f32(xs, xl, "x")?, Some(cpu_f32(bs, bl, "bias")?));
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(self.backward(res, grad)?), None))
    }
}

/// Fused softmax over the last dimension of a CPU f32 tensor; `None` otherwise.
pub fn softmax_last_dim(x: &Tensor) -> Result<Option<Tensor>> {
    if !fusable(x) || x.rank() == 0 || x.dim(candle_core::D::Minus1)? == 0 {
        return Ok(None);
    }
    let op = SoftmaxOp {
        dim: x.dim(candle_core::D::Minus1)?,
        scale: 1.0,
        mask_rows: None,
    };
    Ok(Some(x.contiguous()?.apply_op1(op)?))
}

/// Fused `softmax(scale * x + bias)` over the last dimension, `x [B, M.., T, S]`
/// and a constant `bias [B, 1.., T, S]` (no gradient flows into it); `None`
/// when the operands do not fit.
pub fn masked_softmax(x: &Tensor, bias: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    let (xd, bd) = (x.dims(), bias.dims());
    let fits = fusable(x)
        && fusable(bias)
        && xd.len() >= 3
        && xd.len() == bd.len()
        && xd[0] == bd[0]
        && xd[xd.len() - 2..] == bd[bd.len() - 2..]
        && bd[1..bd.len() - 2].iter().all(|&d| d == 1)
        && x.elem_count() > 0;
    if !fits {
        return Ok(None);
    }
    let op = SoftmaxOp {
        dim: xd[xd.len() - 1],
        scale: scale as f32,
        mask_rows: Some((xd[xd.len() - 2], xd[1..xd.len() - 2].iter().product())),
    };
    Ok(Some(x.contiguous()?.apply_op2(&bias.contiguous()?, op)?))
}

/// `x [N, C] + bias [C]` with the bias gradient summed over rows in one pass.
struct AddBiasOp {
    cols: usize,
}

impl CustomOp2 for AddBiasOp {
    fn name(&self) -> &'static str {
        "moerec-models-add-bias"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, bias) = (cpu_f32(xs, xl, "x")?, cpu_f32(bs, bl, "bias")?);
        let mut out = x.to_vec();
        for row in out.chunks_exact_mut(self.cols) {
            row.iter_mut().zip(bias).for_each(|(y, &b)| *y += b);
        }
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dbias = with_f32(grad, "gradient", |dy| {
            let mut sum = vec![0f32; self.cols];
            for row in dy.chunks_exact(self.cols) {
                sum.iter_mut().zip(row).for_each(|(s, &g)| *s += g);
            }
            sum
        })?;
        Ok((Some(grad.clone()), Some(cpu_tensor(dbias, bias.shape())?)))
    }
}

/// Fused `x + bias` for a CPU f32 `x [.., C]` and `bias [C]`; `None` otherwise.
pub fn add_bias(x: &Tensor, bias: &Tensor) -> Result<Option<Tensor>> {
    let cols = bias.elem_count();
    if !(fusable(x) && fusable(bias)) || bias.rank() != 1 || x.rank() == 0 || x.dim(candle_core::D::Minus1)? != cols {
        return Ok(None);
    }
    Ok(Some(
        x.contiguous()?.apply_op2(&bias.contiguous()?, AddBiasOp { cols })?,
    ))
}

/// `x * mask` for a fixed mask (dropout's kept-and-rescaled pattern); the
/// gradient is `grad * mask`.
struct MaskOp {
    mask: Vec<f32>,
}

impl CustomOp1 for MaskOp {
    fn name(&self) -> &'static str {
        "moerec-models-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l, "x")?;
        let out = x.iter().zip(&self.mask).map(|(v, m)| v * m).collect();
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dx = with_f32(grad, "gradient", |dy| {
            dy.iter().zip(&self.mask).map(|(g, m)| g * m).collect()
        })?;
        Ok(Some(cpu_tensor(dx, res.shape())?))
    }
}

/// `x * mask` elementwise (dropout) for a CPU f32 `x` (see [`fusable`]) with
/// `mask.len() == x.elem_count()`.
pub fn apply_mask(x: &Tensor, mask: Vec<f32>) -> Result<Tensor> {
    if !fusable(x) || mask.len() != x.elem_count() {
        return Err(crate::error::invalid(
            "dropout mask",
            format!("{} values for a CPU f32 tensor", x.elem_count()),
            format!("{} values for {:?} {:?}", mask.len(), x.dtype(), x.device().location()),
        ));
    }
    Ok(x.contiguous()?.apply_op1(MaskOp { mask })?)
}

#[cfg(test)]
pub(crate) mod tests {
    //! Each fused op against the composed candle form in f64 (which the
    //! dispatch in `nn` takes for non-f32 tensors): forward and every gradient.
    use super::*;
    use crate::nn;
    use crate::rng::Rng;
    use candle_core::Var;

    pub(crate) fn random(shape: &[usize], rng: &mut Rng) -> Tensor {
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn assert_close(a: &Tensor, b: &Tensor, what: &str) {
        let a: Vec<f64> = a
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f64> = b
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        let scale = b.iter().fold(0f64, |m, v| m.max(v.abs()));
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() <= 1e-5 * (y.abs() + scale), "{what}[{i}]: {x} vs {y}");
        }
    }

    /// Runs `f` on f32 leaves (the fused path) and on f64 copies (composed),
    /// with the same random upstream gradient; compares outputs and gradients.
    pub(crate) fn check(leaves: &[Tensor], f: impl Fn(&[Tensor]) -> Tensor, what: &str) {
        let mut rng = Rng::new(7);
        let vars32: Vec<Var> = leaves.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let vars64: Vec<Var> = leaves
            .iter()
            .map(|t| Var::from_tensor(&t.to_dtype(DType::F64).unwrap()).unwrap())
            .collect();
        let y32 = f(&vars32.iter().map(|v| v.as_tensor().clone()).collect::<Vec<_>>());
        let y64 = f(&vars64.iter().map(|v| v.as_tensor().clone()).collect::<Vec<_>>());
        assert_close(&y32, &y64, what);
        let weights = random(y32.dims(), &mut rng);
        let g32 = (&y32 * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        let g64 = (&y64 * weights.to_dtype(DType::F64).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (i, (a, b)) in vars32.iter().zip(&vars64).enumerate() {
            let (Some(ga), Some(gb)) = (g32.get(a.as_tensor()), g64.get(b.as_tensor())) else {
                panic!("{what}: operand {i} has no gradient");
            };
            assert_close(ga, gb, &format!("{what} gradient {i}"));
        }
    }

    #[test]
    fn layer_norm_matches_the_composed_form() {
        let mut rng = Rng::new(1);
        let x = random(&[3, 5, 8], &mut rng);
        let gain = random(&[8], &mut rng);
        let bias = random(&[8], &mut rng);
        assert!(layer_norm(&x, &gain, &bias, 1e-8).unwrap().is_some());
        check(
            &[x, gain, bias],
            |t| nn::layer_norm(&t[0], &t[1], &t[2]).unwrap(),
            "layer norm",
        );
        // FAME's per-head norm: x [H, R, d], gain [H, 1, d].
        let x = random(&[4, 6, 5], &mut rng);
        let gain = random(&[4, 1, 5], &mut rng);
        let bias = random(&[4, 1, 5], &mut rng);
        assert!(layer_norm(&x, &gain, &bias, 1e-8).unwrap().is_some());
        check(
            &[x, gain, bias],
            |t| nn::layer_norm(&t[0], &t[1], &t[2]).unwrap(),
            "grouped layer norm",
        );
    }

    #[test]
    fn softmaxes_match_the_composed_form() {
        let mut rng = Rng::new(2);
        let x = random(&[2, 3, 4, 7], &mut rng);
        check(&[x], |t| nn::softmax_last_dim(&t[0]).unwrap(), "softmax");
        // A mask [B, 1, 1, T, S] broadcast over two middle dimensions, -inf entries included.
        let x = random(&[2, 3, 2, 4, 4], &mut rng);
        let bias: Vec<f32> = (0..2 * 16)
            .map(|i| {
                if (i % 4) > (i / 4) % 4 {
                    f32::NEG_INFINITY
                } else {
                    0.1 * i as f32
                }
            })
            .collect();
        let bias = Tensor::from_vec(bias, (2, 1, 1, 4, 4), &Device::Cpu).unwrap();
        let scale = 0.35;
        let fused = masked_softmax(&x, &bias, scale).unwrap().unwrap();
        let composed = nn::softmax_last_dim(
            &(x.to_dtype(DType::F64).unwrap() * scale)
                .unwrap()
                .broadcast_add(&bias.to_dtype(DType::F64).unwrap())
                .unwrap(),
        )
        .unwrap();
        assert_close(&fused, &composed, "masked softmax");
        let b = bias.clone();
        check(
            &[x],
            move |t| match masked_softmax(&t[0], &b, scale).unwrap() {
                Some(y) => y,
                None => nn::softmax_last_dim(
                    &(&t[0] * scale)
                        .unwrap()
                        .broadcast_add(&b.to_dtype(DType::F64).unwrap())
                        .unwrap(),
                )
                .unwrap(),
            },
            "masked softmax",
        );
    }

    #[test]
    fn bias_and_mask_match_the_composed_form() {
        let mut rng = Rng::new(3);
        let x = random(&[6, 5], &mut rng);
        let bias = random(&[5], &mut rng);
        check(
            &[x, bias],
            |t| {
                add_bias(&t[0], &t[1])
                    .unwrap()
                    .unwrap_or_else(|| t[0].broadcast_add(&t[1]).unwrap())
            },
            "bias",
        );
        let x = random(&[4, 3], &mut rng);
        let mask: Vec<f32> = (0..12).map(|i| [0.0, 1.25][i % 2]).collect();
        let m = Tensor::from_vec(mask.clone(), (4, 3), &Device::Cpu).unwrap();
        check(
            &[x],
            move |t| {
                if fusable(&t[0]) {
                    apply_mask(&t[0], mask.clone()).unwrap()
                } else {
                    (&t[0] * m.to_dtype(DType::F64).unwrap()).unwrap()
                }
            },
            "dropout mask",
        );
        let x = random(&[4, 3], &mut rng);
        assert!(apply_mask(&x, vec![1.0; 5]).is_err());
    }

    #[test]
    fn composed_turns_the_fused_path_off_on_its_thread_only() {
        let x = random(&[2, 3], &mut Rng::new(4));
        assert!(fusable(&x));
        composed(|| {
            assert!(!fusable(&x));
            std::thread::scope(|s| s.spawn(|| assert!(fusable(&x))).join().unwrap());
            assert!(layer_norm(&x, &x.get(0).unwrap(), &x.get(1).unwrap(), 1e-8)
                .unwrap()
                .is_none());
        });
        assert!(fusable(&x));
        assert!(!fusable(&x.to_dtype(DType::F64).unwrap()));
    }
}
