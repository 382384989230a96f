//! The main example: a Fuxi-MME-sized per-head lookup (H = 4 tables of
//! 10^5 items, D = 64, a batch of 256 x 200 tokens with padding) on the best
//! device, checked against the CPU, with its throughput.
//!
//!     cargo run --release --example lookup
//!
//! `MOEREC_DEVICE=cpu|cuda|cuda:N` forces the device.

use half::bf16;
use moerec::{embedding, Device, Tensor};
use std::time::Instant;

const HEADS: usize = 4;
const ITEMS: usize = 100_000;
const WIDTH: usize = 64;
const TOKENS: usize = 256 * 200;
const PADDING: u32 = 0;

/// Errors print with Display (what went wrong, for which argument), not
/// the Debug form a `main` returning `Result` would print.
fn main() {
    if let Err(error) = run() {
        eprintln!("error: {error}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let device = Device::auto()?;
    println!("device: {device}");

    let table_host: Vec<bf16> = (0..HEADS * ITEMS * WIDTH)
        .map(|i| bf16::from_f32(((i * 7919) % 1000) as f32 / 500.0 - 1.0))
        .collect();
    // Every sixth position is sequence padding; the rest a skewed id stream.
    let ids_host: Vec<u32> = (0..TOKENS as u64)
        .map(|t| {
            if t % 6 == 0 {
                PADDING
            } else {
                1 + ((t * t).wrapping_mul(0x9e37_79b9) % (ITEMS as u64 - 1)) as u32
            }
        })
        .collect();
    let dy_host: Vec<f32> = (0..TOKENS * HEADS * WIDTH)
        .map(|i| ((i % 13) as f32 - 6.0) / 8.0)
        .collect();

    let table = Tensor::from_slice(&table_host, &[HEADS, ITEMS, WIDTH], &device)?;
    let ids = Tensor::from_slice(&ids_host, &[TOKENS], &device)?;
    let dy = Tensor::from_slice(&dy_host, &[TOKENS, HEADS, WIDTH], &device)?;

    // Warm up (module load, allocator), then time a few iterations.
    let (mut rows, mut saved) = embedding::forward(&table, &ids, Some(PADDING))?;
    let iterations = 20;
    let start = Instant::now();
    for _ in 0..iterations {
        (rows, saved) = embedding::forward(&table, &ids, Some(PADDING))?;
    }
    device.synchronize()?;
    let forward_s = start.elapsed().as_secs_f64() / iterations as f64;
    let mut grad = embedding::backward(&dy, &saved)?;
    let start = Instant::now();
    for _ in 0..iterations {
        grad = embedding::backward(&dy, &saved)?;
    }
    device.synchronize()?;
    let backward_s = start.elapsed().as_secs_f64() / iterations as f64;

    let unique = grad.rows().len();
    let forward_bytes = (2 * TOKENS * HEADS * WIDTH * 2 + 4 * TOKENS) as f64;
    let backward_bytes = (TOKENS * HEADS * WIDTH * 4 + 4 * TOKENS + unique * (HEADS * WIDTH * 4 + 4)) as f64;
    println!(
        "forward : {:8.3} ms  {:7.1} GB/s  ([{TOKENS}, {HEADS}, {WIDTH}] bf16 rows)",
        forward_s * 1e3,
        forward_bytes / forward_s / 1e9
    );
    println!(
        "backward: {:8.3} ms  {:7.1} GB/s  ({unique} unique rows)",
        backward_s * 1e3,
        backward_bytes / backward_s / 1e9
    );

    // The CPU computes the same function: the gather exactly, the sums within
    // the f32 reduction tolerance of DESIGN 3.
    let cpu = Device::cpu();
    let (cpu_rows, cpu_saved) = embedding::forward(
        &Tensor::from_slice(&table_host, &[HEADS, ITEMS, WIDTH], &cpu)?,
        &Tensor::from_slice(&ids_host, &[TOKENS], &cpu)?,
        Some(PADDING),
    )?;
    let cpu_grad = embedding::backward(
        &Tensor::from_slice(&dy_host, &[TOKENS, HEADS, WIDTH], &cpu)?,
        &cpu_saved,
    )?;
    let forward_equal = rows.to_vec()? == cpu_rows.to_vec()?;
    let rows_equal = grad.rows().to_vec()? == cpu_grad.rows().to_vec()?;
    let (values, reference) = (grad.values().to_vec()?, cpu_grad.values().to_vec()?);
    let scale = reference.iter().fold(0f32, |m, r| m.max(r.abs()));
    let worst = values
        .iter()
        .zip(&reference)
        .map(|(a, r)| (a - r).abs() / (r.abs() + scale))
        .fold(0f32, f32::max);
    println!("check vs cpu: forward equal {forward_equal}, rows equal {rows_equal}, worst relative error {worst:.2e}");
    if !(forward_equal && rows_equal && worst <= 1e-4) {
        return Err("the device disagrees with the CPU".into());
    }
    Ok(())
}
