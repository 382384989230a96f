//! FuXi-alpha (Ye et al., "FuXi-α: Scaling Recommendation Model with Feature
//! Interaction Enhanced Transformer", WWW 2025) and Fuxi-MME (arXiv
//! 2510.25285: FuXi-alpha with H decoupled item tables and a top-k routed
//! mixture of SwiGLU experts in place of the FFN). One model type covers both:
//! FuXi-alpha is `tables = 1` with a dense FFN.
//!
//! A FuXi-alpha block, following the public reference implementation
//! (USTC-StarTeam/FuXi-alpha, `modeling/sequential/fuxi.py`):
//! - `x̂ = RMSN(x)`; one fused projection `SiLU(x̂ W_uvqk)` split into u, v, q, k;
//! - the adaptive multi-channel self-attention, per head:
//!   semantic `a_s = SiLU(q kᵀ) / n ⊙ M` and positional `a_p[i, j] = β_{i-j} ⊙ M`
//!   (`M` the causal mask with padded keys removed), each times v;
//! - `h = RMSN([a_s v ; a_p v]) ⊙ u`, `x ← x + W_o Drop(h) + b_o`;
//! - the second stage of the multi-stage FFN: `x ← x + SwiGLU(Drop(RMSN(x)))`.
//!
//! The temporal channel (a learned bias per bucketed time gap) needs
//! timestamps; the Amazon files have none, so it is absent (not zero-filled):
//! the gated width is two channels, not three.
//!
//! Choices where the reference code or the papers leave room (the PyTorch
//! twin in `python_ref/models/fuxi.py` makes the same):
//! - `n` in the semantic channel is the configured maximum length (50), a
//!   constant as in the reference (its padded length), so a batch cut to its
//!   longest sequence computes the same function as one padded to 50.
//! - The positional bias holds one scalar per causal distance `i - j` in
//!   `0..max_len` and is shared by the heads (the reference's `2n - 1`
//!   entries include the anti-causal half, which the mask always zeroes).
//! - RMS norms carry no gain (the reference calls `F.rms_norm` without a
//!   weight), eps 1e-6. Width per head: `dqk = dv = D / heads`; the FFN's
//!   hidden width is D (the reference's `ffn_multiply = 1`); projections
//!   and experts have no bias except `W_o`'s (as the reference's `lin0`).
//! - Inputs: `sqrt(D) E[ids] + P[positions]` with learned absolute positions
//!   and dropout, as the reference's input preprocessor; weights N(0, 0.02²)
//!   everywhere (the reference uses Xavier for its FFN).
//! - Scoring: the reference L2-normalises user states and item embeddings
//!   and divides by a temperature (0.05); here that is moerec's fused
//!   scoring with `scale = 1 / temperature` over L2-normalised operands.
//!
//! Fuxi-MME (its code is not public; the choices are ours):
//! - Multi-embedding: H tables `[H, V+1, D/H]` looked up per token by
//!   moerec's per-head embedding (padding id 0 gives zero rows) and
//!   concatenated into the D-wide token.
//! - Scoring ([`TableScoring`]): `PerHead` scores head h's slice of the final
//!   state against table h (each side L2-normalised per head) and mixes the
//!   heads' logits with a softmax gate `softmax(W_g x + b_g)` over the heads
//!   (moerec's fused gated scoring, Logits mixing); `Concatenated` is the
//!   H = 1 form: the whole state against the concatenated tables.
//! - MoE: every block's SwiGLU is replaced by E experts of the same shape
//!   (hidden width D each), softmax router `x̂ W_r` (no bias) on the normed
//!   input, top-k with the selected weights renormalised to sum 1 (so k
//!   experts add up to the scale of one dense FFN), padding tokens masked
//!   out of routing (they keep their residual), and the load-balance loss
//!   `coef * E sum_e f_e P_e` summed over blocks and added to the training
//!   loss (selection-bias balancing is not used). Defaults E = 4, k = 2,
//!   coef = 0.01 (Switch Transformer's), H = 4 tables.

