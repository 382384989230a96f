// A fake libcuda.so for cudarc (emu/libcuda/README.md): the driver entry
// points moerec's code paths call, on the emulator of emu/cuda_emu.h.
//
//   - Device memory is host memory: every allocation is its own mapping,
//     256-byte aligned, NaN-filled (0xff bytes), ending as close to a
//     PROT_NONE guard page as the alignment allows; the bytes between the
//     end and the guard page are a canary checked after every launch.
//   - Streams are asynchronous (streams.h): queued work runs when something
//     waits for it, so a missing wait between streams shows; a free queued
//     while another stream's pending work, unordered with it, uses the
//     buffer is an error.
//   - cuModuleLoadData takes the PTX build.rs embedded, reads its .entry
//     names and parameter sizes, and binds it to the emulated module (one per
//     kernels/*.cu, registered by the generated translation units) with
//     exactly those kernels, each parameter the size the PTX declares. It
//     refuses a module whose PTX breaks a rule of ptx.h (a vector access to
//     a shared variable aligned below its width, a kernel without
//     __launch_bounds__), which the emulator's own memory cannot show.
//   - Shared memory and block size as a driver sees them: each kernel's
//     static shared bytes and __launch_bounds__ come from its PTX
//     (cuFuncGetAttribute SHARED_SIZE_BYTES, MAX_THREADS_PER_BLOCK); dynamic
//     shared memory is capped at 48 KB minus the static bytes until
//     cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES) raises it, at most to
//     the opt-in limit minus the static bytes; a launch past either limit
//     fails with CUDA_ERROR_INVALID_VALUE, as on the GPU.
//   - cuLaunchKernel copies sizeof(parameter) bytes from each kernelParams
//     slot, as the driver does, and runs the kernel on the fiber runtime.
//     Launches are serialised (one runtime).
// Diagnostics go to stderr prefixed "emu:"; errors abort the process.
#include <dlfcn.h>
#include <malloc.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <array>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "kernel.h"
#include "ptx.h"
#include "streams.h"

#define EMU_API extern "C" __attribute__((visibility("default")))

typedef int CUresult;
typedef unsigned long long CUdeviceptr;

