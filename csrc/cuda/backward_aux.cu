// The memory-bound kernels around the main backward kernel, independent of head_dim:
//   preprocess: delta = rowsum(dout * out) - dlse and lse_log2 = lse * log2(e) per query
//               row, and dq_accum = 0 (zeroed here rather than by a separate memset pass);
//   finish:     dq = dq_accum converted to the element type.
// Each (batch, head, query) row belongs to a group of lanes of one warp, the smallest power
// of two that covers head_dim in 16-byte pieces (8 lanes at head_dim 64, 32 from 256 on),
// so that small head dims still keep every lane busy. Any head_dim and any strides work
// (element by element, one row per warp, where rows are not 16-byte aligned), and global
// accesses stay coalesced within the row.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/attention_params.h"
#include "cuda/element.cuh"
#include "cuda/launch.h"
#include "cuda/scores.cuh"

namespace jax_flash::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;

// Lanes per row: 32 for the element-by-element path, else the 16-byte pieces of a row
// rounded up to a power of two.
int lanes_per_row(const AttentionParams& p, bool vectorized) {
  if (!vectorized) return 32;
  int lanes = 1;
  while (lanes < 32 && lanes * 8 < p.head_dim) lanes *= 2;
  return lanes;
}

struct RowIndex {
  int64_t row;    // (batch * num_heads + head) * seqlen_q + query: the lse / delta index
  int64_t batch, head, query;
  int lane;       // this thread's lane within the row's group
  bool valid;     // false for the lanes of a last group past the end (they still shuffle)
};

__device__ __forceinline__ RowIndex group_row(const AttentionParams& p, int lanes) {
  RowIndex index;
  const int lane = threadIdx.x % 32;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  index.row = warp * (32 / lanes) + lane / lanes;
  index.lane = lane % lanes;
  index.valid = index.row < p.batch * p.num_heads * p.seqlen_q;
  index.query = index.row % p.seqlen_q;
  index.head = (index.row / p.seqlen_q) % p.num_heads;
  index.batch = index.row / (p.seqlen_q * p.num_heads);
  return index;
}

// Eight 16-bit values from a 16-byte aligned address, as float32.
template <typename Element>
__device__ __forceinline__ void load8(const Element* src, float (&out)[8]) {
  const uint4 packed = *reinterpret_cast<const uint4*>(src);
  const Element* e = reinterpret_cast<const Element*>(&packed);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = ElementTraits<Element>::to_float(e[i]);
}

// `vectorized`: head_dim % 8 == 0 and every row of out and dout starts 16-byte aligned
// (the float32 accumulator rows are then 32-byte aligned).
template <typename Element>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    backward_preprocess_kernel(const __grid_constant__ AttentionParams p,
                               const __grid_constant__ BackwardWorkspace workspace, int lanes,
                               bool vectorized) {
  using Traits = ElementTraits<Element>;
  const RowIndex at = group_row(p, lanes);
  float sum = 0.0f;
  if (at.valid) {
    const int64_t offset = at.batch * p.out_strides.batch + at.query * p.out_strides.row +
                           at.head * p.out_strides.head;
    const Element* out = static_cast<const Element*>(p.out) + offset;
    const Element* dout = static_cast<const Element*>(p.dout) + offset;
    float* dq_row = workspace.dq_accum + at.row * p.head_dim;
    if (vectorized) {
      for (int64_t c = 8 * at.lane; c < p.head_dim; c += 8 * lanes) {
        float o[8], g[8];
        load8(out + c, o);
        load8(dout + c, g);
#pragma unroll
        for (int i = 0; i < 8; ++i) sum += o[i] * g[i];
        const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        *reinterpret_cast<float4*>(dq_row + c) = zero;
        *reinterpret_cast<float4*>(dq_row + c + 4) = zero;
      }
    } else {
      for (int64_t c = at.lane; c < p.head_dim; c += lanes) {
        sum += Traits::to_float(out[c]) * Traits::to_float(dout[c]);
        dq_row[c] = 0.0f;
      }
    }
  }
  // Groups are aligned power-of-two lane ranges, so these shuffles stay inside the group.
  for (int offset_lanes = lanes / 2; offset_lanes > 0; offset_lanes /= 2)
    sum += __shfl_xor_sync(0xffffffffu, sum, offset_lanes);
  if (at.valid && at.lane == 0) {
    const int64_t stats = workspace.stats_index(at.row / p.seqlen_q, at.query);
    workspace.delta[stats] = sum - p.dlse[at.row];
    workspace.lse_log2[stats] = p.lse[at.row] * kLog2e;
  }
}

// `vectorized`: head_dim % 8 == 0 and every row of dq starts 16-byte aligned (the float32
// accumulator rows are then 32-byte aligned).
template <typename Element>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    backward_finish_dq_kernel(const __grid_constant__ AttentionParams p, const float* dq_accum,
                              int lanes, bool vectorized) {
  using Traits = ElementTraits<Element>;
  const RowIndex at = group_row(p, lanes);
  if (!at.valid) return;
  Element* dq = static_cast<Element*>(p.dq) + at.batch * p.q_strides.batch +
                at.query * p.q_strides.row + at.head * p.q_strides.head;
  const float* dq_row = dq_accum + at.row * p.head_dim;
  if (vectorized) {
    for (int64_t c = 8 * at.lane; c < p.head_dim; c += 8 * lanes) {
      const float4 lo = *reinterpret_cast<const float4*>(dq_row + c);
      const float4 hi = *reinterpret_cast<const float4*>(dq_row + c + 4);
      *reinterpret_cast<uint4*>(dq + c) =
          make_uint4(Traits::pack(lo.x, lo.y), Traits::pack(lo.z, lo.w), Traits::pack(hi.x, hi.y),
                     Traits::pack(hi.z, hi.w));
    }
  } else {
    for (int64_t c = at.lane; c < p.head_dim; c += lanes) dq[c] = Traits::from_float(dq_row[c]);
  }
}

dim3 row_grid(const AttentionParams& p, int lanes) {
  const int64_t rows = p.batch * p.num_heads * p.seqlen_q;
  const int64_t rows_per_block = kWarpsPerBlock * (32 / lanes);
  return dim3(static_cast<unsigned>((rows + rows_per_block - 1) / rows_per_block));
}

}  // namespace

template <typename Element>
Status launch_backward_preprocess(const AttentionParams& p, const BackwardWorkspace& workspace,
                                  bool vectorized, cudaStream_t stream) {
  const int lanes = lanes_per_row(p, vectorized);
  backward_preprocess_kernel<Element><<<row_grid(p, lanes), 32 * kWarpsPerBlock, 0, stream>>>(
      p, workspace, lanes, vectorized);
  return Status::FromCuda(cudaGetLastError(), "launching the backward preprocess kernel");
}

template <typename Element>
Status launch_backward_finish_dq(const AttentionParams& p, const BackwardWorkspace& workspace,
                                 bool vectorized, cudaStream_t stream) {
  const int lanes = lanes_per_row(p, vectorized);
  backward_finish_dq_kernel<Element><<<row_grid(p, lanes), 32 * kWarpsPerBlock, 0, stream>>>(
      p, workspace.dq_accum, lanes, vectorized);
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
