// Which keys each query sees, in the CUDA kernels' 32-bit indices (KeyWindow).
// Host-compilable: tests/test_host_checks.py checks it against the CPU's visible_keys
// and visible_queries, because the kernels must agree with the CPU code on exactly this.
#pragma once

#include <cstdint>
#if !defined(__CUDACC__)
#include <algorithm>
#endif

#include "common/attention_params.h"

// nvcc sees device functions, exactly as the kernels had them (__host__ __device__ moved
// ptxas's register choices in two sm80 backward kernels); the host check sees inline ones.
#if defined(__CUDACC__)
#define JAX_FLASH_MASK_INLINE __device__ __forceinline__
#else
#define JAX_FLASH_MASK_INLINE inline
#endif

namespace jax_flash::cuda {

#if !defined(__CUDACC__)
using std::min;  // nvcc's device min, for the host check
#endif

// The columns [begin, end) of one row of a masked tile that the window shows, counted from
// a lane's first column. A lane's elements sit at compile-time offsets from that column
// (8 j + (c & 1) in the mma and wgmma layouts), so each costs two compares against
// constants, where visible() redoes the index arithmetic per element; on the forward's
// diagonal tiles that arithmetic was most of their softmax.
struct ColumnRange {
  int begin, end;
  JAX_FLASH_MASK_INLINE bool contains(int column) const { return column >= begin && column < end; }
};

// The window of the call in 32-bit indices (the launcher checks sequence lengths fit).
struct KeyWindow {
  int seqlen_k;
  int diagonal_offset;  // the key aligned with query 0
  int left;             // -1: unbounded
  int right;            // -1: unbounded

  JAX_FLASH_MASK_INLINE static KeyWindow make(const AttentionParams& p) {
    return {static_cast<int>(p.seqlen_k), static_cast<int>(p.diagonal_offset),
            static_cast<int>(p.window_left), static_cast<int>(p.window_right)};
  }

  template <bool kHasWindow>
  JAX_FLASH_MASK_INLINE bool visible(int query, int key) const {
    if (key >= seqlen_k) return false;
    if constexpr (kHasWindow) {
      const int diagonal = query + diagonal_offset;
      if (left >= 0 && key < diagonal - left) return false;
      if (right >= 0 && key > diagonal + right) return false;
    }
    return true;
  }

  // Whether some (query, key) of the queries [q0, q1) and keys [k0, k1) is not visible:
  // only such boundary tiles pay for per-element masking.
  template <bool kHasWindow>
  JAX_FLASH_MASK_INLINE bool tile_needs_mask(int q0, int q1, int k0, int k1) const {
    if (k1 > seqlen_k) return true;
    if constexpr (kHasWindow) {
      if (left >= 0 && k0 < q1 - 1 + diagonal_offset - left) return true;
      if (right >= 0 && k1 - 1 > q0 + diagonal_offset + right) return true;
    }
    return false;
  }

  // The keys `query` sees, as columns counted from key `first_key`; only columns >= 0 are
  // asked about, so an unbounded left side is begin 0.
  template <bool kHasWindow>
  JAX_FLASH_MASK_INLINE ColumnRange visible_key_columns(int query, int first_key) const {
    ColumnRange range{0, seqlen_k - first_key};
    if constexpr (kHasWindow) {
      const int diagonal = query + diagonal_offset - first_key;
      if (left >= 0) range.begin = diagonal - left;
      if (right >= 0) range.end = min(range.end, diagonal + right + 1);
    }
    return range;
  }

  // The queries that see `key`, as columns counted from query `first_query` (columns >= 0;
  // queries past seqlen_q are not the window's business, as in visible()).
  template <bool kHasWindow>
  JAX_FLASH_MASK_INLINE ColumnRange visible_query_columns(int key, int first_query) const {
    if (key >= seqlen_k) return {0, 0};
    ColumnRange range{0, kUnboundedColumn};
    if constexpr (kHasWindow) {
      const int aligned_query = key - diagonal_offset - first_query;
      if (right >= 0) range.begin = aligned_query - right;
      if (left >= 0) range.end = aligned_query + left + 1;
    }
    return range;
  }

  // Past every column a tile has (sequence lengths are below 2^29, dispatch.cu).
  static constexpr int kUnboundedColumn = 1 << 30;
};

}  // namespace jax_flash::cuda
