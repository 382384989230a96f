// Fused gated multi-head scores (DESIGN 4.4): materialised scores, the
// memory-free cross-entropy, and both backwards. topk lives in
// scoring_topk.cu; the parameter block and the score tile in scoring.cuh.
//
// Floors (DESIGN 5), with M = 2 * B * V * H * D multiply-adds:
//   scores          M FLOPs (+ M again for the lse pass of Probabilities
//                   mixing), B*V*4 bytes written, X read once per row tile;
//                   Probabilities: 2*B*V*H exponentials.
//   cross_entropy   M FLOPs, B*V*heads_out exponentials; writes O(B*H).
//   backwards       3M FLOPs (scores, dA, dX). The live variant recomputes
//                   each score tile once per K group (up to 3 slices of 64
//                   columns) in both the dA and the dX kernel:
//                   (2 * k_groups + 2) M, plus the lse and <q, dS> passes
//                   for Probabilities scores.
// Variant: 64 rows x 64 items per score tile, 256 threads, 16 values per
// thread (scoring.cuh): f32 SIMT for f32, tensor cores (mma.sync m16n8k16)
// for bf16/f16. The backward's dA product is on tensor cores too for
// bf16/f16, with the f32 gradient split exactly into bf16 pieces (see
// backward_user_mma); its dX product is f32 SIMT for every dtype (its other
// operand, A, is f32: an exact split of both would take 9 products).
//
// Kernels, in the order the ops launch them (src/ops/scoring/cuda.rs):
//   scoring_flag_excluded        excluded ids -> flags [V]; ids >= V reported
//   scoring_gates_<T>            g = softmax_h G and log g, one thread per row
//   scoring_mixed_user_<T>       the GEMM operand A (scoring.cuh)
//   scoring_row_reduce_<T>       per (item chunk, row tile, head): partial
//                                online lse of the scores, or sum_v q * dS
//   scoring_row_merge            chunks merged in order -> row_lse / row_coef
//   scoring_scores_<T>           S or P, -inf / 0 at excluded items
//   scoring_ce_loss_<T>          per row: target checks and the loss
//   scoring_backward_rows_<T>    per row: target checks, weight, responsibilities
//                                (and dG of Probabilities cross-entropy)
//   scoring_backward_user_<T>    per (item chunk, row tile, head, K group): dA partials
//   scoring_backward_items_<T>   per (item tile, K group): dX and d item_bias
//   scoring_backward_finish_user chunks of dA summed in order -> dU
//   scoring_backward_finish_gates_<T>  dG per row (the other passes)
// Every reduction runs in an order fixed by the shapes: no float atomics.
#include "scoring.cuh"

