//! Causal multi-head attention as one CPU op: `softmax(q kᵀ / sqrt(dh) +
//! bias) v` per head, dropout on the weights, with `q, k, v, out: [B, T, D]`
//! (heads side by side in D, so nothing is split, transposed or merged).
//!
//! The bias is the batch's attention mask (0 or -inf in practice, any value
//! allowed): a key whose bias is -inf has weight exactly 0 in the composed
//! form, so the op visits only the keys a query may see. In a training batch
//! of left-padded sequences most positions are padding (Beauty: ~7 items of
//! 50), so this skips most of the products as well as the `[B, H, T, T]`
//! intermediates and their gradients. The dropout mask is drawn by the caller
//! for every `[B, H, T, T]` weight in the composed form's order, so both
//! forms consume the generator alike. Sequential loops: results do not
//! depend on the thread count.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use crate::error::{invalid, Result};
use crate::fused::{cpu_f32, cpu_tensor, fusable, with_f32};

/// The keys each query row may see, with their bias: for query row
/// `(b, t)`, `keys[starts[b T + t]..starts[b T + t + 1]]`.
struct Visible {
    starts: Vec<usize>,
    keys: Vec<(u32, f32)>,
}

impl Visible {
    /// From a `[B, T, T]` bias: every key whose bias is not -inf.
    fn new(bias: &[f32], width: usize) -> Self {
        let mut starts = Vec::with_capacity(bias.len() / width.max(1) + 1);
        let mut keys = Vec::new();
        starts.push(0);
        for row in bias.chunks_exact(width) {
            keys.extend(
                row.iter()
                    .enumerate()
                    .filter(|(_, b)| **b != f32::NEG_INFINITY)
                    .map(|(s, &b)| (s as u32, b)),
            );
            starts.push(keys.len());
        }
        Self { starts, keys }
    }

    fn row(&self, r: usize) -> &[(u32, f32)] {
        &self.keys[self.starts[r]..self.starts[r + 1]]
    }
}

struct AttentionOp {
    batch: usize,
    width: usize,
    dim: usize,
    heads: usize,
    visible: Visible,
    /// `[B, H, T, T]` dropout multipliers (0 or `1 / (1 - rate)`); `None` = no dropout.
    mask: Option<Vec<f32>>,
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

impl AttentionOp {
    fn dh(&self) -> usize {
        self.dim / self.heads
    }

    /// The softmax weights of query `(b, t)` in head `h` over its visible
    /// keys, into `p` (NaN everywhere when it sees no key, as the composed form).
    fn weights(&self, q: &[f32], k: &[f32], b: usize, t: usize, h: usize, p: &mut Vec<f32>) {
        let (d, dh, width) = (self.dim, self.dh(), self.width);
        let scale = 1.0 / (dh as f32).sqrt();
        let query = &q[(b * width + t) * d + h * dh..][..dh];
        p.clear();
        p.extend(self.visible.row(b * width + t).iter().map(|&(s, bias)| {
            let key = &k[(b * width + s as usize) * d + h * dh..][..dh];
            scale * dot(query, key) + bias
        }));
        let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for v in p.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        let inv = 1.0 / sum;
        p.iter_mut().for_each(|v| *v *= inv);
    }

    /// The dropout multiplier of weight `(b, h, t, s)`.
    fn keep(&self, b: usize, h: usize, t: usize, s: u32) -> f32 {
        match &self.mask {
            Some(mask) => mask[((b * self.heads + h) * self.width + t) * self.width + s as usize],
            None => 1.0,
        }
    }

    fn forward(&self, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
        let (d, dh, width) = (self.dim, self.dh(), self.width);
        let mut out = vec![0f32; q.len()];
        let mut p = Vec::with_capacity(width);
        for b in 0..self.batch {
            for t in 0..width {
                let keys = self.visible.row(b * width + t);
                for h in 0..self.heads {
                    let o = &mut out[(b * width + t) * d + h * dh..][..dh];
                    if keys.is_empty() {
                        o.fill(f32::NAN);
                        continue;
                    }
                    self.weights(q, k, b, t, h, &mut p);
                    for (&w, &(s, _)) in p.iter().zip(keys) {
                        let w = w * self.keep(b, h, t, s);
                        let value = &v[(b * width + s as usize) * d + h * dh..][..dh];
                        o.iter_mut().zip(value).for_each(|(o, &x)| *o += w * x);
                    }
                }
            }
        }
        out
    }

