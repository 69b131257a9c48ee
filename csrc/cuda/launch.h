// Launchers of the sm80 kernels, one instantiation per (head-dim class, element type) in
// csrc/cuda/instantiations/ so that each compiles as its own translation unit. Only
// dispatch.cu calls these; it has already validated the call.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include "common/attention_params.h"
#include "cuda/flash_api.h"
#include "cuda/status.h"

namespace jax_flash::cuda {

// Facts about one call that the launchers need and that dispatch computes once.
struct LaunchOptions {
  // Every row of q, k, v, out, dout (and dq, dk, dv) starts 16-byte aligned and head_dim is
  // a multiple of 8: tiles move in 16-byte cp.async chunks. Otherwise element by element.
  bool vectorized = true;
  int max_smem_per_block = 0;  // cudaDevAttrMaxSharedMemoryPerBlockOptin of the device
  bool sm90 = false;           // compute capability 9.0: the sm_90a kernels can run
  int num_sms = 0;             // multiprocessors: the persistent kernels' grid
  int persistent_ctas = 0;     // test aid: > 0 caps the Hopper kernels' persistent grids
};

// CTAs of a persistent grid over `units` units of work: one per SM, or the test aid's cap
// in its place, and never more than the units.
inline int64_t persistent_grid_ctas(int64_t units, const LaunchOptions& options) {
  if (options.persistent_ctas > 0) return std::min<int64_t>(units, options.persistent_ctas);
  if (options.num_sms > 0) return std::min<int64_t>(units, options.num_sms);
  return units;
}

// Checks that a kernel's dynamic shared memory fits this GPU and raises the kernel's limit
// past the 48 KB default where it needs more. `what` names the kernel in messages.
template <typename Kernel>
Status allow_shared_memory(Kernel* kernel, int bytes, const LaunchOptions& options,
                           const std::string& what) {
  if (bytes > options.max_smem_per_block)
    return Status::Unimplemented("jax_flash CUDA: the " + what + " kernel needs " +
                                 std::to_string(bytes) + " bytes of shared memory per block; " +
                                 "this GPU allows " + std::to_string(options.max_smem_per_block));
  if (bytes <= 48 * 1024) return Status::Ok();
  return Status::FromCuda(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
      ("raising the " + what + " kernel's shared memory limit").c_str());
}

// Calls launch(Config{}) with the tile shape Config, or with Fallback where this GPU's shared
// memory cannot hold Config (the GPUs before Hopper); the configs are empty tag types.
template <class Config, class Fallback, typename Launch>
Status with_fitting_config(const LaunchOptions& options, Launch&& launch) {
  if constexpr (!std::is_same_v<Config, Fallback>) {
    if (Config::kSmemBytes > options.max_smem_per_block) return launch(Fallback{});
  }
  return launch(Config{});
}

template <int kHeadDimClass, typename Element>
Status launch_forward_sm80(const AttentionParams& p, const LaunchOptions& options,
                           cudaStream_t stream);

// The Hopper (sm_90a) forward: wgmma + TMA, warp specialized (hopper/). Built only where
// CMake compiles for sm_90a (JAX_FLASH_CUDA_SM90 is then defined for dispatch.cu).
template <int kHeadDimClass, typename Element>
Status launch_forward_sm90(const AttentionParams& p, const LaunchOptions& options,
                           cudaStream_t stream);

// The Hopper backward's main kernel (head dims 64, 128, 256), same contract as the sm80 one
// below.
template <int kHeadDimClass, typename Element>
Status launch_backward_sm90(const AttentionParams& p, const BackwardWorkspace& workspace,
                            const LaunchOptions& options, cudaStream_t stream);

// The main backward kernel only: dq_accum must hold zeros and delta must be computed.
template <int kHeadDimClass, typename Element>
Status launch_backward_sm80(const AttentionParams& p, const BackwardWorkspace& workspace,
                            const LaunchOptions& options, cudaStream_t stream);

// dQ without atomics, for deterministic calls (the main kernel then skips its dQ phase).
template <int kHeadDimClass, typename Element>
Status launch_backward_dq_sm80(const AttentionParams& p, const BackwardWorkspace& workspace,
                               const LaunchOptions& options, cudaStream_t stream);

// Attention over a KV cache, split-KV combine included.
template <int kHeadDimClass, typename Element>
Status launch_kvcache_sm80(const AttentionParams& p, const KvCacheWorkspace& workspace,
                           const LaunchOptions& options, cudaStream_t stream);

// Backward pre- and post-processing (head-dim independent), in backward_aux.cu.
// `vectorized`: head_dim % 8 == 0 and the rows they read and write start 16-byte aligned.
template <typename Element>
Status launch_backward_preprocess(const AttentionParams& p, const BackwardWorkspace& workspace,
                                  bool vectorized, cudaStream_t stream);
template <typename Element>
Status launch_backward_finish_dq(const AttentionParams& p, const BackwardWorkspace& workspace,
                                 bool vectorized, cudaStream_t stream);

}  // namespace jax_flash::cuda