namespace {
using namespace moerec_scoring;
using moerec::to_f32;
typedef unsigned long long u64;

__device__ __forceinline__ void tile_range(uint32_t chunk, uint32_t tiles_per_chunk, uint32_t item_tiles,
                                           uint32_t& begin, uint32_t& end) {
  begin = chunk * tiles_per_chunk;
  end = min(item_tiles, begin + tiles_per_chunk);
}

// ---------------------------------------------------------------- preparation

__device__ void flag_excluded(const ScoringParams& p) {
  for (u64 i = moerec::global_thread_index(); i < p.num_excluded; i += moerec::global_thread_count()) {
    const uint32_t id = p.excluded[i];
    if (id < p.num_items) {
      p.excluded_flags[id] = 1;
    } else {
      moerec::report_position(p.status, i);
    }
  }
}

template <typename T>
__device__ void gate_softmax(const ScoringParams& p) {
  const T* logits = static_cast<const T*>(p.gate_logits);
  for (u64 b = moerec::global_thread_index(); b < p.batch; b += moerec::global_thread_count()) {
    const u64 row = b * p.heads;
    LogSumExp lse = lse_empty();
    for (uint32_t h = 0; h < p.heads; ++h) lse_push(lse, to_f32(logits[row + h]));
    const float total = lse_value(lse);
    for (uint32_t h = 0; h < p.heads; ++h) {
      const float log_gate = to_f32(logits[row + h]) - total;
      p.log_gates[row + h] = log_gate;
      p.gates[row + h] = expf(log_gate);
    }
  }
}

template <typename T>
__device__ void mixed_user(const ScoringParams& p) {
  const T* user = static_cast<const T*>(p.user);
  const u64 total = static_cast<u64>(p.batch) * p.a_width;
  for (u64 e = moerec::global_thread_index(); e < total; e += moerec::global_thread_count()) {
    const u64 b = e / p.a_width;
    const uint32_t a = static_cast<uint32_t>(e % p.a_width);
    float value;
    if (has(p, kProbabilities)) {
      value = p.scale * to_f32(user[e]);  // a = j * D + d, as in U's row
    } else if (!has(p, kShared)) {
      value = p.scale * p.gates[b * p.heads + a / p.width] * to_f32(user[e]);
    } else {
      value = 0.0f;
      for (uint32_t h = 0; h < p.heads; ++h) {
        value += p.scale * p.gates[b * p.heads + h] * to_f32(user[(b * p.heads + h) * p.width + a]);
      }
    }
    p.mixed_user[e] = value;
  }
}

// ---------------------------------------------------------------- row reductions

// Per (item chunk, row tile, output head): the online lse of the scores over
// the chunk's eligible items, or (kReduceDot) sum_v q[b, j, v] * dS[b, v]
// with q = exp(s - row_lse). Each thread folds its items in order, then the
// kOwners threads of a row are merged in owner order through shared memory.
template <typename T>
__device__ void row_reduce(const ScoringParams& p) {
  using Layout = TileLayout<T>;
  __shared__ TileStage<T> stage;
  __shared__ float2 owner_partials[kTile][Layout::kOwners];
  const uint32_t chunk = blockIdx.x;
  const uint32_t row0 = blockIdx.y * kTile;
  const uint32_t j = blockIdx.z;
  const bool dot = has(p, kReduceDot);
  LogSumExp part[Layout::kRows];
#pragma unroll
  for (uint32_t i = 0; i < Layout::kRows; ++i) part[i] = lse_empty();
  uint32_t begin, end;
  tile_range(chunk, p.reduce_tiles_per_chunk, p.item_tiles, begin, end);
  float acc[kValues];
  for (uint32_t tile = begin; tile < end; ++tile) {
    const uint32_t item0 = tile * kTile;
    score_tile<T>(p, stage, row0, item0, j, acc);
#pragma unroll
    for (uint32_t e = 0; e < kValues; ++e) {
      const uint32_t b = row0 + Layout::row(e);
      const uint32_t v = item0 + Layout::col(e);
      if (b >= p.batch || !eligible(p, v)) continue;
      LogSumExp& row_part = part[Layout::slot(e)];
      const float logit = acc[e] + bias_of(p, v);
      const u64 bj = static_cast<u64>(b) * p.heads_out + j;
      if (dot) {
        row_part.sum += expf(logit - p.row_lse[bj]) * p.dscores[static_cast<u64>(b) * p.num_items + v];
      } else {
        lse_push(row_part, logit);
        // The target's logit as it entered the lse, so that the loss
        // lse - s(target) cancels exactly (ce_loss).
        if (has(p, kCrossEntropy) && v == p.targets[b]) p.target_logits[bj] = logit;
      }
    }
  }
#pragma unroll
  for (uint32_t i = 0; i < Layout::kRows; ++i) {
    owner_partials[Layout::row_at(i)][Layout::owner()] = make_float2(part[i].max, part[i].sum);
  }
  __syncthreads();
  const uint32_t r = threadIdx.x;
  if (r < kTile && row0 + r < p.batch) {
    LogSumExp total = lse_empty();
    for (uint32_t o = 0; o < Layout::kOwners; ++o) {
      const LogSumExp other{owner_partials[r][o].x, owner_partials[r][o].y};
      if (dot) {
        total.sum += other.sum;
      } else {
        total = lse_merge(total, other);
      }
    }
    p.row_partials[(static_cast<u64>(j) * p.batch + row0 + r) * p.reduce_chunks + chunk] =
        make_float2(total.max, total.sum);
  }
}

// One thread per (output head, row): the chunks in order.
__device__ void row_merge(const ScoringParams& p) {
  const u64 total = static_cast<u64>(p.heads_out) * p.batch;
  for (u64 e = moerec::global_thread_index(); e < total; e += moerec::global_thread_count()) {
    const u64 j = e / p.batch;
    const u64 b = e % p.batch;
    const float2* part = p.row_partials + e * p.reduce_chunks;
    if (has(p, kReduceDot)) {
      float sum = 0.0f;
      for (uint32_t c = 0; c < p.reduce_chunks; ++c) sum += part[c].y;
      p.row_coef[b * p.heads_out + j] = sum;
    } else {
      LogSumExp lse = lse_empty();
      for (uint32_t c = 0; c < p.reduce_chunks; ++c) lse = lse_merge(lse, LogSumExp{part[c].x, part[c].y});
      p.row_lse[b * p.heads_out + j] = lse_value(lse);
    }
  }
}

// ---------------------------------------------------------------- forward

template <typename T>
__device__ void scores_tile(const ScoringParams& p) {
  using Layout = TileLayout<T>;
  __shared__ TileStage<T> stage;
  const uint32_t item0 = blockIdx.x * kTile;
  const uint32_t row0 = blockIdx.y * kTile;
  float value[kValues];
  ranked_tile<T>(p, stage, row0, item0, value);
  const float excluded = has(p, kProbabilities) ? 0.0f : -INFINITY;
#pragma unroll
  for (uint32_t e = 0; e < kValues; ++e) {
    const uint32_t b = row0 + Layout::row(e);
    const uint32_t v = item0 + Layout::col(e);
    if (b >= p.batch || v >= p.num_items) continue;
    p.out[static_cast<u64>(b) * p.num_items + v] = eligible(p, v) ? value[e] : excluded;
  }
}

// The target of row b checked as the CPU does (ignore first, then the range,
// then exclusion); kInactive for an ignored or rejected row.
__device__ uint32_t checked_target(const ScoringParams& p, uint32_t b) {
  const uint32_t target = p.targets[b];
  if (has(p, kIgnore) && target == p.ignore) return kInactive;
  if (target >= p.num_items) {
    moerec::report_position(p.status, kTargetError + 2ull * b);
    return kInactive;
  }
  if (p.excluded_flags[target] != 0) {
    moerec::report_position(p.status, kTargetError + 2ull * b + 1);
    return kInactive;
  }
  return target;
}

// l_h = log q_h(y) = s_h(y) - lse_h of row b, head h, from the forward's
// target logit and lse (exactly 0 for a target that is the only eligible item).
__device__ __forceinline__ float log_target_probability(const ScoringParams& p, u64 bh) {
  return p.target_logits[bh] - p.row_lse[bh];
}

// The forward's -log P(y) = lse_h(G_h) - lse_h(G_h + s_h(y) - lse_h), with the
// target logits row_reduce kept: s_h(y) - lse_h and the gates' normaliser
// cancel exactly, so a target that is its row's only eligible item has loss
// exactly 0 (the CPU computes it the same way).
template <typename T>
__device__ float mixture_loss(const ScoringParams& p, uint32_t b) {
  const T* logits = static_cast<const T*>(p.gate_logits);
  LogSumExp gates = lse_empty();
  LogSumExp joint = lse_empty();
  for (uint32_t h = 0; h < p.heads; ++h) {
    const u64 bh = static_cast<u64>(b) * p.heads + h;
    const float g = to_f32(logits[bh]);
    lse_push(gates, g);
    lse_push(joint, g + log_target_probability(p, bh));
  }
  return lse_value(gates) - lse_value(joint);
}

template <typename T>
__device__ void ce_loss(const ScoringParams& p) {
  for (u64 row = moerec::global_thread_index(); row < p.batch; row += moerec::global_thread_count()) {
    const uint32_t b = static_cast<uint32_t>(row);
    const uint32_t target = checked_target(p, b);
    float loss = 0.0f;
    if (target != kInactive) {
      if (has(p, kProbabilities)) {
        loss = mixture_loss<T>(p, b);
      } else {
        loss = p.row_lse[b] - p.target_logits[b];
      }
    }
    p.out[b] = loss;
  }
}

// ---------------------------------------------------------------- backward

// Probabilities cross-entropy, an active row b: coef_h = dloss * r_h with the
// responsibilities r_h = g_h q_h(y) / P(y) from log space (finite where P
// underflows), and dG_h = dloss * (g_h - r_h) as g_h t_h / (1 + t_h) with
// t_h = sum_k g_k expm1(l_k - l_h) (= P / q_h - 1, the gates summing to 1):
// exactly 0 when every head gives the target the same probability (one
// eligible item: every l_h = 0) and accurate where r is close to g, where
// g_h - r_h is rounding noise. Outside t_h in [-1/2, 1] (or for a non-finite
// t_h) the difference does not cancel and is taken directly. The CPU
// (MixtureTerms in src/ops/scoring/cpu/backward.rs) computes the same.
__device__ void mixture_row(const ScoringParams& p, u64 b, float dloss) {
  const u64 row = b * p.heads;
  LogSumExp joint = lse_empty();
  for (uint32_t h = 0; h < p.heads; ++h) lse_push(joint, p.log_gates[row + h] + log_target_probability(p, row + h));
  const float log_p = lse_value(joint);
  for (uint32_t h = 0; h < p.heads; ++h) {
    const float l = log_target_probability(p, row + h);
    const float r = expf(p.log_gates[row + h] + l - log_p);
    float t = 0.0f;
    for (uint32_t k = 0; k < p.heads; ++k) t += p.gates[row + k] * expm1f(log_target_probability(p, row + k) - l);
    const float g = p.gates[row + h];
    p.row_coef[row + h] = dloss * r;
    p.d_gates[row + h] = dloss * (t >= -0.5f && t <= 1.0f ? g * (t / (1.0f + t)) : g - r);
  }
}

// Per row: the target (kNoTarget for scores), the weight dloss, and for
// Probabilities cross-entropy coef_h and dG (mixture_row; zeros for an
// inactive row).
template <typename T>
__device__ void backward_rows(const ScoringParams& p) {
  for (u64 row = moerec::global_thread_index(); row < p.batch; row += moerec::global_thread_count()) {
    const uint32_t b = static_cast<uint32_t>(row);
    if (!has(p, kCrossEntropy)) {
      p.row_target[b] = kNoTarget;
      p.row_weight[b] = 1.0f;
      continue;
    }
    const uint32_t target = checked_target(p, b);
    const float weight = target == kInactive ? 0.0f : p.dloss[b];
    p.row_target[b] = target;
    p.row_weight[b] = weight;
    if (!has(p, kProbabilities)) continue;
    if (target != kInactive) {
      mixture_row(p, row, weight);
      continue;
    }
    for (uint32_t h = 0; h < p.heads; ++h) {
      p.row_coef[row * p.heads + h] = 0.0f;
      p.d_gates[row * p.heads + h] = 0.0f;
    }
  }
}

// dL/ds at an eligible item v of an active row b, from the GEMM output
// `logit` of output head j (before the bias).
__device__ __forceinline__ float head_grad(const ScoringParams& p, uint32_t b, uint32_t v, uint32_t j, float logit) {
  const float s = logit + bias_of(p, v);
  const u64 bj = static_cast<u64>(b) * p.heads_out + j;
  if (!has(p, kCrossEntropy)) {
    const float upstream = p.dscores[static_cast<u64>(b) * p.num_items + v];
    if (!has(p, kProbabilities)) return upstream;
    const float q = expf(s - p.row_lse[bj]);
    return p.gates[bj] * q * (upstream - p.row_coef[bj]);
  }
  const float onehot = v == p.row_target[b] ? 1.0f : 0.0f;
  if (!has(p, kProbabilities)) return p.row_weight[b] * (expf(s - p.row_lse[b]) - onehot);
  return p.row_coef[bj] * (expf(s - p.row_lse[bj]) - onehot);
}

// The score tile turned into dL/ds, zero for rows >= B, inactive rows and
// items that are excluded or >= V, stored as grad[row][item].
template <typename T>
__device__ void grad_tile(const ScoringParams& p, TileStage<T>& stage, uint32_t row0, uint32_t item0, uint32_t j,
                          float (&grad)[kTile][kPad]) {
  using Layout = TileLayout<T>;
  float acc[kValues];
  score_tile<T>(p, stage, row0, item0, j, acc);
#pragma unroll
  for (uint32_t e = 0; e < kValues; ++e) {
    const uint32_t r = Layout::row(e);
    const uint32_t c = Layout::col(e);
    const uint32_t b = row0 + r;
    const uint32_t v = item0 + c;
    const bool active = b < p.batch && p.row_target[b] != kInactive;
    grad[r][c] = (active && eligible(p, v)) ? head_grad(p, b, v, j, acc[e]) : 0.0f;
  }
}

// The backward's K groups: a block covers `group_slices` consecutive 64-wide
// K slices of one output head (group g: slices g * group_slices ..), so that
// each score tile is recomputed once per group rather than once per slice.
// The group's sums live in dynamic shared memory, row r (row or item of the
// tile) at r * group_pitch(p): each thread adds into its own 4 x 4 entries
// per slice, so no two threads touch one entry.
// The dynamic shared memory of the backward kernels: a K group's sums (dA:
// row r of the tile; dX: item r) at r * group_pitch(p) + column.
extern __shared__ float group_sums[];

__device__ __forceinline__ uint32_t group_pitch(const ScoringParams& p) { return p.group_slices * kTile + 16; }
__device__ __forceinline__ uint32_t group_slice_count(const ScoringParams& p, uint32_t group) {
  return min(p.group_slices, p.k_slices - group * p.group_slices);
}

// sums[r * pitch + s * 64 + c] += sum over 64 steps of left[.][r] * right[.][c]
// for the thread's rows ty + 16 i and columns tx + 16 kk: `left(step, r)` and
// `right(step, c)` read the shared tiles.
template <class Left, class Right>
__device__ __forceinline__ void add_slice_product(float* sums, uint32_t s, uint32_t pitch, Left left, Right right) {
  const uint32_t ty = threadIdx.x / kLanes;
  const uint32_t tx = threadIdx.x % kLanes;
  float acc[kPerThread][kPerThread];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) acc[i][kk] = sums[(ty + kLanes * i) * pitch + s * kTile + tx + kLanes * kk];
  for (uint32_t step = 0; step < kTile; ++step) {
    float l[kPerThread];
    float r[kPerThread];
#pragma unroll
    for (int i = 0; i < 4; ++i) l[i] = left(step, ty + kLanes * i);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) r[kk] = right(step, tx + kLanes * kk);
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) acc[i][kk] = fmaf(l[i], r[kk], acc[i][kk]);
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) sums[(ty + kLanes * i) * pitch + s * kTile + tx + kLanes * kk] = acc[i][kk];
}

