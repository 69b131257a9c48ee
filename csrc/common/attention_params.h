// The one description of an attention call that every kernel (CPU and CUDA) reads.
// Plain data only: the FFI layer fills it from XLA buffers and attributes, the kernels
// never see XLA. Layout is BSHD (batch, seqlen, heads, head_dim); strides are in
// elements so that a caller can later hand us views (packed qkv) without copies.
#pragma once

#include <cstdint>

// The helpers below are shared with the CUDA kernels, which must agree with the CPU code on
// exactly which keys each query sees.
#if defined(__CUDACC__)
#define JAX_FLASH_HOST_DEVICE __host__ __device__
#else
#define JAX_FLASH_HOST_DEVICE
#endif

namespace jax_flash {

enum class ElementType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct TensorStrides {
  int64_t batch = 0;
  int64_t row = 0;   // one sequence position
  int64_t head = 0;
};

struct AttentionParams {
  ElementType element_type = ElementType::kFloat32;

  int64_t batch = 0;
  int64_t seqlen_q = 0;
  int64_t seqlen_k = 0;
  int64_t num_heads = 0;
  int64_t num_heads_kv = 0;  // num_heads % num_heads_kv == 0 (GQA / MQA)
  int64_t head_dim = 0;

  float softmax_scale = 1.0f;
  float softcap = 0.0f;  // 0 disables; else s = softcap * tanh(s / softcap)
  // Key j is visible to query i iff
  //   i + diagonal_offset - window_left <= j <= i + diagonal_offset + window_right,
  // where -1 leaves that side unbounded. Causal attention is window_right == 0.
  // diagonal_offset is the key aligned with query 0: seqlen_k - seqlen_q (bottom-right,
  // FlashAttention's convention) unless a caller moves it, e.g. 0 for top-left alignment or
  // the distance between two blocks of one sequence in ring attention. ALiBi measures its
  // distances from the same diagonal.
  int64_t window_left = -1;
  int64_t window_right = -1;
  int64_t diagonal_offset = 0;

  // ALiBi slopes, float32 (batch, num_heads); null when ALiBi is off.
  const float* alibi_slopes = nullptr;

  // Packed sequences: int32 (batch, seqlen_q) and (batch, seqlen_k), contiguous; query i
  // sees key j only if their ids are equal (on top of the window). Null when off.
  const int32_t* q_segment_ids = nullptr;
  const int32_t* kv_segment_ids = nullptr;

  // Backward only: results that do not depend on the order in which thread blocks run
  // (CUDA: dQ by a pass over query blocks instead of atomics). The CPU is always so.
  bool deterministic = false;

  // Forward operands.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;  // (batch, num_heads, seqlen_q), natural log

  // Backward operands (dq/dk/dv share the strides of q/k/v, dout those of out).
  const void* dout = nullptr;
  const float* dlse = nullptr;  // cotangent of lse, same layout as lse
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;

  TensorStrides q_strides, k_strides, v_strides, out_strides;

  // Attention dropout (common/dropout.h; after the operands, so that adding it left the
  // other fields' offsets, and the kernels without dropout, unchanged): the Philox key of
  // each (batch, head), uint32 (batch, num_heads, 2); null when off. An element is kept
  // iff its 16-bit draw is below dropout_keep_threshold (the keep probability times 2^16,
  // set by the caller so that every implementation draws the same mask), and kept
  // probabilities are multiplied by dropout_scale (2^16 / threshold: exactly unbiased).
  // lse is that of the undropped row.
  const uint32_t* dropout_seeds = nullptr;
  uint32_t dropout_keep_threshold = 0;
  float dropout_scale = 1.0f;

  // KV cache (flash_attn_with_kvcache; forward only). k and v are then caches read in place,
  // (num_cache_pages, page_size, num_heads_kv, head_dim), k_strides.batch stepping one page,
  // and seqlen_k is one batch row's capacity. Lengths and page ids are arrays, not
  // attributes, so one compiled call serves every decoding step. common/kv_cache.h holds the
  // one rule that turns these into key counts and addresses (clamping, unreadable pages).
  const int32_t* seqlens_k = nullptr;     // (batch,) keys each row sees; non-null = KV cache
  const int32_t* kv_batch_idx = nullptr;  // (batch,) cache row of each batch row (contiguous
                                          // caches; lets a batch pick rows without a copy);
                                          // null = row b
  const int32_t* block_table = nullptr;   // (batch, max_blocks_per_seq) page ids (paged
                                          // cache: a shared pool); null = contiguous cache
  int64_t page_size = 0;           // keys per page; a contiguous cache is one page of seqlen_k
  int64_t max_blocks_per_seq = 0;  // block_table's row length
  int64_t num_cache_pages = 0;     // the caches' leading dim: bounds the page ids / rows read
  int num_splits = 0;              // GPU split-KV count (0 = heuristic); the CPU ignores it

  JAX_FLASH_HOST_DEVICE bool has_window() const { return window_left >= 0 || window_right >= 0; }
  JAX_FLASH_HOST_DEVICE bool has_alibi() const { return alibi_slopes != nullptr; }
  JAX_FLASH_HOST_DEVICE bool has_segment_ids() const { return q_segment_ids != nullptr; }
  JAX_FLASH_HOST_DEVICE bool has_dropout() const { return dropout_seeds != nullptr; }
  JAX_FLASH_HOST_DEVICE int64_t group_size() const { return num_heads / num_heads_kv; }
};

// The half-open key range [first, last) that any query row in [row_begin, row_end) may see.
struct IndexRange {
  int64_t begin;
  int64_t end;
  JAX_FLASH_HOST_DEVICE bool empty() const { return end <= begin; }
};

JAX_FLASH_HOST_DEVICE inline IndexRange visible_keys(const AttentionParams& p, int64_t row_begin,
                                                     int64_t row_end) {
  int64_t begin = 0, end = p.seqlen_k;
  const int64_t offset = p.diagonal_offset;
  if (p.window_left >= 0) {
    const int64_t lo = row_begin + offset - p.window_left;
    begin = lo > begin ? lo : begin;
  }
  if (p.window_right >= 0) {
    const int64_t hi = row_end - 1 + offset + p.window_right + 1;
    end = hi < end ? hi : end;
  }
  return {begin, end};
}

// The query rows that can see any key in [key_begin, key_end).
JAX_FLASH_HOST_DEVICE inline IndexRange visible_queries(const AttentionParams& p, int64_t key_begin,
                                                        int64_t key_end) {
  int64_t begin = 0, end = p.seqlen_q;
  const int64_t offset = p.diagonal_offset;
  if (p.window_right >= 0) {
    const int64_t lo = key_begin - offset - p.window_right;
    begin = lo > begin ? lo : begin;
  }
  if (p.window_left >= 0) {
    const int64_t hi = key_end - 1 - offset + p.window_left + 1;
    end = hi < end ? hi : end;
  }
  return {begin, end};
}

}  // namespace jax_flash
