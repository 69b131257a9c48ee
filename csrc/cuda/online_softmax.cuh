// The online softmax's step for one block of scores, shared by the forward and KV-cache
// kernels: per row, the running max takes the block's, the running sum and the output
// accumulator are rescaled by exp2(old max - new max), and the scores become
// probabilities exp2(score * exp_scale - max * exp_scale) in place.
#pragma once

#include <cmath>

#include "cuda/ptx.cuh"

namespace jax_flash::cuda {

// acc_s holds rows g and g + 8 of each m-tile (mma accumulator layout); row_max is in score
// units, row_sum this lane's partial sum (reduced across the quad only at the end). A row
// that has seen only masked keys keeps max = -inf; using 0 as its reference keeps
// exp2(-inf - ref) = 0 instead of NaN. This half of the step leaves the output alone and
// returns each row's correction factor, so that a kernel whose O += P V is still in flight
// (the Hopper forward) can apply it later.
template <int kMTiles, int kNTiles>
__device__ __forceinline__ void online_softmax_probabilities(float (&acc_s)[kMTiles][kNTiles][4],
                                                             float (&row_max)[kMTiles][2],
                                                             float (&row_sum)[kMTiles][2],
                                                             float exp_scale,
                                                             float (&correction)[kMTiles][2]) {
#pragma unroll
  for (int i = 0; i < kMTiles; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float block_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < kNTiles; ++j)
        block_max = fmaxf(block_max, fmaxf(acc_s[i][j][2 * h], acc_s[i][j][2 * h + 1]));
      block_max = fmaxf(block_max, __shfl_xor_sync(0xffffffffu, block_max, 1));
      block_max = fmaxf(block_max, __shfl_xor_sync(0xffffffffu, block_max, 2));
      const float new_max = fmaxf(row_max[i][h], block_max);
      const float reference = new_max == -INFINITY ? 0.0f : new_max * exp_scale;
      correction[i][h] = fast_exp2(row_max[i][h] * exp_scale - reference);
      row_max[i][h] = new_max;
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < kNTiles; ++j)
#pragma unroll
        for (int c = 2 * h; c < 2 * h + 2; ++c) {
          const float prob = fast_exp2(fmaf(acc_s[i][j][c], exp_scale, -reference));
          acc_s[i][j][c] = prob;
          sum += prob;
        }
      row_sum[i][h] = row_sum[i][h] * correction[i][h] + sum;
    }
}

template <int kMTiles, int kDTiles>
__device__ __forceinline__ void rescale_rows(float (&acc_o)[kMTiles][kDTiles][4],
                                             const float (&correction)[kMTiles][2]) {
#pragma unroll
  for (int i = 0; i < kMTiles; ++i)
#pragma unroll
    for (int j = 0; j < kDTiles; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc_o[i][j][c] *= correction[i][c >> 1];
}

// The whole step: probabilities, then the output rescaled.
template <int kMTiles, int kNTiles, int kDTiles>
__device__ __forceinline__ void online_softmax_step(float (&acc_s)[kMTiles][kNTiles][4],
                                                    float (&acc_o)[kMTiles][kDTiles][4],
                                                    float (&row_max)[kMTiles][2],
                                                    float (&row_sum)[kMTiles][2],
                                                    float exp_scale) {
  float correction[kMTiles][2];
  online_softmax_probabilities(acc_s, row_max, row_sum, exp_scale, correction);
  rescale_rows(acc_o, correction);
}

// A row's sum from the four lanes of its quad (each holds a partial sum of its columns).
__device__ __forceinline__ float quad_sum(float partial) {
  partial += __shfl_xor_sync(0xffffffffu, partial, 1);
  return partial + __shfl_xor_sync(0xffffffffu, partial, 2);
}

}  // namespace jax_flash::cuda
