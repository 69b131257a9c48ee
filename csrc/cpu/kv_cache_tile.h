// Key / value tiles read from a KV cache (flash_attn_with_kvcache): the counterparts of
// load_rows_transposed / load_rows for keys addressed through common/kv_cache.h, so paged
// and contiguous caches, per-row lengths and out-of-range pages follow the CUDA kernels'
// rule exactly.
#pragma once

#include <cstdint>

#include "common/kv_cache.h"
#include "cpu/tile.h"

namespace jax_flash::cpu {

// Keys col0 .. col0 + n - 1 of batch row b, kv head head_kv: kt[c * kBlockN + j] and
// v[j * d + c] like the dense loads. readable[j] says whether key col0 + j could be read;
// an unreadable key is loaded as zeros and must be masked (mask_unreadable_keys).
template <typename T, typename A>
void load_kv_cache_tile(const AttentionParams& p, int64_t b, int64_t head_kv, int64_t col0, int n,
                        A* kt, A* v, bool* readable) {
  const int64_t d = p.head_dim;
  for (int j = 0; j < n; ++j) {
    const int64_t k_offset = kv_cache_offset(p, p.k_strides, b, col0 + j, head_kv);
    const int64_t v_offset = kv_cache_offset(p, p.v_strides, b, col0 + j, head_kv);
    readable[j] = k_offset >= 0 && v_offset >= 0;
    if (!readable[j]) {
      for (int64_t c = 0; c < d; ++c) kt[c * kBlockN + j] = v[j * d + c] = 0;
      continue;
    }
    const T* k_row = static_cast<const T*>(p.k) + k_offset;
    const T* v_row = static_cast<const T*>(p.v) + v_offset;
    for (int64_t c = 0; c < d; ++c) {
      kt[c * kBlockN + j] = to_float(k_row[c]);
      v[j * d + c] = to_float(v_row[c]);
    }
  }
}

// Scores s[m × n] (row stride kBlockN) of unreadable keys become -inf.
template <typename A>
void mask_unreadable_keys(const bool* readable, int m, int n, A* s) {
  for (int j = 0; j < n; ++j) {
    if (readable[j]) continue;
    for (int i = 0; i < m; ++i) s[i * kBlockN + j] = kNegInf<A>;
  }
}

}  // namespace jax_flash::cpu
