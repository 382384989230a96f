//! AdamW (Loshchilov & Hutter) with its state exposed for checkpoints:
//! candle-nn's `AdamW` keeps its moments private, so a run could not resume
//! where it stopped. Same update as `torch.optim.AdamW`.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::Tensor;

use crate::error::Result;
use crate::nn::Params;

/// AdamW hyperparameters.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate (1e-3).
    pub lr: f64,
    /// β1 (0.9).
    pub beta1: f64,
    /// β2 (0.999).
    pub beta2: f64,
    /// ε (1e-8).
    pub eps: f64,
    /// Decoupled weight decay (0.01, PyTorch's default).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// The optimiser: first and second moments per parameter name, and the step count.
pub struct AdamW {
    config: AdamWConfig,
    /// Steps taken.
    pub step: u64,
    /// First moments by parameter name.
    pub first: BTreeMap<String, Tensor>,
    /// Second moments by parameter name.
    pub second: BTreeMap<String, Tensor>,
}

impl AdamW {
    /// Zero moments for every parameter.
    pub fn new(params: &Params, config: AdamWConfig) -> Result<Self> {
        let zeros = || -> Result<BTreeMap<String, Tensor>> {
            params
                .vars()
                .iter()
                .map(|(name, var)| Ok((name.clone(), var.zeros_like()?)))
                .collect()
        };
        Ok(Self {
            config,
            step: 0,
            first: zeros()?,
            second: zeros()?,
        })
    }

    /// One update of every parameter that has a gradient in `grads`.
    pub fn step(&mut self, params: &Params, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let c = &self.config;
        let bias1 = 1.0 - c.beta1.powf(self.step as f64);
        let bias2 = 1.0 - c.beta2.powf(self.step as f64);
        for (name, var) in params.vars() {
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
            let m = ((&self.first[name] * c.beta1)? + (grad * (1.0 - c.beta1))?)?;
            let v = ((&self.second[name] * c.beta2)? + (grad.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((&v / bias2)?.sqrt()? + c.eps)?;
            let update = ((&m / bias1)? / denom)?;
            let decayed = (var.as_tensor() * (1.0 - c.lr * c.weight_decay))?;
            var.set(&(decayed - (update * c.lr)?)?)?;
            self.first.insert(name.clone(), m);
            self.second.insert(name.clone(), v);
        }
        Ok(())
    }
}
