//! The harness of every test binary (`harness = false` in Cargo.toml, on
//! libtest-mimic): libtest's command line and output, with each device test
//! run as one trial per device, `cpu::<name>` and `cuda::<name>`, on the same
//! body. A CUDA trial with no usable GPU (no driver, no device, or kernels
//! not compiled in) is reported as ignored, with the reason, and counted in
//! the summary line; with `MOEREC_REQUIRE_GPU=1` it fails instead.

use libtest_mimic::{Arguments, Completion, Failed, Trial};
use moerec::Device;
use std::process::ExitCode;

/// A test body run once per device.
pub type DeviceTest = (&'static str, fn(&Device));
/// A test body that needs CUDA device 0 (it compares it with the CPU, or
/// checks the driver itself).
pub type CudaTest = (&'static str, fn(&Device));
/// A test body that needs no device.
pub type HostTest = (&'static str, fn());

fn require_gpu() -> bool {
    std::env::var("MOEREC_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

fn cuda_trial(name: String, body: fn(&Device)) -> Trial {
    Trial::ignorable_test(name, move || match Device::cuda(0) {
        Ok(device) => {
            body(&device);
            Ok(Completion::Completed)
        }
        Err(error) if require_gpu() => Err(Failed::from(format!(
            "MOEREC_REQUIRE_GPU=1 but CUDA device 0 is not usable: {error}"
        ))),
        Err(error) => Ok(Completion::ignored_with(format!("no usable CUDA device: {error}"))),
    })
}

/// Runs the trials of one test binary; `source` is the binary's own source
/// text, which must hold no `#[test]`: under `harness = false` such a test
/// would be compiled out and never run.
pub fn run(
    source: &str,
    device: &[DeviceTest],
    cuda: &[CudaTest],
    host: &[HostTest],
    ignored: &[HostTest],
) -> ExitCode {
    let mut trials = Vec::new();
    for &(name, body) in device {
        trials.push(Trial::test(format!("cpu::{name}"), move || {
            body(&Device::cpu());
            Ok(())
        }));
        trials.push(cuda_trial(format!("cuda::{name}"), body));
    }
    for &(name, body) in cuda {
        trials.push(cuda_trial(format!("cuda::{name}"), body));
    }
    for &(name, body) in host {
        trials.push(Trial::test(name, move || {
            body();
            Ok(())
        }));
    }
    // Long host runs, run only on request (`-- --ignored`).
    for &(name, body) in ignored {
        trials.push(
            Trial::test(name, move || {
                body();
                Ok(())
            })
            .with_ignored_flag(true),
        );
    }
    let attribute = concat!("#[", "test]");
    let stray = source.matches(attribute).count();
    trials.push(Trial::test("harness::every_test_is_registered", move || {
        if stray == 0 {
            Ok(())
        } else {
            Err(Failed::from(format!(
                "{stray} `{attribute}` attribute(s) in this file: under harness = false they never run; list the \
                 function in the file's test_main! instead"
            )))
        }
    }));
    libtest_mimic::run(&Arguments::from_args(), trials).exit_code()
}

/// `fn main` of a test binary: its device, CUDA-only and host tests by name,
/// and host tests that run only with `--ignored`.
macro_rules! test_main {
    (
        devices: [$($device:ident),* $(,)?],
        cuda: [$($cuda:ident),* $(,)?],
        host: [$($host:ident),* $(,)?]
        $(, ignored: [$($ignored:ident),* $(,)?])? $(,)?
    ) => {
        fn main() -> std::process::ExitCode {
            $crate::common::harness::run(
                include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/", file!())),
                &[$((stringify!($device), $device as fn(&moerec::Device))),*],
                &[$((stringify!($cuda), $cuda as fn(&moerec::Device))),*],
                &[$((stringify!($host), $host as fn())),*],
                &[$($((stringify!($ignored), $ignored as fn())),*)?],
            )
        }
    };
}
pub(crate) use test_main;
