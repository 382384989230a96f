// Kernels that check the emulator itself (python_ref/test_emulated_kernels.py
// runs them through `moerec_emu selftest`): conversions, warp collectives
// against their CUDA definitions, and the errors the emulator must raise.
#include "../cuda_emu.h"

namespace {
extern __shared__ uint32_t selftest_words[];
}
EMU_DYNAMIC_SHARED(uint32_t, selftest_words)

extern "C" __global__ void emu_selftest_convert(const float* in, uint32_t n, uint16_t* bf16, uint16_t* f16,
                                                float* bf16_back, float* f16_back) {
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const __nv_bfloat16 b = __float2bfloat16_rn(in[i]);
    const __half h = __float2half_rn(in[i]);
    bf16[i] = __bfloat16_as_ushort(b);
    f16[i] = __half_as_ushort(h);
    bf16_back[i] = __bfloat162float(b);
    f16_back[i] = __half2float(h);
  }
}

constexpr int kWarpResults = 18;

extern "C" __global__ void emu_selftest_warp(const uint32_t* in, uint32_t* out) {
  const uint32_t t = threadIdx.x;
  const uint32_t lane = t & 31;
  const uint32_t v = in[t];
  uint32_t* o = out + t * kWarpResults;
  o[0] = __shfl_sync(0xffffffffu, v, static_cast<int>(lane * 7 + 3));
  o[1] = __shfl_up_sync(0xffffffffu, v, 3, 8);
  o[2] = __shfl_down_sync(0xffffffffu, v, 5, 16);
  o[3] = __shfl_xor_sync(0xffffffffu, v, 17, 16);
  o[4] = __ballot_sync(0xffffffffu, v & 1);
  o[5] = __match_any_sync(0xffffffffu, v % 5);
  o[6] = __any_sync(0xffffffffu, v == 12345);
  o[7] = __all_sync(0xffffffffu, v < 1000);
  o[8] = __reduce_add_sync(0xffffffffu, v);
  o[9] = __reduce_max_sync(0xffffffffu, v);
  o[10] = __reduce_min_sync(0xffffffffu, v);
  const uint32_t eight = 0xffu << (lane & ~7u);
  o[11] = __shfl_xor_sync(eight, v, 2, 8);
  o[12] = __ballot_sync(eight, v & 2);
  o[13] = static_cast<uint32_t>(__syncthreads_count(v & 1));
  o[14] = static_cast<uint32_t>(__syncthreads_or(v == 77));
  int all_equal = 0;
  o[15] = __match_all_sync(0xffffffffu, v / 1000, &all_equal) + static_cast<uint32_t>(all_equal);
  const unsigned long long wide = (static_cast<unsigned long long>(v) << 32) | (v ^ 0xabcdu);
  const unsigned long long got = __shfl_down_sync(0xffffffffu, wide, 1);
  o[16] = static_cast<uint32_t>(got >> 32);
  o[17] = static_cast<uint32_t>(got);
}

// Thread t writes word t and reads word t + 1, with or without a barrier
// between: without it the result depends on the schedule.
extern "C" __global__ void emu_selftest_barrier(uint32_t with_barrier, uint32_t* out) {
  __shared__ uint32_t words[256];
  words[threadIdx.x] = threadIdx.x + 1;
  if (with_barrier) __syncthreads();
  out[threadIdx.x] = words[(threadIdx.x + 1) % blockDim.x];
}

// Thread 5 leaves before a __syncthreads the others wait at.
extern "C" __global__ void emu_selftest_deadlock(uint32_t* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

// Every lane shuffles under a mask that names lane 0 only.
extern "C" __global__ void emu_selftest_bad_mask(uint32_t* out) {
  out[threadIdx.x] = __shfl_sync(0x1u, threadIdx.x, 0);
}

// Writes the word just past the dynamic shared memory the launch asked for.
extern "C" __global__ void emu_selftest_shared_overrun(uint32_t words, uint32_t* out) {
  if (threadIdx.x == 0) selftest_words[words] = 1;
  out[threadIdx.x] = 0;
}

// Reads one element past the end of a global buffer.
extern "C" __global__ void emu_selftest_global_overrun(const uint32_t* in, uint32_t n, uint32_t* out) {
  if (threadIdx.x == 0) out[0] = in[n];
}

extern "C" __global__ void emu_selftest_argument(uint32_t value, uint32_t* out) { out[threadIdx.x] = value; }
