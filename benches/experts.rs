//! The grouped expert matmul (DESIGN 4.3), one layer forward and backward,
//! on every device present. Plans come from `routing::forward` on fixed
//! pseudo-random logits (outside the timed region: the op takes the plan as
//! given); no bias, as the PyTorch peer by default.
//!
//! Groups `experts_fwd/<backend>/<dtype>` and `experts_bwd/<backend>/<dtype>`,
//! ids `T<t>_E<e>_k<k>_Din<din>_Dout<dout>_<activation>` with k resolved (k = E
//! is the dense router). Throughput is in elements = FLOPs: forward
//! `2 R Din Dout'`, backward `4 R Din Dout'` (dx and dW), R = T k,
//! Dout' = 2 Dout for SwiGlu; scripts/bench_records.py turns them into
//! `tflops`. Both passes end in the op's one synchronisation (the plan check),
//! so each iteration is the whole op.
//!
//! CPU: T = 4096, Din = Dout in {64, 128, 256}, E in {4, 8}, k in {1, 2},
//! SwiGlu, f32 and bf16 (the CUDA grid with `MOEREC_BENCH_FULL=1`). CUDA, bf16
//! (and f32 with `MOEREC_BENCH_FULL=1`), SwiGlu: recsys T = 51200,
//! Din, Dout in {64, 128, 256, 512}, E in {4, 8, 16, 64}, k in {1, 2, E};
//! LLM-like T = 16384, Din = Dout in {2048, 4096}, E in {8, 16, 64}, k = 2.

mod common;

use common::{bench_devices, configured, full_cpu_grid};
use criterion::{BenchmarkId, Criterion, Throughput};
use half::bf16;
use moerec::experts::{self, Activation};
use moerec::routing::{self, RoutingOptions, TopK};
use moerec::{Device, FloatElement, Tensor};

const ACTIVATION: Activation = Activation::SwiGlu;

#[derive(Debug, Clone, Copy)]
struct Shape {
    tokens: usize,
    experts: usize,
    k: usize,
    din: usize,
    dout: usize,
}

fn shapes(device: &Device) -> Vec<Shape> {
    let mut shapes = Vec::new();
    if device.is_cuda() || full_cpu_grid() {
        let widths = [64, 128, 256, 512];
        for (din, dout, experts) in widths.iter().flat_map(|&din| {
            widths
                .iter()
                .flat_map(move |&dout| [4, 8, 16, 64].map(|experts| (din, dout, experts)))
        }) {
            for k in [1, 2, experts] {
                shapes.push(Shape {
                    tokens: 51_200,
                    experts,
                    k,
                    din,
                    dout,
                });
            }
        }
        for width in [2048, 4096] {
            for experts in [8, 16, 64] {
                shapes.push(Shape {
                    tokens: 16_384,
                    experts,
                    k: 2,
                    din: width,
                    dout: width,
                });
            }
        }
    } else {
        for width in [64, 128, 256] {
            for experts in [4, 8] {
                for k in [1, 2] {
                    shapes.push(Shape {
                        tokens: 4096,
                        experts,
                        k,
                        din: width,
                        dout: width,
                    });
                }
            }
        }
    }
    shapes
}

/// Values in [-scale, scale) from a fixed multiplicative hash of the index:
/// the same data every run, no rand crate.
fn values<T: FloatElement>(count: usize, seed: u64, scale: f32) -> Vec<T> {
    (0..count as u64)
        .map(|i| {
            let hashed = (i ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40;
            T::from_f32(scale * (hashed as f32 / (1u64 << 23) as f32 - 1.0))
        })
        .collect()
}

fn bench_shape<T: FloatElement>(c: &mut Criterion, backend: &str, device: &Device, shape: Shape) {
    let Shape {
        tokens,
        experts,
        k,
        din,
        dout,
    } = shape;
    let width = ACTIVATION.width(dout);
    let logits = Tensor::from_vec(values::<f32>(tokens * experts, 1, 4.0), &[tokens, experts], device).unwrap();
    let top_k = if k == experts { TopK::All } else { TopK::K(k) };
    let (routed, _) = routing::forward(&logits, &RoutingOptions::new(top_k)).unwrap();
    let plan = routed.plan;
    let x = Tensor::from_vec(values::<T>(tokens * din, 2, 1.0), &[tokens, din], device).unwrap();
    let w_scale = 1.0 / (din as f32).sqrt();
    let w = Tensor::from_vec(
        values::<T>(experts * din * width, 3, w_scale),
        &[experts, din, width],
        device,
    )
    .unwrap();
    let rows = plan.token_of_row.len();
    let flops = 2 * (rows * din * width) as u64;
    let dtype = T::DTYPE;
    let id = BenchmarkId::from_parameter(format!("T{tokens}_E{experts}_k{k}_Din{din}_Dout{dout}_swiglu"));

    let mut forward = c.benchmark_group(format!("experts_fwd/{backend}/{dtype}"));
    forward.throughput(Throughput::Elements(flops));
    forward.bench_function(id.clone(), |b| {
        b.iter(|| experts::layer_forward(&x, &plan, &w, None, ACTIVATION).unwrap())
    });
    forward.finish();

    let (_, saved) = experts::layer_forward(&x, &plan, &w, None, ACTIVATION).unwrap();
    let dy = Tensor::from_vec(values::<f32>(rows * dout, 4, 1.0), &[rows, dout], device).unwrap();
    let mut backward = c.benchmark_group(format!("experts_bwd/{backend}/{dtype}"));
    backward.throughput(Throughput::Elements(2 * flops));
    backward.bench_function(id, |b| {
        b.iter(|| experts::layer_backward(&dy, &x, &plan, &w, &saved).unwrap())
    });
    backward.finish();
}

fn main() {
    let mut c = configured();
    for (backend, device) in bench_devices() {
        let with_f32 = !device.is_cuda() || full_cpu_grid();
        for shape in shapes(&device) {
            bench_shape::<bf16>(&mut c, backend, &device, shape);
            if with_f32 {
                bench_shape::<f32>(&mut c, backend, &device, shape);
            }
        }
    }
    c.final_summary();
}
