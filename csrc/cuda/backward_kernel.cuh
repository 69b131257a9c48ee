// FlashAttention-2 backward for sm80+, main kernel: one CTA per (key block, kv head, batch)
// keeps K and V of its key block in shared memory and dK, dV in registers, and sweeps every
// (query head of the GQA group, query block) that can see the key block. Looping over the
// group inside the CTA sums dK and dV over it with no workspace and no atomics.
//
// Per query block, in three phases with their own warp layouts:
//   A  Sᵀ = K Qᵀ and dPᵀ = V dOᵀ (keys x queries); Pᵀ = exp(Sᵀ - lse) recomputed from the
//      forward's lse; dSᵀ = Pᵀ (dPᵀ - delta) (softcap') scale. Pᵀ and dSᵀ go to shared memory
//      as 16-bit values.
//   B  dV += Pᵀ dO on half the warps and dK += dSᵀ Q on the other half (keys x head_dim),
//      accumulators in registers. Each warp owns a tile of one of the two, twice as wide as
//      if every warp held a piece of both: each fragment read from shared memory feeds
//      twice the mmas, and shared-memory bandwidth is what bounds this kernel.
//   C  dQ_partial = dS K (queries x head_dim), added into a float32 workspace with atomics.
//      (Running C before B, so that the reductions drain during B, measured 4-5% slower at
//      8k on the H100.)
// Q, dO, lse and delta of the next query block are copied while the current one computes
// (double buffered where shared memory allows, else during phase C).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/attention_params.h"
#include "cuda/dropout.cuh"
#include "cuda/backward_steps.cuh"
#include "cuda/element.cuh"
#include "cuda/fragments.cuh"
#include "cuda/flash_api.h"
#include "cuda/ptx.cuh"
#include "cuda/scores.cuh"
#include "cuda/segments.cuh"
#include "cuda/smem_tile.cuh"
#include "cuda/warp_mma.cuh"

namespace jax_flash::cuda {

template <int kHeadDim_, int kBlockN_, int kBlockM_, int kWarps_, int kWarpsAlongKeysA_,
          int kWarpsAlongKeysB_, int kWarpsAlongQueriesC_, int kStages_>
struct BackwardTiles {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockN = kBlockN_;  // keys per CTA
  static constexpr int kBlockM = kBlockM_;  // queries per step
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kStages = kStages_;  // buffers for Q, dO, lse, delta
  static constexpr int kWarpsAlongKeysA = kWarpsAlongKeysA_;
  static constexpr int kWarpsAlongKeysB = kWarpsAlongKeysB_;
  static constexpr int kWarpsAlongQueriesC = kWarpsAlongQueriesC_;

  // Phase A: warp tile of Sᵀ / dPᵀ, keys x queries.
  static constexpr int kKeysA = kBlockN / kWarpsAlongKeysA;
  static constexpr int kQueriesA = kBlockM / (kWarps / kWarpsAlongKeysA);
  static constexpr int kMTilesA = kKeysA / 16, kNTilesA = kQueriesA / 8;
  // Phase B: warp tile of dV (warps [0, kWarps / 2)) or dK (the rest), keys x head_dim;
  // kWarpsAlongKeysB of each half's warps along the keys.
  static constexpr int kKeysB = kBlockN / kWarpsAlongKeysB;
  static constexpr int kColsB = kHeadDim / (kWarps / 2 / kWarpsAlongKeysB);
  static constexpr int kMTilesB = kKeysB / 16, kNTilesB = kColsB / 8;
  // Phase C: warp tile of dQ, queries x head_dim.
  static constexpr int kQueriesC = kBlockM / kWarpsAlongQueriesC;
  static constexpr int kColsC = kHeadDim / (kWarps / kWarpsAlongQueriesC);
  static constexpr int kMTilesC = kQueriesC / 16, kNTilesC = kColsC / 8;

  using KVTile = SwizzledTile<kBlockN, kHeadDim>;  // K, V: [key][d]
  using QTile = SwizzledTile<kBlockM, kHeadDim>;   // Q, dO: [query][d]
  using PTile = SwizzledTile<kBlockN, kBlockM>;    // Pᵀ, dSᵀ: [key][query]

