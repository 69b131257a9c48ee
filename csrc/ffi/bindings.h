// The operand and attribute lists of the two custom calls, shared by the CPU and CUDA
// handlers so that the platforms cannot drift apart; each handler binds its own context
// (thread pool or stream) first, and the CUDA backward adds its workspace result.
#pragma once

#include <cstdint>
#include <utility>

#include "ffi/decode_params.h"
#include "xla/ffi/api/ffi.h"

namespace jax_flash::ffi_glue {

namespace ffi = xla::ffi;

// q, k, v, alibi_slopes, q_segment_ids, kv_segment_ids, dropout_seeds -> out, lse.
template <typename Binding>
auto bind_forward_operands(Binding binding) {
  return std::move(binding).template Arg<ffi::AnyBuffer>()         // q
      .template Arg<ffi::AnyBuffer>()                   // k
      .template Arg<ffi::AnyBuffer>()                   // v
      .template Arg<ffi::Buffer<ffi::F32>>()            // alibi_slopes
      .template Arg<ffi::Buffer<ffi::S32>>()            // q_segment_ids
      .template Arg<ffi::Buffer<ffi::S32>>()            // kv_segment_ids
      .template Arg<ffi::Buffer<ffi::U32>>()            // dropout_seeds
      .template Ret<ffi::AnyBuffer>()                   // out
      .template Ret<ffi::Buffer<ffi::F32>>();           // lse
}

// q, k, v, out, dout, lse, dlse, alibi_slopes, q_segment_ids, kv_segment_ids, dropout_seeds
// -> dq, dk, dv.
template <typename Binding>
auto bind_backward_operands(Binding binding) {
  return std::move(binding).template Arg<ffi::AnyBuffer>()         // q
      .template Arg<ffi::AnyBuffer>()                   // k
      .template Arg<ffi::AnyBuffer>()                   // v
      .template Arg<ffi::AnyBuffer>()                   // out
      .template Arg<ffi::AnyBuffer>()                   // dout
      .template Arg<ffi::Buffer<ffi::F32>>()            // lse
      .template Arg<ffi::Buffer<ffi::F32>>()            // dlse
      .template Arg<ffi::Buffer<ffi::F32>>()            // alibi_slopes
      .template Arg<ffi::Buffer<ffi::S32>>()            // q_segment_ids
      .template Arg<ffi::Buffer<ffi::S32>>()            // kv_segment_ids
      .template Arg<ffi::Buffer<ffi::U32>>()            // dropout_seeds
      .template Ret<ffi::AnyBuffer>()                   // dq
      .template Ret<ffi::AnyBuffer>()                   // dk
      .template Ret<ffi::AnyBuffer>();                  // dv
}

// The scalars, decoded by name into one ScalarAttributes.
template <typename Binding>
auto bind_attributes(Binding binding) {
  return std::move(binding).template Attrs<ScalarAttributes>();
}

}  // namespace jax_flash::ffi_glue

// ---- KV cache (flash_attn_with_kvcache): its own operand list and attribute struct ----
#include "ffi/decode_kvcache.h"

namespace jax_flash::ffi_glue {

// q, k_cache, v_cache, alibi_slopes, seqlens_k, kv_batch_idx, block_table -> out, lse (the
// CUDA handler adds its split-KV workspace result, then both bind the KvCacheAttributes).
template <typename Binding>
auto bind_kvcache_operands(Binding binding) {
  return std::move(binding).template Arg<ffi::AnyBuffer>()         // q
      .template Arg<ffi::AnyBuffer>()                   // k_cache
      .template Arg<ffi::AnyBuffer>()                   // v_cache
      .template Arg<ffi::Buffer<ffi::F32>>()            // alibi_slopes
      .template Arg<ffi::Buffer<ffi::S32>>()            // seqlens_k
      .template Arg<ffi::Buffer<ffi::S32>>()            // kv_batch_idx
      .template Arg<ffi::Buffer<ffi::S32>>()            // block_table
      .template Ret<ffi::AnyBuffer>()                   // out
      .template Ret<ffi::Buffer<ffi::F32>>();           // lse
}

template <typename Binding>
auto bind_kvcache_attributes(Binding binding) {
  return std::move(binding).template Attrs<KvCacheAttributes>();
}

}  // namespace jax_flash::ffi_glue
