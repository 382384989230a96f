//! The streaming protocol's training loop (XSMoE, see [`crate::xsmoe`]):
//! for each window t, train on its first 85% with early stopping on the
//! rest, test on window t + 1, then prune and expand the side network
//! (XSMoE) or keep it (the baselines), and go on from the best weights.
//!
//! Choices: one fresh AdamW per window (the reference builds a new optimiser
//! after each expansion); window t's shuffling and dropout are seeded with
//! `seed + t`; metrics are averaged over the windows with equal weight (the
//! reference's average), not over users.

use candle_core::Device;

use crate::data::Split;
use crate::error::Result;
use crate::eval::{Metrics, CUTOFFS};
use crate::record::{self, json_string};
use crate::stream::Stream;
use crate::train::{train, TrainConfig};
use crate::xsmoe::Xsmoe;

/// How to run the stream.
#[derive(Clone, Debug)]
pub struct StreamConfig {
    /// Fraction of each window that validates (0.15).
    pub valid_fraction: f64,
    /// Prune the least-utilised expert below this normalised share (0.1).
    pub prune_below: f64,
    /// Training within a window (its seed is the run's; window t uses `seed + t`).
    pub train: TrainConfig,
    /// Stop after this many windows (`None` = all; smoke runs).
    pub max_windows: Option<usize>,
}

/// One window's outcome.
#[derive(Clone, Debug)]
pub struct WindowLog {
    /// The training window t (tested on t + 1).
    pub window: usize,
    /// Active experts per side layer while training on it.
    pub experts: Vec<usize>,
    /// Training sequences, validation and test cases.
    pub sizes: [usize; 3],
    /// Validation metrics at the best epoch.
    pub valid: Metrics,
    /// Test metrics (window t + 1) at the best epoch.
    pub test: Metrics,
    /// Epochs run, and the best one.
    pub epochs: (u64, u64),
    /// Mean training loss of each epoch.
    pub losses: Vec<f64>,
    /// Wall seconds of the training steps (validation, test and utilisation not counted).
    pub train_seconds: f64,
    /// Process CPU seconds of the same (`None` off Linux).
    pub train_cpu_seconds: Option<f64>,
    /// Normalised utilisation per side layer after training.
    pub utilisation: Vec<Vec<f64>>,
    /// The expert pruned per side layer after the window.
    pub pruned: Vec<Option<usize>>,
}

/// Runs the stream on `model`; `on_window` sees each window's log as it ends.
pub fn run(
    model: &mut Xsmoe,
    stream: &Stream,
    config: &StreamConfig,
    device: &Device,
    on_window: &mut dyn FnMut(&WindowLog),
) -> Result<Vec<WindowLog>> {
    let max_len = model.config().encoder.max_len;
    let windows = (stream.windows.len() - 1).min(config.max_windows.unwrap_or(usize::MAX));
    let mut logs = Vec::new();
    for t in 0..windows {
        let window = stream.split(t, config.valid_fraction, max_len)?;
        model.set_window(&window)?;
        let experts = model.experts();
        let split = Split {
            num_items: window.num_items,
            max_len,
            train: window.train,
            valid: window.valid,
            test: window.test,
        };
        let train_config = TrainConfig {
            seed: config.train.seed + t as u64,
            keep_best: true,
            ..config.train.clone()
        };
        let report = train(&*model, &split, &train_config, device)?;
        let train_seconds: f64 = report.epochs.iter().map(|e| e.train_seconds).sum();
        let train_cpu_seconds = report.epochs.iter().map(|e| e.train_cpu_seconds).sum();
        let items: Vec<u32> = split
            .train
            .iter()
            .flat_map(|s| s.inputs.iter().chain(s.targets.last()))
            .copied()
            .collect();
        let utilisation = model.utilisation(&items)?;
        let pruned = model.next_window(&utilisation, config.prune_below)?;
        let log = WindowLog {
            window: t,
            experts,
            sizes: [split.train.len(), split.valid.len(), split.test.len()],
            valid: report.best_valid,
            test: report.test,
            epochs: (report.epochs_total, report.best_epoch),
            losses: report.epochs.iter().map(|e| e.loss).collect(),
            train_seconds,
            train_cpu_seconds,
            utilisation,
            pruned,
        };
        on_window(&log);
        logs.push(log);
    }
    Ok(logs)
}

