// Shared device code of the scoring kernels (scoring.cu, scoring_topk.cu):
// the one parameter block every scoring kernel takes, the tiled f32 score
// tile, and the small per-element helpers both files must compute bit for bit
// the same way (so that topk ranks exactly the values `scores` returns).
//
// The mixing collapses to GEMMs over a prepared user matrix A [B, heads_out*K]
// (f32, written by scoring_mixed_user):
//   Logits, per-head tables  heads_out = 1, K = H*D, A[b, h*D+d] = scale*g[b,h]*U[b,h,d],
//                            item element (v, k) = X[k / D, v, k % D]
//   Logits, shared table     heads_out = 1, K = D,   A[b, d] = sum_h scale*g[b,h]*U[b,h,d]
//   Probabilities            heads_out = H, K = D,   A[b, j*D+d] = scale*U[b,j,d],
//                            item element of head j (v, k) = X[j or 0, v, k]
// so that the GEMM output plus item_bias[v] is S[b, v] (Logits) or s_j[b, v]
// (Probabilities).
#pragma once
#include <type_traits>

#include "mma.cuh"

namespace moerec_scoring {

// Must match `Params` in src/ops/scoring/cuda.rs field by field: pointers
// first (8 bytes each), then 32-bit sizes, padded to a multiple of 8 bytes.
// Unused pointers are null.
struct ScoringParams {
  const void* user;                  // T [B, H, D]
  const void* gate_logits;           // T [B, H]
  const void* items;                 // T [H, V, D] or [V, D]
  const float* item_bias;            // [V], null without a bias
  const uint32_t* excluded;          // [num_excluded]
  const uint32_t* targets;           // [B] (cross-entropy)
  const float* dscores;              // [B, V] (scores backward)
  const float* dloss;                // [B] (cross-entropy backward)
  const uint32_t* history_offsets;   // [B + 1] (topk)
  const uint32_t* history_ids;       // [history_len] (topk)
  uint8_t* excluded_flags;           // [V], 1 = excluded
  float* gates;                      // [B, H], g = softmax_h G
  float* log_gates;                  // [B, H]
  float* mixed_user;                 // A [B, a_width]
  float2* row_partials;              // [heads_out, B, reduce_chunks] (max, sum) per item chunk
  float* row_lse;                    // [B, heads_out]
  float* row_coef;                   // [B, heads_out]
  float* row_weight;                 // [B]
  uint32_t* row_target;              // [B]
  float* target_logits;              // [B, heads_out] (cross-entropy: forward output, backward input)
  float* user_partials;              // [user_chunks, B, a_width]
  float* bias_partials;              // [user_chunks, B]
  float* out;                        // scores [B, V] or loss [B]
  float* d_user;                     // [B, H, D]
  float* d_gates;                    // [B, H]
  float* d_items;                    // layout of X
  float* d_bias;                     // [V]
  float* candidate_values;           // [B, topk_chunks, n] (topk)
  uint32_t* candidate_ids;           // [B, topk_chunks, n] (topk)
  uint32_t* candidate_counts;        // [B, topk_chunks] (topk)
  uint32_t* topk_ids;                // [B, n]
  float* topk_values;                // [B, n]
  unsigned long long* status;        // the data-error status word
  uint32_t batch;                    // B
  uint32_t heads;                    // H
  uint32_t width;                    // D
  uint32_t num_items;                // V
  uint32_t num_excluded;
  uint32_t k;                        // K, the GEMM depth of one output head
  uint32_t a_width;                  // heads_out * K
  uint32_t heads_out;                // 1 (Logits) or H (Probabilities)
  uint32_t row_tiles;                // ceil(B / 64)
  uint32_t item_tiles;               // ceil(V / 64)
  uint32_t reduce_chunks;            // item chunks of the row reductions
  uint32_t reduce_tiles_per_chunk;
  uint32_t user_chunks;              // item chunks of the dA partials
  uint32_t user_tiles_per_chunk;
  uint32_t k_slices;                 // ceil(K / 64)
  uint32_t group_slices;             // K slices per backward block
  uint32_t k_groups;                 // ceil(k_slices / group_slices)
  uint32_t flags;                    // kProbabilities | kShared | ...
  uint32_t ignore;                   // the ignored target (with kIgnore)
  uint32_t history_len;
  uint32_t n;                        // topk
  uint32_t topk_chunks;
  uint32_t topk_tiles_per_chunk;
  float scale;
};
static_assert(sizeof(ScoringParams) == 33 * 8 + 24 * 4, "ScoringParams must match the Rust Params");

constexpr uint32_t kProbabilities = 1;  // Probabilities mixing (else Logits)
constexpr uint32_t kShared = 2;         // one [V, D] table for every head
constexpr uint32_t kCrossEntropy = 4;   // targets: the backward's upstream is dloss (else dscores)
constexpr uint32_t kIgnore = 8;         // `ignore` holds an ignored target id
constexpr uint32_t kReduceDot = 16;     // row reduction: sum_v q * dS (else log-sum-exp)

constexpr uint32_t kTile = 64;  // rows and items of a score tile
constexpr uint32_t kStep = 16;  // K staged through shared memory per step
constexpr uint32_t kThreads = 256;
constexpr uint32_t kPad = kTile + 1;  // row pitch of the shared tiles
constexpr uint32_t kPerThread = 4;    // a thread owns 4 x 4 outputs of a 64 x 64 tile
constexpr uint32_t kLanes = 16;       // threads sharing a tile row (one half-warp)

// row_target of an ignored (or rejected) cross-entropy row; of a scores-backward row.
constexpr uint32_t kInactive = 0xffffffffu;
constexpr uint32_t kNoTarget = 0xfffffffeu;

// Status codes: the lowest wins (atomicMin), so the order below is the order
// in which the CPU checks. Excluded ids report their position; targets
// 2 * row + kind; topk histories a single code for malformed offsets, then
// the position of an id >= V, then the row with too few eligible items.
constexpr unsigned long long kHistoryOffsetsError = 1ull << 60;
constexpr unsigned long long kHistoryIdError = kHistoryOffsetsError + 1;
constexpr unsigned long long kTargetError = 1ull << 61;
constexpr unsigned long long kTooFewError = 1ull << 62;

__device__ __forceinline__ bool has(const ScoringParams& p, uint32_t flag) { return (p.flags & flag) != 0; }

__device__ __forceinline__ bool eligible(const ScoringParams& p, uint32_t v) {
  return v < p.num_items && p.excluded_flags[v] == 0;
}

__device__ __forceinline__ float bias_of(const ScoringParams& p, uint32_t v) {
  return p.item_bias != nullptr ? p.item_bias[v] : 0.0f;
}

// Offset in X (and dX) of item element (v, k) of output head j.
__device__ __forceinline__ unsigned long long item_offset(const ScoringParams& p, uint32_t j, uint32_t v,
                                                          uint32_t k) {
  uint32_t table = has(p, kShared) ? 0 : j;
  uint32_t d = k;
  if (!has(p, kProbabilities) && !has(p, kShared)) {
    table = k / p.width;
    d = k - table * p.width;
  }
  return (static_cast<unsigned long long>(table) * p.num_items + v) * p.width + d;
}

// Online log-sum-exp as the CPU's LogSumExp: -inf terms are skipped, NaN
// propagates through the sum.
struct LogSumExp {
  float max;
  float sum;
};
__device__ __forceinline__ LogSumExp lse_empty() { return LogSumExp{-INFINITY, 0.0f}; }
__device__ __forceinline__ void lse_push(LogSumExp& l, float x) {
  if (x == -INFINITY) return;
  if (x > l.max) {
    l.sum = l.sum * expf(l.max - x) + 1.0f;
    l.max = x;
  } else {
    l.sum += expf(x - l.max);
  }
}
// exp(from - to) for to = max(from, ...), exact 1 when equal (also for
// infinities, whose difference would be NaN).
__device__ __forceinline__ float rescale(float from, float to) { return from == to ? 1.0f : expf(from - to); }
__device__ __forceinline__ LogSumExp lse_merge(LogSumExp a, LogSumExp b) {
  const float max = fmaxf(a.max, b.max);
  return LogSumExp{max, a.sum * rescale(a.max, max) + b.sum * rescale(b.max, max)};
}
__device__ __forceinline__ float lse_value(LogSumExp l) { return l.max == -INFINITY ? -INFINITY : l.max + logf(l.sum); }

// The probability-mixing accumulation P += g * exp(s - lse), one definition
// for `scores` and `topk`.
__device__ __forceinline__ float mix_probability(float mixed, float gate, float logit, float lse) {
  return fmaf(gate, expf(logit - lse), mixed);
}

// ---------------------------------------------------------------- score tiles
//
// A score tile is the GEMM output of output head j for 64 rows x 64 items,
// before the item bias: S - bias (Logits) or s_j - bias (Probabilities). Each
// of the 256 threads holds kValues of it; TileLayout<T> says where they lie.
// Two engines compute it:
//   f32        SIMT over the prepared operand A (mixed_user), K in steps of
//              16 through shared memory; thread (ty, tx) = (tid / 16, tid % 16)
//              owns rows ty + 16 i and items tx + 16 jj (value 4 i + jj).
//   bf16/f16   tensor cores (mma.sync m16n8k16, f32 accumulation) on the raw
//              U and X, one GEMM of depth D per head, then the f32 mixing:
//              sum_h (scale g[b, h]) acc_h for Logits, scale acc_j for
//              Probabilities. The bf16/f16 products are exact in f32 and
//              accumulate in f32, in the order and with the rounding of the
//              hardware (DESIGN 6); folding scale * g into a bf16 operand
//              would round it. Warp w owns rows
//              16 (w % 4) .. + 15 and items 32 (w / 4) .. + 31, four m16n8
//              tiles: value 4 nt + c of lane (g, q) = (lane / 4, lane % 4) is
//              row g + 8 (c / 2), item 8 nt + 2 q + c % 2 of the warp's block.
// Rows >= B, items >= V and k >= K read zeros. Both are deterministic; the
// engines differ by rounding only (within DESIGN's tolerance).

constexpr uint32_t kValues = 16;  // tile values per thread

template <typename T>
constexpr bool kTensorCores = !std::is_same<T, float>::value;

template <typename T>
struct TileLayout {
  static constexpr uint32_t kRows = kTensorCores<T> ? 2 : 4;     // distinct rows per thread
  static constexpr uint32_t kOwners = kTensorCores<T> ? 8 : 16;  // threads sharing one row
  // Tile row of the thread's row slot i (< kRows), and the slot of value e.
  __device__ static __forceinline__ uint32_t row_at(uint32_t i) {
    if constexpr (kTensorCores<T>) {
      const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
      return 16 * (warp % 4) + lane / 4 + 8 * i;
    } else {
      return threadIdx.x / kLanes + kLanes * i;
    }
  }
  __device__ static __forceinline__ uint32_t slot(uint32_t e) { return kTensorCores<T> ? (e % 4) / 2 : e / 4; }
  __device__ static __forceinline__ uint32_t row(uint32_t e) { return row_at(slot(e)); }
  __device__ static __forceinline__ uint32_t col(uint32_t e) {
    if constexpr (kTensorCores<T>) {
      const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
      return 32 * (warp / 4) + 8 * (e / 4) + 2 * (lane % 4) + e % 2;
    } else {
      return threadIdx.x % kLanes + kLanes * (e % 4);
    }
  }
  // This thread's place (< kOwners) among the threads that hold a row.
  __device__ static __forceinline__ uint32_t owner() {
    if constexpr (kTensorCores<T>) {
      return 4 * (threadIdx.x / 128) + threadIdx.x % 4;
    } else {
      return threadIdx.x % kLanes;
    }
  }
};

// Shared-memory stage of the f32 engine.
struct SimtStage {
  float a[kStep][kPad];  // A[row0 + r, j*K + k0 + kk] at [kk][r]
  float x[kStep][kPad];  // item element (item0 + c, k0 + kk) at [kk][c]
};

// Shared-memory stage of the tensor-core engine: 32 k of 64 rows of U and of
// 64 items of X, rows padded by 8 elements (80 bytes) so that ldmatrix's
// eight 16-byte row reads hit distinct banks; aligned to 16 bytes for
// ldmatrix and the 16-byte stores (T alone aligns to 2).
constexpr uint32_t kMmaStep = 32;
constexpr uint32_t kMmaLd = kMmaStep + 8;
template <typename T>
struct alignas(16) MmaStage {
  T user[kTile][kMmaLd];  // U[row0 + r, h, k0 + kk] at [r][kk]
  T item[kTile][kMmaLd];  // X[table, item0 + c, k0 + kk] at [c][kk]
};

template <typename T>
using TileStage = typename std::conditional<kTensorCores<T>, MmaStage<T>, SimtStage>::type;

// The output heads h whose GEMMs make up output head j, and the f32
// coefficient of head h's GEMM for row b: scale * g[b, h] (Logits), scale
// (Probabilities, h = j only).
__device__ __forceinline__ uint32_t first_head(const ScoringParams& p, uint32_t j) {
  return has(p, kProbabilities) ? j : 0;
}
__device__ __forceinline__ uint32_t end_head(const ScoringParams& p, uint32_t j) {
  return has(p, kProbabilities) ? j + 1 : p.heads;
}
__device__ __forceinline__ float head_coefficient(const ScoringParams& p, uint32_t b, uint32_t h) {
  return has(p, kProbabilities) ? p.scale : p.scale * p.gates[static_cast<unsigned long long>(b) * p.heads + h];
}
// Offset in U of (b, h, d) and in X of (head h's table, v, d).
__device__ __forceinline__ unsigned long long user_offset(const ScoringParams& p, uint32_t b, uint32_t h, uint32_t d) {
  return (static_cast<unsigned long long>(b) * p.heads + h) * p.width + d;
}
__device__ __forceinline__ unsigned long long table_offset(const ScoringParams& p, uint32_t h, uint32_t v,
                                                           uint32_t d) {
  const unsigned long long table = has(p, kShared) ? 0 : h;
  return (table * p.num_items + v) * p.width + d;
}

// The f32 engine: value 4 i + jj = <A_j[row0 + ty + 16 i], X_j[item0 + tx + 16 jj]>
// over the full K in ascending k, one fused multiply-add per k.
__device__ inline void simt_score_tile(const ScoringParams& p, SimtStage& stage, uint32_t row0, uint32_t item0, uint32_t j,
                                float (&value)[kValues]) {
  const float* items = static_cast<const float*>(p.items);
  const uint32_t tid = threadIdx.x;
  const uint32_t ty = tid / kLanes;
  const uint32_t tx = tid % kLanes;
#pragma unroll
  for (uint32_t e = 0; e < kValues; ++e) value[e] = 0.0f;
  const unsigned long long a_head = static_cast<unsigned long long>(j) * p.k;
  for (uint32_t k0 = 0; k0 < p.k; k0 += kStep) {
    // 64 x 16 elements of each operand, 4 per thread, 16 consecutive k per
    // row so that the global reads coalesce.
#pragma unroll
    for (uint32_t l = 0; l < kTile * kStep / kThreads; ++l) {
      const uint32_t e = tid + l * kThreads;
      const uint32_t r = e / kStep;
      const uint32_t kk = e % kStep;
      const uint32_t k = k0 + kk;
      const uint32_t b = row0 + r;
      const uint32_t v = item0 + r;
      stage.a[kk][r] =
          (b < p.batch && k < p.k) ? p.mixed_user[static_cast<unsigned long long>(b) * p.a_width + a_head + k] : 0.0f;
      stage.x[kk][r] = (v < p.num_items && k < p.k) ? items[item_offset(p, j, v, k)] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (uint32_t kk = 0; kk < kStep; ++kk) {
      float a[kPerThread];
      float x[kPerThread];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = stage.a[kk][ty + kLanes * i];
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) x[jj] = stage.x[kk][tx + kLanes * jj];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) value[4 * i + jj] = fmaf(a[i], x[jj], value[4 * i + jj]);
    }
    __syncthreads();
  }
}

