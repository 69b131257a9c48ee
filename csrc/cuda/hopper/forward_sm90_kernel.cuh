// FlashAttention forward for Hopper (sm_90a): warp-specialized, wgmma + TMA.
//
// A tile is 128 query rows of one (batch, head); a unit is one tile, or with a mask window
// two of equal total work under a causal mask (tile_at). The grid is persistent: one CTA
// per SM, each taking units blockIdx.x, blockIdx.x + gridDim.x, ..., so that its next
// tile's Q and first K/V copies run under its current tile's last product and epilogue
// instead of after a CTA launch. Three warpgroups:
//   warpgroup 0, the producer: one thread issues bulk tensor copies of each tile's Q and of
//     K and V per key block into a kStages-deep ring of shared-memory stages (one ring
//     across the CTA's tiles); each copy completes on its stage's "full" mbarrier, and the
//     thread waits on the stage's "empty" mbarrier before reusing it (Q's own pair of
//     mbarriers: Q is free once a tile's last S product is done). It gives most of its
//     registers away.
//   warpgroups 1 and 2, the consumers: 64 query rows each. S = Q Kᵀ and O += P V run on
//     wgmma with K and V read from the swizzled stages (descriptors) and P straight from
//     registers. Within a warpgroup, S of key block j is computed while O += P V of block
//     j - 1 runs, so the softmax of block j overlaps that product; where it pays
//     (Config::kPingPong) the two warpgroups take turns issuing their products, so that
//     one's softmax fills the other's tensor-core time.
// The masks, softcap and ALiBi are those of the sm80 kernel (scores.cuh), applied to the
// same accumulator layout: wgmma's m64nN accumulators are, per warp, the m16n8 layout of a
// 16-row tile.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "common/attention_params.h"
#include "cuda/element.cuh"
#include "cuda/fragments.cuh"
#include "cuda/hopper/sm90_ptx.cuh"
#include "cuda/hopper/staged_store.cuh"
#include "cuda/hopper/tile_order.cuh"
#include "cuda/hopper/wgmma_ops.cuh"
#include "cuda/online_softmax.cuh"
#include "cuda/ptx.cuh"
#include "cuda/scores.cuh"
#include "cuda/warp_mma.cuh"

