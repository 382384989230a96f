//! Training checkpoints in safetensors: the weights, AdamW's moments, the
//! best epoch's weights and the loop's counters, so a stopped run resumes
//! exactly where it was (same seed stream, same result).
//!
//! Tensor names: `param.<name>`, `best.<name>`, `adam.m.<name>`,
//! `adam.v.<name>`, and `state.*` scalars. A file is written to a temporary
//! name and renamed, so a crash never leaves half a checkpoint.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::nn::Params;
use crate::optim::AdamW;

/// The training loop's counters.
#[derive(Clone, Debug, PartialEq)]
pub struct LoopState {
    /// Epochs completed.
    pub epoch: u64,
    /// The epoch with the best validation NDCG@10 (0 = none yet).
    pub best_epoch: u64,
    /// That NDCG@10.
    pub best_ndcg10: f64,
    /// The generator's state after the last completed epoch.
    pub rng_state: u64,
}

/// Writes a checkpoint to `path` (replacing the run's own earlier one).
pub fn save(
    path: &Path,
    params: &Params,
    best: &HashMap<String, Tensor>,
    adam: &AdamW,
    state: &LoopState,
) -> Result<()> {
    let mut tensors = HashMap::new();
    for (name, var) in params.vars() {
        tensors.insert(format!("param.{name}"), var.as_tensor().clone());
        tensors.insert(format!("adam.m.{name}"), adam.first[name].clone());
        tensors.insert(format!("adam.v.{name}"), adam.second[name].clone());
    }
    for (name, t) in best {
        tensors.insert(format!("best.{name}"), t.clone());
    }
    let cpu = Device::Cpu;
    let split = |v: u64| Tensor::new(&[(v >> 32) as u32, v as u32], &cpu);
    tensors.insert("state.epoch".into(), split(state.epoch)?);
    tensors.insert("state.best_epoch".into(), split(state.best_epoch)?);
    tensors.insert("state.best_ndcg10".into(), Tensor::new(&[state.best_ndcg10], &cpu)?);
    tensors.insert("state.rng".into(), split(state.rng_state)?);
    tensors.insert("state.adam_step".into(), split(adam.step)?);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::rename(&tmp, path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Loads a checkpoint into `params` and `adam`; returns the best weights and the counters.
/// Every parameter must be present with its shape, and nothing else.
pub fn load(
    path: &Path,
    params: &Params,
    adam: &mut AdamW,
    device: &Device,
) -> Result<(HashMap<String, Tensor>, LoopState)> {
    let bad = |message: String| Error::Checkpoint {
        path: path.to_path_buf(),
        message,
    };
    if !path.exists() {
        return Err(bad("no such file".into()));
    }
    let mut tensors = candle_core::safetensors::load(path, device)?;
    let mut take = |name: String, shape: &[usize]| -> Result<Tensor> {
        let t = tensors
            .remove(&name)
            .ok_or_else(|| bad(format!("missing tensor {name}")))?;
        if t.dims() != shape {
            return Err(bad(format!(
                "{name} has shape {:?}, the model needs {shape:?}",
                t.dims()
            )));
        }
        Ok(t)
    };
    let mut best = HashMap::new();
    for (name, var) in params.vars() {
        let dims = var.dims().to_vec();
        var.set(&take(format!("param.{name}"), &dims)?)?;
        adam.first.insert(name.clone(), take(format!("adam.m.{name}"), &dims)?);
        adam.second.insert(name.clone(), take(format!("adam.v.{name}"), &dims)?);
        if let Ok(t) = take(format!("best.{name}"), &dims) {
            best.insert(name.clone(), t);
        }
    }
    let mut joined = |name: &str| -> Result<u64> {
        let v = take(format!("state.{name}"), &[2])?.to_vec1::<u32>()?;
        Ok(((v[0] as u64) << 32) | v[1] as u64)
    };
    let state = LoopState {
        epoch: joined("epoch")?,
        best_epoch: joined("best_epoch")?,
        rng_state: joined("rng")?,
        best_ndcg10: 0.0,
    };
    adam.step = joined("adam_step")?;
    let best_ndcg10 = take("state.best_ndcg10".into(), &[1])?.to_vec1::<f64>()?[0];
    if let Some(extra) = tensors.keys().next() {
        return Err(bad(format!(
            "unexpected tensor {extra}: was it written by another model?"
        )));
    }
    if state.best_epoch > 0 && best.len() != params.vars().len() {
        return Err(bad("best-epoch weights are incomplete".into()));
    }
    Ok((best, LoopState { best_ndcg10, ..state }))
}