__device__ __forceinline__ void zero_group_sums(const ScoringParams& p, float* sums) {
  for (uint32_t e = threadIdx.x; e < kTile * group_pitch(p); e += kThreads) sums[e] = 0.0f;
}

// d item_bias partial of backward_user: the thread's rows ty + 16 i summed
// over its items tx + 16 jj of the tile, ds * item_bias[v].
__device__ __forceinline__ void add_bias_products(const ScoringParams& p, const float (&grad)[kTile][kPad],
                                                  uint32_t item0, float (&d_bias)[kPerThread]) {
  const uint32_t ty = threadIdx.x / kLanes;
  const uint32_t tx = threadIdx.x % kLanes;
#pragma unroll
  for (int jj = 0; jj < 4; ++jj) {
    const uint32_t c = tx + kLanes * jj;
    const uint32_t v = item0 + c;
    if (!eligible(p, v)) continue;  // a non-finite bias there must not meet its zero ds
    const float bias = p.item_bias[v];
#pragma unroll
    for (int i = 0; i < 4; ++i) d_bias[i] = fmaf(grad[ty + kLanes * i][c], bias, d_bias[i]);
  }
}

// The rows' d item_bias partials summed over the 16 threads of each row in
// a fixed butterfly and written (Logits mixing, group 0) to bias_partials.
// Every thread of the block must call it.
__device__ __forceinline__ void write_bias_partials(const ScoringParams& p, uint32_t chunk, uint32_t row0,
                                                    uint32_t group, float (&d_bias)[kPerThread]) {
  const uint32_t ty = threadIdx.x / kLanes;
  const uint32_t tx = threadIdx.x % kLanes;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int offset = kLanes / 2; offset > 0; offset >>= 1) {
      d_bias[i] += __shfl_xor_sync(0xffffffffu, d_bias[i], offset);
    }
    const uint32_t b = row0 + ty + kLanes * i;
    if (b < p.batch && !has(p, kProbabilities) && group == 0 && tx == 0) {
      p.bias_partials[static_cast<u64>(chunk) * p.batch + b] = d_bias[i];
    }
  }
}

