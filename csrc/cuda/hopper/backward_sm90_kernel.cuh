// FlashAttention backward for Hopper (sm_90a), main kernel at head dims 64 and 128 (256:
// backward_sm90_wide_kernel.cuh): warp-specialized, wgmma + TMA. Same division of work as
// the sm80 kernel (backward_kernel.cuh) per key block: it keeps K and V in shared memory
// and dK, dV in registers, sweeps every (query head of the GQA group, query block) that sees
// its keys, and adds dQ into the float32 workspace (or leaves dQ to the deterministic pass).
// The grid is persistent: one CTA per SM takes key blocks in turn (Sm90BackwardUnits), so
// that its next block's first Q/dO copies run under the current block's last step and its
// K/V copies under the dK/dV stores, instead of after a CTA launch.
//
// Warpgroup 0 is the producer: one thread copies K and V once per key block, and Q and dO of
// each step into a two-stage ring that runs on across key blocks (TMA, mbarriers).
// Warpgroups 1 and 2 own 64 keys each; per step:
//   Sᵀ = K Qᵀ and dPᵀ = V dOᵀ (wgmma, both operands from shared memory);
//   Pᵀ and dSᵀ = Pᵀ (dPᵀ - delta) (softcap') scale in registers (scores.cuh's element step);
//   dV += Pᵀ dO and dK += dSᵀ Q with Pᵀ, dSᵀ straight from registers;
//   dSᵀ also goes to shared memory, where both warpgroups' halves form the A operand of
//   dQ = dS K; each warpgroup computes a 64 x 64 tile of it (64 of the 128 columns at head
//   dim 128; 64 of the step's 128 queries at head dim 64) and stages it in shared memory,
//   and the producer warpgroup's second warp has the copy engine add it into the float32
//   accumulator (a bulk reduction: per-element atomics from registers cost a quarter of the
//   kernel's time).
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/attention_params.h"
#include "cuda/backward_steps.cuh"
#include "cuda/element.cuh"
#include "cuda/flash_api.h"
#include "cuda/fragments.cuh"
#include "cuda/hopper/backward_sm90_steps.cuh"
#include "cuda/hopper/sm90_ptx.cuh"
#include "cuda/hopper/wgmma_ops.cuh"
#include "cuda/ptx.cuh"
#include "cuda/scores.cuh"
#include "cuda/warp_mma.cuh"

