// CUDA's device intrinsics on the emulator runtime (included by cuda_emu.h):
// barriers, warp collectives, atomics.
#pragma once

// ------------------------------------------------------ CUDA intrinsics
inline void __syncthreads() { emu::block_barrier(emu::BarrierKind::Sync, 0); }
inline int __syncthreads_count(int p) { return static_cast<int>(emu::block_barrier(emu::BarrierKind::Count, p)); }
inline int __syncthreads_and(int p) { return static_cast<int>(emu::block_barrier(emu::BarrierKind::And, p)); }
inline int __syncthreads_or(int p) { return static_cast<int>(emu::block_barrier(emu::BarrierKind::Or, p)); }

inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::warp_collective(emu::Op::Sync, mask, 0, 0, 0, 32); }

template <class T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  return emu::from_bits<T>(emu::warp_collective(emu::Op::ShflIdx, mask, emu::to_bits(var), sizeof(T), src_lane, width));
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return emu::from_bits<T>(
      emu::warp_collective(emu::Op::ShflUp, mask, emu::to_bits(var), sizeof(T), static_cast<int>(delta), width));
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return emu::from_bits<T>(
      emu::warp_collective(emu::Op::ShflDown, mask, emu::to_bits(var), sizeof(T), static_cast<int>(delta), width));
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  return emu::from_bits<T>(emu::warp_collective(emu::Op::ShflXor, mask, emu::to_bits(var), sizeof(T), lane_mask, width));
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return static_cast<unsigned>(emu::warp_collective(emu::Op::Ballot, mask, predicate != 0, 4, 0, 32));
}
inline int __any_sync(unsigned mask, int predicate) {
  return static_cast<int>(emu::warp_collective(emu::Op::Any, mask, predicate != 0, 4, 0, 32));
}
inline int __all_sync(unsigned mask, int predicate) {
  return static_cast<int>(emu::warp_collective(emu::Op::All, mask, predicate != 0, 4, 0, 32));
}
template <class T>
inline unsigned __match_any_sync(unsigned mask, T value) {
  return static_cast<unsigned>(emu::warp_collective(emu::Op::MatchAny, mask, emu::to_bits(value), sizeof(T), 0, 32));
}
template <class T>
inline unsigned __match_all_sync(unsigned mask, T value, int* pred) {
  const unsigned r = static_cast<unsigned>(emu::warp_collective(emu::Op::MatchAll, mask, emu::to_bits(value), sizeof(T), 0, 32));
  *pred = r != 0;
  return r;
}
inline unsigned __reduce_add_sync(unsigned mask, unsigned v) {
  return static_cast<unsigned>(emu::warp_collective(emu::Op::ReduceAdd, mask, v, 4, 0, 32));
}
inline int __reduce_add_sync(unsigned mask, int v) {
  return static_cast<int>(emu::warp_collective(emu::Op::ReduceAdd, mask, static_cast<uint32_t>(v), 4, 0, 32));
}
inline unsigned __reduce_min_sync(unsigned mask, unsigned v) {
  return static_cast<unsigned>(emu::warp_collective(emu::Op::ReduceMin, mask, v, 4, 0, 32));
}
inline int __reduce_min_sync(unsigned mask, int v) {
  return static_cast<int>(emu::warp_collective(emu::Op::ReduceMin, mask, static_cast<uint32_t>(v), 4, 1, 32));
}
inline unsigned __reduce_max_sync(unsigned mask, unsigned v) {
  return static_cast<unsigned>(emu::warp_collective(emu::Op::ReduceMax, mask, v, 4, 0, 32));
}
inline int __reduce_max_sync(unsigned mask, int v) {
  return static_cast<int>(emu::warp_collective(emu::Op::ReduceMax, mask, static_cast<uint32_t>(v), 4, 1, 32));
}
inline unsigned __reduce_and_sync(unsigned mask, unsigned v) {
  return static_cast<unsigned>(emu::warp_collective(emu::Op::ReduceAnd, mask, v, 4, 0, 32));
}
inline unsigned __reduce_or_sync(unsigned mask, unsigned v) {
  return static_cast<unsigned>(emu::warp_collective(emu::Op::ReduceOr, mask, v, 4, 0, 32));
}
inline unsigned __reduce_xor_sync(unsigned mask, unsigned v) {
  return static_cast<unsigned>(emu::warp_collective(emu::Op::ReduceXor, mask, v, 4, 0, 32));
}
// Which lanes are converged cannot be known here: every live lane of the warp.
inline unsigned __activemask() { return emu::active_mask(); }

