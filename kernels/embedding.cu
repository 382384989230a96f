// Per-head multi-embedding lookup (DESIGN 4.1).
//
// forward   Y[t, h, :] = W[h, ids[t], :], a zero row for the padding id.
//           A pure gather: its floor is T*H*D*size bytes read and written plus
//           4*T bytes of ids, over the copy bandwidth. Rows move in the widest
//           unit (16, 8, 4 or 2 bytes) that the row width and the pointers
//           allow, so the kernel is per unit width, not per dtype.
// backward  dW rows of the unique ids: src/ops/embedding/cuda.rs maps ids to
//           grouping keys (embedding_backward_keys), groups them with the
//           grouping primitive (grouping.cu), then sums each group in
//           ascending token order (embedding_backward_values), f32.
// update    densify / SGD / row-wise Adagrad of a sparse gradient; the rows are
//           checked first (embedding_check_rows) and the update kernels do
//           nothing when the check failed, so an Err leaves the table as it was.
#include "common.cuh"

namespace {
constexpr int kThreads = 256;
constexpr int kUnitsPerThread = 8;
constexpr unsigned long long kUnitsPerBlock = kThreads * kUnitsPerThread;

// Each block copies a contiguous chunk of output units. 64-bit division only
// once per thread; the per-unit arithmetic stays 32-bit.
template <typename Unit>
__device__ void gather_rows(const Unit* table, const uint32_t* ids, unsigned long long padding, unsigned long long num_tokens,
                            uint32_t heads, uint32_t num_rows, uint32_t units_per_row, Unit* out,
                            unsigned long long* status) {
  const uint32_t units_per_token = heads * units_per_row;
  const unsigned long long total = num_tokens * units_per_token;
  const unsigned long long chunk = blockIdx.x * kUnitsPerBlock;
  const unsigned long long chunk_token = chunk / units_per_token;
  const uint32_t chunk_unit = static_cast<uint32_t>(chunk % units_per_token);
#pragma unroll
  for (int j = 0; j < kUnitsPerThread; ++j) {
    const uint32_t local = j * kThreads + threadIdx.x;
    if (chunk + local >= total) break;
    const uint32_t in_chunk = chunk_unit + local;
    const unsigned long long t = chunk_token + in_chunk / units_per_token;
    const uint32_t in_token = in_chunk % units_per_token;
    const uint32_t h = in_token / units_per_row;
    const uint32_t c = in_token % units_per_row;
    const uint32_t id = __ldg(ids + t);
    Unit value{};
    if (id != padding) {
      if (id < num_rows) {
        value = __ldg(table + (static_cast<unsigned long long>(h) * num_rows + id) * units_per_row + c);
      } else if (in_token == 0) {
        moerec::report_position(status, t);
      }
    }
    out[chunk + local] = value;
  }
}
}  // namespace

#define MOEREC_EMBEDDING_FORWARD(name, Unit)                                                              \
  extern "C" __global__ void __launch_bounds__(moerec::kBlockThreads) embedding_forward_##name(           \
      const Unit* table, const uint32_t* ids, unsigned long long padding, unsigned long long num_tokens,  \
      uint32_t heads, uint32_t num_rows, uint32_t units_per_row, Unit* out, unsigned long long* status) { \
    gather_rows<Unit>(table, ids, padding, num_tokens, heads, num_rows, units_per_row, out, status);      \
  }
MOEREC_EMBEDDING_FORWARD(u128, uint4)
MOEREC_EMBEDDING_FORWARD(u64, uint2)
MOEREC_EMBEDDING_FORWARD(u32, uint32_t)
MOEREC_EMBEDDING_FORWARD(u16, uint16_t)

// Grouping key of each token: its id, or num_rows (the sentinel, sorted last and
// in no group) for the padding id and for an out-of-range id, which is reported.
// `padding` is 64-bit so that "no padding" (u64::MAX) equals no u32 id.
extern "C" __global__ void __launch_bounds__(moerec::kBlockThreads)
    embedding_backward_keys(const uint32_t* ids, uint32_t num_tokens, unsigned long long padding,
                            uint32_t num_rows, uint32_t* keys, unsigned long long* status) {
  for (unsigned long long t = moerec::global_thread_index(); t < num_tokens; t += moerec::global_thread_count()) {
    const uint32_t id = ids[t];
    const bool in_table = id < num_rows && id != padding;
    if (id >= num_rows && id != padding) moerec::report_position(status, t);
    keys[t] = in_table ? id : num_rows;
  }
}

// values[h, u, d] = sum over the tokens of group u, in ascending position, of
// dy[t, h, d]. One thread per output element, d fastest so reads of dy coalesce.
extern "C" __global__ void __launch_bounds__(moerec::kBlockThreads)
    embedding_backward_values(const float* dy, const uint32_t* token_order,
                              const uint32_t* group_starts, uint32_t heads, uint32_t width,
                              uint32_t unique_rows, float* values) {
  const unsigned long long total = static_cast<unsigned long long>(heads) * unique_rows * width;
  for (unsigned long long e = moerec::global_thread_index(); e < total; e += moerec::global_thread_count()) {
    const uint32_t d = static_cast<uint32_t>(e % width);
    const unsigned long long hu = e / width;
    const uint32_t u = static_cast<uint32_t>(hu % unique_rows);
    const uint32_t h = static_cast<uint32_t>(hu / unique_rows);
    float sum = 0.0f;
    for (uint32_t i = group_starts[u]; i < group_starts[u + 1]; ++i) {
      const unsigned long long t = token_order[i];
      sum += dy[(t * heads + h) * width + d];
    }
    values[e] = sum;
  }
}

