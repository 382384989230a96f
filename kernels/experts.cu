// Grouped expert matmul (DESIGN 4.3): one expert layer over a dispatch plan,
// its backward, and the combine of expert rows back into tokens.
//
// plan checks  experts_check_plan (offsets against counts and R, token_of_row
//              < T), experts_index_slots + experts_check_named (every row
//              named by exactly one slot, of its own token; also builds
//              row_slot, the slot of each row). They report into the status
//              word; every later kernel that trusts the plan does nothing
//              when it is dirty, and experts_row_blocks schedules no tiles.
// forward      h = x[token_of_row] W[e] + b[e], y = act(h), one launch for all
//              experts (experts_gemm.cuh: tile scheduler over the plan's
//              offsets built on the device, gather fused into the A load,
//              bias + activation + the saved h in the epilogue).
//              experts_forward_mma_*: bf16/f16 on tensor cores (mma.sync,
//              f32 accumulate); experts_forward_simt_*: f32 SIMT, every dtype
//              and shape (odd widths, unaligned operands). Floor: 2 R Din Dout'
//              FLOPs over the matrix rate; bytes x, W, h, y.
// backward     experts_dh (act' at the saved h), experts_dx_rows (dh W^T per
//              expert), experts_gather_dx (slots in order, no atomics),
//              experts_dweights (x^T dh per row chunk, bias as a column of
//              ones, into partial buffers) + experts_merge_dweights (chunks in
//              order). f32: SIMT tiles; bf16/f16: the same tiles on tensor
//              cores with dh and the stored operand split exactly into bf16
//              pieces (experts_gemm.cuh, split_mainloop), so every product
//              is exact and the f32 gradients see no bf16 rounding (3 or 6
//              tensor-core products per multiply-add); the mma's f32
//              accumulation has the hardware's order and rounding (DESIGN 6:
//              the bf16/f16 tolerance on a GPU). Floor:
//              4 R Din Dout' FLOPs.
// combine      experts_combine (rho res + slots in order), experts_row_norms +
//              experts_util (|w| ||y_r|| summed per expert, fixed tree), and
//              the backward in three gathers (rows, slots, tokens).
#include "experts_gemm.cuh"

namespace {
using moerec::experts::ForwardCols;
using moerec::experts::kMmaK;
using moerec::experts::kMmaM;
using moerec::experts::kMmaN;
using moerec::experts::kMmaThreads;
using moerec::experts::kSimtK;
using moerec::experts::kSimtM;
using moerec::experts::kSimtN;
using moerec::experts::kSimtThreads;
using moerec::experts::MmaShared;
using moerec::experts::RowTile;
using moerec::experts::SimtShared;

constexpr uint32_t kEmptySlot = 0xffffffffu;
// Activation codes (src/ops/experts/mod.rs, Activation::code).
constexpr uint32_t kRelu = 1;
constexpr uint32_t kGelu = 2;
constexpr uint32_t kSilu = 3;
constexpr uint32_t kSwiGlu = 4;
constexpr uint32_t kUtilThreads = 256;

__device__ __forceinline__ bool plan_rejected(const unsigned long long* status) {
  return *status != moerec::kStatusClean;
}

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// The activations at +-inf are their limits (x -> +inf: act = +inf and
// act' = 1; x -> -inf: act = act' = 0), as on the CPU; the formulas alone
// would give inf * 0 = NaN there.
__device__ __forceinline__ float silu(float x) { return isinf(x) ? fmaxf(x, 0.0f) : x * sigmoid(x); }

__device__ __forceinline__ float silu_grad(float x) {
  if (isinf(x)) return x > 0.0f ? 1.0f : 0.0f;
  const float s = sigmoid(x);
  return s * (1.0f + x * (1.0f - s));
}

// act(h) for the element-wise activations (SwiGlu is handled in pairs).
__device__ __forceinline__ float activate(uint32_t activation, float h) {
  switch (activation) {
    case kRelu:
      return fmaxf(h, 0.0f);
    case kGelu:
      return isinf(h) ? fmaxf(h, 0.0f) : h * 0.5f * (1.0f + erff(h * 0.70710678118654752f));
    case kSilu:
      return silu(h);
    default:
      return h;
  }
}

// act'(h); relu'(0) = 0.
__device__ __forceinline__ float activate_grad(uint32_t activation, float h) {
  switch (activation) {
    case kRelu:
      return h > 0.0f ? 1.0f : 0.0f;
    case kGelu: {
      if (isinf(h)) return h > 0.0f ? 1.0f : 0.0f;
      const float cdf = 0.5f * (1.0f + erff(h * 0.70710678118654752f));
      const float pdf = expf(-0.5f * h * h) * 0.39894228040143268f;
      return cdf + h * pdf;
    }
    case kSilu:
      return silu_grad(h);
    default:
      return 1.0f;
  }
}

__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

__device__ __forceinline__ unsigned long long global_warp() { return moerec::global_thread_index() / 32; }
__device__ __forceinline__ unsigned long long warp_count() { return moerec::global_thread_count() / 32; }

__device__ __forceinline__ uint32_t source_row(const uint32_t* token_of_row, uint32_t row) {
  return token_of_row != nullptr ? token_of_row[row] : row;
}

// Stores one forward output: h (the saved pre-activation) and y = act(h),
// from the unrounded f32 h. For SwiGlu `up` is the partner column's h.
template <typename T>
__device__ __forceinline__ void store_forward(const ForwardCols& cols, uint32_t activation, const T* bias,
                                              uint32_t expert, uint32_t row, uint32_t col, float gate, float up,
                                              T* h, T* y) {
  const unsigned long long width = cols.swiglu ? 2ull * cols.dout : cols.dout;
  if (bias != nullptr) gate += moerec::to_f32(bias[expert * width + col]);
  h[row * width + col] = moerec::from_f32<T>(gate);
  if (cols.swiglu) {
    if (bias != nullptr) up += moerec::to_f32(bias[expert * width + cols.dout + col]);
    h[row * width + cols.dout + col] = moerec::from_f32<T>(up);
    y[static_cast<unsigned long long>(row) * cols.dout + col] = moerec::from_f32<T>(silu(gate) * up);
  } else {
    y[static_cast<unsigned long long>(row) * cols.dout + col] = moerec::from_f32<T>(activate(activation, gate));
  }
}
}  // namespace

