//! Shared test support: the harness (one trial per device), golden files, a
//! seeded generator and the DESIGN tolerance check.
// Each test binary uses a different part of this module.
#![allow(dead_code, unused_macros, unused_imports)]

use half::{bf16, f16};
use moerec::{Device, FloatElement};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::PathBuf;

pub mod harness;

/// The golden folder for an op: `$MOEREC_GOLDEN_DIR/<op>` or
/// `tests/golden/<op>` relative to the working directory (the package root
/// under `cargo test`; the repo root when a copied binary runs elsewhere).
pub fn golden_dir(op: &str) -> PathBuf {
    let root = std::env::var_os("MOEREC_GOLDEN_DIR").map_or_else(|| PathBuf::from("tests/golden"), PathBuf::from);
    root.join(op)
}

/// Every golden case of an op, sorted by name.
pub fn golden_cases(op: &str) -> Vec<Golden> {
    let dir = golden_dir(op);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| {
            panic!(
                "reading {}: {e} (run from the repo root or set MOEREC_GOLDEN_DIR)",
                dir.display()
            )
        })
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no golden files in {}", dir.display());
    paths.iter().map(|p| Golden::load(p)).collect()
}

/// A tensor of a golden file: its stored type, shape and values widened to
/// f64 (u32 values exactly).
pub struct GoldenTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub values: Vec<f64>,
    bytes: Vec<u8>,
}

impl GoldenTensor {
    pub fn u32(&self) -> Vec<u32> {
        assert_eq!(self.dtype, Dtype::U32);
        self.bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    pub fn f32(&self) -> Vec<f32> {
        self.values.iter().map(|&v| v as f32).collect()
    }

    /// The stored values as element type T (exact: they were stored as T).
    pub fn elements<T: FloatElement>(&self) -> Vec<T> {
        self.values.iter().map(|&v| T::from_f32(v as f32)).collect()
    }
}

pub struct Golden {
    pub name: String,
    pub metadata: HashMap<String, String>,
    pub tensors: HashMap<String, GoldenTensor>,
}

impl Golden {
    pub fn load(path: &std::path::Path) -> Golden {
        let bytes = std::fs::read(path).unwrap();
        let (_, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
        let metadata = metadata.metadata().clone().unwrap_or_default();
        let file = SafeTensors::deserialize(&bytes).unwrap();
        let tensors = file
            .tensors()
            .into_iter()
            .map(|(name, view)| {
                let data = view.data();
                let values: Vec<f64> = match view.dtype() {
                    Dtype::F32 => data
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
                        .collect(),
                    Dtype::BF16 => data
                        .chunks_exact(2)
                        .map(|b| bf16::from_le_bytes(b.try_into().unwrap()).to_f64())
                        .collect(),
                    Dtype::F16 => data
                        .chunks_exact(2)
                        .map(|b| f16::from_le_bytes(b.try_into().unwrap()).to_f64())
                        .collect(),
                    Dtype::U32 => data
                        .chunks_exact(4)
                        .map(|b| u32::from_le_bytes(b.try_into().unwrap()) as f64)
                        .collect(),
                    other => panic!("{name}: unexpected dtype {other:?}"),
                };
                let tensor = GoldenTensor {
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    values,
                    bytes: data.to_vec(),
                };
                (name, tensor)
            })
            .collect();
        Golden {
            name: path.file_stem().unwrap().to_string_lossy().into_owned(),
            metadata,
            tensors,
        }
    }

    pub fn tensor(&self, name: &str) -> &GoldenTensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("{}: no tensor `{name}`", self.name))
    }

    pub fn meta(&self, key: &str) -> &str {
        self.metadata
            .get(key)
            .unwrap_or_else(|| panic!("{}: no metadata `{key}`", self.name))
    }
}

/// rtol by DESIGN 3: 1e-5 for gathers and element-wise work, 1e-4 for
/// reductions with f32 inputs, 1e-2 with bf16/f16.
pub fn rtol<T: FloatElement>(reduction: bool) -> f64 {
    match (T::DTYPE, reduction) {
        (moerec::DType::F32, false) => 1e-5,
        (moerec::DType::F32, true) => 1e-4,
        _ => 1e-2,
    }
}

/// `|a - r| <= rtol * (|r| + max|r|)` element-wise (DESIGN 3).
pub fn assert_close(what: &str, actual: &[f64], reference: &[f64], rtol: f64) {
    assert_eq!(actual.len(), reference.len(), "{what}: length");
    let scale = reference.iter().fold(0f64, |m, r| m.max(r.abs()));
    for (i, (&a, &r)) in actual.iter().zip(reference).enumerate() {
        assert!(
            (a - r).abs() <= rtol * (r.abs() + scale),
            "{what}[{i}]: got {a}, expected {r} (rtol {rtol}, max|r| {scale})"
        );
    }
}

pub fn widen<T: FloatElement>(values: &[T]) -> Vec<f64> {
    values.iter().map(|v| v.to_f32() as f64).collect()
}

/// A small seeded generator (SplitMix64): tests need no rand crate.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, bound).
    pub fn below(&mut self, bound: u32) -> u32 {
        (self.next_u64() % u64::from(bound)) as u32
    }

    /// Uniform in [-1, 1).
    pub fn signed_unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    pub fn floats<T: FloatElement>(&mut self, n: usize) -> Vec<T> {
        (0..n).map(|_| T::from_f32(self.signed_unit())).collect()
    }
}

/// Runs `check::<T>(golden, device)` for every golden case of `op`, T the
/// case's element type.
macro_rules! for_each_golden {
    ($op:expr, $check:ident, $device:expr) => {
        for golden in &$crate::common::golden_cases($op) {
            match golden.meta("dtype") {
                "f32" => $check::<f32>(golden, $device),
                "bf16" => $check::<half::bf16>(golden, $device),
                "f16" => $check::<half::f16>(golden, $device),
                other => panic!("{}: unknown dtype {other}", golden.name),
            }
        }
    };
}
pub(crate) use for_each_golden;
