// Host-side launch of the sm80 backward kernel for one head-dim class and element type:
// shared-memory limit, grid, and launch error check. Included by the per-class
// instantiation files only.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "cuda/backward_kernel.cuh"
#include "cuda/launch.h"

namespace jax_flash::cuda {

template <int kHeadDimClass, typename Element>
Status launch_backward_sm80(const AttentionParams& p, const BackwardWorkspace& workspace,
                            const LaunchOptions& options, cudaStream_t stream) {
  using Config = BackwardConfig<kHeadDimClass>;
  constexpr int kSmem = Config::kSmemBytes;
  if (kSmem > options.max_smem_per_block)
    return Status::Unimplemented("jax_flash CUDA: the head_dim " + std::to_string(kHeadDimClass) +
                                 " backward kernel needs " + std::to_string(kSmem) +
                                 " bytes of shared memory per block; this GPU allows " +
                                 std::to_string(options.max_smem_per_block));
  auto kernel = p.has_window() ? backward_kernel_sm80<Config, Element, true>
                               : backward_kernel_sm80<Config, Element, false>;
  if (kSmem > 48 * 1024) {
    Status s = Status::FromCuda(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem),
        "raising the backward kernel's shared memory limit");
    if (!s.ok()) return s;
  }
  const dim3 grid(static_cast<unsigned>((p.seqlen_k + Config::kBlockN - 1) / Config::kBlockN),
                  static_cast<unsigned>(p.num_heads_kv), static_cast<unsigned>(p.batch));
  kernel<<<grid, Config::kThreads, kSmem, stream>>>(p, workspace, options.vectorized);
  return Status::FromCuda(cudaGetLastError(), "launching the backward kernel");
}

}  // namespace jax_flash::cuda
