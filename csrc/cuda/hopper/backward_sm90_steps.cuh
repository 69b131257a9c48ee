// Steps both Hopper backward kernels take the same way: their tensor maps and copies, the
// element step from Sᵀ and dPᵀ to Pᵀ and dSᵀ, the dK/dV stores, and dQ's trip from a
// warpgroup's accumulators through shared memory into the float32 accumulator in global
// memory (a TMA bulk reduction issued by a reducer warp).
#pragma once

#include <cuda.h>

#include <cstdint>
#include <type_traits>

#include "common/attention_params.h"
#include "cuda/backward_steps.cuh"
#include "cuda/element.cuh"
#include "cuda/flash_api.h"
#include "cuda/fragments.cuh"
#include "cuda/hopper/sm90_ptx.cuh"
#include "cuda/hopper/staged_store.cuh"
#include "cuda/hopper/tile_order.cuh"
#include "cuda/scores.cuh"

namespace jax_flash::cuda {

// Q and dO seen as (head_dim, seqlen_q, heads, batch), boxes of 64 columns by kBlockM rows;
// K and V as (head_dim, seqlen_k, heads_kv, batch), boxes of 64 columns by kBlockN rows.
// dq is the float32 accumulator (batch, heads, seqlen_q, head_dim) as (head_dim, seqlen_q,
// heads, batch), boxes of 32 columns by kBlockM rows, which the kernel adds into. lse_log2
// and delta are the workspace's statistics as (seqlen_q, batch * heads), boxes of one step's
// queries: the producer copies them beside Q and dO, so no consumer waits on a global load.
// dk and dv are the outputs as (head_dim, seqlen_k, heads_kv, batch), boxes of 64 columns by
// 64 keys, which the main kernel's consumers store through shared memory.
struct Sm90BackwardMaps {
  CUtensorMap q, dout, k, v, dq, lse_log2, delta, dk, dv;
};

// The tensor maps the producer copies with, into the descriptor cache (once per CTA).
__device__ __forceinline__ void prefetch_backward_maps(const Sm90BackwardMaps& maps) {
  sm90::prefetch_tensor_map(&maps.q);
  sm90::prefetch_tensor_map(&maps.dout);
  sm90::prefetch_tensor_map(&maps.k);
  sm90::prefetch_tensor_map(&maps.v);
  sm90::prefetch_tensor_map(&maps.lse_log2);
  sm90::prefetch_tensor_map(&maps.delta);
}

// K and V of a key block, which stay for its whole sweep (kChunks chunks of kBlockN rows
// each, completing on kv_full).
template <int kChunks, int kBlockN>
__device__ __forceinline__ void load_key_block(const Sm90BackwardMaps& maps, uint32_t k_smem,
                                               uint32_t v_smem, uint32_t kv_full, int key0,
                                               int head_kv, int batch) {
  sm90::mbarrier_arrive_expect_tx(kv_full, 2 * kChunks * kBlockN * 128);
  sm90::tma_load_tile<kChunks, kBlockN>(k_smem, &maps.k, kv_full, key0, head_kv, batch);
  sm90::tma_load_tile<kChunks, kBlockN>(v_smem, &maps.v, kv_full, key0, head_kv, batch);
}

// The key block's steps. The first query is rounded down to a multiple of 4 so that every
// step's statistics start 16-byte aligned, which their bulk tensor copy needs (an unaligned
// start raised an illegal-instruction fault, device call 4 of 2026-12-06). The extra rows
// see none of the block's keys: only a mask window moves the first visible query past 0,
// and the window masks them.
template <int kBlockM>
__device__ __forceinline__ QuerySteps<kBlockM> sm90_query_steps(const AttentionParams& p,
                                                                int key0, int valid_keys,
                                                                int head_kv, int group_size) {
  IndexRange queries = visible_queries(p, key0, key0 + valid_keys);
  if (!queries.empty()) queries.begin &= ~int64_t{3};
  return QuerySteps<kBlockM>::make(queries, head_kv, group_size);
}

// A tile's keys and query steps, which every role of a CTA derives alike.
template <int kBlockM>
struct Sm90BackwardTile {
  int head_kv, batch, key0, valid_keys;
  QuerySteps<kBlockM> steps;
};

// The persistent backward's work: a tile is one key block of one (batch, kv head), taken
// in TileOrder (paired where a mask window makes key blocks' work differ; index 0, the
// first key block, has the most work under a causal mask).
template <bool kPaired>
struct Sm90BackwardUnits {
  TileOrder<kPaired> order;
  int block_n, num_heads_kv;