namespace {

// kMaxDynamicSharedBytes (cuda_emu.h): the H100's opt-in limit, for static
// and dynamic shared memory together; a block gets 48 KB without opting in.
constexpr unsigned kMaxDynamicSharedBytes = 232448;
constexpr unsigned kDefaultSharedBytes = 48 * 1024;

enum : CUresult {
  OK = 0,
  ERR_INVALID_VALUE = 1,
  ERR_OUT_OF_MEMORY = 2,
  ERR_NOT_INITIALIZED = 3,
  ERR_NO_DEVICE = 100,
  ERR_INVALID_DEVICE = 101,
  ERR_INVALID_IMAGE = 200,
  ERR_INVALID_CONTEXT = 201,
  ERR_INVALID_HANDLE = 400,
  ERR_NOT_FOUND = 500,
  ERR_NOT_SUPPORTED = 801,
};

const char* error_name(CUresult e) {
  switch (e) {
    case OK: return "CUDA_SUCCESS";
    case ERR_INVALID_VALUE: return "CUDA_ERROR_INVALID_VALUE";
    case ERR_OUT_OF_MEMORY: return "CUDA_ERROR_OUT_OF_MEMORY";
    case ERR_NOT_INITIALIZED: return "CUDA_ERROR_NOT_INITIALIZED";
    case ERR_NO_DEVICE: return "CUDA_ERROR_NO_DEVICE";
    case ERR_INVALID_DEVICE: return "CUDA_ERROR_INVALID_DEVICE";
    case ERR_INVALID_IMAGE: return "CUDA_ERROR_INVALID_IMAGE";
    case ERR_INVALID_CONTEXT: return "CUDA_ERROR_INVALID_CONTEXT";
    case ERR_INVALID_HANDLE: return "CUDA_ERROR_INVALID_HANDLE";
    case ERR_NOT_FOUND: return "CUDA_ERROR_NOT_FOUND";
    case ERR_NOT_SUPPORTED: return "CUDA_ERROR_NOT_SUPPORTED";
    default: return nullptr;
  }
}

[[noreturn]] __attribute__((format(printf, 1, 2))) void die(const char* format, ...) {
  std::fprintf(stderr, "emu: error: ");
  va_list args;
  va_start(args, format);
  std::vfprintf(stderr, format, args);
  va_end(args);
  std::fprintf(stderr, "\n");
  std::fflush(stderr);
  std::abort();
}

// One lock for everything: the runtime is a singleton, and launches from
// several test threads run one after another, as on one GPU stream.
std::recursive_mutex& lock() {
  static std::recursive_mutex m;
  return m;
}

// ------------------------------------------------------------ kernels
std::vector<emu::libcuda::Kernel>& kernels() {
  static std::vector<emu::libcuda::Kernel> k;
  return k;
}

// One kernel of a loaded module (a CUfunction), with what the driver knows
// of it from the PTX.
struct Function {
  const emu::libcuda::Kernel* kernel;
  unsigned static_shared;  // bytes
  unsigned max_threads;    // __launch_bounds__
  unsigned max_dynamic;    // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
};

struct Module {
  std::string name;
  std::vector<Function> functions;
};

std::vector<Module*>& modules() {
  static std::vector<Module*> m;
  return m;
}

// ------------------------------------------------------------ memory
struct Allocation {
  char* base;     // the mapping
  size_t length;  // of the mapping
  size_t size;    // requested
  char* canary;   // [data + size, guard page)
  size_t canary_bytes;
  bool free_queued = false;  // cuMemFreeAsync queued, not yet run
};
constexpr unsigned char kCanary = 0xcb;
std::map<CUdeviceptr, Allocation>& allocations() {
  static std::map<CUdeviceptr, Allocation> a;
  return a;
}
const size_t kPage = 4096;

CUdeviceptr allocate(size_t size) {
  const size_t data_pages = size == 0 ? 1 : (size + 255 + kPage - 1) / kPage;
  const size_t length = (data_pages + 2) * kPage;
  char* base = static_cast<char*>(mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (base == MAP_FAILED) return 0;
  mprotect(base, kPage, PROT_NONE);
  char* guard = base + (data_pages + 1) * kPage;
  mprotect(guard, kPage, PROT_NONE);
  // cuMemAlloc returns 256-byte aligned pointers; as close to the guard page
  // as that allows.
  char* data = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(guard) - size) & ~uintptr_t{255});
  std::memset(data, 0xff, size);  // uninitialised device memory reads as NaN / 0xffffffff
  std::memset(data + size, kCanary, guard - (data + size));
  const CUdeviceptr pointer = reinterpret_cast<CUdeviceptr>(data);
  allocations()[pointer] = Allocation{base, length, size, data + size, static_cast<size_t>(guard - (data + size)), false};
  return pointer;
}

CUresult release(CUdeviceptr pointer) {
  auto it = allocations().find(pointer);
  if (it == allocations().end()) die("cuMemFree of 0x%llx, which cuMemAlloc did not return (or freed already)", pointer);
  munmap(it->second.base, it->second.length);
  allocations().erase(it);
  return OK;
}

// Which buffer an address lies in or just past, for the crash report.
std::string describe_address(uintptr_t address) {
  for (const auto& [pointer, a] : allocations()) {
    const uintptr_t begin = reinterpret_cast<uintptr_t>(a.base), end = begin + a.length;
    if (address < begin || address >= end) continue;
    const long long offset = static_cast<long long>(address) - static_cast<long long>(pointer);
    char text[160];
    std::snprintf(text, sizeof text, "byte %lld of the %zu-byte device buffer at 0x%llx%s", offset, a.size, pointer,
                  offset < 0 || static_cast<size_t>(offset) >= a.size ? " (out of bounds)" : "");
    return text;
  }
  return "not in any device buffer";
}

// A write past the end of a buffer (within its alignment slack).
void check_canaries(const char* kernel) {
  for (const auto& [pointer, a] : allocations()) {
    for (size_t i = 0; i < a.canary_bytes; ++i) {
      if (static_cast<unsigned char>(a.canary[i]) != kCanary) {
        die("%s wrote byte %zu of the %zu-byte device buffer at 0x%llx (past its end)", kernel, a.size + i, a.size,
            pointer);
      }
    }
  }
}

// ------------------------------------------------------------ crashes
char alt_stack[1 << 16];
const char* launching = "";