// ------------------------------------------------------------ plan checks

// offsets[0] = 0, offsets[e + 1] = offsets[e] + counts[e], offsets[E] = R; and,
// when check_tokens, token_of_row[r] < tokens.
extern "C" __global__ void __launch_bounds__(moerec::kBlockThreads)
    experts_check_plan(const uint32_t* counts, const uint32_t* offsets,
                       const uint32_t* token_of_row, uint32_t experts, uint32_t rows,
                       uint32_t tokens, uint32_t check_tokens, unsigned long long* status) {
  const unsigned long long items = max(static_cast<unsigned long long>(experts) + 1, static_cast<unsigned long long>(rows));
  for (unsigned long long i = moerec::global_thread_index(); i < items; i += moerec::global_thread_count()) {
    if (i <= experts) {
      const unsigned long long expected =
          i == 0 ? 0ull : static_cast<unsigned long long>(offsets[i - 1]) + counts[i - 1];
      if (offsets[i] != expected || (i == experts && offsets[i] != rows)) moerec::report_position(status, i);
    }
    if (check_tokens != 0 && i < rows && token_of_row[i] >= tokens) moerec::report_position(status, experts + 1 + i);
  }
}

// row_slot[r] = 1 + the slot naming row r (row_slot zeroed before). A slot
// naming a row out of range, of another token, or already named is reported.
extern "C" __global__ void __launch_bounds__(moerec::kBlockThreads)
    experts_index_slots(const uint32_t* row_of_slot, const uint32_t* token_of_row,
                        unsigned long long slots, uint32_t k, uint32_t rows,
                        uint32_t* row_slot, unsigned long long* status) {
  for (unsigned long long s = moerec::global_thread_index(); s < slots; s += moerec::global_thread_count()) {
    const uint32_t row = row_of_slot[s];
    if (row == kEmptySlot) continue;
    if (row >= rows || token_of_row[row] != s / k ||
        atomicCAS(row_slot + row, 0u, static_cast<uint32_t>(s + 1)) != 0u) {
      moerec::report_position(status, s);
    }
  }
}

// Every row must be named by a slot.
extern "C" __global__ void __launch_bounds__(moerec::kBlockThreads)
    experts_check_named(const uint32_t* row_slot, uint32_t rows, unsigned long long* status) {
  for (unsigned long long r = moerec::global_thread_index(); r < rows; r += moerec::global_thread_count()) {
    if (row_slot[r] == 0u) moerec::report_position(status, r);
  }
}

// blocks[e] = ceil(count_e / rows_per_block), blocks[E] = 0 (the grouping scan
// turns them into row-block offsets); all zero when the plan was rejected.
extern "C" __global__ void __launch_bounds__(moerec::kBlockThreads)
    experts_row_blocks(const uint32_t* offsets, uint32_t experts, uint32_t rows_per_block,
                       const unsigned long long* status, uint32_t* blocks) {
  const bool rejected = plan_rejected(status);
  for (unsigned long long e = moerec::global_thread_index(); e <= experts; e += moerec::global_thread_count()) {
    const unsigned long long count = (rejected || e == experts) ? 0u : offsets[e + 1] - offsets[e];
    blocks[e] = static_cast<uint32_t>((count + rows_per_block - 1) / rows_per_block);
  }
}