// Sparse rows must be strictly ascending and inside the table: a repeated row
// would race in the in-place updates. Reports the lowest bad position.
extern "C" __global__ void __launch_bounds__(moerec::kBlockThreads)
    embedding_check_rows(const uint32_t* rows, uint32_t unique_rows, uint32_t num_rows,
                         unsigned long long* status) {
  for (unsigned long long u = moerec::global_thread_index(); u < unique_rows; u += moerec::global_thread_count()) {
    if (rows[u] >= num_rows || (u > 0 && rows[u] <= rows[u - 1])) moerec::report_position(status, u);
  }
}

namespace {
__device__ __forceinline__ bool rows_rejected(const unsigned long long* status) {
  return *status != moerec::kStatusClean;
}

// dense[h, rows[u], :] = values[h, u, :]; the rest of dense is zero already.
__device__ void densify_rows(const uint32_t* rows, const float* values, uint32_t heads, uint32_t unique_rows,
                             uint32_t num_rows, uint32_t width, float* dense, const unsigned long long* status) {
  if (rows_rejected(status)) return;
  const unsigned long long total = static_cast<unsigned long long>(heads) * unique_rows * width;
  for (unsigned long long e = moerec::global_thread_index(); e < total; e += moerec::global_thread_count()) {
    const uint32_t d = static_cast<uint32_t>(e % width);
    const unsigned long long hu = e / width;
    const uint32_t u = static_cast<uint32_t>(hu % unique_rows);
    const unsigned long long h = hu / unique_rows;
    dense[(h * num_rows + rows[u]) * width + d] = values[e];
  }
}

template <typename T>
__device__ void sgd_rows(T* table, const uint32_t* rows, const float* values, uint32_t heads, uint32_t unique_rows,
                         uint32_t num_rows, uint32_t width, float lr, const unsigned long long* status) {
  if (rows_rejected(status)) return;
  const unsigned long long total = static_cast<unsigned long long>(heads) * unique_rows * width;
  for (unsigned long long e = moerec::global_thread_index(); e < total; e += moerec::global_thread_count()) {
    const uint32_t d = static_cast<uint32_t>(e % width);
    const unsigned long long hu = e / width;
    const uint32_t u = static_cast<uint32_t>(hu % unique_rows);
    const unsigned long long h = hu / unique_rows;
    T* w = table + (h * num_rows + rows[u]) * width + d;
    *w = moerec::from_f32<T>(moerec::to_f32(*w) - lr * values[e]);
  }
}

// One warp per (head, row): the mean of g^2 is a warp reduction whose shape
// depends on the width only, so it is deterministic.
template <typename T>
__device__ void adagrad_rows(T* table, float* state, const uint32_t* rows, const float* values, uint32_t heads,
                             uint32_t unique_rows, uint32_t num_rows, uint32_t width, float lr, float eps,
                             const unsigned long long* status) {
  if (rows_rejected(status)) return;
  const uint32_t lane = threadIdx.x & 31;
  const unsigned long long warps = moerec::global_thread_count() / 32;
  const unsigned long long total = static_cast<unsigned long long>(heads) * unique_rows;
  for (unsigned long long hu = moerec::global_thread_index() / 32; hu < total; hu += warps) {
    const uint32_t u = static_cast<uint32_t>(hu % unique_rows);
    const unsigned long long h = hu / unique_rows;
    const float* g = values + hu * width;
    float square_sum = 0.0f;
    for (uint32_t d = lane; d < width; d += 32) square_sum += g[d] * g[d];
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) square_sum += __shfl_xor_sync(0xffffffffu, square_sum, offset);
    const unsigned long long row = h * num_rows + rows[u];
    const float accumulated = state[row] + square_sum / static_cast<float>(width);
    const float step = lr / (sqrtf(accumulated) + eps);
    T* w = table + row * width;
    for (uint32_t d = lane; d < width; d += 32) w[d] = moerec::from_f32<T>(moerec::to_f32(w[d]) - step * g[d]);
    __syncwarp();
    if (lane == 0) state[row] = accumulated;
  }
}
}  // namespace

extern "C" __global__ void __launch_bounds__(moerec::kBlockThreads)
    embedding_densify(const uint32_t* rows, const float* values, uint32_t heads,
                      uint32_t unique_rows, uint32_t num_rows, uint32_t width, float* dense,
                      const unsigned long long* status) {
  densify_rows(rows, values, heads, unique_rows, num_rows, width, dense, status);
}

#define MOEREC_EMBEDDING_UPDATES(suffix, T)                                                                    \
  extern "C" __global__ void __launch_bounds__(moerec::kBlockThreads)                                          \
      embedding_sgd_##suffix(T* table, const uint32_t* rows, const float* values,                              \
                             uint32_t heads, uint32_t unique_rows, uint32_t num_rows,                          \
                             uint32_t width, float lr, const unsigned long long* status) {                     \
    sgd_rows<T>(table, rows, values, heads, unique_rows, num_rows, width, lr, status);                         \
  }                                                                                                            \
  extern "C" __global__ void __launch_bounds__(moerec::kBlockThreads)                                          \
      embedding_adagrad_##suffix(                                                                              \
      T* table, float* state, const uint32_t* rows, const float* values, uint32_t heads, uint32_t unique_rows, \
      uint32_t num_rows, uint32_t width, float lr, float eps, const unsigned long long* status) {              \
    adagrad_rows<T>(table, state, rows, values, heads, unique_rows, num_rows, width, lr, eps, status);         \
  }
MOEREC_FOR_EACH_FLOAT(MOEREC_EMBEDDING_UPDATES)
