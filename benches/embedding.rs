//! The lookup (DESIGN 4.1), forward and backward, at the reference sizes:
//! V = 10^6 rows, H in {1, 4, 8}, D in {16, 32, 64, 128}, T = 256 x 200, and
//! serving sizes (T = 256, V = 10^5). Throughput is the op's floor in bytes:
//! forward reads T*H*D elements and T ids and writes T*H*D elements; backward
//! reads T*H*D f32 of dy and T ids and writes U*H*D f32 and U row ids (it
//! never reads the table, so it is measured once, under f32). The
//! fraction of the floor is that over `copy/<backend>` of the same run.
//!
//! Groups: `embedding_fwd/<backend>/<dtype>`, `embedding_bwd/<backend>/<dtype>`;
//! ids: `H<h>_V<v>_D<d>_T<t>` (scripts/bench_records.py parses them).

mod common;

use common::{bench_copy, bench_devices, configured, full_cpu_grid};
use criterion::{BenchmarkId, Criterion, Throughput};
use half::bf16;
use moerec::{embedding, DType, Device, FloatElement, Tensor};

/// Uniform-looking ids from a fixed multiplicative hash: no rand crate, same
/// ids every run.
fn ids(tokens: usize, num_rows: usize) -> Vec<u32> {
    (0..tokens as u64)
        .map(|t| ((t.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 17) % num_rows as u64) as u32)
        .collect()
}

struct Shape {
    heads: usize,
    num_rows: usize,
    width: usize,
    tokens: usize,
}

fn shapes(device: &Device) -> Vec<Shape> {
    let mut shapes = Vec::new();
    for heads in [1, 4, 8] {
        for width in [16, 32, 64, 128] {
            // Training: one batch of 256 sequences of 200 tokens.
            if device.is_cuda() || full_cpu_grid() || heads * width <= 256 {
                shapes.push(Shape {
                    heads,
                    num_rows: 1_000_000,
                    width,
                    tokens: 256 * 200,
                });
            }
            // Serving: one request batch.
            shapes.push(Shape {
                heads,
                num_rows: 100_000,
                width,
                tokens: 256,
            });
        }
    }
    shapes
}

fn bench_dtype<T: FloatElement>(c: &mut Criterion, backend: &str, device: &Device) {
    let dtype = T::DTYPE;
    for shape in shapes(device) {
        let Shape {
            heads,
            num_rows,
            width,
            tokens,
        } = shape;
        let id = BenchmarkId::from_parameter(format!("H{heads}_V{num_rows}_D{width}_T{tokens}"));
        let table_values: Vec<T> = (0..heads * num_rows * width)
            .map(|i| T::from_f32((i % 251) as f32))
            .collect();
        let table = Tensor::from_vec(table_values, &[heads, num_rows, width], device).unwrap();
        let ids_host = ids(tokens, num_rows);
        let unique = {
            let mut sorted = ids_host.clone();
            sorted.sort_unstable();
            sorted.dedup();
            sorted.len()
        };
        let ids = Tensor::from_vec(ids_host, &[tokens], device).unwrap();
        let elements = (tokens * heads * width) as u64;

        let mut forward = c.benchmark_group(format!("embedding_fwd/{backend}/{dtype}"));
        forward.throughput(Throughput::Bytes(
            2 * elements * dtype.size() as u64 + 4 * tokens as u64,
        ));
        forward.bench_function(id.clone(), |b| {
            b.iter(|| embedding::forward(&table, &ids, None).unwrap())
        });
        forward.finish();

        // The backward never reads the table: one dtype measures it.
        if dtype != DType::F32 {
            continue;
        }
        let (_, saved) = embedding::forward(&table, &ids, None).unwrap();
        let dy = Tensor::from_vec(vec![0.5f32; elements as usize], &[tokens, heads, width], device).unwrap();
        let mut backward = c.benchmark_group(format!("embedding_bwd/{backend}/{dtype}"));
        let written = (unique * heads * width * 4 + unique * 4) as u64;
        backward.throughput(Throughput::Bytes(elements * 4 + 4 * tokens as u64 + written));
        backward.bench_function(id, |b| b.iter(|| embedding::backward(&dy, &saved).unwrap()));
        backward.finish();
    }
}

fn main() {
    let mut c = configured();
    for (backend, device) in bench_devices() {
        bench_copy(&mut c, backend, &device);
        bench_dtype::<f32>(&mut c, backend, &device);
        bench_dtype::<bf16>(&mut c, backend, &device);
    }
    c.final_summary();
}
