//! The training loop: AdamW over shuffled batches, validation NDCG@10 after
//! every epoch, early stopping, test metrics at the best epoch, checkpoints
//! that resume bit for bit, and an optional wall-time budget.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};

use crate::batch::TrainBatch;
use crate::checkpoint::{self, LoopState};
use crate::data::{Split, TrainSequence};
use crate::error::{invalid, Error, Result};
use crate::eval::{evaluate, Metrics};
use crate::nn::Dropout;
use crate::optim::{AdamW, AdamWConfig};
use crate::rng::Rng;
use crate::Recommender;

/// How to train.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// Most epochs to run (counting those of a resumed checkpoint).
    pub max_epochs: u64,
    /// Stop after this many epochs without a better validation NDCG@10.
    pub patience: u64,
    /// Sequences per step (256).
    pub batch_size: usize,
    /// Seeds shuffling and dropout (the model's initialisation has its own seed).
    pub seed: u64,
    /// Stop (after finishing the current step) once training has taken this long.
    pub time_budget: Option<Duration>,
    /// Caps the steps of every epoch (smoke tests); `None` = whole epochs.
    pub max_steps_per_epoch: Option<usize>,
    /// Where the checkpoint lives; `None` = no checkpoint.
    pub checkpoint: Option<PathBuf>,
    /// Continue from the checkpoint (it must exist).
    pub resume: bool,
    /// Replace an existing checkpoint instead of refusing to start.
    pub overwrite: bool,
    /// The optimiser.
    pub adam: AdamWConfig,
    /// Draw a progress bar.
    pub progress: bool,
    /// Leave the model with the best epoch's weights (a streaming run goes on
    /// from them) instead of the last epoch's.
    pub keep_best: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            max_epochs: 200,
            patience: 10,
            batch_size: 256,
            seed: 42,
            time_budget: None,
            max_steps_per_epoch: None,
            checkpoint: None,
            resume: false,
            overwrite: false,
            adam: AdamWConfig::default(),
            progress: true,
            keep_best: false,
        }
    }
}

/// One epoch's numbers.
#[derive(Clone, Debug)]
pub struct EpochLog {
    /// 1-based epoch.
    pub epoch: u64,
    /// Mean training loss over its steps.
    pub loss: f64,
    /// Steps taken (fewer than a full epoch when the budget ran out).
    pub steps: usize,
    /// Training wall time (without validation).
    pub train_seconds: f64,
    /// CPU time the process spent in those steps (all threads; `None` off Linux).
    /// On a shared machine it is the steadier measure of cost.
    pub train_cpu_seconds: Option<f64>,
    /// Training sequences per second.
    pub sequences_per_second: f64,
    /// Validation metrics after it.
    pub valid: Metrics,
}

/// What a run produced.
#[derive(Clone, Debug)]
pub struct TrainReport {
    /// The epochs run in this process (a resumed run lists only its new ones).
    pub epochs: Vec<EpochLog>,
    /// Epochs completed in total.
    pub epochs_total: u64,
    /// The best validation epoch.
    pub best_epoch: u64,
    /// Validation metrics at the best epoch.
    pub best_valid: Metrics,
    /// Test metrics with the best epoch's weights.
    pub test: Metrics,
    /// Why training stopped.
    pub stopped_by: String,
    /// Steps in one full epoch.
    pub steps_per_epoch: usize,
}

