//! `Tensor<T>`: a row-major, contiguous array on one device.

use crate::cuda::{driver_error, CudaDevice};
use crate::device::Device;
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::tensor_ref::{MutData, RefData, TensorMut, TensorRef};
use cudarc::driver::{CudaSlice, CudaStream, CudaView};
use std::sync::Arc;

/// A row-major, contiguous array of `T` on the CPU or a CUDA device.
///
/// CUDA tensors are allocated, written and freed in order on their device's
/// stream ([`CudaDevice::stream`]); a caller that uses the buffer on another
/// stream must make that stream wait for this one first (cudarc does it by
/// itself on a context that tracks events).
pub struct Tensor<T: Element> {
    shape: Vec<usize>,
    storage: Storage<T>,
}

enum Storage<T: Element> {
    Cpu(Vec<T>),
    Cuda {
        data: CudaSlice<T>,
        device: Arc<CudaDevice>,
    },
}

/// The number of elements of `shape`, or an error on overflow.
pub(crate) fn element_count(argument: &'static str, shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::invalid(argument, format!("shape {shape:?} has more elements than usize holds")))
}

/// Checks that `shape` holds exactly `len` elements (the data's).
pub(crate) fn check_count(shape: &[usize], len: usize) -> Result<()> {
    let count = element_count("shape", shape)?;
    if count == len {
        Ok(())
    } else {
        Err(Error::ShapeMismatch {
            argument: "data",
            expected: format!("{count} elements for shape {shape:?}"),
            actual: format!("{len} elements"),
        })
    }
}

/// Checks that an operand's shape is exactly `expected`.
pub(crate) fn check_shape(argument: &'static str, expected: &[usize], actual: &[usize]) -> Result<()> {
    if actual == expected {
        Ok(())
    } else {
        Err(Error::shape(argument, format!("{expected:?}"), actual))
    }
}

/// Checks that an operand on `actual` lives on `expected`.
pub(crate) fn check_device(argument: &'static str, expected: &Device, actual: &Device) -> Result<()> {
    if actual == expected {
        Ok(())
    } else {
        Err(Error::DeviceMismatch {
            argument,
            expected: expected.to_string(),
            actual: actual.to_string(),
        })
    }
}

/// `len` copies of `value` on the host, or [`Error::InvalidArgument`] naming
/// `argument` when the allocation fails: the global allocator aborts the
/// process on failure, so every host buffer sized from the caller's shapes
/// goes through here.
pub(crate) fn host_filled<T: Clone>(argument: &'static str, value: T, len: usize) -> Result<Vec<T>> {
    let mut data = host_uninit(argument, len)?;
    data.resize(len, value);
    Ok(data)
}

/// An empty host vector with room for `len` elements (for a backend that
/// writes every element), or [`Error::InvalidArgument`] as [`host_filled`].
pub(crate) fn host_uninit<T>(argument: &'static str, len: usize) -> Result<Vec<T>> {
    let mut data = Vec::new();
    data.try_reserve_exact(len)
        .map_err(|_| allocation_error::<T>(argument, len))?;
    advise_huge_pages(&mut data);
    Ok(data)
}

/// Buffers from this size on are backed by transparent huge pages where the
/// kernel offers them on request.
const HUGE_PAGE_MIN_BYTES: usize = 4 << 20;

