//! FAME (Liu et al., "Facet-Aware Multi-Head Mixture-of-Experts Model for
//! Sequential Recommendation", WSDM 2025): SASRec whose last block treats
//! every attention head as a facet with its own prediction.
//!
//! The last block, per head h (width dh = D / H):
//! - N query experts `Q_{h,n} = LN(x) W_q^{h,n} + b_q^{h,n}` each attend
//!   causally over the head's shared `K_h = LN(x) W_k^h`, `V_h = LN(x) W_v^h`;
//! - a dense router (softmax over the head's N experts, k = All) reads the
//!   concatenation of the N expert outputs and mixes them: `o_h`;
//! - `r_h = x_h + Drop(o_h)` (`x_h` the head's slice of the block input), then
//!   a per-head FFN `r_h + Drop(FFN_h(LN_h(r_h)))` and a per-head final norm give
//!   the head state `F_h`;
//! - item sub-embeddings `X_h = E W_f^h` (`E` the shared item table);
//!   `s_h(v) = <F_h, X_h(v)>`;
//! - a softmax gate over heads from `[F_1; ...; F_H] W_g + b_g` mixes the heads'
//!   scores: Logits mixing by default (the paper mixes probabilities; that is
//!   [`Mixing::Probabilities`]).
//!
//! Every MoE step runs on moerec's ops (`moerec::candle`):
//! - the H·N query experts are one grouped expert layer
//!   ([`expert_layer`]: weights `[H·N, D, dh]`, bias `[H·N, dh]`, expert
//!   `e = h·N + n`) over a dense dispatch plan (every token to every expert).
//!   A k = All plan does not depend on the logits, and the router's logits
//!   exist only after the experts have attended, so this plan is
//!   [`route`]'s over zero logits (one group of H·N experts);
//! - the router's logits `[R, H·N]` go through grouped [`route`] (G = H
//!   groups of N, k = All, softmax, no renormalisation): the weights are the
//!   per-head softmax, and its plan lays the expert outputs out as
//!   `[H, N, R, dh]` (expert-major, rows ascending);
//! - [`combine`] mixes each (row, head)'s N expert outputs with those weights.
//!
//! Choices where the paper is silent (the PyTorch twin makes the same): the
//! residual from the head's slice of the block input (added after dropout,
//! outside `combine`, so dropout falls on the mixture as in SASRec), the
//! per-head pre-norm FFN of width dh with ReLU, the per-head final norm, the
//! router reading the concatenated expert outputs through one linear layer
//! per head (`[H, N·dh, N]`, applied as a sum of N products so the
//! concatenation is never materialised), query experts with a bias, and no
//! load-balancing or z-loss (routing is dense: every expert sees every
//! token, so balance is not at stake; `route`'s auxiliary losses are left
//! out of the objective). The first L-1 blocks, embeddings and attention
//! masking are SASRec's (see `sasrec`).

use candle_core::{DType, Device, Tensor};
use moerec::candle::{combine, expert_layer, route, RoutingOptions};
use moerec::experts::Activation;
use moerec::routing::TopK;

use crate::batch::Batch;
use crate::error::{invalid, Result};
use crate::nn::{layer_norm, softmax_last_dim, Dropout, Linear, Params, INIT_STD};
use crate::rng::Rng;
use crate::sasrec::{Encoder, EncoderConfig};
use crate::scoring::{CatalogQuery, Mixing};
use crate::Recommender;

/// FAME's hyperparameters.
#[derive(Clone, Debug, PartialEq)]
pub struct FameConfig {
    /// The shared part: `blocks` counts all L blocks, the last being FAME's.
    pub encoder: EncoderConfig,
    /// Facet heads H in the last block (4).
    pub facets: usize,
    /// Query experts N per head (4).
    pub experts: usize,
    /// How the heads' scores are mixed.
    pub mixing: Mixing,
}

impl FameConfig {
    /// Defaults: SASRec's shape (D = 64, 2 blocks, 2 heads in the first), H = 4, N = 4, Logits mixing.
    pub fn new(num_items: u32) -> Self {
        Self {
            encoder: EncoderConfig::sasrec(num_items),
            facets: 4,
            experts: 4,
            mixing: Mixing::Logits,
        }
    }
}

/// `name.weight` `[shape]` drawn N(0, [`INIT_STD`]²) and a zero `name.bias` of `bias_shape`.
fn stacked(
    params: &mut Params,
    name: &str,
    shape: (usize, usize, usize),
    bias_shape: &[usize],
    rng: &mut Rng,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let weight = params.normal(
        &format!("{name}.weight"),
        &[shape.0, shape.1, shape.2],
        INIT_STD,
        rng,
        device,
    )?;
    Ok((
        weight,
        params.constant(&format!("{name}.bias"), bias_shape, 0.0, device)?,
    ))
}

