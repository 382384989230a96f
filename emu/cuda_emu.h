// A CPU emulator of the CUDA execution model, for running kernels/*.cu
// unmodified under g++ in CI (no GPU): see emu/README.md.
//
// Model
//   - Blocks run one after another. Inside a block every CUDA thread is a
//     fiber (its own stack and context) that runs until it reaches a
//     synchronisation point: __syncthreads, __syncwarp or a warp collective
//     (shuffle, ballot, match, vote, reduce). So a thread never sees another
//     thread's writes early by accident of lock-step, and the order in which
//     threads run between two barriers is a knob (EMU_SCHEDULE=forward,
//     reverse or random[:seed]): a missing barrier shows as a wrong result
//     under one of the orders.
//   - Warp collectives need every lane of their mask to arrive with the same
//     mask and the same operation; a lane outside the mask, a mask naming
//     lanes the block does not have, a source lane outside the mask, or
//     lanes of one mask in different collectives are errors. A barrier that
//     can never complete (exited threads, divergent __syncthreads) is a
//     deadlock, reported with who waits where.
//   - __shared__ is `thread_local`: every fiber of a block runs on the
//     launching OS thread, so the variables are shared by the block, and the
//     executable's whole TLS block (which holds them and nothing else: the
//     harness defines no thread_local of its own) is filled with a poison
//     byte (EMU_SHARED_POISON, default 0xff: NaN for floats) before every
//     block, as uninitialised shared memory.
//   - Dynamic shared memory: a kernel file's `extern __shared__ T name[];` is
//     defined by its translation unit in emu/tu/ with EMU_DYNAMIC_SHARED
//     (T, name). A launch may ask for up to 48 KiB, more after
//     emu::set_max_dynamic_shared (cuFuncSetAttribute), never more than
//     kMaxDynamicSharedBytes (H100); a write past the requested bytes is an
//     error, found when the block ends.
//   - Kernel arguments are marshalled like cuLaunchKernel: each parameter's
//     bytes are copied from the value the launcher pushes. A pushed value
//     wider than the parameter is read from its first bytes (as the driver
//     does, little-endian) with a warning on stderr; a narrower one is an
//     error.
//   - The runtime (emu/cuda_emu_runtime.cpp) is compiled once, with the
//     sanitizers when they are on; this header is what kernels and harness
//     code include.
//   - Single precision arithmetic is IEEE binary32 (SSE, no contraction);
//     expf/logf are glibc's, not the GPU's: compare floats with tolerance.
//
// Diagnostics go to stderr, prefixed "emu:"; errors abort the process.
#pragma once

#define MOEREC_EMULATOR 1

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ------------------------------------------------------------------ qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ thread_local
#define __constant__
#define __managed__
#ifndef __restrict__
#define __restrict__ __restrict
#endif

using std::isfinite;
using std::isinf;
using std::isnan;

constexpr int warpSize = 32;

