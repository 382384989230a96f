//! The CUDA runtime: one context and stream per device, the embedded kernel
//! modules loaded once, typed launch helpers and the data-error status word.
//!
//! Everything here is reachable without a GPU: nothing touches the driver
//! until [`CudaDevice::open`] is called, and that first checks that libcuda
//! can be loaded at all (cudarc panics otherwise).

use crate::error::{Error, Result};
use cudarc::driver::{
    sys, CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, DriverError, LaunchConfig,
};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

/// The kernels build.rs compiled: `COMPILED` and `MODULES`.
mod embedded {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// Whether this build carries compiled kernels.
pub fn kernels_compiled() -> bool {
    embedded::COMPILED
}

/// Threads per block for the element-wise and grid-stride kernels.
pub(crate) const BLOCK_THREADS: u32 = 256;
/// Grid-stride kernels never need more blocks than this to fill any GPU.
const MAX_GRID_BLOCKS: u64 = 65_535;

/// A CUDA device with its context, its stream and the moerec kernels loaded.
pub struct CudaDevice {
    ordinal: usize,
    name: String,
    compute_capability: (i32, i32),
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: HashMap<&'static str, Arc<CudaModule>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
}

impl fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaDevice")
            .field("ordinal", &self.ordinal)
            .field("name", &self.name)
            .field("compute_capability", &self.compute_capability)
            .finish()
    }
}

/// Maps a driver error to [`Error::Cuda`] naming the call that failed.
pub(crate) fn driver_error(call: &'static str) -> impl Fn(DriverError) -> Error {
    move |e| Error::Cuda {
        call,
        message: format!("{e:?}"),
    }
}

/// Whether libcuda can be loaded on this machine.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library; no driver call is made.
    unsafe { sys::is_culib_present() }
}

fn registry() -> &'static Mutex<HashMap<usize, Arc<CudaDevice>>> {
    static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<CudaDevice>>>> = OnceLock::new();
    DEVICES.get_or_init(Default::default)
}

impl CudaDevice {
    /// Opens device `ordinal` once per process: later calls share the same
    /// context, stream and modules.
    pub fn open(ordinal: usize) -> Result<Arc<CudaDevice>> {
        let requested = format!("cuda:{ordinal}");
        if !kernels_compiled() {
            return Err(Error::KernelsNotCompiled);
        }
        if !driver_present() {
            return Err(Error::DeviceUnavailable {
                requested,
                reason: "the CUDA driver library (libcuda) was not found".into(),
            });
        }
        let mut devices = registry().lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(device) = devices.get(&ordinal) {
            return Ok(device.clone());
        }
        let count = CudaContext::device_count().map_err(driver_error("cuDeviceGetCount"))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::DeviceUnavailable {
                requested,
                reason: format!("the driver reports {count} CUDA device(s)"),
            });
        }
        let context = CudaContext::new(ordinal).map_err(driver_error("cuCtxCreate"))?;
        let name = context.name().map_err(driver_error("cuDeviceGetName"))?;
        let compute_capability = context
            .compute_capability()
            .map_err(driver_error("cuDeviceGetAttribute"))?;
        // SAFETY: every buffer moerec allocates through this context is
        // allocated, used and freed in order on the one stream below, so
        // stream order already synchronises it; per-buffer events would only
        // add driver calls to every launch. A caller that hands these buffers
        // to another stream synchronises itself (see `Tensor`).
        unsafe { context.disable_event_tracking() };
        let stream = context.new_stream().map_err(driver_error("cuStreamCreate"))?;
        let modules = embedded::MODULES
            .iter()
            .map(|(module, ptx)| {
                context
                    .load_module(cudarc::nvrtc::Ptx::from_src(*ptx))
                    .map(|loaded| (*module, loaded))
                    .map_err(driver_error("cuModuleLoadData"))
            })
            .collect::<Result<HashMap<_, _>>>()?;
        let device = Arc::new(CudaDevice {
            ordinal,
            name,
            compute_capability,
            context,
            stream,
            modules,
            functions: Mutex::new(HashMap::new()),
        });
        devices.insert(ordinal, device.clone());
        Ok(device)
    }

    /// The device's ordinal (`cuda:N`).
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The device name as the driver reports it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The compute capability, (major, minor).
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    /// The cudarc context, for crates that allocate or launch on it themselves.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.context
    }

    /// The stream every op of the op API queues its work on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Kernel `name` of module `module` (a `kernels/<module>.cu` file).
    pub fn function(&self, module: &'static str, name: &str) -> Result<CudaFunction> {
        let mut functions = self.functions.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(function) = functions.get(name) {
            return Ok(function.clone());
        }
        let loaded = self.modules.get(module).ok_or(Error::KernelsNotCompiled)?;
        let function = loaded
            .load_function(name)
            .map_err(driver_error("cuModuleGetFunction"))?;
        functions.insert(name.to_string(), function.clone());
        Ok(function)
    }

    /// Lets `function` take `dynamic` bytes of dynamic shared memory per
    /// block, beyond the 48 KB a block gets without opting in. The kernel's
    /// static shared memory counts against the device's opt-in limit; past
    /// it, `InvalidArgument` on `argument` saying that `what` needs more.
    pub fn allow_dynamic_shared(
        &self,
        function: &CudaFunction,
        dynamic: usize,
        argument: &'static str,
        what: &str,
    ) -> Result<()> {
        let limit = self
            .context
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(driver_error("cuDeviceGetAttribute"))?
            .max(0) as usize;
        // Binds the context to this thread too, for set_attribute below.
        let fixed = function
            .shared_size_bytes()
            .map_err(driver_error("cuFuncGetAttribute"))?
            .max(0) as usize;
        if fixed + dynamic > limit {
            return Err(Error::invalid(
                argument,
                format!("{what} needs {fixed} + {dynamic} bytes of shared memory per block on CUDA; this device allows {limit}"),
            ));
        }
        // Always all the function may take, so concurrent calls never lower
        // it for each other.
        function
            .set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                (limit - fixed) as i32,
            )
            .map_err(driver_error("cuFuncSetAttribute"))
    }

    /// A fresh status word (u64::MAX = clean) for the kernels' data checks.
    pub fn new_status(&self, stream: &Arc<CudaStream>) -> Result<CudaSlice<u64>> {
        stream
            .clone_htod(&[STATUS_CLEAN])
            .map_err(driver_error("cuMemcpyHtoDAsync"))
    }
}

