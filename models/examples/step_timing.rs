//! Where a training step's time goes: runs `--steps N` training steps of a
//! seed model on Beauty (the trainer's batch, dropout and AdamW) and prints
//! the median wall milliseconds of each part and the process CPU time per step: the encoder (forward up to the
//! user states), the catalog cross-entropy forward, the backward, AdamW.
//!
//! ```sh
//! RAYON_NUM_THREADS=1 cargo run --release -p moerec-models --example step_timing -- --model sasrec --steps 10
//! ```

use std::time::Instant;

use candle_core::Device;
use moerec_models::batch::TrainBatch;
use moerec_models::data::{self, MAX_LEN};
use moerec_models::fame::{Fame, FameConfig};
use moerec_models::nn::Dropout;
use moerec_models::optim::{AdamW, AdamWConfig};
use moerec_models::rng::Rng;
use moerec_models::sasrec::{EncoderConfig, SasRec};
use moerec_models::scoring::cross_entropy;
use moerec_models::train::process_cpu_seconds;
use moerec_models::Recommender;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> moerec_models::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1));
    // As the train binary does.
    moerec_models::alloc::keep_freed_memory();
    let model_name = value("--model").map_or("sasrec", String::as_str);
    let steps: usize = value("--steps").and_then(|s| s.parse().ok()).unwrap_or(10);
    let device = Device::Cpu;
    let dataset = data::load(std::path::Path::new("data/Beauty.txt"), None)?;
    let split = data::split(&dataset, MAX_LEN)?;
    let encoder = EncoderConfig::sasrec(dataset.num_items);
    let model: Box<dyn Recommender> = match model_name {
        "fame" => Box::new(Fame::new(FameConfig::new(dataset.num_items), 42, &device)?),
        _ => Box::new(SasRec::new(encoder, 42, &device)?),
    };
    let mut adam = AdamW::new(model.params(), AdamWConfig::default())?;
    let mut rng = Rng::new(42);
    let mut order: Vec<usize> = (0..split.train.len()).collect();
    rng.shuffle(&mut order);
    let mut parts: [Vec<f64>; 5] = Default::default();
    let cpu_start = process_cpu_seconds();
    for chunk in order.chunks(256).take(steps) {
        let seqs: Vec<_> = chunk.iter().map(|&i| &split.train[i]).collect();
        let t0 = Instant::now();
        let batch = TrainBatch::new(&seqs, MAX_LEN, &device)?;
        let mut dropout = Dropout::new(model.dropout_rate(), &mut rng)?;
        let t1 = Instant::now();
        let query = model.query(&batch.batch, &batch.rows, &mut dropout)?;
        let t2 = Instant::now();
        let loss = cross_entropy(&query, &batch.targets)?;
        let t3 = Instant::now();
        let grads = loss.backward()?;
        let t4 = Instant::now();
        adam.step(model.params(), &grads)?;
        let t5 = Instant::now();
        for (part, (a, b)) in parts.iter_mut().zip([(t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5)]) {
            part.push((b - a).as_secs_f64() * 1e3);
        }
    }
    let cpu = process_cpu_seconds()
        .zip(cpu_start)
        .map(|(end, start)| (end - start) / steps as f64);
    let names = ["batch", "encoder", "ce fwd", "backward", "adamw"];
    let total: f64 = parts.iter().map(|p| median(p.clone())).sum();
    for (name, part) in names.iter().zip(parts) {
        println!("{name:>9}: {:8.1} ms", median(part));
    }
    println!("{:>9}: {total:8.1} ms (sum of medians, {steps} steps)", "step");
    if let Some(cpu) = cpu {
        println!(
            "{:>9}: {:8.1} ms per step (process CPU time, all threads)",
            "cpu",
            cpu * 1e3
        );
    }
    Ok(())
}
