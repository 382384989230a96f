// Top-k routing (DESIGN 4.2) over logits Z [T, E]: scores, selection, weights,
// the dispatch plan, the statistics, and the backward.
//
// Expert groups: the E experts form G groups of N = E / G, and each token
// routes once within each group, so the kernels route the T * G routing rows
// r = t * G + g of Z viewed as [T * G, N]; row r's columns are the experts
// g * N + c (their mask, bias, statistics and global index). G = 1 is plain
// routing.
//
// Layout: a group of S lanes (S = min(32, next power of two >= N): a warp, or
// part of one for small N) owns one routing row at a time, and lane l owns the
// columns c = l, l + S, ... The row is staged in shared memory, so each logit
// is read from global memory once; src/ops/routing/cuda.rs sizes the blocks so
// that their lane groups' rows fit.
//
// routing_forward_<dtype>   one pass over Z: the non-finite check, max and sum
//     of exponentials (softmax) or sum of sigmoids, the k largest selection
//     keys (k rounds of a group arg-max when k is small, else each expert's
//     rank), the weights, and the row's share of the statistics. Each group
//     keeps per-expert sums in shared memory and each block writes them as one
//     partial row [2E + 1]; routing_reduce_partials sums the partial rows in a
//     fixed order and routing_finalize turns the sums into losses. No float
//     atomics: every statistic is bitwise reproducible.
//     Floor: T*E*size bytes read, T*k*8 written, plus the plan.
// routing_plan_counts, routing_plan_rows   counts, offsets, token_of_row and
//     row_of_slot from the groups that the grouping primitive (grouping.cu)
//     makes of the (token, slot) positions keyed by expert.
// routing_backward_<dtype>  one pass over Z in the same layout: dZ [T, E] f32.
//     Floor: T*E*size bytes read, T*E*4 written.
//
// Selection keys are float32(z) + bias with -0 read as +0, mapped to unsigned
// integers of the same order; (key, ~expert) packed in 64 bits orders experts
// by key, ties to the lower index, exactly as the CPU backend does.
#include "common.cuh"

namespace {
constexpr uint32_t kNone = 0xffffffffu;  // u32::MAX: no expert, no row, no slot
constexpr uint32_t kSigmoid = 1u;
constexpr uint32_t kRenormalize = 2u;
constexpr uint32_t kRankSelection = 4u;
// 4-byte words of each lane group's shared memory (forward_words and
// BACKWARD_ROW_WORDS in src/ops/routing/cuda.rs): per column of a row, and
// per expert (all groups).
constexpr uint32_t kForwardRowWords = 3;     // logit, key, slot
constexpr uint32_t kForwardExpertWords = 2;  // share, gate
constexpr uint32_t kBackwardWords = 2;       // logit, dL/dv
constexpr int kFinalizeThreads = 256;
// The row kernels' largest block (MAX_WARPS_PER_BLOCK in src/ops/routing/cuda.rs).
constexpr int kMaxRowThreads = 8 * 32;

extern __shared__ float shared_words[];

__device__ __forceinline__ float positive_infinity() { return __int_as_float(0x7f800000); }

// The G lanes that own one row; G is a power of two <= 32 and blocks hold
// whole warps, so a group never straddles two warps.
struct Group {
  uint32_t size;
  uint32_t lane;
  uint32_t mask;