use candle_core::{DType, Device, Tensor, D};
use moerec::candle::{combine, embedding, expert_layer, expert_layer_rows, route, RoutingOptions};
use moerec::experts::Activation;
use moerec::routing::TopK;

use crate::batch::Batch;
use crate::error::{invalid, Result};
use crate::nn::{Dropout, Linear, Params, INIT_STD};
use crate::rng::Rng;
use crate::sasrec::EncoderConfig;
use crate::scoring::{cross_entropy, CatalogQuery, Mixing};
use crate::Recommender;

/// The feed-forward stage of every block.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FeedForward {
    /// One SwiGLU (FuXi-alpha).
    Dense,
    /// `experts` SwiGLU experts, `k` per token, load-balance loss weight `balance` (Fuxi-MME).
    Experts {
        /// E.
        experts: usize,
        /// Experts per token, `1..=experts`.
        k: usize,
        /// The load-balance loss coefficient (>= 0).
        balance: f32,
    },
}

/// How the item tables score a user state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableScoring {
    /// Head h's slice of the state against table h, heads mixed by a learned gate.
    PerHead,
    /// The whole state against the concatenated tables (H = 1 scoring).
    Concatenated,
}

/// FuXi-alpha / Fuxi-MME hyperparameters.
#[derive(Clone, Debug, PartialEq)]
pub struct FuxiConfig {
    /// Catalog, width D, attention heads, blocks, longest input (positions,
    /// the positional bias, the semantic `1 / n`) and dropout, as SASRec's.
    pub encoder: EncoderConfig,
    /// H, the decoupled item tables (1 = one table of width D).
    pub tables: usize,
    /// How the tables score (irrelevant for one table).
    pub scoring: TableScoring,
    /// Dense FFN or routed experts.
    pub feed_forward: FeedForward,
    /// Scores are `<u, x> / temperature` over L2-normalised u and x.
    pub temperature: f32,
}

impl FuxiConfig {
    /// FuXi-alpha: D = 64, 2 heads, 2 blocks, length 50, dropout 0.2, one table, dense FFN, temperature 0.05.
    pub fn fuxi_alpha(num_items: u32) -> Self {
        Self {
            encoder: EncoderConfig::sasrec(num_items),
            tables: 1,
            scoring: TableScoring::PerHead,
            feed_forward: FeedForward::Dense,
            temperature: 0.05,
        }
    }

    /// Fuxi-MME: FuXi-alpha's shape with 4 tables scored per head and 4 experts, top-2, balance 0.01.
    pub fn fuxi_mme(num_items: u32) -> Self {
        Self {
            tables: 4,
            feed_forward: FeedForward::Experts {
                experts: 4,
                k: 2,
                balance: 0.01,
            },
            ..Self::fuxi_alpha(num_items)
        }
    }

    fn validate(&self) -> Result<()> {
        let e = &self.encoder;
        let d = e.dim;
        if e.num_items == 0 || d == 0 || e.max_len == 0 || e.blocks == 0 {
            return Err(invalid(
                "fuxi config",
                "non-zero catalog, width, length and blocks",
                format!("{self:?}"),
            ));
        }
        if e.heads == 0 || d % e.heads != 0 {
            return Err(invalid("heads", format!("a divisor of the width {d}"), e.heads));
        }
        if self.tables == 0 || d % self.tables != 0 {
            return Err(invalid("tables", format!("a divisor of the width {d}"), self.tables));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(invalid("temperature", "a positive number", self.temperature));
        }
        if let FeedForward::Experts { experts, k, balance } = self.feed_forward {
            if experts == 0 {
                return Err(invalid("experts", "at least 1", experts));
            }
            if k == 0 || k > experts {
                return Err(invalid("top-k", format!("1..={experts}"), k));
            }
            if !(balance.is_finite() && balance >= 0.0) {
                return Err(invalid("balance", "a finite number >= 0", balance));
            }
        }
        Ok(())
    }
}