void on_fault(int signal, siginfo_t* info, void*) {
  char where[256];
  emu::describe_location(where, sizeof where);
  std::fprintf(stderr, "emu: error: %s at %p (%s) in %s\n", signal == SIGSEGV ? "SIGSEGV" : "SIGBUS", info->si_addr,
               describe_address(reinterpret_cast<uintptr_t>(info->si_addr)).c_str(), where);
  std::fflush(stderr);
  _exit(99);
}

void install_fault_handler() {
  stack_t ss;
  ss.ss_sp = alt_stack;
  ss.ss_size = sizeof alt_stack;
  ss.ss_flags = 0;
  sigaltstack(&ss, nullptr);
  static bool installed = false;
  if (installed) return;
  installed = true;
  struct sigaction action;
  std::memset(&action, 0, sizeof action);
  action.sa_sigaction = on_fault;
  action.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigaction(SIGSEGV, &action, nullptr);
  sigaction(SIGBUS, &action, nullptr);
}

// ------------------------------------------------------------ handles
int context_token;
bool initialised = false;

using emu::libcuda::Event;
using emu::libcuda::Op;
using emu::libcuda::Stream;

// The null (legacy) and per-thread default streams: one stream here. Work on
// it is not ordered with cudarc's non-blocking streams, as on a driver.
Stream* stream_of(void* handle) {
  const uintptr_t h = reinterpret_cast<uintptr_t>(handle);
  if (h <= 2) {
    static Stream* default_stream = emu::libcuda::new_stream();
    return default_stream;
  }
  return static_cast<Stream*>(handle);
}

// The allocation holding device address `p`, if any.
std::map<CUdeviceptr, Allocation>::iterator allocation_at(CUdeviceptr p) {
  auto it = allocations().upper_bound(p);
  if (it == allocations().begin()) return allocations().end();
  --it;
  return p < it->first + (it->second.size == 0 ? 1 : it->second.size) ? it : allocations().end();
}

// Queues `op` on `stream`, refusing work on a buffer whose free is queued.
void enqueue(Stream* stream, Op op) {
  for (uintptr_t buffer : op.buffers) {
    auto it = allocations().find(buffer);
    if (it != allocations().end() && it->second.free_queued) {
      die("%s uses the device buffer at 0x%llx after cuMemFreeAsync queued its free", op.what.c_str(),
          static_cast<CUdeviceptr>(buffer));
    }
  }
  stream->enqueue(std::move(op));
}

bool readable(const void* p, size_t n) {
  char buffer[64];
  iovec local{buffer, n < sizeof buffer ? n : sizeof buffer};
  iovec remote{const_cast<void*>(p), local.iov_len};
  return process_vm_readv(getpid(), &local, 1, &remote, 1, 0) == static_cast<ssize_t>(local.iov_len);
}

// The MALLOC_PERTURB_ fill of memory malloc handed out but nobody wrote.
bool perturbed(const void* slot) {
  const char* env = std::getenv("MALLOC_PERTURB_");
  if (env == nullptr) return false;
  const unsigned p = static_cast<unsigned>(std::strtoul(env, nullptr, 0)) & 0xffu;
  if (p == 0) return false;
  unsigned char bytes[8];
  std::memcpy(bytes, slot, 8);
  for (unsigned fill : {p, p ^ 0xffu}) {
    bool all = true;
    for (unsigned char b : bytes) all = all && b == fill;
    if (all) return true;
  }
  return false;
}

// cudarc passes kernelParams as a Vec's buffer; the driver reads one slot
// per kernel parameter whatever its length. A launch that pushed fewer
// arguments than the kernel takes makes it read garbage: caught here when
// the slot lies past the malloc block, is still malloc's perturb fill, or
// does not point at readable memory.
void check_params(const emu::libcuda::Kernel& k, void** params) {
  const size_t n = k.param_bytes.size();
  if (n == 0) return;
  if (reinterpret_cast<uintptr_t>(params) < kPage) {
    die("cuLaunchKernel(%s): kernelParams is %p but the kernel takes %zu parameters (the launch pushed none)", k.name,
        static_cast<void*>(params), n);
  }
  const size_t usable = malloc_usable_size(params);
  if (usable != 0 && usable < n * sizeof(void*)) {
    die("cuLaunchKernel(%s): the kernel takes %zu parameters but kernelParams holds at most %zu: the launch pushes "
        "too few arguments",
        k.name, n, usable / sizeof(void*));
  }
  for (size_t i = 0; i < n; ++i) {
    if (perturbed(&params[i]) || !readable(params[i], k.param_bytes[i])) {
      die("cuLaunchKernel(%s): kernelParams[%zu] (%p) is not a pushed argument: the kernel takes %zu parameters, "
          "the launch pushes fewer",
          k.name, i, params[i], n);
    }
  }
}

