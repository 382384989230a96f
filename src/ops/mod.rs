//! The op families. Each lives in one folder: its API in `mod.rs`, its CPU
//! backend in `cpu.rs`, its CUDA backend in `cuda.rs`, its kernels in
//! `kernels/<op>.cu`.

pub mod embedding;
