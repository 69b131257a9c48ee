// Steps both Hopper backward kernels take the same way: addresses in a 128-byte swizzled
// shared tile, and dQ's trip from a warpgroup's accumulators through shared memory into the
// float32 accumulator in global memory (a TMA bulk reduction).
#pragma once

#include <cuda.h>

#include <cstdint>

#include "common/attention_params.h"
#include "cuda/flash_api.h"
#include "cuda/hopper/sm90_ptx.cuh"
#include "cuda/scores.cuh"

namespace jax_flash::cuda {

// The shared address of byte `byte` of row `row` in a tile of 128-byte rows stored with the
// 128-byte swizzle (TMA's and wgmma's layout): 16-byte units XORed with the row's index
// within its group of 8.
__device__ __forceinline__ uint32_t swizzled_128b(uint32_t tile, int row, int byte) {
  return tile + row * 128 + (((byte >> 4) ^ (row & 7)) << 4) + (byte & 15);
}

// lse (in log2 units) and delta of `count` queries from query0 into shared vectors, by the
// warpgroup's first 2 * count threads. Rows past seqlen_q get 0: with their zero Q and dO
// rows (TMA's fill) they contribute exactly zero.
__device__ __forceinline__ void load_step_vectors(float* lse_log2, float* delta,
                                                  const AttentionParams& p,
                                                  const BackwardWorkspace& workspace, int batch,
                                                  int head, int query0, int count,
                                                  int group_thread) {
  const int64_t row_offset = (batch * p.num_heads + head) * p.seqlen_q + query0;
  const int i = group_thread % count;
  const bool valid = query0 + i < p.seqlen_q;
  if (group_thread < count)
    lse_log2[i] = valid ? p.lse[row_offset + i] * kLog2e : 0.0f;
  else if (group_thread < 2 * count)
    delta[i] = valid ? workspace.delta[row_offset + i] : 0.0f;
}

// One warpgroup's 64 x 64 float32 dQ product (wgmma accumulator layout) added into dq_accum
// at (query0, column0): written to the warpgroup's 16 KB staging tile as two 32-column
// swizzled chunks (the tensor map's box), then reduced by one thread's bulk copies. The wait
// for the previous reduction's read of the tile comes first; `barrier` is a named barrier of
// this warpgroup's 128 threads.
__device__ __forceinline__ void reduce_dq_tile(const float (&acc_dq)[1][8][4], uint32_t staging,
                                               const CUtensorMap* dq_map, int column0, int query0,
                                               int head, int batch, int barrier,
                                               int group_thread) {
  constexpr int kRows = 64;
  const int warp_in_group = group_thread >> 5, g = (group_thread & 31) >> 2,
            t = group_thread & 3;
  if (group_thread == 0) sm90::bulk_wait_read<0>();
  sm90::named_barrier_sync(barrier, 128);
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = 16 * warp_in_group + g + 8 * h;
      const uint32_t address = swizzled_128b(staging + (j / 4) * (kRows * 128), row,
                                             ((8 * j + 2 * t) % 32) * 4);
      asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(address), "f"(acc_dq[0][j][2 * h]),
                   "f"(acc_dq[0][j][2 * h + 1]));
    }
  sm90::fence_shared_for_async();
  sm90::named_barrier_sync(barrier, 128);
  if (group_thread == 0) {
#pragma unroll
    for (int chunk = 0; chunk < 2; ++chunk)
      sm90::tma_reduce_add_4d(dq_map, staging + chunk * kRows * 128, column0 + chunk * 32, query0,
                              head, batch);
    sm90::bulk_commit();
  }
}

}  // namespace jax_flash::cuda