// Atomics: one OS thread runs every fiber, so plain read-modify-write is atomic.
#define EMU_ATOMIC(name, expr)                   \
  template <class T, class U>                    \
  inline T name(T* address, U operand) {         \
    const T old = *address;                      \
    const T val = static_cast<T>(operand);       \
    *address = (expr);                           \
    return old;                                  \
  }
EMU_ATOMIC(atomicAdd, static_cast<T>(old + val))
EMU_ATOMIC(atomicSub, static_cast<T>(old - val))
EMU_ATOMIC(atomicExch, val)
EMU_ATOMIC(atomicMin, val < old ? val : old)
EMU_ATOMIC(atomicMax, val > old ? val : old)
EMU_ATOMIC(atomicAnd, static_cast<T>(old & val))
EMU_ATOMIC(atomicOr, static_cast<T>(old | val))
EMU_ATOMIC(atomicXor, static_cast<T>(old ^ val))
#undef EMU_ATOMIC
inline unsigned atomicInc(unsigned* address, unsigned limit) {
  const unsigned old = *address;
  *address = old >= limit ? 0 : old + 1;
  return old;
}
inline unsigned atomicDec(unsigned* address, unsigned limit) {
  const unsigned old = *address;
  *address = (old == 0 || old > limit) ? limit : old - 1;
  return old;
}
template <class T>
inline T atomicCAS(T* address, T compare, T value) {
  const T old = *address;
  if (old == compare) *address = value;
  return old;
}

inline long long clock64() {
  static long long ticks = 0;
  return ++ticks;
}
inline int clock() { return static_cast<int>(clock64()); }
[[noreturn]] inline void __trap() { emu::fail("__trap()"); }

