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
//! | [`combine`], [`combine_with_utilisation`] | 4.3 | the expert rows, the routing weights, the residual, rho (utilisation carries none) |
//! | [`route`] | 4.2 | the logits, through the weights, the load-balance and the z-loss (indices, plan and gate mass carry none) |
//!
//! Devices: the CPU runs zero-copy on candle's CPU storage. With the
//! `candle-cuda` feature, CUDA tensors run zero-copy on candle's
//! `CudaStorage`: every op queues its work on the stream of the candle
//! device its operands live on ([`crate::Device::from_cuda_stream`]), its
//! outputs are moerec's device buffers handed to candle without a copy, and
//! forward and backward keep every tensor on the device. Like the op API,
//! an op waits once for its data checks (and the routing backward reads its
//! two loss coefficients back). Without the feature a CUDA tensor is an
//! error naming the operand.
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
pub use experts::{combine, combine_with_utilisation, expert_layer, expert_layer_rows};
pub use routing::{route, Routed, RoutingOptions};
pub use scoring::{cross_entropy, scores, topk, ScoringOptions};

use crate::dtype::Element;
use crate::error::Error;
use crate::tensor_ref::TensorRef;
#[cfg(feature = "candle-cuda")]
use candle_core::cuda_backend::CudaDType;
use candle_core::op::BackpropOp;
#[cfg(feature = "candle-cuda")]
use candle_core::CudaStorage;
use candle_core::{DType, Device, Layout, Shape, Storage, StorageRef, Tensor, WithDType};

impl From<Error> for candle_core::Error {
    fn from(error: Error) -> Self {
        candle_core::Error::wrap(error)
    }
}

/// An element both crates hold: f32, bf16, f16 and u32.
#[cfg(not(feature = "candle-cuda"))]
pub(crate) trait Shared: Element + WithDType {}
#[cfg(not(feature = "candle-cuda"))]
impl<T: Element + WithDType> Shared for T {}

/// An element both crates hold: f32, bf16, f16 and u32.
#[cfg(feature = "candle-cuda")]
pub(crate) trait Shared: Element + WithDType + CudaDType {}
#[cfg(feature = "candle-cuda")]
impl<T: Element + WithDType + CudaDType> Shared for T {}

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
        let beyond = |len: usize| Error::invalid(self.argument, format!("layout {start}..{end} beyond {len} elements"));
        match &*self.guard {
            Storage::Cpu(storage) => {
                let all = storage
                    .as_slice::<T>()
                    .map_err(|e| Error::invalid(self.argument, e.to_string()))?;
                let data = all.get(start..end).ok_or_else(|| beyond(all.len()))?;
                TensorRef::from_slice(data, self.layout.dims())
            }
            #[cfg(feature = "candle-cuda")]
            Storage::Cuda(storage) => {
                let all = storage
                    .as_cuda_slice::<T>()
                    .map_err(|e| Error::invalid(self.argument, e.to_string()))?;
                let data = all.try_slice(start..end).ok_or_else(|| beyond(all.len()))?;
                TensorRef::from_cuda_view(data, self.layout.dims(), &on_stream_of(&storage.device)?)
            }
            _ => Err(Error::DeviceUnavailable {
                requested: format!("{:?} for `{}`", self.guard.device().location(), self.argument),
                reason: UNAVAILABLE.into(),
            }),
        }
    }
}

/// Why a candle tensor on another device is refused.
#[cfg(feature = "candle-cuda")]
const UNAVAILABLE: &str = "moerec's candle ops run on candle's CPU and CUDA storage";
#[cfg(not(feature = "candle-cuda"))]
const UNAVAILABLE: &str =
    "moerec's candle ops run on candle's CPU storage; CUDA tensors need moerec's `candle-cuda` feature";

/// A moerec device queueing on the stream of candle's `device` (its
/// context's moerec kernels load once per process).
#[cfg(feature = "candle-cuda")]
pub(crate) fn on_stream_of(device: &candle_core::CudaDevice) -> crate::Result<std::sync::Arc<crate::cuda::CudaDevice>> {
    crate::cuda::CudaDevice::from_stream(device.cuda_stream())
}

/// The tensor as a candle storage and shape, moved without a copy. A CUDA
/// tensor is handed to `device`, the candle device whose stream the op ran
/// on (that of its operands).
pub(crate) fn into_storage<T: Shared>(tensor: crate::Tensor<T>, device: &Device) -> crate::Result<(Storage, Shape)> {
    let shape = Shape::from(tensor.shape().to_vec());
    match (tensor.device(), device) {
        (crate::Device::Cpu, _) => Ok((Storage::Cpu(T::to_cpu_storage_owned(tensor.into_vec()?)), shape)),
        #[cfg(feature = "candle-cuda")]
        (crate::Device::Cuda(_), Device::Cuda(candle)) => Ok((
            Storage::Cuda(CudaStorage::wrap_cuda_slice(tensor.into_cuda_slice()?, candle.clone())),
            shape,
        )),
        (own, _) => Err(Error::DeviceMismatch {
            argument: "output",
            expected: format!("{:?}", device.location()),
            actual: own.to_string(),
        }),
    }
}

/// A moerec tensor as a candle tensor on `device`, off the tape (no copy).
pub(crate) fn to_candle<T: Shared>(tensor: crate::Tensor<T>, device: &Device) -> candle_core::Result<Tensor> {
    let (storage, shape) = into_storage(tensor, device)?;
    Ok(Tensor::from_storage(storage, shape, BackpropOp::none(), false))
}
