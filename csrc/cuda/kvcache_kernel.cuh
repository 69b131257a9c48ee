// Attention over a KV cache (flash_attn_with_kvcache) for sm80+: the forward's online
// softmax, reading the cache in place through common/kv_cache.h (contiguous rows or pages,
// per-row lengths, the one out-of-range rule), with two choices that suit decoding:
//
//   - The query heads that share a KV head are rows of one tile (row r is query r / group,
//     head head_kv * group + r % group), so each K/V tile is read once per group: GQA
//     decoding reads the cache once, not once per query head.
//   - Split-KV: when batch x KV heads x row blocks cannot fill the GPU, CTAs take slices of
//     the keys (num_splits of them) and write partial outputs with their lse, which
//     kvcache_combine merges. Within a CTA, the decode shape (16 rows) gives each warp its
//     own quarter of every key block, and the warps' partial results meet in shared memory
//     at the end; the prefill shape (128 rows, 64 at head dim 256) gives each warp 32 rows
//     (16) of every key.
//
// The cache is bandwidth-bound: K and V stream through a double-buffered cp.async pipeline,
// three decode CTAs per SM on the H100. Masks, softcap and ALiBi are applied per element
// only on tiles that need them.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "common/attention_params.h"
#include "common/kv_cache.h"
#include "cuda/element.cuh"
#include "cuda/flash_api.h"
#include "cuda/online_softmax.cuh"
#include "cuda/ptx.cuh"
#include "cuda/scores.cuh"
#include "cuda/smem_tile.cuh"
#include "cuda/warp_mma.cuh"

