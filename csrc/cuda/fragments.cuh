// Walking and storing mma accumulator fragments (see warp_mma.cuh for the layout).
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/element.cuh"
#include "cuda/ptx.cuh"

namespace jax_flash::cuda {

// Calls f(value, row, col) for every accumulator element of this lane, with row and col
// relative to the origin of the warp tile.
template <int kMTiles, int kNTiles, class F>
__device__ __forceinline__ void for_each_element(float (&acc)[kMTiles][kNTiles][4], int lane,
                                                 F&& f) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < kMTiles; ++i)
#pragma unroll
    for (int j = 0; j < kNTiles; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) f(acc[i][j][c], 16 * i + g + 8 * (c >> 1), 8 * j + 2 * t + (c & 1));
}

// Stores a warp tile of accumulators to global memory as Element, where `gmem` is the
// element at the tile origin. Rows >= valid_rows and columns >= valid_cols are skipped.
// `vectorized`: rows are 4-byte aligned and valid_cols is even, so pairs go out as one word.
template <typename Element, int kMTiles, int kNTiles>
__device__ __forceinline__ void store_tile(const float (&acc)[kMTiles][kNTiles][4], Element* gmem,
                                           int64_t row_stride, int valid_rows, int valid_cols,
                                           bool vectorized, int lane) {
  using Traits = ElementTraits<Element>;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < kMTiles; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = 16 * i + g + 8 * h;
      if (row >= valid_rows) continue;
      Element* dst = gmem + row * row_stride;
#pragma unroll
      for (int j = 0; j < kNTiles; ++j) {
        const int col = 8 * j + 2 * t;
        const float lo = acc[i][j][2 * h], hi = acc[i][j][2 * h + 1];
        if (vectorized) {
          if (col < valid_cols) *reinterpret_cast<uint32_t*>(dst + col) = Traits::pack(lo, hi);
        } else {
          if (col < valid_cols) dst[col] = Traits::from_float(lo);
          if (col + 1 < valid_cols) dst[col + 1] = Traits::from_float(hi);
        }
      }
    }
}

// The result of query rows that see no key at all: out = 0 and lse = +inf, written by the
// CTA's kThreads threads (rows [0, valid_rows) from `out` and `lse`).
template <int kThreads, typename Element>
__device__ __forceinline__ void store_fully_masked_rows(Element* out, int64_t row_stride,
                                                        float* lse, int valid_rows, int head_dim,
                                                        int thread) {
  for (int i = thread; i < valid_rows * head_dim; i += kThreads)
    out[(i / head_dim) * row_stride + i % head_dim] = ElementTraits<Element>::from_float(0.0f);
  for (int i = thread; i < valid_rows; i += kThreads) lse[i] = INFINITY;
}

// Atomically adds a warp tile of accumulators into a float32 matrix whose element at the
// tile origin is `gmem` (row stride `ld`). Rows >= valid_rows and columns >= valid_cols
// are skipped. A tile that lies wholly inside (the common case) takes a branch-free path
// of paired reductions; `pairs_aligned` says that ld and the origin are even, which the
// pairs need.
template <int kMTiles, int kNTiles>
__device__ __forceinline__ void atomic_add_tile(const float (&acc)[kMTiles][kNTiles][4],
                                                float* gmem, int ld, int valid_rows,
                                                int valid_cols, bool pairs_aligned, int lane) {
  const int g = lane >> 2, t = lane & 3;
  const bool whole = pairs_aligned && valid_rows >= 16 * kMTiles && valid_cols >= 8 * kNTiles;
#pragma unroll
  for (int i = 0; i < kMTiles; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = 16 * i + g + 8 * h;
      float* dst = gmem + row * ld + 2 * t;
      if (whole) {
#pragma unroll
        for (int j = 0; j < kNTiles; ++j) atomic_add_pair(dst + 8 * j, acc[i][j][2 * h], acc[i][j][2 * h + 1]);
      } else if (row < valid_rows) {
#pragma unroll
        for (int j = 0; j < kNTiles; ++j) {
          const int col = 8 * j + 2 * t;
          if (col < valid_cols) atomicAdd(dst + 8 * j, acc[i][j][2 * h]);
          if (col + 1 < valid_cols) atomicAdd(dst + 8 * j + 1, acc[i][j][2 * h + 1]);
        }
      }
    }
}

}  // namespace jax_flash::cuda
