// FlashAttention-2 forward for sm80+: one CTA per (query block, head, batch) sweeps the
// key blocks its rows can see, with the online softmax in registers.
//
// Per key block: S = Q Kᵀ on tensor cores (Q and K via ldmatrix from swizzled shared
// tiles), optional softcap / ALiBi / mask, running max and sum update, P = exp2(...) packed
// to 16 bits in registers, O += P V. Two copy pipelines, chosen per head-dim class:
//   kStages = 2: K and V double buffered; the copy of block j+1 runs while block j is
//                computed (one barrier per block).
//   kStages = 1: one K and one V buffer, staggered; V_j is copied during S = Q K_jᵀ and the
//                softmax, K_{j+1} during O += P V_j (two barriers per block, half the shared
//                memory), which lets large head dims take twice as many keys per step.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "common/attention_params.h"
#include "cuda/dropout.cuh"
#include "cuda/element.cuh"
#include "cuda/fragments.cuh"
#include "cuda/online_softmax.cuh"
#include "cuda/flash_api.h"
#include "cuda/ptx.cuh"
#include "cuda/scores.cuh"
#include "cuda/segments.cuh"
#include "cuda/smem_tile.cuh"
#include "cuda/warp_mma.cuh"

namespace jax_flash::cuda {

template <int kHeadDim_, int kBlockM_, int kBlockN_, int kWarps_, int kStages_>
struct ForwardTiles {
  static constexpr int kHeadDim = kHeadDim_;  // head_dim class; smaller head dims are zero padded
  static constexpr int kBlockM = kBlockM_;    // query rows per CTA
  static constexpr int kBlockN = kBlockN_;    // keys per pipeline step
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kMTiles = kBlockM / (16 * kWarps);  // 16-row mma tiles per warp
  static constexpr int kNTiles = kBlockN / 8;              // 8-key column tiles of S
  static constexpr int kDTiles = kHeadDim / 8;             // 8-column tiles of O
  static constexpr int kStages = kStages_;
  using QTile = SwizzledTile<kBlockM, kHeadDim>;
  using KVTile = SwizzledTile<kBlockN, kHeadDim>;
  // Q, then per stage K and V, then per stage the key block's segment ids.
  static constexpr int kSmemBytes = QTile::kBytes + kStages * (2 * KVTile::kBytes + kBlockN * 4);
  // 4-warp CTAs leave room for two per SM (registers cap at 255 either way).
  static constexpr int kMinBlocksPerSm = kWarps == 4 ? 2 : 1;
  static_assert(kMTiles >= 1 && kBlockM % (16 * kWarps) == 0, "whole mma tiles per warp");
  static_assert(kBlockN % 16 == 0, "P V steps over 16 keys");
  static_assert(kStages == 1 || kStages == 2, "staggered or double-buffered K/V");
};

// Tile shapes per head-dim class. Warps own 32 query rows where registers allow (each K/V
// fragment read from shared memory feeds two mmas); head dim 256 needs 16 rows per warp to
// fit O in registers, and takes 64 keys per step with the staggered pipeline. Every class
// runs 4-warp CTAs, two per SM (registers cap at 255 either way): head dim 256 as 64 query
// rows with 96 KB of shared memory rather than one 8-warp CTA of 128 rows, so that one
// CTA's barriers and softmax overlap the other's mmas. Head dim 64 takes 128 keys per
// step: half the barriers and softmax bookkeeping per key. Shared memory: 24 KB, 80 KB,
// 96 KB, 96 KB.
template <int kHeadDimClass> struct ForwardConfig;
template <> struct ForwardConfig<32> : ForwardTiles<32, 128, 64, 4, 2> {};
template <> struct ForwardConfig<64> : ForwardTiles<64, 128, 128, 4, 2> {};
template <> struct ForwardConfig<128> : ForwardTiles<128, 128, 64, 4, 2> {};
template <> struct ForwardConfig<256> : ForwardTiles<256, 64, 64, 4, 1> {};

// kDropout: the variant for calls with dropout, which also takes every mask (window and,
// if the call has them, segment ids: a runtime switch here, so that dropout adds one
// variant rather than one per mask combination).
template <class Config, typename Element, bool kHasWindow, bool kHasSegments, bool kDropout>
__global__ void __launch_bounds__(Config::kThreads, Config::kMinBlocksPerSm)
    forward_kernel_sm80(const __grid_constant__ AttentionParams p, const bool vectorized) {
  using QTile = typename Config::QTile;
  using KVTile = typename Config::KVTile;
  constexpr int kBlockM = Config::kBlockM, kBlockN = Config::kBlockN;
  constexpr int kMTiles = Config::kMTiles, kNTiles = Config::kNTiles, kDTiles = Config::kDTiles;
  constexpr bool kBF16 = ElementTraits<Element>::kIsBFloat16;

  extern __shared__ __align__(128) unsigned char smem[];
  Element* q_smem = reinterpret_cast<Element*>(smem);
  Element* kv_smem = q_smem + QTile::kElements;  // stage s: K at 2s, V at 2s+1
  auto k_smem = [&](int stage) { return kv_smem + (2 * stage) * KVTile::kElements; };
  auto v_smem = [&](int stage) { return kv_smem + (2 * stage + 1) * KVTile::kElements; };
  int32_t* kv_ids_smem = reinterpret_cast<int32_t*>(kv_smem + 2 * Config::kStages * KVTile::kElements);

  const int thread = threadIdx.x, lane = thread & 31, warp = thread >> 5;
  // Launch the longest query blocks first: with a causal mask those are the last ones.
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int head = blockIdx.y, batch = blockIdx.z;
  const int head_kv = head / static_cast<int>(p.num_heads / p.num_heads_kv);
  const int seqlen_q = static_cast<int>(p.seqlen_q), head_dim = static_cast<int>(p.head_dim);
  const int row0 = m_block * kBlockM;
  const int valid_rows = min(kBlockM, seqlen_q - row0);

  Element* out = static_cast<Element*>(p.out) + batch * p.out_strides.batch +
                 row0 * p.out_strides.row + head * p.out_strides.head;
  float* lse = p.lse + (batch * p.num_heads + head) * p.seqlen_q + row0;

  const bool has_segments = kHasSegments && (!kDropout || p.has_segment_ids());
  IndexRange keys =
      has_segments ? keys_of_query_block<Config::kThreads, kHasSegments>(p, batch, row0, valid_rows)
                   : keys_of_query_block<Config::kThreads, false>(p, batch, row0, valid_rows);
  // Dropout draws come in 32-key chunks: start at one (the masks hide the extra keys).
  if (kDropout && !keys.empty()) keys.begin &= ~int64_t{31};
  auto q_ids = [&] { return p.q_segment_ids + batch * p.seqlen_q + row0; };
  auto kv_ids = [&] { return p.kv_segment_ids + batch * p.seqlen_k; };
  if (keys.empty()) {  // every row of this block is fully masked: out = 0, lse = +inf
    store_fully_masked_rows<Config::kThreads>(out, p.out_strides.row, lse, valid_rows, head_dim,
                                              thread);
    return;
  }
  const int key_begin = static_cast<int>(keys.begin);
  const int num_key_blocks = (static_cast<int>(keys.end) - key_begin + kBlockN - 1) / kBlockN;
  const int seqlen_k = static_cast<int>(p.seqlen_k);

  const Element* q = static_cast<const Element*>(p.q) + batch * p.q_strides.batch +
                     row0 * p.q_strides.row + head * p.q_strides.head;
  const Element* k = static_cast<const Element*>(p.k) + batch * p.k_strides.batch +
                     head_kv * p.k_strides.head;
  const Element* v = static_cast<const Element*>(p.v) + batch * p.v_strides.batch +
                     head_kv * p.v_strides.head;
  auto load_k = [&](int block, int stage) {
    const int key0 = key_begin + block * kBlockN;
    load_tile<KVTile, Config::kThreads>(k_smem(stage), k + key0 * p.k_strides.row, p.k_strides.row,
                                        min(kBlockN, seqlen_k - key0), head_dim, vectorized, thread);
  };
  auto load_v = [&](int block, int stage = 0) {
    const int key0 = key_begin + block * kBlockN;
    load_tile<KVTile, Config::kThreads>(v_smem(stage), v + key0 * p.v_strides.row, p.v_strides.row,
                                        min(kBlockN, seqlen_k - key0), head_dim, vectorized, thread);
  };
  // The key block's ids travel with K (stage `stage` of the id buffer).
  auto load_k_and_ids = [&](int block, int stage) {
    load_k(block, stage);
    if (has_segments) {
      const int key0 = key_begin + block * kBlockN;
      load_row_vector<kBlockN, Config::kThreads>(kv_ids_smem + stage * kBlockN, kv_ids() + key0,
                                                 min(kBlockN, seqlen_k - key0), thread);
    }
  };
  auto load_kv = [&](int block, int stage) {
    load_k_and_ids(block, stage);
    load_v(block, stage);
  };

  load_tile<QTile, Config::kThreads>(q_smem, q, p.q_strides.row, valid_rows, head_dim, vectorized,
                                     thread);
  if constexpr (Config::kStages == 2) {
    load_kv(0, 0);
  } else {
    load_k_and_ids(0, 0);
  }
  cp_async_commit();

  const ScoreTransform transform = ScoreTransform::make(p, batch, head);
  const KeyWindow window = KeyWindow::make(p);
  const int warp_row0 = warp * 16 * kMTiles;  // this warp's first row within the block
  const uint32_t q_base = shared_address(q_smem);
  const int g = lane >> 2, t = lane & 3;
  // The id range of the warp's rows (segment variant only).
  IdRange warp_row_ids{0, 0};
  if (has_segments)
    warp_row_ids = warp_ids_range<16 * kMTiles>(q_ids() + warp_row0, valid_rows - warp_row0, lane);
  DropoutDraws draws{};
  if constexpr (kDropout) draws = DropoutDraws::make(p, batch, head);

  float acc_o[kMTiles][kDTiles][4];
  zero(acc_o);
  // Running max (in score units) and this lane's partial row sum, for rows g and g + 8 of
  // each m-tile; partial sums are reduced across the quad only once, at the end.
  float row_max[kMTiles][2], row_sum[kMTiles][2];
#pragma unroll
  for (int i = 0; i < kMTiles; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) row_max[i][h] = -INFINITY, row_sum[i][h] = 0.0f;

  for (int block = 0; block < num_key_blocks; ++block) {
    const int stage = Config::kStages == 2 ? (block & 1) : 0;
    const int key0 = key_begin + block * kBlockN;
    // K of this block has landed, and every warp is done with the buffers the next copy
    // overwrites (block - 1's stage, or the single V buffer).
    cp_async_wait<0>();
    __syncthreads();
    if constexpr (Config::kStages == 2) {
      if (block + 1 < num_key_blocks) load_kv(block + 1, stage ^ 1);
    } else {
      load_v(block);
    }
    cp_async_commit();

    float acc_s[kMTiles][kNTiles][4];
    zero(acc_s);
    warp_gemm<kMTiles, kNTiles, Config::kHeadDim, QTile, KOrder::kContiguous, KVTile,
              KOrder::kContiguous, kBF16>(acc_s, q_base, warp_row0,
                                          shared_address(k_smem(stage)), 0, lane);

    const int query0 = row0 + warp_row0;
    transform_and_mask<kHasWindow>(acc_s, transform, window, row0, row0 + valid_rows, query0, key0,
                                   lane);
    // After the transform, which would turn -inf into a finite score.
    if (has_segments) {
      // Ids differ somewhere between the warp's rows and the block's keys: compare each.
      const int32_t* block_ids = kv_ids_smem + stage * kBlockN;
      if (!warp_row_ids.single_id_with(warp_ids_range<kBlockN>(block_ids, kBlockN, lane))) {
#pragma unroll
        for (int i = 0; i < kMTiles; ++i)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int row = warp_row0 + 16 * i + g + 8 * h;
            const int row_id = row < valid_rows ? q_ids()[row] : 0;  // rows past the end: unused
#pragma unroll
            for (int j = 0; j < kNTiles; ++j)
#pragma unroll
              for (int e = 0; e < 2; ++e)
                if (row_id != block_ids[8 * j + 2 * t + e]) acc_s[i][j][2 * h + e] = -INFINITY;
          }
      }
    }

    online_softmax_step(acc_s, acc_o, row_max, row_sum, transform.exp_scale);

    // Dropout zeroes probabilities after the row sum took them (lse is the undropped
    // row's); the kept ones are scaled once, at the end.
    if constexpr (kDropout) {
      const auto keep = keep_mask_queries_by_keys<kMTiles, kNTiles>(draws, query0, key0, lane);
#pragma unroll
      for (int i = 0; i < kMTiles; ++i)
#pragma unroll
        for (int j = 0; j < kNTiles; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c)
            if (!keep.keeps(i, j, c)) acc_s[i][j][c] = 0.0f;
    }

    if constexpr (Config::kStages == 1) {
      // V of this block has landed and every warp is done reading K: fetch the next K
      // while P V runs.
      cp_async_wait<0>();
      __syncthreads();
      if (block + 1 < num_key_blocks) load_k_and_ids(block + 1, 0);
      cp_async_commit();
    }

    // O += P V, with P straight from the S accumulator.
    warp_gemm_a_registers<kMTiles, kDTiles, kBlockN, Element, KVTile, KOrder::kStrided>(
        acc_o, acc_s, shared_address(v_smem(stage)), 0, lane);
  }
  cp_async_wait<0>();  // nothing is in flight, but leave no copy outstanding at exit

  // Normalize, write lse (natural log; +inf for rows that saw no key) and O.
#pragma unroll
  for (int i = 0; i < kMTiles; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float sum = quad_sum(row_sum[i][h]);
      const bool empty = !(sum > 0.0f);
      const float inv_sum = empty ? 0.0f : (kDropout ? p.dropout_scale : 1.0f) / sum;
#pragma unroll
      for (int j = 0; j < kDTiles; ++j) {
        acc_o[i][j][2 * h] *= inv_sum;
        acc_o[i][j][2 * h + 1] *= inv_sum;
      }
      const int row = warp_row0 + 16 * i + g + 8 * h;
      if (t == 0 && row < valid_rows)
        lse[row] = empty ? INFINITY : row_max[i][h] * transform.exp_scale * kLn2 + logf(sum);
    }
  store_tile<Element>(acc_o, out + warp_row0 * p.out_strides.row, p.out_strides.row,
                      valid_rows - warp_row0, head_dim, vectorized, lane);
}

}  // namespace jax_flash::cuda