/// The metrics averaged over windows: `(hr, ndcg)` at [`CUTOFFS`].
pub fn average(logs: &[WindowLog]) -> ([f64; 3], [f64; 3]) {
    let n = logs.len().max(1) as f64;
    let mut hr = [0.0; 3];
    let mut ndcg = [0.0; 3];
    for log in logs {
        for i in 0..CUTOFFS.len() {
            hr[i] += log.test.hr[i] / n;
            ndcg[i] += log.test.ndcg[i] / n;
        }
    }
    (hr, ndcg)
}

/// One JSON line for a whole stream run: per-window and averaged test
/// metrics, experts, times, and where and how it ran.
pub fn record_json(model: &str, dataset: &str, seed: u64, logs: &[WindowLog], note: &str, command: &str) -> String {
    let list = |values: Vec<String>| format!("[{}]", values.join(","));
    let windows = list(
        logs.iter()
            .map(|w| {
                format!(
                    "{{\"window\":{},\"experts\":{:?},\"train_sequences\":{},\"valid_users\":{},\"test_users\":{},\
                     \"valid\":{},\"test\":{},\"epochs\":{},\"best_epoch\":{},\"epoch_losses\":{},\
                     \"train_s\":{:.1},\"train_cpu_s\":{},\"utilisation\":{},\"pruned\":{}}}",
                    w.window,
                    w.experts,
                    w.sizes[0],
                    w.sizes[1],
                    w.sizes[2],
                    w.valid.to_json(),
                    w.test.to_json(),
                    w.epochs.0,
                    w.epochs.1,
                    list(w.losses.iter().map(|l| format!("{l:.5}")).collect()),
                    w.train_seconds,
                    w.train_cpu_seconds.map_or("null".into(), |c| format!("{c:.1}")),
                    list(
                        w.utilisation
                            .iter()
                            .map(|u| list(u.iter().map(|v| format!("{v:.4}")).collect()))
                            .collect()
                    ),
                    list(
                        w.pruned
                            .iter()
                            .map(|p| p.map_or("null".into(), |e| e.to_string()))
                            .collect()
                    ),
                )
            })
            .collect(),
    );
    let (hr, ndcg) = average(logs);
    let mean = format!(
        "{{\"hr@10\":{:.6},\"ndcg@10\":{:.6},\"hr@20\":{:.6},\"ndcg@20\":{:.6}}}",
        hr[1], ndcg[1], hr[2], ndcg[2]
    );
    let train_s: f64 = logs.iter().map(|w| w.train_seconds).sum();
    let cpu_s: Option<f64> = logs.iter().map(|w| w.train_cpu_seconds).sum();
    format!(
        "{{\"model\":{},\"impl\":\"rust\",\"dataset\":{},\"protocol\":\"stream\",\"seed\":{},\"test_mean\":{},\
         \"windows\":{},\"train_s\":{:.1},\"train_cpu_s\":{},\"peak_rss_mb\":{},\
         \"machine\":{{\"cpu\":{},\"threads\":{}}},\"commit\":{},\"date\":{},\"note\":{},\"command\":{}}}",
        json_string(model),
        json_string(dataset),
        seed,
        mean,
        windows,
        train_s,
        cpu_s.map_or("null".into(), |c| format!("{c:.1}")),
        record::peak_rss_mb().map_or("null".into(), |m| format!("{m:.1}")),
        json_string(&record::cpu_model()),
        candle_core::utils::get_num_threads(),
        json_string(&record::commit()),
        json_string(&record::utc_now()),
        json_string(note),
        json_string(command),
    )
}
