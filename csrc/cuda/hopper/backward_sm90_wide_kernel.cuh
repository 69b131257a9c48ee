// FlashAttention backward for Hopper (sm_90a), main kernel for head dim 256.
// At 256 columns one warpgroup cannot hold dK and dV of 64 keys (256 accumulator registers
// per thread), so the two consumer warpgroups split the head dim instead of the keys: a CTA
// takes 64-key blocks in turn on a persistent grid, as the main kernel does
// (Sm90BackwardUnits); consumer c owns columns [128c, 128c + 128) of dK, dV and dQ. Per
// 64-query step:
//   Sᵀ = K Qᵀ and dPᵀ = V dOᵀ, each consumer computing 32 of the 64 query columns (no
//   product done twice), then Pᵀ and dSᵀ in registers (scores.cuh's element step);
//   both go to shared memory, where they are whole again for
//   dV[:, c] += Pᵀ dO[:, c] and dK[:, c] += dSᵀ Q[:, c] (both operands from shared memory),
//   dQ[:, c] = dS K[:, c] in two 64-column passes, each staged in shared memory and added
//   into the float32 accumulator by the reducer warp's TMA bulk reduction
//   (backward_sm90_steps.cuh).
// Shared memory (227 KB at most) holds K, V, two stages of Q and one of dO: dO is freed
// first (after dV's product), so its next load overlaps dK, dQ and the next Sᵀ.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/attention_params.h"
#include "cuda/backward_steps.cuh"
#include "cuda/element.cuh"
#include "cuda/flash_api.h"
#include "cuda/hopper/backward_sm90_kernel.cuh"
#include "cuda/hopper/backward_sm90_steps.cuh"
#include "cuda/hopper/sm90_ptx.cuh"
#include "cuda/hopper/wgmma_ops.cuh"
#include "cuda/ptx.cuh"
#include "cuda/scores.cuh"

