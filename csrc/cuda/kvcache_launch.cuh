// Host-side launch of the KV-cache kernels for one head-dim class and element type: the
// decode or prefill tile shape, the split-KV grid, and the combine. Included by the
// per-class instantiation files only.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "cuda/kvcache_kernel.cuh"
#include "cuda/launch.h"

namespace jax_flash::cuda {

template <class Config, typename Element>
Status launch_kvcache_config(const AttentionParams& p, const KvCacheWorkspace& workspace,
                             const LaunchOptions& options, cudaStream_t stream) {
  auto kernel = kvcache_kernel_sm80<Config, Element>;
  if (Status s = allow_shared_memory(kernel, Config::kSmemBytes, options,
                                     "head_dim " + std::to_string(Config::kHeadDim) + " KV-cache");
      !s.ok())
    return s;
  const int64_t rows = p.seqlen_q * (p.num_heads / p.num_heads_kv);
  const int64_t row_blocks = (rows + Config::kBlockM - 1) / Config::kBlockM;
  const dim3 grid(static_cast<unsigned>(row_blocks * workspace.num_splits),
                  static_cast<unsigned>(p.num_heads_kv), static_cast<unsigned>(p.batch));
  kernel<<<grid, Config::kThreads, Config::kSmemBytes, stream>>>(p, workspace, options.vectorized);
  if (Status s = Status::FromCuda(cudaGetLastError(), "launching the KV-cache kernel"); !s.ok())
    return s;
  if (workspace.num_splits == 1) return Status::Ok();
  const int64_t out_rows = p.batch * p.num_heads * p.seqlen_q;
  kvcache_combine_kernel<Element><<<static_cast<unsigned>(out_rows), 128, 0, stream>>>(p, workspace);
  return Status::FromCuda(cudaGetLastError(), "launching the KV-cache combine kernel");
}

// The shape, or its smaller-shared-memory fallback where the GPU needs that.
template <class Config, typename Element>
Status launch_kvcache_fitting(const AttentionParams& p, const KvCacheWorkspace& workspace,
                              const LaunchOptions& options, cudaStream_t stream) {
  return with_fitting_config<Config, typename KvCacheSmallSmem<Config>::Type>(
      options, [&](auto config) {
        return launch_kvcache_config<decltype(config), Element>(p, workspace, options, stream);
      });
}

// Up to 16 rows (query positions x the query heads of a KV head) take the decode shape,
// whose warps split each key block; more take the prefill shape, whose warps split rows.
template <int kHeadDimClass, typename Element>
Status launch_kvcache_sm80(const AttentionParams& p, const KvCacheWorkspace& workspace,
                           const LaunchOptions& options, cudaStream_t stream) {
  const int64_t rows = p.seqlen_q * (p.num_heads / p.num_heads_kv);
  if (rows <= KvCacheDecodeConfig<kHeadDimClass>::kBlockM)
    return launch_kvcache_fitting<KvCacheDecodeConfig<kHeadDimClass>, Element>(p, workspace,
                                                                               options, stream);
  return launch_kvcache_fitting<KvCachePrefillConfig<kHeadDimClass>, Element>(p, workspace,
                                                                              options, stream);
}

}  // namespace jax_flash::cuda
