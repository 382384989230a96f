//! Layers written from candle ops that have a backward.
//!
//! In candle 0.11 `candle_nn::LayerNorm`, `candle_nn::ops::{layer_norm,
//! rms_norm, softmax_last_dim}` run without a backward: gradients stop there
//! silently. The norms and softmax here use only differentiable primitives;
//! `tests/gradients.rs` fails if any parameter of a model gets no gradient.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor, Var, D};

use crate::attention;
use crate::dense;
use crate::error::{invalid, Result};
use crate::fused;
use crate::rng::Rng;

/// A model's parameters by name, in name order (so iteration, initialisation
/// and checkpoints are deterministic).
#[derive(Default)]
pub struct Params {
    vars: BTreeMap<String, Var>,
}

impl Params {
    /// No parameters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a parameter with the given value; the returned tensor is tracked
    /// by the autograd tape.
    pub fn add(&mut self, name: &str, value: Tensor) -> Result<Tensor> {
        if self.vars.contains_key(name) {
            return Err(invalid("parameter name", "unique", name));
        }
        let var = Var::from_tensor(&value)?;
        let tensor = var.as_tensor().clone();
        self.vars.insert(name.to_string(), var);
        Ok(tensor)
    }

    /// Adds a parameter drawn from N(0, std²) (the initialisation used throughout).
    pub fn normal(&mut self, name: &str, shape: &[usize], std: f32, rng: &mut Rng, device: &Device) -> Result<Tensor> {
        let n = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| rng.normal() * std).collect();
        self.add(name, Tensor::from_vec(values, shape, device)?)
    }

    /// Adds a parameter filled with `value`.
    pub fn constant(&mut self, name: &str, shape: &[usize], value: f32, device: &Device) -> Result<Tensor> {
        self.add(name, Tensor::full(value, shape, device)?)
    }

    /// Takes a parameter out (a model that changes shape between training
    /// runs, as XSMoE's side network, replaces or freezes it).
    pub fn remove(&mut self, name: &str) -> Result<Var> {
        self.vars
            .remove(name)
            .ok_or_else(|| invalid("parameter name", "one the model has", name))
    }

    /// The parameters by name.
    pub fn vars(&self) -> &BTreeMap<String, Var> {
        &self.vars
    }

    /// Total number of scalars.
    pub fn count(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }
}

/// `x W + b` with `W: [in, out]` (the layout the PyTorch twin uses too).
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    /// A layer named `name.weight`, `name.bias`; weights N(0, 0.02²), bias 0.
    pub fn new(params: &mut Params, name: &str, dims: (usize, usize), rng: &mut Rng, device: &Device) -> Result<Self> {
        Ok(Self {
            weight: params.normal(&format!("{name}.weight"), &[dims.0, dims.1], INIT_STD, rng, device)?,
            bias: params.constant(&format!("{name}.bias"), &[dims.1], 0.0, device)?,
        })
    }

    /// Applies the layer over the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(out) = dense::linear(x, &self.weight, &self.bias)? {
            return Ok(out);
        }
        let dims = x.dims();
        let (rows, inner) = (x.elem_count() / dims[dims.len() - 1], dims[dims.len() - 1]);
        let product = x.reshape((rows, inner))?.matmul(&self.weight)?;
        let out = match fused::add_bias(&product, &self.bias)? {
            Some(out) => out,
            None => product.broadcast_add(&self.bias)?,
        };
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("a linear input has at least one dimension") = self.weight.dim(1)?;
        Ok(out.reshape(shape)?)
    }
}

/// Standard deviation of every initialised weight (BERT/SASRec-style).
pub const INIT_STD: f32 = 0.02;

/// Layer normalisation over the last dimension with gain and bias (eps 1e-8 as in SASRec).
pub struct LayerNorm {
    gain: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    /// `name.gain` = 1, `name.bias` = 0.
    pub fn new(params: &mut Params, name: &str, dim: usize, device: &Device) -> Result<Self> {
        Ok(Self {
            gain: params.constant(&format!("{name}.gain"), &[dim], 1.0, device)?,
            bias: params.constant(&format!("{name}.bias"), &[dim], 0.0, device)?,
        })
    }