/// Per-head parameters stacked over heads: `[H, ...]`, applied with batched matmuls.
struct PerHead {
    weight: Tensor,
    bias: Tensor,
}

impl PerHead {
    /// `[H, fan_in, fan_out]` weights, `[H, 1, fan_out]` bias.
    fn new(
        params: &mut Params,
        name: &str,
        shape: (usize, usize, usize),
        rng: &mut Rng,
        device: &Device,
    ) -> Result<Self> {
        let (weight, bias) = stacked(params, name, shape, &[shape.0, 1, shape.2], rng, device)?;
        Ok(Self { weight, bias })
    }

    /// `x: [H, R, fan_in]` -> `[H, R, fan_out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.weight)?.broadcast_add(&self.bias)?)
    }
}

/// The H·N query experts `D -> dh`: `fame.query_experts.weight [H·N, D, dh]`
/// and `.bias [H·N, dh]`, expert `e = h·N + n`.
struct QueryExperts {
    weight: Tensor,
    bias: Tensor,
}

impl QueryExperts {
    fn new(params: &mut Params, shape: (usize, usize, usize), rng: &mut Rng, device: &Device) -> Result<Self> {
        let (weight, bias) = stacked(params, "fame.query_experts", shape, &[shape.0, shape.2], rng, device)?;
        Ok(Self { weight, bias })
    }

    /// `x: [tokens, D]` -> `[E, tokens, dh]`: every token through every expert
    /// (a dense plan), in the plan's expert-major order.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (tokens, _) = x.dims2()?;
        let (experts, _, width) = self.weight.dims3()?;
        let dense = route(
            &Tensor::zeros((tokens, experts), DType::F32, x.device())?,
            &RoutingOptions::new(TopK::All),
        )?;
        let y = expert_layer(x, &dense.plan, &self.weight, Some(&self.bias), Activation::None)?;
        Ok(y.reshape((experts, tokens, width))?)
    }
}

/// Layer norm over the last dimension with per-head gain and bias `[H, 1, dh]`.
struct PerHeadNorm {
    gain: Tensor,
    bias: Tensor,
}

impl PerHeadNorm {
    fn new(params: &mut Params, name: &str, heads: usize, dim: usize, device: &Device) -> Result<Self> {
        Ok(Self {
            gain: params.constant(&format!("{name}.gain"), &[heads, 1, dim], 1.0, device)?,
            bias: params.constant(&format!("{name}.bias"), &[heads, 1, dim], 0.0, device)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, &self.gain, &self.bias)
    }
}

/// The FAME model.
pub struct Fame {
    params: Params,
    encoder: Encoder,
    norm: crate::nn::LayerNorm,
    queries: QueryExperts,
    key: Linear,
    value: Linear,
    router: PerHead,
    ffn_norm: PerHeadNorm,
    ffn_inner: PerHead,
    ffn_outer: PerHead,
    final_norm: PerHeadNorm,
    item_facets: Tensor,
    gate: Linear,
    config: FameConfig,
}

impl Fame {
    /// A freshly initialised model; the same seed gives the same weights.
    pub fn new(config: FameConfig, seed: u64, device: &Device) -> Result<Self> {
        let (dim, h, n) = (config.encoder.dim, config.facets, config.experts);
        if config.encoder.blocks == 0 {
            return Err(invalid("blocks", "at least 1 (the last is FAME's)", 0));
        }
        if h == 0 || dim % h != 0 {
            return Err(invalid("facets", format!("a divisor of the width {dim}"), h));
        }
        if n == 0 {
            return Err(invalid("experts", "at least 1", 0));
        }
        let dh = dim / h;
        let mut params = Params::new();
        let mut rng = Rng::new(seed);
        let shared = EncoderConfig {
            blocks: config.encoder.blocks - 1,
            ..config.encoder.clone()
        };
        let encoder = Encoder::new(&mut params, &shared, &mut rng, device)?;
        let r = &mut rng;
        let p = &mut params;
        Ok(Self {
            norm: crate::nn::LayerNorm::new(p, "fame.attn_norm", dim, device)?,
            queries: QueryExperts::new(p, (h * n, dim, dh), r, device)?,
            key: Linear::new(p, "fame.key", (dim, dim), r, device)?,
            value: Linear::new(p, "fame.value", (dim, dim), r, device)?,
            router: PerHead::new(p, "fame.router", (h, n * dh, n), r, device)?,
            ffn_norm: PerHeadNorm::new(p, "fame.ffn_norm", h, dh, device)?,
            ffn_inner: PerHead::new(p, "fame.ffn_inner", (h, dh, dh), r, device)?,
            ffn_outer: PerHead::new(p, "fame.ffn_outer", (h, dh, dh), r, device)?,
            final_norm: PerHeadNorm::new(p, "fame.final_norm", h, dh, device)?,
            item_facets: p.normal("fame.item_facets", &[h, dim, dh], INIT_STD, r, device)?,
            gate: Linear::new(p, "fame.gate", (dim, h), r, device)?,
            encoder,
            params,
            config,
        })
    }