/// RMS norm over the last dimension without a gain (eps [`RMS_NORM_EPS`]).
fn rms_norm(x: &Tensor) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(x.broadcast_div(&(ms + RMS_NORM_EPS)?.sqrt()?)?)
}

/// The RMS-norm epsilon (the reference's).
pub const RMS_NORM_EPS: f64 = 1e-6;

/// `x / ||x||` over the last dimension (eps [`L2_EPS`] under the root, so the zero padding row stays finite).
fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = (x.sqr()?.sum_keepdim(D::Minus1)? + L2_EPS)?.sqrt()?;
    Ok(x.broadcast_div(&norm)?)
}

/// The L2-normalisation epsilon.
pub const L2_EPS: f64 = 1e-12;

/// `x: [..., in] @ w: [in, out]`.
fn project(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let inner = dims[dims.len() - 1];
    let out = x.reshape((x.elem_count() / inner, inner))?.matmul(w)?;
    let mut shape = dims.to_vec();
    *shape.last_mut().expect("a projected input has at least one dimension") = w.dim(1)?;
    Ok(out.reshape(shape)?)
}

/// `silu(h[.., :F]) * h[.., F:]` (moerec's SwiGlu layout: halves, not interleaved).
fn swiglu(h: &Tensor) -> Result<Tensor> {
    let f = h.dim(D::Minus1)? / 2;
    Ok((h.narrow(D::Minus1, 0, f)?.silu()? * h.narrow(D::Minus1, f, f)?)?)
}

enum Ffn {
    Dense {
        up: Tensor,
        down: Tensor,
    },
    Experts {
        router: Tensor,
        up: Tensor,
        down: Tensor,
        k: usize,
        balance: f32,
    },
}

/// What every block of one forward pass shares.
struct Context {
    /// `[B, 1, T, T]` 1 where query t sees key s, else 0.
    mask: Tensor,
    /// `[T * T]` u32 `max(t - s, 0)`, the positional bias rows.
    distance: Tensor,
    /// `[B * T]` u32, 1 for items, 0 for padding (routing's token mask).
    tokens: Tensor,
}

struct Block {
    uvqk: Tensor,
    position_bias: Tensor,
    output: Linear,
    ffn: Ffn,
    heads: usize,
    max_len: usize,
}

/// The channels of the multi-channel attention: semantic and positional.
const CHANNELS: usize = 2;

impl Block {
    fn new(params: &mut Params, name: &str, config: &FuxiConfig, rng: &mut Rng, device: &Device) -> Result<Self> {
        let d = config.encoder.dim;
        let width = CHANNELS * d + 3 * d;
        let ffn = match config.feed_forward {
            FeedForward::Dense => Ffn::Dense {
                up: params.normal(&format!("{name}.ffn.up"), &[d, 2 * d], INIT_STD, rng, device)?,
                down: params.normal(&format!("{name}.ffn.down"), &[d, d], INIT_STD, rng, device)?,
            },
            FeedForward::Experts { experts, k, balance } => Ffn::Experts {
                router: params.normal(&format!("{name}.moe.router"), &[d, experts], INIT_STD, rng, device)?,
                up: params.normal(&format!("{name}.moe.up"), &[experts, d, 2 * d], INIT_STD, rng, device)?,
                down: params.normal(&format!("{name}.moe.down"), &[experts, d, d], INIT_STD, rng, device)?,
                k,
                balance,
            },
        };
        Ok(Self {
            uvqk: params.normal(&format!("{name}.uvqk"), &[d, width], INIT_STD, rng, device)?,
            position_bias: params.normal(
                &format!("{name}.position_bias"),
                &[config.encoder.max_len],
                INIT_STD,
                rng,
                device,
            )?,
            output: Linear::new(params, &format!("{name}.output"), (CHANNELS * d, d), rng, device)?,
            ffn,
            heads: config.encoder.heads,
            max_len: config.encoder.max_len,
        })
    }

