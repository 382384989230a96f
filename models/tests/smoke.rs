//! Each model trains for a few steps on a slice of Beauty: the loss falls,
//! metrics come out in range, a checkpoint round-trips, a resumed run ends
//! exactly where an uninterrupted one does, and nothing overwrites a checkpoint
//! unasked.

mod common;

use candle_core::Device;
use moerec_models::fame::{Fame, FameConfig};
use moerec_models::fuxi::{Fuxi, FuxiConfig};
use moerec_models::sasrec::{EncoderConfig, SasRec};
use moerec_models::train::{train, TrainConfig};
use moerec_models::{Error, Recommender};

fn config(checkpoint: Option<std::path::PathBuf>, max_epochs: u64) -> TrainConfig {
    TrainConfig {
        max_epochs,
        patience: 100,
        batch_size: 64,
        seed: 9,
        max_steps_per_epoch: Some(3),
        checkpoint,
        progress: false,
        ..TrainConfig::default()
    }
}

fn small_sasrec(num_items: u32) -> SasRec {
    let config = EncoderConfig {
        dim: 32,
        ..EncoderConfig::sasrec(num_items)
    };
    SasRec::new(config, 5, &Device::Cpu).unwrap()
}

fn weights(model: &dyn Recommender) -> Vec<Vec<f32>> {
    model
        .params()
        .vars()
        .values()
        .map(|v| v.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

/// Four short epochs on 400 users: the loss falls and the metrics are in range.
fn assert_loss_falls_and_metrics_are_computed(model: &dyn Recommender, split: &moerec_models::data::Split) {
    assert_loss_falls_with(model, split, &config(None, 4));
}

/// [`assert_loss_falls_and_metrics_are_computed`] with a given configuration.
fn assert_loss_falls_with(model: &dyn Recommender, split: &moerec_models::data::Split, config: &TrainConfig) {
    let report = train(model, split, config, &Device::Cpu).unwrap();
    let losses: Vec<f64> = report.epochs.iter().map(|e| e.loss).collect();
    assert!(losses[3] < losses[0] - 0.05, "loss did not fall: {losses:?}");
    for m in [&report.best_valid, &report.test] {
        assert_eq!(m.users, 400);
        assert!(m.hr.windows(2).all(|w| w[0] <= w[1]) && m.hr[2] <= 1.0, "{m:?}");
        assert!(m.ndcg.iter().zip(&m.hr).all(|(n, h)| (0.0..=*h).contains(n)), "{m:?}");
    }
}

/// Two epochs straight and one + one resumed from a checkpoint end with the
/// same weights and test metrics; a second start without `resume` refuses.
fn assert_checkpoint_resumes_exactly(
    make: &dyn Fn() -> Box<dyn Recommender>,
    split: &moerec_models::data::Split,
    dir: &std::path::Path,
) -> std::path::PathBuf {
    let straight_path = dir.join("straight.safetensors");
    let split_path = dir.join("split.safetensors");

    let straight = make();
    let straight_report = train(
        straight.as_ref(),
        split,
        &config(Some(straight_path.clone()), 2),
        &Device::Cpu,
    )
    .unwrap();

    let first = make();
    train(
        first.as_ref(),
        split,
        &config(Some(split_path.clone()), 1),
        &Device::Cpu,
    )
    .unwrap();
    // A second start without --resume or --overwrite must refuse.
    match train(
        first.as_ref(),
        split,
        &config(Some(split_path.clone()), 2),
        &Device::Cpu,
    ) {
        Err(Error::WouldOverwrite { path }) => assert_eq!(path, split_path),
        other => panic!("expected WouldOverwrite, got {other:?}"),
    }
    let resumed = make();
    let resumed_report = train(
        resumed.as_ref(),
        split,
        &TrainConfig {
            resume: true,
            ..config(Some(split_path.clone()), 2)
        },
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        weights(straight.as_ref()),
        weights(resumed.as_ref()),
        "the resumed run diverged"
    );
    assert_eq!(resumed_report.epochs_total, 2);
    assert_eq!(straight_report.test, resumed_report.test);
    split_path
}

fn temp_dir(what: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("moerec-models-smoke-{what}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn sasrec_loss_falls_and_metrics_are_computed() {
    let (data, split) = common::beauty_slice(400);
    assert_loss_falls_and_metrics_are_computed(&small_sasrec(data.num_items), &split);
}

#[test]
fn fame_loss_falls_and_metrics_are_computed() {
    let (data, split) = common::beauty_slice(400);
    let encoder = EncoderConfig {
        dim: 32,
        ..EncoderConfig::sasrec(data.num_items)
    };
    let model = Fame::new(
        FameConfig {
            encoder,
            ..FameConfig::new(data.num_items)
        },
        5,
        &Device::Cpu,
    )
    .unwrap();
    // FAME's loss moves more slowly from its initialisation: lr 0.01 shows the fall in twelve steps.
    let mut fast = config(None, 4);
    fast.adam.lr = 0.01;
    assert_loss_falls_with(&model, &split, &fast);
}

#[test]
fn sasrec_checkpoint_resumes_exactly_and_is_not_overwritten() {
    let dir = temp_dir("sasrec");
    let (data, split) = common::beauty_slice(200);
    let split_path = assert_checkpoint_resumes_exactly(&|| Box::new(small_sasrec(data.num_items)), &split, &dir);

    // Loading into a model of another shape names the mismatch.
    let other = SasRec::new(
        EncoderConfig {
            dim: 16,
            ..EncoderConfig::sasrec(data.num_items)
        },
        5,
        &Device::Cpu,
    )
    .unwrap();
    let err = train(
        &other,
        &split,
        &TrainConfig {
            resume: true,
            ..config(Some(split_path), 3)
        },
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("has shape"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn small_fuxi_mme(num_items: u32) -> Fuxi {
    let mut config = FuxiConfig::fuxi_mme(num_items);
    config.encoder.dim = 32;
    Fuxi::new(config, 5, &Device::Cpu).unwrap()
}

#[test]
fn fuxi_alpha_and_fuxi_mme_losses_fall_and_metrics_are_computed() {
    let (data, split) = common::beauty_slice(400);
    let mut alpha = FuxiConfig::fuxi_alpha(data.num_items);
    alpha.encoder.dim = 32;
    assert_loss_falls_and_metrics_are_computed(&Fuxi::new(alpha, 5, &Device::Cpu).unwrap(), &split);
    assert_loss_falls_and_metrics_are_computed(&small_fuxi_mme(data.num_items), &split);
}

#[test]
fn fuxi_mme_checkpoint_resumes_exactly() {
    let dir = temp_dir("fuxi-mme");
    let (data, split) = common::beauty_slice(200);
    assert_checkpoint_resumes_exactly(&|| Box::new(small_fuxi_mme(data.num_items)), &split, &dir);
    std::fs::remove_dir_all(&dir).unwrap();
}
