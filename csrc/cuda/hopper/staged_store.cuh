// A consumer warpgroup's 64-row output tile leaving through shared memory by bulk tensor
// stores: the backward's dK and dV, and the forward's O. From registers, 16-bit outputs took
// one four-byte global store per element pair per thread, whose queue (lg throttle) held
// the backward's consumers for a fifth of their time at 1k tokens causal (profile,
// 2026-12-06, twelfth session); here each 64-column chunk is four stmatrix per thread into a
// 128-byte swizzled staging tile, and the copy engine writes it while the warpgroup goes on.
#pragma once

#include <cuda.h>

#include <cstdint>

#include "cuda/element.cuh"
#include "cuda/hopper/sm90_ptx.cuh"

namespace jax_flash::cuda {

// The shared address of byte `byte` of row `row` in a tile of 128-byte rows stored with the
// 128-byte swizzle (TMA's and wgmma's layout): 16-byte units XORed with the row's index
// within its group of 8.
__device__ __forceinline__ uint32_t swizzled_128b(uint32_t tile, int row, int byte) {
  return tile + row * 128 + (((byte >> 4) ^ (row & 7)) << 4) + (byte & 15);
}

// Bytes of one staging tile: 64 rows by 64 16-bit columns.
constexpr int kStagingTileBytes = 64 * 64 * 2;

// A warpgroup's wgmma accumulators (64 rows from row0, 8 * kTiles columns from column0) to
// `map`'s tensor at {column, row0, head, batch}, one 64-column chunk at a time through the
// staging tile (1024-byte aligned), synchronized on named barrier `barrier` by the 128
// threads. Rows past the tensor's end are dropped by the map. Thread 0 of the group issues
// the stores and waits for the previous one's read before the tile is rewritten; the
// caller waits for the last (bulk_wait) before the CTA's shared memory goes away.
template <typename Element, int kTiles>
__device__ __forceinline__ void store_tile_staged(const float (&acc)[1][kTiles][4],
                                                  const CUtensorMap* map, uint32_t staging,
                                                  int barrier, int group_thread, int column0,
                                                  int row0, int head, int batch) {
  using Traits = ElementTraits<Element>;
  static_assert(kTiles % 8 == 0, "64-column chunks");
  const int lane = group_thread & 31, warp_in_group = group_thread >> 5;
  // This lane's row address within a 16-column pair of 8x8 matrices (stmatrix.x4): matrix
  // lane / 8 is (rows 8 * (matrix & 1), columns 8 * (matrix >> 1)) of the warp's 16 rows.
  const int matrix = lane >> 3;
  const int row = 16 * warp_in_group + (lane & 7) + 8 * (matrix & 1);
#pragma unroll
  for (int chunk = 0; chunk < kTiles / 8; ++chunk) {
    if (group_thread == 0) sm90::bulk_wait_read<0>();
    sm90::named_barrier_sync(barrier, 128);
#pragma unroll
    for (int pair = 0; pair < 4; ++pair) {
      const int j = 8 * chunk + 2 * pair;
      sm90::store_matrix_x4(swizzled_128b(staging, row, 16 * (2 * pair + (matrix >> 1))),
                            Traits::pack(acc[0][j][0], acc[0][j][1]),
                            Traits::pack(acc[0][j][2], acc[0][j][3]),
                            Traits::pack(acc[0][j + 1][0], acc[0][j + 1][1]),
                            Traits::pack(acc[0][j + 1][2], acc[0][j + 1][3]));
    }
    sm90::fence_shared_for_async();
    sm90::named_barrier_sync(barrier, 128);
    if (group_thread == 0) {
      sm90::tma_store_4d(map, staging, column0 + 64 * chunk, row0, head, batch);
      sm90::bulk_commit();
    }
  }
}

}  // namespace jax_flash::cuda
