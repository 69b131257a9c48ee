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

// Tile shapes per head-dim class and window: 128 query rows (two consumer warpgroups) by
// kBlockN keys, kStages K/V stages, whether the consumers take turns issuing their products
// (ping-pong), and the Q buffers. Measured on an H100 (NOTES_sm90.md): ping-pong gains 1-12%
// at head dims 64 and 256 (where the softmax is long next to the products, or the register
// file is full) and loses 2-4% at 16k tokens for head dim 128. Two Q buffers where shared
// memory allows, one at head dim 256 (192 KB). Head dim 64 takes 192-key blocks (33% fewer
// block iterations, each with its barrier waits, fences and row reductions, which at head
// dim 64 weigh most next to the products; 192 KB; 256 keys spill 144 bytes), with a window
// too: causal 8k gained 8% and 2k lost 2%. Head dim 128 takes 176-key blocks with one Q
// buffer (208 KB) without a window and keeps 128 with one: causal on 176 keys gained 3-5%
// at 8k-16k but lost 10% at 1k-2k, where the masked diagonal tiles weigh more.
template <int kHeadDimClass, bool kHasWindow> struct Sm90ForwardClassConfig;
template <bool kHasWindow>
struct Sm90ForwardClassConfig<64, kHasWindow> : Sm90ForwardConfig<64, 192, 3, true, 2> {};
template <>
struct Sm90ForwardClassConfig<128, false> : Sm90ForwardConfig<128, 176, 2, false, 1> {};
template <>
struct Sm90ForwardClassConfig<128, true> : Sm90ForwardConfig<128, 128, 2, false, 2> {};
template <bool kHasWindow>
struct Sm90ForwardClassConfig<256, kHasWindow> : Sm90ForwardConfig<256, 64, 2, true, 1> {};

template <int kHeadDimClass, typename Element, bool kHasWindow>
Status launch_forward_sm90_config(const AttentionParams& p, const LaunchOptions& options,
                                  cudaStream_t stream) {
  using Config = Sm90ForwardClassConfig<kHeadDimClass, kHasWindow>;
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
  // O leaves by 64-row boxes, one consumer's rows (store_tile_staged).
  if (Status s = encode_tensor_map(&maps.out, p.out, p.element_type, p.head_dim, p.seqlen_q,
                                   p.num_heads, p.batch, p.out_strides, 64);
      !s.ok())
    return s;
  auto kernel = forward_kernel_sm90<Config, Element, kHasWindow>;
  if (Status s = allow_shared_memory(kernel, Config::kSmemBytes, options,
                                     "head_dim " + std::to_string(kHeadDimClass) + " sm90 forward");
      !s.ok())
    return s;
  // Row blocks are paired where a mask window makes their work differ (the kernel's
  // tile_at, kPaired); without one they all have the same work.
  const int64_t num_m_blocks = (p.seqlen_q + Config::kBlockM - 1) / Config::kBlockM;
  const int64_t num_units =
      (kHasWindow ? (num_m_blocks + 1) / 2 : num_m_blocks) * p.num_heads * p.batch;
  // Persistent: one CTA per SM (measured against one per tile in NOTES_sm90.md, forward
  // v3-v5), or the test aid's cap.
  const dim3 grid(static_cast<unsigned>(persistent_grid_ctas(num_units, options)));
  kernel<<<grid, Config::kThreads, Config::kSmemBytes, stream>>>(p, maps);
  return Status::FromCuda(cudaGetLastError(), "launching the sm90 forward kernel");
}

template <int kHeadDimClass, typename Element>
Status launch_forward_sm90(const AttentionParams& p, const LaunchOptions& options,
                           cudaStream_t stream) {
  return p.has_window()
             ? launch_forward_sm90_config<kHeadDimClass, Element, true>(p, options, stream)
             : launch_forward_sm90_config<kHeadDimClass, Element, false>(p, options, stream);
}

}  // namespace jax_flash::cuda
