//! Choosing where ops run.

use crate::cuda::{self, CudaDevice};
use crate::error::{Error, Result};
use cudarc::driver::CudaStream;
use std::fmt;
use std::sync::Arc;

/// Environment variable that forces the device: `cpu`, `cuda` or `cuda:N`.
pub const DEVICE_ENV: &str = "MOEREC_DEVICE";

/// Where a tensor lives and an op runs. Cheap to clone; moerec's own CUDA
/// devices are shared process-wide (one context and stream per ordinal).
/// Two CUDA devices are equal when they queue on the same stream of the same
/// context: only then are their tensors ordered with each other, so an op
/// refuses operands of different streams with `DeviceMismatch`.
#[derive(Clone)]
pub enum Device {
    /// The host, with rayon across cores.
    Cpu,
    /// A CUDA GPU with the moerec kernels loaded.
    Cuda(Arc<CudaDevice>),
}

impl Device {
    /// The CPU.
    pub fn cpu() -> Device {
        Device::Cpu
    }

    /// CUDA device `ordinal`; an `Err` when there is no driver, no such
    /// device, or the kernels were not compiled into this build.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        CudaDevice::open(ordinal).map(Device::Cuda)
    }

    /// A device on a caller's cudarc stream and its context, e.g. candle's
    /// (`candle_core::CudaDevice::cuda_stream()`): the op API queues every
    /// op on that stream, in order with the caller's work
    /// ([`CudaDevice::from_stream`]).
    pub fn from_cuda_stream(stream: Arc<CudaStream>) -> Result<Device> {
        CudaDevice::from_stream(stream).map(Device::Cuda)
    }

    /// The device `MOEREC_DEVICE` names, else the first usable CUDA device,
    /// else the CPU. Never panics; the only `Err` is a `MOEREC_DEVICE` value
    /// that cannot be honoured (unknown, or a CUDA device that is unusable).
    pub fn auto() -> Result<Device> {
        match std::env::var(DEVICE_ENV) {
            Ok(value) if !value.trim().is_empty() => Device::parse(value.trim()),
            _ => Ok(Device::cuda(0).unwrap_or(Device::Cpu)),
        }
    }

    /// Parses `cpu`, `cuda` or `cuda:N` and opens that device.
    pub fn parse(spec: &str) -> Result<Device> {
        match spec {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Device::cuda(0),
            _ => {
                let ordinal = spec
                    .strip_prefix("cuda:")
                    .and_then(|n| n.parse::<usize>().ok())
                    .ok_or_else(|| Error::InvalidArgument {
                        argument: DEVICE_ENV,
                        message: format!("expected `cpu`, `cuda` or `cuda:N`, got `{spec}`"),
                    })?;
                Device::cuda(ordinal)
            }
        }
    }

    /// Whether this is a CUDA device.
    pub fn is_cuda(&self) -> bool {
        matches!(self, Device::Cuda(_))
    }

    /// The CUDA device, if this is one.
    pub fn as_cuda(&self) -> Option<&Arc<CudaDevice>> {
        match self {
            Device::Cuda(device) => Some(device),
            Device::Cpu => None,
        }
    }

    /// Waits until all work queued on this device has finished.
    pub fn synchronize(&self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(device) => device
                .stream()
                .synchronize()
                .map_err(cuda::driver_error("cuStreamSynchronize")),
        }
    }
}

impl PartialEq for Device {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Device::Cpu, Device::Cpu) => true,
            (Device::Cuda(a), Device::Cuda(b)) => a.same_stream(b),
            _ => false,
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(device) if device.is_borrowed() => write!(
                f,
                "cuda:{} ({}, stream {:?})",
                device.ordinal(),
                device.name(),
                device.stream().cu_stream()
            ),
            Device::Cuda(device) => write!(f, "cuda:{} ({})", device.ordinal(), device.name()),
        }
    }
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}
