//! Writes, for each model, its initial weights, one training batch, and the
//! Rust loss and gradients to `<dir>/<model>.safetensors`, for the PyTorch
//! twin's parity test (`python_ref/models/test_parity.py` runs this).
//! Dropout is off so both sides compute the same function.
//!
//! For the evaluation check it also writes a small synthetic data set
//! (`<dir>/eval_data.txt`: 96 users over 100 items, sequences of 3 to 70
//! items with repeats, so inputs are cut to 50 and targets may repeat a
//! history item) and, per model, `<dir>/eval_<model>.safetensors`: freshly
//! initialised weights for that catalog, the top-20 lists and the metrics
//! of the validation and test cases as `eval::evaluate` computes them.
//!
//! `cargo run --release -p moerec-models --example parity_dump -- <dir>`

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use moerec_models::batch::TrainBatch;
use moerec_models::data::{self, Split};
use moerec_models::eval::{evaluate, rankings, Metrics, CUTOFFS};
use moerec_models::fame::{Fame, FameConfig};
use moerec_models::fuxi::{FeedForward, Fuxi, FuxiConfig, TableScoring};
use moerec_models::movielens::load_movielens;
use moerec_models::nn::Dropout;
use moerec_models::rng::Rng;
use moerec_models::sasrec::{EncoderConfig, SasRec};
use moerec_models::scoring::Mixing;
use moerec_models::stream::{ItemContent, Stream};
use moerec_models::xsmoe::{Side, Xsmoe, XsmoeConfig};
use moerec_models::{Recommender, Result};

fn weights(model: &dyn Recommender, shape: &[u32]) -> Result<HashMap<String, Tensor>> {
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, var) in model.params().vars() {
        tensors.insert(format!("param.{name}"), var.as_tensor().clone());
    }
    tensors.insert("config".into(), Tensor::new(shape, &Device::Cpu)?);
    Ok(tensors)
}