namespace jax_flash::cuda {

template <int kHeadDim_, int kWarps_, int kWarpsAlongKeys_, int kMTiles_, int kBlockN_,
          int kStages_>
struct KvCacheTiles {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kWarpsAlongKeys = kWarpsAlongKeys_;  // warps sharing rows, splitting keys
  static constexpr int kMTiles = kMTiles_;                  // 16-row mma tiles per warp
  static constexpr int kWarpRows = 16 * kMTiles;
  static constexpr int kBlockM = kWarpRows * kWarps / kWarpsAlongKeys;  // rows per CTA
  static constexpr int kBlockN = kBlockN_;                                // keys per stage
  static constexpr int kKeysPerWarp = kBlockN / kWarpsAlongKeys;
  static constexpr int kNTiles = kKeysPerWarp / 8;
  static constexpr int kDTiles = kHeadDim / 8;
  static constexpr int kStages = kStages_;
  using QTile = SwizzledTile<kBlockM, kHeadDim>;
  using KVTile = SwizzledTile<kBlockN, kHeadDim>;
  // Q, then per stage K and V, then a ring of kStages + 1 blocks' key offsets (computed a
  // step before their copies are issued) and per slot whether a key is unreadable. At the
  // end, Q's and the stages' space holds every warp's row max, row sum and unnormalized
  // output rows (float32).
  static constexpr int kStageBytes = 2 * KVTile::kBytes;
  static constexpr int kOffsetSlots = kStages + 1;
  static constexpr int kCombineBytes = kWarps * kWarpRows * (kHeadDim + 2) * 4;
  static_assert(kCombineBytes <= QTile::kBytes + kStages * kStageBytes,
                "the combine reuses the pipeline's shared memory");
  static constexpr int kSmemBytes = QTile::kBytes + kStages * kStageBytes +
                                    kOffsetSlots * (kBlockN * 8 + 16);
  static_assert(kNTiles % 2 == 0, "whole 16-key steps per warp");
  static_assert(kBlockN <= kThreads, "one thread per key finds the keys");
};

// Decode (up to 16 rows): the four warps split each 64-key block, double buffered: 70 KB
// at head dim 128, three CTAs per SM. (Measured on the H100 against three stages, four
// stages, 128-key blocks and 8-warp CTAs: this was the fastest at every decode shape;
// benchmarks/RESULTS.md.)
#ifndef JAX_FLASH_KV_DECODE_TILES  // experiments override: warps, warps along keys, m-tiles, block_n, stages
#define JAX_FLASH_KV_DECODE_TILES(d) 4, 4, 1, 64, 2
#endif
template <int kHeadDimClass>
struct KvCacheDecodeConfig
    : KvCacheTiles<kHeadDimClass, JAX_FLASH_KV_DECODE_TILES(kHeadDimClass)> {};
// Prefill: the forward kernel's shapes, 32 rows per warp (16 at head dim 256, where the
// output tile fills the registers) over 64-key blocks, double buffered, two CTAs per SM.
template <int kHeadDimClass>
struct KvCachePrefillConfig
    : KvCacheTiles<kHeadDimClass, 4, 1, (kHeadDimClass >= 256 ? 1 : 2), 64, 2> {};

// Where a GPU's shared memory cannot hold those (head dim 256: 138 KB decode, 162 KB
// prefill; sm86/89 allow 99 KB per CTA), the launcher takes 32-key blocks: 73 KB and 97 KB.
template <class Config> struct KvCacheSmallSmem { using Type = Config; };
template <> struct KvCacheSmallSmem<KvCacheDecodeConfig<256>> {
  using Type = KvCacheTiles<256, 2, 2, 1, 32, 2>;
};
template <> struct KvCacheSmallSmem<KvCachePrefillConfig<256>> {
  using Type = KvCacheTiles<256, 4, 1, 1, 32, 2>;
};

template <class Config, typename Element>
__global__ void __launch_bounds__(Config::kThreads, 2)
    kvcache_kernel_sm80(const __grid_constant__ AttentionParams p,
                        const __grid_constant__ KvCacheWorkspace workspace, const bool vectorized) {
  using QTile = typename Config::QTile;
  using KVTile = typename Config::KVTile;
  constexpr int kBlockM = Config::kBlockM, kBlockN = Config::kBlockN;
  constexpr int kNTiles = Config::kNTiles, kDTiles = Config::kDTiles, kStages = Config::kStages;
  constexpr int kMTiles = Config::kMTiles;
  constexpr int kHeadDim = Config::kHeadDim;
  constexpr bool kBF16 = ElementTraits<Element>::kIsBFloat16;

  extern __shared__ __align__(128) unsigned char smem[];
  Element* q_smem = reinterpret_cast<Element*>(smem);
  unsigned char* stages = smem + QTile::kBytes;
  auto k_smem = [&](int s) { return reinterpret_cast<Element*>(stages + s * Config::kStageBytes); };
  auto v_smem = [&](int s) { return k_smem(s) + KVTile::kElements; };
  int64_t* offsets_smem = reinterpret_cast<int64_t*>(stages + kStages * Config::kStageBytes);
  // Per offset slot, one word per finding warp: whether some key of the block is unreadable.
  int* unreadable_smem = reinterpret_cast<int*>(offsets_smem + Config::kOffsetSlots * kBlockN);

  const int thread = threadIdx.x, lane = thread & 31, warp = thread >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int num_splits = workspace.num_splits;
  const int split = blockIdx.x % num_splits, m_block = blockIdx.x / num_splits;
  const int head_kv = blockIdx.y, batch = blockIdx.z;
  const int group = static_cast<int>(p.num_heads / p.num_heads_kv);
  const int seqlen_q = static_cast<int>(p.seqlen_q), head_dim = static_cast<int>(p.head_dim);
  const int rows = seqlen_q * group;
  const int row0 = m_block * kBlockM;
  const int valid_rows = min(kBlockM, rows - row0);

  // Keys of this batch row and the span this CTA's queries can see.
  const int seqlen_k = static_cast<int>(kv_cache_seqlen_k(p, batch));
  const int diagonal_offset = seqlen_k - seqlen_q;
  const int first_query = row0 / group, last_query = (row0 + valid_rows - 1) / group;
  int key_begin = 0, key_end = seqlen_k;  // (window sides can be any int64)
  if (p.window_left >= 0)
    key_begin = static_cast<int>(max(int64_t{0}, first_query + diagonal_offset - p.window_left));
  if (p.window_right >= 0)
    key_end = static_cast<int>(
        min(int64_t{seqlen_k}, last_query + diagonal_offset + p.window_right + 1));
  const int num_blocks = key_end > key_begin ? (key_end - key_begin + kBlockN - 1) / kBlockN : 0;
  const int blocks_per_split = (num_blocks + num_splits - 1) / num_splits;
  const int block_begin = min(num_blocks, split * blocks_per_split);
  const int block_end = min(num_blocks, block_begin + blocks_per_split);

  // Query rows, gathered from their (query, head) places.
  const Element* q = static_cast<const Element*>(p.q) + batch * p.q_strides.batch;
  auto q_row = [&](int r) -> const Element* {
    if (r >= valid_rows) return nullptr;
    const int row = row0 + r;
    return q + (row / group) * p.q_strides.row + (head_kv * group + row % group) * p.q_strides.head;
  };
  load_tile_rows<QTile, Config::kThreads>(q_smem, q_row, q, head_dim, vectorized, thread);

  // Where each key of a block lives (one thread per key, one page lookup each; the
  // dispatcher checks that K and V share strides), or -1: past the row's length or on an
  // unreadable page, which also masks the key (a zero row alone would still take
  // exp(0 - max) of the probability mass).
  auto offsets = [&](int block) {
    return offsets_smem + ((block - block_begin) % Config::kOffsetSlots) * kBlockN;
  };
  auto find_keys = [&](int block) {
    if (thread < kBlockN && block < block_end) {
      const int64_t offset =
          kv_cache_offset(p, p.k_strides, batch, key_begin + block * kBlockN + thread, head_kv);
      offsets(block)[thread] = offset;
      const bool any_unreadable = __any_sync(0xffffffffu, offset < 0);
      if (lane == 0)
        unreadable_smem[((block - block_begin) % Config::kOffsetSlots) * 4 + warp] = any_unreadable;
    }
  };
  // Whether every key of a block is readable (no per-element test needed for that).
  auto all_readable = [&](int block) {
    const int* words = unreadable_smem + ((block - block_begin) % Config::kOffsetSlots) * 4;
    bool any = false;
#pragma unroll
    for (int w = 0; w < (kBlockN + 31) / 32; ++w) any |= words[w] != 0;
    return !any;
  };
  const Element* k_cache = static_cast<const Element*>(p.k);
  const Element* v_cache = static_cast<const Element*>(p.v);
  auto load_block = [&](int block) {
    const int s = (block - block_begin) % kStages;
    const int64_t* key_offsets = offsets(block);
    auto row_in = [&](const Element* cache) {
      return [=](int r) -> const Element* {
        const int64_t offset = key_offsets[r];
        return offset < 0 ? nullptr : cache + offset;
      };
    };
    load_tile_rows<KVTile, Config::kThreads>(k_smem(s), row_in(k_cache), k_cache, head_dim,
                                             vectorized, thread);
    load_tile_rows<KVTile, Config::kThreads>(v_smem(s), row_in(v_cache), v_cache, head_dim,
                                             vectorized, thread);
  };

  // Prologue: offsets of the first kStages blocks, then kStages - 1 blocks in flight
  // (empty groups keep the count of committed groups fixed).
#pragma unroll
  for (int s = 0; s < kStages; ++s) find_keys(block_begin + s);
  __syncthreads();
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (block_begin + s < block_end) load_block(block_begin + s);
    cp_async_commit();
  }