// ------------------------------------------------------------ forward

namespace {
template <typename T>
__device__ void forward_simt(const T* x, const uint32_t* token_of_row, const T* weights, const T* bias,
                             const uint32_t* offsets, const uint32_t* row_blocks, uint32_t experts, uint32_t din,
                             uint32_t dout, uint32_t activation, T* h, T* y) {
  __shared__ SimtShared s;
  const ForwardCols cols{dout, activation == kSwiGlu ? kSimtN / 2 : kSimtN, activation == kSwiGlu};
  const unsigned long long width = cols.swiglu ? 2ull * dout : dout;
  const uint32_t col_tiles = cols.tiles();
  const uint32_t tid = threadIdx.x;
  const unsigned long long tiles = moerec::experts::tile_count(row_blocks, experts, col_tiles);
  for (unsigned long long tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const RowTile rows = moerec::experts::row_tile(offsets, row_blocks, experts,
                                                   static_cast<uint32_t>(tile / col_tiles), kSimtM);
    const uint32_t c0 = static_cast<uint32_t>(tile % col_tiles) * cols.per_tile;
    // A: this thread loads k = tid % 16 of rows tid / 16 + 16 j, gathered once per tile.
    const T* a_rows[4];
#pragma unroll
    for (uint32_t j = 0; j < 4; ++j) {
      const uint32_t row = rows.begin + tid / 16 + 16 * j;
      a_rows[j] = row < rows.end ? x + static_cast<unsigned long long>(source_row(token_of_row, row)) * din : nullptr;
    }
    // B: this thread loads column tid % 64 of k rows tid / 64 + 4 j.
    const uint32_t b_n = tid % kSimtN;
    const bool b_valid = cols.output_col(c0, b_n, kSimtN / 2) < dout;
    const T* b_column = weights + static_cast<unsigned long long>(rows.expert) * din * width +
                        cols.weight_col(c0, b_n, kSimtN / 2);
    float acc[4][4];
    moerec::experts::simt_mainloop(s, 0, din, acc, [&](uint32_t k0) {
#pragma unroll
      for (uint32_t j = 0; j < 4; ++j) {
        const uint32_t k = k0 + tid % 16;
        s.a[tid % 16][tid / 16 + 16 * j] = (a_rows[j] != nullptr && k < din) ? moerec::to_f32(a_rows[j][k]) : 0.0f;
        const uint32_t kb = tid / kSimtN + 4 * j;
        s.b[kb][b_n] = (b_valid && k0 + kb < din) ? moerec::to_f32(b_column[(k0 + kb) * width]) : 0.0f;
      }
    });
#pragma unroll
    for (uint32_t i = 0; i < 4; ++i) {
      const uint32_t row = rows.begin + moerec::experts::simt_row(i);
      if (row >= rows.end) continue;
#pragma unroll
      for (uint32_t j = 0; j < 4; ++j) {
        // SwiGlu: columns j = 2, 3 are the up halves of j = 0, 1.
        if (cols.swiglu && j >= 2) continue;
        const uint32_t col = cols.output_col(c0, moerec::experts::simt_col(j), kSimtN / 2);
        if (col >= dout) continue;
        store_forward(cols, activation, bias, rows.expert, row, col, acc[i][j], cols.swiglu ? acc[i][j + 2] : 0.0f,
                      h, y);
      }
    }
  }
}

template <typename T>
__device__ void forward_mma(const T* x, const uint32_t* token_of_row, const T* weights, const T* bias,
                            const uint32_t* offsets, const uint32_t* row_blocks, uint32_t experts, uint32_t din,
                            uint32_t dout, uint32_t activation, T* h, T* y) {
  __shared__ __align__(128) MmaShared<T> s;
  const ForwardCols cols{dout, activation == kSwiGlu ? kMmaN / 2 : kMmaN, activation == kSwiGlu};
  const unsigned long long width = cols.swiglu ? 2ull * dout : dout;
  const uint32_t col_tiles = cols.tiles();
  const uint32_t tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const unsigned long long tiles = moerec::experts::tile_count(row_blocks, experts, col_tiles);
  const uint32_t k_tiles = (din + kMmaK - 1) / kMmaK;
  for (unsigned long long tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const RowTile rows =
        moerec::experts::row_tile(offsets, row_blocks, experts, static_cast<uint32_t>(tile / col_tiles), kMmaM);
    const uint32_t c0 = static_cast<uint32_t>(tile % col_tiles) * cols.per_tile;
    // A copies: 16 bytes (8 k) at k (tid % 4) * 8 of rows tid / 4 + 32 j.
    const uint32_t a_k = (tid % 4) * 8;
    const T* a_rows[4];
#pragma unroll
    for (uint32_t j = 0; j < 4; ++j) {
      const uint32_t row = rows.begin + tid / 4 + 32 * j;
      a_rows[j] = row < rows.end ? x + static_cast<unsigned long long>(source_row(token_of_row, row)) * din + a_k
                                 : nullptr;
    }
    // B copies: 8 columns at (tid % 8) * 8 of k rows tid / 8 + 16 j.
    const uint32_t b_n = (tid % 8) * 8;
    const bool b_valid = cols.output_col(c0, b_n, kMmaN / 2) < dout;
    const T* b_column = weights + static_cast<unsigned long long>(rows.expert) * din * width +
                        cols.weight_col(c0, b_n, kMmaN / 2);
    auto load_stage = [&](uint32_t stage, uint32_t k0) {
#pragma unroll
      for (uint32_t j = 0; j < 4; ++j) {
        const bool valid = a_rows[j] != nullptr && k0 + a_k < din;
        moerec::cp_async_16(&s.a[stage][tid / 4 + 32 * j][a_k], valid ? a_rows[j] + k0 : x, valid);
      }
#pragma unroll
      for (uint32_t j = 0; j < 2; ++j) {
        const uint32_t k = k0 + tid / 8 + 16 * j;
        const bool valid = b_valid && k < din;
        moerec::cp_async_16(&s.b[stage][tid / 8 + 16 * j][b_n], valid ? b_column + k * width : weights,
                                     valid);
      }
      moerec::cp_async_commit();
    };
    float acc[2][8][4];
#pragma unroll
    for (uint32_t mt = 0; mt < 2; ++mt) {
#pragma unroll
      for (uint32_t nt = 0; nt < 8; ++nt) {
#pragma unroll
        for (uint32_t q = 0; q < 4; ++q) acc[mt][nt][q] = 0.0f;
      }
    }
    load_stage(0, 0);
    for (uint32_t kt = 0; kt < k_tiles; ++kt) {
      // The other stage was last read before the previous iteration's final
      // barrier, so it can be refilled now. An empty group keeps the
      // wait count uniform on the last tile.
      if (kt + 1 < k_tiles) {
        load_stage((kt + 1) & 1, (kt + 1) * kMmaK);
      } else {
        moerec::cp_async_commit();
      }
      moerec::cp_async_wait_one();
      __syncthreads();
      moerec::experts::mma_stage(s, kt & 1, acc);
      __syncthreads();
    }
    // acc[mt][nt][q]: row 32 warp + 16 mt + lane / 4 (+ 8 for q >= 2), tile
    // column 8 nt + 2 (lane % 4) + (q & 1); SwiGlu's up half is nt + 4.
#pragma unroll
    for (uint32_t mt = 0; mt < 2; ++mt) {
#pragma unroll
      for (uint32_t q = 0; q < 4; ++q) {
        const uint32_t row = rows.begin + 32 * warp + 16 * mt + lane / 4 + (q >= 2 ? 8 : 0);
        if (row >= rows.end) continue;
#pragma unroll
        for (uint32_t nt = 0; nt < 8; ++nt) {
          if (cols.swiglu && nt >= 4) continue;
          const uint32_t col = cols.output_col(c0, 8 * nt + 2 * (lane % 4) + (q & 1), kMmaN / 2);
          if (col >= dout) continue;
          store_forward(cols, activation, bias, rows.expert, row, col, acc[mt][nt][q],
                        cols.swiglu ? acc[mt][nt + 4][q] : 0.0f, h, y);
        }
      }
    }
  }
}
}  // namespace

