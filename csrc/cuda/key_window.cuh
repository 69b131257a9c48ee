// Which keys each query sees, in the CUDA kernels' 32-bit indices (KeyWindow).
// Host-compilable: tests/test_key_window_host.py checks it against the CPU's visible_keys
// and visible_queries, because the kernels must agree with the CPU code on exactly this.
#pragma once

#include <cstdint>

#include "common/attention_params.h"

// nvcc sees device functions, exactly as the kernels had them (__host__ __device__ moved
// ptxas's register choices in two sm80 backward kernels); the host check sees inline ones.
#if defined(__CUDACC__)
#define JAX_FLASH_MASK_INLINE __device__ __forceinline__
#else
#define JAX_FLASH_MASK_INLINE inline
#endif

namespace jax_flash::cuda {

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
};

}  // namespace jax_flash::cuda
