//! Training-step throughput of a seed model at its default shape, the Rust
//! side of the Rust-vs-PyTorch speed comparison (`scripts/models-speed.py`
//! runs it alternately with `python_ref/models/train_speed.py`): the data,
//! split, batch, model, dropout and AdamW of `train`, timed over N steps of
//! a shuffled epoch, without the evaluation. Prints one JSON line:
//! sequences/s, wall and CPU seconds per step, peak RSS.
//!
//! `RAYON_NUM_THREADS=1 cargo run --release -p moerec-models --example train_speed -- --model fame --steps 10`
//! (options: `--model sasrec|fame`, `--data PATH`, `--steps N`, `--batch-size N`, `--seed N`).

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;
use moerec_models::data;
use moerec_models::fame::{Fame, FameConfig};
use moerec_models::optim::{AdamW, AdamWConfig};
use moerec_models::record::{json_string, peak_rss_mb};
use moerec_models::rng::Rng;
use moerec_models::sasrec::{EncoderConfig, SasRec};
use moerec_models::train::{process_cpu_seconds, step};
use moerec_models::{Error, Recommender, Result};

fn bad(name: &str, expected: &str, actual: &str) -> Error {
    Error::InvalidArgument {
        name: name.into(),
        expected: expected.into(),
        actual: actual.into(),
    }
}

fn main() -> Result<()> {
    // As the train binary does: the speed measured is the trainer's.
    moerec_models::alloc::keep_freed_memory();
    let (mut model_name, mut data_path) = ("sasrec".to_string(), PathBuf::from("data/Beauty.txt"));
    let (mut steps, mut batch_size, mut seed) = (10usize, 256usize, 0u64);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .ok_or_else(|| bad(&flag, "a value after it", "end of arguments"))?;
        let number = |v: &str| v.parse::<u64>().map_err(|_| bad(&flag, "a number", v));
        match flag.as_str() {
            "--model" => model_name = value,
            "--data" => data_path = PathBuf::from(value),
            "--steps" => steps = number(&value)? as usize,
            "--batch-size" => batch_size = number(&value)? as usize,
            "--seed" => seed = number(&value)?,
            other => return Err(bad("option", "--model, --data, --steps, --batch-size or --seed", other)),
        }
    }
    if steps == 0 || batch_size == 0 {
        return Err(bad("--steps / --batch-size", "at least 1", "0"));
    }
    let device = Device::Cpu;
    let dataset = data::load(&data_path, None)?;
    let split = data::split(&dataset, data::MAX_LEN)?;
    let model: Box<dyn Recommender> = match model_name.as_str() {
        "sasrec" => Box::new(SasRec::new(EncoderConfig::sasrec(dataset.num_items), seed, &device)?),
        "fame" => Box::new(Fame::new(FameConfig::new(dataset.num_items), seed, &device)?),
        other => return Err(bad("--model", "sasrec or fame", other)),
    };
    let mut adam = AdamW::new(model.params(), AdamWConfig::default())?;
    let mut rng = Rng::new(seed);
    let mut order: Vec<usize> = (0..split.train.len()).collect();
    rng.shuffle(&mut order);
    let (mut wall, mut cpu, mut sequences, mut taken, mut loss) = (0.0f64, 0.0f64, 0usize, 0usize, 0.0f64);
    for chunk in order.chunks(batch_size).take(steps) {
        let seqs: Vec<_> = chunk.iter().map(|&i| &split.train[i]).collect();
        let (w0, c0) = (Instant::now(), process_cpu_seconds());
        loss = step(model.as_ref(), &mut adam, &seqs, split.max_len, &mut rng, &device)?;
        wall += w0.elapsed().as_secs_f64();
        cpu += process_cpu_seconds()
            .zip(c0)
            .map_or(f64::NAN, |(end, start)| end - start);
        sequences += seqs.len();
        taken += 1;
    }
    let peak = peak_rss_mb().map_or("null".into(), |mb| format!("{mb:.1}"));
    println!(
        "{{\"model\":{},\"impl\":\"rust\",\"threads\":{},\"batch\":{batch_size},\"steps\":{},\"sequences_per_s\":{:.2},\
         \"wall_s_per_step\":{:.4},\"cpu_s_per_step\":{:.4},\"peak_rss_mb\":{peak},\"final_loss\":{loss:.5}}}",
        json_string(&model_name),
        candle_core::utils::get_num_threads(),
        taken,
        sequences as f64 / wall,
        wall / taken as f64,
        cpu / taken as f64,
    );
    Ok(())
}
