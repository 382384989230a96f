//! Every model's training step on each candle device (`cpu::<name>`,
//! `cuda::<name>`, the harness of the kernel crate's candle tests): the
//! loss and every parameter's gradient against the same step on the CPU with
//! the composed candle forms ([`fused::composed`]). On the CPU this checks
//! the fused ops in a whole model; on CUDA (the `cuda` feature), the
//! composed forms and moerec's CUDA ops on candle's GPU tensors. Without a
//! usable GPU the CUDA trials show as ignored with the reason;
//! `MOEREC_REQUIRE_GPU=1` makes that a failure.

#[path = "../../tests/candle_common/mod.rs"]
mod candle_common;
mod common;

use candle_common::{assert_close, assert_close_with_floor, TestResult};
use candle_core::{Device, Tensor};
use moerec_models::batch::TrainBatch;
use moerec_models::fame::{Fame, FameConfig};
use moerec_models::fused;
use moerec_models::fuxi::{Fuxi, FuxiConfig};
use moerec_models::nn::Dropout;
use moerec_models::rng::Rng;
use moerec_models::sasrec::{EncoderConfig, SasRec};
use moerec_models::scoring::Mixing;
use moerec_models::train::{train, TrainConfig};
use moerec_models::Recommender;

/// DESIGN's f32 tolerance: `|a - r| <= 1e-4 (|r| + max|r|)`.
const RTOL: f64 = 1e-4;
/// Gradients that are zero in exact arithmetic (a key bias shifts every
/// score of a softmax row equally) come out as rounding noise of ~1e-12: the
/// tolerance's `max|r|` is at least this (as in python_ref/models/test_parity.py).
const GRAD_FLOOR: f64 = 1e-7;

type Make = fn(u32, &Device) -> moerec_models::Result<Box<dyn Recommender>>;

fn encoder(num_items: u32) -> EncoderConfig {
    EncoderConfig {
        dim: 32,
        ..EncoderConfig::sasrec(num_items)
    }
}

fn models() -> [(&'static str, Make); 4] {
    [
        ("SASRec", |v, d| Ok(Box::new(SasRec::new(encoder(v), 5, d)?))),
        ("FAME", |v, d| {
            let config = FameConfig {
                encoder: encoder(v),
                ..FameConfig::new(v)
            };
            Ok(Box::new(Fame::new(config, 5, d)?))
        }),
        ("FAME (probabilities)", |v, d| {
            let config = FameConfig {
                encoder: encoder(v),
                mixing: Mixing::Probabilities,
                ..FameConfig::new(v)
            };
            Ok(Box::new(Fame::new(config, 5, d)?))
        }),
        ("Fuxi-MME", |v, d| {
            let mut config = FuxiConfig::fuxi_mme(v);
            config.encoder.dim = 32;
            Ok(Box::new(Fuxi::new(config, 5, d)?))
        }),
    ]
}

/// A step's loss and each parameter's name and gradient.
type StepGrads = (Tensor, Vec<(String, Tensor)>);

/// One step's loss and the gradient of every parameter (by name order), with dropout on.
fn loss_and_gradients(make: Make, device: &Device) -> Result<StepGrads, Box<dyn std::error::Error>> {
    let (data, split) = common::beauty_slice(48);
    let model = make(data.num_items, device)?;
    let seqs: Vec<_> = split.train.iter().collect();
    let batch = TrainBatch::new(&seqs, split.max_len, device)?;
    let mut rng = Rng::new(1);
    let mut dropout = Dropout::new(model.dropout_rate(), &mut rng)?;
    let loss = model.loss(&batch.batch, &batch.rows, &batch.targets, &mut dropout)?;
    let grads = loss.backward()?;
    let mut out = Vec::new();
    for (name, var) in model.params().vars() {
        let grad = grads
            .get(var.as_tensor())
            .ok_or_else(|| format!("no gradient reached {name}"))?;
        out.push((name.clone(), grad.clone()));
    }
    Ok((loss, out))
}

fn a_training_step_matches_the_composed_cpu_step(device: &Device) -> TestResult {
    for (what, make) in models() {
        let (loss, grads) = loss_and_gradients(make, device)?;
        let (want, want_grads) = fused::composed(|| loss_and_gradients(make, &Device::Cpu))?;
        assert_close(&format!("{what} loss"), &loss, &want, RTOL)?;
        for ((name, grad), (_, want)) in grads.iter().zip(&want_grads) {
            assert_close_with_floor(&format!("{what} d{name}"), grad, want, RTOL, GRAD_FLOOR)?;
        }
    }
    Ok(())
}

fn training_evaluates_and_resumes_from_a_checkpoint(device: &Device) -> TestResult {
    let (data, split) = common::beauty_slice(100);
    let dir = std::env::temp_dir().join(format!(
        "moerec-models-devices-{}-{}",
        if device.is_cpu() { "cpu" } else { "cuda" },
        std::process::id()
    ));
    std::fs::create_dir_all(&dir)?;
    let config = |max_epochs, resume| TrainConfig {
        max_epochs,
        batch_size: 32,
        max_steps_per_epoch: Some(2),
        checkpoint: Some(dir.join("fame.safetensors")),
        resume,
        progress: false,
        ..TrainConfig::default()
    };
    let make = models()[1].1;
    let first = train(
        make(data.num_items, device)?.as_ref(),
        &split,
        &config(1, false),
        device,
    )?;
    let resumed = train(make(data.num_items, device)?.as_ref(), &split, &config(2, true), device)?;
    std::fs::remove_dir_all(&dir)?;
    for (report, epochs) in [(&first, 1), (&resumed, 2)] {
        if report.epochs_total != epochs || report.epochs.iter().any(|e| !e.loss.is_finite()) {
            return Err(format!(
                "epochs {} (want {epochs}), logs {:?}",
                report.epochs_total, report.epochs
            )
            .into());
        }
        for m in [&report.best_valid, &report.test] {
            let in_range = m.users == 100
                && m.hr.windows(2).all(|w| w[0] <= w[1])
                && m.hr[2] <= 1.0
                && m.ndcg.iter().zip(&m.hr).all(|(n, h)| (0.0..=*h).contains(n));
            if !in_range {
                return Err(format!("metrics out of range: {m:?}").into());
            }
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let bodies: [candle_common::Body; 2] = [
        (
            "a_training_step_matches_the_composed_cpu_step",
            a_training_step_matches_the_composed_cpu_step,
        ),
        (
            "training_evaluates_and_resumes_from_a_checkpoint",
            training_evaluates_and_resumes_from_a_checkpoint,
        ),
    ];
    candle_common::run(
        include_str!("devices.rs"),
        (!cfg!(feature = "cuda")).then_some("moerec-models' `cuda` feature is off (build with `--features cuda`)"),
        &bodies,
    )
}
