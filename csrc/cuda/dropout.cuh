// Dropout in the kernels' register tiles: which elements of a thread's mma.sync
// accumulator fragment, float[kMTiles][kNTiles][4], dropout keeps. The draws are those of
// common/dropout.h; the map there gives each Philox call's eight draws to the one thread
// that owns those elements, in both fragment orientations below, so no draw is wasted
// (except where a warp tile holds a single 16-row tile of keys: half of each call).
//
// Fragment element (i, j, c) sits at row 16 i + g + 8 (c / 2), column 8 j + 2 t + c % 2 of
// the warp tile, g = lane / 4, t = lane % 4.
#pragma once

#include <cstdint>

#include "common/dropout.h"

namespace jax_flash::cuda {

template <int kMTiles, int kNTiles>
struct KeepMask {
  static constexpr int kBits = kMTiles * kNTiles * 4;
  uint32_t word[(kBits + 31) / 32] = {};

  __device__ __forceinline__ static constexpr int bit(int i, int j, int c) {
    return (i * kNTiles + j) * 4 + c;
  }
  __device__ __forceinline__ void set(int i, int j, int c, bool keep) {
    word[bit(i, j, c) / 32] |= static_cast<uint32_t>(keep) << (bit(i, j, c) % 32);
  }
  __device__ __forceinline__ bool keeps(int i, int j, int c) const {
    return (word[bit(i, j, c) / 32] >> (bit(i, j, c) % 32)) & 1u;
  }
};

// The Philox key and keep threshold of one (batch, head).
struct DropoutDraws {
  uint32_t seed0, seed1, threshold;

  __device__ __forceinline__ static DropoutDraws make(const AttentionParams& p, int batch,
                                                      int head) {
    const uint32_t* seed = dropout_seed(p, batch, head);
    return {seed[0], seed[1], p.dropout_keep_threshold};
  }
  __device__ __forceinline__ PhiloxOutput call(uint32_t key_word, uint32_t query_word) const {
    return philox4x32_10(seed0, seed1, {key_word, query_word});
  }
  __device__ __forceinline__ bool keeps(const PhiloxOutput& bits, uint32_t slot) const {
    return dropout_draw(bits, slot) < threshold;
  }
};

// Rows are queries from query0 (a multiple of 16), columns keys from key0 (a multiple of
// 32). One call covers rows {g, g + 8} of an m-tile and columns {2t + e} + {0, 8, 16, 24}
// of a 32-key chunk.
template <int kMTiles, int kNTiles>
__device__ __forceinline__ KeepMask<kMTiles, kNTiles> keep_mask_queries_by_keys(
    const DropoutDraws& draws, int query0, int key0, int lane) {
  static_assert(kNTiles % 4 == 0, "whole 32-key chunks per warp tile");
  const int g = lane >> 2, t = lane & 3;
  KeepMask<kMTiles, kNTiles> mask;
#pragma unroll
  for (int i = 0; i < kMTiles; ++i) {
    const uint32_t query_word = static_cast<uint32_t>((query0 + 16 * i) >> 4) * 8u + g;
#pragma unroll
    for (int chunk = 0; chunk < kNTiles / 4; ++chunk)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const uint32_t key_word = static_cast<uint32_t>((key0 + 32 * chunk) >> 5) * 8u + 2 * t + e;
        const PhiloxOutput bits = draws.call(key_word, query_word);
#pragma unroll
        for (int half = 0; half < 2; ++half)
#pragma unroll
          for (int high_query = 0; high_query < 2; ++high_query)
#pragma unroll
            for (int high_key = 0; high_key < 2; ++high_key)
              mask.set(i, 4 * chunk + 2 * half + high_key, 2 * high_query + e,
                       draws.keeps(bits, half * 4 + high_query * 2 + high_key));
      }
  }
  return mask;
}

// Rows are keys from key0 (a multiple of 16, and of 32 when kMTiles is even), columns
// queries from query0 (a multiple of 16). One call covers rows {g, g + 8} of two m-tiles
// (one 32-key chunk) and columns {2t + e, 2t + e + 8} of a 16-query chunk.
template <int kMTiles, int kNTiles>
__device__ __forceinline__ KeepMask<kMTiles, kNTiles> keep_mask_keys_by_queries(
    const DropoutDraws& draws, int key0, int query0, int lane) {
  static_assert(kNTiles % 2 == 0, "whole 16-query chunks per warp tile");
  constexpr int kTilesPerCall = kMTiles % 2 == 0 ? 2 : 1;
  const int g = lane >> 2, t = lane & 3;
  KeepMask<kMTiles, kNTiles> mask;
#pragma unroll
  for (int i0 = 0; i0 < kMTiles; i0 += kTilesPerCall) {
    const int key16 = key0 + 16 * i0;
    const uint32_t key_word = static_cast<uint32_t>(key16 >> 5) * 8u + g;
#pragma unroll
    for (int chunk = 0; chunk < kNTiles / 2; ++chunk)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const uint32_t query_word =
            static_cast<uint32_t>((query0 + 16 * chunk) >> 4) * 8u + 2 * t + e;
        const PhiloxOutput bits = draws.call(key_word, query_word);
#pragma unroll
        for (int di = 0; di < kTilesPerCall; ++di) {
          // A lone m-tile is the lower or upper half of its 32-key chunk (slots stay
          // compile-time constants: a runtime slot would index the output through memory).
          const bool upper = kTilesPerCall == 2 ? di == 1 : ((key16 >> 4) & 1) != 0;
#pragma unroll
          for (int high_query = 0; high_query < 2; ++high_query)
#pragma unroll
            for (int high_key = 0; high_key < 2; ++high_key) {
              const uint32_t slot = high_query * 2 + high_key;
              mask.set(i0 + di, 2 * chunk + high_query, 2 * high_key + e,
                       upper ? draws.keeps(bits, 4 + slot) : draws.keeps(bits, slot));
            }
        }
      }
  }
  return mask;
}

}  // namespace jax_flash::cuda
