// Warp-level matrix products on tensor cores, with operands read from swizzled shared
// tiles by ldmatrix.
//
// Fragment layout of mma.m16n8k16 (g = lane / 4, t = lane % 4):
//   A 16x16: a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B 16x8:  b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g)
//   C 16x8:  c0, c1 = (g, 2t..2t+1), c2, c3 = (g+8, 2t..2t+1)
// An operand either has k contiguous in shared memory (A stored [m][k], B stored [n][k]),
// read with plain ldmatrix, or k strided (A stored [k][m], B stored [k][n]), read with
// ldmatrix.trans. Those two cases cover every product of the forward and backward passes.
#pragma once

#include <cstdint>

#include "cuda/element.cuh"
#include "cuda/ptx.cuh"

namespace jax_flash::cuda {

enum class KOrder { kContiguous, kStrided };

// Shared address of the row this lane hands to ldmatrix, for the 8x8 matrices at tile
// (row0 + lane_row, col0 + lane_col), with row0 % 8 == 0, col0 % 16 == 0, lane_col 0 or 8.
// The lane-dependent part takes only a few values (the swizzle of the low chunk bits) and
// everything else is an immediate, so with unrolled loops each ldmatrix costs one of a
// handful of base registers plus an immediate offset.
template <class Tile>
__device__ __forceinline__ uint32_t fragment_address(uint32_t tile_base, int lane_row,
                                                     int lane_col, int row0, int col0) {
  constexpr int kMask = Tile::kChunksPerRow >= 8 ? 7 : 3;  // chunk bits the swizzle touches
  // Tile::offset's swizzle for row0 + lane_row equals that of lane_row (row0 % 8 == 0), and
  // chunk (col0 + lane_col) / 8 = C ^ (lane_col / 8) with C = col0 / 8 even.
  const int swizzle = Tile::kChunksPerRow >= 8 ? (lane_row & 7) : ((lane_row >> 1) & 3);
  const int chunk = col0 >> 3;
  const uint32_t lane_part =
      opaque(2 * (lane_row * Tile::kCols) + 16 * ((chunk & kMask) ^ (lane_col >> 3) ^ swizzle));
  return tile_base + lane_part + (2 * (row0 * Tile::kCols) + 16 * (chunk & ~kMask));
}

// A fragment of rows [m0, m0+16) and k in [k0, k0+16).
template <class Tile, KOrder kOrder>
__device__ __forceinline__ void load_a_fragment(uint32_t (&a)[4], uint32_t tile_base, int m0,
                                                int k0, int lane) {
  const int r = lane & 7, matrix = lane >> 3;
  if constexpr (kOrder == KOrder::kContiguous) {
    // matrices: (m 0-7, k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15), (m 8-15, k 8-15)
    ldmatrix_x4(a, fragment_address<Tile>(tile_base, lane & 15, (matrix >> 1) * 8, m0, k0));
  } else {
    // Same four matrices, read from the [k][m] tile and transposed on the way.
    ldmatrix_x4_trans(
        a, fragment_address<Tile>(tile_base, r + (matrix >> 1) * 8, (matrix & 1) * 8, k0, m0));
  }
}

// B fragments of two adjacent n-tiles, columns [n0, n0+16), k in [k0, k0+16):
// b[0], b[1] for columns n0.., b[2], b[3] for columns n0+8...
template <class Tile, KOrder kOrder>
__device__ __forceinline__ void load_b_fragments(uint32_t (&b)[4], uint32_t tile_base, int n0,
                                                 int k0, int lane) {
  const int r = lane & 7, matrix = lane >> 3;
  if constexpr (kOrder == KOrder::kContiguous) {
    // matrices: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
    ldmatrix_x4(b, fragment_address<Tile>(tile_base, r + (matrix >> 1) * 8, (matrix & 1) * 8, n0, k0));
  } else {
    ldmatrix_x4_trans(
        b, fragment_address<Tile>(tile_base, r + (matrix & 1) * 8, (matrix >> 1) * 8, k0, n0));
  }
}

// acc[i][j] += A[m0 + 16i .., 0..kK) * B[0..kK, n0 + 8j ..).
template <int kMTiles, int kNTiles, int kK, class ATile, KOrder kAOrder, class BTile,
          KOrder kBOrder, bool kBFloat16>
__device__ __forceinline__ void warp_gemm(float (&acc)[kMTiles][kNTiles][4], uint32_t a_base,
                                          int m0, uint32_t b_base, int n0, int lane) {
  static_assert(kNTiles % 2 == 0 && kK % 16 == 0, "B is loaded two n-tiles at a time");
#pragma unroll
  for (int k0 = 0; k0 < kK; k0 += 16) {
    uint32_t a[kMTiles][4];
#pragma unroll
    for (int i = 0; i < kMTiles; ++i)
      load_a_fragment<ATile, kAOrder>(a[i], a_base, m0 + 16 * i, k0, lane);
#pragma unroll
    for (int j = 0; j < kNTiles; j += 2) {
      uint32_t b[4];
      load_b_fragments<BTile, kBOrder>(b, b_base, n0 + 8 * j, k0, lane);
#pragma unroll
      for (int i = 0; i < kMTiles; ++i) {
        mma_16816<kBFloat16>(acc[i][j], a[i], b[0], b[1]);
        mma_16816<kBFloat16>(acc[i][j + 1], a[i], b[2], b[3]);
      }
    }
  }
}

// The A operand of one 16-wide k step (k-tiles 2 kk and 2 kk + 1 of a 16-row float32
// accumulator, rounded to Element): the accumulator layout of two adjacent 8-column tiles
// is exactly that fragment, for mma.m16n8k16 and, per warp, for wgmma's register A.
template <typename Element, int kKTiles>
__device__ __forceinline__ void pack_a_fragment(const float (&acc)[kKTiles][4], int kk,
                                                uint32_t (&a)[4]) {
  using Traits = ElementTraits<Element>;
  a[0] = Traits::pack(acc[2 * kk][0], acc[2 * kk][1]);
  a[1] = Traits::pack(acc[2 * kk][2], acc[2 * kk][3]);
  a[2] = Traits::pack(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
  a[3] = Traits::pack(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
}

// acc[i][j] += A[16i.., 0..kK) * B[0..kK, n0 + 8j ..) with A in registers: the float32
// accumulator of an earlier product, a_acc[i][k-tile], rounded to Element on the way. The
// accumulator layout of two adjacent 8-column tiles is exactly the A fragment of one
// 16-wide k step, so A never goes through shared memory.
template <int kMTiles, int kNTiles, int kK, typename Element, class BTile, KOrder kBOrder>
__device__ __forceinline__ void warp_gemm_a_registers(float (&acc)[kMTiles][kNTiles][4],
                                                      const float (&a_acc)[kMTiles][kK / 8][4],
                                                      uint32_t b_base, int n0, int lane) {
  using Traits = ElementTraits<Element>;
  static_assert(kNTiles % 2 == 0 && kK % 16 == 0, "B is loaded two n-tiles at a time");
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    uint32_t a[kMTiles][4];
#pragma unroll
    for (int i = 0; i < kMTiles; ++i) pack_a_fragment<Element>(a_acc[i], kk, a[i]);
#pragma unroll
    for (int j = 0; j < kNTiles; j += 2) {
      uint32_t b[4];
      load_b_fragments<BTile, kBOrder>(b, b_base, n0 + 8 * j, 16 * kk, lane);
#pragma unroll
      for (int i = 0; i < kMTiles; ++i) {
        mma_16816<Traits::kIsBFloat16>(acc[i][j], a[i], b[0], b[1]);
        mma_16816<Traits::kIsBFloat16>(acc[i][j + 1], a[i], b[2], b[3]);
      }
    }
  }
}

template <int kMTiles, int kNTiles>
__device__ __forceinline__ void zero(float (&acc)[kMTiles][kNTiles][4]) {
#pragma unroll
  for (int i = 0; i < kMTiles; ++i)
#pragma unroll
    for (int j = 0; j < kNTiles; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.0f;
}

}  // namespace jax_flash::cuda