namespace jax_flash::cuda {

template <int kHeadDim_>
struct Sm90WideBackwardConfig {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockN = 64;  // keys per CTA, shared by both consumers
  static constexpr int kBlockM = 64;  // queries per step
  static constexpr int kQStages = 2;  // dO has one stage: the shared-memory budget
  static constexpr int kConsumers = 2;
  static constexpr int kThreads = 128 * (1 + kConsumers);
  static constexpr int kChunks = kHeadDim / 64;
  static constexpr int kColumns = kHeadDim / kConsumers;  // of dK, dV, dQ per consumer
  static constexpr int kQueries = kBlockM / kConsumers;   // Sᵀ columns per consumer
  static constexpr int kKVBytes = kBlockN * kHeadDim * 2;
  static constexpr int kQBytes = kBlockM * kHeadDim * 2;
  static constexpr int kScoreBytes = kBlockN * kBlockM * 2;  // Pᵀ or dSᵀ, [key][query]
  static constexpr int kDqBytes = kBlockM * 64 * 4;          // one consumer's staging tile
  static constexpr int kStatBytes = kBlockM * 4;  // lse_log2 per Q stage, delta with dO
  // K/V full and empty; Q full and empty per stage; dO full and empty.
  static constexpr int kBarriers = 2 + 2 * kQStages + 2;
  static constexpr int kSmemBytes = 2 * kKVBytes + (kQStages + 1) * kQBytes +
                                    2 * 2 * kScoreBytes + kConsumers * kDqBytes +
                                    (kQStages + 1) * kStatBytes + 8 * kBarriers + 1024;
  static constexpr int kDqPasses = kColumns / 64;  // dQ tiles per consumer and step
  static constexpr int kProducerRegisters = kSm90BackwardProducerRegisters;
  static constexpr int kConsumerRegisters = kSm90BackwardConsumerRegisters;
  static_assert(kThreads == 384, "the register split is for one producer and two consumers");
  static_assert(kHeadDim == 256, "the column split is for head dim 256");
  static_assert(kBlockM == 64 && kBlockN == 64, "Pᵀ and dSᵀ rows are one 128-byte swizzle span");
  static_assert(kSmemBytes <= 227 * 1024, "Hopper's shared memory per block");
};

template <class Config, typename Element, bool kHasWindow>
__global__ void __launch_bounds__(Config::kThreads, 1)
    backward_wide_kernel_sm90(const __grid_constant__ AttentionParams p,
                              const __grid_constant__ Sm90BackwardMaps maps) {
  constexpr int kBlockM = Config::kBlockM, kBlockN = Config::kBlockN;
  constexpr int kQStages = Config::kQStages, kChunks = Config::kChunks;
  constexpr int kHeadDim = Config::kHeadDim, kQueries = Config::kQueries;
  constexpr bool kBF16 = ElementTraits<Element>::kIsBFloat16;
  using Traits = ElementTraits<Element>;

  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = shared_address(smem_raw);
  const uint32_t smem = (raw + 1023u) & ~1023u;
  // K and V as kChunks column chunks of [kBlockN][64]; Q stages then dO, each as chunks of
  // [kBlockM][64]; Pᵀ and dSᵀ per step parity; dQ staging; lse_log2 per Q stage, then delta;
  // barriers.
  const uint32_t k_smem = smem, v_smem = smem + Config::kKVBytes;
  auto q_smem = [&](int stage) { return smem + 2 * Config::kKVBytes + stage * Config::kQBytes; };
  const uint32_t do_smem = q_smem(kQStages);
  const uint32_t scores_base = do_smem + Config::kQBytes;
  auto p_smem = [&](int parity) { return scores_base + 2 * parity * Config::kScoreBytes; };
  auto ds_smem = [&](int parity) { return p_smem(parity) + Config::kScoreBytes; };
  const uint32_t dq_base = scores_base + 4 * Config::kScoreBytes;
  const uint32_t stats_base = dq_base + Config::kConsumers * Config::kDqBytes;
  auto lse_smem = [&](int stage) { return stats_base + stage * Config::kStatBytes; };
  const uint32_t delta_smem = lse_smem(kQStages);
  const uint32_t barriers = delta_smem + Config::kStatBytes;
  const uint32_t kv_full = barriers, kv_empty = barriers + 8;
  auto q_full = [&](int stage) { return barriers + 8 * (2 + stage); };
  auto q_empty = [&](int stage) { return barriers + 8 * (2 + kQStages + stage); };
  const uint32_t do_full = barriers + 8 * (2 + 2 * kQStages);
  const uint32_t do_empty = do_full + 8;

  const int thread = threadIdx.x;
  const Sm90BackwardUnits<kHasWindow> units =
      Sm90BackwardUnits<kHasWindow>::make(p, kBlockN);
  const int own_tiles = units.own_tiles();
  using Tile = Sm90BackwardTile<kBlockM>;

  if (thread == 0) {
    sm90::mbarrier_init(kv_full, 1);
    sm90::mbarrier_init(kv_empty, 4 * Config::kConsumers);  // one per consumer warp
    for (int stage = 0; stage < kQStages; ++stage) {
      sm90::mbarrier_init(q_full(stage), 1);
      sm90::mbarrier_init(q_empty(stage), 4 * Config::kConsumers);
    }
    sm90::mbarrier_init(do_full, 1);
    sm90::mbarrier_init(do_empty, 4 * Config::kConsumers);
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
            const int stage = step_count % kQStages, use = step_count / kQStages;
            const int head = tile.steps.head(step), query0 = tile.steps.query0(step);
            if (use > 0) sm90::mbarrier_wait(q_empty(stage), (use - 1) & 1);
            sm90::mbarrier_arrive_expect_tx(q_full(stage), Config::kQBytes + Config::kStatBytes);
            sm90::tma_load_tile<kChunks, kBlockM>(q_smem(stage), &maps.q, q_full(stage), query0,
                                                  head, tile.batch);
            load_step_stats(lse_smem(stage), &maps.lse_log2, q_full(stage), p, tile.batch, head,
                            query0);
            if (step_count > 0) sm90::mbarrier_wait(do_empty, (step_count - 1) & 1);
            sm90::mbarrier_arrive_expect_tx(do_full, Config::kQBytes + Config::kStatBytes);
            sm90::tma_load_tile<kChunks, kBlockM>(do_smem, &maps.dout, do_full, query0, head,
                                                  tile.batch);
            load_step_stats(delta_smem, &maps.delta, do_full, p, tile.batch, head, query0);
          });
    } else if (thread / 32 == 1 && !p.deterministic) {
      reduce_dq_sweep<Config::kConsumers, Config::kDqPasses, Config::kDqBytes, kBlockM>(
          units, p, dq_base, &maps.dq, thread & 31,
          [&](const Tile& tile, int step, int pass, int consumer) {
            return make_int4(Config::kColumns * consumer + 64 * pass, tile.steps.query0(step),
                             tile.steps.head(step), 0);
          });
    }
  } else {
    sm90::registers_increase<Config::kConsumerRegisters>();
    const int consumer = sm90::warp_uniform(warpgroup - 1);
    const int group_thread = thread & 127, lane = thread & 31, warp_in_group = group_thread >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int warp_key0 = 16 * warp_in_group;  // this warp's 16 keys (rows of Sᵀ)
    const int query_column0 = kQueries * consumer;  // this consumer's Sᵀ columns
    const int column0 = Config::kColumns * consumer;  // and dK/dV/dQ columns
    const KeyWindow window = KeyWindow::make(p);
    // This consumer's queries' lse_log2 (per Q stage) and delta.
    auto generic = [&](uint32_t address) {
      return reinterpret_cast<const float*>(smem_raw + (address - raw)) + query_column0;
    };
    const float* delta = generic(delta_smem);

    using sm90::opaque;
    // acc (keys x this consumer's queries) = `kv` (all keys) times its rows of `qd`.
    auto issue_keys_by_queries = [&](float* acc, uint32_t kv, uint32_t qd) {
      const uint64_t a0 = opaque(sm90::smem_descriptor(kv, 16, 1024));
      const uint64_t b0 = opaque(sm90::smem_descriptor(qd + query_column0 * 128, 16, 1024));
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        const uint32_t column = (kk % 4) * 32;
        wgmma_ss<kQueries, kBF16>(acc, a0 + (((kk / 4) * kBlockN * 128 + column) >> 4),
                                  b0 + (((kk / 4) * kBlockM * 128 + column) >> 4), kk > 0);
      }
    };
    // acc (keys x this consumer's columns) += `scores` (keys x queries) times `qd`'s columns.
    auto issue_accumulate = [&](float* acc, uint32_t scores, uint32_t qd) {
      const uint64_t a0 = opaque(sm90::smem_descriptor(scores, 16, 1024));
      const uint64_t b0 = opaque(sm90::smem_descriptor(qd + (column0 / 64) * kBlockM * 128,
                                                       kBlockM * 128, 1024));
#pragma unroll
      for (int kk = 0; kk < kBlockM / 16; ++kk)
        wgmma_ss<Config::kColumns, kBF16, 0, 1>(acc, a0 + ((kk * 32) >> 4),
                                                b0 + ((kk * 16 * 128) >> 4), 1);
    };

    int kv_count = 0, step_count = 0;  // as the producer's
    for (int own_tile = 0; own_tile < own_tiles; ++own_tile) {
      Tile tile;
      if (!units.tile(p, own_tile, tile)) continue;
      const QuerySteps<kBlockM>& steps = tile.steps;
      const int batch = tile.batch, key0 = tile.key0;
      float acc_dv[1][Config::kColumns / 8][4], acc_dk[1][Config::kColumns / 8][4];
      zero(acc_dv);
      zero(acc_dk);
      if (steps.count > 0) sm90::mbarrier_wait(kv_full, kv_count & 1);
      for (int step = 0; step < steps.count; ++step, ++step_count) {
        const int stage = step_count % kQStages, parity = step_count & 1;
        const int head = steps.head(step), query0 = steps.query0(step);
        const float* lse_log2 = generic(lse_smem(stage));

        sm90::mbarrier_wait(q_full(stage), (step_count / kQStages) & 1);
        sm90::mbarrier_wait(do_full, step_count & 1);
        float acc_s[1][kQueries / 8][4], acc_dp[1][kQueries / 8][4];
        sm90::wgmma_fence();
        issue_keys_by_queries(&acc_s[0][0][0], k_smem, q_smem(stage));
        issue_keys_by_queries(&acc_dp[0][0][0], v_smem, do_smem);
        sm90::wgmma_commit();
        sm90::wgmma_wait<0>();
        sm90::fence_registers<kQueries / 2>(&acc_s[0][0][0]);
        sm90::fence_registers<kQueries / 2>(&acc_dp[0][0][0]);

        probabilities_and_grads<kHasWindow, kBlockM, kBlockN>(
            acc_s, acc_dp, lse_log2, delta, p, window, batch, head, query0, key0,
            query0 + query_column0, key0 + warp_key0, lane);
        // This consumer's columns of Pᵀ and dSᵀ into the step's swizzled tiles; the other
        // consumer writes the rest. Those tiles were last read two steps ago, which the
        // barrier below of the previous step has ordered before these writes.
        const uint32_t p_tile = p_smem(parity), ds_tile = ds_smem(parity);
#pragma unroll
        for (int j = 0; j < kQueries / 8; ++j)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int row = warp_key0 + g + 8 * h;
            const int byte = (query_column0 + 8 * j + 2 * t) * 2;
            asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(swizzled_128b(p_tile, row, byte)),
                         "r"(Traits::pack(acc_s[0][j][2 * h], acc_s[0][j][2 * h + 1])));
            asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(swizzled_128b(ds_tile, row, byte)),
                         "r"(Traits::pack(acc_dp[0][j][2 * h], acc_dp[0][j][2 * h + 1])));
          }
        sm90::fence_shared_for_async();
        sm90::named_barrier_sync(1, 256);  // both consumers' columns are written

        sm90::wgmma_fence();
        issue_accumulate(&acc_dv[0][0][0], p_tile, do_smem);
        sm90::wgmma_commit();
        issue_accumulate(&acc_dk[0][0][0], ds_tile, q_smem(stage));
        sm90::wgmma_commit();
        sm90::wgmma_wait<1>();
        sm90::fence_registers<Config::kColumns / 2>(&acc_dv[0][0][0]);
        __syncwarp();
        if (lane == 0) sm90::mbarrier_arrive(do_empty);  // dO is free: its next load starts
        sm90::wgmma_wait<0>();
        sm90::fence_registers<Config::kColumns / 2>(&acc_dk[0][0][0]);
        __syncwarp();
        if (lane == 0) sm90::mbarrier_arrive(q_empty(stage));
        if (!p.deterministic) {
          // dQ[:, chunk] = dS K[:, chunk] for this consumer's two 64-column chunks: A is dSᵀ
          // read query-major, B is K read column-major, both transposed in the descriptors.
          // Both products are issued at once, so the second runs while the first is staged.
          constexpr int kPasses = Config::kDqPasses;
          float acc_dq[kPasses][1][8][4];
          const uint64_t a0 = opaque(sm90::smem_descriptor(ds_tile, 8192, 1024));
          sm90::wgmma_fence();
#pragma unroll
          for (int pass = 0; pass < kPasses; ++pass) {
            const uint64_t b0 = opaque(sm90::smem_descriptor(
                k_smem + (column0 / 64 + pass) * kBlockN * 128, kBlockN * 128, 1024));
#pragma unroll
            for (int kk = 0; kk < kBlockN / 16; ++kk)
              wgmma_ss<64, kBF16, 1, 1>(&acc_dq[pass][0][0][0], a0 + ((kk * 16 * 128) >> 4),
                                        b0 + ((kk * 16 * 128) >> 4), kk > 0);
            sm90::wgmma_commit();
          }
          static_assert(kPasses == 2, "one product in flight while the other is staged");
          sm90::wgmma_wait<1>();
          sm90::fence_registers<32>(&acc_dq[0][0][0][0]);
          stage_dq_tile(acc_dq[0], dq_base + consumer * Config::kDqBytes, consumer, group_thread);
          sm90::wgmma_wait<0>();
          sm90::fence_registers<32>(&acc_dq[1][0][0][0]);
          stage_dq_tile(acc_dq[1], dq_base + consumer * Config::kDqBytes, consumer, group_thread);
        }
      }
      // The last step waited for all of this warp's products: K and V may be replaced while
      // dK and dV are stored.
      if (steps.count > 0) {
        if (lane == 0) sm90::mbarrier_arrive(kv_empty);
        ++kv_count;
      }
      // This consumer's columns of dK and dV for this warp's keys, summed over the group.
      store_dk_dv<Element>(acc_dk, acc_dv, p, batch, tile.head_kv, key0 + warp_key0, column0,
                           tile.valid_keys - warp_key0, lane);
    }
  }
}

}  // namespace jax_flash::cuda
