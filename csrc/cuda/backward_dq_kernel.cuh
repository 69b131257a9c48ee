// dQ for deterministic=True: one CTA per (query block, head, batch) sweeps the key blocks
// its rows can see, recomputes P and dS for each, and accumulates dQ in registers. No two
// CTAs write the same dQ element, so the result does not depend on the order in which
// thread blocks run (the main backward kernel, which owns dK and dV per key block, skips
// its atomic dQ phase in such a call). The price is Sᵀ and dPᵀ computed a second time: two
// more products per tile than the atomic path's five.
//
// Per key block, per warp (16 query rows each): S = Q Kᵀ and dP = dO Vᵀ; P = exp(S - lse)
// from the forward's lse; dS = P (dP - delta) (softcap') scale, exactly the main kernel's
// arithmetic; dQ += dS K with dS taken from registers. K and V are double buffered.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/attention_params.h"
#include "cuda/dropout.cuh"
#include "cuda/element.cuh"
#include "cuda/fragments.cuh"
#include "cuda/flash_api.h"
#include "cuda/ptx.cuh"
#include "cuda/scores.cuh"
#include "cuda/segments.cuh"
#include "cuda/smem_tile.cuh"
#include "cuda/warp_mma.cuh"

namespace jax_flash::cuda {

template <int kHeadDim_, int kBlockN_>
struct DqTiles {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 64;  // query rows per CTA: 16 per warp
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kNTiles = kBlockN / 8;
  static constexpr int kDTiles = kHeadDim / 8;
  using QTile = SwizzledTile<kBlockM, kHeadDim>;
  using KVTile = SwizzledTile<kBlockN, kHeadDim>;
  // Q and dO, then two stages of K, V and the keys' segment ids.
  static constexpr int kSmemBytes = 2 * QTile::kBytes + 2 * (2 * KVTile::kBytes + kBlockN * 4);
};

// 64 keys per step up to head dim 128 (96 KB at 128, so sm86's 99 KB holds it); 32 at head
// dim 256, so that it fits the A100's 163 KB (128 KB).
template <int kHeadDimClass> struct DqConfig : DqTiles<kHeadDimClass, 64> {};
template <> struct DqConfig<256> : DqTiles<256, 32> {};

// Variants as in the forward kernel (kDropout also takes every mask).
template <class Config, typename Element, bool kHasWindow, bool kHasSegments, bool kDropout>
__global__ void __launch_bounds__(Config::kThreads, 1)
    backward_dq_kernel_sm80(const __grid_constant__ AttentionParams p,
                            const __grid_constant__ BackwardWorkspace workspace,
                            const bool vectorized) {
  using QTile = typename Config::QTile;
  using KVTile = typename Config::KVTile;
  constexpr int kBlockM = Config::kBlockM, kBlockN = Config::kBlockN;
  constexpr int kNTiles = Config::kNTiles, kDTiles = Config::kDTiles;
  constexpr bool kBF16 = ElementTraits<Element>::kIsBFloat16;

  extern __shared__ __align__(128) unsigned char smem[];
  Element* q_smem = reinterpret_cast<Element*>(smem);
  Element* do_smem = q_smem + QTile::kElements;
  Element* kv_smem = do_smem + QTile::kElements;  // stage s: K at 2s, V at 2s+1
  auto k_smem = [&](int stage) { return kv_smem + (2 * stage) * KVTile::kElements; };
  auto v_smem = [&](int stage) { return kv_smem + (2 * stage + 1) * KVTile::kElements; };
  int32_t* kv_ids_smem = reinterpret_cast<int32_t*>(kv_smem + 4 * KVTile::kElements);

  const int thread = threadIdx.x, lane = thread & 31, warp = thread >> 5;
  const int g = lane >> 2, t = lane & 3;
  // The longest query blocks first: with a causal mask those are the last ones.
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int head = blockIdx.y, batch = blockIdx.z;
  const int head_kv = head / static_cast<int>(p.num_heads / p.num_heads_kv);
  const int seqlen_q = static_cast<int>(p.seqlen_q), seqlen_k = static_cast<int>(p.seqlen_k);
  const int head_dim = static_cast<int>(p.head_dim);
  const int row0 = m_block * kBlockM;
  const int valid_rows = min(kBlockM, seqlen_q - row0);
  Element* dq = static_cast<Element*>(p.dq) + batch * p.q_strides.batch +
                row0 * p.q_strides.row + head * p.q_strides.head;

  const bool has_segments = kHasSegments && (!kDropout || p.has_segment_ids());
  IndexRange keys =
      has_segments ? keys_of_query_block<Config::kThreads, kHasSegments>(p, batch, row0, valid_rows)
                   : keys_of_query_block<Config::kThreads, false>(p, batch, row0, valid_rows);
  if (kDropout && !keys.empty()) keys.begin &= ~int64_t{31};  // whole 32-key draw chunks
  auto q_ids = [&] { return p.q_segment_ids + batch * p.seqlen_q + row0; };
  auto kv_ids = [&] { return p.kv_segment_ids + batch * p.seqlen_k; };
  if (keys.empty()) {  // no row of this block sees a key: dQ = 0
    for (int i = thread; i < valid_rows * head_dim; i += Config::kThreads)
      dq[(i / head_dim) * p.q_strides.row + i % head_dim] = ElementTraits<Element>::from_float(0.0f);
    return;
  }
  const int key_begin = static_cast<int>(keys.begin);
  const int num_key_blocks = (static_cast<int>(keys.end) - key_begin + kBlockN - 1) / kBlockN;

  const Element* k = static_cast<const Element*>(p.k) + batch * p.k_strides.batch +
                     head_kv * p.k_strides.head;
  const Element* v = static_cast<const Element*>(p.v) + batch * p.v_strides.batch +
                     head_kv * p.v_strides.head;
  auto load_kv = [&](int block, int stage) {
    const int key0 = key_begin + block * kBlockN, rows = min(kBlockN, seqlen_k - key0);
    load_tile<KVTile, Config::kThreads>(k_smem(stage), k + key0 * p.k_strides.row,
                                        p.k_strides.row, rows, head_dim, vectorized, thread);
    load_tile<KVTile, Config::kThreads>(v_smem(stage), v + key0 * p.v_strides.row,
                                        p.v_strides.row, rows, head_dim, vectorized, thread);
    if (has_segments)
      load_row_vector<kBlockN, Config::kThreads>(kv_ids_smem + stage * kBlockN, kv_ids() + key0,
                                                 rows, thread);
  };
  const Element* q = static_cast<const Element*>(p.q) + batch * p.q_strides.batch +
                     row0 * p.q_strides.row + head * p.q_strides.head;
  const Element* dout = static_cast<const Element*>(p.dout) + batch * p.out_strides.batch +
                        row0 * p.out_strides.row + head * p.out_strides.head;
  load_tile<QTile, Config::kThreads>(q_smem, q, p.q_strides.row, valid_rows, head_dim,
                                     vectorized, thread);
  load_tile<QTile, Config::kThreads>(do_smem, dout, p.out_strides.row, valid_rows, head_dim,
                                     vectorized, thread);
  load_kv(0, 0);
  cp_async_commit();

  const ScoreTransform transform = ScoreTransform::make(p, batch, head);
  const KeyWindow window = KeyWindow::make(p);
  const int warp_row0 = warp * 16;
  // lse (log2 units) and delta of this lane's rows g and g + 8; rows past the end get
  // lse = +inf, so that their P, and with it everything they add, is 0.
  float lse_log2[2], delta[2];
  const int64_t stats = workspace.stats_index(batch * p.num_heads + head, row0 + warp_row0);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = warp_row0 + g + 8 * h;
    lse_log2[h] = row < valid_rows ? workspace.lse_log2[stats + g + 8 * h] : INFINITY;
    delta[h] = row < valid_rows ? workspace.delta[stats + g + 8 * h] : 0.0f;
  }
  IdRange warp_row_ids{0, 0};
  if (has_segments)
    warp_row_ids = warp_ids_range<16>(q_ids() + warp_row0, valid_rows - warp_row0, lane);
  DropoutDraws draws{};
  if constexpr (kDropout) draws = DropoutDraws::make(p, batch, head);