    fn backward(&self, q: &[f32], k: &[f32], v: &[f32], dout: &[f32]) -> [Vec<f32>; 3] {
        let (d, dh, width) = (self.dim, self.dh(), self.width);
        let scale = 1.0 / (dh as f32).sqrt();
        let (mut dq, mut dk, mut dv) = (vec![0f32; q.len()], vec![0f32; k.len()], vec![0f32; v.len()]);
        let (mut p, mut dp) = (Vec::with_capacity(width), Vec::with_capacity(width));
        for b in 0..self.batch {
            for t in 0..width {
                let keys = self.visible.row(b * width + t);
                if keys.is_empty() {
                    continue;
                }
                let row = (b * width + t) * d;
                for h in 0..self.heads {
                    self.weights(q, k, b, t, h, &mut p);
                    let go = &dout[row + h * dh..][..dh];
                    // dP = dO Vᵀ through the dropout mask; dV += P_dropped dO.
                    dp.clear();
                    for (&w, &(s, _)) in p.iter().zip(keys) {
                        let keep = self.keep(b, h, t, s);
                        let at = (b * width + s as usize) * d + h * dh;
                        dp.push(dot(go, &v[at..at + dh]) * keep);
                        let w = w * keep;
                        dv[at..at + dh].iter_mut().zip(go).for_each(|(g, &x)| *g += w * x);
                    }
                    // Softmax backward, then dQ = dS K, dK += dS Q (scaled).
                    let mean = dot(&p, &dp);
                    let query = &q[row + h * dh..][..dh];
                    let dquery = &mut dq[row + h * dh..][..dh];
                    for ((&w, &g), &(s, _)) in p.iter().zip(&dp).zip(keys) {
                        let ds = scale * w * (g - mean);
                        let at = (b * width + s as usize) * d + h * dh;
                        dquery.iter_mut().zip(&k[at..at + dh]).for_each(|(g, &x)| *g += ds * x);
                        dk[at..at + dh].iter_mut().zip(query).for_each(|(g, &x)| *g += ds * x);
                    }
                }
            }
        }
        [dq, dk, dv]
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "moerec-models-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = self.forward(cpu_f32(qs, ql, "q")?, cpu_f32(ks, kl, "k")?, cpu_f32(vs, vl, "v")?);
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [dq, dk, dv] = with_f32(q, "q", |q| {
            with_f32(k, "k", |k| {
                with_f32(v, "v", |v| with_f32(grad, "gradient", |g| self.backward(q, k, v, g)))
            })
        })????;
        Ok((
            Some(cpu_tensor(dq, q.shape())?),
            Some(cpu_tensor(dk, k.shape())?),
            Some(cpu_tensor(dv, v.shape())?),
        ))
    }
}

/// Whether [`attention`] takes CPU f32 `q, k, v: [B, T, D]` with `heads`
/// heads and a `[B, 1, T, T]` bias (T > 0, D divisible by `heads`).
pub fn fits(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, heads: usize) -> bool {
    let Ok((batch, width, dim)) = q.dims3() else {
        return false;
    };
    [q, k, v, bias].iter().all(|t| fusable(t))
        && k.dims() == q.dims()
        && v.dims() == q.dims()
        && bias.dims() == [batch, 1, width, width]
        && width > 0
        && heads > 0
        && dim % heads == 0
}

/// Fused attention (see [`fits`] for the operands); `mask` is the
/// `[B, heads, T, T]` dropout multipliers or `None`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    heads: usize,
    mask: Option<Vec<f32>>,
) -> Result<Tensor> {
    let (batch, width, dim) = q.dims3()?;
    if !fits(q, k, v, bias, heads) || mask.as_ref().is_some_and(|m| m.len() != batch * heads * width * width) {
        return Err(invalid(
            "attention operands",
            format!(
                "CPU f32 q, k, v [B, T, D] with D divisible by {heads}, a [B, 1, T, T] bias, a [B, {heads}, T, T] mask"
            ),
            format!(
                "{:?} {:?} {:?} {:?}, mask of {:?}",
                q.dims(),
                k.dims(),
                v.dims(),
                bias.dims(),
                mask.as_ref().map(Vec::len)
            ),
        ));
    }
    let visible = with_f32(bias, "bias", |bias| Visible::new(bias, width))?;
    let op = AttentionOp {
        batch,
        width,
        dim,
        heads,
        visible,
        mask,
    };
    Ok(q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::tests::{check, random};
    use crate::nn::{attend_heads, Dropout};
    use crate::rng::Rng;
    use candle_core::{DType, Device};

    /// A left-padded batch's mask: sequence b has `lens[b]` items of `t`.
    fn mask(lens: &[usize], t: usize) -> Tensor {
        let mut bias = vec![f32::NEG_INFINITY; lens.len() * t * t];
        for (b, &len) in lens.iter().enumerate() {
            for q in 0..t {
                for s in 0..=q {
                    if s >= t - len || s == q {
                        bias[(b * t + q) * t + s] = 0.25 * s as f32;
                    }
                }
            }
        }
        Tensor::from_vec(bias, (lens.len(), 1, t, t), &Device::Cpu).unwrap()
    }

    #[test]
    fn matches_split_heads_attention_with_and_without_dropout() {
        let mut rng = Rng::new(5);
        let (b, t, d, heads) = (3, 6, 8, 2);
        let bias = mask(&[6, 2, 0], t);
        let leaves = [
            random(&[b, t, d], &mut rng),
            random(&[b, t, d], &mut rng),
            random(&[b, t, d], &mut rng),
        ];
        assert!(fits(&leaves[0], &leaves[1], &leaves[2], &bias, heads));
        for rate in [0.0, 0.3] {
            let bias = bias.clone();
            check(
                &leaves,
                move |x| {
                    let mut dropout_rng = Rng::new(11);
                    let mut dropout = Dropout::new(rate, &mut dropout_rng).unwrap();
                    let bias = bias.to_dtype(x[0].dtype()).unwrap();
                    attend_heads(&x[0], &x[1], &x[2], heads, &bias, &mut dropout).unwrap()
                },
                &format!("attention, dropout {rate}"),
            );
        }
    }

    #[test]
    fn a_query_that_sees_no_key_is_nan_as_composed() {
        let mut rng = Rng::new(6);
        let q = random(&[1, 2, 4], &mut rng);
        let bias = Tensor::from_vec(
            vec![0.0, f32::NEG_INFINITY, f32::NEG_INFINITY, f32::NEG_INFINITY],
            (1, 1, 2, 2),
            &Device::Cpu,
        )
        .unwrap();
        let out = attention(&q, &q, &q, &bias, 2, None).unwrap();
        let composed = attend_heads(
            &q.to_dtype(DType::F64).unwrap(),
            &q.to_dtype(DType::F64).unwrap(),
            &q.to_dtype(DType::F64).unwrap(),
            2,
            &bias.to_dtype(DType::F64).unwrap(),
            &mut Dropout::off(),
        )
        .unwrap();
        let (a, c): (Vec<f32>, Vec<f64>) = (
            out.flatten_all().unwrap().to_vec1().unwrap(),
            composed.flatten_all().unwrap().to_vec1().unwrap(),
        );
        for (x, y) in a.iter().zip(&c) {
            assert_eq!(x.is_nan(), y.is_nan());
        }
        assert!(a[..4].iter().all(|v| v.is_finite()) && a[4..].iter().all(|v| v.is_nan()));
        assert!(attention(&q, &q, &q, &bias, 3, None).is_err());
        assert!(attention(&q, &q, &q, &bias, 2, Some(vec![1.0; 3])).is_err());
    }
}
