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