    /// Normalises the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, &self.gain, &self.bias)
    }
}

/// Layer norm over the last dimension (biased variance, eps [`LAYER_NORM_EPS`]),
/// then `* gain + bias` (broadcast).
pub fn layer_norm(x: &Tensor, gain: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if let Some(y) = fused::layer_norm(x, gain, bias, LAYER_NORM_EPS)? {
        return Ok(y);
    }
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + LAYER_NORM_EPS)?.sqrt()?)?;
    Ok(normed.broadcast_mul(gain)?.broadcast_add(bias)?)
}

/// The layer-norm epsilon.
pub const LAYER_NORM_EPS: f64 = 1e-8;

/// Softmax over the last dimension (the max is a constant shift, so it is detached).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if let Some(y) = fused::softmax_last_dim(x)? {
        return Ok(y);
    }
    let e = x.broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Inverted dropout driven by the run's seeded generator; `off()` in evaluation.
pub struct Dropout<'a> {
    rate: f32,
    rng: Option<&'a mut Rng>,
}

impl<'a> Dropout<'a> {
    /// Drops each element with probability `rate` (in `[0, 1)`), scaling the rest by `1 / (1 - rate)`.
    pub fn new(rate: f32, rng: &'a mut Rng) -> Result<Self> {
        if !(0.0..1.0).contains(&rate) {
            return Err(invalid("dropout", "a rate in [0, 1)", rate));
        }
        Ok(Self { rate, rng: Some(rng) })
    }

    /// The identity (evaluation, parity tests).
    pub fn off() -> Self {
        Self { rate: 0.0, rng: None }
    }

    /// Applies dropout to `x`.
    pub fn apply(&mut self, x: &Tensor) -> Result<Tensor> {
        let Some(mask) = self.mask(x.elem_count()) else {
            return Ok(x.clone());
        };
        if fused::fusable(x) {
            return fused::apply_mask(x, mask);
        }
        Ok((x * Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?)?)
    }

    /// The next `n` multipliers (0 for a dropped element, `1 / (1 - rate)`
    /// for a kept one); `None` when dropout is off.
    pub fn mask(&mut self, n: usize) -> Option<Vec<f32>> {
        let rng = self.rng.as_deref_mut()?;
        if self.rate == 0.0 {
            return None;
        }
        let keep = 1.0 / (1.0 - self.rate);
        // A select over 0/1 (not a branch on a random bit) keeps the draw loop free of mispredictions.
        Some(
            (0..n)
                .map(|_| keep * f32::from(u8::from(rng.uniform() >= self.rate)))
                .collect(),
        )
    }
}

/// `[B, T, heads * dh]` -> `[B, heads, T, dh]`.
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, d) = x.dims3()?;
    Ok(x.reshape((b, t, heads, d / heads))?.transpose(1, 2)?.contiguous()?)
}

/// `[B, heads, T, dh]` -> `[B, T, heads * dh]`.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, t, dh) = x.dims4()?;
    Ok(x.transpose(1, 2)?.reshape((b, t, h * dh))?)
}

/// Scaled dot-product attention: `softmax(q kᵀ / sqrt(dh) + bias) v` with
/// `q, k, v: [B, heads, T, dh]` and `bias: [B, 1, T, T]`; dropout on the weights.
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, dropout: &mut Dropout) -> Result<Tensor> {
    let dh = q.dim(D::Minus1)?;
    let scale = 1.0 / (dh as f64).sqrt();
    let products = q.matmul(&k.transpose(2, 3)?.contiguous()?)?;
    let weights = match fused::masked_softmax(&products, bias, scale)? {
        Some(weights) => weights,
        None => softmax_last_dim(&(products * scale)?.broadcast_add(bias)?)?,
    };
    let weights = dropout.apply(&weights)?;
    Ok(weights.matmul(v)?)
}