/// Asks the kernel to back a large fresh buffer with 2 MiB pages (Linux,
/// `MADV_HUGEPAGE`). A large allocation is a fresh mapping each time, and
/// its first touch costs a page fault per 4 KiB: writing 50 MB of new output
/// took ~100 ms on a 2-core EPYC against ~22 ms with huge pages, more than
/// the op's own work. Advice only: where the kernel declines (THP off, no
/// Linux), nothing changes.
fn advise_huge_pages<T>(data: &mut Vec<T>) {
    #[cfg(target_os = "linux")]
    {
        let bytes = data.capacity() * std::mem::size_of::<T>();
        if bytes < HUGE_PAGE_MIN_BYTES {
            return;
        }
        const PAGE: usize = 4096;
        let begin = data.as_mut_ptr() as usize;
        let start = begin.next_multiple_of(PAGE);
        let end = (begin + bytes) & !(PAGE - 1);
        // SAFETY: [start, end) lies within the vector's own allocation (page
        // boundaries rounded inwards) and madvise with MADV_HUGEPAGE changes
        // no contents and no mapping, only how later faults are served; its
        // result is ignored because it is advice.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = data;
}

fn allocation_error<T>(argument: &'static str, len: usize) -> Error {
    let bytes = (len as u128) * std::mem::size_of::<T>() as u128;
    Error::invalid(
        argument,
        format!("{len} elements ({bytes} bytes) cannot be allocated on the host"),
    )
}

impl<T: Element> Tensor<T> {
    /// A tensor holding `data` with `shape` on `device` (a copy to the GPU for
    /// CUDA devices).
    pub fn from_vec(data: Vec<T>, shape: &[usize], device: &Device) -> Result<Self> {
        check_count(shape, data.len())?;
        let storage = match device {
            Device::Cpu => Storage::Cpu(data),
            Device::Cuda(cuda) => Storage::Cuda {
                data: upload(cuda.stream(), &data)?,
                device: cuda.clone(),
            },
        };
        Ok(Tensor {
            shape: shape.to_vec(),
            storage,
        })
    }

    /// Like [`Tensor::from_vec`], copying from a slice.
    pub fn from_slice(data: &[T], shape: &[usize], device: &Device) -> Result<Self> {
        Self::from_vec(data.to_vec(), shape, device)
    }

    /// A tensor of zeros. A shape whose bytes the host cannot allocate is
    /// [`Error::InvalidArgument`], not an abort.
    pub fn zeros(shape: &[usize], device: &Device) -> Result<Self> {
        let count = element_count("shape", shape)?;
        let storage = match device {
            Device::Cpu => Storage::Cpu(host_filled("shape", T::default(), count)?),
            Device::Cuda(cuda) => Storage::Cuda {
                data: alloc_zeros(cuda.stream(), count)?,
                device: cuda.clone(),
            },
        };
        Ok(Tensor {
            shape: shape.to_vec(),
            storage,
        })
    }

    /// Wraps a cudarc buffer already on `device` (no copy).
    pub fn from_cuda_slice(data: CudaSlice<T>, shape: &[usize], device: &Arc<CudaDevice>) -> Result<Self> {
        check_count(shape, data.len())?;
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: Storage::Cuda {
                data,
                device: device.clone(),
            },
        })
    }

    /// A copy of a device view on `device`.
    pub(crate) fn copy_of_view(data: &CudaView<'_, T>, shape: &[usize], device: &Arc<CudaDevice>) -> Result<Self> {
        let mut copy = alloc_uninit::<T>(device.stream(), data.len())?;
        if !data.is_empty() {
            device
                .stream()
                .memcpy_dtod(data, &mut copy)
                .map_err(driver_error("cuMemcpyDtoDAsync"))?;
        }
        Tensor::from_cuda_slice(copy, shape, device)
    }

    /// The same elements with another shape of the same element count (no
    /// copy), e.g. `[B * H, D]` to `[B, H, D]`.
    ///
    /// ```
    /// use moerec::{Device, Tensor};
    ///
    /// let flat = Tensor::from_vec(vec![0.0f32; 12], &[6, 2], &Device::cpu())?;
    /// let heads = flat.reshape(&[3, 2, 2])?;
    /// assert_eq!(heads.shape(), &[3, 2, 2]);
    /// assert!(heads.reshape(&[5]).is_err());
    /// # Ok::<(), moerec::Error>(())
    /// ```
    pub fn reshape(mut self, shape: &[usize]) -> Result<Self> {
        let count = element_count("shape", shape)?;
        if count != self.len() {
            return Err(Error::ShapeMismatch {
                argument: "shape",
                expected: format!("{} elements, as in {:?}", self.len(), self.shape),
                actual: format!("{count} elements in {shape:?}"),
            });
        }
        self.shape = shape.to_vec();
        Ok(self)
    }

    /// The elements as a `Vec`: moved out without a copy on the CPU, copied
    /// to the host (waiting for the device) on a CUDA device.
    pub fn into_vec(self) -> Result<Vec<T>> {
        match self.storage {
            Storage::Cpu(data) => Ok(data),
            Storage::Cuda { data, device } => device.stream().clone_dtoh(&data).map_err(driver_error("cuMemcpyDtoH")),
        }
    }

    /// The cudarc buffer, moved out without a copy; an error for a CPU
    /// tensor. Its work is queued on the device's stream ([`CudaDevice::stream`]).
    pub fn into_cuda_slice(self) -> Result<CudaSlice<T>> {
        match self.storage {
            Storage::Cuda { data, .. } => Ok(data),
            Storage::Cpu(_) => Err(not_on("cuda", &Device::Cpu)),
        }
    }

    /// A borrowed view of the whole tensor (no copy); `&tensor` converts to
    /// one too.
    pub fn as_tensor_ref(&self) -> TensorRef<'_, T> {
        let data = match &self.storage {
            Storage::Cpu(data) => RefData::Cpu(data),
            Storage::Cuda { data, device } => RefData::Cuda {
                data: data.as_view(),
                device: device.clone(),
            },
        };
        TensorRef {
            shape: self.shape.clone(),
            data,
        }
    }

    /// A mutable borrowed view of the whole tensor (no copy).
    pub fn as_tensor_mut(&mut self) -> TensorMut<'_, T> {
        let data = match &mut self.storage {
            Storage::Cpu(data) => MutData::Cpu(data),
            Storage::Cuda { data, device } => MutData::Cuda {
                data: data.as_view_mut(),
                device: device.clone(),
            },
        };
        TensorMut {
            shape: self.shape.clone(),
            data,
        }
    }

    /// The dimensions, outermost first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        match &self.storage {
            Storage::Cpu(data) => data.len(),
            Storage::Cuda { data, .. } => data.len(),
        }
    }

    /// Whether the tensor has no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element type's tag.
    pub fn dtype(&self) -> DType {
        T::DTYPE
    }

    /// The device the elements live on.
    pub fn device(&self) -> Device {
        match &self.storage {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Cuda { device, .. } => Device::Cuda(device.clone()),
        }
    }

    /// The elements on the host (waits for the device).
    pub fn to_vec(&self) -> Result<Vec<T>> {
        match &self.storage {
            Storage::Cpu(data) => Ok(data.clone()),
            Storage::Cuda { data, device } => device.stream().clone_dtoh(data).map_err(driver_error("cuMemcpyDtoH")),
        }
    }

    /// A copy on `device`.
    pub fn to_device(&self, device: &Device) -> Result<Tensor<T>> {
        match (&self.storage, device) {
            (Storage::Cpu(data), _) => Tensor::from_slice(data, &self.shape, device),
            (Storage::Cuda { data, device: source }, Device::Cuda(target)) => {
                if !source.same_stream(target) {
                    // The copy on the target's stream reads what the source's
                    // stream wrote.
                    target
                        .stream()
                        .join(source.stream())
                        .map_err(driver_error("cuStreamWaitEvent"))?;
                }
                Tensor::copy_of_view(&data.as_view(), &self.shape, target)
            }
            (Storage::Cuda { .. }, Device::Cpu) => Tensor::from_vec(self.to_vec()?, &self.shape, device),
        }
    }

    /// A deep copy on the same device.
    pub fn try_clone(&self) -> Result<Tensor<T>> {
        self.to_device(&self.device())
    }

    /// The host elements, when the tensor lives on the CPU.
    pub fn as_slice(&self) -> Option<&[T]> {
        match &self.storage {
            Storage::Cpu(data) => Some(data),
            Storage::Cuda { .. } => None,
        }
    }

    /// The host elements, mutable, when the tensor lives on the CPU.
    pub fn as_mut_slice(&mut self) -> Option<&mut [T]> {
        match &mut self.storage {
            Storage::Cpu(data) => Some(data),
            Storage::Cuda { .. } => None,
        }
    }

    /// The device buffer, when the tensor lives on a CUDA device.
    pub fn as_cuda_slice(&self) -> Option<&CudaSlice<T>> {
        match &self.storage {
            Storage::Cuda { data, .. } => Some(data),
            Storage::Cpu(_) => None,
        }
    }

    /// The device buffer, mutable, when the tensor lives on a CUDA device.
    pub fn as_cuda_slice_mut(&mut self) -> Option<&mut CudaSlice<T>> {
        match &mut self.storage {
            Storage::Cuda { data, .. } => Some(data),
            Storage::Cpu(_) => None,
        }
    }

    /// The host elements, or an error naming the tensor's device.
    pub(crate) fn host(&self) -> Result<&[T]> {
        let device = self.device();
        self.as_slice().ok_or_else(|| not_on("cpu", &device))
    }

    pub(crate) fn host_mut(&mut self) -> Result<&mut [T]> {
        let device = self.device();
        self.as_mut_slice().ok_or_else(|| not_on("cpu", &device))
    }

    /// The device buffer, or an error naming the tensor's device.
    pub(crate) fn device_slice(&self) -> Result<&CudaSlice<T>> {
        let device = self.device();
        self.as_cuda_slice().ok_or_else(|| not_on("cuda", &device))
    }

    pub(crate) fn device_slice_mut(&mut self) -> Result<&mut CudaSlice<T>> {
        let device = self.device();
        self.as_cuda_slice_mut().ok_or_else(|| not_on("cuda", &device))
    }

    /// Checks that this tensor has exactly `expected` as its shape.
    pub(crate) fn expect_shape(&self, argument: &'static str, expected: &[usize]) -> Result<()> {
        check_shape(argument, expected, &self.shape)
    }

    /// Checks that this tensor lives on `device`.
    pub(crate) fn expect_device(&self, argument: &'static str, device: &Device) -> Result<()> {
        check_device(argument, device, &self.device())
    }
}

