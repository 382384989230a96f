//! moerec's ops as candle ops (the `candle` cargo feature): forward on
//! candle's own storage with no copy, backward on candle's autograd tape.
//!
//! Every function takes and returns [`candle_core::Tensor`]s and returns
//! [`candle_core::Result`]; moerec's errors arrive wrapped, with their
//! message (argument, expected and actual value) intact. Float operands may
//! be f32, bf16 or f16 (one type per op); ids are u32; what DESIGN.md makes
//! f32 (losses, scores, routing weights, item bias, rho) is f32. A
//! non-contiguous operand is made contiguous first (candle's `contiguous`,
//! which keeps its gradient). Gradients reach every float operand the op
//! differentiates by (in the operand's element type); ids, masks, plans and
//! top-n results carry none.
//!
//! | function | DESIGN | differentiable in |
//! |---|---|---|
//! | [`cross_entropy`] | 4.4 | user states, gate logits, items, item bias |
//! | [`scores`] | 4.4 | user states, gate logits, items, item bias |
//! | [`topk`] | 4.4 | (none: ids and values) |
//! | [`embedding`] | 4.1 | the table (dense gradient) |
//! | [`embedding_sgd`] | 4.1 | (a fused sparse SGD step of the table, in place) |
//! | [`expert_layer`], [`expert_layer_rows`] | 4.3 | x, the expert weights, the bias |
//! | [`combine`] | 4.3 | the expert rows, the routing weights, the residual, rho |
//! | [`route`] | 4.2 | the logits, through the weights, the load-balance and the z-loss (indices, plan and gate mass carry none) |
//!
//! Devices: the CPU runs zero-copy on candle's CPU storage. CUDA tensors
//! are refused with a clear error until the CUDA side is built (on candle's
//! `CudaStorage` and its stream).
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use moerec::candle::{cross_entropy, ScoringOptions};
//!
//! let device = Device::Cpu;
//! // Two sequences, two heads of width 3, a catalog of five items per head.
//! let user = Var::from_tensor(&Tensor::rand(-1f32, 1.0, (2, 2, 3), &device)?)?;
//! let gates = Var::from_tensor(&Tensor::zeros((2, 2), candle_core::DType::F32, &device)?)?;
//! let items = Var::from_tensor(&Tensor::rand(-1f32, 1.0, (2, 5, 3), &device)?)?;
//! let targets = Tensor::new(&[4u32, 1], &device)?;
//! let loss = cross_entropy(&user, &gates, &items, &targets, None, &ScoringOptions::default())?;
//! let grads = loss.mean_all()?.backward()?;
//! assert_eq!(grads.get(&items).expect("items get a gradient").dims(), &[2, 5, 3]);
//! # Ok::<(), candle_core::Error>(())
//! ```

mod autograd;
mod embedding;
mod experts;
mod routing;
mod scoring;

pub use embedding::{embedding, embedding_sgd};
pub use experts::{combine, expert_layer, expert_layer_rows};
pub use routing::{route, Routed, RoutingOptions};
pub use scoring::{cross_entropy, scores, topk, ScoringOptions};

use crate::dtype::Element;
use crate::error::Error;
use crate::tensor_ref::TensorRef;
use candle_core::op::BackpropOp;
use candle_core::{DType, Layout, Shape, Storage, StorageRef, Tensor, WithDType};

impl From<Error> for candle_core::Error {
    fn from(error: Error) -> Self {
        candle_core::Error::wrap(error)
    }
}

/// An element both crates hold: f32, bf16, f16 and u32.
pub(crate) trait Shared: Element + WithDType {}
impl<T: Element + WithDType> Shared for T {}

/// Runs `$body` with `$T` the moerec float type of candle dtype `$dtype`.
macro_rules! with_float {
    ($argument:expr, $dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $T = f32;
                $body
            }
            candle_core::DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            candle_core::DType::F16 => {
                type $T = half::f16;
                $body
            }
            other => Err(candle_core::Error::from($crate::error::Error::invalid(
                $argument,
                format!("expected f32, bf16 or f16, got {other:?}"),
            ))),
        }
    };
}
pub(crate) use with_float;

/// A candle tensor's storage, read-locked, with its layout.
pub(crate) struct Borrowed<'t> {
    argument: &'static str,
    guard: StorageRef<'t>,
    layout: &'t Layout,
    dtype: DType,
}

impl<'t> Borrowed<'t> {
    /// Read-locks `tensor`'s storage (made contiguous by the caller).
    pub(crate) fn new(argument: &'static str, tensor: &'t Tensor) -> Self {
        let (guard, layout) = tensor.storage_and_layout();
        Borrowed {
            argument,
            guard,
            layout,
            dtype: tensor.dtype(),
        }
    }

    /// The elements as a moerec operand, without a copy.
    pub(crate) fn get<T: Shared>(&self) -> crate::Result<TensorRef<'_, T>> {
        if self.dtype != <T as WithDType>::DTYPE {
            return Err(Error::invalid(
                self.argument,
                format!("expected {:?}, got {:?}", <T as WithDType>::DTYPE, self.dtype),
            ));
        }
        let (start, end) = self
            .layout
            .contiguous_offsets()
            .ok_or_else(|| Error::invalid(self.argument, "expected a contiguous tensor"))?;
        match &*self.guard {
            Storage::Cpu(storage) => {
                let all = storage
                    .as_slice::<T>()
                    .map_err(|e| Error::invalid(self.argument, e.to_string()))?;
                let data = all.get(start..end).ok_or_else(|| {
                    Error::invalid(
                        self.argument,
                        format!("layout {start}..{end} beyond {} elements", all.len()),
                    )
                })?;
                TensorRef::from_slice(data, self.layout.dims())
            }
            _ => Err(Error::DeviceUnavailable {
                requested: format!("{:?} for `{}`", self.guard.device().location(), self.argument),
                reason: "moerec's candle ops run on candle's CPU storage; the CUDA side is not built yet".into(),
            }),
        }
    }
}

/// The tensor as a candle storage and shape, moved without a copy.
pub(crate) fn into_storage<T: Shared>(tensor: crate::Tensor<T>) -> crate::Result<(Storage, Shape)> {
    let shape = Shape::from(tensor.shape().to_vec());
    match tensor.device() {
        crate::Device::Cpu => Ok((Storage::Cpu(T::to_cpu_storage_owned(tensor.into_vec()?)), shape)),
        device @ crate::Device::Cuda(_) => Err(Error::DeviceUnavailable {
            requested: device.to_string(),
            reason: "moerec's candle ops hand back CPU storage only so far".into(),
        }),
    }
}

/// A moerec tensor as a candle tensor off the tape (no copy).
pub(crate) fn to_candle<T: Shared>(tensor: crate::Tensor<T>) -> candle_core::Result<Tensor> {
    let (storage, shape) = into_storage(tensor)?;
    Ok(Tensor::from_storage(storage, shape, BackpropOp::none(), false))
}