// The device buffers a launch's parameters point into: every 8-byte word of
// every parameter (pointers, and pointers inside parameter structs) that
// lies inside a live allocation.
std::vector<uintptr_t> buffers_in(const std::vector<std::vector<char>>& values) {
  std::vector<uintptr_t> buffers;
  for (const auto& v : values) {
    for (size_t at = 0; at + 8 <= v.size(); at += 8) {
      CUdeviceptr word;
      std::memcpy(&word, v.data() + at, 8);
      auto it = allocation_at(word);
      if (it != allocations().end()) buffers.push_back(static_cast<uintptr_t>(it->first));
    }
  }
  return buffers;
}

}  // namespace

bool emu::libcuda::register_kernel(const Kernel& kernel) {
  kernels().push_back(kernel);
  return true;
}

// ------------------------------------------------------------ entry points
EMU_API CUresult cuInit(unsigned) {
  std::lock_guard<std::recursive_mutex> guard(lock());
  initialised = true;
  return OK;
}
EMU_API CUresult cuDriverGetVersion(int* v) {
  *v = 12080;
  return OK;
}
EMU_API CUresult cuDeviceGetCount(int* count) {
  *count = 1;
  return OK;
}
EMU_API CUresult cuDeviceGet(int* device, int ordinal) {
  if (ordinal != 0) return ERR_INVALID_DEVICE;
  *device = 0;
  return OK;
}
EMU_API CUresult cuDeviceGetName(char* name, int length, int) {
  std::snprintf(name, static_cast<size_t>(length), "moerec emulator (emu/libcuda)");
  return OK;
}
// An H100 SXM (sm_90) where the value matters.
EMU_API CUresult cuDeviceGetAttribute(int* value, int attribute, int device) {
  if (device != 0) return ERR_INVALID_DEVICE;
  switch (attribute) {
    case 1: *value = 1024; break;                 // MAX_THREADS_PER_BLOCK
    case 2: *value = 1024; break;                 // MAX_BLOCK_DIM_X
    case 3: *value = 1024; break;                 // MAX_BLOCK_DIM_Y
    case 4: *value = 64; break;                   // MAX_BLOCK_DIM_Z
    case 5: *value = 0x7fffffff; break;           // MAX_GRID_DIM_X
    case 6: *value = 65535; break;                // MAX_GRID_DIM_Y
    case 7: *value = 65535; break;                // MAX_GRID_DIM_Z
    case 8: *value = 48 * 1024; break;            // MAX_SHARED_MEMORY_PER_BLOCK
    case 10: *value = 32; break;                  // WARP_SIZE
    case 16: *value = 132; break;                 // MULTIPROCESSOR_COUNT
    case 39: *value = 2048; break;                // MAX_THREADS_PER_MULTIPROCESSOR
    case 75: *value = 9; break;                   // COMPUTE_CAPABILITY_MAJOR
    case 76: *value = 0; break;                   // COMPUTE_CAPABILITY_MINOR
    case 81: *value = 228 * 1024; break;          // MAX_SHARED_MEMORY_PER_MULTIPROCESSOR
    case 97: *value = kMaxDynamicSharedBytes; break;  // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
    case 115: *value = 1; break;                  // MEMORY_POOLS_SUPPORTED
    default:
      std::fprintf(stderr, "emu: warning: cuDeviceGetAttribute(%d) is not modelled; answering 0\n", attribute);
      *value = 0;
  }
  return OK;
}
EMU_API CUresult cuDeviceTotalMem_v2(size_t* bytes, int) {
  *bytes = 80ull << 30;
  return OK;
}
EMU_API CUresult cuDevicePrimaryCtxRetain(void** context, int device) {
  if (!initialised) return ERR_NOT_INITIALIZED;
  if (device != 0) return ERR_INVALID_DEVICE;
  *context = &context_token;
  return OK;
}
EMU_API CUresult cuDevicePrimaryCtxRelease_v2(int) { return OK; }
EMU_API CUresult cuCtxSetCurrent(void*) { return OK; }
EMU_API CUresult cuCtxGetCurrent(void** context) {
  *context = &context_token;
  return OK;
}
EMU_API CUresult cuCtxPushCurrent_v2(void*) { return OK; }
EMU_API CUresult cuCtxPopCurrent_v2(void** context) {
  if (context) *context = &context_token;
  return OK;
}
EMU_API CUresult cuCtxSynchronize() {
  std::lock_guard<std::recursive_mutex> guard(lock());
  emu::libcuda::run_all_streams();
  return OK;
}
EMU_API CUresult cuCtxGetDevice(int* device) {
  *device = 0;
  return OK;
}
EMU_API CUresult cuStreamCreate(void** stream, unsigned) {
  std::lock_guard<std::recursive_mutex> guard(lock());
  *stream = emu::libcuda::new_stream();
  return OK;
}
// A destroyed stream's queued work still runs, as on a driver.
EMU_API CUresult cuStreamDestroy_v2(void* stream) {
  std::lock_guard<std::recursive_mutex> guard(lock());
  stream_of(stream)->run_all();
  return OK;
}
EMU_API CUresult cuStreamSynchronize(void* stream) {
  std::lock_guard<std::recursive_mutex> guard(lock());
  stream_of(stream)->run_all();
  return OK;
}
// The emulated device runs a stream's work when asked whether it has.
EMU_API CUresult cuStreamQuery(void* stream) { return cuStreamSynchronize(stream); }
EMU_API CUresult cuStreamWaitEvent(void* stream, void* event, unsigned) {
  std::lock_guard<std::recursive_mutex> guard(lock());
  const Event* e = static_cast<Event*>(event);
  // An event never recorded is complete; a later record does not change
  // what this wait waits for.
  if (e->stream != nullptr) stream_of(stream)->enqueue(Op{"cuStreamWaitEvent", {}, {}, e->stream, e->upto});
  return OK;
}
EMU_API CUresult cuEventCreate(void** event, unsigned) {
  *event = new Event();
  return OK;
}
EMU_API CUresult cuEventRecord(void* event, void* stream) {
  std::lock_guard<std::recursive_mutex> guard(lock());
  Stream* s = stream_of(stream);
  *static_cast<Event*>(event) = Event{s, s->queued};
  return OK;
}
EMU_API CUresult cuEventDestroy_v2(void* event) {
  delete static_cast<Event*>(event);
  return OK;
}
EMU_API CUresult cuEventSynchronize(void* event) {
  std::lock_guard<std::recursive_mutex> guard(lock());
  const Event* e = static_cast<Event*>(event);
  if (e->stream != nullptr) e->stream->run_until(e->upto);
  return OK;
}
EMU_API CUresult cuEventQuery(void* event) { return cuEventSynchronize(event); }
EMU_API CUresult cuEventElapsedTime(float* ms, void*, void*) {
  *ms = 0.0f;
  return OK;
}
EMU_API CUresult cuGetErrorName(CUresult error, const char** name) {
  *name = error_name(error);
  return *name ? OK : ERR_INVALID_VALUE;
}
EMU_API CUresult cuGetErrorString(CUresult error, const char** text) {
  *text = error_name(error);
  return *text ? OK : ERR_INVALID_VALUE;
}

