// The grouped GEMM engines of the expert matmul (kernels/experts.cu): the
// tile scheduler lookup, an f32 SIMT tile for every dtype and pass, and a
// bf16/f16 tensor-core tile (mma.sync m16n8k16, f32 accumulate, cp.async
// double buffering) for the forward.
//
// Scheduling: the host never learns the group sizes. A kernel writes each
// expert's number of row blocks (ceil(count / rows per block)), the grouping
// scan turns them into `row_blocks` [E+1] offsets, and every GEMM block maps
// its linear tile index to (expert, row block, column tile) by a binary search
// of those offsets. The grid is sized by the upper bound
// (ceil(R / rows per block) + E) x column tiles; surplus blocks exit.
#pragma once
#include <type_traits>

#include "mma.cuh"

namespace moerec {
namespace experts {

// ------------------------------------------------------------ scheduling

// Rows [begin, end) of expert `expert` that one row block covers.
struct RowTile {
  uint32_t expert;
  uint32_t begin;
  uint32_t end;
};

// The row block `block` (< row_blocks[experts]) of the grouped problem.
__device__ __forceinline__ RowTile row_tile(const uint32_t* offsets, const uint32_t* row_blocks, uint32_t experts,
                                            uint32_t block, uint32_t rows_per_block) {
  // The last expert whose first row block is <= block: empty experts share
  // their offset with the next one, so the search skips them.
  uint32_t lo = 0, hi = experts;
  while (hi - lo > 1) {
    const uint32_t mid = lo + (hi - lo) / 2;
    if (row_blocks[mid] <= block) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  const unsigned long long begin =
      offsets[lo] + static_cast<unsigned long long>(block - row_blocks[lo]) * rows_per_block;
  const unsigned long long end = min(begin + rows_per_block, static_cast<unsigned long long>(offsets[lo + 1]));
  return RowTile{lo, static_cast<uint32_t>(begin), static_cast<uint32_t>(end)};
}

// The number of (row block, column tile) tiles; every GEMM kernel loops over
// them grid-stride, so the grid may be capped.
__device__ __forceinline__ unsigned long long tile_count(const uint32_t* row_blocks, uint32_t experts,
                                                         uint32_t col_tiles) {
  return static_cast<unsigned long long>(row_blocks[experts]) * col_tiles;
}

// Forward output columns of one tile: `per_tile` output columns, which for
// SwiGlu are (gate, up) pairs whose weight columns lie Dout apart, so one
// thread holds both halves of a pair in its accumulators.
struct ForwardCols {
  uint32_t dout;
  uint32_t per_tile;
  bool swiglu;
  // Tile-local column n (< 2 * half) of a tile whose first output column is
  // c0: its output column, and its weight column.
  __device__ __forceinline__ uint32_t output_col(uint32_t c0, uint32_t n, uint32_t half) const {
    return c0 + (swiglu ? n % half : n);
  }
  __device__ __forceinline__ uint32_t weight_col(uint32_t c0, uint32_t n, uint32_t half) const {
    return output_col(c0, n, half) + (swiglu && n >= half ? dout : 0u);
  }
  __device__ __forceinline__ uint32_t tiles() const { return (dout + per_tile - 1) / per_tile; }
};

// ------------------------------------------------------------ f32 SIMT tile

// 64 x 64 outputs per block of 256 threads, 4 x 4 per thread, k in steps of
// 16 through shared memory. Thread (tx, ty) = (tid % 16, tid / 16) owns rows
// 4 ty .. 4 ty + 3 and columns 2 tx, 2 tx + 1, 32 + 2 tx, 33 + 2 tx: the second
// pair is the first pair's SwiGlu partner.
constexpr uint32_t kSimtThreads = 256;
constexpr uint32_t kSimtM = 64;
constexpr uint32_t kSimtN = 64;
constexpr uint32_t kSimtK = 16;
// Rows padded by 4 floats: the transposing stores conflict 2-way, not 16-way,
// and rows stay 16-byte aligned for the float4 reads.
constexpr uint32_t kSimtLd = 68;

// alignas(16): simt_step reads it with float4/float2 (ld.shared.v4/.v2),
// which need the struct itself 16-byte aligned wherever it is declared.
struct alignas(16) SimtShared {
  float a[kSimtK][kSimtLd];  // a[k][m]
  float b[kSimtK][kSimtLd];  // b[k][n]
};

__device__ __forceinline__ uint32_t simt_row(uint32_t i) { return 4 * (threadIdx.x / 16) + i; }
__device__ __forceinline__ uint32_t simt_col(uint32_t j) {
  return (j < 2 ? 0u : kSimtN / 2) + 2 * (threadIdx.x % 16) + (j & 1);
}

// acc += a^T b over one k step held in shared memory.
__device__ __forceinline__ void simt_step(const SimtShared& s, float (&acc)[4][4]) {
  const uint32_t tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (uint32_t k = 0; k < kSimtK; ++k) {
    const float4 a = *reinterpret_cast<const float4*>(&s.a[k][4 * ty]);
    const float2 b0 = *reinterpret_cast<const float2*>(&s.b[k][2 * tx]);
    const float2 b1 = *reinterpret_cast<const float2*>(&s.b[k][kSimtN / 2 + 2 * tx]);
    const float av[4] = {a.x, a.y, a.z, a.w};
    const float bv[4] = {b0.x, b0.y, b1.x, b1.y};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
  }
}

// The k loop of a 64 x 64 tile: acc = 0, then per 16-k step `load(k0)`
// fills the stage (zeros outside the problem), a barrier, `step()` adds the
// stage's products, a barrier. Rows of k are summed in ascending order, so
// the result depends on the shapes only.
template <class Load, class Step>
__device__ __forceinline__ void tile_mainloop(uint32_t k_begin, uint32_t k_end, float (&acc)[4][4], Load load,
                                              Step step) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
  }
  for (uint32_t k0 = k_begin; k0 < k_end; k0 += kSimtK) {
    load(k0);
    __syncthreads();
    step();
    __syncthreads();
  }
}

// The SIMT tile's k loop: `load(k0)` fills s.a and s.b for k0 .. k0 + 15.
template <class Load>
__device__ __forceinline__ void simt_mainloop(SimtShared& s, uint32_t k_begin, uint32_t k_end, float (&acc)[4][4],
                                              Load load) {
  tile_mainloop(k_begin, k_end, acc, load, [&] { simt_step(s, acc); });
}

// ------------------------------------------------------------ split tensor-core tile

// The backward's products have an f32 gradient operand (dh), which DESIGN 3
// keeps in f32. The split tile keeps the SIMT tile's shape, loads and grid
// (64 x 64, k in steps of 16, the loader fills SimtShared in f32), then
// splits both staged operands exactly into bf16 pieces
// (moerec::split_bf16_pieces: 3 for f32, kExactPieces<T> for stored values)
// and sums every piece product with mma.sync in f32 (exact products; the
// order and rounding of their accumulation are the hardware's). Warp w owns rows
// 16 (w % 4) .. + 15 and columns 32 (w / 4) .. + 31: acc[nt][c] is row
// lane / 4 + 8 (c / 2), column 8 nt + 2 (lane % 4) + c % 2 of that block.
constexpr uint32_t kSplitLd = kSimtN + 8;  // 144-byte rows: ldmatrix-aligned, conflict-free

template <uint32_t kPiecesA, uint32_t kPiecesB>
struct alignas(16) SplitShared {
  SimtShared staged;
  __nv_bfloat16 a[kPiecesA][kSimtK][kSplitLd];  // pieces of staged.a, [k][m]
  __nv_bfloat16 b[kPiecesB][kSimtK][kSplitLd];  // pieces of staged.b, [k][n]
};

template <uint32_t kPiecesA, uint32_t kPiecesB, class Load>
__device__ __forceinline__ void split_mainloop(SplitShared<kPiecesA, kPiecesB>& s, uint32_t k_begin, uint32_t k_end,
                                               float (&acc)[4][4], Load load) {
  tile_mainloop(k_begin, k_end, acc, load, [&] {
    const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    constexpr uint32_t kPieceStride = kSimtK * kSplitLd;
    for (uint32_t e = threadIdx.x; e < kSimtK * kSimtM; e += kSimtThreads) {
      const uint32_t k = e / kSimtM, mn = e % kSimtM;
      split_bf16_pieces(s.staged.a[k][mn], &s.a[0][k][mn], kPiecesA, kPieceStride);
      split_bf16_pieces(s.staged.b[k][mn], &s.b[0][k][mn], kPiecesB, kPieceStride);
    }
    __syncthreads();
    // A (m16 x k16) from [k][m] with .trans: matrix i = lane / 8 holds
    // k (i / 2) * 8 .., m (i % 2) * 8 ..; B as in mma_stage.
    uint32_t a[kPiecesA][4];
#pragma unroll
    for (uint32_t q = 0; q < kPiecesA; ++q) {
      ldmatrix_x4_trans(a[q], &s.a[q][(lane / 16) * 8 + lane % 8][16 * (warp % 4) + ((lane / 8) % 2) * 8]);
    }
#pragma unroll
    for (uint32_t np = 0; np < 2; ++np) {
#pragma unroll
      for (uint32_t qb = 0; qb < kPiecesB; ++qb) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, &s.b[qb][lane % 16][32 * (warp / 4) + 16 * np + (lane / 16) * 8]);
#pragma unroll
        for (uint32_t qa = 0; qa < kPiecesA; ++qa) {
          mma_16816<__nv_bfloat16>(acc[2 * np], a[qa], b[0], b[1]);
          mma_16816<__nv_bfloat16>(acc[2 * np + 1], a[qa], b[2], b[3]);
        }
      }
    }
  });
}

