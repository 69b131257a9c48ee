// The memory-bound kernels around the main backward kernel, independent of head_dim:
//   preprocess: dq_accum = 0 (a memset), delta = rowsum(dout * out) - dlse per query row;
//   finish:     dq = dq_accum converted to the element type.
// Both put one warp on one (batch, head, query) row, lanes striding over head_dim (16 bytes
// at a time where alignment allows), so any head_dim and any strides work and global
// accesses stay coalesced within the row.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/attention_params.h"
#include "cuda/element.cuh"
#include "cuda/launch.h"

namespace jax_flash::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;

struct RowIndex {
  int64_t row;    // (batch * num_heads + head) * seqlen_q + query: the lse / delta index
  int64_t batch, head, query;
};

__device__ __forceinline__ bool warp_row(const AttentionParams& p, RowIndex* index) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= p.batch * p.num_heads * p.seqlen_q) return false;
  index->row = row;
  index->query = row % p.seqlen_q;
  index->head = (row / p.seqlen_q) % p.num_heads;
  index->batch = row / (p.seqlen_q * p.num_heads);
  return true;
}

// Eight 16-bit values from a 16-byte aligned address, as float32.
template <typename Element>
__device__ __forceinline__ void load8(const Element* src, float (&out)[8]) {
  const uint4 packed = *reinterpret_cast<const uint4*>(src);
  const Element* e = reinterpret_cast<const Element*>(&packed);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = ElementTraits<Element>::to_float(e[i]);
}

// `vectorized`: head_dim % 8 == 0 and every row of out and dout starts 16-byte aligned.
template <typename Element>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    backward_preprocess_kernel(const __grid_constant__ AttentionParams p, float* delta,
                               bool vectorized) {
  using Traits = ElementTraits<Element>;
  RowIndex at;
  if (!warp_row(p, &at)) return;
  const int lane = threadIdx.x % 32;
  const int64_t offset = at.batch * p.out_strides.batch + at.query * p.out_strides.row +
                         at.head * p.out_strides.head;
  const Element* out = static_cast<const Element*>(p.out) + offset;
  const Element* dout = static_cast<const Element*>(p.dout) + offset;
  float sum = 0.0f;
  if (vectorized) {
    for (int64_t c = 8 * lane; c < p.head_dim; c += 8 * 32) {
      float o[8], g[8];
      load8(out + c, o);
      load8(dout + c, g);
#pragma unroll
      for (int i = 0; i < 8; ++i) sum += o[i] * g[i];
    }
  } else {
    for (int64_t c = lane; c < p.head_dim; c += 32)
      sum += Traits::to_float(out[c]) * Traits::to_float(dout[c]);
  }
#pragma unroll
  for (int offset_lanes = 16; offset_lanes > 0; offset_lanes /= 2)
    sum += __shfl_xor_sync(0xffffffffu, sum, offset_lanes);
  if (lane == 0) delta[at.row] = sum - p.dlse[at.row];
}

// `vectorized`: head_dim % 8 == 0 and every row of dq starts 16-byte aligned (the float32
// accumulator rows are then 32-byte aligned).
template <typename Element>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    backward_finish_dq_kernel(const __grid_constant__ AttentionParams p, const float* dq_accum,
                              bool vectorized) {
  using Traits = ElementTraits<Element>;
  RowIndex at;
  if (!warp_row(p, &at)) return;
  const int lane = threadIdx.x % 32;
  Element* dq = static_cast<Element*>(p.dq) + at.batch * p.q_strides.batch +
                at.query * p.q_strides.row + at.head * p.q_strides.head;
  const float* dq_row = dq_accum + at.row * p.head_dim;
  if (vectorized) {
    for (int64_t c = 8 * lane; c < p.head_dim; c += 8 * 32) {
      const float4 lo = *reinterpret_cast<const float4*>(dq_row + c);
      const float4 hi = *reinterpret_cast<const float4*>(dq_row + c + 4);
      *reinterpret_cast<uint4*>(dq + c) =
          make_uint4(Traits::pack(lo.x, lo.y), Traits::pack(lo.z, lo.w), Traits::pack(hi.x, hi.y),
                     Traits::pack(hi.z, hi.w));
    }
  } else {
    for (int64_t c = lane; c < p.head_dim; c += 32) dq[c] = Traits::from_float(dq_row[c]);
  }
}

dim3 row_grid(const AttentionParams& p) {
  const int64_t rows = p.batch * p.num_heads * p.seqlen_q;
  return dim3(static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock));
}

}  // namespace

template <typename Element>
Status launch_backward_preprocess(const AttentionParams& p, const BackwardWorkspace& workspace,
                                  bool vectorized, cudaStream_t stream) {
  // dQ is accumulated by atomics into zeros.
  if (Status s = Status::FromCuda(
          cudaMemsetAsync(workspace.dq_accum, 0, workspace.dq_accum_bytes, stream),
          "zeroing the dQ accumulator");
      !s.ok())
    return s;
  backward_preprocess_kernel<Element><<<row_grid(p), 32 * kWarpsPerBlock, 0, stream>>>(
      p, workspace.delta, vectorized);
  return Status::FromCuda(cudaGetLastError(), "launching the backward preprocess kernel");
}

template <typename Element>
Status launch_backward_finish_dq(const AttentionParams& p, const BackwardWorkspace& workspace,
                                 bool vectorized, cudaStream_t stream) {
  backward_finish_dq_kernel<Element><<<row_grid(p), 32 * kWarpsPerBlock, 0, stream>>>(
      p, workspace.dq_accum, vectorized);
  return Status::FromCuda(cudaGetLastError(), "launching the backward dq kernel");
}

template Status launch_backward_preprocess<__half>(const AttentionParams&,
                                                   const BackwardWorkspace&, bool, cudaStream_t);
template Status launch_backward_preprocess<__nv_bfloat16>(const AttentionParams&,
                                                          const BackwardWorkspace&, bool,
                                                          cudaStream_t);
template Status launch_backward_finish_dq<__half>(const AttentionParams&,
                                                  const BackwardWorkspace&, bool, cudaStream_t);
template Status launch_backward_finish_dq<__nv_bfloat16>(const AttentionParams&,
                                                         const BackwardWorkspace&, bool,
                                                         cudaStream_t);

}  // namespace jax_flash::cuda