EMU_API CUresult cuMemAlloc_v2(CUdeviceptr* pointer, size_t size) {
  std::lock_guard<std::recursive_mutex> guard(lock());
  *pointer = allocate(size);
  return *pointer ? OK : ERR_OUT_OF_MEMORY;
}
EMU_API CUresult cuMemAllocAsync(CUdeviceptr* pointer, size_t size, void*) { return cuMemAlloc_v2(pointer, size); }
// cuMemFree waits for the whole device first, as the driver does.
EMU_API CUresult cuMemFree_v2(CUdeviceptr pointer) {
  std::lock_guard<std::recursive_mutex> guard(lock());
  emu::libcuda::run_all_streams();
  return release(pointer);
}
// The free runs in the order of `stream`; the memory may be reused from
// then on, so work that another stream queued on it and that nothing orders
// before the free is a use after free.
EMU_API CUresult cuMemFreeAsync(CUdeviceptr pointer, void* stream) {
  std::lock_guard<std::recursive_mutex> guard(lock());
  auto it = allocations().find(pointer);
  if (it == allocations().end() || it->second.free_queued) {
    die("cuMemFreeAsync of 0x%llx, which cuMemAlloc did not return (or freed already)", pointer);
  }
  Stream* s = stream_of(stream);
  const std::string racing = emu::libcuda::unordered_use(s, static_cast<uintptr_t>(pointer));
  if (!racing.empty()) {
    die("cuMemFreeAsync of the %zu-byte device buffer at 0x%llx on one stream while %s, queued on another stream "
        "and not ordered before the free (no event wait), still uses it",
        it->second.size, pointer, racing.c_str());
  }
  enqueue(s, Op{"cuMemFreeAsync", {static_cast<uintptr_t>(pointer)}, [pointer] { release(pointer); }});
  it->second.free_queued = true;
  return OK;
}
EMU_API CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
  *free_bytes = 64ull << 30;
  *total = 80ull << 30;
  return OK;
}