#define MOEREC_EXPERTS_FORWARD(engine, bounds, suffix, T)                                                       \
  extern "C" __global__ void __launch_bounds__ bounds experts_forward_##engine##_##suffix(                      \
      const T* x, const uint32_t* token_of_row, const T* weights, const T* bias, const uint32_t* offsets,       \
      const uint32_t* row_blocks, uint32_t experts, uint32_t din, uint32_t dout, uint32_t activation, T* h,     \
      T* y) {                                                                                                   \
    forward_##engine<T>(x, token_of_row, weights, bias, offsets, row_blocks, experts, din, dout, activation, h, \
                        y);                                                                                     \
  }
// A bare bound lets ptxas cap the SIMT tile at 64 registers, which spills; 2
// blocks per SM allow 128.
#define MOEREC_EXPERTS_FORWARD_SIMT(suffix, T) MOEREC_EXPERTS_FORWARD(simt, (kSimtThreads, 2), suffix, T)
MOEREC_FOR_EACH_FLOAT(MOEREC_EXPERTS_FORWARD_SIMT)
MOEREC_EXPERTS_FORWARD(mma, (kMmaThreads), bf16, __nv_bfloat16)
MOEREC_EXPERTS_FORWARD(mma, (kMmaThreads), f16, __half)

// ------------------------------------------------------------ backward