  const int warp_row0 = (warp / Config::kWarpsAlongKeys) * Config::kWarpRows;
  const int warp_key0 = (warp % Config::kWarpsAlongKeys) * Config::kKeysPerWarp;
  const float scale = p.softmax_scale;
  const float softcap = p.softcap > 0.0f ? p.softcap : 0.0f;
  // Scores need only the scale (folded into the exponent) unless softcap or ALiBi is on.
  const bool plain = softcap == 0.0f && p.alibi_slopes == nullptr && scale > 0.0f;
  const float exp_scale = plain ? scale * kLog2e : kLog2e;
  // Per-lane rows g and g + 8 of each m-tile: their query, head and ALiBi slope.
  int row_query[kMTiles][2];
  float row_slope[kMTiles][2];
#pragma unroll
  for (int i = 0; i < kMTiles; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + warp_row0 + 16 * i + g + 8 * h;
      row_query[i][h] = row / group;
      const int head = head_kv * group + row % group;
      row_slope[i][h] = p.alibi_slopes != nullptr && row < rows
                            ? p.alibi_slopes[batch * p.num_heads + head] : 0.0f;
    }
  // The diagonals of the warp's first and last rows bound the window tests below.
  const int warp_first_query = (row0 + warp_row0) / group;
  const int warp_last_query = (row0 + min(valid_rows, warp_row0 + Config::kWarpRows) - 1) / group;

  float acc_o[kMTiles][kDTiles][4];
  zero(acc_o);
  float row_max[kMTiles][2], row_sum[kMTiles][2];  // score units, see exp_scale
#pragma unroll
  for (int i = 0; i < kMTiles; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) row_max[i][h] = -INFINITY, row_sum[i][h] = 0.0f;
  const uint32_t q_base = shared_address(q_smem);