// ---------------------------------------------- inline PTX, as plain C++
// The bodies of the kernels' one-instruction PTX wrappers under
// MOEREC_EMULATOR (emu/README.md, "Tensor cores and other inline PTX"): the
// instruction per lane, from the PTX ISA's fragment layouts.
namespace emu {

// cp.async.cg.shared.global [shared], [global], 16, src_size (16 or 0): the
// copy has landed when it returns, so commit_group / wait_group are no-ops.
// Both addresses must be 16-byte aligned, as on the GPU (a misaligned address
// error there; x86 would not notice).
inline void require_aligned_16(const void* address, const char* what) {
  if (reinterpret_cast<uintptr_t>(address) % 16 != 0) fail("%s: address %p is not 16-byte aligned", what, address);
}

inline void cp_async_16(void* shared, const void* global, unsigned src_size) {
  require_aligned_16(shared, "cp.async shared");
  require_aligned_16(global, "cp.async global");
  if (src_size == 16) {
    std::memcpy(shared, global, 16);
  } else {
    std::memset(shared, 0, 16);
  }
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8 i .. 8 i + 7 give
// the 16-byte rows of matrix i; lane l receives, in r[i], elements
// (l / 4, 2 (l % 4)) and (l / 4, 2 (l % 4) + 1) of matrix i (its transpose
// with .trans), the lower-numbered one in the low half.
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans) {
  require_aligned_16(row, "ldmatrix row");
  uint16_t mine[8];
  std::memcpy(mine, row, 16);
  uint16_t rows[32][8];
  warp_gather(mine, sizeof mine, rows);
  const unsigned l = (((threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x) + threadIdx.x) % 32;
  const unsigned g = l / 4, t = l % 4;
  for (unsigned i = 0; i < 4; ++i) {
    uint16_t lo, hi;
    if (trans) {
      lo = rows[8 * i + 2 * t][g];
      hi = rows[8 * i + 2 * t + 1][g];
    } else {
      lo = rows[8 * i + g][2 * t];
      hi = rows[8 * i + g][2 * t + 1];
    }
    r[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
}

inline float b16_to_f32(uint16_t bits, __nv_bfloat16*) { return __bfloat162float(__ushort_as_bfloat16(bits)); }
inline float b16_to_f32(uint16_t bits, __half*) { return __half2float(__ushort_as_half(bits)); }

// How an mma adds its 16 products to the accumulator. EMU_MMA=exact (the
// default): in k order, each addition rounded to nearest. EMU_MMA=truncate:
// as tensor cores may (their order and rounding are unspecified; measured
// parts align every term to the largest exponent, dropping the bits below
// 24 significant bits of that term, and truncate the sum): every term
// truncated toward zero at the f32 ulp of the largest term, the sum
// truncated toward zero to f32. Tests hold tensor-core results to what
// holds under both (DESIGN 6: the bf16/f16 tolerance).
inline bool mma_truncates() {
  static const bool truncate = [] {
    const char* mode = std::getenv("EMU_MMA");
    if (mode == nullptr || std::strcmp(mode, "exact") == 0) return false;
    if (std::strcmp(mode, "truncate") == 0) return true;
    std::fprintf(stderr, "emu: error: EMU_MMA=%s: expected exact or truncate\n", mode);
    std::abort();
  }();
  return truncate;
}

// acc + the sum of terms[0..n), the way mma_truncates() says.
inline float mma_accumulate(float acc, const float* terms, unsigned n) {
  bool finite = std::isfinite(acc);
  for (unsigned k = 0; k < n; ++k) finite = finite && std::isfinite(terms[k]);
  if (!mma_truncates() || !finite) {
    for (unsigned k = 0; k < n; ++k) acc += terms[k];
    return acc;
  }
  int top = std::ilogb(acc == 0.0f ? 0x1p-149f : acc);
  for (unsigned k = 0; k < n; ++k) {
    if (terms[k] != 0.0f) top = std::max(top, std::ilogb(terms[k]));
  }
  const double ulp = std::ldexp(1.0, top - 23);  // of the largest term
  double sum = std::trunc(static_cast<double>(acc) / ulp) * ulp;
  for (unsigned k = 0; k < n; ++k) sum += std::trunc(static_cast<double>(terms[k]) / ulp) * ulp;
  const float nearest = static_cast<float>(sum);
  // To f32 toward zero: step back when rounding went away from zero.
  if (std::fabs(static_cast<double>(nearest)) > std::fabs(sum)) return std::nextafter(nearest, 0.0f);
  return nearest;
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 d, a, b, d.
// Lane l = 4 g + t holds A's {a0, a1, a2, a3} = (row g, k 2t..2t+1),
// (row g + 8, k 2t..), (row g, k 2t + 8..), (row g + 8, k 2t + 8..); B's
// {b0, b1} = (k 2t..2t+1, col g), (k 2t + 8.., col g); D's {d0..d3} =
// (row g, col 2t, 2t + 1), (row g + 8, col 2t, 2t + 1). The products are exact
// in f32; mma_accumulate adds them.
template <class T>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const uint32_t mine[6] = {a[0], a[1], a[2], a[3], b0, b1};
  uint32_t all[32][6];
  warp_gather(mine, sizeof mine, all);
  const unsigned l = (((threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x) + threadIdx.x) % 32;
  const unsigned g = l / 4, t = l % 4;
  auto half_of = [](uint32_t word, unsigned k) { return static_cast<uint16_t>(k % 2 ? word >> 16 : word); };
  auto a_at = [&](unsigned row, unsigned k) {
    const uint32_t word = all[4 * (row % 8) + (k % 8) / 2][(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)];
    return b16_to_f32(half_of(word, k), static_cast<T*>(nullptr));
  };
  auto b_at = [&](unsigned k, unsigned col) {
    const uint32_t word = all[4 * col + (k % 8) / 2][4 + (k >= 8 ? 1 : 0)];
    return b16_to_f32(half_of(word, k), static_cast<T*>(nullptr));
  };
  for (unsigned q = 0; q < 4; ++q) {
    const unsigned row = g + (q >= 2 ? 8 : 0), col = 2 * t + (q & 1);
    float products[16];
    for (unsigned k = 0; k < 16; ++k) products[k] = a_at(row, k) * b_at(k, col);
    d[q] = mma_accumulate(d[q], products, 16);
  }
}

}  // namespace emu
