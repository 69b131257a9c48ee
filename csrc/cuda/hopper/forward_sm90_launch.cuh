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

// Tile shapes per head-dim class and row length: 128 query rows (two consumer warpgroups) by
// kBlockN keys, kStages K/V stages, whether the consumers take turns issuing their products
// (ping-pong), and the Q buffers. Measured on an H100 (NOTES_sm90.md): ping-pong gains 1-12%
// at head dims 64 and 256 (where the softmax is long next to the products, or the register
// file is full) and loses 2-4% at 16k tokens for head dim 128. Two Q buffers where shared
// memory allows, one at head dim 256 (192 KB). Where a row sees many keys (kLongRows: no
// window, or the middle query row sees kLongRowKeys keys or more), head dim 64 takes
// 192-key blocks (33% fewer block iterations, each with its barrier waits, fences and row
// reductions, which at head dim 64 weigh most next to the products; 192 KB; 256 keys spill
// 144 bytes) and head dim 128 176-key blocks with one Q buffer (208 KB). Shorter windowed
// rows keep 128-key blocks, where the masked diagonal tiles waste less: causal on the wider
// blocks gained 8% (64) and 3-5% (128) at 8k-16k, but lost 2% (64) and 10% (128) at 2k.
// `type` is the kernel's config, so that classes whose long and short rows share a shape
// share one kernel.
template <int kHeadDimClass, bool kLongRows> struct Sm90ForwardShape;
template <>
struct Sm90ForwardShape<64, true> { using type = Sm90ForwardConfig<64, 192, 3, true, 2>; };
template <>
struct Sm90ForwardShape<64, false> { using type = Sm90ForwardConfig<64, 128, 3, true, 2>; };
template <>
struct Sm90ForwardShape<128, true> { using type = Sm90ForwardConfig<128, 176, 2, false, 1>; };
template <>
struct Sm90ForwardShape<128, false> { using type = Sm90ForwardConfig<128, 128, 2, false, 2>; };
template <bool kLongRows>
struct Sm90ForwardShape<256, kLongRows> { using type = Sm90ForwardConfig<256, 64, 2, true, 1>; };

// Causal 4k tokens, whose middle row sees 2048 keys, is the first grid point past the
// measured crossover (2k lost, 8k gained). Against 128-key blocks for every windowed call
// (A/B of 2026-12-07, two rounds each): head dim 128 causal +1.9% at 4k, +2.2% at 8k, +1.7%
// at 16k; head dim 64 causal 8k +1.5%, 4k level.
constexpr int64_t kLongRowKeys = 2048;
inline bool has_long_rows(const AttentionParams& p) {
  if (!p.has_window()) return true;
  const IndexRange keys = visible_keys(p, p.seqlen_q / 2, p.seqlen_q / 2 + 1);
  return keys.end - keys.begin >= kLongRowKeys;
}

template <class Config, typename Element, bool kHasWindow>
Status launch_forward_sm90_config(const AttentionParams& p, const LaunchOptions& options,
                                  cudaStream_t stream) {
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
                                     "head_dim " + std::to_string(Config::kHeadDim) + " sm90 forward");
      !s.ok())
    return s;
  const int64_t num_units = sm90_forward_tile_order<Config::kBlockM, kHasWindow>(p).units();
  // Persistent: one CTA per SM (measured against one per tile in NOTES_sm90.md, forward
  // v3-v5), or the test aid's cap.
  const dim3 grid(static_cast<unsigned>(persistent_grid_ctas(num_units, options)));
  kernel<<<grid, Config::kThreads, Config::kSmemBytes, stream>>>(p, maps);
  return Status::FromCuda(cudaGetLastError(), "launching the sm90 forward kernel");
}

template <int kHeadDimClass, typename Element>
Status launch_forward_sm90(const AttentionParams& p, const LaunchOptions& options,
                           cudaStream_t stream) {
  using Long = typename Sm90ForwardShape<kHeadDimClass, true>::type;
  using Short = typename Sm90ForwardShape<kHeadDimClass, false>::type;
  if (!p.has_window()) return launch_forward_sm90_config<Long, Element, false>(p, options, stream);
  return has_long_rows(p) ? launch_forward_sm90_config<Long, Element, true>(p, options, stream)
                          : launch_forward_sm90_config<Short, Element, true>(p, options, stream);
}

}  // namespace jax_flash::cuda
