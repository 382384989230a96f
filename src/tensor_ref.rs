//! Borrowed operands: [`TensorRef`] and [`TensorMut`], a shape over memory
//! the op does not own (a [`Tensor`], a host slice or a cudarc view), with no
//! copy. Every op's checked API takes them (`impl Into<TensorRef>`), so an
//! owned [`Tensor`] (`&tensor`) and a framework's buffer go through the same
//! checks and the same backends.

use crate::cuda::CudaDevice;
use crate::device::Device;
use crate::dtype::{DType, Element};
use crate::error::Result;
use crate::tensor::{check_count, check_device, check_shape, not_on, Tensor};
use cudarc::driver::{CudaView, CudaViewMut};
use std::sync::Arc;

/// A borrowed, row-major, contiguous array of `T` with its shape: a view of a
/// [`Tensor`], of host memory or of a cudarc buffer. Building one never
/// copies.
///
/// A CUDA view must belong to `device`'s context; the op queues its work on
/// `device`'s stream, so a view written on another stream must be ordered
/// before it by the caller.
///
/// ```
/// use moerec::{Device, Tensor, TensorRef};
///
/// let host = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
/// let view = TensorRef::from_slice(&host, &[2, 3])?;
/// assert_eq!(view.shape(), &[2, 3]);
/// let owned = Tensor::from_vec(vec![0u32; 4], &[4], &Device::cpu())?;
/// let borrowed = TensorRef::from(&owned).reshape(&[2, 2])?;
/// assert_eq!(borrowed.shape(), &[2, 2]);
/// # Ok::<(), moerec::Error>(())
/// ```
pub struct TensorRef<'a, T: Element> {
    pub(crate) shape: Vec<usize>,
    pub(crate) data: RefData<'a, T>,
}

pub(crate) enum RefData<'a, T> {
    Cpu(&'a [T]),
    Cuda {
        data: CudaView<'a, T>,
        device: Arc<CudaDevice>,
    },
}

/// A mutably borrowed, row-major, contiguous array of `T` with its shape (the
/// in-place ops' operand): a [`Tensor`], host memory or a cudarc view.
///
/// ```
/// use moerec::TensorMut;
///
/// let mut host = vec![0.0f32; 6];
/// let view = TensorMut::from_slice(&mut host, &[3, 2])?;
/// assert_eq!(view.shape(), &[3, 2]);
/// # Ok::<(), moerec::Error>(())
/// ```
pub struct TensorMut<'a, T: Element> {
    pub(crate) shape: Vec<usize>,
    pub(crate) data: MutData<'a, T>,
}

pub(crate) enum MutData<'a, T> {
    Cpu(&'a mut [T]),
    Cuda {
        data: CudaViewMut<'a, T>,
        device: Arc<CudaDevice>,
    },
}

impl<'a, T: Element> TensorRef<'a, T> {
    /// Host memory with `shape` (its element count must be `data.len()`).
    pub fn from_slice(data: &'a [T], shape: &[usize]) -> Result<Self> {
        check_count(shape, data.len())?;
        Ok(TensorRef {
            shape: shape.to_vec(),
            data: RefData::Cpu(data),
        })
    }

    /// A cudarc view on `device` with `shape` (its element count must be
    /// `data.len()`).
    pub fn from_cuda_view(data: CudaView<'a, T>, shape: &[usize], device: &Arc<CudaDevice>) -> Result<Self> {
        check_count(shape, data.len())?;
        Ok(TensorRef {
            shape: shape.to_vec(),
            data: RefData::Cuda {
                data,
                device: device.clone(),
            },
        })
    }

    /// The same elements with another shape of the same element count.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Self> {
        check_count(shape, self.len())?;
        self.shape = shape.to_vec();
        Ok(self)
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        match &self.data {
            RefData::Cpu(data) => data.len(),
            RefData::Cuda { data, .. } => data.len(),
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        T::DTYPE
    }

