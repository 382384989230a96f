// Grouping primitive (DESIGN 2): a stable sort of (key, position) pairs by an
// integer key, digit by digit, each digit a histogram, an exclusive scan and a
// stable placement -- all integer work, so the result is the same on every
// run and every device. The lookup backward groups token positions by id with
// it; the routing plan groups dispatched rows by expert.
//
// Cost per 8-bit digit: read keys twice and positions once, write both once
// (~20 B per key) plus a histogram of 256 counts per tile. A key bound of B
// takes ceil(log2(B) / 8) digits: one for E <= 256 experts, three for a
// catalog of 10^6 items.
//
// Kernels (all launched by src/grouping/cuda.rs):
//   grouping_iota              positions 0..n, the values of the first digit
//   grouping_digit_histogram   per-tile digit counts, bin-major
//   grouping_digit_scatter     stable placement of one digit
//   scan_exclusive_tiles       exclusive scan of each tile + tile totals
//   scan_add_tile_offsets      adds the scanned totals back
//   grouping_segment_heads     1 where a run of equal keys starts
//   grouping_segment_write     unique keys, run starts and their count
#include "common.cuh"

namespace {
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kItems = 8;
constexpr int kTile = kThreads * kItems;  // keys per block, for every kernel here
constexpr int kDigitBits = 8;
constexpr uint32_t kBins = 1u << kDigitBits;

__device__ __forceinline__ uint32_t digit_of(uint32_t key, uint32_t shift) {
  return (key >> shift) & (kBins - 1);
}
__device__ __forceinline__ unsigned long long tile_base() {
  return static_cast<unsigned long long>(blockIdx.x) * kTile;
}
}  // namespace

extern "C" __global__ void __launch_bounds__(moerec::kBlockThreads) grouping_iota(uint32_t* positions, uint32_t n) {
  for (unsigned long long i = moerec::global_thread_index(); i < n; i += moerec::global_thread_count()) {
    positions[i] = static_cast<uint32_t>(i);
  }
}

// Counts each digit in each tile. `hist` is bin-major, hist[bin * tiles + tile],
// so its exclusive scan is, for every (bin, tile), the first destination of that
// tile's keys with that digit.
extern "C" __global__ void __launch_bounds__(kThreads)
    grouping_digit_histogram(const uint32_t* keys, uint32_t n, uint32_t shift,
                             uint32_t* hist) {
  __shared__ uint32_t counts[kBins];
  for (uint32_t b = threadIdx.x; b < kBins; b += kThreads) counts[b] = 0;
  __syncthreads();
  for (int r = 0; r < kItems; ++r) {
    unsigned long long i = tile_base() + r * kThreads + threadIdx.x;
    // Integer shared atomics: the counts do not depend on their order.
    if (i < n) atomicAdd(&counts[digit_of(keys[i], shift)], 1u);
  }
  __syncthreads();
  for (uint32_t b = threadIdx.x; b < kBins; b += kThreads) hist[b * gridDim.x + blockIdx.x] = counts[b];
}

// Places the tile's keys (and their positions) at their digit's destination,
// keeping the input order among equal digits: keys are taken in rounds of one
// per thread, ranked inside the warp with __match_any_sync, then across warps
// from per-warp counts, then across rounds from a running count per digit.
extern "C" __global__ void __launch_bounds__(kThreads)
    grouping_digit_scatter(const uint32_t* keys_in, const uint32_t* positions_in,
                           uint32_t n, uint32_t shift, const uint32_t* tile_offsets,
                           uint32_t* keys_out, uint32_t* positions_out) {
  __shared__ uint32_t next_of_digit[kBins];
  __shared__ uint32_t warp_counts[kWarps][kBins];
  const uint32_t lane = threadIdx.x & 31;
  const uint32_t warp = threadIdx.x >> 5;
  const uint32_t lanes_below = (1u << lane) - 1;
  for (uint32_t b = threadIdx.x; b < kBins; b += kThreads) {
    next_of_digit[b] = tile_offsets[b * gridDim.x + blockIdx.x];
  }
  for (int r = 0; r < kItems; ++r) {
    for (uint32_t c = threadIdx.x; c < kWarps * kBins; c += kThreads) (&warp_counts[0][0])[c] = 0;
    __syncthreads();
    const unsigned long long i = tile_base() + r * kThreads + threadIdx.x;
    const bool valid = i < n;
    const uint32_t key = valid ? keys_in[i] : 0;
    const uint32_t digit = valid ? digit_of(key, shift) : kBins;  // kBins: matches no real digit
    const uint32_t peers = __match_any_sync(0xffffffffu, digit);
    const uint32_t rank = __popc(peers & lanes_below);
    if (valid && rank == 0) warp_counts[warp][digit] = __popc(peers);
    __syncthreads();
    if (valid) {
      uint32_t dest = next_of_digit[digit] + rank;
      for (uint32_t w = 0; w < warp; ++w) dest += warp_counts[w][digit];
      keys_out[dest] = key;
      positions_out[dest] = positions_in[i];
    }
    __syncthreads();
    for (uint32_t b = threadIdx.x; b < kBins; b += kThreads) {
      uint32_t round_count = 0;
      for (uint32_t w = 0; w < kWarps; ++w) round_count += warp_counts[w][b];
      next_of_digit[b] += round_count;
    }
    __syncthreads();
  }
}