namespace {
// dh = dy * act'(h) ([R, Dout'] f32); SwiGlu: [dy up silu'(gate), dy silu(gate)].
template <typename T>
__device__ void activation_backward(const float* dy, const T* h, unsigned long long rows, uint32_t dout,
                                    uint32_t activation, float* dh) {
  const unsigned long long total = rows * dout;
  for (unsigned long long i = moerec::global_thread_index(); i < total; i += moerec::global_thread_count()) {
    if (activation == kSwiGlu) {
      const unsigned long long gate_at = (i / dout) * 2 * dout + i % dout;
      const float gate = moerec::to_f32(h[gate_at]), up = moerec::to_f32(h[gate_at + dout]);
      dh[gate_at] = dy[i] * up * silu_grad(gate);
      dh[gate_at + dout] = dy[i] * silu(gate);
    } else {
      dh[i] = dy[i] * activate_grad(activation, moerec::to_f32(h[i]));
    }
  }
}

// dx_rows[r] = dh[r] W[e(r)]^T: M = the expert's rows, N = Din, K = Dout'.
template <typename T>
__device__ void dx_rows_tile(const float* dh, const T* weights, const uint32_t* offsets, const uint32_t* row_blocks,
                             uint32_t experts, uint32_t din, uint32_t width, float* dx_rows) {
  using Tile = moerec::experts::BackwardTile<T, true>;
  __shared__ typename Tile::Shared s;
  SimtShared& staged = Tile::staged(s);
  const uint32_t col_tiles = (din + kSimtN - 1) / kSimtN;
  const uint32_t tid = threadIdx.x;
  const unsigned long long tiles = moerec::experts::tile_count(row_blocks, experts, col_tiles);
  for (unsigned long long tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const RowTile rows = moerec::experts::row_tile(offsets, row_blocks, experts,
                                                   static_cast<uint32_t>(tile / col_tiles), kSimtM);
    const uint32_t n0 = static_cast<uint32_t>(tile % col_tiles) * kSimtN;
    const T* w = weights + static_cast<unsigned long long>(rows.expert) * din * width;
    float acc[4][4];
    // Both operands are contiguous along k: thread loads k = tid % 16 of
    // rows / columns tid / 16 + 16 j.
    Tile::mainloop(s, 0, width, acc, [&](uint32_t k0) {
      const uint32_t k = k0 + tid % 16;
#pragma unroll
      for (uint32_t j = 0; j < 4; ++j) {
        const uint32_t m = tid / 16 + 16 * j;
        const uint32_t row = rows.begin + m, col = n0 + m;
        staged.a[tid % 16][m] =
            (row < rows.end && k < width) ? dh[static_cast<unsigned long long>(row) * width + k] : 0.0f;
        staged.b[tid % 16][m] =
            (col < din && k < width) ? moerec::to_f32(w[static_cast<unsigned long long>(col) * width + k]) : 0.0f;
      }
    });
#pragma unroll
    for (uint32_t i = 0; i < 4; ++i) {
#pragma unroll
      for (uint32_t j = 0; j < 4; ++j) {
        const uint32_t row = rows.begin + Tile::row(i, j);
        const uint32_t col = n0 + Tile::col(i, j);
        if (row < rows.end && col < din) dx_rows[static_cast<unsigned long long>(row) * din + col] = acc[i][j];
      }
    }
  }
}

// dW[e] = x_e^T dh_e over one chunk of the expert's rows (K), with a row of
// ones appended to x^T when has_bias (M = Din + 1: its output row is db).
// Writes partials[chunk] ([M, Dout']) or, with partials null (one chunk per
// expert at most), dweights / dbias directly.
template <typename T>
__device__ void dweights_tile(const T* x, const uint32_t* token_of_row, const float* dh, const uint32_t* offsets,
                              const uint32_t* chunk_offsets, uint32_t experts, uint32_t din, uint32_t width,
                              uint32_t has_bias, uint32_t chunk_rows, float* partials, float* dweights,
                              float* dbias) {
  using Tile = moerec::experts::BackwardTile<T, false>;
  __shared__ typename Tile::Shared s;
  SimtShared& staged = Tile::staged(s);
  const uint32_t m_total = din + has_bias;
  const uint32_t m_tiles = (m_total + kSimtM - 1) / kSimtM, n_tiles = (width + kSimtN - 1) / kSimtN;
  const uint32_t col_tiles = m_tiles * n_tiles;
  const uint32_t tid = threadIdx.x;
  const unsigned long long tiles = moerec::experts::tile_count(chunk_offsets, experts, col_tiles);
  for (unsigned long long tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const uint32_t chunk = static_cast<uint32_t>(tile / col_tiles);
    const RowTile rows = moerec::experts::row_tile(offsets, chunk_offsets, experts, chunk, chunk_rows);
    const uint32_t m0 = static_cast<uint32_t>(tile % col_tiles) / n_tiles * kSimtM;
    const uint32_t n0 = static_cast<uint32_t>(tile % col_tiles) % n_tiles * kSimtN;
    float acc[4][4];
    // Both operands are contiguous along m / n: thread loads column tid % 64
    // of k rows tid / 64 + 4 j.
    Tile::mainloop(s, rows.begin, rows.end, acc, [&](uint32_t k0) {
      const uint32_t mn = tid % 64, m = m0 + mn, n = n0 + mn;
#pragma unroll
      for (uint32_t j = 0; j < 4; ++j) {
        const uint32_t kk = tid / 64 + 4 * j, row = k0 + kk;
        float a = 0.0f, b = 0.0f;
        if (row < rows.end) {
          if (m < din) {
            a = moerec::to_f32(x[static_cast<unsigned long long>(source_row(token_of_row, row)) * din + m]);
          } else if (m < m_total) {
            a = 1.0f;
          }
          if (n < width) b = dh[static_cast<unsigned long long>(row) * width + n];
        }
        staged.a[kk][mn] = a;
        staged.b[kk][mn] = b;
      }
    });
#pragma unroll
    for (uint32_t i = 0; i < 4; ++i) {
#pragma unroll
      for (uint32_t j = 0; j < 4; ++j) {
        const uint32_t m = m0 + Tile::row(i, j);
        const uint32_t n = n0 + Tile::col(i, j);
        if (m >= m_total || n >= width) continue;
        if (partials != nullptr) {
          partials[(static_cast<unsigned long long>(chunk) * m_total + m) * width + n] = acc[i][j];
        } else if (m < din) {
          dweights[(static_cast<unsigned long long>(rows.expert) * din + m) * width + n] = acc[i][j];
        } else {
          dbias[static_cast<unsigned long long>(rows.expert) * width + n] = acc[i][j];
        }
      }
    }
  }
}
}  // namespace