// Block (chunk, row tile, j * k_groups + group): for its 64 rows and the K
// group's columns of output head j, dA = sum over the chunk's items of
// ds * X(v, k), items in ascending order; one partial per chunk. Logits
// mixing also sums ds * item_bias[v] per row (group 0 only), for dG.
// f32: SIMT products into the group sums in shared memory.
__device__ void backward_user_simt(const ScoringParams& p) {
  __shared__ TileStage<float> stage;
  __shared__ float grad[kTile][kPad];   // [row][item]
  __shared__ float slice[kTile][kPad];  // X(item0 + c, k0 + kk) at [c][kk]
  const float* items = static_cast<const float*>(p.items);
  const uint32_t chunk = blockIdx.x;
  const uint32_t row0 = blockIdx.y * kTile;
  const uint32_t j = blockIdx.z / p.k_groups;
  const uint32_t group = blockIdx.z % p.k_groups;
  const uint32_t slices = group_slice_count(p, group);
  const uint32_t pitch = group_pitch(p);
  const uint32_t ty = threadIdx.x / kLanes;
  const uint32_t tx = threadIdx.x % kLanes;
  const bool bias_sum = !has(p, kProbabilities) && group == 0 && p.item_bias != nullptr;
  float d_bias[kPerThread] = {0.0f, 0.0f, 0.0f, 0.0f};  // row ty + 16 i
  zero_group_sums(p, group_sums);  // first read after the barriers below
  uint32_t begin, end;
  tile_range(chunk, p.user_tiles_per_chunk, p.item_tiles, begin, end);
  for (uint32_t tile = begin; tile < end; ++tile) {
    const uint32_t item0 = tile * kTile;
    grad_tile<float>(p, stage, row0, item0, j, grad);
    for (uint32_t s = 0; s < slices; ++s) {
      const uint32_t k0 = (group * p.group_slices + s) * kTile;
      for (uint32_t e = threadIdx.x; e < kTile * kTile; e += kThreads) {
        const uint32_t c = e / kTile;
        const uint32_t kk = e % kTile;
        const uint32_t v = item0 + c;
        const uint32_t k = k0 + kk;
        // Excluded items are skipped, not multiplied by their zero ds: a
        // non-finite X there must not reach dA (DESIGN: exact zeros).
        slice[c][kk] = (eligible(p, v) && k < p.k) ? items[item_offset(p, j, v, k)] : 0.0f;
      }
      __syncthreads();
      add_slice_product(
          group_sums, s, pitch, [&](uint32_t c, uint32_t r) { return grad[r][c]; },
          [&](uint32_t c, uint32_t kk) { return slice[c][kk]; });
      if (bias_sum && s == 0) add_bias_products(p, grad, item0, d_bias);
      __syncthreads();
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t r = ty + kLanes * i;
    const uint32_t b = row0 + r;
    if (b >= p.batch) continue;
    const u64 row = static_cast<u64>(chunk) * p.batch + b;
    for (uint32_t s = 0; s < slices; ++s) {
      const uint32_t k0 = (group * p.group_slices + s) * kTile;
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const uint32_t k = k0 + tx + kLanes * kk;
        if (k < p.k) {
          p.user_partials[row * p.a_width + static_cast<u64>(j) * p.k + k] =
              group_sums[r * pitch + s * kTile + tx + kLanes * kk];
        }
      }
    }
  }
  write_bias_partials(p, chunk, row0, group, d_bias);
}