// The backward tile of element type T: f32 SIMT for f32 (splitting f32 x
// f32 would take 9 products), the split tile for bf16/f16. kPiecesA /
// kPiecesB: pieces of the operands when they are (A, B) = (gradient, stored)
// or (stored, gradient); `Shared` is the shared memory, `staged(s)` the f32
// stage the loader fills, and (row(i, j), col(i, j)) where acc[i][j] lies.
template <typename T, bool kGradientIsA>
struct BackwardTile {
  static constexpr bool kSplit = !std::is_same<T, float>::value;
  static constexpr uint32_t kPiecesA = kGradientIsA ? 3 : kExactPieces<T>;
  static constexpr uint32_t kPiecesB = kGradientIsA ? kExactPieces<T> : 3;
  using Shared = typename std::conditional<kSplit, SplitShared<kPiecesA, kPiecesB>, SimtShared>::type;

  __device__ static __forceinline__ SimtShared& staged(Shared& s) {
    if constexpr (kSplit) {
      return s.staged;
    } else {
      return s;
    }
  }
  template <class Load>
  __device__ static __forceinline__ void mainloop(Shared& s, uint32_t k_begin, uint32_t k_end, float (&acc)[4][4],
                                                  Load load) {
    if constexpr (kSplit) {
      split_mainloop(s, k_begin, k_end, acc, load);
    } else {
      simt_mainloop(s, k_begin, k_end, acc, load);
    }
  }
  __device__ static __forceinline__ uint32_t row(uint32_t i, uint32_t j) {
    if constexpr (kSplit) {
      return 16 * (threadIdx.x / 32 % 4) + threadIdx.x % 32 / 4 + 8 * (j / 2);
    } else {
      return simt_row(i);
    }
  }
  __device__ static __forceinline__ uint32_t col(uint32_t i, uint32_t j) {
    if constexpr (kSplit) {
      return 32 * (threadIdx.x / 128) + 8 * i + 2 * (threadIdx.x % 4) + j % 2;
    } else {
      return simt_col(j);
    }
  }
};