// ------------------------------------------------------------ vector types
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) int2 {
  int x, y;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(4) ushort2 {
  unsigned short x, y;
};
struct alignas(16) ulonglong2 {
  unsigned long long x, y;
};
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// --------------------------------------------------------- bit reinterprets
template <class To, class From>
inline To emu_bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit cast between different sizes");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}
inline float __int_as_float(int x) { return emu_bit_cast<float>(x); }
inline int __float_as_int(float x) { return emu_bit_cast<int>(x); }
inline float __uint_as_float(unsigned x) { return emu_bit_cast<float>(x); }
inline unsigned __float_as_uint(float x) { return emu_bit_cast<unsigned>(x); }
inline double __longlong_as_double(long long x) { return emu_bit_cast<double>(x); }
inline long long __double_as_longlong(double x) { return emu_bit_cast<long long>(x); }

// ------------------------------------------------------------ bf16 and f16
// Bit-exact conversions, round to nearest even, as cvt.rn does; NaN becomes
// the canonical 0x7fff as in CUDA's own headers.
struct __nv_bfloat16_raw {
  unsigned short x;
};
struct __half_raw {
  unsigned short x;
};
struct __nv_bfloat16;
struct __half;
inline __nv_bfloat16 __float2bfloat16_rn(float f);
inline float __bfloat162float(__nv_bfloat16 h);
inline __half __float2half_rn(float f);
inline float __half2float(__half h);

struct __nv_bfloat16 {
  unsigned short __x;
  __nv_bfloat16() = default;
  constexpr __nv_bfloat16(__nv_bfloat16_raw r) : __x(r.x) {}
  __nv_bfloat16(float f) : __x(__float2bfloat16_rn(f).__x) {}
  operator float() const { return __bfloat162float(*this); }
  operator __nv_bfloat16_raw() const { return {__x}; }
};
struct __half {
  unsigned short __x;
  __half() = default;
  constexpr __half(__half_raw r) : __x(r.x) {}
  __half(float f) : __x(__float2half_rn(f).__x) {}
  operator float() const { return __half2float(*this); }
  operator __half_raw() const { return {__x}; }
};
using nv_bfloat16 = __nv_bfloat16;
using half = __half;
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
struct alignas(4) __half2 {
  __half x, y;
};

inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short bits) { return __nv_bfloat16_raw{bits}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __half __ushort_as_half(unsigned short bits) { return __half_raw{bits}; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }

inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float(static_cast<unsigned>(h.__x) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  unsigned u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16_raw{0x7fff};
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16_raw{static_cast<unsigned short>(u >> 16)};
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline __nv_bfloat16 __float2bfloat16_rz(float f) {
  const unsigned u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16_raw{0x7fff};
  return __nv_bfloat16_raw{static_cast<unsigned short>(u >> 16)};
}

inline float __half2float(__half h) {
  const unsigned sign = (h.__x & 0x8000u) << 16;
  const unsigned exponent = (h.__x >> 10) & 0x1fu;
  const unsigned mantissa = h.__x & 0x3ffu;
  if (exponent == 0x1f) return __uint_as_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent != 0) return __uint_as_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
  // Subnormal or zero: mantissa * 2^-24, exact in binary32.
  const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
  return sign ? -magnitude : magnitude;
}
inline __half __float2half_rn(float f) {
  const unsigned u = __float_as_uint(f);
  const unsigned short sign = static_cast<unsigned short>((u >> 16) & 0x8000u);
  const unsigned abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return __half_raw{0x7fff};
  if (abs >= 0x477ff000u) return __half_raw{static_cast<unsigned short>(sign | 0x7c00u)};  // rounds to inf
  if (abs < 0x38800000u) {
    // Below the smallest normal (2^-14): a multiple of 2^-24, rounded to
    // nearest even. 2^-25 and below round to zero (ties to even: 0).
    if (abs <= 0x33000000u) return __half_raw{sign};
    const unsigned exponent = abs >> 23;
    const unsigned mantissa = (abs & 0x7fffffu) | 0x800000u;
    const unsigned shift = 126 - exponent;  // 14..24 for exponents 102..112
    unsigned result = mantissa >> shift;
    const unsigned rest = mantissa & ((1u << shift) - 1);
    const unsigned half_way = 1u << (shift - 1);
    if (rest > half_way || (rest == half_way && (result & 1u))) ++result;
    return __half_raw{static_cast<unsigned short>(sign | result)};
  }
  // Normal: re-bias the exponent, round the 13 dropped bits to nearest even
  // (a carry into the exponent is right, up to inf).
  unsigned result = ((abs >> 13) - (112u << 10));
  const unsigned rest = abs & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (result & 1u))) ++result;
  return __half_raw{static_cast<unsigned short>(sign | result)};
}
inline __half __float2half(float f) { return __float2half_rn(f); }
inline __nv_bfloat16 __half2bfloat16(__half h) { return __float2bfloat16_rn(__half2float(h)); }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }
inline float __low2float(__nv_bfloat162 h) { return __bfloat162float(h.x); }
inline float __high2float(__nv_bfloat162 h) { return __bfloat162float(h.y); }
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)}; }