#define MOEREC_EXPERTS_BACKWARD(suffix, T)                                                                   \
  extern "C" __global__ void __launch_bounds__(moerec::kBlockThreads)                                        \
      experts_dh_##suffix(const float* dy, const T* h, unsigned long long rows,                              \
                          uint32_t dout, uint32_t activation, float* dh) {                                   \
    activation_backward<T>(dy, h, rows, dout, activation, dh);                                               \
  }                                                                                                          \
  extern "C" __global__ void __launch_bounds__(kSimtThreads)                                                 \
      experts_dx_rows_##suffix(const float* dh, const T* weights, const uint32_t* offsets,                   \
                               const uint32_t* row_blocks, uint32_t experts, uint32_t din,                   \
                               uint32_t width, float* dx_rows) {                                             \
    dx_rows_tile<T>(dh, weights, offsets, row_blocks, experts, din, width, dx_rows);                         \
  }                                                                                                          \
  extern "C" __global__ void __launch_bounds__(kSimtThreads)                                                 \
      experts_dweights_##suffix(                                                                             \
      const T* x, const uint32_t* token_of_row, const float* dh, const uint32_t* offsets,                    \
      const uint32_t* chunk_offsets, uint32_t experts, uint32_t din, uint32_t width, uint32_t has_bias,      \
      uint32_t chunk_rows, float* partials, float* dweights, float* dbias) {                                 \
    dweights_tile<T>(x, token_of_row, dh, offsets, chunk_offsets, experts, din, width, has_bias, chunk_rows, \
                     partials, dweights, dbias);                                                             \
  }
MOEREC_FOR_EACH_FLOAT(MOEREC_EXPERTS_BACKWARD)

