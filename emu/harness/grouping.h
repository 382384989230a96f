// src/grouping/cuda.rs on the emulator: the same buffers, launch
// configurations and kernel order (iota; per 8-bit digit: histogram ->
// exclusive scan -> scatter; then segment heads -> scan -> segment write).
#pragma once
#include <optional>
#include <utility>

#include "device.h"
#include "kernels.h"

namespace harness {

constexpr uint64_t kGroupingTile = 2048;  // TILE
constexpr uint32_t kDigitBits = 8;        // DIGIT_BITS
constexpr uint64_t kBins = 1ull << kDigitBits;

// grouping::key_bits
inline uint32_t key_bits(uint64_t key_bound) {
  const uint64_t top = key_bound == 0 ? 0 : key_bound - 1;
  return 64 - (top == 0 ? 64 : __builtin_clzll(top));
}

struct DeviceGroups {
  DeviceBuffer<uint32_t> order;   // n
  DeviceBuffer<uint32_t> keys;    // n, the first `count` valid
  DeviceBuffer<uint32_t> starts;  // n + 1, the first `count + 1` valid
  DeviceBuffer<uint32_t> count;   // 1
  DeviceBuffer<uint32_t> sorted;  // n (not returned by the Rust function; kept for the tests)
};

// scan_exclusive: tiles, then the tile totals recursively, then the totals added back.
inline void scan_exclusive(DeviceBuffer<uint32_t>& data) {
  const uint32_t n = u32_arg("scan", data.len());
  if (n == 0) return;
  const emu::LaunchConfig config = tiled_config(n, kGroupingTile);
  DeviceBuffer<uint32_t> totals = alloc_uninit<uint32_t>(config.grid.x);
  EMU_LAUNCH(scan_exclusive_tiles, config, data.ptr(), n, totals.ptr());
  if (config.grid.x > 1) {
    scan_exclusive(totals);
    EMU_LAUNCH(scan_add_tile_offsets, config, data.ptr(), n, static_cast<const uint32_t*>(totals.ptr()));
  }
}

// stable_sort_by_key: (sorted keys, positions in sorted order).
inline std::pair<DeviceBuffer<uint32_t>, DeviceBuffer<uint32_t>> stable_sort_by_key(const uint32_t* keys, size_t len,
                                                                                  uint64_t key_bound) {
  const uint32_t n = static_cast<uint32_t>(len);
  const emu::LaunchConfig tiles_config = tiled_config(n, kGroupingTile);
  const uint64_t tiles = tiles_config.grid.x;
  DeviceBuffer<uint32_t> sorted = alloc_uninit<uint32_t>(n);
  DeviceBuffer<uint32_t> order = alloc_uninit<uint32_t>(n);
  DeviceBuffer<uint32_t> sorted_next = alloc_uninit<uint32_t>(n);
  DeviceBuffer<uint32_t> order_next = alloc_uninit<uint32_t>(n);
  DeviceBuffer<uint32_t> hist = alloc_uninit<uint32_t>(kBins * tiles);
  if (n > 0) std::memcpy(sorted.ptr(), keys, n * sizeof(uint32_t));  // memcpy_dtod
  EMU_LAUNCH(grouping_iota, grid_stride_config(n), order.ptr(), n);
  for (uint32_t shift = 0; shift < std::max(key_bits(key_bound), 1u); shift += kDigitBits) {
    EMU_LAUNCH(grouping_digit_histogram, tiles_config, static_cast<const uint32_t*>(sorted.ptr()), n, shift,
               hist.ptr());
    scan_exclusive(hist);
    EMU_LAUNCH(grouping_digit_scatter, tiles_config, static_cast<const uint32_t*>(sorted.ptr()),
               static_cast<const uint32_t*>(order.ptr()), n, shift, static_cast<const uint32_t*>(hist.ptr()),
               sorted_next.ptr(), order_next.ptr());
    std::swap(sorted, sorted_next);
    std::swap(order, order_next);
  }
  return {std::move(sorted), std::move(order)};
}

// group_by_key: positions of `keys` (each < key_bound) grouped by key; entries
// equal to `sentinel`, the largest key, belong to no group.
inline DeviceGroups group_by_key(const uint32_t* keys, size_t len, uint64_t key_bound, std::optional<uint32_t> sentinel) {
  const uint32_t n = u32_arg("keys", len);
  auto [sorted_keys, order] = stable_sort_by_key(keys, len, key_bound);
  DeviceBuffer<uint32_t> heads = alloc_uninit<uint32_t>(n);
  DeviceBuffer<uint32_t> group_keys = alloc_uninit<uint32_t>(n);
  DeviceBuffer<uint32_t> starts = alloc_uninit<uint32_t>(static_cast<size_t>(n) + 1);
  DeviceBuffer<uint32_t> count = alloc_uninit<uint32_t>(1);
  const uint32_t sentinel_key = sentinel.value_or(0xffffffffu);
  EMU_LAUNCH(grouping_segment_heads, grid_stride_config(n), static_cast<const uint32_t*>(sorted_keys.ptr()), n,
             sentinel_key, heads.ptr(), starts.ptr(), count.ptr());
  scan_exclusive(heads);
  EMU_LAUNCH(grouping_segment_write, grid_stride_config(n), static_cast<const uint32_t*>(sorted_keys.ptr()),
             static_cast<const uint32_t*>(heads.ptr()), n, sentinel_key, group_keys.ptr(), starts.ptr(), count.ptr());
  return DeviceGroups{std::move(order), std::move(group_keys), std::move(starts), std::move(count),
                      std::move(sorted_keys)};
}

}  // namespace harness
