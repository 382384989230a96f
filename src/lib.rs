//! moerec: hand-written CUDA kernels, with a rayon CPU twin, for
//! Mixture-of-Experts sequential recommenders (FAME, Fuxi-MME, XSMoE).
//!
//! Three layers (DESIGN.md section 2): `kernels/*.cu` (device code), the
//! backends (`ops::<op>::cpu` on slices, `ops::<op>::cuda` on cudarc views and
//! a stream), and the op API (`ops::<op>::{forward, backward}` on [`Tensor`]s,
//! checked, returning [`Result`]).
//!
//! ```
//! use moerec::{embedding, Device, Tensor};
//!
//! let device = Device::cpu();
//! // Two heads, a catalog of three items, width two.
//! let table = Tensor::from_vec((0..12).map(|x| x as f32).collect(), &[2, 3, 2], &device)?;
//! let ids = Tensor::from_vec(vec![2u32, 0], &[2], &device)?;
//! let (rows, _saved) = embedding::forward(&table, &ids, None)?;
//! assert_eq!(rows.shape(), &[2, 2, 2]);
//! assert_eq!(rows.to_vec()?, vec![4.0, 5.0, 10.0, 11.0, 0.0, 1.0, 6.0, 7.0]);
//! # Ok::<(), moerec::Error>(())
//! ```

#![deny(missing_docs)]

#[cfg(feature = "candle")]
pub mod candle;
pub mod cuda;
pub mod device;
mod dtype;
mod error;
mod grouping;
pub mod ops;
mod optional;
mod tensor;
mod tensor_ref;

/// The `cudarc` crate this crate's CUDA backend is built on (its buffers and
/// views are what the backend layer and [`TensorRef`] take).
pub use cudarc;
pub use device::Device;
pub use dtype::{DType, Element, FloatElement};
pub use error::{Error, Result};
/// The `half` crate, whose `bf16` and `f16` are this crate's 16-bit elements.
pub use half;
pub use ops::{embedding, experts, routing, scoring};
pub use optional::{OptionalGrad, OptionalOperand};
pub use tensor::Tensor;
pub use tensor_ref::{TensorMut, TensorRef};
