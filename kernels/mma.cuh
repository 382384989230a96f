// Warp-level tensor-core and asynchronous-copy primitives shared by the
// kernels that run bf16/f16 tiles on tensor cores (experts_gemm.cuh,
// scoring.cuh): cp.async, ldmatrix and mma.sync m16n8k16 with f32
// accumulation. Under MOEREC_EMULATOR (emu/README.md) each PTX wrapper has a
// plain C++ body that follows the PTX ISA's fragment layouts.
//
// Fragment layout of mma.m16n8k16 (PTX ISA), lane l, g = l / 4, q = l % 4:
//   A (16 x 16, row-major): a0 = (g, 2q..2q+1), a1 = (g+8, 2q..), a2 = (g, 2q+8..), a3 = (g+8, 2q+8..)
//   B (16 x 8, "col": stored as 8 rows of 16 k): b0 = (k 2q..2q+1, n g), b1 = (k 2q+8.., n g)
//   C/D (16 x 8): d0, d1 = (g, 2q), (g, 2q+1); d2, d3 = (g+8, 2q), (g+8, 2q+1)
#pragma once
#include "common.cuh"

namespace moerec {

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// 16 bytes global -> shared, or 16 zero bytes when !valid (src-size 0 reads
// nothing; `global` is still a valid address).
__device__ __forceinline__ void cp_async_16(void* shared, const void* global, bool valid) {
#ifdef MOEREC_EMULATOR
  emu::cp_async_16(shared, global, valid ? 16 : 0);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(shared)), "l"(global),
               "r"(valid ? 16 : 0));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifndef MOEREC_EMULATOR
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// Waits until at most one committed group is still in flight.
__device__ __forceinline__ void cp_async_wait_one() {
#ifndef MOEREC_EMULATOR
  asm volatile("cp.async.wait_group 1;\n" ::);
#endif
}

// Four 8x8 b16 matrices; lanes 8i .. 8i + 7 address the rows of matrix i.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* shared) {
#ifdef MOEREC_EMULATOR
  emu::ldmatrix_x4(r, shared, false);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(shared)));
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* shared) {
#ifdef MOEREC_EMULATOR
  emu::ldmatrix_x4(r, shared, true);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(shared)));
#endif
}

// d += a b for one m16n8k16 tile, f32 accumulate.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
#ifdef MOEREC_EMULATOR
  emu::mma_m16n8k16<__nv_bfloat16>(d, a, b0, b1);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef MOEREC_EMULATOR
  emu::mma_m16n8k16<__half>(d, a, b0, b1);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Exact bf16 pieces of an f32 value, for tensor-core products in f32
// arithmetic: x = pieces[0] + pieces[stride] + ... With `count` = 3 any f32
// is exact (24 significant bits, 8 per bf16 piece); an f16 value needs 2
// (11 bits), a bf16 value 1. Each bf16 x bf16 piece product is then exact in
// f32 and mma.sync sums them in f32. A non-finite value stays whole in the
// first piece (the rest are 0).
__device__ __forceinline__ void split_bf16_pieces(float x, __nv_bfloat16* pieces, uint32_t count, uint32_t stride) {
  float rest = x;
  for (uint32_t q = 0; q < count; ++q) {
    const __nv_bfloat16 piece = __float2bfloat16_rn(rest);
    pieces[q * stride] = piece;
    const float value = __bfloat162float(piece);
    rest = isfinite(value) ? rest - value : 0.0f;
  }
}

// Pieces split_bf16_pieces needs for an exact copy of a stored T.
template <typename T>
constexpr uint32_t kExactPieces = 3;
template <>
constexpr uint32_t kExactPieces<__nv_bfloat16> = 1;
template <>
constexpr uint32_t kExactPieces<__half> = 2;

}  // namespace moerec