impl<T: Element> std::fmt::Debug for Tensor<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tensor")
            .field("dtype", &T::DTYPE)
            .field("shape", &self.shape)
            .field("device", &self.device())
            .finish()
    }
}

/// The ops check devices before they take buffers, so this is only reached
/// on an internal mistake; it is still an error, not a panic.
pub(crate) fn not_on(expected: &str, actual: &Device) -> Error {
    Error::DeviceMismatch {
        argument: "tensor",
        expected: expected.to_string(),
        actual: actual.to_string(),
    }
}

/// Uninitialised device memory for `len` elements, allocated in order on
/// `stream` (and freed on it when dropped): the stream the op that uses it
/// runs on. Never asks the driver for zero bytes, which some drivers refuse:
/// an empty buffer is backed by one element it does not expose.
pub(crate) fn alloc_uninit<T: Element>(stream: &Arc<CudaStream>, len: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every caller overwrites all `len` elements (a copy or a kernel
    // that writes each one) before the buffer is read.
    let slice = unsafe { stream.alloc::<T>(len.max(1)) }.map_err(driver_error("cuMemAllocAsync"))?;
    if len > 0 {
        return Ok(slice);
    }
    let pointer = slice.leak();
    // SAFETY: `pointer` is a live allocation with room for one T, so for
    // zero; the new slice owns it and frees it on drop.
    Ok(unsafe { stream.upgrade_device_ptr(pointer, 0) })
}

/// Zeroed device memory for `len` elements, zeroed in order on `stream`.
pub(crate) fn alloc_zeros<T: Element>(stream: &Arc<CudaStream>, len: usize) -> Result<CudaSlice<T>> {
    let mut slice = alloc_uninit::<T>(stream, len)?;
    if len > 0 {
        stream
            .memset_zeros(&mut slice)
            .map_err(driver_error("cuMemsetD8Async"))?;
    }
    Ok(slice)
}

/// A device copy of host data, copied in order on `stream`.
pub(crate) fn upload<T: Element>(stream: &Arc<CudaStream>, data: &[T]) -> Result<CudaSlice<T>> {
    let mut slice = alloc_uninit::<T>(stream, data.len())?;
    if !data.is_empty() {
        stream
            .memcpy_htod(data, &mut slice)
            .map_err(driver_error("cuMemcpyHtoDAsync"))?;
    }
    Ok(slice)
}
