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
#include "common.cuh"

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
  uint32_t flags;                    // kProbabilities | kShared | ...
  uint32_t ignore;                   // the ignored target (with kIgnore)
  uint32_t history_len;
  uint32_t n;                        // topk
  uint32_t topk_chunks;
  uint32_t topk_tiles_per_chunk;
  float scale;
};
static_assert(sizeof(ScoringParams) == 32 * 8 + 22 * 4, "ScoringParams must match the Rust Params");

constexpr uint32_t kProbabilities = 1;  // Probabilities mixing (else Logits)
constexpr uint32_t kShared = 2;         // one [V, D] table for every head
constexpr uint32_t kCrossEntropy = 4;   // the backward's upstream is dloss (else dscores)
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

// The GEMM output of row b, item v, head j computed alone, with the same
// fused multiply-adds in the same order as score_tile: bitwise equal to the
// tile's value.
template <typename T>
__device__ float single_score(const ScoringParams& p, uint32_t b, uint32_t j, uint32_t v) {
  const T* items = static_cast<const T*>(p.items);
  const float* a = p.mixed_user + static_cast<unsigned long long>(b) * p.a_width + static_cast<unsigned long long>(j) * p.k;
  float acc = 0.0f;
  for (uint32_t k = 0; k < p.k; ++k) acc = fmaf(a[k], moerec::to_f32(items[item_offset(p, j, v, k)]), acc);
  return acc;
}

// The shared-memory stage of one score tile.
struct TileStage {
  float a[kStep][kPad];  // A[row0 + r, j*K + k0 + kk] at [kk][r]
  float x[kStep][kPad];  // item element (item0 + c, k0 + kk) at [kk][c]
};

// acc[i][jj] = <A_j[row0 + ty + 16 i], X_j[item0 + tx + 16 jj]> for the
// thread (ty, tx) = (tid / 16, tid % 16), over the full K in ascending k, one
// fused multiply-add per k. Rows >= B, items >= V and k >= K read zeros.
// Every thread of the block must call it (it synchronises); it returns after
// a barrier, so the caller may reuse `stage` at once.
template <typename T>
__device__ void score_tile(const ScoringParams& p, TileStage& stage, uint32_t row0, uint32_t item0, uint32_t j,
                           float (&acc)[kPerThread][kPerThread]) {
  const T* items = static_cast<const T*>(p.items);
  const uint32_t tid = threadIdx.x;
  const uint32_t ty = tid / kLanes;
  const uint32_t tx = tid % kLanes;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) acc[i][jj] = 0.0f;
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
      stage.x[kk][r] = (v < p.num_items && k < p.k) ? moerec::to_f32(items[item_offset(p, j, v, k)]) : 0.0f;
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
        for (int jj = 0; jj < 4; ++jj) acc[i][jj] = fmaf(a[i], x[jj], acc[i][jj]);
    }
    __syncthreads();
  }
}

// The values `scores` returns and `topk` ranks, for a 64 x 64 tile (the
// thread's 4 x 4 as in score_tile): S = GEMM + item_bias for Logits mixing,
// P = sum_h g_h exp(s_h - lse_h) for Probabilities (row_lse must hold the
// per-head lse). Excluded items get no special value here; rows >= B and
// items >= V are left at 0.
template <typename T>
__device__ void ranked_tile(const ScoringParams& p, TileStage& stage, uint32_t row0, uint32_t item0,
                            float (&value)[kPerThread][kPerThread]) {
  const uint32_t ty = threadIdx.x / kLanes;
  const uint32_t tx = threadIdx.x % kLanes;
  if (!has(p, kProbabilities)) {
    score_tile<T>(p, stage, row0, item0, 0, value);
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      const uint32_t v = item0 + tx + kLanes * jj;
      const float bias = v < p.num_items ? bias_of(p, v) : 0.0f;
#pragma unroll
      for (int i = 0; i < 4; ++i) value[i][jj] += bias;
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) value[i][jj] = 0.0f;
  float acc[kPerThread][kPerThread];
  for (uint32_t j = 0; j < p.heads; ++j) {
    score_tile<T>(p, stage, row0, item0, j, acc);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t b = row0 + ty + kLanes * i;
      if (b >= p.batch) continue;
      const unsigned long long bj = static_cast<unsigned long long>(b) * p.heads + j;
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
        const uint32_t v = item0 + tx + kLanes * jj;
        if (v >= p.num_items) continue;
        value[i][jj] = mix_probability(value[i][jj], p.gates[bj], acc[i][jj] + bias_of(p, v), p.row_lse[bj]);
      }
    }
  }
}

}  // namespace moerec_scoring
