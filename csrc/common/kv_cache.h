// The one rule for reading keys and values from a KV cache (flash_attn_with_kvcache), shared
// by the CPU and CUDA kernels so that both agree on which keys a batch row sees and where
// each one lives, including when the run-time data is out of range (lengths and page ids are
// traced arrays, so no trace-time check can catch them):
//
//   - The keys of batch row b are its first kv_cache_seqlen_k(p, b) positions: seqlens_k[b]
//     clamped into [0, seqlen_k], seqlen_k being one row's capacity (the contiguous cache's
//     length, or max_blocks_per_seq * page_size).
//   - Masks and ALiBi align bottom-right per row: the diagonal offset of row b is
//     kv_cache_seqlen_k(p, b) - seqlen_q.
//   - A key whose page (a block_table entry) or cache row (kv_batch_idx, or b) lies outside
//     [0, num_cache_pages) is unreadable: it is skipped, as if masked. A row with nothing
//     readable gets a zero output and lse = +inf, like any fully masked row.
//
// A contiguous cache (batch_cache, seqlen_cache, heads_kv, head_dim) is the case of one page
// per cache row: page_size == seqlen_k and the page of row b is kv_batch_idx[b] (or b).
#pragma once

#include <cstdint>

#include "common/attention_params.h"

namespace jax_flash {

JAX_FLASH_HOST_DEVICE inline bool has_kv_cache(const AttentionParams& p) {
  return p.seqlens_k != nullptr;
}

// The number of keys batch row b sees (before the causal / window masks).
JAX_FLASH_HOST_DEVICE inline int64_t kv_cache_seqlen_k(const AttentionParams& p, int64_t b) {
  if (!has_kv_cache(p)) return p.seqlen_k;
  const int64_t n = p.seqlens_k[b];
  return n < 0 ? 0 : (n > p.seqlen_k ? p.seqlen_k : n);
}

// The key aligned with query 0 of batch row b.
JAX_FLASH_HOST_DEVICE inline int64_t kv_cache_diagonal_offset(const AttentionParams& p, int64_t b) {
  return has_kv_cache(p) ? kv_cache_seqlen_k(p, b) - p.seqlen_q : p.diagonal_offset;
}

// The element offset of key `key` of batch row b, key/value head head_kv, from the start of
// a cache laid out with strides s (p.k_strides or p.v_strides: .batch steps one page), or -1
// when row b cannot read that key (past its key count, or on a page / cache row out of range).
JAX_FLASH_HOST_DEVICE inline int64_t kv_cache_offset(const AttentionParams& p,
                                                     const TensorStrides& s, int64_t b,
                                                     int64_t key, int64_t head_kv) {
  if (key < 0 || key >= kv_cache_seqlen_k(p, b)) return -1;
  const int64_t page = p.block_table != nullptr
                           ? p.block_table[b * p.max_blocks_per_seq + key / p.page_size]
                           : (p.kv_batch_idx != nullptr ? p.kv_batch_idx[b] : b);
  if (page < 0 || page >= p.num_cache_pages) return -1;
  return page * s.batch + (key % p.page_size) * s.row + head_kv * s.head;
}

// The params of batch row b alone: seqlen_k and diagonal_offset become the row's, so that
// visible_keys, visible_queries and the kernels' masks apply unchanged. p itself when the
// call has no KV cache.
JAX_FLASH_HOST_DEVICE inline AttentionParams kv_cache_row_params(const AttentionParams& p,
                                                                 int64_t b) {
  AttentionParams row = p;
  if (has_kv_cache(p)) {
    row.seqlen_k = kv_cache_seqlen_k(p, b);
    row.diagonal_offset = row.seqlen_k - p.seqlen_q;
  }
  return row;
}

}  // namespace jax_flash
