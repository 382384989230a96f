//! Writes, for each model, its initial weights, one training batch, and the
//! Rust loss and gradients to `<dir>/<model>.safetensors`, for the PyTorch
//! twin's parity test (`python_ref/models/test_parity.py` runs this).
//! Dropout is off so both sides compute the same function.
//!
//! `cargo run --release -p moerec-models --example parity_dump -- <dir>`

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use moerec_models::batch::TrainBatch;
use moerec_models::data;
use moerec_models::fame::{Fame, FameConfig};
use moerec_models::fuxi::{FeedForward, Fuxi, FuxiConfig, TableScoring};
use moerec_models::nn::Dropout;
use moerec_models::sasrec::{EncoderConfig, SasRec};
use moerec_models::scoring::Mixing;
use moerec_models::{Recommender, Result};

fn dump(
    model: &dyn Recommender,
    batch: &TrainBatch,
    shape: &[u32],
    extra: Vec<(&str, Tensor)>,
    path: &PathBuf,
) -> Result<()> {
    let loss = model.loss(&batch.batch, &batch.rows, &batch.targets, &mut Dropout::off())?;
    let grads = loss.backward()?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, var) in model.params().vars() {
        tensors.insert(format!("param.{name}"), var.as_tensor().clone());
        let grad = grads
            .get(var.as_tensor())
            .ok_or_else(|| moerec_models::Error::InvalidArgument {
                name: name.clone(),
                expected: "a gradient".into(),
                actual: "none".into(),
            })?;
        tensors.insert(format!("grad.{name}"), grad.clone());
    }
    tensors.insert("loss".into(), loss.reshape(1)?);
    tensors.insert("batch.inputs".into(), batch.batch.inputs.clone());
    tensors.insert("batch.rows".into(), batch.rows.clone());
    tensors.insert("batch.targets".into(), batch.targets.clone());
    tensors.insert("config".into(), Tensor::new(shape, &Device::Cpu)?);
    tensors.extend(extra.into_iter().map(|(k, v)| (k.to_string(), v)));
    candle_core::safetensors::save(&tensors, path)?;
    Ok(())
}

fn main() -> Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "target/parity".into()));
    std::fs::create_dir_all(&dir).map_err(|source| moerec_models::Error::Io {
        path: dir.clone(),
        source,
    })?;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/Beauty.txt");
    let dataset = data::load(&root, None)?;
    let split = data::split(&dataset, data::MAX_LEN)?;
    // 24 sequences, including the longest (the full width of 50).
    let longest = (0..split.train.len())
        .max_by_key(|&i| split.train[i].inputs.len())
        .unwrap_or(0);
    let mut picked: Vec<_> = split.train.iter().take(23).collect();
    picked.push(&split.train[longest]);
    let batch = TrainBatch::new(&picked, split.max_len, &Device::Cpu)?;
    let encoder = EncoderConfig::sasrec(dataset.num_items);
    let shape = |c: &EncoderConfig, facets: u32, experts: u32, mixing: u32| {
        vec![
            c.dim as u32,
            c.heads as u32,
            c.blocks as u32,
            c.max_len as u32,
            facets,
            experts,
            mixing,
        ]
    };
    let sasrec = SasRec::new(encoder.clone(), 11, &Device::Cpu)?;
    dump(
        &sasrec,
        &batch,
        &shape(&encoder, 1, 1, 0),
        vec![],
        &dir.join("sasrec.safetensors"),
    )?;
    for (mixing, code, name) in [
        (Mixing::Logits, 0, "fame_logits"),
        (Mixing::Probabilities, 1, "fame_probabilities"),
    ] {
        let config = FameConfig {
            mixing,
            ..FameConfig::new(dataset.num_items)
        };
        let fame = Fame::new(config.clone(), 12, &Device::Cpu)?;
        let path = dir.join(format!("{name}.safetensors"));
        dump(
            &fame,
            &batch,
            &shape(&encoder, config.facets as u32, config.experts as u32, code),
            vec![],
            &path,
        )?;
    }
    let mme = FuxiConfig::fuxi_mme(dataset.num_items);
    for (name, config) in [
        ("fuxi_alpha", FuxiConfig::fuxi_alpha(dataset.num_items)),
        ("fuxi_mme", mme.clone()),
        (
            "fuxi_mme_concatenated",
            FuxiConfig {
                scoring: TableScoring::Concatenated,
                ..mme
            },
        ),
    ] {
        let model = Fuxi::new(config.clone(), 13, &Device::Cpu)?;
        let (experts, k, balance) = match config.feed_forward {
            FeedForward::Dense => (0, 0, 0.0),
            FeedForward::Experts { experts, k, balance } => (experts as u32, k as u32, balance),
        };
        let c = &config;
        // config.fuxi: tables, experts (0 = dense), k; config.fuxi_f: temperature, balance.
        let extra = vec![
            (
                "config.fuxi",
                Tensor::new(&[c.tables as u32, experts, k], &Device::Cpu)?,
            ),
            ("config.fuxi_f", Tensor::new(&[c.temperature, balance], &Device::Cpu)?),
        ];
        let path = dir.join(format!("{name}.safetensors"));
        dump(&model, &batch, &shape(&c.encoder, 1, 1, 0), extra, &path)?;
    }
    println!("{}", dir.display());
    Ok(())
}
