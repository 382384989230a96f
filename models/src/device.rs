//! Which device a run trains on: `--device auto|cpu|cuda`.
//!
//! CUDA needs the crate's `cuda` feature (candle's CUDA tensors and moerec's
//! ops on them). It is off by default because such a binary links libcuda and
//! would not even start on a machine without a driver. On a CUDA device the
//! CPU kernels of [`crate::fused`], [`crate::attention`] and [`crate::dense`]
//! step aside for their composed candle forms (each module says what runs
//! where); dropout masks are still drawn on the host from the run's seeded
//! generator, so a seed gives the same masks on every device.

use std::str::FromStr;

use candle_core::Device;

use crate::error::{invalid, Error, Result};

/// A device request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    /// CUDA device 0 when this build has CUDA and one is usable, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA device 0, or an error saying why not.
    Cuda,
}

impl FromStr for DeviceChoice {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda),
            other => Err(invalid("--device", "auto, cpu or cuda", other)),
        }
    }
}

/// The device for `choice` and a line saying what was picked and why.
///
/// `Auto` falls back to the CPU (saying why) where candle's own
/// `Device::cuda_if_available` would fail: with the feature on it does not
/// check that a device is there.
///
/// ```
/// use moerec_models::device::{select, DeviceChoice};
/// let (device, why) = select(DeviceChoice::Cpu).unwrap();
/// assert!(device.is_cpu());
/// assert_eq!(why, "cpu (asked for)");
/// ```
pub fn select(choice: DeviceChoice) -> Result<(Device, String)> {
    match choice {
        DeviceChoice::Cpu => Ok((Device::Cpu, "cpu (asked for)".into())),
        DeviceChoice::Cuda => {
            cuda()
                .map(|d| (d, "cuda:0 (asked for)".into()))
                .map_err(|reason| Error::InvalidArgument {
                    name: "--device".into(),
                    expected: "a usable CUDA device 0".into(),
                    actual: reason,
                })
        }
        DeviceChoice::Auto => Ok(match cuda() {
            Ok(device) => (device, "cuda:0 (auto)".into()),
            Err(reason) => (Device::Cpu, format!("cpu (auto: {reason})")),
        }),
    }
}

/// CUDA device 0, or why not.
#[cfg(feature = "cuda")]
fn cuda() -> std::result::Result<Device, String> {
    if !moerec::cuda::kernels_compiled() {
        return Err("moerec's kernels were not compiled into this build (no nvcc at build time)".into());
    }
    Device::new_cuda(0).map_err(|e| format!("no usable CUDA device 0: {e}"))
}

/// CUDA device 0, or why not.
#[cfg(not(feature = "cuda"))]
fn cuda() -> std::result::Result<Device, String> {
    Err("this build has no CUDA support: rebuild with `--features cuda` (moerec-models' `cuda` feature)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_picks() {
        assert_eq!("auto".parse::<DeviceChoice>().unwrap(), DeviceChoice::Auto);
        let err = "gpu".parse::<DeviceChoice>().unwrap_err().to_string();
        assert!(err.contains("--device") && err.contains("gpu"), "{err}");
        let (auto, why) = select(DeviceChoice::Auto).unwrap();
        assert!(
            why.starts_with(if auto.is_cpu() { "cpu (auto: " } else { "cuda:0" }),
            "{why}"
        );
        if cfg!(not(feature = "cuda")) {
            let err = select(DeviceChoice::Cuda).unwrap_err().to_string();
            assert!(err.contains("--features cuda"), "{err}");
        }
    }
}
