//! Shared bench support: the devices to measure, the copy-bandwidth
//! reference every floor is computed from, and naming.
#![allow(dead_code)] // each bench uses a different part of this module

use criterion::{BenchmarkId, Criterion, Throughput};
use moerec::{Device, Tensor};
use std::time::Duration;

/// The CPU, then CUDA device 0 when one is usable.
pub fn bench_devices() -> Vec<(&'static str, Device)> {
    let mut devices = vec![("cpu", Device::cpu())];
    match Device::cuda(0) {
        Ok(cuda) => devices.push(("cuda", cuda)),
        Err(error) => eprintln!("note: CUDA not benchmarked: {error}"),
    }
    devices
}

/// `MOEREC_BENCH_FULL=1` runs the full reference grid on the CPU too (slow on
/// a small machine); by default the CPU takes the smaller shapes.
pub fn full_cpu_grid() -> bool {
    std::env::var("MOEREC_BENCH_FULL").is_ok_and(|v| v == "1")
}

/// Short runs: the shapes are many and each is large.
pub fn configured() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args()
}

/// The copy bandwidth every memory floor is measured against (DESIGN 5):
/// group `copy/<backend>`, throughput = bytes read + bytes written.
pub fn bench_copy(c: &mut Criterion, backend: &str, device: &Device) {
    let bytes: usize = if device.is_cuda() { 1 << 30 } else { 1 << 28 };
    let elements = bytes / 4;
    let mut group = c.benchmark_group(format!("copy/{backend}"));
    group.throughput(Throughput::Bytes(2 * bytes as u64));
    match device {
        Device::Cpu => {
            let source = vec![1f32; elements];
            let mut target = vec![0f32; elements];
            group.bench_function(BenchmarkId::from_parameter(format!("bytes{bytes}")), |b| {
                b.iter(|| target.copy_from_slice(&source))
            });
        }
        Device::Cuda(cuda) => {
            let source = Tensor::<f32>::zeros(&[elements], device).unwrap();
            let mut target = Tensor::<f32>::zeros(&[elements], device).unwrap();
            let stream = cuda.stream();
            group.bench_function(BenchmarkId::from_parameter(format!("bytes{bytes}")), |b| {
                b.iter(|| {
                    stream
                        .memcpy_dtod(source.as_cuda_slice().unwrap(), target.as_cuda_slice_mut().unwrap())
                        .unwrap();
                    stream.synchronize().unwrap();
                })
            });
        }
    }
    group.finish();
}