// Eight consecutive k of one operand row into the stage: one 16-byte load
// when the row is 16-byte aligned and wholly inside K (`vector`), else
// element by element with zeros beyond K; zeros for a row outside the problem.
template <typename T>
__device__ __forceinline__ void stage_eight(T* to, const T* row, bool row_valid, uint32_t k, uint32_t width,
                                            bool vector) {
  if (row_valid && vector && k < width) {
    *reinterpret_cast<uint4*>(to) = *reinterpret_cast<const uint4*>(row + k);
    return;
  }
#pragma unroll
  for (uint32_t i = 0; i < 8; ++i) to[i] = (row_valid && k + i < width) ? row[k + i] : moerec::from_f32<T>(0.0f);
}

// The tensor-core engine (see above). Each 32-k step stages 64 x 32 of U and
// of X, 8 elements per thread; the second k16 half is skipped past D.
template <typename T>
__device__ void mma_score_tile(const ScoringParams& p, MmaStage<T>& stage, uint32_t row0, uint32_t item0, uint32_t j,
                               float (&value)[kValues]) {
  const T* user = static_cast<const T*>(p.user);
  const T* items = static_cast<const T*>(p.items);
  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t load_row = threadIdx.x / 4;
  const uint32_t load_k = (threadIdx.x % 4) * 8;
  const bool vector =
      p.width % 8 == 0 && (reinterpret_cast<uintptr_t>(user) | reinterpret_cast<uintptr_t>(items)) % 16 == 0;
  const uint32_t b_load = row0 + load_row;
  const uint32_t v_load = item0 + load_row;
  using Layout = TileLayout<T>;
  float coefficient[Layout::kRows];
#pragma unroll
  for (uint32_t e = 0; e < kValues; ++e) value[e] = 0.0f;
  for (uint32_t h = first_head(p, j); h < end_head(p, j); ++h) {
#pragma unroll
    for (uint32_t i = 0; i < Layout::kRows; ++i) {
      const uint32_t b = row0 + Layout::row_at(i);
      coefficient[i] = b < p.batch ? head_coefficient(p, b, h) : 0.0f;
    }
    const T* user_row = user + user_offset(p, b_load < p.batch ? b_load : 0, h, 0);
    const T* item_row = items + table_offset(p, h, v_load < p.num_items ? v_load : 0, 0);
    float acc[4][4];
#pragma unroll
    for (uint32_t nt = 0; nt < 4; ++nt)
#pragma unroll
      for (uint32_t c = 0; c < 4; ++c) acc[nt][c] = 0.0f;
    for (uint32_t k0 = 0; k0 < p.width; k0 += kMmaStep) {
      stage_eight(&stage.user[load_row][load_k], user_row, b_load < p.batch, k0 + load_k, p.width, vector);
      stage_eight(&stage.item[load_row][load_k], item_row, v_load < p.num_items, k0 + load_k, p.width, vector);
      __syncthreads();
#pragma unroll
      for (uint32_t ks = 0; ks < kMmaStep; ks += 16) {
        if (k0 + ks >= p.width) break;
        uint32_t a[4];
        moerec::ldmatrix_x4(a, &stage.user[16 * (warp % 4) + lane % 16][ks + (lane / 16) * 8]);
#pragma unroll
        for (uint32_t np = 0; np < 2; ++np) {
          // Matrices: items 0-7 / 8-15 of the pair x k 0-7 / 8-15; lane l
          // addresses item (l / 16) * 8 + l % 8, k ((l / 8) % 2) * 8.
          uint32_t x[4];
          moerec::ldmatrix_x4(
              x, &stage.item[32 * (warp / 4) + 16 * np + (lane / 16) * 8 + lane % 8][ks + ((lane / 8) % 2) * 8]);
          moerec::mma_16816<T>(acc[2 * np], a, x[0], x[1]);
          moerec::mma_16816<T>(acc[2 * np + 1], a, x[2], x[3]);
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (uint32_t e = 0; e < kValues; ++e) value[e] = fmaf(coefficient[Layout::slot(e)], acc[e / 4][e % 4], value[e]);
  }
}

// The score tile of output head j (see above). Every thread of the block
// must call it (it synchronises); it returns after a barrier, so the caller
// may reuse `stage` at once.
template <typename T>
__device__ __forceinline__ void score_tile(const ScoringParams& p, TileStage<T>& stage, uint32_t row0, uint32_t item0,
                                           uint32_t j, float (&value)[kValues]) {
  if constexpr (kTensorCores<T>) {
    mma_score_tile<T>(p, stage, row0, item0, j, value);
  } else {
    simt_score_tile(p, stage, row0, item0, j, value);
  }
}

// The values `scores` returns and `topk` ranks, for a 64 x 64 tile laid out
// as TileLayout<T>: S = GEMM + item_bias for Logits mixing,
// P = sum_h g_h exp(s_h - lse_h) for Probabilities (row_lse must hold the
// per-head lse). Excluded items get no special value here; rows >= B and
// items >= V are left at 0.
template <typename T>
__device__ void ranked_tile(const ScoringParams& p, TileStage<T>& stage, uint32_t row0, uint32_t item0,
                            float (&value)[kValues]) {
  using Layout = TileLayout<T>;
  if (!has(p, kProbabilities)) {
    score_tile<T>(p, stage, row0, item0, 0, value);
#pragma unroll
    for (uint32_t e = 0; e < kValues; ++e) {
      const uint32_t v = item0 + Layout::col(e);
      value[e] += v < p.num_items ? bias_of(p, v) : 0.0f;
    }
    return;
  }
#pragma unroll
  for (uint32_t e = 0; e < kValues; ++e) value[e] = 0.0f;
  float acc[kValues];
  for (uint32_t j = 0; j < p.heads; ++j) {
    score_tile<T>(p, stage, row0, item0, j, acc);
#pragma unroll
    for (uint32_t e = 0; e < kValues; ++e) {
      const uint32_t b = row0 + Layout::row(e);
      const uint32_t v = item0 + Layout::col(e);
      if (b >= p.batch || v >= p.num_items) continue;
      const unsigned long long bj = static_cast<unsigned long long>(b) * p.heads + j;
      value[e] = mix_probability(value[e], p.gates[bj], acc[e] + bias_of(p, v), p.row_lse[bj]);
    }
  }
}

}  // namespace moerec_scoring
