//! The CUDA runtime: one context and stream per device, the embedded kernel
//! modules loaded once, typed launch helpers and the data-error status word.
//!
//! Everything here is reachable without a GPU: nothing touches the driver
//! until [`CudaDevice::open`] is called, and that first checks that libcuda
//! can be loaded at all ([`driver_present`]; cudarc panics otherwise).

use crate::error::{Error, Result};
use cudarc::driver::{
    sys, CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut,
    DriverError, LaunchConfig, SyncOnDrop,
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
///
/// Either moerec's own ([`CudaDevice::open`]: one context and stream per
/// ordinal, shared process-wide) or a caller's ([`CudaDevice::from_stream`]:
/// the context and stream of another cudarc user such as candle, on which
/// every op of the op API then queues its work).
pub struct CudaDevice {
    ordinal: usize,
    name: String,
    compute_capability: (i32, i32),
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Whether the stream is a caller's ([`CudaDevice::from_stream`]).
    borrowed: bool,
    kernels: Arc<Kernels>,
}

/// The moerec modules loaded into one CUDA context, shared by every
/// [`CudaDevice`] on that context.
struct Kernels {
    modules: HashMap<&'static str, Arc<CudaModule>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
}

impl Kernels {
    fn load(context: &Arc<CudaContext>) -> Result<Kernels> {
        let modules = embedded::MODULES
            .iter()
            .map(|(module, ptx)| {
                context
                    .load_module(cudarc::nvrtc::Ptx::from_src(*ptx))
                    .map(|loaded| (*module, loaded))
                    .map_err(driver_error("cuModuleLoadData"))
            })
            .collect::<Result<HashMap<_, _>>>()?;
        Ok(Kernels {
            modules,
            functions: Mutex::new(HashMap::new()),
        })
    }

    /// The modules of `context`, loaded on first use. Keyed by the driver's
    /// context handle, which the loaded modules keep alive (they hold the
    /// context), so a key is never reused for another context.
    fn of(context: &Arc<CudaContext>) -> Result<Arc<Kernels>> {
        static LOADED: OnceLock<Mutex<HashMap<usize, Arc<Kernels>>>> = OnceLock::new();
        let mut loaded = LOADED
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let key = context.cu_ctx() as usize;
        if let Some(kernels) = loaded.get(&key) {
            return Ok(kernels.clone());
        }
        let kernels = Arc::new(Kernels::load(context)?);
        loaded.insert(key, kernels.clone());
        Ok(kernels)
    }
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
///
/// With cudarc's dynamic loading (moerec's own choice) a missing libcuda
/// makes the first driver call panic, so this is asked first. cudarc's own
/// `is_culib_present` exists only in that mode, and another crate in the
/// graph (candle-core's `cuda`) can switch cudarc to linking libcuda instead;
/// so the check is done here, with names that are a subset of those cudarc
/// tries: whenever one of them loads, cudarc's loader finds a library too.
/// When libcuda is linked, the process could not have started without it and
/// `libcuda.so.1` is already loaded.
pub fn driver_present() -> bool {
    use std::env::consts::{DLL_PREFIX, DLL_SUFFIX};
    ["cuda", "nvcuda"].iter().any(|name| {
        [
            format!("{DLL_PREFIX}{name}{DLL_SUFFIX}"),
            format!("{DLL_PREFIX}{name}{DLL_SUFFIX}.1"),
        ]
        .iter()
        // SAFETY: loading the driver library runs only its initialisers,
        // as cudarc's own loader would; no driver call is made here.
        .any(|file| unsafe { libloading::Library::new(file) }.is_ok())
    })
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
        // SAFETY: every op allocates, zeroes, uses and frees its buffers in
        // order on the stream it runs on (the one below for the op API), so
        // stream order already synchronises them; per-buffer events would
        // only add driver calls to every launch. A caller that hands these
        // buffers to another stream synchronises itself (see `Tensor`).
        unsafe { context.disable_event_tracking() };
        let stream = context.new_stream().map_err(driver_error("cuStreamCreate"))?;
        let kernels = Kernels::of(&context)?;
        let device = Arc::new(CudaDevice {
            ordinal,
            name,
            compute_capability,
            context,
            stream,
            borrowed: false,
            kernels,
        });
        devices.insert(ordinal, device.clone());
        Ok(device)
    }

    /// A device on a caller's cudarc stream (and its context), e.g. the
    /// stream of candle's `CudaDevice`: every op of the op API on tensors of
    /// this device queues all its work — allocation, zeroing, copies,
    /// launches, frees, status read-back — on `stream`, in order with the
    /// caller's own work there, with no extra synchronisation. The moerec
    /// modules are loaded into the context once per process.
    ///
    /// The context's event tracking is left as the caller set it (candle's
    /// is on): where it is on, cudarc orders each buffer across streams by
    /// its events, and moerec keeps every event guard until its launch is
    /// queued.
    pub fn from_stream(stream: Arc<CudaStream>) -> Result<Arc<CudaDevice>> {
        if !kernels_compiled() {
            return Err(Error::KernelsNotCompiled);
        }
        let context = stream.context().clone();
        let name = context.name().map_err(driver_error("cuDeviceGetName"))?;
        let compute_capability = context
            .compute_capability()
            .map_err(driver_error("cuDeviceGetAttribute"))?;
        let kernels = Kernels::of(&context)?;
        Ok(Arc::new(CudaDevice {
            ordinal: context.ordinal(),
            name,
            compute_capability,
            context,
            stream,
            borrowed: true,
            kernels,
        }))
    }

    /// Whether two devices queue on the same stream of the same context,
    /// so that their buffers are ordered with each other.
    pub fn same_stream(&self, other: &CudaDevice) -> bool {
        self.context.cu_ctx() == other.context.cu_ctx() && self.stream.cu_stream() == other.stream.cu_stream()
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

    /// Whether the stream is a caller's ([`CudaDevice::from_stream`]).
    pub fn is_borrowed(&self) -> bool {
        self.borrowed
    }

    /// Kernel `name` of module `module` (a `kernels/<module>.cu` file).
    pub fn function(&self, module: &'static str, name: &str) -> Result<CudaFunction> {
        let mut functions = self
            .kernels
            .functions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(function) = functions.get(name) {
            return Ok(function.clone());
        }
        let loaded = self.kernels.modules.get(module).ok_or(Error::KernelsNotCompiled)?;
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

/// Collects the raw addresses of one call's buffers (for kernels that take a
/// pointer, or a parameter block of pointers, rather than a cudarc argument)
/// with the guards cudarc hands out for them. Where the context tracks
/// events, a guard records the buffer's read or write event when it drops: a
/// guard dropped before the launch is queued would mark the buffer as done
/// before the kernel that uses it. Keep the collector alive until the last
/// launch that uses its addresses is queued.
pub(crate) struct Pointers<'a> {
    stream: &'a CudaStream,
    guards: Vec<SyncOnDrop<'a>>,
}

impl<'a> Pointers<'a> {
    pub(crate) fn new(stream: &'a CudaStream) -> Self {
        Pointers {
            stream,
            guards: Vec::new(),
        }
    }

    /// The address of a buffer the kernels read.
    pub(crate) fn read<T>(&mut self, buffer: &'a impl DevicePtr<T>) -> u64 {
        let (pointer, guard) = buffer.device_ptr(self.stream);
        self.guards.push(guard);
        pointer
    }

    /// The address of a buffer the kernels write.
    pub(crate) fn write<T>(&mut self, buffer: &'a mut impl DevicePtrMut<T>) -> u64 {
        let (pointer, guard) = buffer.device_ptr_mut(self.stream);
        self.guards.push(guard);
        pointer
    }

    /// [`Pointers::read`] of an optional operand: 0 (null, which the kernels
    /// take for "not given") when absent.
    pub(crate) fn read_optional<T>(&mut self, buffer: Option<&'a impl DevicePtr<T>>) -> u64 {
        buffer.map_or(0, |buffer| self.read(buffer))
    }

    /// [`Pointers::write`] of an optional operand, 0 when absent.
    pub(crate) fn write_optional<T>(&mut self, buffer: Option<&'a mut impl DevicePtrMut<T>>) -> u64 {
        buffer.map_or(0, |buffer| self.write(buffer))
    }
}

/// One element of a device buffer (a synchronisation: error paths only).
pub(crate) fn read_element(stream: &Arc<CudaStream>, data: &CudaView<'_, u32>, position: u64) -> Result<u32> {
    let one = data.slice(position as usize..position as usize + 1);
    let host = stream.clone_dtoh(&one).map_err(driver_error("cuMemcpyDtoH"))?;
    Ok(host[0])
}