    /// Where the elements live.
    pub fn device(&self) -> Device {
        match &self.data {
            RefData::Cpu(_) => Device::Cpu,
            RefData::Cuda { device, .. } => Device::Cuda(device.clone()),
        }
    }

    /// The host elements, when they live on the CPU.
    pub fn as_slice(&self) -> Option<&'a [T]> {
        match self.data {
            RefData::Cpu(data) => Some(data),
            RefData::Cuda { .. } => None,
        }
    }

    /// The device elements, when they live on a CUDA device.
    pub fn as_cuda_view(&self) -> Option<CudaView<'_, T>> {
        match &self.data {
            RefData::Cuda { data, .. } => Some(data.slice(..)),
            RefData::Cpu(_) => None,
        }
    }

    /// An owned copy on the same device.
    pub fn to_tensor(&self) -> Result<Tensor<T>> {
        match &self.data {
            RefData::Cpu(data) => Tensor::from_slice(data, &self.shape, &Device::Cpu),
            RefData::Cuda { data, device } => Tensor::copy_of_view(data, &self.shape, device),
        }
    }

    /// The elements on the host (waits for the device).
    pub fn to_vec(&self) -> Result<Vec<T>> {
        match &self.data {
            RefData::Cpu(data) => Ok(data.to_vec()),
            RefData::Cuda { data, device } => device
                .stream()
                .clone_dtoh(data)
                .map_err(crate::cuda::driver_error("cuMemcpyDtoH")),
        }
    }

    /// The host elements, or an error naming the operand's device.
    pub(crate) fn host(&self) -> Result<&'a [T]> {
        self.as_slice().ok_or_else(|| not_on("cpu", &self.device()))
    }

    /// The device elements, or an error naming the operand's device.
    pub(crate) fn cuda_view(&self) -> Result<CudaView<'_, T>> {
        self.as_cuda_view().ok_or_else(|| not_on("cuda", &self.device()))
    }

    /// Checks that the shape is exactly `expected`.
    pub(crate) fn expect_shape(&self, argument: &'static str, expected: &[usize]) -> Result<()> {
        check_shape(argument, expected, &self.shape)
    }

    /// Checks that the elements live on `device`.
    pub(crate) fn expect_device(&self, argument: &'static str, device: &Device) -> Result<()> {
        check_device(argument, device, &self.device())
    }
}

/// The device view of an optional operand (`None` stays `None`; a host
/// operand is an error naming its device).
pub(crate) fn optional_cuda_view<'t, T: Element>(
    tensor: Option<&'t TensorRef<'_, T>>,
) -> Result<Option<CudaView<'t, T>>> {
    tensor.map(TensorRef::cuda_view).transpose()
}

impl<'a, T: Element> From<&'a Tensor<T>> for TensorRef<'a, T> {
    fn from(tensor: &'a Tensor<T>) -> Self {
        tensor.as_tensor_ref()
    }
}

impl<T: Element> Clone for TensorRef<'_, T> {
    /// Another view of the same elements (no copy).
    fn clone(&self) -> Self {
        let data = match &self.data {
            RefData::Cpu(data) => RefData::Cpu(data),
            // The full range is always in bounds: this cannot panic.
            RefData::Cuda { data, device } => RefData::Cuda {
                data: data.slice(..),
                device: device.clone(),
            },
        };
        TensorRef {
            shape: self.shape.clone(),
            data,
        }
    }
}

impl<'a, T: Element> From<&TensorRef<'a, T>> for TensorRef<'a, T> {
    /// Another view, so one borrowed operand can be passed to several ops.
    fn from(tensor: &TensorRef<'a, T>) -> Self {
        tensor.clone()
    }
}

impl<T: Element> std::fmt::Debug for TensorRef<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorRef")
            .field("dtype", &T::DTYPE)
            .field("shape", &self.shape)
            .field("device", &self.device())
            .finish()
    }
}