// Exclusive scan of one tile, in place (each thread reads its own elements
// before it writes them), and the tile's total for the next level.
extern "C" __global__ void __launch_bounds__(kThreads)
    scan_exclusive_tiles(uint32_t* data, uint32_t n, uint32_t* tile_totals) {
  __shared__ uint32_t warp_sums[kWarps];
  const uint32_t lane = threadIdx.x & 31;
  const uint32_t warp = threadIdx.x >> 5;
  const unsigned long long first = tile_base() + static_cast<unsigned long long>(threadIdx.x) * kItems;
  uint32_t values[kItems];
  uint32_t thread_sum = 0;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    values[j] = first + j < n ? data[first + j] : 0;
    thread_sum += values[j];
  }
  uint32_t inclusive = thread_sum;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const uint32_t below = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += below;
  }
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    uint32_t w = lane < kWarps ? warp_sums[lane] : 0;
#pragma unroll
    for (int offset = 1; offset < kWarps; offset <<= 1) {
      const uint32_t below = __shfl_up_sync(0xffffffffu, w, offset);
      if (lane >= offset) w += below;
    }
    if (lane < kWarps) warp_sums[lane] = w;
  }
  __syncthreads();
  uint32_t running = (warp > 0 ? warp_sums[warp - 1] : 0) + inclusive - thread_sum;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    if (first + j < n) data[first + j] = running;
    running += values[j];
  }
  if (threadIdx.x == kThreads - 1) tile_totals[blockIdx.x] = warp_sums[kWarps - 1];
}

extern "C" __global__ void __launch_bounds__(kThreads)
    scan_add_tile_offsets(uint32_t* data, uint32_t n, const uint32_t* tile_offsets) {
  const uint32_t offset = tile_offsets[blockIdx.x];
  for (int j = 0; j < kItems; ++j) {
    const unsigned long long i = tile_base() + j * kThreads + threadIdx.x;
    if (i < n) data[i] += offset;
  }
}

// `sentinel_key` (the largest key, or none when >= every key) marks entries that
// belong to no segment; they sort last.
__device__ __forceinline__ bool starts_segment(const uint32_t* sorted_keys, unsigned long long i,
                                               uint32_t sentinel_key) {
  const uint32_t key = sorted_keys[i];
  return key != sentinel_key && (i == 0 || sorted_keys[i - 1] != key);
}

extern "C" __global__ void __launch_bounds__(moerec::kBlockThreads)
    grouping_segment_heads(const uint32_t* sorted_keys, uint32_t n, uint32_t sentinel_key,
                           uint32_t* heads, uint32_t* segment_starts,
                           uint32_t* segment_count) {
  const unsigned long long first = moerec::global_thread_index();
  // Defaults for a list with no segment at all; grouping_segment_write
  // overwrites both when there is one.
  if (first == 0) {
    *segment_count = 0;
    segment_starts[0] = 0;
  }
  for (unsigned long long i = first; i < n; i += moerec::global_thread_count()) {
    heads[i] = starts_segment(sorted_keys, i, sentinel_key) ? 1u : 0u;
  }
}

// `head_ranks` is the exclusive scan of the heads: the segment index of each
// head. The last non-sentinel entry closes the last segment.
extern "C" __global__ void __launch_bounds__(moerec::kBlockThreads)
    grouping_segment_write(const uint32_t* sorted_keys, const uint32_t* head_ranks,
                           uint32_t n, uint32_t sentinel_key, uint32_t* segment_keys,
                           uint32_t* segment_starts, uint32_t* segment_count) {
  for (unsigned long long i = moerec::global_thread_index(); i < n; i += moerec::global_thread_count()) {
    const uint32_t key = sorted_keys[i];
    if (key == sentinel_key) continue;
    const bool head = starts_segment(sorted_keys, i, sentinel_key);
    const uint32_t rank = head_ranks[i];
    if (head) {
      segment_keys[rank] = key;
      segment_starts[rank] = static_cast<uint32_t>(i);
    }
    if (i + 1 == n || sorted_keys[i + 1] == sentinel_key) {
      const uint32_t count = rank + (head ? 1u : 0u);
      segment_starts[count] = static_cast<uint32_t>(i + 1);
      *segment_count = count;
    }
  }
}