// dx[t] = sum over t's slots in order of dx_rows[row_of_slot[t, j]].
extern "C" __global__ void __launch_bounds__(moerec::kBlockThreads)
    experts_gather_dx(const float* dx_rows, const uint32_t* row_of_slot, uint32_t tokens,
                      uint32_t k, uint32_t din, uint32_t rows,
                      const unsigned long long* status, float* dx) {
  if (plan_rejected(status)) return;
  const unsigned long long total = static_cast<unsigned long long>(tokens) * din;
  for (unsigned long long i = moerec::global_thread_index(); i < total; i += moerec::global_thread_count()) {
    const unsigned long long t = i / din;
    float sum = 0.0f;
    for (uint32_t j = 0; j < k; ++j) {
      const uint32_t row = row_of_slot[t * k + j];
      if (row < rows) sum += dx_rows[static_cast<unsigned long long>(row) * din + i % din];
    }
    dx[i] = sum;
  }
}

// dweights[e] (and db[e], the last of the M = Din + has_bias partial rows) =
// the sum of the expert's chunk partials in chunk order; zero without chunks.
extern "C" __global__ void __launch_bounds__(moerec::kBlockThreads)
    experts_merge_dweights(const float* partials, const uint32_t* chunk_offsets,
                           uint32_t experts, uint32_t din, uint32_t width, uint32_t has_bias,
                           float* dweights, float* dbias) {
  const unsigned long long m_total = din + has_bias;
  const unsigned long long total = experts * m_total * width;
  for (unsigned long long i = moerec::global_thread_index(); i < total; i += moerec::global_thread_count()) {
    const unsigned long long n = i % width, m = (i / width) % m_total, e = i / width / m_total;
    float sum = 0.0f;
    for (uint32_t c = chunk_offsets[e]; c < chunk_offsets[e + 1]; ++c) {
      sum += partials[(c * m_total + m) * width + n];
    }
    if (m < din) {
      dweights[(e * din + m) * width + n] = sum;
    } else {
      dbias[e * width + n] = sum;
    }
  }
}

// ------------------------------------------------------------ combine

namespace {
// out[t] = rho[t] res[t] + sum_j weights[t, j] y[row_of_slot[t, j]], slots in
// order; empty slots read nothing.
template <typename T>
__device__ void combine_tokens(const T* y, const float* weights, const uint32_t* row_of_slot, const T* res,
                               const float* rho, uint32_t tokens, uint32_t k, uint32_t dout, uint32_t rows,
                               const unsigned long long* status, T* out) {
  if (plan_rejected(status)) return;
  const unsigned long long total = static_cast<unsigned long long>(tokens) * dout;
  for (unsigned long long i = moerec::global_thread_index(); i < total; i += moerec::global_thread_count()) {
    const unsigned long long t = i / dout;
    float sum = 0.0f;
    if (res != nullptr) sum = (rho != nullptr ? rho[t] : 1.0f) * moerec::to_f32(res[i]);
    for (uint32_t j = 0; j < k; ++j) {
      const uint32_t row = row_of_slot[t * k + j];
      if (row < rows) sum += weights[t * k + j] * moerec::to_f32(y[static_cast<unsigned long long>(row) * dout + i % dout]);
    }
    out[i] = moerec::from_f32<T>(sum);
  }
}

// norms[r] = |weights[slot of r]| ||y[r]||_2, one warp per row.
template <typename T>
__device__ void row_norms(const T* y, const float* weights, const uint32_t* row_slot, uint32_t rows, uint32_t dout,
                          const unsigned long long* status, float* norms) {
  if (plan_rejected(status)) return;
  const uint32_t lane = threadIdx.x % 32;
  for (unsigned long long r = global_warp(); r < rows; r += warp_count()) {
    float sum = 0.0f;
    for (uint32_t c = lane; c < dout; c += 32) {
      const float v = moerec::to_f32(y[r * dout + c]);
      sum += v * v;
    }
    sum = warp_sum(sum);
    if (lane == 0) norms[r] = fabsf(weights[row_slot[r] - 1]) * sqrtf(sum);
  }
}

// dweights[t, j] = <dout[t], y[row_of_slot[t, j]]>, 0 for an empty slot; one
// warp per slot.
template <typename T>
__device__ void combine_backward_slots(const float* dout, const T* y, const uint32_t* row_of_slot,
                                       unsigned long long slots, uint32_t k, uint32_t width, uint32_t rows,
                                       const unsigned long long* status, float* dweights) {
  if (plan_rejected(status)) return;
  const uint32_t lane = threadIdx.x % 32;
  for (unsigned long long s = global_warp(); s < slots; s += warp_count()) {
    const uint32_t row = row_of_slot[s];
    float sum = 0.0f;
    if (row < rows) {
      for (uint32_t c = lane; c < width; c += 32) {
        sum += dout[(s / k) * width + c] * moerec::to_f32(y[static_cast<unsigned long long>(row) * width + c]);
      }
    }
    sum = warp_sum(sum);
    if (lane == 0) dweights[s] = sum;
  }
}

// dres = rho dout (dout without rho), drho[t] = <dout[t], res[t]>; one warp per token.
template <typename T>
__device__ void combine_backward_tokens(const float* dout, const T* res, const float* rho, uint32_t tokens,
                                        uint32_t width, float* dres, float* drho) {
  const uint32_t lane = threadIdx.x % 32;
  for (unsigned long long t = global_warp(); t < tokens; t += warp_count()) {
    const float scale = rho != nullptr ? rho[t] : 1.0f;
    float sum = 0.0f;
    for (uint32_t c = lane; c < width; c += 32) {
      const unsigned long long i = t * width + c;
      dres[i] = scale * dout[i];
      sum += dout[i] * moerec::to_f32(res[i]);
    }
    sum = warp_sum(sum);
    if (lane == 0 && drho != nullptr) drho[t] = sum;
  }
}
}  // namespace