namespace jax_flash::cuda {

template <int kHeadDim_>
struct Sm90BackwardConfig {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockN = 128;  // keys per CTA: two consumer warpgroups of 64
  // Queries per step: at head dim 64 a step of 64 would be products too small (64x64x64) to
  // hide the step's fixed costs (softmax, barriers, dQ staging), so it takes 128.
  static constexpr int kBlockM = kHeadDim == 64 ? 128 : 64;
  static constexpr int kStages = 2;
  static constexpr int kConsumers = 2;
  static constexpr int kThreads = 128 * (1 + kConsumers);
  static constexpr int kChunks = kHeadDim / 64;
  static constexpr int kDTiles = kHeadDim / 8;
  static constexpr int kQTiles = kBlockM / 8;  // 8-query column tiles of Sᵀ
  static constexpr int kKVBytes = kBlockN * kHeadDim * 2;
  static constexpr int kQBytes = kBlockM * kHeadDim * 2;
  // dSᵀ, [key][query], as kBlockM / 64 chunks of 64 queries (one 128-byte swizzle span).
  static constexpr int kDsBytes = kBlockN * kBlockM * 2;
  // dQ is split between the consumers by columns (kBlockM = 64: each computes 64 of the 128)
  // or by queries (kBlockM = 128: each computes 64 queries of all 64 columns); either way a
  // 64 x 64 float32 tile, staged as two 32-column swizzled chunks.
  static constexpr bool kDqByQueries = kBlockM == 128;
  // A consumer's dQ tile within the step: its first column and its first query (from query0).
  static __device__ __forceinline__ int dq_column0(int consumer) {
    return kDqByQueries ? 0 : 64 * consumer;
  }
  static __device__ __forceinline__ int dq_query_offset(int consumer) {
    return kDqByQueries ? 64 * consumer : 0;
  }
  static constexpr int kDqBytes = 64 * 64 * 4;
  // lse_log2 and delta of a step, per stage (copied with its Q and dO).
  static constexpr int kStatsBytes = 2 * kBlockM * 4;
  static constexpr int kBarriers = 2 + 2 * kStages;  // K/V full and empty; Q/dO full and empty
  static constexpr int kSmemBytes = 2 * kKVBytes + 2 * kStages * kQBytes + 2 * kDsBytes +
                                    kConsumers * (kDqBytes + kDkvStagingBytes) +
                                    kStages * kStatsBytes + 8 * kBarriers + 1024;
  static constexpr int kProducerRegisters = kSm90BackwardProducerRegisters;
  static constexpr int kConsumerRegisters = kSm90BackwardConsumerRegisters;
  static_assert(kThreads == 384, "the register split is for one producer and two consumers");
  static_assert(kHeadDim == 64 || kHeadDim == 128, "head dims with a Hopper backward");
  static_assert(kBlockM == 64 * kConsumers / kChunks, "dQ: one 64 x 64 tile per consumer");
  static_assert(kSmemBytes <= 227 * 1024, "Hopper's shared memory per block");
};

template <class Config, typename Element, bool kHasWindow>
__global__ void __launch_bounds__(Config::kThreads, 1)
    backward_kernel_sm90(const __grid_constant__ AttentionParams p,
                         const __grid_constant__ Sm90BackwardMaps maps) {
  constexpr int kBlockM = Config::kBlockM, kBlockN = Config::kBlockN, kStages = Config::kStages;
  constexpr int kHeadDim = Config::kHeadDim, kChunks = Config::kChunks;
  constexpr int kDTiles = Config::kDTiles, kQTiles = Config::kQTiles;
  constexpr bool kBF16 = ElementTraits<Element>::kIsBFloat16;

  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = shared_address(smem_raw);
  const uint32_t smem = (raw + 1023u) & ~1023u;
  // K and V as kChunks column chunks of [kBlockN][64]; per stage Q then dO as chunks of
  // [kBlockM][64]; two dSᵀ buffers; dQ staging and dK/dV staging per consumer (1024-byte
  // aligned, as the swizzle needs); lse_log2 and delta per stage; barriers.
  const uint32_t k_smem = smem, v_smem = smem + Config::kKVBytes;
  auto q_smem = [&](int stage) { return smem + 2 * Config::kKVBytes + 2 * stage * Config::kQBytes; };
  auto do_smem = [&](int stage) { return q_smem(stage) + Config::kQBytes; };
  const uint32_t ds_base = smem + 2 * Config::kKVBytes + 2 * kStages * Config::kQBytes;
  auto ds_smem = [&](int buffer) { return ds_base + buffer * Config::kDsBytes; };
  const uint32_t dq_base = ds_base + 2 * Config::kDsBytes;
  const uint32_t dkv_base = dq_base + Config::kConsumers * Config::kDqBytes;
  const uint32_t stats_base = dkv_base + Config::kConsumers * kDkvStagingBytes;
  auto lse_smem = [&](int stage) { return stats_base + stage * Config::kStatsBytes; };
  auto delta_smem = [&](int stage) { return lse_smem(stage) + kBlockM * 4; };
  const uint32_t barriers = stats_base + kStages * Config::kStatsBytes;
  const uint32_t kv_full = barriers, kv_empty = barriers + 8;
  auto full = [&](int stage) { return barriers + 8 * (2 + stage); };
  auto empty = [&](int stage) { return barriers + 8 * (2 + kStages + stage); };

  const int thread = threadIdx.x;
  const Sm90BackwardUnits<kHasWindow> units =
      Sm90BackwardUnits<kHasWindow>::make(p, kBlockN);
  const int own_tiles = units.own_tiles();
  using Tile = Sm90BackwardTile<kBlockM>;

  if (thread == 0) {
    sm90::mbarrier_init(kv_full, 1);
    sm90::mbarrier_init(kv_empty, 4 * Config::kConsumers);  // one per consumer warp
    for (int stage = 0; stage < kStages; ++stage) {
      sm90::mbarrier_init(full(stage), 1);
      sm90::mbarrier_init(empty(stage), 4 * Config::kConsumers);
    }
    sm90::fence_barrier_init();
  }
  __syncthreads();

  const int warpgroup = thread / 128;
  if (warpgroup == 0) {
    sm90::registers_decrease<Config::kProducerRegisters>();
    if (thread == 0) {
      produce_backward_tiles<kChunks, kBlockN, kBlockM>(
          units, p, maps, k_smem, v_smem, kv_full, kv_empty,
          [&](const Tile& tile, int step, int step_count) {
            const int stage = step_count % kStages, use = step_count / kStages;
            const int head = tile.steps.head(step), query0 = tile.steps.query0(step);
            if (use > 0) sm90::mbarrier_wait(empty(stage), (use - 1) & 1);
            sm90::mbarrier_arrive_expect_tx(full(stage),
                                            2 * Config::kQBytes + Config::kStatsBytes);
            sm90::tma_load_tile<kChunks, kBlockM>(q_smem(stage), &maps.q, full(stage), query0,
                                                  head, tile.batch);
            sm90::tma_load_tile<kChunks, kBlockM>(do_smem(stage), &maps.dout, full(stage),
                                                  query0, head, tile.batch);
            load_step_stats(lse_smem(stage), &maps.lse_log2, full(stage), p, tile.batch, head,
                            query0);
            load_step_stats(delta_smem(stage), &maps.delta, full(stage), p, tile.batch, head,
                            query0);
          });
    } else if (thread / 32 == 1 && !p.deterministic) {
      reduce_dq_sweep<Config::kConsumers, 1, Config::kDqBytes, kBlockM>(
          units, p, dq_base, &maps.dq, thread & 31,
          [&](const Tile& tile, int step, int, int consumer) {
            return make_int4(Config::dq_column0(consumer),
                             tile.steps.query0(step) + Config::dq_query_offset(consumer),
                             tile.steps.head(step), 0);
          });
    }
  } else {
    // The consumers are the other branch of one if/else, as in the forward kernel.
    sm90::registers_increase<Config::kConsumerRegisters>();
    const int consumer = sm90::warp_uniform(warpgroup - 1);
    const int group_thread = thread & 127, lane = thread & 31, warp_in_group = group_thread >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int key_row0 = 64 * consumer;                     // within the CTA's key block
    const int warp_key0 = key_row0 + 16 * warp_in_group;  // this warp's 16 keys (rows)
    const KeyWindow window = KeyWindow::make(p);
    auto generic = [&](uint32_t address) {
      return reinterpret_cast<const float*>(smem_raw + (address - raw));
    };

    using sm90::opaque;
    // acc (keys x queries) = rows of `kv` (this warpgroup's keys) times the step's rows of `qd`.
    auto issue_keys_by_queries = [&](float* acc, uint32_t kv, uint32_t qd) {
      const uint64_t a0 = opaque(sm90::smem_descriptor(kv + key_row0 * 128, 16, 1024));
      const uint64_t b0 = opaque(sm90::smem_descriptor(qd, 16, 1024));
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        const uint32_t column = (kk % 4) * 32;
        wgmma_ss<kBlockM, kBF16>(acc, a0 + (((kk / 4) * kBlockN * 128 + column) >> 4),
                                 b0 + (((kk / 4) * kBlockM * 128 + column) >> 4), kk > 0);
      }
    };
    // acc (keys x head_dim) += a (keys x queries, registers) times the step's rows of `qd`.
    auto issue_accumulate = [&](float* acc, const uint32_t (&a)[kBlockM / 16][4], uint32_t qd) {
      const uint64_t b0 = opaque(sm90::smem_descriptor(qd, kBlockM * 128, 1024));
#pragma unroll
      for (int kk = 0; kk < kBlockM / 16; ++kk)
        wgmma_rs<kHeadDim, kBF16>(acc, a[kk], b0 + ((kk * 16 * 128) >> 4), 1);
    };

    int kv_count = 0, step_count = 0;  // as the producer's
    for (int own_tile = 0; own_tile < own_tiles; ++own_tile) {
      Tile tile;
      if (!units.tile(p, own_tile, tile)) continue;
      const QuerySteps<kBlockM>& steps = tile.steps;
      const int batch = tile.batch, key0 = tile.key0;
      float acc_dv[1][kDTiles][4], acc_dk[1][kDTiles][4];
      zero(acc_dv);
      zero(acc_dk);
      if (steps.count > 0) sm90::mbarrier_wait(kv_full, kv_count & 1);
      for (int step = 0; step < steps.count; ++step, ++step_count) {
        const int stage = step_count % kStages, parity = step_count & 1;
        const int head = steps.head(step), query0 = steps.query0(step);
        const float* lse_log2 = generic(lse_smem(stage));
        const float* delta = generic(delta_smem(stage));

        sm90::mbarrier_wait(full(stage), (step_count / kStages) & 1);
        float acc_s[1][kQTiles][4], acc_dp[1][kQTiles][4];
        sm90::wgmma_fence();
        issue_keys_by_queries(&acc_s[0][0][0], k_smem, q_smem(stage));
        issue_keys_by_queries(&acc_dp[0][0][0], v_smem, do_smem(stage));
        sm90::wgmma_commit();
        sm90::wgmma_wait<0>();
        sm90::fence_registers<kBlockM / 2>(&acc_s[0][0][0]);
        sm90::fence_registers<kBlockM / 2>(&acc_dp[0][0][0]);

        probabilities_and_grads<kHasWindow, kBlockM, kBlockN>(
            acc_s, acc_dp, lse_log2, delta, p, window, batch, head, query0, key0, query0,
            key0 + warp_key0, lane);
        uint32_t p_frag[kBlockM / 16][4], ds_frag[kBlockM / 16][4];
#pragma unroll
        for (int kk = 0; kk < kBlockM / 16; ++kk) {
          pack_a_fragment<Element>(acc_s[0], kk, p_frag[kk]);
          pack_a_fragment<Element>(acc_dp[0], kk, ds_frag[kk]);
        }
        // dSᵀ to shared memory in the swizzled layout (row = key; chunks of 64 queries).
        const uint32_t ds = ds_smem(parity);
#pragma unroll
        for (int j = 0; j < kQTiles; ++j)
#pragma unroll
          for (int h = 0; h < 2; ++h)
            asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(swizzled_128b(
                             ds + (j / 8) * kBlockN * 128, warp_key0 + g + 8 * h,
                             ((8 * j + 2 * t) % 64) * 2)),
                         "r"(ds_frag[j / 2][2 * (j & 1) + h]));
        // dV's product runs while the consumers meet; dQ's (which reads both halves of dSᵀ)
        // and dK's follow, and dQ is staged while dK's runs, so the tensor cores see the
        // three back to back.
        sm90::wgmma_fence();
        issue_accumulate(&acc_dv[0][0][0], p_frag, do_smem(stage));
        sm90::wgmma_commit();
        sm90::fence_shared_for_async();
        sm90::named_barrier_sync(1, 256);  // both halves of dSᵀ are written
        if (!p.deterministic) {
          // dQ = dS K for this consumer's 64 x 64 tile (Config::kDqByQueries): A is dSᵀ read
          // query-major (the consumer's chunk of queries, or the only one), B is K read
          // column-major (its chunk of columns, or the only one), both transposed in the
          // descriptors; the contraction runs over all kBlockN keys.
          float acc_dq[1][8][4];
          const uint64_t a0 = opaque(sm90::smem_descriptor(
              ds + (Config::dq_query_offset(consumer) / 64) * kBlockN * 128, 8192, 1024));
          const uint64_t b0 = opaque(sm90::smem_descriptor(
              k_smem + (Config::dq_column0(consumer) / 64) * kBlockN * 128, kBlockN * 128, 1024));
#pragma unroll
          for (int kk = 0; kk < kBlockN / 16; ++kk)
            wgmma_ss<64, kBF16, 1, 1>(&acc_dq[0][0][0], a0 + ((kk * 16 * 128) >> 4),
                                      b0 + ((kk * 16 * 128) >> 4), kk > 0);
          sm90::wgmma_commit();
          issue_accumulate(&acc_dk[0][0][0], ds_frag, q_smem(stage));
          sm90::wgmma_commit();
          sm90::wgmma_wait<1>();  // dV's and dQ's products are done
          sm90::fence_registers<kHeadDim / 2>(&acc_dv[0][0][0]);
          sm90::fence_registers<kBlockM / 4>(&p_frag[0][0]);
          sm90::fence_registers<32>(&acc_dq[0][0][0]);
          stage_dq_tile(acc_dq, dq_base + consumer * Config::kDqBytes, consumer, group_thread);
        } else {
          issue_accumulate(&acc_dk[0][0][0], ds_frag, q_smem(stage));
          sm90::wgmma_commit();
        }
        sm90::wgmma_wait<0>();
        sm90::fence_registers<kHeadDim / 2>(&acc_dv[0][0][0]);
        sm90::fence_registers<kHeadDim / 2>(&acc_dk[0][0][0]);
        sm90::fence_registers<kBlockM / 4>(&p_frag[0][0]);
        sm90::fence_registers<kBlockM / 4>(&ds_frag[0][0]);
        __syncwarp();
        if (lane == 0) sm90::mbarrier_arrive(empty(stage));  // Q and dO of this stage are free
      }
      // The last step waited for all of this warp's products: K and V may be replaced while
      // dK and dV are stored.
      if (steps.count > 0) {
        if (lane == 0) sm90::mbarrier_arrive(kv_empty);
        ++kv_count;
      }
      // dK and dV of this consumer's keys, summed over the group; zero if no query sees them.
      store_dk_dv_staged<Element>(acc_dk, acc_dv, maps, dkv_base + consumer * kDkvStagingBytes,
                                  consumer, group_thread, 0, key0 + key_row0, tile.head_kv,
                                  batch);
    }
    // The staging tile must outlast the copy engine's reads, and the stores be complete.
    if (group_thread == 0) sm90::bulk_wait<0>();
  }
}

}  // namespace jax_flash::cuda