  __device__ void sync() const { __syncwarp(mask); }
  __device__ bool any(bool predicate) const { return __any_sync(mask, predicate); }
  // Butterfly reductions: every lane combines the same pairs, so every lane
  // ends with the same bits.
  __device__ float sum(float value) const {
    for (uint32_t offset = size / 2; offset > 0; offset >>= 1) value += __shfl_xor_sync(mask, value, offset, size);
    return value;
  }
  __device__ float max(float value) const {
    for (uint32_t offset = size / 2; offset > 0; offset >>= 1) {
      value = fmaxf(value, __shfl_xor_sync(mask, value, offset, size));
    }
    return value;
  }
  __device__ uint32_t min(uint32_t value) const {
    for (uint32_t offset = size / 2; offset > 0; offset >>= 1) {
      const uint32_t other = __shfl_xor_sync(mask, value, offset, size);
      value = other < value ? other : value;
    }
    return value;
  }
  __device__ unsigned long long max(unsigned long long value) const {
    for (uint32_t offset = size / 2; offset > 0; offset >>= 1) {
      const unsigned long long other = __shfl_xor_sync(mask, value, offset, size);
      value = other > value ? other : value;
    }
    return value;
  }
};

__device__ __forceinline__ Group make_group(uint32_t size) {
  const uint32_t lane_in_warp = threadIdx.x & 31;
  const uint32_t first = lane_in_warp & ~(size - 1);
  const uint32_t mask = size == 32 ? 0xffffffffu : ((1u << size) - 1) << first;
  return Group{size, lane_in_warp - first, mask};
}

__device__ __forceinline__ bool is_active(const uint32_t* expert_mask, uint32_t expert) {
  return expert_mask == nullptr || expert_mask[expert] != 0;
}

// Overflow-free logistic function (sigmoid(-inf) = 0).
__device__ __forceinline__ float sigmoid_of(float z) {
  if (z >= 0.0f) return 1.0f / (1.0f + expf(-z));
  const float e = expf(z);
  return e / (1.0f + e);
}

// float32(z) + bias as an unsigned integer of the same order; -0 reads as +0.
__device__ __forceinline__ uint32_t selection_key(float z, float bias) {
  uint32_t bits = __float_as_uint(z + bias);
  if ((bits << 1) == 0) bits = 0;
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Larger candidate = selected first: larger key, then lower expert. 0 (key 0,
// kept for inactive experts) is below every candidate and never selected.
__device__ __forceinline__ unsigned long long candidate(uint32_t key, uint32_t expert) {
  return key == 0 ? 0ull : (static_cast<unsigned long long>(key) << 32) | static_cast<uint32_t>(~expert);
}

// The largest logit of a set, over whose score the set's scores are taken
// (relative) before any ratio of them, so the ratios are exact where the
// scores underflow (sigmoids of logits below about -87), at one exponential
// per score (Anchor in src/ops/routing/cpu.rs). No sum of scores that may
// underflow is ever a divisor.
struct Anchor {
  float value;
  float constant;  // sigmoid: sigmoid(value) when value >= 0, else e^value
  bool sigmoid;

  __device__ static Anchor of(float value, bool sigmoid) {
    return Anchor{value, !sigmoid ? 0.0f : (value >= 0.0f ? sigmoid_of(value) : expf(value)), sigmoid};
  }
  // The unnormalised score of z <= value over the anchor's, 1 at the anchor:
  // e^(z - value), or sigmoid(z) / sigmoid(value), which below 0 is
  // u (1 + e^value) / (1 + u e^value) with u = e^(z - value).
  __device__ float relative(float z) const {
    if (!sigmoid) return expf(z - value);
    if (value >= 0.0f) return sigmoid_of(z) / constant;
    const float u = expf(z - value);
    return u * (1.0f + constant) / (1.0f + u * constant);
  }
};

struct RowStats {
  Anchor anchor;       // the max of the active logits
  float sum_exp;       // sum of exp(z - max) over the active logits
  float relative_sum;  // sum of anchor.relative(z) over the active logits, >= 1

  __device__ float softmax(float z) const { return expf(z - anchor.value) / sum_exp; }
  __device__ float score(float z, bool sigmoid) const { return sigmoid ? sigmoid_of(z) : softmax(z); }
  // q = p / sum of p, the row's share of expert z's load.
  __device__ float share(float z) const { return anchor.relative(z) / relative_sum; }
  __device__ float lse() const { return anchor.value + logf(sum_exp); }
};

// Renormalisation over a row's selected experts: each score over the sum of
// the selected scores, both relative to the largest selected logit, so the
// sum is >= 1 (a valid row's best key has a finite logit). Every lane of the
// group calls it with the logits of the slots it owns.
struct Renormaliser {
  Anchor anchor;
  float sum;

  __device__ float weight(float z) const { return anchor.relative(z) / sum; }
};

// Stages a row of `experts` columns in z_row (this lane's columns), reports the
// lowest NaN/+inf active logit, or the first active column of a row whose
// active logits are all -inf, at flat position row_position + column, and
// returns the row's statistics (garbage, but harmless, for a reported row).
// expert_mask is the row's group's part of the mask (or null).
template <typename T>
__device__ RowStats load_row(const T* row, const uint32_t* expert_mask, uint32_t experts, bool sigmoid,
                             unsigned long long row_position, const Group& group, float* z_row,
                             unsigned long long* status) {
  float row_max = -positive_infinity();
  bool non_finite = false;
  for (uint32_t c = group.lane; c < experts; c += group.size) {
    const float z = moerec::to_f32(row[c]);
    z_row[c] = z;
    if (!is_active(expert_mask, c)) continue;
    if (isnan(z) || z == positive_infinity()) {
      // The lane's first bad column is its lowest; the status keeps the lowest of all.
      if (!non_finite) moerec::report_position(status, row_position + c);
      non_finite = true;
    }
    row_max = fmaxf(row_max, z);
  }
  row_max = group.max(row_max);
  non_finite = group.any(non_finite);
  if (!non_finite && row_max == -positive_infinity()) {
    uint32_t first_active = kNone;  // a lane's first active column is its lowest
    for (uint32_t c = group.lane; c < experts && first_active == kNone; c += group.size) {
      if (is_active(expert_mask, c)) first_active = c;
    }
    first_active = group.min(first_active);
    if (group.lane == 0) moerec::report_position(status, row_position + first_active);
  }
  const Anchor anchor = Anchor::of(row_max, sigmoid);
  float sum_exp = 0.0f;
  float relative_sum = 0.0f;
  for (uint32_t c = group.lane; c < experts; c += group.size) {
    if (!is_active(expert_mask, c)) continue;
    sum_exp += expf(z_row[c] - row_max);
    if (sigmoid) relative_sum += anchor.relative(z_row[c]);
  }
  sum_exp = group.sum(sum_exp);
  return RowStats{anchor, sum_exp, sigmoid ? group.sum(relative_sum) : sum_exp};
}

// slots[c] = c's rank among the active keys when it is below k. Reads every
// lane's keys: the caller has staged them and synchronised the group.
__device__ void select_by_rank(const uint32_t* keys, uint32_t* slots, uint32_t experts, uint32_t k,
                               const Group& group) {
  for (uint32_t c = group.lane; c < experts; c += group.size) {
    const unsigned long long mine = candidate(keys[c], c);
    if (mine == 0) continue;
    uint32_t rank = 0;
    for (uint32_t j = 0; j < experts; ++j) rank += candidate(keys[j], j) > mine ? 1u : 0u;
    if (rank < k) slots[c] = rank;
  }
}

// Round j finds the largest candidate below round j - 1's and gives its
// owner slot j. Reads only this lane's keys.
__device__ void select_by_rounds(const uint32_t* keys, uint32_t* slots, uint32_t experts, uint32_t k,
                                 const Group& group) {
  unsigned long long previous = ~0ull;
  for (uint32_t j = 0; j < k; ++j) {
    unsigned long long best = 0;
    for (uint32_t c = group.lane; c < experts; c += group.size) {
      const unsigned long long mine = candidate(keys[c], c);
      if (mine < previous && mine > best) best = mine;
    }
    best = group.max(best);
    if (best == 0) return;  // fewer candidates than k: only on input the op API refuses
    previous = best;
    const uint32_t winner = ~static_cast<uint32_t>(best);
    if (winner % group.size == group.lane) slots[winner] = j;
  }
}

struct RowOutputs {
  uint32_t* indices;      // the row's k indices
  float* weights;         // the row's k weights
  uint32_t* expert_keys;  // the row's k grouping keys
};

// The renormaliser of the experts with slots[c] != kNone (this lane's c).
__device__ Renormaliser renormaliser_of_slots(const float* z_row, const uint32_t* slots, uint32_t experts,
                                              bool sigmoid, const Group& group) {
  float anchor = -positive_infinity();
  for (uint32_t c = group.lane; c < experts; c += group.size) {
    if (slots[c] != kNone) anchor = fmaxf(anchor, z_row[c]);
  }
  const Anchor selected_max = Anchor::of(group.max(anchor), sigmoid);
  float sum = 0.0f;
  for (uint32_t c = group.lane; c < experts; c += group.size) {
    if (slots[c] != kNone) sum += selected_max.relative(z_row[c]);
  }
  return Renormaliser{selected_max, group.sum(sum)};
}

// Writes each selected column's expert (base + c) into its slot and adds its
// weight to the lane group's gate mass. Each lane handles its own columns.
__device__ void write_selection(const float* z_row, const uint32_t* slots, const RowStats& stats, bool sigmoid,
                                bool renormalize, uint32_t experts, uint32_t base, const Group& group,
                                const RowOutputs& out, float* gate) {
  Renormaliser renormaliser{};
  if (renormalize) renormaliser = renormaliser_of_slots(z_row, slots, experts, sigmoid, group);
  for (uint32_t c = group.lane; c < experts; c += group.size) {
    const uint32_t slot = slots[c];
    if (slot == kNone) continue;
    const float weight = renormalize ? renormaliser.weight(z_row[c]) : stats.score(z_row[c], sigmoid);
    out.indices[slot] = base + c;
    out.weights[slot] = weight;
    out.expert_keys[slot] = base + c;
    gate[base + c] += weight;
  }
}

// Lane group g of block b routes rows b * lane_groups * rows_per_group + g +
// i * lane_groups for i < rows_per_group, so how the statistics are summed
// depends on the shapes only. Partial row b: [share sums (E), gate sums (E),
// z-loss sum].
template <typename T>
__device__ void route_forward(const T* logits, const uint32_t* expert_mask, const uint32_t* token_mask,
                              const float* selection_bias, unsigned long long rows, uint32_t experts,
                              uint32_t groups, uint32_t group_experts, uint32_t k, uint32_t flags,
                              uint32_t group_size, uint32_t rows_per_group, uint32_t* indices, float* weights,
                              uint32_t* expert_keys, float* partials, unsigned long long* status) {
  const Group group = make_group(group_size);
  const uint32_t lane_groups = blockDim.x / group_size;
  const uint32_t g = threadIdx.x / group_size;
  const uint32_t n = group_experts;
  const uint32_t group_words = kForwardRowWords * n + kForwardExpertWords * experts;
  float* z_row = shared_words + g * group_words;
  uint32_t* keys = reinterpret_cast<uint32_t*>(z_row + n);
  uint32_t* slots = keys + n;
  float* share = z_row + kForwardRowWords * n;
  float* gate = share + experts;
  float* group_z = shared_words + lane_groups * group_words;
  const bool sigmoid = (flags & kSigmoid) != 0;
  const bool renormalize = (flags & kRenormalize) != 0;

  for (uint32_t e = group.lane; e < experts; e += group_size) {
    share[e] = 0.0f;
    gate[e] = 0.0f;
  }
  float z_sum = 0.0f;
  const unsigned long long first_row =
      static_cast<unsigned long long>(blockIdx.x) * lane_groups * rows_per_group + g;
  for (uint32_t i = 0; i < rows_per_group; ++i) {
    const unsigned long long r = first_row + static_cast<unsigned long long>(i) * lane_groups;
    if (r >= rows) break;
    group.sync();  // the previous row's readers of keys[] are done
    const unsigned long long t = r / groups;
    const uint32_t base = static_cast<uint32_t>(r % groups) * n;
    const RowOutputs out{indices + r * k, weights + r * k, expert_keys + r * k};
    const uint32_t token_flag = token_mask == nullptr ? 1u : token_mask[t];
    if (token_flag > 1u && group.lane == 0) moerec::report_position(status + 1, t);
    if (token_flag != 1u) {
      for (uint32_t j = group.lane; j < k; j += group_size) {
        out.indices[j] = kNone;
        out.weights[j] = 0.0f;
        out.expert_keys[j] = experts;  // the grouping sentinel: no row
      }
      continue;
    }
    const uint32_t* group_mask = expert_mask == nullptr ? nullptr : expert_mask + base;
    const RowStats stats = load_row(logits + r * n, group_mask, n, sigmoid, r * n, group, z_row, status);
    const float lse = stats.lse();
    z_sum += lse * lse;
    for (uint32_t c = group.lane; c < n; c += group_size) {
      slots[c] = kNone;
      keys[c] = 0u;
      if (!is_active(group_mask, c)) continue;
      keys[c] = selection_key(z_row[c], selection_bias == nullptr ? 0.0f : selection_bias[base + c]);
      share[base + c] += stats.share(z_row[c]);
    }
    if (flags & kRankSelection) {
      group.sync();  // every lane's keys are staged
      select_by_rank(keys, slots, n, k, group);
    } else {
      select_by_rounds(keys, slots, n, k, group);
    }
    write_selection(z_row, slots, stats, sigmoid, renormalize, n, base, group, out, gate);
  }

  __syncthreads();
  if (group.lane == 0) group_z[g] = z_sum;
  __syncthreads();
  const uint32_t columns = 2 * experts + 1;
  float* partial = partials + static_cast<unsigned long long>(blockIdx.x) * columns;
  for (uint32_t e = threadIdx.x; e < experts; e += blockDim.x) {
    float share_sum = 0.0f;
    float gate_sum = 0.0f;
    for (uint32_t h = 0; h < lane_groups; ++h) {
      const float* words = shared_words + h * group_words + kForwardRowWords * n;
      share_sum += words[e];
      gate_sum += words[experts + e];
    }
    partial[e] = share_sum;
    partial[experts + e] = gate_sum;
  }
  if (threadIdx.x == 0) {
    float z_total = 0.0f;
    for (uint32_t h = 0; h < lane_groups; ++h) z_total += group_z[h];
    partial[2 * experts] = z_total;
  }
}

// grad[c] += dL/dv_c of sum_j dweights[j] * weights[j] over the row's selected
// experts (global indices; column c = index - base), v = log of the
// unnormalised score. Renormalised weights are a ratio
// w = u / sum u over the selection: dL/dv_j = w_j (dw_j - <dw, w>). Plain
// scores give dw_j p_j, and for softmax also -p_c <dw, p> for every active c,
// which the caller subtracts: the returned <dw, p> (0 otherwise).
__device__ float add_weight_gradient(const float* z_row, float* grad, const uint32_t* row_indices,
                                     const float* row_dweights, uint32_t k, uint32_t experts, uint32_t base,
                                     const RowStats& stats, bool sigmoid, bool renormalize, const Group& group) {
  if (renormalize) {
    float anchor = -positive_infinity();
    for (uint32_t j = group.lane; j < k; j += group.size) {
      const uint32_t e = row_indices[j] - base;  // an index outside the group wraps to >= experts
      if (e < experts) anchor = fmaxf(anchor, z_row[e]);
    }
    const Anchor selected_max = Anchor::of(group.max(anchor), sigmoid);
    float sum = 0.0f;
    for (uint32_t j = group.lane; j < k; j += group.size) {
      const uint32_t e = row_indices[j] - base;
      if (e < experts) sum += selected_max.relative(z_row[e]);
    }
    const Renormaliser renormaliser{selected_max, group.sum(sum)};
    float weighted = 0.0f;
    for (uint32_t j = group.lane; j < k; j += group.size) {
      const uint32_t e = row_indices[j] - base;
      if (e < experts) weighted += row_dweights[j] * renormaliser.weight(z_row[e]);
    }
    weighted = group.sum(weighted);
    for (uint32_t j = group.lane; j < k; j += group.size) {
      const uint32_t e = row_indices[j] - base;
      if (e < experts) grad[e] += renormaliser.weight(z_row[e]) * (row_dweights[j] - weighted);
    }
    return 0.0f;
  }
  float weighted = 0.0f;
  for (uint32_t j = group.lane; j < k; j += group.size) {
    const uint32_t e = row_indices[j] - base;
    if (e >= experts) continue;
    const float p = stats.score(z_row[e], sigmoid);
    grad[e] += row_dweights[j] * p;
    weighted += row_dweights[j] * p;
  }
  return sigmoid ? 0.0f : group.sum(weighted);
}

// dZ of sum(dweights * weights) + lb_coef * lb_loss + z_coef * z_loss with the
// selection and the load fractions held fixed, one routing row r = t G + g
// per lane group, over its group's columns. grad_scales [E + 1] holds
// N'_g / G * f_e / T' per expert (0 when inactive) and 1 / (T' G) last
// (routing_finalize). Each term is
// differentiated through v = log of the unnormalised score (z, or
// log sigmoid(z)), so nothing is divided by a sum of scores: a ratio
// y = u / sum u gives dL/dv_i = y_i (g_i - <g, y>), and dz = dv/dz * dL/dv.
template <typename T>
__device__ void route_backward(const T* logits, const uint32_t* expert_mask, const uint32_t* token_mask,
                               const uint32_t* indices, const float* dweights, const float* grad_scales,
                               float lb_coef, float z_coef, unsigned long long rows, uint32_t experts,
                               uint32_t groups, uint32_t group_experts, uint32_t k, uint32_t flags,
                               uint32_t group_size, float* dlogits, unsigned long long* status) {
  const Group group = make_group(group_size);
  const uint32_t lane_groups = blockDim.x / group_size;
  const uint32_t g = threadIdx.x / group_size;
  const uint32_t n = group_experts;
  float* z_row = shared_words + g * kBackwardWords * n;
  float* grad = z_row + n;  // dL/dv
  const bool sigmoid = (flags & kSigmoid) != 0;
  const bool renormalize = (flags & kRenormalize) != 0;
  const float inv_valid_rows = grad_scales[experts];
  const unsigned long long group_stride = static_cast<unsigned long long>(gridDim.x) * lane_groups;
  for (unsigned long long r = static_cast<unsigned long long>(blockIdx.x) * lane_groups + g; r < rows;
       r += group_stride) {
    group.sync();  // the previous row's readers of z_row[] and grad[] are done
    float* out = dlogits + r * n;
    if (token_mask != nullptr && token_mask[r / groups] != 1u) {
      for (uint32_t c = group.lane; c < n; c += group_size) out[c] = 0.0f;
      continue;
    }
    const uint32_t base = static_cast<uint32_t>(r % groups) * n;
    const uint32_t* group_mask = expert_mask == nullptr ? nullptr : expert_mask + base;
    const float* group_scales = grad_scales + base;
    const RowStats stats = load_row(logits + r * n, group_mask, n, sigmoid, r * n, group, z_row, status);
    // Load balance: sum_e c_e q_e with c_e = lb_coef * grad_scales[e] and q
    // the shares, a ratio over the active experts.
    float balance = 0.0f;
    for (uint32_t c = group.lane; c < n; c += group_size) {
      grad[c] = is_active(group_mask, c) ? stats.share(z_row[c]) : 0.0f;  // staged: the lane's own columns
      balance += lb_coef * group_scales[c] * grad[c];
    }
    balance = group.sum(balance);
    for (uint32_t c = group.lane; c < n; c += group_size) grad[c] *= lb_coef * group_scales[c] - balance;
    group.sync();  // grad[] and z_row[] of every lane are staged
    const float weighted = add_weight_gradient(z_row, grad, indices + r * k, dweights + r * k, k, n, base, stats,
                                               sigmoid, renormalize, group);
    group.sync();
    // z-loss: d lse^2 / dz = 2 lse softmax(z), averaged over the valid rows.
    const float z_scale = z_coef * 2.0f * stats.lse() * inv_valid_rows;
    for (uint32_t c = group.lane; c < n; c += group_size) {
      if (!is_active(group_mask, c)) {
        out[c] = 0.0f;
        continue;
      }
      // d log(unnormalised score) / dz: 1 for e^z, 1 - p for a sigmoid.
      const float z = z_row[c];
      const float p = stats.score(z, sigmoid);
      const float dv = grad[c] - weighted * p;
      const float softmax = !sigmoid ? p : (z_scale != 0.0f ? stats.softmax(z) : 0.0f);
      out[c] = (sigmoid ? 1.0f - p : 1.0f) * dv + z_scale * softmax;
    }
  }
}
}  // namespace

#define MOEREC_ROUTING(suffix, T)                                                                                 \
  extern "C" __global__ void __launch_bounds__(kMaxRowThreads)                                                    \
      routing_forward_##suffix(                                                                                   \
      const T* logits, const uint32_t* expert_mask, const uint32_t* token_mask, const float* selection_bias,      \
      unsigned long long rows, uint32_t experts, uint32_t groups, uint32_t group_experts, uint32_t k,             \
      uint32_t flags, uint32_t group_size, uint32_t rows_per_group, uint32_t* indices, float* weights,            \
      uint32_t* expert_keys, float* partials, unsigned long long* status) {                                       \
    route_forward<T>(logits, expert_mask, token_mask, selection_bias, rows, experts, groups, group_experts, k,    \
                     flags, group_size, rows_per_group, indices, weights, expert_keys, partials, status);         \
  }                                                                                                               \
  extern "C" __global__ void __launch_bounds__(kMaxRowThreads)                                                    \
      routing_backward_##suffix(                                                                                  \
      const T* logits, const uint32_t* expert_mask, const uint32_t* token_mask, const uint32_t* indices,          \
      const float* dweights, const float* grad_scales, float lb_coef, float z_coef, unsigned long long rows,      \
      uint32_t experts, uint32_t groups, uint32_t group_experts, uint32_t k, uint32_t flags, uint32_t group_size, \
      float* dlogits, unsigned long long* status) {                                                               \
    route_backward<T>(logits, expert_mask, token_mask, indices, dweights, grad_scales, lb_coef, z_coef, rows,     \
                      experts, groups, group_experts, k, flags, group_size, dlogits, status);                     \
  }