namespace {
// A copy touches device memory only inside one live allocation; returns
// that allocation's base (none for an empty copy).
std::vector<uintptr_t> check_range(const char* call, CUdeviceptr p, size_t n) {
  if (n == 0) return {};
  auto it = allocations().upper_bound(p);
  if (it == allocations().begin()) die("%s: 0x%llx is not device memory", call, p);
  --it;
  if (p < it->first || p + n > it->first + it->second.size) {
    die("%s: %zu bytes at 0x%llx leave the %zu-byte device buffer at 0x%llx", call, n, p, it->second.size, it->first);
  }
  return {static_cast<uintptr_t>(it->first)};
}

// Queues a copy or memset of device memory (`run` does it) on `stream`.
CUresult enqueue_memory(const char* call, void* stream, std::vector<uintptr_t> buffers, std::function<void()> run) {
  std::lock_guard<std::recursive_mutex> guard(lock());
  enqueue(stream_of(stream), Op{call, std::move(buffers), std::move(run)});
  return OK;
}
}  // namespace

EMU_API CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
  std::lock_guard<std::recursive_mutex> guard(lock());
  check_range("cuMemcpyHtoD", dst, n);
  std::memcpy(reinterpret_cast<void*>(dst), src, n);
  return OK;
}
// From pageable memory: the source is read when the copy is queued.
EMU_API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, void* stream) {
  std::lock_guard<std::recursive_mutex> guard(lock());
  auto buffers = check_range("cuMemcpyHtoDAsync", dst, n);
  auto data = std::make_shared<std::vector<char>>(static_cast<const char*>(src), static_cast<const char*>(src) + n);
  return enqueue_memory("cuMemcpyHtoDAsync", stream, std::move(buffers),
                        [dst, data] { std::memcpy(reinterpret_cast<void*>(dst), data->data(), data->size()); });
}
EMU_API CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
  std::lock_guard<std::recursive_mutex> guard(lock());
  check_range("cuMemcpyDtoH", src, n);
  std::memcpy(dst, reinterpret_cast<const void*>(src), n);
  return OK;
}
// To pageable memory: returns once the copy, in stream order, is done.
EMU_API CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, void* stream) {
  std::lock_guard<std::recursive_mutex> guard(lock());
  stream_of(stream)->run_all();
  return cuMemcpyDtoH_v2(dst, src, n);
}
EMU_API CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
  std::lock_guard<std::recursive_mutex> guard(lock());
  check_range("cuMemcpyDtoD (destination)", dst, n);
  check_range("cuMemcpyDtoD (source)", src, n);
  std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
  return OK;
}
EMU_API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void* stream) {
  std::lock_guard<std::recursive_mutex> guard(lock());
  auto buffers = check_range("cuMemcpyDtoDAsync (destination)", dst, n);
  for (uintptr_t b : check_range("cuMemcpyDtoDAsync (source)", src, n)) buffers.push_back(b);
  return enqueue_memory("cuMemcpyDtoDAsync", stream, std::move(buffers), [dst, src, n] {
    std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
  });
}
EMU_API CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char value, size_t n) {
  std::lock_guard<std::recursive_mutex> guard(lock());
  check_range("cuMemsetD8", dst, n);
  std::memset(reinterpret_cast<void*>(dst), value, n);
  return OK;
}
EMU_API CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char value, size_t n, void* stream) {
  std::lock_guard<std::recursive_mutex> guard(lock());
  return enqueue_memory("cuMemsetD8Async", stream, check_range("cuMemsetD8Async", dst, n),
                        [dst, value, n] { std::memset(reinterpret_cast<void*>(dst), value, n); });
}
EMU_API CUresult cuMemsetD32_v2(CUdeviceptr dst, unsigned value, size_t n) {
  std::lock_guard<std::recursive_mutex> guard(lock());
  check_range("cuMemsetD32", dst, n * 4);
  for (size_t i = 0; i < n; ++i) std::memcpy(reinterpret_cast<char*>(dst) + 4 * i, &value, 4);
  return OK;
}
EMU_API CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned value, size_t n, void* stream) {
  std::lock_guard<std::recursive_mutex> guard(lock());
  return enqueue_memory("cuMemsetD32Async", stream, check_range("cuMemsetD32Async", dst, n * 4), [dst, value, n] {
    for (size_t i = 0; i < n; ++i) std::memcpy(reinterpret_cast<char*>(dst) + 4 * i, &value, 4);
  });
}