// ------------------------------------------------------------ bf16/f16 tensor-core tile

// 128 x 64 outputs per block of 4 warps; warp w owns rows 32 w .. 32 w + 31
// and all 64 columns (2 m16 x 8 n8 mma tiles, 64 f32 accumulators). k in steps
// of 32, two stages of cp.async. Needs Din and Dout multiples of 8 and 16-byte
// aligned x and W, so every 16-byte copy lies wholly inside or outside the
// problem (the host checks and otherwise takes the SIMT path).
constexpr uint32_t kMmaThreads = 128;
constexpr uint32_t kMmaM = 128;
constexpr uint32_t kMmaN = 64;
constexpr uint32_t kMmaK = 32;
// Rows padded by 8 elements (80 and 144 bytes): ldmatrix's eight 16-byte row
// reads fall in distinct banks. alignas(16): cp.async and ldmatrix need
// 16-byte aligned shared addresses, which T's own alignment (2) would not give.
constexpr uint32_t kMmaLdA = kMmaK + 8;
constexpr uint32_t kMmaLdB = kMmaN + 8;

template <typename T>
struct alignas(16) MmaShared {
  T a[2][kMmaM][kMmaLdA];  // a[stage][m][k]
  T b[2][kMmaK][kMmaLdB];  // b[stage][k][n]
};

// One warp's 32 x 64 share of a stage: acc[mt][nt] is the m16n8 tile at rows
// 32 w + 16 mt, columns 8 nt. Fragment layouts (PTX ISA, mma.m16n8k16):
// ldmatrix.x4 with lane l addressing row l % 16, k (l / 16) * 8 gives A's
// {a0, a1, a2, a3} = (rows g, g+8) x (k lo, k hi); ldmatrix.x4.trans with lane
// l addressing k row l % 16, column (l / 16) * 8 gives B's {b0, b1} for two
// adjacent n8 tiles.
template <typename T>
__device__ __forceinline__ void mma_stage(const MmaShared<T>& s, uint32_t stage, float (&acc)[2][8][4]) {
  const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (uint32_t ks = 0; ks < kMmaK; ks += 16) {
    uint32_t a[2][4];
#pragma unroll
    for (uint32_t mt = 0; mt < 2; ++mt) {
      ldmatrix_x4(a[mt], &s.a[stage][32 * warp + 16 * mt + lane % 16][ks + (lane / 16) * 8]);
    }
#pragma unroll
    for (uint32_t np = 0; np < 4; ++np) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, &s.b[stage][ks + lane % 16][16 * np + (lane / 16) * 8]);
#pragma unroll
      for (uint32_t mt = 0; mt < 2; ++mt) {
        mma_16816<T>(acc[mt][2 * np], a[mt], b[0], b[1]);
        mma_16816<T>(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

}  // namespace experts
}  // namespace moerec
