// Shared-memory tiles of 16-bit elements and the asynchronous copies that fill them.
//
// A tile is row major, but the 16-byte chunks of each row are XOR-swizzled by the row index
// so that the eight rows an ldmatrix (or an 8-row fragment store) touches at one column
// land in eight different bank groups. That makes every ldmatrix conflict free without
// padding, which keeps the tiles small enough for two CTAs per SM.
#pragma once

#include <cstdint>

#include "cuda/ptx.cuh"

namespace jax_flash::cuda {

template <int kRows_, int kCols_>
struct SwizzledTile {
  static constexpr int kRows = kRows_;
  static constexpr int kCols = kCols_;
  static constexpr int kChunksPerRow = kCols / 8;
  static constexpr int kElements = kRows * kCols;
  static constexpr int kBytes = kElements * 2;
  static_assert(kChunksPerRow == 4 || (kChunksPerRow >= 8 && kChunksPerRow % 8 == 0),
                "tile rows must be 32 elements or a multiple of 64");
  static_assert(kRows % 8 == 0, "tiles are made of 8-row groups");

  // Element offset of (row, col). Bits of col below 8 pass through unchanged, so a pair of
  // adjacent elements stays adjacent.
  static __device__ __forceinline__ int offset(int row, int col) {
    // With 128-byte rows and longer, each row's chunk index is XORed with row % 8. With
    // 64-byte rows two rows share a 128-byte line, so rows are swizzled in pairs.
    const int swizzle = kChunksPerRow >= 8 ? (row & 7) : ((row >> 1) & 3);
    return row * kCols + ((((col >> 3) ^ swizzle)) << 3) + (col & 7);
  }
};

// Copies the global tile (rows [0, Tile::kRows) x columns [0, Tile::kCols)) starting at
// `gmem` into shared memory. Entries at row >= valid_rows or col >= valid_cols are zero
// in shared memory and never read from global memory. `vectorized` says that every row
// start is 16-byte aligned and valid_cols is a multiple of 8 (the usual case); otherwise
// the tile is copied element by element, synchronously.
//
// Each thread always copies the same 16-byte column chunk of rows thread / kChunksPerRow
// + i * kRowStep. When kRowStep is a multiple of 8 the swizzle is the same for all of a
// thread's rows: one shared address plus immediates, one global pointer plus a stride.
// Wide tiles with few threads (kRowStep of 1, 2 or 4) cycle through 8 / kRowStep swizzles,
// one precomputed address each.
template <class Tile, int kThreads, typename Element>
__device__ __forceinline__ void load_tile(Element* smem, const Element* gmem, int64_t row_stride,
                                          int valid_rows, int valid_cols, bool vectorized,
                                          int thread) {
  static_assert(kThreads % Tile::kChunksPerRow == 0, "threads cover whole rows");
  constexpr int kRowStep = kThreads / Tile::kChunksPerRow;
  static_assert(kRowStep % 8 == 0 || 8 % kRowStep == 0, "rows step evenly through swizzles");
  static_assert(Tile::kRows % kRowStep == 0, "threads cover whole tiles");
  constexpr int kIterations = Tile::kRows / kRowStep;
  constexpr int kPeriod = kRowStep >= 8 ? 1 : 8 / kRowStep;  // iterations per swizzle cycle
  static_assert(kIterations % kPeriod == 0, "tiles are made of whole swizzle cycles");
  const int first_row = thread / Tile::kChunksPerRow;
  const int col = (thread % Tile::kChunksPerRow) * 8;
  const Element* src = gmem + first_row * row_stride + col;
  if (vectorized) {
    uint32_t dst_address[kPeriod];
#pragma unroll
    for (int phase = 0; phase < kPeriod; ++phase)
      dst_address[phase] = shared_address(smem + Tile::offset(first_row + phase * kRowStep, col));
#pragma unroll
    for (int i = 0; i < kIterations; ++i) {
      const bool inside = first_row + i * kRowStep < valid_rows && col < valid_cols;
      // An out-of-range copy reads 0 bytes; the tile start is still a valid address.
      cp_async_16(dst_address[i % kPeriod] + (i / kPeriod) * kPeriod * kRowStep * Tile::kCols * 2,
                  inside ? src + i * kRowStep * row_stride : gmem, inside ? 16 : 0);
    }
  } else {
#pragma unroll 1
    for (int i = 0; i < kIterations; ++i) {
      const int row = first_row + i * kRowStep;
      const uint16_t* row_src = reinterpret_cast<const uint16_t*>(src + i * kRowStep * row_stride);
      uint16_t values[8];
#pragma unroll
      for (int e = 0; e < 8; ++e)
        values[e] = (row < valid_rows && col + e < valid_cols) ? row_src[e] : uint16_t{0};
      uint4 packed;
      packed.x = values[0] | (uint32_t{values[1]} << 16);
      packed.y = values[2] | (uint32_t{values[3]} << 16);
      packed.z = values[4] | (uint32_t{values[5]} << 16);
      packed.w = values[6] | (uint32_t{values[7]} << 16);
      *reinterpret_cast<uint4*>(smem + Tile::offset(row, col)) = packed;
    }
  }
}

// load_tile for rows without a fixed stride (gathered query heads, cache pages):
// row_address(row) is the global start of tile row `row`, or nullptr for a row to fill with
// zeros (never read). `any_row` is a valid global address for the copies that read nothing.
template <class Tile, int kThreads, typename Element, class RowAddress>
__device__ __forceinline__ void load_tile_rows(Element* smem, RowAddress&& row_address,
                                               const Element* any_row, int valid_cols,
                                               bool vectorized, int thread) {
  static_assert(kThreads % Tile::kChunksPerRow == 0, "threads cover whole rows");
  constexpr int kRowStep = kThreads / Tile::kChunksPerRow;  // may exceed the tile's rows
  const int first_row = thread / Tile::kChunksPerRow;
  const int col = (thread % Tile::kChunksPerRow) * 8;
#pragma unroll
  for (int row = first_row; row < Tile::kRows; row += kRowStep) {
    const Element* src = row_address(row);
    if (vectorized) {
      const bool inside = src != nullptr && col < valid_cols;
      cp_async_16(shared_address(smem + Tile::offset(row, col)), inside ? src + col : any_row,
                  inside ? 16 : 0);
    } else {
      const uint16_t* row_src = reinterpret_cast<const uint16_t*>(src);
      uint16_t values[8];
#pragma unroll
      for (int e = 0; e < 8; ++e)
        values[e] = (src != nullptr && col + e < valid_cols) ? row_src[col + e] : uint16_t{0};
      uint4 packed;
      packed.x = values[0] | (uint32_t{values[1]} << 16);
      packed.y = values[2] | (uint32_t{values[3]} << 16);
      packed.z = values[4] | (uint32_t{values[5]} << 16);
      packed.w = values[6] | (uint32_t{values[7]} << 16);
      *reinterpret_cast<uint4*>(smem + Tile::offset(row, col)) = packed;
    }
  }
}

// Copies kCount 4-byte values (per-row statistics such as lse, segment ids) into shared
// memory; entries at i >= valid are zero. kCount must not exceed kThreads.
template <int kCount, int kThreads, typename T>
__device__ __forceinline__ void load_row_vector(T* smem, const T* gmem, int valid, int thread) {
  static_assert(kCount <= kThreads && sizeof(T) == 4, "one thread per 4-byte entry");
  if (thread < kCount) {
    const bool inside = thread < valid;
    cp_async_4(shared_address(smem + thread), inside ? gmem + thread : gmem, inside ? 4 : 0);
  }
}

}  // namespace jax_flash::cuda