#define MOEREC_EXPERTS_COMBINE(suffix, T)                                                               \
  extern "C" __global__ void __launch_bounds__(moerec::kBlockThreads)                                   \
      experts_combine_##suffix(const T* y, const float* weights, const uint32_t* row_of_slot,           \
                               const T* res, const float* rho, uint32_t tokens, uint32_t k,             \
                               uint32_t dout, uint32_t rows,                                            \
                               const unsigned long long* status, T* out) {                              \
    combine_tokens<T>(y, weights, row_of_slot, res, rho, tokens, k, dout, rows, status, out);           \
  }                                                                                                     \
  extern "C" __global__ void __launch_bounds__(moerec::kBlockThreads)                                   \
      experts_row_norms_##suffix(const T* y, const float* weights, const uint32_t* row_slot,            \
                                 uint32_t rows, uint32_t dout,                                          \
                                 const unsigned long long* status, float* norms) {                      \
    row_norms<T>(y, weights, row_slot, rows, dout, status, norms);                                      \
  }                                                                                                     \
  extern "C" __global__ void __launch_bounds__(moerec::kBlockThreads)                                   \
      experts_combine_backward_slots_##suffix(                                                          \
      const float* dout, const T* y, const uint32_t* row_of_slot, unsigned long long slots, uint32_t k, \
      uint32_t width, uint32_t rows, const unsigned long long* status, float* dweights) {               \
    combine_backward_slots<T>(dout, y, row_of_slot, slots, k, width, rows, status, dweights);           \
  }                                                                                                     \
  extern "C" __global__ void __launch_bounds__(moerec::kBlockThreads)                                   \
      experts_combine_backward_tokens_##suffix(                                                         \
      const float* dout, const T* res, const float* rho, uint32_t tokens, uint32_t width, float* dres,  \
      float* drho) {                                                                                    \
    combine_backward_tokens<T>(dout, res, rho, tokens, width, dres, drho);                              \
  }
MOEREC_FOR_EACH_FLOAT(MOEREC_EXPERTS_COMBINE)

// dy[r] = weights[s] dout[t] for the slot s = (t, j) naming row r.
extern "C" __global__ void __launch_bounds__(moerec::kBlockThreads)
    experts_combine_backward_rows(const float* dout, const float* weights,
                                  const uint32_t* row_slot, uint32_t rows, uint32_t k,
                                  uint32_t width, const unsigned long long* status,
                                  float* dy) {
  if (plan_rejected(status)) return;
  const unsigned long long total = static_cast<unsigned long long>(rows) * width;
  for (unsigned long long i = moerec::global_thread_index(); i < total; i += moerec::global_thread_count()) {
    const unsigned long long slot = row_slot[i / width] - 1;
    dy[i] = weights[slot] * dout[(slot / k) * width + i % width];
  }
}

// util[e] = the sum over e's rows of norms[r]: one block per expert, each
// thread's rows in order, then a fixed tree, so the order depends on the
// count only.
extern "C" __global__ void __launch_bounds__(kUtilThreads)
    experts_util(const float* norms, const uint32_t* offsets, uint32_t experts,
                 const unsigned long long* status, float* util) {
  __shared__ float partial[kUtilThreads];
  if (plan_rejected(status)) return;
  for (uint32_t e = blockIdx.x; e < experts; e += gridDim.x) {
    float sum = 0.0f;
    for (uint32_t r = offsets[e] + threadIdx.x; r < offsets[e + 1]; r += kUtilThreads) sum += norms[r];
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (uint32_t stride = kUtilThreads / 2; stride > 0; stride >>= 1) {
      if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
      __syncthreads();
    }
    if (threadIdx.x == 0) util[e] = partial[0];
    __syncthreads();
  }
}
