// Decodes the KV-cache forward call (jax_flash_kvcache_forward) into AttentionParams: q and
// the caches read in place, per-row key counts, optional cache-row indices or page table.
// Its own attribute struct, so the two calls' attribute lists can change independently.
// As for the other calls, the Python layer checks the same shapes with friendlier messages;
// the run-time values (lengths, indices, page ids) are made safe by common/kv_cache.h.
#pragma once

#include <cstdint>

#include "common/kv_cache.h"
#include "ffi/decode_params.h"
#include "xla/ffi/api/ffi.h"

namespace jax_flash::ffi_glue {

namespace ffi = xla::ffi;

struct KvCacheAttributes {
  float softmax_scale;
  float softcap;
  int64_t window_left;
  int64_t window_right;
  bool has_alibi;
  bool has_kv_batch_idx;
  bool has_block_table;
  int64_t num_splits;
};

// q, k_cache, v_cache, alibi_slopes (batch, heads) f32 (empty without ALiBi), seqlens_k
// (batch,) s32, kv_batch_idx (batch,) s32, block_table (batch, max_blocks) s32; the last two
// are placeholders (right batch size, any contents) when the attributes say they are off.
struct KvCacheOperands {
  const ffi::AnyBuffer& q;
  const ffi::AnyBuffer& k_cache;
  const ffi::AnyBuffer& v_cache;
  const ffi::Buffer<ffi::F32>& alibi_slopes;
  const ffi::Buffer<ffi::S32>& seqlens_k;
  const ffi::Buffer<ffi::S32>& kv_batch_idx;
  const ffi::Buffer<ffi::S32>& block_table;
};

// Page sizes must be multiples of this: the contract the documentation states (README,
// docs/api.md), checked on every platform alike so that a call valid on one is valid on all.
// No kernel relies on it: the CPU and GPU kernels look up each key's page separately, so a
// key tile may straddle pages. It is API hygiene, keeping to FlashAttention-style
// page-size rules, and leaves room for kernels that load whole pages.
inline constexpr int64_t kPageSizeMultiple = 16;

inline ffi::Error decode_kvcache_forward(const KvCacheOperands& in, const KvCacheAttributes& attrs,
                                         ffi::AnyBuffer& out, ffi::Buffer<ffi::F32>& lse,
                                         AttentionParams* p) {
  auto qd = in.q.dimensions(), cd = in.k_cache.dimensions();
  if (qd.size() != 4 || cd.size() != 4) return invalid("q and the caches must have rank 4");
  if (!same_dims(in.k_cache, in.v_cache)) return invalid("k_cache and v_cache must have the same shape");
  if (in.q.element_type() != in.k_cache.element_type() ||
      in.q.element_type() != in.v_cache.element_type())
    return invalid("q, k_cache and v_cache must share one dtype");
  if (!element_type_of(in.q.element_type(), &p->element_type))
    return invalid("dtype must be float32, float16 or bfloat16");
  p->batch = qd[0];
  p->seqlen_q = qd[1];
  p->num_heads = qd[2];
  p->head_dim = qd[3];
  p->num_cache_pages = cd[0];
  p->page_size = cd[1];
  p->num_heads_kv = cd[2];
  if (cd[3] != p->head_dim) return invalid("the caches must have the head_dim of q");
  if (p->num_heads_kv <= 0 || p->num_heads % p->num_heads_kv != 0)
    return invalid("num_heads must be a multiple of num_heads_kv");
  if (p->head_dim < 1 || p->head_dim > 256) return invalid("head_dim must be in [1, 256]");
  if (attrs.window_left < -1 || attrs.window_right < -1) return invalid("window sizes must be >= -1");
  if (!(attrs.softcap >= 0.0f)) return invalid("softcap must be >= 0");
  if (attrs.num_splits < 0) return invalid("num_splits must be >= 0");
  if (attrs.has_kv_batch_idx && attrs.has_block_table)
    return invalid("cache_batch_idx cannot be combined with a paged cache (block_table)");

  // Without ALiBi the slopes operand is an empty placeholder: a decoding step should not
  // pay for materializing zeros.
  auto sd = in.alibi_slopes.dimensions();
  if (attrs.has_alibi ? (sd.size() != 2 || sd[0] != p->batch || sd[1] != p->num_heads)
                      : in.alibi_slopes.element_count() != 0)
    return invalid("alibi_slopes buffer must be (batch, num_heads) float32 (empty without ALiBi)");
  auto ld = in.seqlens_k.dimensions(), id = in.kv_batch_idx.dimensions();
  if (ld.size() != 1 || ld[0] != p->batch || id.size() != 1 || id[0] != p->batch)
    return invalid("seqlens_k and kv_batch_idx must be (batch,) int32");
  auto td = in.block_table.dimensions();
  if (td.size() != 2 || td[0] != p->batch) return invalid("block_table must be (batch, max_blocks) int32");
  if (attrs.has_block_table) {
    if (td[1] < 1) return invalid("block_table needs at least one block per sequence");
    if (p->page_size < 1 || p->page_size % kPageSizeMultiple != 0)
      return invalid("the page size (k_cache.shape[1] of a paged cache) must be a positive "
                     "multiple of 16");
    p->max_blocks_per_seq = td[1];
    p->seqlen_k = td[1] * p->page_size;
    p->block_table = in.block_table.typed_data();
  } else {
    p->max_blocks_per_seq = 1;
    p->seqlen_k = p->page_size;  // one page per cache row
    p->kv_batch_idx = attrs.has_kv_batch_idx ? in.kv_batch_idx.typed_data() : nullptr;
  }
  p->seqlens_k = in.seqlens_k.typed_data();
  p->num_splits = static_cast<int>(attrs.num_splits);

  p->softmax_scale = attrs.softmax_scale;
  p->softcap = attrs.softcap;
  p->window_left = attrs.window_left;
  p->window_right = attrs.window_right;
  p->diagonal_offset = p->seqlen_k - p->seqlen_q;  // per row: common/kv_cache.h
  p->alibi_slopes = attrs.has_alibi ? in.alibi_slopes.typed_data() : nullptr;
  p->q = in.q.untyped_data();
  p->k = in.k_cache.untyped_data();
  p->v = in.v_cache.untyped_data();
  p->q_strides = contiguous_bshd(p->seqlen_q, p->num_heads, p->head_dim);
  p->k_strides = contiguous_bshd(p->page_size, p->num_heads_kv, p->head_dim);
  p->v_strides = p->k_strides;
  p->out_strides = p->q_strides;
  return decode_forward_results(in.q, out, lse, p);
}

}  // namespace jax_flash::ffi_glue

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_flash::ffi_glue::KvCacheAttributes,
                                      xla::ffi::StructMember<float>("softmax_scale"),
                                      xla::ffi::StructMember<float>("softcap"),
                                      xla::ffi::StructMember<int64_t>("window_left"),
                                      xla::ffi::StructMember<int64_t>("window_right"),
                                      xla::ffi::StructMember<bool>("has_alibi"),
                                      xla::ffi::StructMember<bool>("has_kv_batch_idx"),
                                      xla::ffi::StructMember<bool>("has_block_table"),
                                      xla::ffi::StructMember<int64_t>("num_splits"));
