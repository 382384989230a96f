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
            // A gradient computed through a product with another parameter still
            // carries candle's op graph; detached, the moments do not chain every
            // step's graph to the next (which grew memory by ~350 MB a step).
            let grad = grad.detach();
            let m = ((&self.first[name] * c.beta1)? + (&grad * (1.0 - c.beta1))?)?;
            let v = ((&self.second[name] * c.beta2)? + (grad.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((&v / bias2)?.sqrt()? + c.eps)?;
            let update = ((&m / bias1)? / denom)?;
            let decayed = (var.as_tensor() * (1.0 - c.lr * c.weight_decay))?;
            var.set(&(decayed.detach() - (update * c.lr)?)?)?;
            self.first.insert(name.clone(), m);
            self.second.insert(name.clone(), v);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn first_step_is_sign_descent_and_moments_hold_no_graph() {
        let dev = Device::Cpu;
        let mut params = Params::new();
        let a = params
            .add("a", Tensor::new(&[[1.0f32, -2.0], [0.5, 3.0]], &dev).unwrap())
            .unwrap();
        let b = params
            .add("b", Tensor::new(&[[2.0f32, 1.0], [-1.0, 0.25]], &dev).unwrap())
            .unwrap();
        let before = a.to_vec2::<f32>().unwrap();
        // d(sum(a b))/da = rows of b summed: [3, -0.75] in every row; b's gradient goes through a.
        let grads = a.matmul(&b).unwrap().sum_all().unwrap().backward().unwrap();
        let config = AdamWConfig::default();
        let mut adam = AdamW::new(&params, config.clone()).unwrap();
        adam.step(&params, &grads).unwrap();
        let after = a.to_vec2::<f32>().unwrap();
        for (row_before, row_after) in before.iter().zip(&after) {
            for (&p, (&q, g)) in row_before.iter().zip(row_after.iter().zip([3.0f64, -0.75])) {
                let want = p as f64 * (1.0 - config.lr * config.weight_decay) - config.lr * g / (g.abs() + config.eps);
                assert!((q as f64 - want).abs() < 1e-6, "{q} vs {want}");
            }
        }
        // A moment that kept candle's op graph would chain every step's graph to the next.
        assert!(adam.first.values().chain(adam.second.values()).all(|m| !m.track_op()));
    }
}
