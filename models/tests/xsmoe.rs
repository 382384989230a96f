//! XSMoE and its baselines over a small MovieLens stream: the loss falls,
//! the side network expands and prunes between windows, metrics come out in
//! range, and the run is one JSON record.

use std::path::PathBuf;

use candle_core::Device;
use moerec_models::movielens::load_movielens;
use moerec_models::stream::{ItemContent, Stream};
use moerec_models::streaming::{self, StreamConfig};
use moerec_models::train::TrainConfig;
use moerec_models::xsmoe::{Side, Xsmoe, XsmoeConfig};

/// The first 15,000 ratings of the file (its first users) in 4 windows.
fn small_stream() -> (Stream, ItemContent) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/ml-latest-small");
    let data = load_movielens(&dir).expect("data/ml-latest-small ships with the repository");
    let stream = Stream::new(&data.ratings[..15_000], 4, 5).unwrap();
    let content = ItemContent::new(&stream, &data.movies, 16).unwrap();
    (stream, content)
}

fn run(side: Side, prune_below: f64) -> (Xsmoe, Vec<streaming::WindowLog>) {
    let (stream, content) = small_stream();
    let mut config = XsmoeConfig::new(stream.movie_of_item.len() as u32 - 1);
    config.encoder.dim = 32;
    config.bottleneck = 8;
    config.side = side;
    let mut model = Xsmoe::new(config, &content, 3, &Device::Cpu).unwrap();
    let stream_config = StreamConfig {
        valid_fraction: 0.15,
        prune_below,
        train: TrainConfig {
            max_epochs: 6,
            patience: 100,
            batch_size: 64,
            seed: 1,
            progress: false,
            ..TrainConfig::default()
        },
        max_windows: None,
    };
    let logs = streaming::run(&mut model, &stream, &stream_config, &Device::Cpu, &mut |_| {}).unwrap();
    (model, logs)
}

#[test]
fn xsmoe_trains_expands_and_prunes_over_windows() {
    // A threshold above 1/2 prunes one of every two experts: the prune path runs.
    let (model, logs) = run(Side::Expandable { experts: 1 }, 0.6);
    assert_eq!(logs.len(), 3);
    let experts: Vec<Vec<usize>> = logs.iter().map(|w| w.experts.clone()).collect();
    assert_eq!(experts, vec![vec![1, 1], vec![2, 2], vec![2, 2]]);
    assert_eq!(logs[0].pruned, vec![None, None], "one expert is never pruned");
    assert!(logs[1].pruned.iter().all(Option::is_some), "{:?}", logs[1].utilisation);
    assert_eq!(model.experts(), vec![2, 2]);
    for w in &logs {
        assert!(
            w.losses.last().unwrap() < &(w.losses[0] - 0.01),
            "window {}: {:?}",
            w.window,
            w.losses
        );
        for u in &w.utilisation {
            assert!((u.iter().sum::<f64>() - 1.0).abs() < 1e-6, "{u:?}");
        }
        for m in [&w.valid, &w.test] {
            assert!(m.users > 0);
            assert!(m.hr.windows(2).all(|p| p[0] <= p[1]) && m.hr[2] <= 1.0, "{m:?}");
            assert!(m.ndcg.iter().zip(&m.hr).all(|(n, h)| (0.0..=*h).contains(n)), "{m:?}");
        }
    }
    let line = streaming::record_json("xsmoe", "slice", 3, &logs, "", "test");
    assert!(line.starts_with("{\"model\":\"xsmoe\"") && line.contains("\"windows\":[{\"window\":0,\"experts\":[1, 1]"));
}

#[test]
fn the_baselines_keep_their_side_network() {
    let (model, logs) = run(Side::Fixed { experts: 2 }, 0.6);
    assert!(logs
        .iter()
        .all(|w| w.experts == vec![2, 2] && w.pruned == vec![None, None]));
    assert_eq!(model.experts(), vec![2, 2]);
    let (model, logs) = run(Side::BackboneOnly, 0.6);
    assert!(logs
        .iter()
        .all(|w| w.experts.is_empty() && w.losses.last() < w.losses.first()));
    assert!(model.experts().is_empty());
}
