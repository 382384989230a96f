//! Fused gated multi-head scoring (DESIGN 4.4): cross-entropy forward and
//! forward+backward for both mixings, and top-100, on every device present.
//!
//! Groups `scoring_<kind>_<pass>/<backend>/<dtype>`: `scoring_ce_fwd`,
//! `scoring_ce_fwdbwd` (cross-entropy, Logits mixing), `scoring_mos_fwd`,
//! `scoring_mos_fwdbwd` (cross-entropy, Probabilities mixing: the mixture of
//! softmaxes) and `scoring_topk_fwd` (top-n, Logits mixing); ids
//! `B<b>_H<h>_D<d>_V<v>`, and `B<b>_H<h>_D<d>_V<v>_n<n>` for top-n.
//! scripts/bench_records.py reads `fwdbwd` (one forward and one backward per
//! iteration) as pass "bwd" with `includes_fwd: true`. Throughput is in
//! elements = FLOPs of the score products alone: `2 B V H D` per pass over the
//! catalog (forward one, backward two more: dU and dX), which
//! scripts/bench_records.py turns into `tflops`. The workspace each shape
//! needs beyond inputs and outputs is printed beside it (DESIGN: queryable,
//! O(B * H + tiles)), against the `4 B V` bytes a materialised peer needs.
//!
//! CPU: B = 256, H in {1, 4}, D in {16, 64}, V = 10^4. CUDA: B in {256, 4096},
//! H in {1, 2, 4, 8}, D in {16, 32, 64}, V in {10^4, 10^5, 10^6} (and 10^7
//! with `MOEREC_BENCH_FULL=1`), bf16.

mod common;

use common::{bench_devices, configured, full_cpu_grid};
use criterion::{BenchmarkId, Criterion, Throughput};
use half::bf16;
use moerec::scoring::{self, Mixing, Scoring, ScoringShape};
use moerec::{Device, FloatElement, Tensor};

#[derive(Debug, Clone, Copy)]
struct Shape {
    batch: usize,
    heads: usize,
    width: usize,
    items: usize,
}

fn shapes(device: &Device) -> Vec<Shape> {
    let mut shapes = Vec::new();
    if device.is_cuda() {
        let catalogs: &[usize] = if full_cpu_grid() {
            &[10_000, 100_000, 1_000_000, 10_000_000]
        } else {
            &[10_000, 100_000, 1_000_000]
        };
        for &batch in &[256, 4096] {
            for heads in [1, 2, 4, 8] {
                for width in [16, 32, 64] {
                    for &items in catalogs {
                        shapes.push(Shape {
                            batch,
                            heads,
                            width,
                            items,
                        });
                    }
                }
            }
        }
    } else {
        for heads in [1, 4] {
            for width in [16, 64] {
                shapes.push(Shape {
                    batch: 256,
                    heads,
                    width,
                    items: 10_000,
                });
            }
        }
    }
    shapes
}

/// Deterministic values in [-0.5, 0.5) from a multiplicative hash.
fn values<T: FloatElement>(len: usize, salt: u64) -> Vec<T> {
    (0..len as u64)
        .map(|i| {
            let h = (i ^ salt).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40;
            T::from_f32(h as f32 / (1u64 << 24) as f32 - 0.5)
        })
        .collect()
}

fn bench_shape<T: FloatElement>(c: &mut Criterion, backend: &str, device: &Device, shape: Shape) {
    let Shape {
        batch,
        heads,
        width,
        items,
    } = shape;
    let dtype = T::DTYPE;
    let user = Tensor::from_vec(values::<T>(batch * heads * width, 1), &[batch, heads, width], device).unwrap();
    let gates = Tensor::from_vec(values::<T>(batch * heads, 2), &[batch, heads], device).unwrap();
    let table = Tensor::from_vec(values::<T>(heads * items * width, 3), &[heads, items, width], device).unwrap();
    let targets: Vec<u32> = (0..batch as u64).map(|b| ((b * 7919) % items as u64) as u32).collect();
    let targets = Tensor::from_vec(targets, &[batch], device).unwrap();
    let dloss = Tensor::from_vec(vec![1.0f32; batch], &[batch], device).unwrap();
    let id = BenchmarkId::from_parameter(format!("B{batch}_H{heads}_D{width}_V{items}"));
    let pass_flops = 2 * (batch * items * heads * width) as u64;
    let scoring_shape = ScoringShape {
        batch,
        heads,
        width,
        num_items: items,
        shared: false,
    };

    for (name, mixing) in [("ce", Mixing::Logits), ("mos", Mixing::Probabilities)] {
        let inputs = Scoring::new(&user, &gates, &table).with_mixing(mixing);
        let workspace = scoring::workspace_bytes_on(device, scoring_shape, mixing).unwrap();
        eprintln!(
            "{name} {backend} {dtype} B{batch}_H{heads}_D{width}_V{items}: workspace {workspace} B, \
             materialised logits {} B",
            4 * batch * items
        );
        let mut forward = c.benchmark_group(format!("scoring_{name}_fwd/{backend}/{dtype}"));
        forward.throughput(Throughput::Elements(pass_flops));
        forward.bench_function(id.clone(), |b| {
            b.iter(|| scoring::cross_entropy(&inputs, &targets, None).unwrap())
        });
        forward.finish();

        let mut both = c.benchmark_group(format!("scoring_{name}_fwdbwd/{backend}/{dtype}"));
        both.throughput(Throughput::Elements(3 * pass_flops));
        both.bench_function(id.clone(), |b| {
            b.iter(|| {
                let (_, saved) = scoring::cross_entropy(&inputs, &targets, None).unwrap();
                scoring::cross_entropy_backward(&inputs, &dloss, &saved).unwrap()
            })
        });
        both.finish();
    }

    let inputs = Scoring::new(&user, &gates, &table);
    let n = 100.min(items);
    let topk_id = BenchmarkId::from_parameter(format!("B{batch}_H{heads}_D{width}_V{items}_n{n}"));
    let mut topk = c.benchmark_group(format!("scoring_topk_fwd/{backend}/{dtype}"));
    topk.throughput(Throughput::Elements(pass_flops));
    topk.bench_function(topk_id, |b| b.iter(|| scoring::topk(&inputs, n, None).unwrap()));
    topk.finish();
}

fn main() {
    let mut c = configured();
    for (backend, device) in bench_devices() {
        for shape in shapes(&device) {
            if device.is_cuda() {
                bench_shape::<bf16>(&mut c, backend, &device, shape);
            } else {
                bench_shape::<f32>(&mut c, backend, &device, shape);
            }
        }
    }
    c.final_summary();
}