  // Shared memory, in this order: K, V, Pᵀ, dSᵀ, then per stage Q, dO, lse, delta and the
  // queries' segment ids.
  static constexpr int kStageBytes = 2 * QTile::kBytes + 3 * kBlockM * 4;
  static constexpr int kSmemBytes = 2 * KVTile::kBytes + 2 * PTile::kBytes + kStages * kStageBytes;

  static_assert(kMTilesA >= 1 && kNTilesA % 2 == 0 && kKeysA % 16 == 0, "phase A warp tile");
  static_assert(kMTilesB >= 1 && kNTilesB % 2 == 0 && kKeysB % 16 == 0, "phase B warp tile");
  static_assert(kMTilesC >= 1 && kNTilesC % 2 == 0 && kQueriesC % 16 == 0, "phase C warp tile");
  static_assert(kStages == 1 || kStages == 2, "single or double buffered");
};

// Tile shapes per head-dim class (8 warps; one CTA per SM, limited by registers), for GPUs
// with the 227 KB of shared memory per CTA of sm90: 65 KB, 162 KB, 161 KB, 209 KB. Head dim
// 64 takes 128 queries per step (wider phase A tiles: fewer shared-memory bytes per mma);
// head dim 256 takes 64 keys per CTA and double buffers Q and dO.
template <int kHeadDimClass> struct BackwardConfig;
template <> struct BackwardConfig<32> : BackwardTiles<32, 128, 64, 8, 4, 4, 4, 2> {};
template <> struct BackwardConfig<64> : BackwardTiles<64, 128, 128, 8, 4, 4, 4, 2> {};
template <> struct BackwardConfig<128> : BackwardTiles<128, 128, 64, 8, 4, 4, 2, 2> {};
template <> struct BackwardConfig<256> : BackwardTiles<256, 64, 64, 8, 4, 2, 2, 2> {};

// Where the GPU has less shared memory (sm80: 163 KB, sm86/89: 99 KB), the launcher falls
// back to these: head dim 64 with 64 queries per step (97 KB), head dim 256 with single
// buffered Q and dO (145 KB). Head dim 128 has no smaller shape.
template <int kHeadDimClass> struct BackwardSmallSmem { using Config = BackwardConfig<kHeadDimClass>; };
template <> struct BackwardSmallSmem<64> { using Config = BackwardTiles<64, 128, 64, 8, 4, 4, 4, 2>; };
template <> struct BackwardSmallSmem<256> { using Config = BackwardTiles<256, 64, 64, 8, 4, 2, 2, 1>; };

// Variants as in the forward kernel (kDropout also takes every mask).
template <class Config, typename Element, bool kHasWindow, bool kHasSegments, bool kDropout>
__global__ void __launch_bounds__(Config::kThreads, 1)
    backward_kernel_sm80(const __grid_constant__ AttentionParams p,
                         const __grid_constant__ BackwardWorkspace workspace,
                         const bool vectorized) {
  using KVTile = typename Config::KVTile;
  using QTile = typename Config::QTile;
  using PTile = typename Config::PTile;
  using Traits = ElementTraits<Element>;
  constexpr int kBlockM = Config::kBlockM, kBlockN = Config::kBlockN;
  constexpr int kHeadDim = Config::kHeadDim;
  constexpr bool kBF16 = Traits::kIsBFloat16;

  extern __shared__ __align__(128) unsigned char smem[];
  Element* k_smem = reinterpret_cast<Element*>(smem);
  Element* v_smem = k_smem + KVTile::kElements;
  Element* p_smem = v_smem + KVTile::kElements;   // Pᵀ
  Element* ds_smem = p_smem + PTile::kElements;   // dSᵀ
  unsigned char* stages = reinterpret_cast<unsigned char*>(ds_smem + PTile::kElements);
  auto q_smem = [&](int s) { return reinterpret_cast<Element*>(stages + s * Config::kStageBytes); };
  auto do_smem = [&](int s) { return q_smem(s) + QTile::kElements; };
  auto lse_log2_smem = [&](int s) {
    return reinterpret_cast<float*>(do_smem(s) + QTile::kElements);
  };
  auto delta_smem = [&](int s) { return lse_log2_smem(s) + kBlockM; };
  auto q_ids_smem = [&](int s) { return reinterpret_cast<int32_t*>(delta_smem(s) + kBlockM); };

  const int thread = threadIdx.x, lane = thread & 31, warp = thread >> 5;
  const int key_block = blockIdx.x, head_kv = blockIdx.y, batch = blockIdx.z;
  const int seqlen_q = static_cast<int>(p.seqlen_q), seqlen_k = static_cast<int>(p.seqlen_k);
  const int head_dim = static_cast<int>(p.head_dim);
  const int group_size = static_cast<int>(p.num_heads / p.num_heads_kv);
  const int key0 = key_block * kBlockN;
  const int valid_keys = min(kBlockN, seqlen_k - key0);

  const bool has_segments = kHasSegments && (!kDropout || p.has_segment_ids());
  IndexRange queries =
      has_segments ? queries_of_key_block<Config::kThreads, kHasSegments>(p, batch, key0, valid_keys)
                   : queries_of_key_block<Config::kThreads, false>(p, batch, key0, valid_keys);
  // Dropout draws come in 16-query chunks: start at one (the masks hide the extra rows).
  if (kDropout && !queries.empty()) queries.begin &= ~int64_t{15};
  auto q_ids = [&] { return p.q_segment_ids + batch * p.seqlen_q; };
  auto kv_ids = [&] { return p.kv_segment_ids + batch * p.seqlen_k + key0; };
  const QuerySteps<kBlockM> steps = QuerySteps<kBlockM>::make(queries, head_kv, group_size);
  const int num_steps = steps.count;
  auto load_step = [&](int step, int s) {
    const int head = steps.head(step), query0 = steps.query0(step);
    const int rows = min(kBlockM, seqlen_q - query0);
    const Element* q = static_cast<const Element*>(p.q) + batch * p.q_strides.batch +
                       query0 * p.q_strides.row + head * p.q_strides.head;
    const Element* dout = static_cast<const Element*>(p.dout) + batch * p.out_strides.batch +
                          query0 * p.out_strides.row + head * p.out_strides.head;
    load_tile<QTile, Config::kThreads>(q_smem(s), q, p.q_strides.row, rows, head_dim, vectorized,
                                       thread);
    load_tile<QTile, Config::kThreads>(do_smem(s), dout, p.out_strides.row, rows, head_dim,
                                       vectorized, thread);
    // Rows past seqlen_q get lse = delta = 0: their Q and dO rows are zero, so every
    // contribution they make below is exactly zero.
    const int64_t stats = workspace.stats_index(batch * p.num_heads + head, query0);
    load_row_vector<kBlockM, Config::kThreads>(lse_log2_smem(s), workspace.lse_log2 + stats, rows,
                                               thread);
    load_row_vector<kBlockM, Config::kThreads>(delta_smem(s), workspace.delta + stats, rows,
                                               thread);
    if (has_segments)
      load_row_vector<kBlockM, Config::kThreads>(q_ids_smem(s), q_ids() + query0, rows, thread);
  };

  {
    const Element* k = static_cast<const Element*>(p.k) + batch * p.k_strides.batch +
                       key0 * p.k_strides.row + head_kv * p.k_strides.head;
    const Element* v = static_cast<const Element*>(p.v) + batch * p.v_strides.batch +
                       key0 * p.v_strides.row + head_kv * p.v_strides.head;
    load_tile<KVTile, Config::kThreads>(k_smem, k, p.k_strides.row, valid_keys, head_dim,
                                        vectorized, thread);
    load_tile<KVTile, Config::kThreads>(v_smem, v, p.v_strides.row, valid_keys, head_dim,
                                        vectorized, thread);
  }
  if (num_steps > 0) load_step(0, 0);
  cp_async_commit();

  const KeyWindow window = KeyWindow::make(p);
  const uint32_t k_base = shared_address(k_smem), v_base = shared_address(v_smem);
  const uint32_t p_base = shared_address(p_smem), ds_base = shared_address(ds_smem);

  // Warp tile origins of the three phases.
  const int key0_a = (warp % Config::kWarpsAlongKeysA) * Config::kKeysA;
  const int query0_a = (warp / Config::kWarpsAlongKeysA) * Config::kQueriesA;
  const bool dk_warp = warp >= Config::kWarps / 2;
  const int warp_b = dk_warp ? warp - Config::kWarps / 2 : warp;
  const int key0_b = (warp_b % Config::kWarpsAlongKeysB) * Config::kKeysB;
  const int col0_b = (warp_b / Config::kWarpsAlongKeysB) * Config::kColsB;
  // Phase B operands of this warp: Pᵀ and dO for dV, dSᵀ and Q for dK.
  const uint32_t a_base_b = dk_warp ? ds_base : p_base;
  const int query0_c = (warp % Config::kWarpsAlongQueriesC) * Config::kQueriesC;
  const int col0_c = (warp / Config::kWarpsAlongQueriesC) * Config::kColsC;
  const int g = lane >> 2, t = lane & 3;
  // The id range of the keys of this warp's phase-A rows (segment variant only).
  IdRange warp_key_ids{0, 0};
  if (has_segments)
    warp_key_ids = warp_ids_range<Config::kKeysA>(kv_ids() + key0_a, valid_keys - key0_a, lane);

  float acc_dkv[Config::kMTilesB][Config::kNTilesB][4];  // dK or dV, see dk_warp
  zero(acc_dkv);

  for (int step = 0; step < num_steps; ++step) {
    const int s = Config::kStages == 2 ? (step & 1) : 0;
    const int head = steps.head(step), query0 = steps.query0(step);
    // Step `step` has landed and every warp is done with the previous step's buffers
    // (including Pᵀ and dSᵀ, which phase A below overwrites).
    cp_async_wait<0>();
    __syncthreads();
    if (Config::kStages == 2 && step + 1 < num_steps) load_step(step + 1, s ^ 1);
    cp_async_commit();

    // ---- Phase A: Pᵀ and dSᵀ for this warp's keys x queries.
    const uint32_t q_base = shared_address(q_smem(s)), do_base = shared_address(do_smem(s));
    float acc_s[Config::kMTilesA][Config::kNTilesA][4];
    float acc_dp[Config::kMTilesA][Config::kNTilesA][4];
    zero(acc_s);
    zero(acc_dp);
    warp_gemm<Config::kMTilesA, Config::kNTilesA, kHeadDim, KVTile, KOrder::kContiguous, QTile,
              KOrder::kContiguous, kBF16>(acc_s, k_base, key0_a, q_base, query0_a, lane);
    warp_gemm<Config::kMTilesA, Config::kNTilesA, kHeadDim, KVTile, KOrder::kContiguous, QTile,
              KOrder::kContiguous, kBF16>(acc_dp, v_base, key0_a, do_base, query0_a, lane);

    // lse (in log2 units) and delta of the queries (columns) this lane touches.
    float lse_log2[Config::kNTilesA][2], delta[Config::kNTilesA][2];
#pragma unroll
    for (int j = 0; j < Config::kNTilesA; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = query0_a + 8 * j + 2 * t + e;
        lse_log2[j][e] = lse_log2_smem(s)[col];
        delta[j][e] = delta_smem(s)[col];
      }

    const ScoreTransform transform = ScoreTransform::make(p, batch, head);
    const bool masked = window.tile_needs_mask<kHasWindow>(
        query0, min(query0 + kBlockM, seqlen_q), key0, key0 + kBlockN);
    // Ids differ somewhere between the warp's keys and queries: compare each element.
    bool segment_masked = false;
    if (has_segments)
      segment_masked = !warp_key_ids.single_id_with(warp_ids_range<Config::kQueriesA>(
          q_ids_smem(s) + query0_a, Config::kQueriesA, lane));
    KeepMask<Config::kMTilesA, Config::kNTilesA> keep;
    if constexpr (kDropout)
      keep = keep_mask_keys_by_queries<Config::kMTilesA, Config::kNTilesA>(
          DropoutDraws::make(p, batch, head), key0 + key0_a, query0 + query0_a, lane);
    // Most tiles need neither the score transform nor the mask: they take a short path
    // with no per-element index arithmetic or selects (a uniform branch per tile).
    auto probabilities_and_grads = [&](auto general_tag) {
      constexpr bool kGeneral = decltype(general_tag)::value;
#pragma unroll
      for (int i = 0; i < Config::kMTilesA; ++i)
#pragma unroll
        for (int j = 0; j < Config::kNTilesA; ++j)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            float prob[2], grad[2];
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int key = key0 + key0_a + 16 * i + g + 8 * h;
              const int query = query0 + query0_a + 8 * j + 2 * t + e;
              // (Keys past the block's end are masked by the window and have no id to read.)
              const bool hidden = kGeneral && kHasSegments && segment_masked &&
                                  key - key0 < valid_keys &&
                                  kv_ids()[key - key0] != q_ids_smem(s)[query - query0];
              const float keep_factor = keep.keeps(i, j, 2 * h + e) ? p.dropout_scale : 0.0f;
              const float2 pg = probability_and_grad<kGeneral, kHasWindow, kDropout>(
                  acc_s[i][j][2 * h + e], acc_dp[i][j][2 * h + e], lse_log2[j][e], delta[j][e],
                  transform, window, masked, hidden, query, key, keep_factor);
              prob[e] = pg.x;
              grad[e] = pg.y;
            }
            const int row = key0_a + 16 * i + g + 8 * h, col = query0_a + 8 * j + 2 * t;
            *reinterpret_cast<uint32_t*>(p_smem + PTile::offset(row, col)) = Traits::pack(prob[0], prob[1]);
            *reinterpret_cast<uint32_t*>(ds_smem + PTile::offset(row, col)) = Traits::pack(grad[0], grad[1]);
          }
    };
    if (transform.plain && !masked && !segment_masked) {
      probabilities_and_grads(std::false_type{});
    } else {
      probabilities_and_grads(std::true_type{});
    }
    __syncthreads();

