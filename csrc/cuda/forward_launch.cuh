// Host-side launch of the sm80 forward kernel for one head-dim class and element type:
// shared-memory limit, grid, and launch error check. Included by the per-class
// instantiation files only.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "cuda/forward_kernel.cuh"
#include "cuda/launch.h"

namespace jax_flash::cuda {

template <int kHeadDimClass, typename Element>
Status launch_forward_sm80(const AttentionParams& p, const LaunchOptions& options,
                           cudaStream_t stream) {
  using Config = ForwardConfig<kHeadDimClass>;
  constexpr int kSmem = Config::kSmemBytes;
  // Masking variants: none, window (causal or sliding), window and segment ids, and
  // dropout with any masks.
  auto kernel = p.has_dropout()       ? forward_kernel_sm80<Config, Element, true, true, true>
                : p.has_segment_ids() ? forward_kernel_sm80<Config, Element, true, true, false>
                : p.has_window()      ? forward_kernel_sm80<Config, Element, true, false, false>
                                      : forward_kernel_sm80<Config, Element, false, false, false>;
  if (Status s = allow_shared_memory(kernel, kSmem, options,
                                     "head_dim " + std::to_string(kHeadDimClass) + " forward");
      !s.ok())
    return s;
  const dim3 grid(static_cast<unsigned>((p.seqlen_q + Config::kBlockM - 1) / Config::kBlockM),
                  static_cast<unsigned>(p.num_heads), static_cast<unsigned>(p.batch));
  kernel<<<grid, Config::kThreads, kSmem, stream>>>(p, options.vectorized);
  return Status::FromCuda(cudaGetLastError(), "launching the forward kernel");
}

}  // namespace jax_flash::cuda
