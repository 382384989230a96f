// Shared device helpers for every moerec kernel file: element conversions,
// the data-error status word, and the per-dtype instantiation macro.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace moerec {

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }

// Round-to-nearest-even, as DESIGN 4.1 asks of every bf16/f16 write-back.
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }

// The status word holds the lowest offending position (u64::MAX when clean).
// Integer atomicMin gives the same final value whatever the order of the
// reports, so the error a user sees is deterministic.
constexpr unsigned long long kStatusClean = ~0ull;
__device__ __forceinline__ void report_position(unsigned long long* status, unsigned long long position) {
  if (position < *reinterpret_cast<volatile unsigned long long*>(status)) {
    atomicMin(status, position);
  }
}

// The block of every grid-stride and tiled launch (BLOCK_THREADS in
// src/cuda/mod.rs). Every kernel states its block in __launch_bounds__, so no
// compiler or driver JIT gives it more registers than that block can hold;
// emu/libcuda refuses a kernel without one, and a launch past it.
constexpr int kBlockThreads = 256;

__device__ __forceinline__ unsigned long long global_thread_index() {
  return static_cast<unsigned long long>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ unsigned long long global_thread_count() {
  return static_cast<unsigned long long>(gridDim.x) * blockDim.x;
}

}  // namespace moerec

// MOEREC_FOR_EACH_FLOAT(M) expands M(suffix, type) once per float element type;
// kernel files use it to emit one `extern "C"` entry point per dtype.
#define MOEREC_FOR_EACH_FLOAT(M) \
  M(f32, float)                  \
  M(bf16, __nv_bfloat16)         \
  M(f16, __half)