    /// `x: [B, T, D]` -> the block's output and its load-balance loss (experts only).
    fn forward(&self, x: &Tensor, ctx: &Context, dropout: &mut Dropout) -> Result<(Tensor, Option<Tensor>)> {
        let (b, t, d) = x.dims3()?;
        let (h, dh) = (self.heads, d / self.heads);
        let proj = project(&rms_norm(x)?, &self.uvqk)?.silu()?;
        let u = proj.narrow(2, 0, CHANNELS * d)?;
        let split = |at: usize| -> Result<Tensor> {
            Ok(proj
                .narrow(2, at, d)?
                .reshape((b, t, h, dh))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let v = proj.narrow(2, CHANNELS * d, d)?.contiguous()?;
        let (q, k) = (split((CHANNELS + 1) * d)?, split((CHANNELS + 2) * d)?);
        let semantic = (q.matmul(&k.transpose(2, 3)?.contiguous()?)?.silu()? / self.max_len as f64)?;
        let semantic = semantic
            .broadcast_mul(&ctx.mask)?
            .matmul(&v.reshape((b, t, h, dh))?.transpose(1, 2)?.contiguous()?)?
            .transpose(1, 2)?;
        // The positional weights are shared by the heads: one [T, T] x [T, H dv] product per sequence.
        let positional = self.position_bias.index_select(&ctx.distance, 0)?.reshape((1, t, t))?;
        let positional = positional
            .broadcast_mul(&ctx.mask.squeeze(1)?)?
            .matmul(&v)?
            .reshape((b, t, h, dh))?;
        // [B, T, H, 2 dv] -> [B, T, 2 D]: per head, semantic then positional.
        let channels = Tensor::cat(&[semantic, positional], 3)?.reshape((b, t, CHANNELS * d))?;
        let gated = (rms_norm(&channels)? * u)?;
        let x = (x + self.output.forward(&dropout.apply(&gated)?)?)?;
        let normed = dropout.apply(&rms_norm(&x)?)?;
        match &self.ffn {
            Ffn::Dense { up, down } => {
                let y = project(&swiglu(&project(&normed, up)?)?, down)?;
                Ok(((x + y)?, None))
            }
            Ffn::Experts {
                router,
                up,
                down,
                k,
                balance,
            } => {
                let normed = normed.reshape((b * t, d))?;
                let options = RoutingOptions {
                    renormalize: true,
                    token_mask: Some(ctx.tokens.clone()),
                    ..RoutingOptions::new(TopK::K(*k))
                };
                let routed = route(&normed.matmul(router)?, &options)?;
                let hidden = expert_layer(&normed, &routed.plan, up, None, Activation::SwiGlu)?;
                let y = expert_layer_rows(&hidden, &routed.plan, down, None, Activation::None)?;
                let out = combine(&y, &routed.weights, &routed.plan, Some(&x.reshape((b * t, d))?), None)?;
                Ok((out.reshape((b, t, d))?, Some((routed.lb_loss * *balance as f64)?)))
            }
        }
    }
}

/// The FuXi-alpha / Fuxi-MME model.
pub struct Fuxi {
    params: Params,
    /// `[H, V+1, D/H]` item tables, row 0 for padding; also the output tables.
    tables: Tensor,
    positions: Tensor,
    blocks: Vec<Block>,
    gate: Option<Linear>,
    config: FuxiConfig,
}

impl Fuxi {
    /// A freshly initialised model; the same seed gives the same weights.
    pub fn new(config: FuxiConfig, seed: u64, device: &Device) -> Result<Self> {
        config.validate()?;
        let mut params = Params::new();
        let mut rng = Rng::new(seed);
        let (d, h) = (config.encoder.dim, config.tables);
        let rows = config.encoder.num_items as usize + 1;
        let tables = params.normal("item_tables", &[h, rows, d / h], INIT_STD, &mut rng, device)?;
        let positions = params.normal("positions", &[config.encoder.max_len, d], INIT_STD, &mut rng, device)?;
        let blocks = (0..config.encoder.blocks)
            .map(|i| Block::new(&mut params, &format!("block{i}"), &config, &mut rng, device))
            .collect::<Result<_>>()?;
        let gate = (h > 1 && config.scoring == TableScoring::PerHead)
            .then(|| Linear::new(&mut params, "gate", (d, h), &mut rng, device))
            .transpose()?;
        Ok(Self {
            params,
            tables,
            positions,
            blocks,
            gate,
            config,
        })
    }

    /// The hyperparameters.
    pub fn config(&self) -> &FuxiConfig {
        &self.config
    }

    /// The scoring inputs at `rows` and the blocks' summed load-balance loss.
    fn forward(&self, batch: &Batch, rows: &Tensor, dropout: &mut Dropout) -> Result<(CatalogQuery, Option<Tensor>)> {
        let (b, t, d) = (batch.size, batch.width, self.config.encoder.dim);
        let device = batch.inputs.device();
        let items = embedding(&self.tables, &batch.inputs, Some(0))?.reshape((b, t, d))?;
        let positions = self.positions.index_select(&batch.positions, 0)?;
        let distance: Vec<u32> = (0..t * t).map(|i| (i / t).saturating_sub(i % t) as u32).collect();
        let ctx = Context {
            mask: batch.attention_bias.exp()?,
            distance: Tensor::from_vec(distance, t * t, device)?,
            tokens: batch.inputs.ne(0u32)?.to_dtype(DType::U32)?.flatten_all()?,
        };
        let mut x = dropout.apply(&(items * (d as f64).sqrt())?.broadcast_add(&positions)?)?;
        let mut balance: Option<Tensor> = None;
        for block in &self.blocks {
            let (next, loss) = block.forward(&x, &ctx, dropout)?;
            x = next;
            balance = match (balance, loss) {
                (Some(a), Some(l)) => Some((a + l)?),
                (a, l) => a.or(l),
            };
        }
        let state = x.reshape((b * t, d))?.index_select(rows, 0)?;
        let r = state.dim(0)?;
        let h = self.config.tables;
        let scale_query = |user: Tensor, gate_logits: Option<Tensor>, items: Tensor| CatalogQuery {
            user,
            gate_logits,
            items,
            mixing: Mixing::Logits,
            scale: 1.0 / self.config.temperature,
        };
        let query = match &self.gate {
            Some(gate) => scale_query(
                l2_normalize(&state.reshape((r, h, d / h))?)?,
                Some(gate.forward(&state)?),
                l2_normalize(&self.tables)?,
            ),
            None => {
                let table = self.tables.transpose(0, 1)?.reshape((self.tables.dim(1)?, d))?;
                scale_query(l2_normalize(&state)?.unsqueeze(1)?, None, l2_normalize(&table)?)
            }
        };
        Ok((query, balance))
    }
}

impl Recommender for Fuxi {
    fn params(&self) -> &Params {
        &self.params
    }

    fn dropout_rate(&self) -> f32 {
        self.config.encoder.dropout
    }

    fn query(&self, batch: &Batch, rows: &Tensor, dropout: &mut Dropout) -> Result<CatalogQuery> {
        Ok(self.forward(batch, rows, dropout)?.0)
    }

    fn loss(&self, batch: &Batch, rows: &Tensor, targets: &Tensor, dropout: &mut Dropout) -> Result<Tensor> {
        let (query, balance) = self.forward(batch, rows, dropout)?;
        let loss = cross_entropy(&query, targets)?;
        Ok(match balance {
            Some(b) => (loss + b)?,
            None => loss,
        })
    }
}