// The tensor-core dA of bf16/f16: f32 ds and the stored X split exactly into
// bf16 pieces (moerec::split_bf16_pieces: ds in 3, an f16 X in 2, a bf16 X
// in 1), so that every product is exact at 3 or 6 tensor-core products per
// multiply-add; their f32 accumulation is the hardware's (DESIGN 6).
constexpr uint32_t kGradPieces = 3;
// Rows of a piece tile: 64 + 8 bf16 (144 bytes), 16-byte aligned and
// conflict-free for ldmatrix.
constexpr uint32_t kPieceLd = kTile + 8;
// Must equal MAX_GROUP_SLICES in src/ops/scoring/cuda/plan.rs.
constexpr uint32_t kMaxGroupSlices = 3;

// backward_user for bf16/f16 (see backward_user_simt for what it computes).
// Warp w owns rows 16 (w % 4) .. + 15 and columns 32 (w / 4) .. + 31 of each
// slice, accumulated in registers over the chunk's items (items in
// ascending k16 steps). Dynamic shared memory: the pieces of the grad tile
// [kGradPieces][row][item] and of the X slice [kExactPieces<T>][item][column].
template <typename T>
__device__ void backward_user_mma(const ScoringParams& p) {
  typedef __nv_bfloat16 PieceTile[kTile][kPieceLd];
  __shared__ TileStage<T> stage;
  __shared__ float grad[kTile][kPad];  // [row][item]
  PieceTile* grad_pieces = reinterpret_cast<PieceTile*>(group_sums);
  PieceTile* item_pieces = grad_pieces + kGradPieces;
  constexpr uint32_t kPieceStride = kTile * kPieceLd;
  const T* items = static_cast<const T*>(p.items);
  const uint32_t chunk = blockIdx.x;
  const uint32_t row0 = blockIdx.y * kTile;
  const uint32_t j = blockIdx.z / p.k_groups;
  const uint32_t group = blockIdx.z % p.k_groups;
  const uint32_t slices = group_slice_count(p, group);
  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const bool bias_sum = !has(p, kProbabilities) && group == 0 && p.item_bias != nullptr;
  float d_bias[kPerThread] = {0.0f, 0.0f, 0.0f, 0.0f};  // row ty + 16 i
  float acc[kMaxGroupSlices][4][4];
#pragma unroll
  for (uint32_t s = 0; s < kMaxGroupSlices; ++s)
#pragma unroll
    for (uint32_t nt = 0; nt < 4; ++nt)
#pragma unroll
      for (uint32_t c = 0; c < 4; ++c) acc[s][nt][c] = 0.0f;
  uint32_t begin, end;
  tile_range(chunk, p.user_tiles_per_chunk, p.item_tiles, begin, end);
  for (uint32_t tile = begin; tile < end; ++tile) {
    const uint32_t item0 = tile * kTile;
    grad_tile<T>(p, stage, row0, item0, j, grad);
    __syncthreads();
    for (uint32_t e = threadIdx.x; e < kTile * kTile; e += kThreads) {
      const uint32_t r = e / kTile;
      const uint32_t c = e % kTile;
      moerec::split_bf16_pieces(grad[r][c], &grad_pieces[0][r][c], kGradPieces, kPieceStride);
    }
    if (bias_sum) add_bias_products(p, grad, item0, d_bias);
#pragma unroll
    for (uint32_t s = 0; s < kMaxGroupSlices; ++s) {
      if (s >= slices) break;
      const uint32_t k0 = (group * p.group_slices + s) * kTile;
      for (uint32_t e = threadIdx.x; e < kTile * kTile; e += kThreads) {
        const uint32_t c = e / kTile;
        const uint32_t kk = e % kTile;
        const uint32_t v = item0 + c;
        const uint32_t k = k0 + kk;
        const float x = (eligible(p, v) && k < p.k) ? to_f32(items[item_offset(p, j, v, k)]) : 0.0f;
        moerec::split_bf16_pieces(x, &item_pieces[0][c][kk], moerec::kExactPieces<T>, kPieceStride);
      }
      __syncthreads();
#pragma unroll
      for (uint32_t ks = 0; ks < kTile; ks += 16) {
        uint32_t a[kGradPieces][4];
#pragma unroll
        for (uint32_t q = 0; q < kGradPieces; ++q) {
          moerec::ldmatrix_x4(a[q], &grad_pieces[q][16 * (warp % 4) + lane % 16][ks + (lane / 16) * 8]);
        }
#pragma unroll
        for (uint32_t np = 0; np < 2; ++np) {
#pragma unroll
          for (uint32_t xq = 0; xq < moerec::kExactPieces<T>; ++xq) {
            // Two n8 tiles of B (k = items, n = columns) from [item][column].
            uint32_t b[4];
            moerec::ldmatrix_x4_trans(b, &item_pieces[xq][ks + lane % 16][32 * (warp / 4) + 16 * np + (lane / 16) * 8]);
#pragma unroll
            for (uint32_t q = 0; q < kGradPieces; ++q) {
              moerec::mma_16816<__nv_bfloat16>(acc[s][2 * np], a[q], b[0], b[1]);
              moerec::mma_16816<__nv_bfloat16>(acc[s][2 * np + 1], a[q], b[2], b[3]);
            }
          }
        }
      }
      __syncthreads();
    }
  }
#pragma unroll
  for (uint32_t s = 0; s < kMaxGroupSlices; ++s) {
    if (s >= slices) break;
    const uint32_t k0 = (group * p.group_slices + s) * kTile;
#pragma unroll
    for (uint32_t nt = 0; nt < 4; ++nt)
#pragma unroll
      for (uint32_t c = 0; c < 4; ++c) {
        const uint32_t b = row0 + 16 * (warp % 4) + lane / 4 + 8 * (c / 2);
        const uint32_t k = k0 + 32 * (warp / 4) + 8 * nt + 2 * (lane % 4) + c % 2;
        if (b < p.batch && k < p.k) {
          p.user_partials[(static_cast<u64>(chunk) * p.batch + b) * p.a_width + static_cast<u64>(j) * p.k + k] =
              acc[s][nt][c];
        }
      }
  }
  write_bias_partials(p, chunk, row0, group, d_bias);
}