  __host__ __device__ static Sm90BackwardUnits make(const AttentionParams& p, int block_n) {
    Sm90BackwardUnits units;
    units.block_n = block_n;
    units.num_heads_kv = static_cast<int>(p.num_heads_kv);
    units.order = {static_cast<int>((p.seqlen_k + block_n - 1) / block_n),
                   static_cast<int>(p.num_heads_kv * p.batch)};
    return units;
  }
  __device__ __forceinline__ int own_tiles() const {
    return order.own_tiles(static_cast<int>(blockIdx.x), static_cast<int>(gridDim.x));
  }
  // This CTA's own_tile-th tile; false for a paired unit's missing second tile.
  template <int kBlockM>
  __device__ __forceinline__ bool tile(const AttentionParams& p, int own_tile,
                                       Sm90BackwardTile<kBlockM>& tile) const {
    const OrderedTile ordered =
        order.tile(static_cast<int>(blockIdx.x), static_cast<int>(gridDim.x), own_tile);
    if (!ordered.exists) return false;
    tile.head_kv = ordered.head % num_heads_kv;
    tile.batch = ordered.head / num_heads_kv;
    tile.key0 = ordered.index * block_n;
    tile.valid_keys = min(block_n, static_cast<int>(p.seqlen_k) - tile.key0);
    tile.steps = sm90_query_steps<kBlockM>(p, tile.key0, tile.valid_keys, tile.head_kv,
                                           static_cast<int>(p.num_heads / p.num_heads_kv));
    return true;
  }
};

// A step's statistics (lse_log2 or delta) of `count` queries from query0 of (batch, head),
// copied to `dst` on `bar` (count * 4 bytes). Queries past seqlen_q arrive as zeros: with
// their zero Q and dO rows (TMA's fill) they contribute exactly zero.
__device__ __forceinline__ void load_step_stats(uint32_t dst, const CUtensorMap* map,
                                                uint32_t bar, const AttentionParams& p, int batch,
                                                int head, int query0) {
  sm90::tma_load_2d(dst, map, bar, query0, batch * static_cast<int>(p.num_heads) + head);
}

// The producer thread's sweep over a persistent CTA's tiles. load_step(tile, step,
// step_count) copies one step's operands (step_count counts the CTA's steps so far: the
// phases of their buffers' barriers). A tile's K and V follow its first step's copies,
// whose buffers free during the previous key block's last step, once the consumers have
// released the previous K and V on kv_empty (after that step's products).
template <int kChunks, int kBlockN, int kBlockM, bool kPaired, class LoadStep>
__device__ __forceinline__ void produce_backward_tiles(const Sm90BackwardUnits<kPaired>& units,
                                                       const AttentionParams& p,
                                                       const Sm90BackwardMaps& maps,
                                                       uint32_t k_smem, uint32_t v_smem,
                                                       uint32_t kv_full, uint32_t kv_empty,
                                                       LoadStep load_step) {
  prefetch_backward_maps(maps);
  const int own_tiles = units.own_tiles();
  int kv_count = 0, step_count = 0;
  for (int own_tile = 0; own_tile < own_tiles; ++own_tile) {
    Sm90BackwardTile<kBlockM> tile;
    if (!units.tile(p, own_tile, tile)) continue;
    for (int step = 0; step < tile.steps.count; ++step, ++step_count) {
      load_step(tile, step, step_count);
      if (step == 0) {
        if (kv_count > 0) sm90::mbarrier_wait(kv_empty, (kv_count - 1) & 1);
        load_key_block<kChunks, kBlockN>(maps, k_smem, v_smem, kv_full, tile.key0, tile.head_kv,
                                         tile.batch);
        ++kv_count;
      }
    }
  }
}

// Rows of a dQ tile, and of the dq tensor map's box.
constexpr int kDqTileRows = 64;

// Both backward kernels' register split (384 threads: the producer warpgroup, which holds the
// reducer warp too, and two consumer warpgroups). At 40 registers ptxas reports 44-52 bytes
// of spill in that warpgroup's code at head dim 256 (none at 64 or 128); 56 + 2 x 224 spills
// nothing but ran causal 8% slower at head dim 128 (device call 3 of 2026-12-06, tenth
// session). setmaxnreg moves registers within the pool the launch granted (168 per
// thread at 384 threads): asking for more than it holds waits forever (48 + 2 x 232 hung,
// 2026-12-06).
constexpr int kSm90BackwardProducerRegisters = 40;
constexpr int kSm90BackwardConsumerRegisters = 232;
static_assert(kSm90BackwardProducerRegisters + 2 * kSm90BackwardConsumerRegisters <= 3 * 168,
              "setmaxnreg's pool: 168 registers per thread at 384 threads");

// dQ's handoff from the consumer warpgroups to the reducer warp (warp 1 of the producer
// warpgroup), so that no consumer waits while a reduction is issued or its staging tile read:
// each consumer has one 16 KB staging tile and two named barriers, "full" (4 + consumer) and
// "empty" (6 + consumer), each met by the consumer's 128 threads and the reducer's 32. The
// consumers only arrive on "full"; the reducer only arrives on "empty".
constexpr int kDqHandoffThreads = 128 + 32;
__device__ __forceinline__ int dq_full_barrier(int consumer) { return 4 + consumer; }
__device__ __forceinline__ int dq_empty_barrier(int consumer) { return 6 + consumer; }

// A consumer's 64 x 64 float32 dQ product (wgmma accumulator layout) written to its staging
// tile as two 32-column swizzled chunks (the tensor map's box), once the reducer has read the
// previous tile, and handed to the reducer.
__device__ __forceinline__ void stage_dq_tile(const float (&acc_dq)[1][8][4], uint32_t staging,
                                              int consumer, int group_thread) {
  constexpr int kRows = kDqTileRows;
  const int warp_in_group = group_thread >> 5, g = (group_thread & 31) >> 2,
            t = group_thread & 3;
  sm90::named_barrier_sync(dq_empty_barrier(consumer), kDqHandoffThreads);
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
  sm90::named_barrier_arrive(dq_full_barrier(consumer), kDqHandoffThreads);
}

// The reducer warp's side of the handoff. Before its first handoff every consumer's staging
// tile is free.
template <int kConsumers>
__device__ __forceinline__ void open_dq_staging() {
#pragma unroll
  for (int consumer = 0; consumer < kConsumers; ++consumer)
    sm90::named_barrier_arrive(dq_empty_barrier(consumer), kDqHandoffThreads);
}

// One handoff from `consumer`: once its tile is staged, lane 0 adds it into dq_accum at
// at = {column0, query0, head} by two bulk reductions and waits until they have read it,
// then the warp frees the tile, unless it is the consumer's last (no consumer waits for
// that one, and a barrier must not be left half met). Consumers' handoffs are taken in the
// consumers' order: they meet once per step, so neither runs a tile ahead.
template <int kStagingBytes>
__device__ __forceinline__ void reduce_dq_tile(int consumer, uint32_t staging_base,
                                               const CUtensorMap* dq_map, int4 at, int batch,
                                               int lane, bool last) {
  constexpr int kRows = kDqTileRows;
  sm90::named_barrier_sync(dq_full_barrier(consumer), kDqHandoffThreads);
  if (lane == 0) {
    const uint32_t staging = staging_base + consumer * kStagingBytes;
#pragma unroll
    for (int chunk = 0; chunk < 2; ++chunk)
      sm90::tma_reduce_add_4d(dq_map, staging + chunk * kRows * 128, at.x + chunk * 32, at.y,
                              at.z, batch);
    sm90::bulk_commit();
    sm90::bulk_wait_read<0>();
  }
  __syncwarp();
  if (!last) sm90::named_barrier_arrive(dq_empty_barrier(consumer), kDqHandoffThreads);
}

// The reducer warp's sweep over a persistent CTA's tiles: kPasses handoffs per step from
// each consumer, the one of (tile, step, pass, consumer) added at where(...). The staging
// tiles carry over from tile to tile, so the handoffs are one run, counted first: its last
// is not freed. The reductions must be complete before the kernel (and its shared memory)
// ends.
template <int kConsumers, int kPasses, int kStagingBytes, int kBlockM, bool kPaired, class Where>
__device__ __forceinline__ void reduce_dq_sweep(const Sm90BackwardUnits<kPaired>& units,
                                                const AttentionParams& p,
                                                uint32_t staging_base, const CUtensorMap* dq_map,
                                                int lane, Where where) {
  const int own_tiles = units.own_tiles();
  int handoffs = 0;
  for (int own_tile = 0; own_tile < own_tiles; ++own_tile) {
    Sm90BackwardTile<kBlockM> tile;
    if (units.tile(p, own_tile, tile)) handoffs += kPasses * tile.steps.count;
  }
  if (handoffs == 0) return;
  open_dq_staging<kConsumers>();
  int handoff = 0;
  for (int own_tile = 0; own_tile < own_tiles; ++own_tile) {
    Sm90BackwardTile<kBlockM> tile;
    if (!units.tile(p, own_tile, tile)) continue;
    for (int step = 0; step < tile.steps.count; ++step)
      for (int pass = 0; pass < kPasses; ++pass, ++handoff)
#pragma unroll
        for (int consumer = 0; consumer < kConsumers; ++consumer)
          reduce_dq_tile<kStagingBytes>(consumer, staging_base, dq_map,
                                        where(tile, step, pass, consumer), tile.batch, lane,
                                        handoff + 1 == handoffs);
  }
  if (lane == 0) sm90::bulk_wait<0>();
}

// dK and dV of a consumer's 64 keys, through its staging tile (store_tile_staged), on the
// consumer's named barrier.
constexpr int kDkvStagingBytes = kStagingTileBytes;
__device__ __forceinline__ int dkv_staging_barrier(int consumer) { return 8 + consumer; }

template <typename Element, int kTiles>
__device__ __forceinline__ void store_dk_dv_staged(const float (&acc_dk)[1][kTiles][4],
                                                   const float (&acc_dv)[1][kTiles][4],
                                                   const Sm90BackwardMaps& maps, uint32_t staging,
                                                   int consumer, int group_thread, int column0,
                                                   int key0, int head_kv, int batch) {
  store_tile_staged<Element>(acc_dv, &maps.dv, staging, dkv_staging_barrier(consumer),
                             group_thread, column0, key0, head_kv, batch);
  store_tile_staged<Element>(acc_dk, &maps.dk, staging, dkv_staging_barrier(consumer),
                             group_thread, column0, key0, head_kv, batch);
}

// Pᵀ into acc_s and dSᵀ into acc_dp, in place, for one warp's wgmma accumulators of Sᵀ and
// dPᵀ in a step of a key block: 16 keys from `warp_key0` by 8 * kTiles queries from
// `warp_query0`, whose lse (log2 units) and delta are lse_log2[0..] and delta[0..]. The
// step's block is kBlockM queries from query0 by kBlockN keys from key0 (the whole CTA's);
// most blocks take the short path, with no index arithmetic (a uniform branch per step).
template <bool kHasWindow, int kBlockM, int kBlockN, int kTiles>
__device__ __forceinline__ void probabilities_and_grads(float (&acc_s)[1][kTiles][4],
                                                        float (&acc_dp)[1][kTiles][4],
                                                        const float* lse_log2, const float* delta,
                                                        const AttentionParams& p,
                                                        const KeyWindow& window, int batch,
                                                        int head, int query0, int key0,
                                                        int warp_query0, int warp_key0, int lane) {
  const ScoreTransform transform = ScoreTransform::make(p, batch, head);
  const bool masked = window.tile_needs_mask<kHasWindow>(
      query0, min(query0 + kBlockM, static_cast<int>(p.seqlen_q)), key0, key0 + kBlockN);
  const int g = lane >> 2, t = lane & 3;
  auto elements = [&](auto general_tag) {
    constexpr bool kGeneral = decltype(general_tag)::value;
#pragma unroll
    for (int j = 0; j < kTiles; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int column = 8 * j + 2 * t + (c & 1);
        const float2 pg = probability_and_grad<kGeneral, kHasWindow>(
            acc_s[0][j][c], acc_dp[0][j][c], lse_log2[column], delta[column], transform, window,
            masked, false, warp_query0 + column, warp_key0 + g + 8 * (c >> 1));
        acc_s[0][j][c] = pg.x;
        acc_dp[0][j][c] = pg.y;
      }
  };
  // Plain masked steps (the diagonal's, mostly) test each element against its key's range
  // of visible queries, two compares of a constant, rather than the general path's visible().
  auto masked_elements = [&] {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const ColumnRange queries =
          window.visible_query_columns<kHasWindow>(warp_key0 + g + 8 * h, warp_query0 + 2 * t);
#pragma unroll
      for (int j = 0; j < kTiles; ++j)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int column = 8 * j + 2 * t + c;
          float& s = acc_s[0][j][2 * h + c];
          float& dp = acc_dp[0][j][2 * h + c];
          const float prob = queries.contains(8 * j + c)
                                 ? fast_exp2(fmaf(s, transform.exp_scale, -lse_log2[column]))
                                 : 0.0f;
          s = prob;
          dp = prob * (dp - delta[column]) * transform.scale;
        }
    }
  };
  if (transform.plain && !masked) {
    elements(std::false_type{});
  } else if (transform.plain) {
    masked_elements();
  } else {
    elements(std::true_type{});
  }
}

// A warp's dK and dV accumulators (16 keys from key0 by 8 * kTiles columns from column0,
// summed over the GQA group) to dk and dv; rows past `rows` are not written.
template <typename Element, int kTiles>
__device__ __forceinline__ void store_dk_dv(const float (&acc_dk)[1][kTiles][4],
                                            const float (&acc_dv)[1][kTiles][4],
                                            const AttentionParams& p, int batch, int head_kv,
                                            int key0, int column0, int rows, int lane) {
  Element* dk = static_cast<Element*>(p.dk) + batch * p.k_strides.batch +
                key0 * p.k_strides.row + head_kv * p.k_strides.head + column0;
  Element* dv = static_cast<Element*>(p.dv) + batch * p.v_strides.batch +
                key0 * p.v_strides.row + head_kv * p.v_strides.head + column0;
  store_tile<Element>(acc_dk, dk, p.k_strides.row, rows, 8 * kTiles, /*vectorized=*/true, lane);
  store_tile<Element>(acc_dv, dv, p.v_strides.row, rows, 8 * kTiles, /*vectorized=*/true, lane);
}

}  // namespace jax_flash::cuda