/// The value of a status word no kernel reported into.
pub const STATUS_CLEAN: u64 = u64::MAX;

/// Reads a status word back (a synchronisation): the lowest offending
/// position, or `None` when the data was clean.
pub fn read_status(stream: &Arc<CudaStream>, status: &CudaSlice<u64>) -> Result<Option<u64>> {
    let value = stream.clone_dtoh(status).map_err(driver_error("cuMemcpyDtoH"))?;
    Ok(value.first().copied().filter(|&position| position != STATUS_CLEAN))
}

/// One thread per work item, capped: the kernels loop grid-stride.
pub(crate) fn grid_stride_config(items: u64) -> LaunchConfig {
    let blocks = items.div_ceil(u64::from(BLOCK_THREADS)).clamp(1, MAX_GRID_BLOCKS);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (BLOCK_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block per tile of `tile` items, for kernels that own a tile each.
pub(crate) fn tiled_config(items: u64, tile: u64) -> Result<LaunchConfig> {
    let blocks = items.div_ceil(tile).max(1);
    let blocks = u32::try_from(blocks)
        .ok()
        .filter(|&b| b < i32::MAX as u32)
        .ok_or_else(|| Error::invalid("size", format!("{items} items need more than 2^31 blocks")))?;
    Ok(LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK_THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// What `LaunchArgs::launch` returns.
pub(crate) type LaunchResult = std::result::Result<Option<(CudaEvent, CudaEvent)>, DriverError>;

/// Turns a launch result into ours, naming the kernel in the error.
pub(crate) fn launched(kernel: &'static str, result: LaunchResult) -> Result<()> {
    result.map(|_| ()).map_err(driver_error(kernel))
}

/// One element of a device buffer (a synchronisation: error paths only).
pub(crate) fn read_element(stream: &Arc<CudaStream>, data: &CudaView<'_, u32>, position: u64) -> Result<u32> {
    let one = data.slice(position as usize..position as usize + 1);
    let host = stream.clone_dtoh(&one).map_err(driver_error("cuMemcpyDtoH"))?;
    Ok(host[0])
}