fn dump(
    model: &dyn Recommender,
    batch: &TrainBatch,
    shape: &[u32],
    extra: Vec<(&str, Tensor)>,
    path: &PathBuf,
) -> Result<()> {
    let loss = model.loss(&batch.batch, &batch.rows, &batch.targets, &mut Dropout::off())?;
    let grads = loss.backward()?;
    let mut tensors = weights(model, shape)?;
    for (name, var) in model.params().vars() {
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
    tensors.extend(extra.into_iter().map(|(k, v)| (k.to_string(), v)));
    candle_core::safetensors::save(&tensors, path)?;
    Ok(())
}

/// The synthetic evaluation data (see the module doc), as file text.
fn eval_data(users: usize, items: usize) -> String {
    let mut rng = Rng::new(2024);
    (1..=users)
        .map(|user| {
            let len = 3 + rng.below(68);
            let seq: Vec<String> = (0..len).map(|_| (1 + rng.below(items)).to_string()).collect();
            format!("{user} {}\n", seq.join(" "))
        })
        .collect()
}

/// The model's weights with its top-20 lists and metrics on `split`'s
/// validation and test cases (ranking batches of 32: several widths).
fn dump_eval(model: &dyn Recommender, split: &Split, shape: &[u32], path: &PathBuf) -> Result<()> {
    let mut tensors = weights(model, shape)?;
    let depth = CUTOFFS[CUTOFFS.len() - 1];
    for (name, cases) in [("valid", &split.valid), ("test", &split.test)] {
        let top: Vec<u32> = rankings(model, cases, split.max_len, 32, depth, &Device::Cpu)?.concat();
        tensors.insert(
            format!("eval.{name}.top"),
            Tensor::from_vec(top, (cases.len(), depth), &Device::Cpu)?,
        );
        let Metrics { hr, ndcg, .. } = evaluate(model, cases, split.max_len, 32, &Device::Cpu)?;
        tensors.insert(
            format!("eval.{name}.metrics"),
            Tensor::new(&[hr, ndcg].concat()[..], &Device::Cpu)?,
        );
    }
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
    let text = eval_data(96, 100);
    let eval_path = dir.join("eval_data.txt");
    std::fs::write(&eval_path, &text).map_err(|source| moerec_models::Error::Io {
        path: eval_path.clone(),
        source,
    })?;
    let small = data::parse(&text, "eval_data.txt", None)?;
    let small_split = data::split(&small, data::MAX_LEN)?;
    let small_encoder = EncoderConfig::sasrec(small.num_items);
    dump_eval(
        &SasRec::new(small_encoder.clone(), 11, &Device::Cpu)?,
        &small_split,
        &shape(&small_encoder, 1, 1, 0),
        &dir.join("eval_sasrec.safetensors"),
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
        let small_config = FameConfig {
            mixing,
            ..FameConfig::new(small.num_items)
        };
        dump_eval(
            &Fame::new(small_config.clone(), 12, &Device::Cpu)?,
            &small_split,
            &shape(
                &small_encoder,
                small_config.facets as u32,
                small_config.experts as u32,
                code,
            ),
            &dir.join(format!("eval_{name}.safetensors")),
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
    dump_xsmoe(&dir)?;
    println!("{}", dir.display());
    Ok(())
}

/// XSMoE at the shape over a MovieLens stream, in the state of its
/// second window: layer 0 with a frozen and a pruned expert beside the new
/// trainable one, layer 1 with two frozen and one trainable; the window's
/// popularity bias and a batch of its training sequences. The frozen parts
/// (backbone states, frozen experts, active masks, item bias) go as `const.*`.
fn dump_xsmoe(dir: &std::path::Path) -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/ml-latest-small");
    let data = load_movielens(&root)?;
    let stream = Stream::new(&data.ratings[..15_000], 4, 5)?;
    let content = ItemContent::new(&stream, &data.movies, 64)?;
    let config = XsmoeConfig {
        side: Side::Expandable { experts: 2 },
        ..XsmoeConfig::new(stream.movie_of_item.len() as u32 - 1)
    };
    let mut model = Xsmoe::new(config.clone(), &content, 14, &Device::Cpu)?;
    model.set_window(&stream.split(0, 0.15, config.encoder.max_len)?)?;
    model.expand()?;
    model.prune(&[vec![0.6, 0.05, 0.35], vec![0.3, 0.3, 0.4]], 0.1)?;
    let window = stream.split(1, 0.15, config.encoder.max_len)?;
    model.set_window(&window)?;
    let picked: Vec<_> = window.train.iter().take(24).collect();
    let batch = TrainBatch::new(&picked, config.encoder.max_len, &Device::Cpu)?;
    let mut extra = vec![(
        "config.xsmoe".to_string(),
        Tensor::new(&[config.layers as u32], &Device::Cpu)?,
    )];
    for (l, state) in model.backbone()?.into_iter().enumerate() {
        extra.push((format!("const.backbone{l}"), state));
    }
    let bias = model.item_bias().expect("the window sets it").clone();
    extra.push(("const.item_bias".into(), bias));
    for (l, (frozen, active)) in model.frozen_experts().into_iter().enumerate() {
        if let Some((down, up)) = frozen {
            extra.push((format!("const.side{l}.frozen_down"), down));
            extra.push((format!("const.side{l}.frozen_up"), up));
        }
        let active: Vec<u32> = active.into_iter().map(u32::from).collect();
        extra.push((
            format!("const.side{l}.active"),
            Tensor::new(active.as_slice(), &Device::Cpu)?,
        ));
    }
    let c = &config.encoder;
    let shape = [c.dim as u32, c.heads as u32, c.blocks as u32, c.max_len as u32, 0, 0, 0];
    let extra = extra.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    dump(&model, &batch, &shape, extra, &dir.join("xsmoe.safetensors"))
}
