// Host-side launch of the Hopper backward's main kernel (head dims 64 and 128 split keys
// between the consumers, 256 splits columns: backward_sm90_wide_kernel.cuh; both on a
// persistent grid): tensor maps, shared-memory limit, grid. Included by the
// sm90 backward instantiation files only; dispatch.cu has checked the call suits it
// (sm90_eligible) and runs the preprocessing and dQ conversion (or the deterministic dQ
// pass) around it.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#include "cuda/hopper/backward_sm90_kernel.cuh"
#include "cuda/hopper/backward_sm90_wide_kernel.cuh"
#include "cuda/hopper/tensor_map.h"
#include "cuda/launch.h"

namespace jax_flash::cuda {

template <int kHeadDimClass, typename Element>
Status launch_backward_sm90(const AttentionParams& p, const BackwardWorkspace& workspace,
                            const LaunchOptions& options, cudaStream_t stream) {
  constexpr bool kWide = kHeadDimClass == 256;
  using Config = std::conditional_t<kWide, Sm90WideBackwardConfig<kHeadDimClass>,
                                    Sm90BackwardConfig<kHeadDimClass>>;
  Sm90BackwardMaps maps;
  const struct {
    CUtensorMap* map;
    const void* base;
    int64_t seqlen, heads;
    const TensorStrides& strides;
    int box_rows;
  } operands[] = {
      {&maps.q, p.q, p.seqlen_q, p.num_heads, p.q_strides, Config::kBlockM},
      {&maps.dout, p.dout, p.seqlen_q, p.num_heads, p.out_strides, Config::kBlockM},
      {&maps.k, p.k, p.seqlen_k, p.num_heads_kv, p.k_strides, Config::kBlockN},
      {&maps.v, p.v, p.seqlen_k, p.num_heads_kv, p.v_strides, Config::kBlockN},
      // dK and dV have the layout of K and V (store_dk_dv_staged: 64 keys per box).
      {&maps.dk, p.dk, p.seqlen_k, p.num_heads_kv, p.k_strides, 64},
      {&maps.dv, p.dv, p.seqlen_k, p.num_heads_kv, p.v_strides, 64},
  };
  const TensorStrides dq_strides{p.num_heads * p.seqlen_q * p.head_dim, p.head_dim,
                                 p.seqlen_q * p.head_dim};
  if (Status s = encode_tensor_map(&maps.dq, workspace.dq_accum, CU_TENSOR_MAP_DATA_TYPE_FLOAT32,
                                   4, p.head_dim, p.seqlen_q, p.num_heads, p.batch, dq_strides,
                                   kDqTileRows);
      !s.ok())
    return s;
  const int64_t stats_rows = p.batch * p.num_heads;
  if (Status s = encode_row_vectors_map(&maps.lse_log2, workspace.lse_log2, p.seqlen_q, stats_rows,
                                        workspace.stats_stride, Config::kBlockM);
      !s.ok())
    return s;
  if (Status s = encode_row_vectors_map(&maps.delta, workspace.delta, p.seqlen_q, stats_rows,
                                        workspace.stats_stride, Config::kBlockM);
      !s.ok())
    return s;
  for (const auto& operand : operands)
    if (Status s = encode_tensor_map(operand.map, operand.base, p.element_type, p.head_dim,
                                     operand.seqlen, operand.heads, p.batch, operand.strides,
                                     operand.box_rows);
        !s.ok())
      return s;
  auto kernel = [&] {
    if constexpr (kWide)
      return p.has_window() ? backward_wide_kernel_sm90<Config, Element, true>
                            : backward_wide_kernel_sm90<Config, Element, false>;
    else
      return p.has_window() ? backward_kernel_sm90<Config, Element, true>
                            : backward_kernel_sm90<Config, Element, false>;
  }();
  if (Status s = allow_shared_memory(kernel, Config::kSmemBytes, options,
                                     "head_dim " + std::to_string(kHeadDimClass) + " sm90 backward");
      !s.ok())
    return s;
  // Persistent, as the forward.
  const int64_t units = p.has_window()
                            ? Sm90BackwardUnits<true>::make(p, Config::kBlockN).order.units()
                            : Sm90BackwardUnits<false>::make(p, Config::kBlockN).order.units();
  if (units > std::numeric_limits<int32_t>::max())
    return Status::Unimplemented("jax_flash CUDA: the sm90 backward has " +
                                 std::to_string(units) + " units of work, over 2^31 - 1");
  const unsigned ctas = static_cast<unsigned>(persistent_grid_ctas(units, options));
  kernel<<<ctas, Config::kThreads, Config::kSmemBytes, stream>>>(p, maps);
  return Status::FromCuda(cudaGetLastError(), "launching the sm90 backward kernel");
}

}  // namespace jax_flash::cuda
