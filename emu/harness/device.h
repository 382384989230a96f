// Device memory and launch helpers of the harness, mirroring the Rust side:
// src/cuda/mod.rs (grid_stride_config, tiled_config, the status word),
// src/tensor.rs (alloc_uninit, alloc_zeros) and src/ops/mod.rs (check_len,
// u32_arg). Errors the Rust code returns are thrown as OpError.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "../cuda_emu.h"

namespace harness {

constexpr uint64_t kStatusClean = ~0ull;  // STATUS_CLEAN
constexpr uint32_t kBlockThreads = 256;   // BLOCK_THREADS
constexpr uint64_t kMaxGridBlocks = 65535;

// An Err of the Rust op: its variant and what it names.
struct OpError {
  std::string kind;  // "IndexOutOfRange", "InvalidArgument", "NonFinite", "ShapeMismatch"
  std::string message;
  uint64_t position = 0;
  uint64_t index = 0;
  uint64_t row = 0;
  uint64_t column = 0;
};

inline OpError invalid(const std::string& argument, const std::string& message) {
  return OpError{"InvalidArgument", argument + ": " + message};
}

// Host-side mirror of a CudaSlice: exactly `len` elements (so AddressSanitizer
// sees every access past the end), 256-byte aligned like cuMemAlloc.
template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t len) : len_(len) {
    if (len == 0) return;
    void* p = nullptr;
    if (posix_memalign(&p, 256, len * sizeof(T)) != 0) throw std::bad_alloc();
    ptr_ = static_cast<T*>(p);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), len_(o.len_) {
    o.ptr_ = nullptr;
    o.len_ = 0;
  }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(len_, o.len_);
    return *this;
  }
  ~DeviceBuffer() { std::free(ptr_); }

  T* ptr() { return ptr_; }
  const T* ptr() const { return ptr_; }
  size_t len() const { return len_; }
  T& operator[](size_t i) { return ptr_[i]; }
  const T& operator[](size_t i) const { return ptr_[i]; }
  // clone_dtoh of the first n elements (all by default).
  std::vector<T> to_host(size_t n = ~size_t{0}) const {
    n = std::min(n, len_);
    return std::vector<T>(ptr_, ptr_ + n);
  }

 private:
  T* ptr_ = nullptr;
  size_t len_ = 0;
};

// What alloc_uninit leaves in memory: a value no kernel writes on purpose
// (NaN for floats), so a missing write shows.
template <class T>
T poison_value() {
  if constexpr (std::is_same<T, float>::value) return __uint_as_float(0x7fc0deadu);
  else if constexpr (std::is_same<T, __nv_bfloat16>::value) return __ushort_as_bfloat16(0x7fde);
  else if constexpr (std::is_same<T, __half>::value) return __ushort_as_half(0x7ead);
  else if constexpr (sizeof(T) == 8) return static_cast<T>(0xdeadbeefdeadbeefull);
  else if constexpr (sizeof(T) == 4) return static_cast<T>(0xdeadbeefu);
  else return static_cast<T>(0xbeef);
}

template <class T>
DeviceBuffer<T> alloc_uninit(size_t len) {
  DeviceBuffer<T> b(len);
  for (size_t i = 0; i < len; ++i) b[i] = poison_value<T>();
  return b;
}
template <class T>
DeviceBuffer<T> alloc_zeros(size_t len) {
  DeviceBuffer<T> b(len);
  if (len) std::memset(static_cast<void*>(b.ptr()), 0, len * sizeof(T));
  return b;
}
template <class T>
DeviceBuffer<T> clone_htod(const std::vector<T>& host) {
  DeviceBuffer<T> b(host.size());
  if (!host.empty()) std::memcpy(static_cast<void*>(b.ptr()), host.data(), host.size() * sizeof(T));
  return b;
}
// A device copy of host data that holds raw element bits (bf16/f16 as u16).
template <class T, class Bits>
DeviceBuffer<T> clone_bits_htod(const std::vector<Bits>& host) {
  static_assert(sizeof(T) == sizeof(Bits), "element and bits differ in size");
  DeviceBuffer<T> b(host.size());
  if (!host.empty()) std::memcpy(static_cast<void*>(b.ptr()), host.data(), host.size() * sizeof(T));
  return b;
}
template <class Bits, class T>
std::vector<Bits> bits_of(const DeviceBuffer<T>& b) {
  static_assert(sizeof(T) == sizeof(Bits), "element and bits differ in size");
  std::vector<Bits> v(b.len());
  if (!v.empty()) std::memcpy(v.data(), static_cast<const void*>(b.ptr()), v.size() * sizeof(T));
  return v;
}

// CudaDevice::new_status: one u64 holding STATUS_CLEAN.
inline DeviceBuffer<unsigned long long> new_status() { return clone_htod(std::vector<unsigned long long>{kStatusClean}); }

inline emu::LaunchConfig grid_stride_config(uint64_t items) {
  const uint64_t blocks = std::min(std::max<uint64_t>((items + kBlockThreads - 1) / kBlockThreads, 1), kMaxGridBlocks);
  return emu::LaunchConfig{dim3(static_cast<unsigned>(blocks)), dim3(kBlockThreads), 0};
}

inline emu::LaunchConfig tiled_config(uint64_t items, uint64_t tile) {
  const uint64_t blocks = std::max<uint64_t>((items + tile - 1) / tile, 1);
  if (blocks >= 0x7fffffffull) throw invalid("size", std::to_string(items) + " items need more than 2^31 blocks");
  return emu::LaunchConfig{dim3(static_cast<unsigned>(blocks)), dim3(kBlockThreads), 0};
}

inline uint32_t u32_arg(const std::string& argument, uint64_t value) {
  if (value > 0xffffffffull) throw invalid(argument, std::to_string(value) + " does not fit in u32");
  return static_cast<uint32_t>(value);
}

inline void check_len(const std::string& argument, size_t actual, size_t expected) {
  if (actual != expected) {
    throw OpError{"ShapeMismatch", argument + ": expected " + std::to_string(expected) + " elements, got " +
                                       std::to_string(actual)};
  }
}

}  // namespace harness
