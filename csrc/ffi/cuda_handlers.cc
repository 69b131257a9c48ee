#include "ffi/cuda_handlers.h"

#include <cuda_runtime_api.h>

#include <string>

#include "cuda/flash_api.h"
#include "ffi/bindings.h"
#include "ffi/decode_params.h"
#include "ffi/poison.h"

namespace jax_flash::ffi_glue {
namespace {

ffi::Error to_ffi_error(const cuda::Status& status) {
  switch (status.code()) {
    case cuda::Status::Code::kOk: return ffi::Error::Success();
    case cuda::Status::Code::kInvalidArgument:
      return ffi::Error(ffi::ErrorCode::kInvalidArgument, status.message());
    case cuda::Status::Code::kUnimplemented:
      return ffi::Error(ffi::ErrorCode::kUnimplemented, status.message());
    case cuda::Status::Code::kInternal: break;
  }
  return ffi::Error(ffi::ErrorCode::kInternal, status.message());
}

// Enqueued on the kernels' stream, so the fill lands before the kernels write.
template <typename... Buffers>
ffi::Error poison_if_requested(cudaStream_t stream, const Buffers&... buffers) {
  if (!poison_outputs_requested()) return ffi::Error::Success();
  cudaError_t error = cudaSuccess;
  ((error = error != cudaSuccess ? error
                                 : cudaMemsetAsync(buffers.untyped_data(), kPoisonByte,
                                                   buffers.size_bytes(), stream)),
   ...);
  if (error == cudaSuccess) return ffi::Error::Success();
  return ffi::Error(ffi::ErrorCode::kInternal,
                    std::string("jax_flash CUDA: poisoning outputs: ") + cudaGetErrorString(error));
}

ffi::Error forward_cuda(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                        ffi::Buffer<ffi::F32> alibi_slopes, ffi::Buffer<ffi::S32> q_segment_ids,
                        ffi::Buffer<ffi::S32> kv_segment_ids,
                        ffi::Buffer<ffi::U32> dropout_seeds, ffi::Result<ffi::AnyBuffer> out,
                        ffi::Result<ffi::Buffer<ffi::F32>> lse, const ScalarAttributes& attrs) {
  AttentionParams p;
  const MaskOperands masks{alibi_slopes, q_segment_ids, kv_segment_ids, dropout_seeds};
  if (auto e = decode_forward(q, k, v, masks, attrs, *out, *lse, &p); e.failure())
    return e;
  if (auto e = poison_if_requested(stream, *out, *lse); e.failure()) return e;
  return to_ffi_error(cuda::flash_forward(p, stream));
}

ffi::Error backward_cuda(cudaStream_t stream, ffi::AnyBuffer q,
                         ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer out,
                         ffi::AnyBuffer dout, ffi::Buffer<ffi::F32> lse,
                         ffi::Buffer<ffi::F32> dlse, ffi::Buffer<ffi::F32> alibi_slopes,
                         ffi::Buffer<ffi::S32> q_segment_ids, ffi::Buffer<ffi::S32> kv_segment_ids,
                         ffi::Buffer<ffi::U32> dropout_seeds,
                         ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                         ffi::Result<ffi::AnyBuffer> dv,
                         ffi::Result<ffi::Buffer<ffi::U8>> workspace_buffer, const ScalarAttributes& attrs) {
  AttentionParams p;
  const MaskOperands masks{alibi_slopes, q_segment_ids, kv_segment_ids, dropout_seeds};
  if (auto e = decode_backward(q, k, v, out, dout, lse, dlse, masks, attrs, *dq, *dk, *dv, &p);
      e.failure())
    return e;
  if (auto e = poison_if_requested(stream, *dq, *dk, *dv); e.failure()) return e;

  // The workspace is an extra result, so XLA's own allocator plans it like any buffer.
  const size_t needed = cuda::backward_workspace_bytes(p);
  if (workspace_buffer->size_bytes() < needed)
    return invalid("backward workspace has " + std::to_string(workspace_buffer->size_bytes()) +
                   " bytes; this call needs " + std::to_string(needed));
  const cuda::BackwardWorkspace workspace =
      cuda::backward_workspace(workspace_buffer->untyped_data(), p);
  return to_ffi_error(cuda::flash_backward(p, workspace, stream));
}

}  // namespace
}  // namespace jax_flash::ffi_glue

namespace ffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFlashForwardCuda, jax_flash::ffi_glue::forward_cuda,
                              jax_flash::ffi_glue::bind_attributes(
                                  jax_flash::ffi_glue::bind_forward_operands(
                                      ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>())));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFlashBackwardCuda, jax_flash::ffi_glue::backward_cuda,
                              jax_flash::ffi_glue::bind_attributes(
                                  jax_flash::ffi_glue::bind_backward_operands(
                                      ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>())
                                      .Ret<ffi::Buffer<ffi::U8>>()));  // workspace

// ---- KV cache (flash_attn_with_kvcache) ----
namespace jax_flash::ffi_glue {
namespace {

// The params are decoded (and checked) exactly as on the CPU. The split-KV workspace is an
// extra result that XLA allocates, sized by the Python layer for the split count it chose.
ffi::Error kvcache_forward_cuda(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k_cache,
                                ffi::AnyBuffer v_cache, ffi::Buffer<ffi::F32> alibi_slopes,
                                ffi::Buffer<ffi::S32> seqlens_k, ffi::Buffer<ffi::S32> kv_batch_idx,
                                ffi::Buffer<ffi::S32> block_table, ffi::Result<ffi::AnyBuffer> out,
                                ffi::Result<ffi::Buffer<ffi::F32>> lse,
                                ffi::Result<ffi::Buffer<ffi::U8>> workspace_buffer,
                                const KvCacheAttributes& attrs) {
  AttentionParams p;
  if (auto e = decode_kvcache_forward(
          {q, k_cache, v_cache, alibi_slopes, seqlens_k, kv_batch_idx, block_table}, attrs, *out,
          *lse, &p);
      e.failure())
    return e;
  if (p.num_splits < 1) return invalid("the CUDA KV-cache call needs a resolved num_splits >= 1");
  if (workspace_buffer->size_bytes() < cuda::kvcache_workspace_bytes(p))
    return invalid("the KV-cache workspace is smaller than its split count needs");
  if (auto e = poison_if_requested(stream, *out, *lse); e.failure()) return e;
  return to_ffi_error(cuda::flash_kvcache_forward(
      p, cuda::kvcache_workspace(workspace_buffer->untyped_data(), p), stream));
}

}  // namespace
}  // namespace jax_flash::ffi_glue

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFlashKvCacheForwardCuda,
                              jax_flash::ffi_glue::kvcache_forward_cuda,
                              jax_flash::ffi_glue::bind_kvcache_attributes(
                                  jax_flash::ffi_glue::bind_kvcache_operands(
                                      ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>())
                                      .template Ret<ffi::Buffer<ffi::U8>>()));