namespace jax_flash::cuda {

// Tensor maps of Q, K, V and O, each seen as (head_dim, seqlen, heads, batch) with boxes of
// 64 head-dim columns (one 128-byte swizzle span) by kBlockM (Q), kBlockN (K, V) or 64 (O,
// one consumer's rows) rows.
struct Sm90ForwardMaps {
  CUtensorMap q, k, v, out;
};

template <int kHeadDim_, int kBlockN_, int kStages_, bool kPingPong_, int kQStages_>
struct Sm90ForwardConfig {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 128;  // two consumer warpgroups of 64 rows
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kStages = kStages_;
  static constexpr bool kPingPong = kPingPong_;
  // Q buffers: with two, a persistent CTA loads its next tile's Q during the current tile
  // (one alone is free only after the tile's last S product, too late to hide the copy).
  static constexpr int kQStages = kQStages_;
  static constexpr int kConsumers = 2;
  static constexpr int kThreads = 128 * (1 + kConsumers);
  static constexpr int kChunks = kHeadDim / 64;  // 64-column swizzle atoms across head_dim
  static constexpr int kNTiles = kBlockN / 8;
  static constexpr int kDTiles = kHeadDim / 8;
  static constexpr int kQBytes = kBlockM * kHeadDim * 2;
  static constexpr int kKVBytes = kBlockN * kHeadDim * 2;
  // Q full and empty per Q buffer; K/V full and empty per stage.
  static constexpr int kBarriers = 2 * kQStages + 4 * kStages;
  // Tiles, one O staging tile per consumer, barriers, and slack to align the tiles to 1024
  // bytes (the swizzle atom).
  static constexpr int kSmemBytes = kQStages * kQBytes + 2 * kStages * kKVBytes +
                                    kConsumers * kStagingTileBytes + 8 * kBarriers + 1024;
  // Registers per thread after reallocation: 128 * (producer + 2 * consumer) <= 64K. Blocks
  // wider than 128 keys hold S of kBlockN / 2 floats beside O and P: the producer thread
  // gives up 16 more.
  static constexpr int kProducerRegisters = kBlockN > 128 ? 24 : 40;
  static constexpr int kConsumerRegisters = kBlockN > 128 ? 240 : 232;
  static_assert(kHeadDim % 64 == 0 && kBlockN % 16 == 0 && kStages >= 2, "tile shape");
  static_assert(kQStages == 1 || kQStages == 2, "Q buffers");
  static_assert(kProducerRegisters + kConsumers * kConsumerRegisters <= 512, "register file");
};

// The forward's tiles: row blocks of kBlockM queries per (batch, head), paired where a mask
// window makes their work differ (the window's compile-time switch serves: the kernels
// without one keep the plain order). The kernel and its launcher's grid size both use it.
template <int kBlockM, bool kHasWindow>
__host__ __device__ __forceinline__ TileOrder<kHasWindow> sm90_forward_tile_order(
    const AttentionParams& p) {
  return {static_cast<int>((p.seqlen_q + kBlockM - 1) / kBlockM),
          static_cast<int>(p.num_heads * p.batch)};
}

template <class Config, typename Element, bool kHasWindow>
__global__ void __launch_bounds__(Config::kThreads, 1)
    forward_kernel_sm90(const __grid_constant__ AttentionParams p,
                        const __grid_constant__ Sm90ForwardMaps maps) {
  constexpr int kBlockM = Config::kBlockM, kBlockN = Config::kBlockN, kStages = Config::kStages;
  constexpr int kHeadDim = Config::kHeadDim, kChunks = Config::kChunks;
  constexpr int kNTiles = Config::kNTiles, kDTiles = Config::kDTiles;
  constexpr bool kBF16 = ElementTraits<Element>::kIsBFloat16;
  constexpr bool kPingPong = Config::kPingPong;

  extern __shared__ unsigned char smem_raw[];
  const uint32_t smem = (shared_address(smem_raw) + 1023u) & ~1023u;
  // Each tile is kChunks column chunks of [rows][64] elements (128-byte rows, swizzled).
  constexpr int kQStages = Config::kQStages;
  auto q_smem = [&](int buffer) { return smem + buffer * Config::kQBytes; };
  const uint32_t kv_base = smem + kQStages * Config::kQBytes;
  auto k_smem = [&](int stage) { return kv_base + 2 * stage * Config::kKVBytes; };
  auto v_smem = [&](int stage) { return k_smem(stage) + Config::kKVBytes; };
  const uint32_t out_staging = kv_base + 2 * kStages * Config::kKVBytes;
  const uint32_t barriers = out_staging + Config::kConsumers * kStagingTileBytes;
  auto q_full = [&](int buffer) { return barriers + 8 * buffer; };
  auto q_empty = [&](int buffer) { return barriers + 8 * (kQStages + buffer); };
  const uint32_t kv_barriers = barriers + 8 * 2 * kQStages;
  auto k_full = [&](int stage) { return kv_barriers + 8 * stage; };
  auto v_full = [&](int stage) { return kv_barriers + 8 * (kStages + stage); };
  auto k_empty = [&](int stage) { return kv_barriers + 8 * (2 * kStages + stage); };
  auto v_empty = [&](int stage) { return kv_barriers + 8 * (3 * kStages + stage); };

  const TileOrder<kHasWindow> order = sm90_forward_tile_order<kBlockM, kHasWindow>(p);
  const int num_m_blocks = order.blocks;
  const int num_own_tiles =
      order.own_tiles(static_cast<int>(blockIdx.x), static_cast<int>(gridDim.x));
  const int seqlen_q = static_cast<int>(p.seqlen_q), head_dim = static_cast<int>(p.head_dim);
  const int thread = threadIdx.x;

  if (thread == 0) {
    for (int buffer = 0; buffer < kQStages; ++buffer) {
      sm90::mbarrier_init(q_full(buffer), 1);
      sm90::mbarrier_init(q_empty(buffer), 4 * Config::kConsumers);  // one per consumer warp
    }
    for (int stage = 0; stage < kStages; ++stage) {
      sm90::mbarrier_init(k_full(stage), 1);
      sm90::mbarrier_init(v_full(stage), 1);
      sm90::mbarrier_init(k_empty(stage), 4 * Config::kConsumers);
      sm90::mbarrier_init(v_empty(stage), 4 * Config::kConsumers);
    }
    sm90::fence_barrier_init();
  }
  __syncthreads();

  // TileOrder's index 0 is the last row block, whose rows see the most keys under a causal
  // mask: the longest rows go first.
  struct Tile {
    bool exists;  // false for a paired unit's missing second tile
    int head, batch, head_kv, row0, valid_rows, key_begin, num_key_blocks;
  };
  auto tile_at = [&](int own_tile) {
    Tile tile;
    const OrderedTile ordered =
        order.tile(static_cast<int>(blockIdx.x), static_cast<int>(gridDim.x), own_tile);
    const int head_batch = ordered.head, m_block = num_m_blocks - 1 - ordered.index;
    tile.exists = ordered.exists;
    tile.head = head_batch % static_cast<int>(p.num_heads);
    tile.batch = head_batch / static_cast<int>(p.num_heads);
    tile.head_kv = tile.head / static_cast<int>(p.num_heads / p.num_heads_kv);
    tile.row0 = m_block * kBlockM;
    tile.valid_rows = min(kBlockM, seqlen_q - tile.row0);
    const IndexRange keys = visible_keys(p, tile.row0, tile.row0 + tile.valid_rows);
    tile.key_begin = static_cast<int>(keys.begin);
    // 0 where every row of the tile is fully masked: no copies, out = 0 and lse = +inf.
    tile.num_key_blocks =
        keys.empty() ? 0 : (static_cast<int>(keys.end) - tile.key_begin + kBlockN - 1) / kBlockN;
    return tile;
  };

  const int warpgroup = thread / 128;
  if (warpgroup == 0) {
    sm90::registers_decrease<Config::kProducerRegisters>();
    if (thread != 0) return;
    sm90::prefetch_tensor_map(&maps.q);
    sm90::prefetch_tensor_map(&maps.k);
    sm90::prefetch_tensor_map(&maps.v);
    // Key blocks and Q tiles loaded so far by this CTA: the ring's and Q's phases.
    int kv_count = 0, q_count = 0;
    for (int own_tile = 0; own_tile < num_own_tiles; ++own_tile) {
      const Tile tile = tile_at(own_tile);
      if (!tile.exists || tile.num_key_blocks == 0) continue;
      const int q_buffer = q_count % kQStages, q_use = q_count / kQStages;
      if (q_use > 0) sm90::mbarrier_wait(q_empty(q_buffer), (q_use - 1) & 1);
      sm90::mbarrier_arrive_expect_tx(q_full(q_buffer), Config::kQBytes);
      sm90::tma_load_tile<kChunks, kBlockM>(q_smem(q_buffer), &maps.q, q_full(q_buffer),
                                            tile.row0, tile.head, tile.batch);
      ++q_count;
      for (int block = 0; block < tile.num_key_blocks; ++block, ++kv_count) {
        const int stage = kv_count % kStages, use = kv_count / kStages;
        const int key0 = tile.key_begin + block * kBlockN;
        // K first: the consumers need K of a block one product earlier than its V.
        if (use > 0) sm90::mbarrier_wait(k_empty(stage), (use - 1) & 1);
        sm90::mbarrier_arrive_expect_tx(k_full(stage), Config::kKVBytes);
        sm90::tma_load_tile<kChunks, kBlockN>(k_smem(stage), &maps.k, k_full(stage), key0,
                                              tile.head_kv, tile.batch);
        if (use > 0) sm90::mbarrier_wait(v_empty(stage), (use - 1) & 1);
        sm90::mbarrier_arrive_expect_tx(v_full(stage), Config::kKVBytes);
        sm90::tma_load_tile<kChunks, kBlockN>(v_smem(stage), &maps.v, v_full(stage), key0,
                                              tile.head_kv, tile.batch);
      }
    }
  } else {
    // The consumers' body is the other branch of one if/else, the shape in which setmaxnreg
    // hands them the producer's registers (HOPPER.md).
    sm90::registers_increase<Config::kConsumerRegisters>();

    const int consumer = sm90::warp_uniform(warpgroup - 1);
    const int lane = thread & 31, warp_in_group = (thread >> 5) & 3;
    const int group_row0 = 64 * consumer;                     // within the CTA's block
    const int warp_row0 = group_row0 + 16 * warp_in_group;  // this warp's 16 rows
    const KeyWindow window = KeyWindow::make(p);
    // The current tile and what follows from it (the lambdas below read them).
    Tile tile{};
    int query0 = 0, q_buffer = 0;
    ScoreTransform transform;

    float acc_o[1][kDTiles][4];
    float acc_s[1][kNTiles][4];
    uint32_t p_frag[kBlockN / 16][4];  // P of the previous block, as wgmma A fragments
    float row_max[1][2], row_sum[1][2];

    // Ping-pong: consumer c issues its products after named barrier 1 + c opens, then opens
    // the other's. Consumer 1 lets consumer 0 go first.
    auto take_turn = [&] {
      if constexpr (kPingPong) sm90::named_barrier_sync(1 + consumer, 256);
    };
    auto pass_turn = [&](bool last) {
      // Consumer 1's final pass is skipped so that every barrier phase is completed.
      if constexpr (kPingPong)
        if (!(last && consumer == 1)) sm90::named_barrier_arrive(2 - consumer, 256);
    };

    // Descriptors are an opaque base plus a constant step per k-slice (the address field is
    // the low bits; offsets never carry out of it).
    using sm90::opaque;
    auto issue_scores = [&](int stage) {
      const uint64_t a0 =
          opaque(sm90::smem_descriptor(q_smem(q_buffer) + group_row0 * 128, 16, 1024));
      const uint64_t b0 = opaque(sm90::smem_descriptor(k_smem(stage), 16, 1024));
      sm90::wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        // 32 bytes into the 128-byte swizzled rows per slice, the next column chunk every 4.
        const uint32_t column = (kk % 4) * 32;
        const uint64_t a = a0 + (((kk / 4) * kBlockM * 128 + column) >> 4);
        const uint64_t b = b0 + (((kk / 4) * kBlockN * 128 + column) >> 4);
        wgmma_ss<kBlockN, kBF16>(&acc_s[0][0][0], a, b, kk > 0);
      }
      sm90::wgmma_commit();
    };
    auto issue_pv = [&](int stage) {
      const uint64_t b0 = opaque(sm90::smem_descriptor(v_smem(stage), kBlockN * 128, 1024));
      sm90::wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk)
        wgmma_rs<kHeadDim, kBF16>(&acc_o[0][0][0], p_frag[kk], b0 + ((kk * 16 * 128) >> 4), 1);
      sm90::wgmma_commit();
    };
    auto release = [&](uint32_t bar) {
      __syncwarp();
      if (lane == 0) sm90::mbarrier_arrive(bar);
    };
    // Softcap / ALiBi and the mask, then the probabilities (returned corrections not yet
    // applied to O), packed as the A operand of the next O += P V.
    auto softmax = [&](int block, float (&correction)[1][2]) {
      const int key0 = tile.key_begin + block * kBlockN;
      transform_and_mask<kHasWindow>(acc_s, transform, window, tile.row0,
                                     tile.row0 + tile.valid_rows, query0, key0, lane);
      online_softmax_probabilities(acc_s, row_max, row_sum, transform.exp_scale, correction);
    };
    auto pack_p = [&] {
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) pack_a_fragment<Element>(acc_s[0], kk, p_frag[kk]);
    };

    // Key blocks and Q tiles consumed so far by this CTA: the ring's and Q's phases.
    int kv_count = 0, q_count = 0;
    for (int own_tile = 0; own_tile < num_own_tiles; ++own_tile) {
      tile = tile_at(own_tile);
      if (!tile.exists) continue;
      // Computed where they are written, not held across the tile's products.
      auto out = [&] {
        return static_cast<Element*>(p.out) + tile.batch * p.out_strides.batch +
               tile.row0 * p.out_strides.row + tile.head * p.out_strides.head;
      };
      auto lse = [&] {
        return p.lse + (tile.batch * p.num_heads + tile.head) * p.seqlen_q + tile.row0;
      };
      if (tile.num_key_blocks == 0) {
        store_fully_masked_rows<128 * Config::kConsumers>(out(), p.out_strides.row, lse(),
                                                          tile.valid_rows, head_dim, thread - 128);
        continue;
      }
      const int num_key_blocks = tile.num_key_blocks, valid_rows = tile.valid_rows;
      query0 = tile.row0 + warp_row0;
      transform = ScoreTransform::make(p, tile.batch, tile.head);
      zero(acc_o);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        row_max[0][h] = -INFINITY;
        row_sum[0][h] = 0.0f;
      }
      // Ring position of key block `block` of this tile.
      auto stage_of = [&](int block) { return (kv_count + block) % kStages; };
      auto phase_of = [&](int block) { return ((kv_count + block) / kStages) & 1; };
      // Q is free once the tile's last S product is done.
      auto release_k = [&](int block) {
        release(k_empty(stage_of(block)));
        if (block == num_key_blocks - 1) release(q_empty(q_buffer));
      };
      if constexpr (kPingPong)
        if (consumer == 1) sm90::named_barrier_arrive(1, 256);

      q_buffer = q_count % kQStages;
      sm90::mbarrier_wait(q_full(q_buffer), (q_count / kQStages) & 1);
      {
        float correction[1][2];
        sm90::mbarrier_wait(k_full(stage_of(0)), phase_of(0));
        take_turn();
        issue_scores(stage_of(0));
        pass_turn(false);
        sm90::wgmma_wait<0>();
        sm90::fence_registers<kBlockN / 2>(&acc_s[0][0][0]);
        release_k(0);
        softmax(0, correction);  // O is still zero: nothing to rescale
        pack_p();
      }
      for (int block = 1; block < num_key_blocks; ++block) {
        float correction[1][2];
        sm90::mbarrier_wait(k_full(stage_of(block)), phase_of(block));
        take_turn();
        issue_scores(stage_of(block));
        sm90::mbarrier_wait(v_full(stage_of(block - 1)), phase_of(block - 1));
        issue_pv(stage_of(block - 1));
        pass_turn(false);
        sm90::wgmma_wait<1>();  // S of this block; O += P V of the previous one still runs
        sm90::fence_registers<kBlockN / 2>(&acc_s[0][0][0]);
        release_k(block);
        softmax(block, correction);
        sm90::wgmma_wait<0>();
        sm90::fence_registers<kHeadDim / 2>(&acc_o[0][0][0]);
        sm90::fence_registers<kBlockN / 4>(&p_frag[0][0]);
        release(v_empty(stage_of(block - 1)));
        rescale_rows(acc_o, correction);
        pack_p();
      }
      {
        const int last = num_key_blocks - 1;
        sm90::mbarrier_wait(v_full(stage_of(last)), phase_of(last));
        take_turn();
        issue_pv(stage_of(last));
        pass_turn(true);
        sm90::wgmma_wait<0>();
        sm90::fence_registers<kHeadDim / 2>(&acc_o[0][0][0]);
        sm90::fence_registers<kBlockN / 4>(&p_frag[0][0]);
        release(v_empty(stage_of(last)));
      }
      kv_count += num_key_blocks;
      ++q_count;

      // Normalize, write lse (natural log; +inf for rows that saw no key) and O.
      const int g = lane >> 2, t = lane & 3;
      float* const tile_lse = lse();
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float sum = quad_sum(row_sum[0][h]);
        const bool empty = !(sum > 0.0f);
        const float inv_sum = empty ? 0.0f : 1.0f / sum;
#pragma unroll
        for (int j = 0; j < kDTiles; ++j) {
          acc_o[0][j][2 * h] *= inv_sum;
          acc_o[0][j][2 * h + 1] *= inv_sum;
        }
        const int row = warp_row0 + g + 8 * h;
        if (t == 0 && row < valid_rows)
          tile_lse[row] = empty ? INFINITY : row_max[0][h] * transform.exp_scale * kLn2 + logf(sum);
      }
      // Through the consumer's staging tile (named barrier 3 + consumer; 1 and 2 are the
      // ping-pong's); rows past seqlen_q are dropped by the tensor map.
      store_tile_staged<Element>(acc_o, &maps.out, out_staging + consumer * kStagingTileBytes,
                                 3 + consumer, thread - 128 * warpgroup, 0,
                                 tile.row0 + group_row0, tile.head, tile.batch);
    }
    // The staging tile must outlast the copy engine's reads, and the stores be complete.
    if (thread == 128 * warpgroup) sm90::bulk_wait<0>();
  }
}

}  // namespace jax_flash::cuda