template <typename T>
__device__ void backward_user(const ScoringParams& p) {
  if constexpr (kTensorCores<T>) {
    backward_user_mma<T>(p);
  } else {
    backward_user_simt(p);
  }
}

// Block (item tile, K group): dXt(v, group columns) = sum over output heads
// and all row tiles in order of ds * A(b, k), and (group 0) d item_bias =
// sum ds. Probabilities mixing with per-head tables writes head j's rows of
// dX after head j; with a shared table it sums the heads first.
template <typename T>
__device__ void backward_items(const ScoringParams& p) {
  __shared__ TileStage<T> stage;
  __shared__ float grad[kTile][kPad];   // [row][item]
  __shared__ float slice[kTile][kPad];  // A(row0 + r, j*K + k0 + kk) at [r][kk]
  const uint32_t item0 = blockIdx.x * kTile;
  const uint32_t group = blockIdx.y;
  const uint32_t slices = group_slice_count(p, group);
  const uint32_t pitch = group_pitch(p);
  const uint32_t ty = threadIdx.x / kLanes;
  const uint32_t tx = threadIdx.x % kLanes;
  const bool per_head_writes = has(p, kProbabilities) && !has(p, kShared);
  float d_bias = 0.0f;  // item threadIdx.x (< 64), group 0
  zero_group_sums(p, group_sums);  // first read after the barriers below
  for (uint32_t j = 0; j < p.heads_out; ++j) {
    const u64 a_head = static_cast<u64>(j) * p.k;
    for (uint32_t tile = 0; tile < p.row_tiles; ++tile) {
      const uint32_t row0 = tile * kTile;
      grad_tile<T>(p, stage, row0, item0, j, grad);
      for (uint32_t s = 0; s < slices; ++s) {
        const uint32_t k0 = (group * p.group_slices + s) * kTile;
        for (uint32_t e = threadIdx.x; e < kTile * kTile; e += kThreads) {
          const uint32_t r = e / kTile;
          const uint32_t kk = e % kTile;
          const uint32_t b = row0 + r;
          const uint32_t k = k0 + kk;
          // Inactive (ignored) rows are skipped like excluded items in dA.
          const bool active = b < p.batch && p.row_target[b] != kInactive;
          slice[r][kk] = (active && k < p.k) ? p.mixed_user[static_cast<u64>(b) * p.a_width + a_head + k] : 0.0f;
        }
        __syncthreads();
        add_slice_product(
            group_sums, s, pitch, [&](uint32_t r, uint32_t c) { return grad[r][c]; },
            [&](uint32_t r, uint32_t kk) { return slice[r][kk]; });
        if (group == 0 && s == 0 && threadIdx.x < kTile) {
          for (uint32_t r = 0; r < kTile; ++r) d_bias += grad[r][threadIdx.x];
        }
        __syncthreads();
      }
    }
    if (per_head_writes || j + 1 == p.heads_out) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint32_t c = ty + kLanes * i;
        const uint32_t v = item0 + c;
        if (v >= p.num_items) continue;
        const bool keep = eligible(p, v);
        for (uint32_t s = 0; s < slices; ++s) {
          const uint32_t k0 = (group * p.group_slices + s) * kTile;
#pragma unroll
          for (int kk = 0; kk < 4; ++kk) {
            const uint32_t k = k0 + tx + kLanes * kk;
            float& sum = group_sums[c * pitch + s * kTile + tx + kLanes * kk];
            if (k < p.k) p.d_items[item_offset(p, j, v, k)] = keep ? sum : 0.0f;
            sum = 0.0f;
          }
        }
      }
    }
  }
  const uint32_t v = item0 + threadIdx.x;
  if (group == 0 && threadIdx.x < kTile && v < p.num_items) p.d_bias[v] = eligible(p, v) ? d_bias : 0.0f;
}