MOEREC_FOR_EACH_FLOAT(MOEREC_ROUTING)

// totals[c] = sum over the forward's blocks b of partials[b, c], b in a fixed
// order: row y of the 32x32 block sums b = y, y + 32, ..., then row 0 adds
// the 32 partial sums in order.
extern "C" __global__ void __launch_bounds__(32 * 32)
    routing_reduce_partials(const float* partials, uint32_t blocks, uint32_t columns,
                            float* totals) {
  __shared__ float sums[32][33];
  const uint32_t column = blockIdx.x * 32 + threadIdx.x;
  float sum = 0.0f;
  if (column < columns) {
    for (uint32_t b = threadIdx.y; b < blocks; b += 32) {
      sum += partials[static_cast<unsigned long long>(b) * columns + column];
    }
  }
  sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && column < columns) {
    float total = 0.0f;
    for (int y = 0; y < 32; ++y) total += sums[y][threadIdx.x];
    totals[column] = total;
  }
}

// One block. From the summed statistics totals [2E + 1] and the plan, with
// T' = R / (k G) valid tokens: the gate mass, lb_loss = sum_e N'_g(e) / G *
// f_e * P_e (the mean over the expert groups of each group's loss) with
// f_e = counts_e / (T' k) and P_e = share_e / T', z_loss = (sum of lse^2) /
// (T' G), and grad_scales [E + 1] for the backward (N'_g / G * f_e / T' per
// active expert, then 1 / (T' G)). Warp w counts the active experts N'_g of
// groups w, w + 8, ... and handles their experts (as Losses in
// src/ops/routing/cpu.rs).
extern "C" __global__ void __launch_bounds__(kFinalizeThreads)
    routing_finalize(const float* totals, const uint32_t* counts, const uint32_t* offsets,
                     const uint32_t* expert_mask, uint32_t experts, uint32_t groups,
                     uint32_t group_experts, uint32_t k, float* gate_mass, float* lb_loss,
                     float* z_loss, float* grad_scales) {
  constexpr uint32_t kWarps = kFinalizeThreads / 32;
  __shared__ float warp_sums[kWarps];
  const uint32_t rows = offsets[experts];
  const uint32_t valid_rows = rows / k;
  const float valid_tokens = static_cast<float>(valid_rows / groups);
  const uint32_t lane = threadIdx.x & 31;
  float balance = 0.0f;
  for (uint32_t g = threadIdx.x / 32; g < groups; g += kWarps) {
    const uint32_t base = g * group_experts;
    uint32_t active = 0;
    for (uint32_t c = lane; c < group_experts; c += 32) active += is_active(expert_mask, base + c) ? 1u : 0u;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) active += __shfl_xor_sync(0xffffffffu, active, offset);
    const float scale = static_cast<float>(active) / static_cast<float>(groups);
    for (uint32_t c = lane; c < group_experts; c += 32) {
      const uint32_t e = base + c;
      gate_mass[e] = totals[experts + e];
      const bool live = is_active(expert_mask, e) && valid_tokens > 0.0f;
      const float fraction = live ? static_cast<float>(counts[e]) / (valid_tokens * static_cast<float>(k)) : 0.0f;
      balance += live ? scale * fraction * (totals[e] / valid_tokens) : 0.0f;
      grad_scales[e] = live ? scale * fraction / valid_tokens : 0.0f;
    }
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) balance += __shfl_xor_sync(0xffffffffu, balance, offset);
  if (lane == 0) warp_sums[threadIdx.x / 32] = balance;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (uint32_t w = 0; w < kWarps; ++w) total += warp_sums[w];
    const bool any_valid = valid_rows > 0;
    *lb_loss = any_valid ? total : 0.0f;
    *z_loss = any_valid ? totals[2 * experts] / static_cast<float>(valid_rows) : 0.0f;
    grad_scales[experts] = any_valid ? 1.0f / static_cast<float>(valid_rows) : 0.0f;
  }
}