/// Trains `model` on `split.train`, early-stopping on `split.valid`, testing on `split.test`.
pub fn train(model: &dyn Recommender, split: &Split, config: &TrainConfig, device: &Device) -> Result<TrainReport> {
    if config.batch_size == 0 {
        return Err(invalid("batch_size", "at least 1", 0));
    }
    if split.train.is_empty() {
        return Err(invalid(
            "training sequences",
            "at least one user with 4 or more items",
            0,
        ));
    }
    let params = model.params();
    let mut adam = AdamW::new(params, config.adam.clone())?;
    let mut state = LoopState {
        epoch: 0,
        best_epoch: 0,
        best_ndcg10: f64::NEG_INFINITY,
        rng_state: config.seed,
    };
    let mut best: HashMap<String, Tensor> = HashMap::new();
    match (&config.checkpoint, config.resume) {
        (Some(path), true) => {
            (best, state) = checkpoint::load(path, params, &mut adam, device)?;
        }
        (None, true) => return Err(invalid("resume", "a checkpoint path", "none")),
        (Some(path), false) if path.exists() && !config.overwrite => {
            return Err(Error::WouldOverwrite { path: path.clone() });
        }
        _ => {}
    }
    let mut rng = Rng::new(state.rng_state);
    let started = Instant::now();
    let mut epochs = Vec::new();
    let mut stopped_by = format!("max_epochs ({})", config.max_epochs);
    let full_steps = split.train.len().div_ceil(config.batch_size);
    let steps = config.max_steps_per_epoch.map_or(full_steps, |cap| cap.min(full_steps));
    while state.epoch < config.max_epochs {
        let epoch = state.epoch + 1;
        let mut order: Vec<usize> = (0..split.train.len()).collect();
        rng.shuffle(&mut order);
        let bar = progress_bar(config.progress, steps as u64, epoch);
        let epoch_start = Instant::now();
        let cpu_start = process_cpu_seconds();
        let (mut loss_sum, mut sequences, mut taken) = (0.0f64, 0usize, 0usize);
        let mut out_of_time = false;
        for chunk in order.chunks(config.batch_size).take(steps) {
            let seqs: Vec<_> = chunk.iter().map(|&i| &split.train[i]).collect();
            let value = step(model, &mut adam, &seqs, split.max_len, &mut rng, device)?;
            if !value.is_finite() {
                return Err(invalid(
                    "training loss",
                    "a finite number",
                    format!("{value} at epoch {epoch}, step {}", taken + 1),
                ));
            }
            loss_sum += value;
            sequences += seqs.len();
            taken += 1;
            bar.set_message(format!(
                "loss {:.4}  {:.0} seq/s",
                loss_sum / taken as f64,
                sequences as f64 / epoch_start.elapsed().as_secs_f64()
            ));
            bar.inc(1);
            if config.time_budget.is_some_and(|b| started.elapsed() >= b) {
                out_of_time = true;
                break;
            }
        }
        bar.finish_and_clear();
        let train_seconds = epoch_start.elapsed().as_secs_f64();
        let train_cpu_seconds = process_cpu_seconds().zip(cpu_start).map(|(end, start)| end - start);
        let valid = evaluate(model, &split.valid, split.max_len, config.batch_size, device)?;
        state.epoch = epoch;
        state.rng_state = rng.state();
        if valid.ndcg10() > state.best_ndcg10 {
            state.best_ndcg10 = valid.ndcg10();
            state.best_epoch = epoch;
            best = params
                .vars()
                .iter()
                .map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?)))
                .collect::<Result<_>>()?;
        }
        let log = EpochLog {
            epoch,
            loss: loss_sum / taken.max(1) as f64,
            steps: taken,
            train_seconds,
            train_cpu_seconds,
            sequences_per_second: sequences as f64 / train_seconds,
            valid,
        };
        if config.progress {
            eprintln!(
                "epoch {epoch:>3}  loss {:.4}  {:.1} s  {:.0} seq/s  valid HR@10 {:.4}  NDCG@10 {:.4}{}",
                log.loss,
                log.train_seconds,
                log.sequences_per_second,
                log.valid.hr10(),
                log.valid.ndcg10(),
                if state.best_epoch == epoch { "  (best)" } else { "" }
            );
        }
        epochs.push(log);
        if let Some(path) = &config.checkpoint {
            checkpoint::save(path, params, &best, &adam, &state)?;
        }
        if out_of_time {
            stopped_by = format!("time budget ({} s)", config.time_budget.map_or(0, |b| b.as_secs()));
            break;
        }
        if epoch - state.best_epoch >= config.patience {
            stopped_by = format!(
                "early stopping (no better validation NDCG@10 for {} epochs)",
                config.patience
            );
            break;
        }
    }
    if state.best_epoch == 0 {
        return Err(invalid(
            "max_epochs",
            "at least one epoch to train",
            format!("{} already done", state.epoch),
        ));
    }
    let current: Vec<(String, Tensor)> = params
        .vars()
        .iter()
        .map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?)))
        .collect::<Result<_>>()?;
    for (name, var) in params.vars() {
        var.set(&best[name])?;
    }
    let best_valid = evaluate(model, &split.valid, split.max_len, config.batch_size, device)?;
    let test = evaluate(model, &split.test, split.max_len, config.batch_size, device)?;
    // Leave the model as trained last (the checkpoint holds both), unless asked for the best.
    if !config.keep_best {
        for (name, value) in current {
            params.vars()[&name].set(&value)?;
        }
    }
    Ok(TrainReport {
        epochs,
        epochs_total: state.epoch,
        best_epoch: state.best_epoch,
        best_valid,
        test,
        stopped_by,
        steps_per_epoch: full_steps,
    })
}

/// One training step on `seqs`: forward with dropout drawn from `rng`, the
/// catalog cross-entropy, backward, one AdamW update; returns the loss.
pub fn step(
    model: &dyn Recommender,
    adam: &mut AdamW,
    seqs: &[&TrainSequence],
    max_len: usize,
    rng: &mut Rng,
    device: &Device,
) -> Result<f64> {
    let batch = TrainBatch::new(seqs, max_len, device)?;
    let mut dropout = Dropout::new(model.dropout_rate(), rng)?;
    let loss = model.loss(&batch.batch, &batch.rows, &batch.targets, &mut dropout)?;
    let grads = loss.backward()?;
    adam.step(model.params(), &grads)?;
    Ok(loss.to_scalar::<f32>()? as f64)
}

/// User + system CPU seconds of this process so far (Linux `/proc/self/stat`).
pub fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command: utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on every Linux target Rust supports.
    Some(ticks / 100.0)
}

fn progress_bar(show: bool, steps: u64, epoch: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(steps);
    let style = ProgressStyle::with_template("epoch {prefix:>3} [{bar:30}] {pos}/{len} {elapsed}<{eta}  {msg}")
        .expect("the template is valid")
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(epoch.to_string());
    bar
}