// One thread per element (b, a) of A: the chunks of dA summed in order (kept
// in chunk 0 for the gates), then dU = scale * g * dA (Logits) or scale * dA.
__device__ void backward_finish_user(const ScoringParams& p) {
  const u64 total = static_cast<u64>(p.batch) * p.a_width;
  const u64 chunk_stride = total;
  for (u64 e = moerec::global_thread_index(); e < total; e += moerec::global_thread_count()) {
    const u64 b = e / p.a_width;
    const uint32_t a = static_cast<uint32_t>(e % p.a_width);
    float sum = 0.0f;
    for (uint32_t c = 0; c < p.user_chunks; ++c) sum += p.user_partials[c * chunk_stride + e];
    p.user_partials[e] = sum;
    const bool active = p.row_target[b] != kInactive;
    if (has(p, kProbabilities)) {
      p.d_user[e] = active ? p.scale * sum : 0.0f;
    } else if (!has(p, kShared)) {
      p.d_user[e] = active ? p.scale * p.gates[b * p.heads + a / p.width] * sum : 0.0f;
    } else {
      for (uint32_t h = 0; h < p.heads; ++h) {
        p.d_user[(b * p.heads + h) * p.width + a] = active ? p.scale * p.gates[b * p.heads + h] * sum : 0.0f;
      }
    }
  }
}

