//! Every parameter of every model receives a non-zero gradient from the
//! training loss. This is what catches candle 0.11 ops that run without a
//! backward (its layer norms and softmax): upstream parameters would get none.

mod common;

use candle_core::Device;
use moerec_models::batch::TrainBatch;
use moerec_models::nn::Dropout;
use moerec_models::rng::Rng;
use moerec_models::sasrec::{EncoderConfig, SasRec};
use moerec_models::Recommender;

fn assert_every_parameter_learns(model: &dyn Recommender, what: &str) {
    let (_, split) = common::beauty_slice(64);
    let seqs: Vec<_> = split.train.iter().collect();
    let batch = TrainBatch::new(&seqs, split.max_len, &Device::Cpu).unwrap();
    let mut rng = Rng::new(1);
    let mut dropout = Dropout::new(model.dropout_rate(), &mut rng).unwrap();
    let loss = model
        .loss(&batch.batch, &batch.rows, &batch.targets, &mut dropout)
        .unwrap();
    let grads = loss.backward().unwrap();
    let mut silent = Vec::new();
    for (name, var) in model.params().vars() {
        let norm = grads
            .get(var.as_tensor())
            .map(|g| g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap())
            .unwrap_or(0.0);
        if !(norm > 0.0 && norm.is_finite()) {
            silent.push(format!("{name} (|grad| sum {norm})"));
        }
    }
    assert!(silent.is_empty(), "{what}: parameters with no gradient: {silent:?}");
}

#[test]
fn sasrec_every_parameter_gets_a_gradient() {
    let model = SasRec::new(EncoderConfig::sasrec(12101), 3, &Device::Cpu).unwrap();
    assert_every_parameter_learns(&model, "SASRec");
}

#[test]
fn fame_every_parameter_gets_a_gradient_with_both_mixings() {
    use moerec_models::fame::{Fame, FameConfig};
    use moerec_models::scoring::Mixing;
    for mixing in [Mixing::Logits, Mixing::Probabilities] {
        let model = Fame::new(
            FameConfig {
                mixing,
                ..FameConfig::new(12101)
            },
            3,
            &Device::Cpu,
        )
        .unwrap();
        assert_every_parameter_learns(&model, &format!("FAME ({mixing:?})"));
    }
}

#[test]
fn fuxi_alpha_and_fuxi_mme_every_parameter_gets_a_gradient() {
    use moerec_models::fuxi::{Fuxi, FuxiConfig, TableScoring};
    let mme = FuxiConfig::fuxi_mme(12101);
    for (config, what) in [
        (FuxiConfig::fuxi_alpha(12101), "FuXi-alpha"),
        (mme.clone(), "Fuxi-MME (per-head scoring)"),
        (
            FuxiConfig {
                scoring: TableScoring::Concatenated,
                ..mme
            },
            "Fuxi-MME (concatenated scoring)",
        ),
    ] {
        let model = Fuxi::new(config, 3, &Device::Cpu).unwrap();
        assert_every_parameter_learns(&model, what);
    }
}