  float acc_dq[1][kDTiles][4];
  zero(acc_dq);
  for (int block = 0; block < num_key_blocks; ++block) {
    const int stage = block & 1;
    const int key0 = key_begin + block * kBlockN;
    // This block has landed, and every warp is done with the stage the next copy reuses.
    cp_async_wait<0>();
    __syncthreads();
    if (block + 1 < num_key_blocks) load_kv(block + 1, stage ^ 1);
    cp_async_commit();

    float acc_s[1][kNTiles][4], acc_dp[1][kNTiles][4];
    zero(acc_s);
    zero(acc_dp);
    warp_gemm<1, kNTiles, Config::kHeadDim, QTile, KOrder::kContiguous, KVTile,
              KOrder::kContiguous, kBF16>(acc_s, shared_address(q_smem), warp_row0,
                                          shared_address(k_smem(stage)), 0, lane);
    warp_gemm<1, kNTiles, Config::kHeadDim, QTile, KOrder::kContiguous, KVTile,
              KOrder::kContiguous, kBF16>(acc_dp, shared_address(do_smem), warp_row0,
                                          shared_address(v_smem(stage)), 0, lane);

    const bool masked =
        window.tile_needs_mask<kHasWindow>(row0, row0 + valid_rows, key0, key0 + kBlockN);
    bool segment_masked = false;
    const int32_t* block_ids = kv_ids_smem + stage * kBlockN;
    if (has_segments)
      segment_masked =
          !warp_row_ids.single_id_with(warp_ids_range<kBlockN>(block_ids, kBlockN, lane));
    KeepMask<1, kNTiles> keep;
    if constexpr (kDropout)
      keep = keep_mask_queries_by_keys<1, kNTiles>(draws, row0 + warp_row0, key0, lane);
    // Tiles that need neither the transform nor a mask take the short path (a uniform
    // branch per warp), as in the key-block kernel.
    auto score_grads = [&](auto general_tag) {
      constexpr bool kGeneral = decltype(general_tag)::value;
#pragma unroll
      for (int j = 0; j < kNTiles; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int h = c >> 1, row = warp_row0 + g + 8 * h, col = 8 * j + 2 * t + (c & 1);
          const bool hidden = kGeneral && kHasSegments && segment_masked && row < valid_rows &&
                              q_ids()[row] != block_ids[col];
          const float keep_factor = keep.keeps(0, j, c) ? p.dropout_scale : 0.0f;
          acc_s[0][j][c] = probability_and_grad<kGeneral, kHasWindow, kDropout>(  // dS
              acc_s[0][j][c], acc_dp[0][j][c], lse_log2[h], delta[h], transform, window, masked,
              hidden, row0 + row, key0 + col, keep_factor).y;
        }
    };
    if (transform.plain && !masked && !segment_masked) {
      score_grads(std::false_type{});
    } else {
      score_grads(std::true_type{});
    }
    // dQ += dS K, with dS from registers.
    warp_gemm_a_registers<1, kDTiles, kBlockN, Element, KVTile, KOrder::kStrided>(
        acc_dq, acc_s, shared_address(k_smem(stage)), 0, lane);
  }
  cp_async_wait<0>();
  store_tile<Element>(acc_dq, dq + warp_row0 * p.q_strides.row, p.q_strides.row,
                      valid_rows - warp_row0, head_dim, vectorized, lane);
}

}  // namespace jax_flash::cuda
