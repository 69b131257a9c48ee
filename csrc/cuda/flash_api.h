// The CUDA kernels as seen from the FFI handlers: plain C++, no XLA types. Every call is
// asynchronous on `stream` (no allocation, no host synchronization); errors found before
// or at launch come back as a Status.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "common/attention_params.h"
#include "cuda/status.h"

namespace jax_flash::cuda {

// Writes p.out and p.lse from p.q, p.k, p.v.
Status flash_forward(const AttentionParams& p, cudaStream_t stream);

// Device scratch the backward pass needs, carved out of one caller-provided allocation.
// The per-row statistics have rows of stats_stride (seqlen_q rounded up to 4) floats, so
// that every (batch, head) row starts 16-byte aligned, as the Hopper kernels' bulk tensor
// copies of them require.
struct BackwardWorkspace {
  float* delta = nullptr;     // (batch, num_heads, stats_stride): rowsum(dout * out) - dlse
  float* lse_log2 = nullptr;  // (batch, num_heads, stats_stride): the forward's lse * log2(e)
  float* dq_accum = nullptr;  // (batch, num_heads, seqlen_q, head_dim): float32 dQ sums
  int64_t stats_stride = 0;

  // Index of (batch * num_heads + head, query) in delta and lse_log2.
  JAX_FLASH_HOST_DEVICE int64_t stats_index(int64_t batch_head, int64_t query) const {
    return batch_head * stats_stride + query;
  }
};

// Bytes (and alignment) of the single allocation that backward_workspace() splits.
size_t backward_workspace_bytes(const AttentionParams& p);
constexpr size_t kWorkspaceAlignment = 256;
BackwardWorkspace backward_workspace(void* base, const AttentionParams& p);

// Writes p.dq, p.dk, p.dv; dk and dv are summed over each GQA group.
Status flash_backward(const AttentionParams& p, const BackwardWorkspace& workspace,
                      cudaStream_t stream);

// Split-KV scratch of a KV-cache call: each split's normalized rows and their lse, merged
// by a second kernel. Empty (and unused) when p.num_splits == 1.
struct KvCacheWorkspace {
  float* out_accum = nullptr;  // (num_splits, batch, num_heads, seqlen_q, head_dim)
  float* lse_accum = nullptr;  // (num_splits, batch, num_heads, seqlen_q), natural log
  int num_splits = 1;
};

// Bytes of the single allocation that kvcache_workspace() splits (p.num_splits >= 1).
size_t kvcache_workspace_bytes(const AttentionParams& p);
KvCacheWorkspace kvcache_workspace(void* base, const AttentionParams& p);

// Writes p.out and p.lse from p.q and the caches p.k, p.v read in place (common/kv_cache.h),
// split over p.num_splits slices of the keys.
Status flash_kvcache_forward(const AttentionParams& p, const KvCacheWorkspace& workspace,
                             cudaStream_t stream);

}  // namespace jax_flash::cuda
