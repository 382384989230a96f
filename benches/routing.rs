//! Top-k routing (DESIGN 4.2), forward and backward, on every device present.
//!
//! Groups `routing_fwd/<backend>/<dtype>` and `routing_bwd/<backend>/<dtype>`,
//! ids `T<tokens>_E<experts>_k<k>` (k = E is the dense router, `TopK::All`).
//! Throughput is the floor's bytes: the forward reads the logits once and
//! writes indices and weights (8 B per slot) and the plan
//! (4 * (E + E + 1 + R + T*k)); the backward reads the logits, dweights and
//! indices and writes dZ (4 B per logit). Compare with `copy/<backend>`.
//!
//! The CPU takes T in {4096, 65536}, E in {8, 64, 160} (the GPU grid with
//! `MOEREC_BENCH_FULL=1`); CUDA takes T in {4096, 65536, 262144},
//! E in {4, 8, 16, 64, 160, 256}, bf16 (and f32 with `MOEREC_BENCH_FULL=1`).
//!
//! `routing_fame/<backend>/<dtype>`: FAME's per-head dense routers (k = all
//! of a head's N experts), forward and backward together, T = 256 x 200
//! tokens, H heads: `grouped` ([`RoutingOptions::with_groups`], logits
//! `[T, H*N]`) against `masked`, the workaround it replaces (one router over
//! all H*N experts per (token, head) row, -inf for the other heads' experts,
//! k = N: logits `[T*H, H*N]`).

mod common;

use common::{bench_copy, bench_devices, configured, full_cpu_grid};
use criterion::{BenchmarkId, Criterion, Throughput};
use half::bf16;
use moerec::routing::{self, RoutingOptions, TopK};
use moerec::{Device, FloatElement, Tensor};

/// Logits in [-4, 4) from a seeded SplitMix64 stream.
fn logits<T: FloatElement>(count: usize) -> Vec<T> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..count)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            T::from_f32(((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 21) as f32 - 4.0)
        })
        .collect()
}

/// k in {1, 2, 8, E}, those that fit, each once.
fn ks(experts: usize) -> Vec<usize> {
    let mut ks: Vec<usize> = [1, 2, 8, experts].into_iter().filter(|&k| k <= experts).collect();
    ks.dedup();
    ks
}

fn bench_dtype<T: FloatElement>(c: &mut Criterion, backend: &str, device: &Device, grid: &[(usize, usize)]) {
    let dtype = T::DTYPE;
    let element = dtype.size() as u64;
    let mut forward = c.benchmark_group(format!("routing_fwd/{backend}/{dtype}"));
    for &(tokens, experts) in grid {
        let data = Tensor::from_vec(logits::<T>(tokens * experts), &[tokens, experts], device).unwrap();
        for k in ks(experts) {
            let options = RoutingOptions::new(if k == experts { TopK::All } else { TopK::K(k) });
            let (t, e, k) = (tokens as u64, experts as u64, k as u64);
            let plan_bytes = 4 * (e + e + 1 + 2 * t * k);
            forward.throughput(Throughput::Bytes(t * e * element + t * k * 8 + plan_bytes));
            forward.bench_function(BenchmarkId::from_parameter(format!("T{t}_E{e}_k{k}")), |b| {
                b.iter(|| routing::forward(&data, &options).unwrap())
            });
        }
    }
    forward.finish();

    let mut backward = c.benchmark_group(format!("routing_bwd/{backend}/{dtype}"));
    for &(tokens, experts) in grid {
        let data = Tensor::from_vec(logits::<T>(tokens * experts), &[tokens, experts], device).unwrap();
        for k in ks(experts) {
            let options = RoutingOptions::new(if k == experts { TopK::All } else { TopK::K(k) });
            let (_, saved) = routing::forward(&data, &options).unwrap();
            let dweights = Tensor::from_vec(vec![0.5f32; tokens * k], &[tokens, k], device).unwrap();
            let (t, e, k) = (tokens as u64, experts as u64, k as u64);
            backward.throughput(Throughput::Bytes(t * e * (element + 4) + t * k * 8));
            backward.bench_function(BenchmarkId::from_parameter(format!("T{t}_E{e}_k{k}")), |b| {
                b.iter(|| routing::backward(&data, &dweights, 0.01, 0.001, &saved).unwrap())
            });
        }
    }
    backward.finish();
}

fn bench_fame<T: FloatElement>(c: &mut Criterion, backend: &str, device: &Device) {
    let tokens = 256 * 200;
    let mut group = c.benchmark_group(format!("routing_fame/{backend}/{}", T::DTYPE));
    for (heads, n) in [(4, 8), (8, 4)] {
        let experts = heads * n;
        let grouped_logits = logits::<T>(tokens * experts);
        let grouped = Tensor::from_vec(grouped_logits.clone(), &[tokens, experts], device).unwrap();
        let masked_logits: Vec<T> = grouped_logits
            .chunks(n)
            .enumerate()
            .flat_map(|(row, own)| {
                let head = row % heads;
                (0..experts).map(move |e| match e / n == head {
                    true => own[e % n],
                    false => T::from_f32(f32::NEG_INFINITY),
                })
            })
            .collect();
        let masked = Tensor::from_vec(masked_logits, &[tokens * heads, experts], device).unwrap();
        let dweights = Tensor::from_vec(vec![0.5f32; tokens * experts], &[tokens * heads, n], device).unwrap();
        for (name, data, options) in [
            ("grouped", &grouped, RoutingOptions::new(TopK::All).with_groups(heads)),
            ("masked", &masked, RoutingOptions::new(TopK::K(n))),
        ] {
            let id = format!("T{tokens}_H{heads}_N{n}/{name}");
            group.bench_function(BenchmarkId::from_parameter(id), |b| {
                b.iter(|| {
                    let (_, saved) = routing::forward(data, &options).unwrap();
                    routing::backward(data, &dweights, 0.01, 0.001, &saved).unwrap()
                })
            });
        }
    }
    group.finish();
}

fn grid(tokens: &[usize], experts: &[usize]) -> Vec<(usize, usize)> {
    tokens
        .iter()
        .flat_map(|&t| experts.iter().map(move |&e| (t, e)))
        .collect()
}

fn main() {
    let mut c = configured();
    let gpu_grid = grid(&[4096, 65_536, 262_144], &[4, 8, 16, 64, 160, 256]);
    for (backend, device) in bench_devices() {
        bench_copy(&mut c, backend, &device);
        let full = full_cpu_grid();
        let shapes = match device {
            Device::Cpu if !full => grid(&[4096, 65_536], &[8, 64, 160]),
            _ => gpu_grid.clone(),
        };
        bench_dtype::<bf16>(&mut c, backend, &device, &shapes);
        bench_fame::<bf16>(&mut c, backend, &device);
        if device.is_cuda() && full {
            bench_dtype::<f32>(&mut c, backend, &device, &shapes);
        }
    }
    c.final_summary();
}
