// Top-n of the fused gated scores (DESIGN 4.4) without materialising [B, V].
//
// The values ranked are those `scores` returns, computed by the same
// ranked_tile (scoring.cuh) on the same 64 x 64 tiles, so on one device topk
// is exactly the top-n of `scores`. Order: numbers before NaN, larger first,
// ties (and NaNs among themselves) to the lower id; -0 equals +0.
//
// Floor: the scores' FLOPs (M = 2 * B * V * H * D, twice for Probabilities
// mixing, whose lse pass runs first), reading X once per row tile; the
// selection itself is O(B * V) compares plus the insertions.
//
//   scoring_topk_check_history  the CSR history: offsets start at 0, never
//                               decrease and end at the number of ids; ids < V
//   scoring_topk_chunks_<T>     per (item chunk, row tile): the row's best
//                               min(n, chunk items) eligible items of the
//                               chunk, sorted, in global memory; per tile the
//                               values beating the row's bar are filtered in
//                               parallel and staged in shared memory, then
//                               inserted by one thread per row
//   scoring_topk_merge          one block per row: a candidate's rank among
//                               all chunks' candidates is the sum over the
//                               sorted lists of how many rank before it (a
//                               binary search each); rank < n is its output
//                               position. Fewer than n candidates in all means
//                               fewer than n eligible items (reported).
// The candidate set and its order are a total order's top-n, so the result
// is unique whatever the chunking.
#include "scoring.cuh"