// One thread per row: dG. dL/dg_h is scale <U[b, h], dA_h> + sum_v dS item_bias
// for Logits mixing (dA summed by backward_finish_user), <q_h, dS> for
// Probabilities scores; then through the gate softmax,
// g_h (dg_h - sum_k g_k dg_k), taken relative to dg_0 (the gates sum to 1) so
// that it is exactly 0 when every head's dg is the same (Probabilities scores
// of a row with one eligible item) instead of rounding noise; the CPU
// computes the same. Probabilities cross-entropy: backward_rows wrote dG.
template <typename T>
__device__ void backward_finish_gates(const ScoringParams& p) {
  if (has(p, kProbabilities) && has(p, kCrossEntropy)) return;
  const T* user = static_cast<const T*>(p.user);
  for (u64 b = moerec::global_thread_index(); b < p.batch; b += moerec::global_thread_count()) {
    const u64 row = b * p.heads;
    if (p.row_target[b] == kInactive) {
      for (uint32_t h = 0; h < p.heads; ++h) p.d_gates[row + h] = 0.0f;
      continue;
    }
    float bias_sum = 0.0f;
    if (!has(p, kProbabilities)) {
      for (uint32_t c = 0; c < p.user_chunks; ++c) bias_sum += p.bias_partials[static_cast<u64>(c) * p.batch + b];
    }
    float mean = 0.0f;
    float pivot = 0.0f;
    for (uint32_t h = 0; h < p.heads; ++h) {
      float d_gate;
      if (has(p, kProbabilities)) {
        d_gate = p.row_coef[row + h];
      } else {
        const float* d_a = p.user_partials + b * p.a_width + (has(p, kShared) ? 0 : static_cast<u64>(h) * p.width);
        const T* u = user + (row + h) * p.width;
        float dot = 0.0f;
        // A zero dA (e.g. every item excluded) contributes an exact zero,
        // as on the CPU, which sums ds * s over the eligible items only.
        for (uint32_t d = 0; d < p.width; ++d) {
          if (d_a[d] != 0.0f) dot += to_f32(u[d]) * d_a[d];
        }
        d_gate = p.scale * dot + bias_sum;
      }
      if (h == 0) pivot = d_gate;
      p.d_gates[row + h] = d_gate;
      mean += p.gates[row + h] * (d_gate - pivot);
    }
    for (uint32_t h = 0; h < p.heads; ++h) {
      p.d_gates[row + h] = p.gates[row + h] * ((p.d_gates[row + h] - pivot) - mean);
    }
  }
}
}  // namespace

// Grid-stride kernels take moerec::kBlockThreads blocks, tile kernels kThreads
// (TILE_THREADS in src/ops/scoring/cuda/plan.rs). Under a bare bound ptxas
// spills scoring_scores_f32 (64 registers) and scoring_backward_items_bf16/f16
// (128); 2 blocks per SM let them take up to 128 without spilling.
extern "C" __global__ void __launch_bounds__(moerec::kBlockThreads)
    scoring_flag_excluded(const ScoringParams p) { flag_excluded(p); }
extern "C" __global__ void __launch_bounds__(moerec::kBlockThreads)
    scoring_row_merge(const ScoringParams p) { row_merge(p); }
extern "C" __global__ void __launch_bounds__(moerec::kBlockThreads)
    scoring_backward_finish_user(const ScoringParams p) {
  backward_finish_user(p);
}

#define MOEREC_SCORING_KERNEL(bounds, name, body, suffix, T) \
  extern "C" __global__ void __launch_bounds__ bounds name##_##suffix(const ScoringParams p) { body<T>(p); }
#define MOEREC_SCORING_KERNELS(suffix, T)                                                         \
  MOEREC_SCORING_KERNEL((moerec::kBlockThreads), scoring_gates, gate_softmax, suffix, T)          \
  MOEREC_SCORING_KERNEL((moerec::kBlockThreads), scoring_mixed_user, mixed_user, suffix, T)       \
  MOEREC_SCORING_KERNEL((kThreads), scoring_row_reduce, row_reduce, suffix, T)                    \
  MOEREC_SCORING_KERNEL((kThreads, 2), scoring_scores, scores_tile, suffix, T)                    \
  MOEREC_SCORING_KERNEL((moerec::kBlockThreads), scoring_ce_loss, ce_loss, suffix, T)             \
  MOEREC_SCORING_KERNEL((moerec::kBlockThreads), scoring_backward_rows, backward_rows, suffix, T) \
  MOEREC_SCORING_KERNEL((kThreads), scoring_backward_user, backward_user, suffix, T)              \
  MOEREC_SCORING_KERNEL((kThreads, 2), scoring_backward_items, backward_items, suffix, T)          \
  MOEREC_SCORING_KERNEL((moerec::kBlockThreads), scoring_backward_finish_gates, backward_finish_gates, suffix, T)
MOEREC_FOR_EACH_FLOAT(MOEREC_SCORING_KERNELS)
