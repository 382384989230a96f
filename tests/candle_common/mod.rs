//! Shared helpers of the candle op tests: deterministic inputs, DESIGN's
//! tolerance, and gradients that must exist.

#![allow(dead_code)]

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

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

/// A variable of `shape` and `dtype` holding [`values`].
pub fn var(seed: u64, shape: &[usize], dtype: DType) -> candle_core::Result<Var> {
    let len = shape.iter().product();
    let t = Tensor::from_vec(values(seed, len), shape, &Device::Cpu)?.to_dtype(dtype)?;
    Var::from_tensor(&t)
}

/// The same values in f64 as a fresh variable: the reference's operand
/// (inputs rounded to the element type first, as DESIGN's references do).
pub fn f64_var(v: &Var) -> candle_core::Result<Var> {
    Var::from_tensor(&v.as_tensor().to_dtype(DType::F64)?)
}

/// DESIGN 3's tolerance: `|a - r| <= rtol * (|r| + max|r|)` elementwise.
pub fn assert_close(what: &str, actual: &Tensor, reference: &Tensor, rtol: f64) -> TestResult {
    if actual.dims() != reference.dims() {
        return Err(format!("{what}: shape {:?} vs reference {:?}", actual.dims(), reference.dims()).into());
    }
    let a = actual.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let r = reference.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let max = r.iter().fold(0.0f64, |m, x| m.max(x.abs()));
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
