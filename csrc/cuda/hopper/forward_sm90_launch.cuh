// Host-side launch of the Hopper forward kernel for one head-dim class and element type:
// tensor maps, shared-memory limit, grid. Included by the sm90 instantiation files only;
// dispatch.cu has already checked that the call suits these kernels (sm90_eligible).
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "cuda/hopper/forward_sm90_kernel.cuh"
#include "cuda/hopper/tensor_map.h"
#include "cuda/launch.h"

namespace jax_flash::cuda {

// Tile shapes per head-dim class: 128 query rows (two consumer warpgroups) by kBlockN
// keys, kStages K/V stages, and whether the consumers take turns issuing their products
// (ping-pong). Measured on an H100 (NOTES_sm90.md): ping-pong gains 1-12% at head dims 64
// and 256 (where the softmax is long next to the products, or the register file is full)
// and loses 2-4% at 16k tokens for head dim 128. The last argument is the Q buffers: two
// where shared memory allows (128 KB, 192 KB in all), one at head dim 256 (192 KB).
template <int kHeadDimClass> struct Sm90ForwardClassConfig;
template <> struct Sm90ForwardClassConfig<64> : Sm90ForwardConfig<64, 128, 3, true, 2> {};
template <> struct Sm90ForwardClassConfig<128> : Sm90ForwardConfig<128, 128, 2, false, 2> {};
template <> struct Sm90ForwardClassConfig<256> : Sm90ForwardConfig<256, 64, 2, true, 1> {};

template <int kHeadDimClass, typename Element>
Status launch_forward_sm90(const AttentionParams& p, const LaunchOptions& options,
                           cudaStream_t stream) {
  using Config = Sm90ForwardClassConfig<kHeadDimClass>;
  Sm90ForwardMaps maps;
  if (Status s = encode_tensor_map(&maps.q, p.q, p.element_type, p.head_dim, p.seqlen_q,
                                   p.num_heads, p.batch, p.q_strides, Config::kBlockM);
      !s.ok())
    return s;
  if (Status s = encode_tensor_map(&maps.k, p.k, p.element_type, p.head_dim, p.seqlen_k,
                                   p.num_heads_kv, p.batch, p.k_strides, Config::kBlockN);
      !s.ok())
    return s;
  if (Status s = encode_tensor_map(&maps.v, p.v, p.element_type, p.head_dim, p.seqlen_k,
                                   p.num_heads_kv, p.batch, p.v_strides, Config::kBlockN);
      !s.ok())
    return s;
  auto kernel = p.has_window() ? forward_kernel_sm90<Config, Element, true>
                               : forward_kernel_sm90<Config, Element, false>;
  if (Status s = allow_shared_memory(kernel, Config::kSmemBytes, options,
                                     "head_dim " + std::to_string(kHeadDimClass) + " sm90 forward");
      !s.ok())
    return s;
  // Row blocks are paired where a mask window makes their work differ (the kernel's
  // tile_at, kPaired); without one they all have the same work.
  const bool paired = p.has_window();
  const int64_t num_m_blocks = (p.seqlen_q + Config::kBlockM - 1) / Config::kBlockM;
  const int64_t num_units =
      (paired ? (num_m_blocks + 1) / 2 : num_m_blocks) * p.num_heads * p.batch;
  // Persistent: one CTA per SM (measured against one per tile in NOTES_sm90.md, forward
  // v3-v5), or the test aid's cap.
  const dim3 grid(static_cast<unsigned>(persistent_grid_ctas(num_units, options)));
  kernel<<<grid, Config::kThreads, Config::kSmemBytes, stream>>>(p, maps);
  return Status::FromCuda(cudaGetLastError(), "launching the sm90 forward kernel");
}

}  // namespace jax_flash::cuda