EMU_API CUresult cuModuleLoadData(void** module, const void* image) {
  std::lock_guard<std::recursive_mutex> guard(lock());
  std::vector<std::string> problems;
  const auto entries = emu::libcuda::ptx::parse(static_cast<const char*>(image), problems);
  // The emulated module with exactly these entry points.
  std::map<std::string, std::vector<const emu::libcuda::Kernel*>> by_module;
  for (const auto& k : kernels()) by_module[k.module].push_back(&k);
  for (const auto& [name, list] : by_module) {
    bool same = list.size() == entries.size();
    for (const auto* k : list) same = same && entries.count(k->name) != 0;
    if (!same) continue;
    for (const auto& problem : problems) std::fprintf(stderr, "emu: error: module %s: %s\n", name.c_str(), problem.c_str());
    if (!problems.empty()) die("module %s: its PTX breaks %zu rule(s) a GPU enforces (above)", name.c_str(), problems.size());
    auto* m = new Module{name, {}};
    for (const auto* k : list) {
      const auto& entry = entries.at(k->name);
      if (entry.param_bytes != k->param_bytes) {
        std::string text;
        for (size_t i = 0; i < std::max(entry.param_bytes.size(), k->param_bytes.size()); ++i) {
          text += " " + std::to_string(i < entry.param_bytes.size() ? entry.param_bytes[i] : 0) + "/" +
                  std::to_string(i < k->param_bytes.size() ? k->param_bytes[i] : 0);
        }
        die("module %s: kernel %s: parameter bytes (PTX/emulated):%s differ", name.c_str(), k->name, text.c_str());
      }
      const unsigned fixed = entry.static_shared_bytes;
      m->functions.push_back(Function{k, fixed, entry.max_threads, fixed < kDefaultSharedBytes ? kDefaultSharedBytes - fixed : 0});
    }
    modules().push_back(m);
    *module = m;
    return OK;
  }
  std::string names;
  for (const auto& e : entries) names += " " + e.first;
  std::fprintf(stderr,
               "emu: error: cuModuleLoadData: no emulated module (emu/libcuda) has exactly the PTX's %zu entry "
               "points:%s\n",
               entries.size(), names.c_str());
  return ERR_INVALID_IMAGE;
}
EMU_API CUresult cuModuleUnload(void*) { return OK; }
EMU_API CUresult cuModuleGetFunction(void** function, void* module, const char* name) {
  std::lock_guard<std::recursive_mutex> guard(lock());
  auto* m = static_cast<Module*>(module);
  for (auto& f : m->functions) {
    if (std::strcmp(f.kernel->name, name) == 0) {
      *function = &f;
      return OK;
    }
  }
  return ERR_NOT_FOUND;
}
EMU_API CUresult cuFuncGetAttribute(int* value, int attribute, void* function) {
  std::lock_guard<std::recursive_mutex> guard(lock());
  const auto& f = *static_cast<Function*>(function);
  switch (attribute) {
    case 0: *value = static_cast<int>(f.max_threads); break;    // MAX_THREADS_PER_BLOCK
    case 1: *value = static_cast<int>(f.static_shared); break;  // SHARED_SIZE_BYTES
    case 4: *value = 32; break;                                 // NUM_REGS
    case 8: *value = static_cast<int>(f.max_dynamic); break;    // MAX_DYNAMIC_SHARED_SIZE_BYTES
    default:
      std::fprintf(stderr, "emu: warning: cuFuncGetAttribute(%s, %d) is not modelled; answering 0\n", f.kernel->name,
                   attribute);
      *value = 0;
  }
  return OK;
}
EMU_API CUresult cuFuncSetAttribute(void* function, int attribute, int value) {
  std::lock_guard<std::recursive_mutex> guard(lock());
  auto& f = *static_cast<Function*>(function);
  if (attribute == 8) {  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    // The driver's rule: static + dynamic within the device's opt-in limit.
    if (value < 0 || f.static_shared + static_cast<unsigned>(value) > kMaxDynamicSharedBytes) {
      std::fprintf(stderr,
                   "emu: cuFuncSetAttribute(%s, MAX_DYNAMIC_SHARED_SIZE_BYTES, %d): CUDA_ERROR_INVALID_VALUE (%u "
                   "static bytes, opt-in limit %u)\n",
                   f.kernel->name, value, f.static_shared, kMaxDynamicSharedBytes);
      return ERR_INVALID_VALUE;
    }
    f.max_dynamic = static_cast<unsigned>(value);
    emu::set_max_dynamic_shared_bytes(f.kernel->function, f.max_dynamic);
    return OK;
  }
  if (attribute == 9) return OK;  // PREFERRED_SHARED_MEMORY_CARVEOUT: a hint
  std::fprintf(stderr, "emu: warning: cuFuncSetAttribute(%s, %d) is not modelled\n", f.kernel->name, attribute);
  return OK;
}