namespace {
using namespace moerec_scoring;
typedef unsigned long long u64;

// Must equal MAX_TOPK_CHUNKS in src/ops/scoring/cuda.rs.
constexpr uint32_t kMaxTopkChunks = 256;

// Whether (a, a_id) ranks before (b, b_id).
__device__ __forceinline__ bool ranks_before(float a, uint32_t a_id, float b, uint32_t b_id) {
  const bool a_nan = isnan(a);
  const bool b_nan = isnan(b);
  if (a_nan != b_nan) return b_nan;
  if (!a_nan && a != b) return a > b;
  return a_id < b_id;
}

__device__ __forceinline__ uint32_t topk_capacity(const ScoringParams& p) {
  return min(p.n, p.topk_tiles_per_chunk * kTile);
}

// Whether v is in row b's history. The range is clamped to the ids, so a
// malformed history (reported by check_history) reads nothing out of bounds.
__device__ bool in_history(const ScoringParams& p, uint32_t b, uint32_t v) {
  if (p.history_offsets == nullptr) return false;
  const uint32_t begin = min(p.history_offsets[b], p.history_len);
  const uint32_t end = min(max(p.history_offsets[b + 1], begin), p.history_len);
  for (uint32_t i = begin; i < end; ++i) {
    if (p.history_ids[i] == v) return true;
  }
  return false;
}

__device__ void check_history(const ScoringParams& p) {
  for (u64 i = moerec::global_thread_index(); i <= p.batch; i += moerec::global_thread_count()) {
    const uint32_t offset = p.history_offsets[i];
    const bool bad = (i == 0 && offset != 0) || (i == p.batch && offset != p.history_len) ||
                     (i < p.batch && offset > p.history_offsets[i + 1]);
    if (bad) moerec::report_position(p.status, kHistoryOffsetsError);
  }
  for (u64 i = moerec::global_thread_index(); i < p.history_len; i += moerec::global_thread_count()) {
    if (p.history_ids[i] >= p.num_items) moerec::report_position(p.status, kHistoryIdError + i);
  }
}

// Inserts (x, v) into a sorted list of `count` (< capacity, or == capacity:
// the last entry drops) entries.
__device__ void insert_sorted(float* values, uint32_t* ids, uint32_t& count, uint32_t capacity, float x, uint32_t v) {
  uint32_t position = count < capacity ? count : capacity - 1;
  while (position > 0 && ranks_before(x, v, values[position - 1], ids[position - 1])) {
    values[position] = values[position - 1];
    ids[position] = ids[position - 1];
    --position;
  }
  values[position] = x;
  ids[position] = v;
  if (count < capacity) ++count;
}

// Per (item chunk, row tile): each row's best min(n, chunk items) eligible
// items of the chunk, sorted, in global memory. Every tile, all threads test
// their tile values in parallel against the row's bar (the list's last entry
// once the list is full) and the row's history, and stage the survivors in
// shared memory; then one thread per row inserts its staged survivors. The
// staging order depends on the atomics, but the list after a tile is the
// top-capacity of (list before + survivors) in a total order, so the result
// does not.
template <typename T>
__device__ void topk_chunks(const ScoringParams& p) {
  using Layout = TileLayout<T>;
  __shared__ TileStage<T> stage;
  __shared__ float staged_values[kTile][kTile];  // [row][survivor]
  __shared__ uint32_t staged_ids[kTile][kTile];
  __shared__ uint32_t staged_counts[kTile];
  __shared__ uint32_t list_counts[kTile];
  __shared__ float bar_values[kTile];
  __shared__ uint32_t bar_ids[kTile];
  const uint32_t chunk = blockIdx.x;
  const uint32_t row0 = blockIdx.y * kTile;
  const uint32_t capacity = topk_capacity(p);
  // Thread r < 64 keeps the list of row row0 + r.
  const uint32_t r = threadIdx.x;
  const uint32_t b = row0 + r;
  const bool keeper = r < kTile && b < p.batch;
  const u64 list = (static_cast<u64>(b) * p.topk_chunks + chunk) * capacity;
  float* values = p.candidate_values + list;
  uint32_t* ids = p.candidate_ids + list;
  if (r < kTile) {
    staged_counts[r] = 0;
    list_counts[r] = 0;
  }
  __syncthreads();
  const uint32_t begin = chunk * p.topk_tiles_per_chunk;
  const uint32_t end = min(p.item_tiles, begin + p.topk_tiles_per_chunk);
  float value[kValues];
  for (uint32_t tile = begin; tile < end; ++tile) {
    const uint32_t item0 = tile * kTile;
    ranked_tile<T>(p, stage, row0, item0, value);
#pragma unroll
    for (uint32_t e = 0; e < kValues; ++e) {
      const uint32_t row = Layout::row(e);
      const uint32_t v = item0 + Layout::col(e);
      if (row0 + row >= p.batch || v >= p.num_items || !eligible(p, v)) continue;
      if (list_counts[row] == capacity && !ranks_before(value[e], v, bar_values[row], bar_ids[row])) continue;
      if (in_history(p, row0 + row, v)) continue;
      const uint32_t slot = atomicAdd(&staged_counts[row], 1u);
      staged_values[row][slot] = value[e];
      staged_ids[row][slot] = v;
    }
    __syncthreads();
    if (keeper) {
      uint32_t count = list_counts[r];
      for (uint32_t s = 0; s < staged_counts[r]; ++s) {
        const float x = staged_values[r][s];
        const uint32_t v = staged_ids[r][s];
        // An earlier survivor of this tile may have raised the bar.
        if (count == capacity && !ranks_before(x, v, values[capacity - 1], ids[capacity - 1])) continue;
        insert_sorted(values, ids, count, capacity, x, v);
      }
      staged_counts[r] = 0;
      list_counts[r] = count;
      if (count == capacity) {
        bar_values[r] = values[capacity - 1];
        bar_ids[r] = ids[capacity - 1];
      }
    }
    __syncthreads();
  }
  if (keeper) p.candidate_counts[static_cast<u64>(b) * p.topk_chunks + chunk] = list_counts[r];
}

__device__ void topk_merge(const ScoringParams& p) {
  __shared__ uint32_t counts[kMaxTopkChunks];
  __shared__ u64 total;
  const uint32_t b = blockIdx.x;
  const uint32_t capacity = topk_capacity(p);
  const u64 lists = static_cast<u64>(b) * p.topk_chunks * capacity;
  const float* values = p.candidate_values + lists;
  const uint32_t* ids = p.candidate_ids + lists;
  for (uint32_t c = threadIdx.x; c < p.topk_chunks; c += blockDim.x) {
    counts[c] = p.candidate_counts[static_cast<u64>(b) * p.topk_chunks + c];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    u64 sum = 0;
    for (uint32_t c = 0; c < p.topk_chunks; ++c) sum += counts[c];
    total = sum;
  }
  __syncthreads();
  if (total < p.n) {
    // Every chunk kept all its eligible items, so `total` is the row's count.
    if (threadIdx.x == 0) moerec::report_position(p.status, kTooFewError + (static_cast<u64>(b) << 31) + total);
    return;
  }
  const u64 entries = static_cast<u64>(p.topk_chunks) * capacity;
  for (u64 e = threadIdx.x; e < entries; e += blockDim.x) {
    const uint32_t c = static_cast<uint32_t>(e / capacity);
    const uint32_t i = static_cast<uint32_t>(e % capacity);
    if (i >= counts[c]) continue;
    const float x = values[e];
    const uint32_t id = ids[e];
    u64 rank = i;
    for (uint32_t other = 0; other < p.topk_chunks && rank < p.n; ++other) {
      if (other == c) continue;
      // Entries of a sorted list that rank before (x, id) form a prefix.
      const u64 start = static_cast<u64>(other) * capacity;
      uint32_t low = 0;
      uint32_t high = counts[other];
      while (low < high) {
        const uint32_t mid = low + (high - low) / 2;
        if (ranks_before(values[start + mid], ids[start + mid], x, id)) {
          low = mid + 1;
        } else {
          high = mid;
        }
      }
      rank += low;
    }
    if (rank < p.n) {
      p.topk_ids[static_cast<u64>(b) * p.n + rank] = id;
      p.topk_values[static_cast<u64>(b) * p.n + rank] = x;
    }
  }
}
}  // namespace

extern "C" __global__ void __launch_bounds__(moerec::kBlockThreads) scoring_topk_check_history(const ScoringParams p) {
  check_history(p);
}
extern "C" __global__ void __launch_bounds__(moerec::kBlockThreads)
    scoring_topk_merge(const ScoringParams p) { topk_merge(p); }

#define MOEREC_SCORING_TOPK_KERNELS(suffix, T)                                                                 \
  extern "C" __global__ void __launch_bounds__(kThreads) scoring_topk_chunks_##suffix(const ScoringParams p) { \
    topk_chunks<T>(p);                                                                                         \
  }
MOEREC_FOR_EACH_FLOAT(MOEREC_SCORING_TOPK_KERNELS)
