//! moerec's seed models — SASRec, FAME, FuXi-alpha, Fuxi-MME and XSMoE — on candle, with the data
//! pipeline, full-catalog evaluation and the trainer behind the `train` binary.
//!
//! Layout by concern: [`data`] (files, leave-one-out split), [`batch`],
//! [`nn`] (layers with a backward), [`scoring`] (catalog cross-entropy and
//! top-n), [`eval`], one module per model, [`optim`], [`checkpoint`], [`train`].

#![warn(missing_docs)]

pub mod alloc;
pub mod attention;
pub mod batch;
pub mod checkpoint;
pub mod data;
pub mod dense;
pub mod device;
pub mod error;
pub mod eval;
pub mod fame;
pub mod fused;
pub mod fuxi;
pub mod movielens;
pub mod nn;
pub mod optim;
pub mod record;
pub mod rng;
pub mod sasrec;
pub mod scoring;
pub mod stream;
pub mod streaming;
pub mod train;
pub mod xsmoe;

use candle_core::Tensor;

pub use error::{Error, Result};

/// A next-item model: encodes a batch and hands user states to the catalog scorer.
pub trait Recommender {
    /// Every trainable parameter.
    fn params(&self) -> &nn::Params;
    /// The dropout rate training uses.
    fn dropout_rate(&self) -> f32;
    /// The scoring inputs at `rows` (`[R]` u32 flat `b * T + t` indices).
    fn query(&self, batch: &batch::Batch, rows: &Tensor, dropout: &mut nn::Dropout) -> Result<scoring::CatalogQuery>;

    /// The training loss at `rows` with `targets` (`[R]` u32): the catalog
    /// cross-entropy, plus whatever auxiliary loss the model adds (a
    /// mixture's load balance).
    fn loss(&self, batch: &batch::Batch, rows: &Tensor, targets: &Tensor, dropout: &mut nn::Dropout) -> Result<Tensor> {
        scoring::cross_entropy(&self.query(batch, rows, dropout)?, targets)
    }
}