/// Multi-head attention on `q, k, v: [B, T, heads * dh]` (the projections'
/// layout) with a `[B, 1, T, T]` bias, back in that layout: the fused CPU op
/// of [`crate::attention`] where it applies, else [`attend`] on split heads.
/// Either way the dropout mask over the `[B, heads, T, T]` weights is drawn
/// in the same order.
pub fn attend_heads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    bias: &Tensor,
    dropout: &mut Dropout,
) -> Result<Tensor> {
    if attention::fits(q, k, v, bias, heads) {
        let (b, t, _) = q.dims3()?;
        return attention::attention(q, k, v, bias, heads, dropout.mask(b * heads * t * t));
    }
    let (q, k, v) = (split_heads(q, heads)?, split_heads(k, heads)?, split_heads(v, heads)?);
    merge_heads(&attend(&q, &k, &v, bias, dropout)?)
}

/// The position-wise feed-forward layer: `W2 ReLU(W1 x)`, hidden width = D (SASRec).
pub struct FeedForward {
    inner: Linear,
    outer: Linear,
}

impl FeedForward {
    /// `name.inner`, `name.outer`, both `[dim, dim]`.
    pub fn new(params: &mut Params, name: &str, dim: usize, rng: &mut Rng, device: &Device) -> Result<Self> {
        Ok(Self {
            inner: Linear::new(params, &format!("{name}.inner"), (dim, dim), rng, device)?,
            outer: Linear::new(params, &format!("{name}.outer"), (dim, dim), rng, device)?,
        })
    }

    /// Applies the layer.
    pub fn forward(&self, x: &Tensor, dropout: &mut Dropout) -> Result<Tensor> {
        self.outer.forward(&dropout.apply(&self.inner.forward(x)?.relu()?)?)
    }
}

/// A pre-norm causal self-attention block:
/// `x + Drop(Wo Attn(LN x))`, then `x + Drop(FFN(LN x))`.
pub struct AttentionBlock {
    attn_norm: LayerNorm,
    query: Linear,
    key: Linear,
    value: Linear,
    output: Linear,
    ffn_norm: LayerNorm,
    ffn: FeedForward,
    heads: usize,
}

impl AttentionBlock {
    /// A block named `name.*` of width `dim` with `heads` heads.
    pub fn new(
        params: &mut Params,
        name: &str,
        dim: usize,
        heads: usize,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<Self> {
        if heads == 0 || dim % heads != 0 {
            return Err(invalid("heads", format!("a divisor of the width {dim}"), heads));
        }
        Ok(Self {
            attn_norm: LayerNorm::new(params, &format!("{name}.attn_norm"), dim, device)?,
            query: Linear::new(params, &format!("{name}.query"), (dim, dim), rng, device)?,
            key: Linear::new(params, &format!("{name}.key"), (dim, dim), rng, device)?,
            value: Linear::new(params, &format!("{name}.value"), (dim, dim), rng, device)?,
            output: Linear::new(params, &format!("{name}.output"), (dim, dim), rng, device)?,
            ffn_norm: LayerNorm::new(params, &format!("{name}.ffn_norm"), dim, device)?,
            ffn: FeedForward::new(params, &format!("{name}.ffn"), dim, rng, device)?,
            heads,
        })
    }

    /// `x: [B, T, D]`, `bias: [B, 1, T, T]`.
    pub fn forward(&self, x: &Tensor, bias: &Tensor, dropout: &mut Dropout) -> Result<Tensor> {
        let h = self.attn_norm.forward(x)?;
        let (q, k, v) = (self.query.forward(&h)?, self.key.forward(&h)?, self.value.forward(&h)?);
        let attended = attend_heads(&q, &k, &v, self.heads, bias, dropout)?;
        let x = (x + dropout.apply(&self.output.forward(&attended)?)?)?;
        let f = self.ffn.forward(&self.ffn_norm.forward(&x)?, dropout)?;
        Ok((&x + dropout.apply(&f)?)?)
    }
}
