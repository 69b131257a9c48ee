// Host-side launch of the sm80 backward kernel for one head-dim class and element type:
// shared-memory limit, grid, and launch error check. Included by the per-class
// instantiation files only.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "cuda/backward_dq_kernel.cuh"
#include "cuda/backward_kernel.cuh"
#include "cuda/launch.h"

namespace jax_flash::cuda {

template <class Config, typename Element>
Status launch_backward_config(const AttentionParams& p, const BackwardWorkspace& workspace,
                              const LaunchOptions& options, cudaStream_t stream) {
  constexpr int kSmem = Config::kSmemBytes;
  // Masking variants as in the forward launch.
  auto kernel = p.has_dropout()       ? backward_kernel_sm80<Config, Element, true, true, true>
                : p.has_segment_ids() ? backward_kernel_sm80<Config, Element, true, true, false>
                : p.has_window()      ? backward_kernel_sm80<Config, Element, true, false, false>
                                      : backward_kernel_sm80<Config, Element, false, false, false>;
  if (Status s = allow_shared_memory(kernel, kSmem, options,
                                     "head_dim " + std::to_string(Config::kHeadDim) + " backward");
      !s.ok())
    return s;
  const dim3 grid(static_cast<unsigned>((p.seqlen_k + Config::kBlockN - 1) / Config::kBlockN),
                  static_cast<unsigned>(p.num_heads_kv), static_cast<unsigned>(p.batch));
  kernel<<<grid, Config::kThreads, kSmem, stream>>>(p, workspace, options.vectorized);
  return Status::FromCuda(cudaGetLastError(), "launching the backward kernel");
}

template <int kHeadDimClass, typename Element>
Status launch_backward_sm80(const AttentionParams& p, const BackwardWorkspace& workspace,
                            const LaunchOptions& options, cudaStream_t stream) {
  return with_fitting_config<BackwardConfig<kHeadDimClass>,
                             typename BackwardSmallSmem<kHeadDimClass>::Config>(
      options, [&](auto config) {
        return launch_backward_config<decltype(config), Element>(p, workspace, options, stream);
      });
}

template <int kHeadDimClass, typename Element>
Status launch_backward_dq_sm80(const AttentionParams& p, const BackwardWorkspace& workspace,
                               const LaunchOptions& options, cudaStream_t stream) {
  using Config = DqConfig<kHeadDimClass>;
  constexpr int kSmem = Config::kSmemBytes;
  // Masking variants as in the forward launch.
  auto kernel = p.has_dropout()       ? backward_dq_kernel_sm80<Config, Element, true, true, true>
                : p.has_segment_ids() ? backward_dq_kernel_sm80<Config, Element, true, true, false>
                : p.has_window()      ? backward_dq_kernel_sm80<Config, Element, true, false, false>
                                      : backward_dq_kernel_sm80<Config, Element, false, false, false>;
  if (Status s = allow_shared_memory(
          kernel, kSmem, options, "head_dim " + std::to_string(kHeadDimClass) + " deterministic dQ");
      !s.ok())
    return s;
  const dim3 grid(static_cast<unsigned>((p.seqlen_q + Config::kBlockM - 1) / Config::kBlockM),
                  static_cast<unsigned>(p.num_heads), static_cast<unsigned>(p.batch));
  kernel<<<grid, Config::kThreads, kSmem, stream>>>(p, workspace, options.vectorized);
  return Status::FromCuda(cudaGetLastError(), "launching the deterministic dQ kernel");
}

}  // namespace jax_flash::cuda
