//! The driver's launch rules that every kernel's host code relies on:
//! static + dynamic shared memory past 48 KB needs the opt-in
//! (`CudaDevice::allow_dynamic_shared`), the opt-in stops at the device's
//! limit minus the static bytes, and a block larger than the kernel's
//! `__launch_bounds__` is refused. On a GPU the driver applies them; on the
//! emulated device (scripts/emu-test.sh) emu/libcuda must apply them alike.
mod common;

use cudarc::driver::{sys, LaunchConfig, PushKernelArg};
use moerec::Device;

/// `scan_exclusive_tiles` (kernels/grouping.cu): 256 threads, static shared
/// memory, and a result that shows it ran.
const THREADS: u32 = 256;
const DEFAULT_SHARED: usize = 48 * 1024;

fn shared_memory_past_48_kb_needs_the_opt_in_and_stays_within_the_limit(device: &Device) {
    let cuda = device.as_cuda().expect("a CUDA device");
    let function = cuda.function("grouping", "scan_exclusive_tiles").unwrap();
    let fixed = function.shared_size_bytes().unwrap() as usize;
    assert!(
        fixed > 0,
        "scan_exclusive_tiles declares static shared memory; the driver reports {fixed} bytes"
    );
    let stream = cuda.stream();
    let values: Vec<u32> = (1..=40).collect();
    let mut data = stream.clone_htod(&values).unwrap();
    let mut totals = stream.alloc_zeros::<u32>(1).unwrap();
    let n = values.len() as u32;
    let launch = |dynamic: usize, threads: u32, data: &mut cudarc::driver::CudaSlice<u32>, totals: &mut _| {
        let config = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: dynamic as u32,
        };
        let mut args = stream.launch_builder(&function);
        args.arg(data).arg(&n).arg(totals);
        // SAFETY: one block of scan_exclusive_tiles over `n` elements of
        // `data` (n of them allocated) and one tile total; the kernel reads
        // no dynamic shared memory, whatever the launch asks for.
        unsafe { args.launch(config) }.map(|_| ())
    };

    // Static + dynamic just past 48 KB, without the opt-in: refused.
    let past_default = DEFAULT_SHARED - fixed + 16;
    assert!(
        launch(past_default, THREADS, &mut data, &mut totals).is_err(),
        "{fixed} static + {past_default} dynamic bytes launched without the opt-in"
    );
    // A block larger than __launch_bounds__: refused.
    assert!(
        launch(0, 2 * THREADS, &mut data, &mut totals).is_err(),
        "a block of {} threads launched past __launch_bounds__({THREADS})",
        2 * THREADS
    );
    // The opt-in cannot reach past the device limit minus the static bytes.
    let limit = cuda
        .context()
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .unwrap() as usize;
    let too_much = function.set_attribute(
        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        (limit - fixed + 16) as i32,
    );
    assert!(
        too_much.is_err(),
        "opted in to {} dynamic bytes beside {fixed} static",
        limit - fixed + 16
    );
    let refused = cuda.allow_dynamic_shared(&function, limit - fixed + 16, "dynamic", "the scan");
    assert!(
        matches!(refused, Err(moerec::Error::InvalidArgument { .. })),
        "{refused:?}"
    );

    // Opted in: the same launch runs, and the scan is right.
    cuda.allow_dynamic_shared(&function, past_default, "dynamic", "the scan")
        .unwrap();
    launch(past_default, THREADS, &mut data, &mut totals).unwrap();
    let scanned = stream.clone_dtoh(&data).unwrap();
    let expected: Vec<u32> = values
        .iter()
        .scan(0, |sum, &v| Some(std::mem::replace(sum, *sum + v)))
        .collect();
    assert_eq!(scanned, expected);
    assert_eq!(stream.clone_dtoh(&totals).unwrap(), [values.iter().sum::<u32>()]);
}

common::harness::test_main! {
    devices: [],
    cuda: [
        shared_memory_past_48_kb_needs_the_opt_in_and_stays_within_the_limit,
    ],
    host: [],
}
