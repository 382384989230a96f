//! SASRec (Kang & McAuley, ICDM 2018): learned positions, causal
//! self-attention blocks, item embeddings tied between input and output,
//! cross-entropy over the whole catalog at every position.
//!
//! Choices where the paper leaves room (the PyTorch twin makes the same):
//! pre-norm blocks with a final layer norm (as the paper's code, which
//! normalises the queries), an output projection after attention (as
//! `torch.nn.MultiheadAttention`), padded keys masked out of attention (the
//! paper's code lets items attend to padding), full-catalog softmax instead of
//! the paper's one sampled negative, weights N(0, 0.02²).

use candle_core::{Device, Tensor};

use crate::batch::Batch;
use crate::error::{invalid, Result};
use crate::nn::{AttentionBlock, Dropout, LayerNorm, Params, INIT_STD};
use crate::rng::Rng;
use crate::scoring::{CatalogQuery, Mixing};
use crate::Recommender;

/// Hyperparameters shared by SASRec and the blocks FAME keeps from it.
#[derive(Clone, Debug, PartialEq)]
pub struct EncoderConfig {
    /// Catalog size (ids `1..=num_items`).
    pub num_items: u32,
    /// Model width D.
    pub dim: usize,
    /// Attention heads per block.
    pub heads: usize,
    /// Number of causal self-attention blocks.
    pub blocks: usize,
    /// Longest input sequence (number of positional embeddings).
    pub max_len: usize,
    /// Dropout rate during training.
    pub dropout: f32,
}

impl EncoderConfig {
    /// SASRec's defaults for a catalog: D = 64, 2 heads, 2 blocks, length 50, dropout 0.2.
    pub fn sasrec(num_items: u32) -> Self {
        Self {
            num_items,
            dim: 64,
            heads: 2,
            blocks: 2,
            max_len: crate::data::MAX_LEN,
            dropout: 0.2,
        }
    }
}

/// Item and position embeddings followed by causal self-attention blocks.
pub struct Encoder {
    /// `[V+1, D]` item embeddings, row 0 for padding; also the output table.
    pub items: Tensor,
    stack: CausalStack,
}

impl Encoder {
    /// Parameters `items`, `positions`, `block{i}.*`.
    pub fn new(params: &mut Params, config: &EncoderConfig, rng: &mut Rng, device: &Device) -> Result<Self> {
        if config.num_items == 0 {
            return Err(invalid(
                "encoder config",
                "non-zero catalog, width and length",
                format!("{config:?}"),
            ));
        }
        let items = params.normal(
            "items",
            &[config.num_items as usize + 1, config.dim],
            INIT_STD,
            rng,
            device,
        )?;
        let stack = CausalStack::new(params, config, rng, device)?;
        Ok(Self { items, stack })
    }

    /// `[B, T, D]` hidden states: `sqrt(D) E[ids] + P[positions]`, dropout, the blocks.
    pub fn forward(&self, batch: &Batch, dropout: &mut Dropout) -> Result<Tensor> {
        self.stack.forward(&self.items, batch, dropout)
    }
}

/// Learned positions and the causal self-attention blocks over item vectors
/// looked up in a table the caller supplies: SASRec's own embeddings, or
/// XSMoE's item representations (`crate::xsmoe`).
pub struct CausalStack {
    positions: Tensor,
    blocks: Vec<AttentionBlock>,
    dim: usize,
}

impl CausalStack {
    /// Parameters `positions`, `block{i}.*` (`config.num_items` is not used).
    pub fn new(params: &mut Params, config: &EncoderConfig, rng: &mut Rng, device: &Device) -> Result<Self> {
        if config.dim == 0 || config.max_len == 0 {
            return Err(invalid(
                "encoder config",
                "non-zero catalog, width and length",
                format!("{config:?}"),
            ));
        }
        let positions = params.normal("positions", &[config.max_len, config.dim], INIT_STD, rng, device)?;
        let blocks = (0..config.blocks)
            .map(|i| AttentionBlock::new(params, &format!("block{i}"), config.dim, config.heads, rng, device))
            .collect::<Result<_>>()?;
        Ok(Self {
            positions,
            blocks,
            dim: config.dim,
        })
    }

    /// `[B, T, D]` hidden states: `sqrt(D) items[ids] + P[positions]`,
    /// dropout, the blocks (`items: [V+1, D]`, row 0 for padding).
    pub fn forward(&self, items: &Tensor, batch: &Batch, dropout: &mut Dropout) -> Result<Tensor> {
        let (b, t) = (batch.size, batch.width);
        let items = items
            .index_select(&batch.inputs.flatten_all()?, 0)?
            .reshape((b, t, self.dim))?;
        let positions = self.positions.index_select(&batch.positions, 0)?;
        let mut x = dropout.apply(&(items * (self.dim as f64).sqrt())?.broadcast_add(&positions)?)?;
        for block in &self.blocks {
            x = block.forward(&x, &batch.attention_bias, dropout)?;
        }
        Ok(x)
    }
}

/// The SASRec model.
pub struct SasRec {
    params: Params,
    encoder: Encoder,
    final_norm: LayerNorm,
    config: EncoderConfig,
}

impl SasRec {
    /// A freshly initialised model; the same seed gives the same weights.
    pub fn new(config: EncoderConfig, seed: u64, device: &Device) -> Result<Self> {
        let mut params = Params::new();
        let mut rng = Rng::new(seed);
        let encoder = Encoder::new(&mut params, &config, &mut rng, device)?;
        let final_norm = LayerNorm::new(&mut params, "final_norm", config.dim, device)?;
        Ok(Self {
            params,
            encoder,
            final_norm,
            config,
        })
    }

    /// The hyperparameters.
    pub fn config(&self) -> &EncoderConfig {
        &self.config
    }
}

impl Recommender for SasRec {
    fn params(&self) -> &Params {
        &self.params
    }

    fn dropout_rate(&self) -> f32 {
        self.config.dropout
    }

    fn query(&self, batch: &Batch, rows: &Tensor, dropout: &mut Dropout) -> Result<CatalogQuery> {
        let hidden = self.final_norm.forward(&self.encoder.forward(batch, dropout)?)?;
        let user = hidden
            .reshape((batch.size * batch.width, self.config.dim))?
            .index_select(rows, 0)?
            .unsqueeze(1)?;
        Ok(CatalogQuery {
            user,
            gate_logits: None,
            items: self.encoder.items.clone(),
            mixing: Mixing::Logits,
            scale: 1.0,
        })
    }
}