    /// The hyperparameters.
    pub fn config(&self) -> &FameConfig {
        &self.config
    }

    /// `[R, H, dh]` head states at `rows` of the block input `x: [B, T, D]`.
    fn head_states(&self, x: &Tensor, batch: &Batch, rows: &Tensor, dropout: &mut Dropout) -> Result<Tensor> {
        let (b, t, dim) = x.dims3()?;
        let (h, n) = (self.config.facets, self.config.experts);
        let dh = dim / h;
        let normed = self.norm.forward(x)?;
        // Queries [B, H, N*T, dh]: the N experts of a head share its keys, so
        // they are stacked along time and attend in one matmul.
        let q = self
            .queries
            .forward(&normed.reshape((b * t, dim))?)?
            .reshape((h, n, b, t, dh))?
            .permute((2, 0, 1, 3, 4))?
            .reshape((b, h, n * t, dh))?;
        let k = self
            .key
            .forward(&normed)?
            .reshape((b, t, h, dh))?
            .permute((0, 2, 3, 1))?
            .contiguous()?;
        let v = self
            .value
            .forward(&normed)?
            .reshape((b, t, h, dh))?
            .transpose(1, 2)?
            .contiguous()?;
        let scores = (q.matmul(&k)? * (1.0 / (dh as f64).sqrt()))?.reshape((b, h, n, t, t))?;
        let weights = softmax_last_dim(&scores.broadcast_add(&batch.attention_bias.unsqueeze(1)?)?)?;
        let weights = dropout.apply(&weights)?.reshape((b, h, n * t, t))?;
        // Expert outputs at the requested rows in the router plan's order:
        // [H, N, R, dh], expert e = h * N + n, rows ascending.
        let experts = weights
            .matmul(&v)?
            .reshape((b, h, n, t, dh))?
            .permute((1, 2, 0, 3, 4))?
            .reshape((h, n, b * t, dh))?
            .index_select(rows, 2)?;
        let r = experts.dim(2)?;
        // Router logits [R, H * N]: head h's linear layer over the
        // concatenated expert outputs, as the sum of each expert's slice.
        let logits = experts
            .reshape((h * n, r, dh))?
            .matmul(&self.router.weight.reshape((h * n, dh, n))?)?
            .reshape((h, n, r, n))?
            .sum(1)?
            .broadcast_add(&self.router.bias)?
            .transpose(0, 1)?
            .reshape((r, h * n))?;
        let routed = route(
            &logits,
            &RoutingOptions {
                groups: h,
                ..RoutingOptions::new(TopK::All)
            },
        )?;
        let mixed = combine(
            &experts.reshape((h * n * r, dh))?,
            &routed.weights,
            &routed.plan,
            None,
            None,
        )?
        .reshape((r, h, dh))?;
        let residual = x.reshape((b * t, h, dh))?.index_select(rows, 0)?;
        let state = (residual + dropout.apply(&mixed)?)?.transpose(0, 1)?.contiguous()?;
        let ffn = self
            .ffn_outer
            .forward(&dropout.apply(&self.ffn_inner.forward(&self.ffn_norm.forward(&state)?)?.relu()?)?)?;
        Ok(self
            .final_norm
            .forward(&(state + dropout.apply(&ffn)?)?)?
            .transpose(0, 1)?
            .contiguous()?)
    }
}

impl Recommender for Fame {
    fn params(&self) -> &Params {
        &self.params
    }

    fn dropout_rate(&self) -> f32 {
        self.config.encoder.dropout
    }

    fn query(&self, batch: &Batch, rows: &Tensor, dropout: &mut Dropout) -> Result<CatalogQuery> {
        let x = self.encoder.forward(batch, dropout)?;
        let user = self.head_states(&x, batch, rows, dropout)?;
        let (r, h, dh) = user.dims3()?;
        let gate_logits = self.gate.forward(&user.reshape((r, h * dh))?)?;
        // X_h = E W_f^h for all heads in one product: [V+1, D] x [D, H*dh].
        let table = &self.encoder.items;
        let facets = self.item_facets.permute((1, 0, 2))?.reshape((table.dim(1)?, h * dh))?;
        let items = table
            .matmul(&facets)?
            .reshape((table.dim(0)?, h, dh))?
            .transpose(0, 1)?
            .contiguous()?;
        Ok(CatalogQuery {
            user,
            gate_logits: Some(gate_logits),
            items,
            mixing: self.config.mixing,
            scale: 1.0,
        })
    }
}