impl<'a, T: Element> TensorMut<'a, T> {
    /// Host memory with `shape` (its element count must be `data.len()`).
    pub fn from_slice(data: &'a mut [T], shape: &[usize]) -> Result<Self> {
        check_count(shape, data.len())?;
        Ok(TensorMut {
            shape: shape.to_vec(),
            data: MutData::Cpu(data),
        })
    }

    /// A mutable cudarc view on `device` with `shape`.
    pub fn from_cuda_view(data: CudaViewMut<'a, T>, shape: &[usize], device: &Arc<CudaDevice>) -> Result<Self> {
        check_count(shape, data.len())?;
        Ok(TensorMut {
            shape: shape.to_vec(),
            data: MutData::Cuda {
                data,
                device: device.clone(),
            },
        })
    }

    /// The same elements with another shape of the same element count.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Self> {
        let len = match &self.data {
            MutData::Cpu(data) => data.len(),
            MutData::Cuda { data, .. } => data.len(),
        };
        check_count(shape, len)?;
        self.shape = shape.to_vec();
        Ok(self)
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Where the elements live.
    pub fn device(&self) -> Device {
        match &self.data {
            MutData::Cpu(_) => Device::Cpu,
            MutData::Cuda { device, .. } => Device::Cuda(device.clone()),
        }
    }

    /// A read-only re-borrow.
    pub fn as_ref(&self) -> TensorRef<'_, T> {
        let data = match &self.data {
            MutData::Cpu(data) => RefData::Cpu(data),
            MutData::Cuda { data, device } => RefData::Cuda {
                data: data.as_view(),
                device: device.clone(),
            },
        };
        TensorRef {
            shape: self.shape.clone(),
            data,
        }
    }

    /// The host elements, or an error naming the operand's device.
    pub(crate) fn host_mut(&mut self) -> Result<&mut [T]> {
        let device = self.device();
        match &mut self.data {
            MutData::Cpu(data) => Ok(data),
            MutData::Cuda { .. } => Err(not_on("cpu", &device)),
        }
    }

    /// The device elements, or an error naming the operand's device.
    pub(crate) fn cuda_view_mut(&mut self) -> Result<CudaViewMut<'_, T>> {
        let device = self.device();
        match &mut self.data {
            MutData::Cuda { data, .. } => Ok(data.slice_mut(..)),
            MutData::Cpu(_) => Err(not_on("cuda", &device)),
        }
    }

    /// Checks that the shape is exactly `expected`.
    pub(crate) fn expect_shape(&self, argument: &'static str, expected: &[usize]) -> Result<()> {
        check_shape(argument, expected, &self.shape)
    }

    /// Checks that the elements live on `device`.
    pub(crate) fn expect_device(&self, argument: &'static str, device: &Device) -> Result<()> {
        check_device(argument, device, &self.device())
    }
}

impl<'a, T: Element> From<&'a mut Tensor<T>> for TensorMut<'a, T> {
    fn from(tensor: &'a mut Tensor<T>) -> Self {
        tensor.as_tensor_mut()
    }
}

impl<'a, T: Element> From<&'a mut TensorMut<'_, T>> for TensorMut<'a, T> {
    /// A re-borrow, so one borrowed operand can be updated by several ops.
    fn from(tensor: &'a mut TensorMut<'_, T>) -> Self {
        let data = match &mut tensor.data {
            MutData::Cpu(data) => MutData::Cpu(data),
            MutData::Cuda { data, device } => MutData::Cuda {
                data: data.slice_mut(..),
                device: device.clone(),
            },
        };
        TensorMut {
            shape: tensor.shape.clone(),
            data,
        }
    }
}

impl<T: Element> std::fmt::Debug for TensorMut<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorMut")
            .field("dtype", &T::DTYPE)
            .field("shape", &self.shape)
            .field("device", &self.device())
            .finish()
    }
}
