//! Shared helpers of the candle op tests: each test body runs on candle's
//! CPU and on its CUDA device 0 (`cpu::<name>`, `cuda::<name>`); the
//! references run in plain candle ops on the CPU in float64. Deterministic
//! inputs, DESIGN's tolerance, and gradients that must exist.

#![allow(dead_code)]

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use libtest_mimic::{Arguments, Completion, Failed, Trial};
use std::process::ExitCode;

/// A test error: a message naming what failed.
pub type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Deterministic values in `[-1, 1)`.
pub fn values(seed: u64, len: usize) -> Vec<f32> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// A variable of `shape` and `dtype` on `device` holding [`values`].
pub fn var(seed: u64, shape: &[usize], dtype: DType, device: &Device) -> candle_core::Result<Var> {
    let len = shape.iter().product();
    let t = Tensor::from_vec(values(seed, len), shape, &Device::Cpu)?.to_dtype(dtype)?;
    Var::from_tensor(&t.to_device(device)?)
}

/// The same values in f64 on the CPU as a fresh variable: the reference's
/// operand (inputs rounded to the element type first, as DESIGN's
/// references do).
pub fn f64_var(v: &Var) -> candle_core::Result<Var> {
    Var::from_tensor(&v.as_tensor().to_device(&Device::Cpu)?.to_dtype(DType::F64)?)
}

/// DESIGN 3's tolerance: `|a - r| <= rtol * (|r| + max|r|)` elementwise.
pub fn assert_close(what: &str, actual: &Tensor, reference: &Tensor, rtol: f64) -> TestResult {
    assert_close_with_floor(what, actual, reference, rtol, 0.0)
}

/// [`assert_close`] with `max|r|` at least `floor`: for values that are zero
/// in exact arithmetic and come out of f32 as rounding noise.
pub fn assert_close_with_floor(what: &str, actual: &Tensor, reference: &Tensor, rtol: f64, floor: f64) -> TestResult {
    if actual.dims() != reference.dims() {
        return Err(format!("{what}: shape {:?} vs reference {:?}", actual.dims(), reference.dims()).into());
    }
    let host = |t: &Tensor| {
        t.to_device(&Device::Cpu)?
            .flatten_all()?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()
    };
    let (a, r) = (host(actual)?, host(reference)?);
    let max = r.iter().fold(floor, |m, x| m.max(x.abs()));
    for (i, (x, y)) in a.iter().zip(&r).enumerate() {
        let within = (x - y).abs() <= rtol * (y.abs() + max);
        if !within {
            return Err(format!("{what}[{i}]: {x} vs reference {y} (max |r| {max}, rtol {rtol})").into());
        }
    }
    Ok(())
}

/// The gradient of `var`, or an error naming it: a missing gradient fails.
pub fn grad<'g>(grads: &'g GradStore, var: &Var, what: &str) -> Result<&'g Tensor, String> {
    grads
        .get(var.as_tensor())
        .ok_or_else(|| format!("no gradient reached `{what}`"))
}

/// Compares the gradients of the op's and the reference's operands.
pub fn assert_grads(grads: &GradStore, reference: &GradStore, pairs: &[(&str, &Var, &Var)], rtol: f64) -> TestResult {
    for (what, ours, theirs) in pairs {
        assert_close(
            &format!("d{what}"),
            grad(grads, ours, what)?,
            grad(reference, theirs, what)?,
            rtol,
        )?;
    }
    Ok(())
}

/// A test body run once per candle device.
pub type Body = (&'static str, fn(&Device) -> TestResult);

fn require_gpu() -> bool {
    std::env::var("MOEREC_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// candle's CUDA device 0 with moerec's kernels compiled in, or why not;
/// `feature_off`: why the test crate's CUDA feature is off (the feature is
/// the calling crate's, so the caller evaluates it: see [`candle_main`]).
fn cuda_device(feature_off: Option<&str>) -> Result<Device, String> {
    if let Some(reason) = feature_off {
        return Err(reason.into());
    }
    if !moerec::cuda::kernels_compiled() {
        return Err("moerec's kernels were not compiled into this build (no nvcc)".into());
    }
    Device::new_cuda(0).map_err(|error| format!("candle has no CUDA device 0: {error}"))
}

fn outcome(result: TestResult) -> Result<(), Failed> {
    result.map_err(|error| Failed::from(error.to_string()))
}

/// Runs every body as `cpu::<name>` and `cuda::<name>` with libtest's
/// command line and output. A CUDA trial that cannot run is reported as
/// ignored with the reason (with `MOEREC_REQUIRE_GPU=1`: failed), never as
/// passed. `source` is the binary's own text, which must hold no `#[test]`:
/// under `harness = false` such a test would never run. `feature_off`: why
/// the calling crate cannot reach candle's CUDA tensors (its feature is off),
/// or `None`.
pub fn run(source: &str, feature_off: Option<&'static str>, bodies: &[Body]) -> ExitCode {
    let mut trials = Vec::new();
    for &(name, body) in bodies {
        trials.push(Trial::test(format!("cpu::{name}"), move || outcome(body(&Device::Cpu))));
        trials.push(Trial::ignorable_test(
            format!("cuda::{name}"),
            move || match cuda_device(feature_off) {
                Ok(device) => outcome(body(&device)).map(|()| Completion::Completed),
                Err(reason) if require_gpu() => Err(Failed::from(format!(
                    "MOEREC_REQUIRE_GPU=1 but the candle CUDA trial cannot run: {reason}"
                ))),
                Err(reason) => Ok(Completion::ignored_with(reason)),
            },
        ));
    }
    let stray = source.matches(concat!("#[", "test]")).count();
    trials.push(Trial::test("harness::every_test_is_registered", move || {
        if stray == 0 {
            Ok(())
        } else {
            Err(Failed::from(format!(
                "{stray} #[test] function(s) in a harness = false binary never run: list them in main"
            )))
        }
    }));
    libtest_mimic::run(&Arguments::from_args(), trials).exit_code()
}

/// `fn main` of a candle test binary of the moerec crate: its test bodies by
/// name (`models/tests/devices.rs` calls [`run`] with its own crate's feature).
#[allow(unused_macros)]
macro_rules! candle_main {
    ($($body:ident),* $(,)?) => {
        fn main() -> std::process::ExitCode {
            candle_common::run(
                include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/", file!())),
                (!cfg!(feature = "candle-cuda"))
                    .then_some("moerec's `candle-cuda` feature is off (candle's CUDA tensors are refused)"),
                &[$((stringify!($body), $body as fn(&candle_core::Device) -> candle_common::TestResult)),*],
            )
        }
    };
}
#[allow(unused_imports)]
pub(crate) use candle_main;