  for (int block = block_begin; block < block_end; ++block) {
    const int s = (block - block_begin) % kStages;
    cp_async_wait<kStages - 2>();
    // This block landed; every warp is done with the previous block's stage and offsets,
    // which the next copy and the next lookup reuse.
    __syncthreads();
    if (block + kStages - 1 < block_end) load_block(block + kStages - 1);
    cp_async_commit();
    find_keys(block + kStages);
    const int key0 = key_begin + block * kBlockN + warp_key0;

    float acc_s[kMTiles][kNTiles][4];
    zero(acc_s);
    warp_gemm<kMTiles, kNTiles, kHeadDim, QTile, KOrder::kContiguous, KVTile, KOrder::kContiguous,
              kBF16>(acc_s, q_base, warp_row0, shared_address(k_smem(s)), warp_key0, lane);

    // Scores: transformed and masked per element only where the tile needs it (softcap or
    // ALiBi on, a key past the row's length or unreadable, or a window boundary inside).
    const int64_t* key_offsets = offsets(block) + warp_key0;
    const int key_last = key0 + Config::kKeysPerWarp - 1;
    const bool masked =
        key_last >= seqlen_k || !all_readable(block) ||
        (p.window_left >= 0 && key0 < warp_last_query + diagonal_offset - p.window_left) ||
        (p.window_right >= 0 && key_last > warp_first_query + diagonal_offset + p.window_right);
    if (!plain || masked) {
#pragma unroll
      for (int i = 0; i < kMTiles; ++i)
#pragma unroll
        for (int j = 0; j < kNTiles; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int h = c >> 1, key_in_warp = 8 * j + 2 * t + (c & 1), key = key0 + key_in_warp;
            const int diagonal = row_query[i][h] + diagonal_offset;
            float score = acc_s[i][j][c];
            if (!plain) {
              score *= scale;
              if (softcap > 0.0f) score = softcap * tanhf(acc_s[i][j][c] * (scale / softcap));
              score -= row_slope[i][h] * static_cast<float>(abs(diagonal - key));
            }
            const bool visible = key_offsets[key_in_warp] >= 0 &&
                                 (p.window_left < 0 || key >= diagonal - p.window_left) &&
                                 (p.window_right < 0 || key <= diagonal + p.window_right);
            acc_s[i][j][c] = visible ? score : -INFINITY;
          }
    }

    online_softmax_step(acc_s, acc_o, row_max, row_sum, exp_scale);
    // O += P V over this warp's keys (16-row steps of the swizzle keep the offset exact).
    warp_gemm_a_registers<kMTiles, kDTiles, Config::kKeysPerWarp, Element, KVTile,
                          KOrder::kStrided>(
        acc_o, acc_s, shared_address(v_smem(s)) + 2 * warp_key0 * KVTile::kCols, 0, lane);
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline's shared memory becomes the combine's

  // Every warp leaves its rows' max (log2 units), sum and unnormalized output in shared
  // memory (Q's space included: nothing reads Q any more).
  float* combine = reinterpret_cast<float*>(smem);
  constexpr int kRowFloats = kHeadDim + 2;
  float* mine = combine + warp * Config::kWarpRows * kRowFloats;
#pragma unroll
  for (int i = 0; i < kMTiles; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float sum = quad_sum(row_sum[i][h]);
      float* row = mine + (16 * i + g + 8 * h) * kRowFloats;
      if (t == 0) {
        row[kHeadDim] = row_max[i][h] * exp_scale;
        row[kHeadDim + 1] = sum;
      }
#pragma unroll
      for (int j = 0; j < kDTiles; ++j) {
        row[8 * j + 2 * t] = acc_o[i][j][2 * h];
        row[8 * j + 2 * t + 1] = acc_o[i][j][2 * h + 1];
      }
    }
  __syncthreads();

  // Each row merges the partial results of the warps that hold it (one, or all four).
  Element* out = static_cast<Element*>(p.out) + batch * p.out_strides.batch;
  for (int i = thread; i < kBlockM * head_dim; i += Config::kThreads) {
    const int r = i / head_dim, col = i % head_dim;
    if (r >= valid_rows) continue;
    // Rows r of warps (r / kWarpRows) * kWarpsAlongKeys + w, w < kWarpsAlongKeys.
    const int warp_rows = r / Config::kWarpRows, r_in_warp = r % Config::kWarpRows;
    auto row_of = [&](int w) {
      return combine + ((warp_rows * Config::kWarpsAlongKeys + w) * Config::kWarpRows + r_in_warp) *
                           kRowFloats;
    };
    float max_all = -INFINITY;
#pragma unroll
    for (int w = 0; w < Config::kWarpsAlongKeys; ++w) max_all = fmaxf(max_all, row_of(w)[kHeadDim]);
    const float reference = max_all == -INFINITY ? 0.0f : max_all;
    float sum = 0.0f, value = 0.0f;
#pragma unroll
    for (int w = 0; w < Config::kWarpsAlongKeys; ++w) {
      const float* row = row_of(w);
      const float weight = fast_exp2(row[kHeadDim] - reference);
      sum += row[kHeadDim + 1] * weight;
      value += row[col] * weight;
    }
    const bool empty = !(sum > 0.0f);
    const float normalized = empty ? 0.0f : value / sum;
    // lse in natural log; a row that saw no key: +inf (final) or -inf (a split's share,
    // which then weighs nothing in the combine).
    const float lse = empty ? INFINITY : (reference + log2f(sum)) * kLn2;
    const int row = row0 + r, query = row / group, head = head_kv * group + row % group;
    const int64_t lse_index = (batch * p.num_heads + head) * p.seqlen_q + query;
    if (num_splits == 1) {
      out[query * p.out_strides.row + head * p.out_strides.head + col] =
          ElementTraits<Element>::from_float(normalized);
      if (col == 0) p.lse[lse_index] = lse;
    } else {
      const int64_t partial = split * p.batch * p.num_heads * p.seqlen_q + lse_index;
      workspace.out_accum[partial * head_dim + col] = normalized;
      if (col == 0) workspace.lse_accum[partial] = empty ? -INFINITY : lse;
    }
  }
}

// Merges the splits' partial rows: out = sum_s exp(lse_s - lse) out_s, lse = log sum_s
// exp(lse_s). One CTA per (batch, head, query) row: warp 0 turns the splits' lse into
// weights (warp reductions for max and sum), then every thread takes a column or two and
// reads all splits' values for it, unrolled so that the loads overlap (the call is short,
// and latency is all it costs).
template <typename Element>
__global__ void __launch_bounds__(128)
    kvcache_combine_kernel(const __grid_constant__ AttentionParams p,
                           const __grid_constant__ KvCacheWorkspace workspace) {
  constexpr int kMaxSplitsPerLane = 4;  // num_splits <= 128
  __shared__ float weights[32 * kMaxSplitsPerLane];
  __shared__ float row_lse;
  const int64_t rows = p.batch * p.num_heads * p.seqlen_q;
  const int64_t row = blockIdx.x;
  const int thread = threadIdx.x, lane = thread & 31;
  const int num_splits = workspace.num_splits, head_dim = static_cast<int>(p.head_dim);
  if (thread < 32) {
    float lse[kMaxSplitsPerLane];
    float max_lse = -INFINITY;
#pragma unroll
    for (int i = 0; i < kMaxSplitsPerLane; ++i) {
      const int split = lane + 32 * i;
      lse[i] = split < num_splits ? workspace.lse_accum[split * rows + row] : -INFINITY;
      max_lse = fmaxf(max_lse, lse[i]);
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
      max_lse = fmaxf(max_lse, __shfl_xor_sync(0xffffffffu, max_lse, offset));
    // No split saw a key: weights 0 (out = 0) and lse = +inf.
    const float reference = max_lse == -INFINITY ? 0.0f : max_lse;
    float total = 0.0f;
#pragma unroll
    for (int i = 0; i < kMaxSplitsPerLane; ++i) total += expf(lse[i] - reference);  // exp(-inf) = 0
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
      total += __shfl_xor_sync(0xffffffffu, total, offset);
    const float inv_total = total > 0.0f ? 1.0f / total : 0.0f;
#pragma unroll
    for (int i = 0; i < kMaxSplitsPerLane; ++i)
      weights[lane + 32 * i] = expf(lse[i] - reference) * inv_total;
    if (lane == 0) row_lse = total > 0.0f ? reference + logf(total) : INFINITY;
  }
  __syncthreads();
  const int64_t query = row % p.seqlen_q, bh = row / p.seqlen_q;
  const int64_t batch = bh / p.num_heads, head = bh % p.num_heads;
  Element* out = static_cast<Element*>(p.out) + batch * p.out_strides.batch +
                 query * p.out_strides.row + head * p.out_strides.head;
  const float* partial = workspace.out_accum + row * head_dim;
  const int64_t split_stride = rows * head_dim;
  for (int col = thread; col < head_dim; col += 128) {
    float value = 0.0f;
#pragma unroll 8
    for (int split = 0; split < num_splits; ++split)
      value += weights[split] * partial[split * split_stride + col];
    out[col] = ElementTraits<Element>::from_float(value);
  }
  if (thread == 0) p.lse[row] = row_lse;
}

}  // namespace jax_flash::cuda