EMU_API CUresult cuLaunchKernel(void* function, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                                unsigned bz, unsigned shared, void* stream, void** params, void** extra) {
  std::lock_guard<std::recursive_mutex> guard(lock());
  const auto& f = *static_cast<Function*>(function);
  const auto& k = *f.kernel;
  if (extra != nullptr) die("cuLaunchKernel(%s): `extra` is not modelled (kernelParams only)", k.name);
  // Refused as the driver refuses them, before anything runs.
  const unsigned long long threads = static_cast<unsigned long long>(bx) * by * bz;
  if (threads > f.max_threads || shared > f.max_dynamic) {
    std::fprintf(stderr,
                 "emu: cuLaunchKernel(%s): CUDA_ERROR_INVALID_VALUE: %llu threads per block (__launch_bounds__ "
                 "%u), %u bytes of dynamic shared memory (%u allowed: %u static bytes, %s)\n",
                 k.name, threads, f.max_threads, shared, f.max_dynamic, f.static_shared,
                 f.max_dynamic + f.static_shared > kDefaultSharedBytes ? "opted in" : "48 KB without the opt-in");
    return ERR_INVALID_VALUE;
  }
  check_params(k, params);
  // The parameters are read now, as the driver does; the kernel runs in
  // stream order.
  auto values = std::make_shared<std::vector<std::vector<char>>>();
  for (size_t i = 0; i < k.param_bytes.size(); ++i) {
    const char* p = static_cast<const char*>(params[i]);
    values->emplace_back(p, p + k.param_bytes[i]);
  }
  std::array<unsigned, 3> grid{gx, gy, gz}, block{bx, by, bz};
  enqueue(stream_of(stream), Op{k.name, buffers_in(*values), [&k, grid, block, shared, values] {
                                  install_fault_handler();
                                  launching = k.name;
                                  if (std::getenv("EMU_TRACE")) {
                                    std::fprintf(stderr, "emu: %s grid (%u,%u,%u) block (%u,%u,%u) shared %u\n",
                                                 k.name, grid[0], grid[1], grid[2], block[0], block[1], block[2],
                                                 shared);
                                  }
                                  std::vector<void*> slots;
                                  for (auto& v : *values) slots.push_back(v.data());
                                  const unsigned g[3] = {grid[0], grid[1], grid[2]};
                                  const unsigned b[3] = {block[0], block[1], block[2]};
                                  k.launch(k, g, b, shared, slots.data());
                                  check_canaries(k.name);
                                  launching = "";
                                }});
  return OK;
}