// ------------------------------------------------------- math and integers
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __fdiv_rn(float x, float y) { return x / y; }
inline float __fadd_rn(float x, float y) { return x + y; }
inline float __fsub_rn(float x, float y) { return x - y; }
inline float __fmul_rn(float x, float y) { return x * y; }
inline float __fmaf_rn(float x, float y, float z) { return fmaf(x, y, z); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __saturatef(float x) { return isnan(x) ? 0.0f : fminf(fmaxf(x, 0.0f), 1.0f); }
inline float exp10f(float x) { return powf(10.0f, x); }

template <class A, class B>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}
template <class A, class B>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline unsigned long long __brevll(unsigned long long x) {
  return (static_cast<unsigned long long>(__brev(static_cast<unsigned>(x))) << 32) | __brev(static_cast<unsigned>(x >> 32));
}
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}
inline int __mulhi(int a, int b) { return static_cast<int>((static_cast<long long>(a) * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned shift) {
  const unsigned s = shift & 31u;
  return s == 0 ? hi : (hi << s) | (lo >> (32 - s));
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
  const unsigned s = shift & 31u;
  return s == 0 ? lo : (lo >> s) | (hi << (32 - s));
}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const unsigned long long bytes = (static_cast<unsigned long long>(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<unsigned>((bytes >> (8 * ((s >> (4 * i)) & 7u))) & 0xffu) << (8 * i);
  return r;
}

template <class T>
inline T __ldg(const T* p) {
  return *p;
}
template <class T>
inline T __ldcs(const T* p) {
  return *p;
}
template <class T>
inline T __ldcg(const T* p) {
  return *p;
}
template <class T>
inline void __stcs(T* p, T v) {
  *p = v;
}
template <class T>
inline void __stcg(T* p, T v) {
  *p = v;
}

// Only the PTX wrappers' asm operands use it; under the emulator they never
// reach the asm (see emu/README.md, inline PTX).
inline size_t __cvta_generic_to_shared(const void* p) { return reinterpret_cast<size_t>(p); }

inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __threadfence_system() {}
inline void __nanosleep(unsigned) {}

// ------------------------------------------------------------------ runtime
namespace emu {

// Shared memory a launch may use without opting in, and the opt-in limit of
// an H100 (CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, sm_90).
constexpr unsigned kDefaultDynamicSharedBytes = 48 * 1024;
constexpr unsigned kMaxDynamicSharedBytes = 232448;

struct LaunchConfig {
  dim3 grid;
  dim3 block;
  unsigned shared_bytes = 0;
};

enum class Op : uint8_t { Sync, ShflIdx, ShflUp, ShflDown, ShflXor, Ballot, Any, All, MatchAny, MatchAll, ReduceAdd,
                          ReduceMin, ReduceMax, ReduceAnd, ReduceOr, ReduceXor, Gather };
enum class BarrierKind : uint8_t { Sync, Count, And, Or };

// emu/cuda_emu_runtime.cpp
const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
long long block_barrier(BarrierKind kind, int predicate);
// Arrives at `op` of the calling lane's warp under `mask`; returns this
// lane's result once every lane of the mask has arrived.
uint64_t warp_collective(Op op, unsigned mask, uint64_t value, unsigned value_bytes, int param, int width);
unsigned active_mask();
// Every lane of the (full) warp contributes `bytes` (<= 32) from `mine`;
// returns when all have, with lane l's bytes at all + l * bytes. The model of
// the warp-wide .sync.aligned instructions (ldmatrix, mma.sync).
void warp_gather(const void* mine, unsigned bytes, void* all);
[[noreturn]] void fail(const char* format, ...) __attribute__((format(printf, 1, 2)));
bool register_dynamic_shared(const char* name, unsigned char* (*address)(), size_t capacity);
void set_max_dynamic_shared_bytes(const void* function, unsigned bytes);
void run_grid(const char* kernel, const void* function, const LaunchConfig& config, void (*body)(void*), void* arg);
void describe_location(char* out, size_t size);
void argument_width_mismatch(const char* kernel, size_t index, size_t parameter_bytes, size_t pushed_bytes);

// cuFuncSetAttribute(kernel, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes).
template <class... P>
inline void set_max_dynamic_shared(void (*kernel)(P...), unsigned bytes) {
  set_max_dynamic_shared_bytes(reinterpret_cast<const void*>(kernel), bytes);
}

// One argument as cuLaunchKernel passes it: the parameter's bytes, copied
// from the start of the value the launcher pushed.
template <class P, class A>
inline P marshal(const char* kernel, size_t index, const A& pushed) {
  static_assert(std::is_trivially_copyable<P>::value, "kernel parameters must be trivially copyable");
  if constexpr (std::is_same<A, std::nullptr_t>::value) {
    static_assert(std::is_pointer<P>::value, "nullptr pushed for a parameter that is not a pointer");
    return nullptr;
  } else {
    static_assert(std::is_trivially_copyable<A>::value, "pushed arguments must be trivially copyable");
    if (sizeof(A) != sizeof(P)) argument_width_mismatch(kernel, index, sizeof(P), sizeof(A));
    P p;
    std::memcpy(static_cast<void*>(&p), &pushed, sizeof(P) < sizeof(A) ? sizeof(P) : sizeof(A));
    return p;
  }
}

template <class... P, class Tuple, size_t... I>
inline std::tuple<P...> marshal_all(const char* kernel, const Tuple& pushed, std::index_sequence<I...>) {
  return std::tuple<P...>(marshal<P>(kernel, I, std::get<I>(pushed))...);
}

template <class... P>
struct BoundKernel {
  void (*kernel)(P...);
  std::tuple<P...> params;
  static void run(void* self) {
    auto* k = static_cast<BoundKernel*>(self);
    std::apply(k->kernel, k->params);  // each thread gets its own copies
  }
};

// Launches `kernel` (named `name` in diagnostics) with the arguments pushed
// as `args` (see marshal); returns when every block has run.
template <class... P, class... A>
inline void launch_kernel(const char* name, const LaunchConfig& config, void (*kernel)(P...), const A&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "the launch pushes a different number of arguments than the kernel takes");
  BoundKernel<P...> bound{kernel, marshal_all<P...>(name, std::tuple<const A&...>(args...), std::index_sequence_for<A...>{})};
  run_grid(name, reinterpret_cast<const void*>(kernel), config, &BoundKernel<P...>::run, &bound);
}

// kernel<<<grid, block>>>(args...), without dynamic shared memory.
template <class... P, class... A>
inline void launch(dim3 grid, dim3 block, void (*kernel)(P...), const A&... args) {
  launch_kernel("kernel", LaunchConfig{grid, block, 0}, kernel, args...);
}

template <class T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "warp collectives take values of <= 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}
template <class T>
inline T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

}  // namespace emu

// kernel<<<config.grid, config.block, config.shared_bytes>>>(args...), with
// the kernel's name in diagnostics.
#define EMU_LAUNCH(kernel, config, ...) ::emu::launch_kernel(#kernel, config, kernel, ##__VA_ARGS__)

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
#define blockDim (::emu::block_dim())
#define gridDim (::emu::grid_dim())

// Defines the array behind a kernel file's `extern __shared__ T name[];`:
// one per translation unit in emu/tu/, after the kernel file's #include.
#define EMU_DYNAMIC_SHARED(T, name)                                                                      \
  namespace {                                                                                            \
  thread_local T name[::emu::kMaxDynamicSharedBytes / sizeof(T)] __attribute__((aligned(16)));           \
  unsigned char* emu_dynamic_shared_address_##name() { return reinterpret_cast<unsigned char*>(name); } \
  const bool emu_dynamic_shared_registered_##name = ::emu::register_dynamic_shared(                       \
      #name, emu_dynamic_shared_address_##name, sizeof(name));                                          \
  }

#include "cuda_emu_intrinsics.h"