    // ---- Phase B: dV += Pᵀ dO or dK += dSᵀ Q.
    warp_gemm<Config::kMTilesB, Config::kNTilesB, kBlockM, PTile, KOrder::kContiguous, QTile,
              KOrder::kStrided, kBF16>(acc_dkv, a_base_b, key0_b, dk_warp ? q_base : do_base,
                                       col0_b, lane);
    if constexpr (Config::kStages == 1) {
      // Q and dO are free once every warp is past phase B: copy the next step during C.
      __syncthreads();
      if (step + 1 < num_steps) load_step(step + 1, 0);
      cp_async_commit();
    }

    // ---- Phase C: dQ += dS K, accumulated in float32 across key blocks by atomics (in a
    // deterministic call, backward_dq_kernel.cuh computes dQ instead).
    if (p.deterministic) continue;
    float acc_dq[Config::kMTilesC][Config::kNTilesC][4];
    zero(acc_dq);
    warp_gemm<Config::kMTilesC, Config::kNTilesC, kBlockN, PTile, KOrder::kStrided, KVTile,
              KOrder::kStrided, kBF16>(acc_dq, ds_base, query0_c, k_base, col0_c, lane);
    // 32-bit offsets within one (batch, head): the launcher checks seqlen_q * head_dim fits.
    float* dq_accum = workspace.dq_accum + (batch * p.num_heads + head) * p.seqlen_q * p.head_dim +
                      (query0 + query0_c) * head_dim + col0_c;
    atomic_add_tile(acc_dq, dq_accum, head_dim, seqlen_q - query0 - query0_c, head_dim - col0_c,
                    head_dim % 2 == 0, lane);
  }
  cp_async_wait<0>();

  // dK and dV of this key block, summed over the group; zero if no query sees these keys.
  const TensorStrides& strides = dk_warp ? p.k_strides : p.v_strides;
  Element* dkv = static_cast<Element*>(dk_warp ? p.dk : p.dv) + batch * strides.batch +
                 (key0 + key0_b) * strides.row + head_kv * strides.head + col0_b;
  store_tile<Element>(acc_dkv, dkv, strides.row, valid_keys - key0_b, head_dim - col0_b,
                      vectorized, lane);
}

}  // namespace jax_flash::cuda