// counts [E] and offsets [E + 1] from the groups (keys ascending, starts into
// the grouped order): offsets[e] is the start of the first group whose key is
// >= e. rows_out receives R = offsets[E], the number of dispatched rows.
extern "C" __global__ void __launch_bounds__(moerec::kBlockThreads)
    routing_plan_counts(const uint32_t* group_keys, const uint32_t* group_starts,
                        const uint32_t* group_count, uint32_t experts, uint32_t* counts,
                        uint32_t* offsets, unsigned long long* rows_out) {
  const uint32_t count = *group_count;
  for (unsigned long long i = moerec::global_thread_index(); i <= experts; i += moerec::global_thread_count()) {
    const uint32_t e = static_cast<uint32_t>(i);
    uint32_t lo = 0;
    uint32_t hi = count;
    while (lo < hi) {
      const uint32_t mid = lo + (hi - lo) / 2;
      if (group_keys[mid] < e) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    offsets[e] = group_starts[lo];
    if (e < experts) {
      counts[e] = lo < count && group_keys[lo] == e ? group_starts[lo + 1] - group_starts[lo] : 0u;
    } else {
      *rows_out = group_starts[lo];
    }
  }
}

// order is the grouped permutation of the T*G*k (routing row, slot) positions:
// its first R entries are the dispatched rows, the rest the invalid tokens'
// slots.
extern "C" __global__ void __launch_bounds__(moerec::kBlockThreads)
    routing_plan_rows(const uint32_t* order, uint32_t slots, uint32_t k,
                      const uint32_t* offsets, uint32_t experts, uint32_t* token_of_row,
                      uint32_t* row_of_slot) {
  const uint32_t rows = offsets[experts];
  for (unsigned long long r = moerec::global_thread_index(); r < slots; r += moerec::global_thread_count()) {
    const uint32_t slot = order[r];
    if (r < rows) {
      token_of_row[r] = slot / k;
      row_of_slot[slot] = static_cast<uint32_t>(r);
    } else {
      row_of_slot[slot] = kNone;
    }
  }
}
