// From raw dot products q·k in mma accumulators to the scores the softmax sees: softmax
// scale, softcap, ALiBi and the window mask, with exactly the semantics of the CPU
// reference (csrc/cpu/tile.h finish_scores).
//
// To keep the common case cheap, scores are kept in "score units" chosen per call:
//   plain (no softcap, no ALiBi, scale > 0): score = q·k, and exp_scale = scale * log2(e);
//   otherwise: score = softcap * tanh(q·k * scale / softcap) (or q·k * scale) - ALiBi bias,
//              and exp_scale = log2(e).
// Either way exp(true score - x) = exp2(score * exp_scale - x * log2(e)), so the softmax
// needs a single FFMA + EX2 per element and only the non-plain path pays for the rest.
#pragma once

#include <cstdint>

#include "common/attention_params.h"
#include "cuda/fragments.cuh"
#include "cuda/key_window.cuh"
#include "cuda/ptx.cuh"

namespace jax_flash::cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct ScoreTransform {
  bool plain;
  float exp_scale;
  float scale;        // softmax_scale
  float softcap;      // 0 when off
  float tanh_scale;   // softmax_scale / softcap
  float alibi_slope;  // 0 when off

  __device__ __forceinline__ static ScoreTransform make(const AttentionParams& p, int64_t batch,
                                                        int64_t head) {
    ScoreTransform t;
    t.softcap = p.softcap > 0.0f ? p.softcap : 0.0f;
    t.alibi_slope = p.alibi_slopes != nullptr ? p.alibi_slopes[batch * p.num_heads + head] : 0.0f;
    t.plain = t.softcap == 0.0f && p.alibi_slopes == nullptr && p.softmax_scale > 0.0f;
    t.scale = p.softmax_scale;
    t.exp_scale = t.plain ? p.softmax_scale * kLog2e : kLog2e;
    t.tanh_scale = t.softcap > 0.0f ? p.softmax_scale / t.softcap : 0.0f;
    return t;
  }

  // Non-plain path only. Returns the score; *tanh_out receives tanh(...) (0 without softcap)
  // for the softcap derivative in the backward pass.
  __device__ __forceinline__ float apply(float dot, int query, int key, int diagonal_offset,
                                         float* tanh_out) const {
    float score;
    if (softcap > 0.0f) {
      const float t = tanhf(dot * tanh_scale);
      *tanh_out = t;
      score = softcap * t;
    } else {
      *tanh_out = 0.0f;
      score = dot * scale;
    }
    const int distance = query + diagonal_offset - key;
    return score - alibi_slope * static_cast<float>(distance < 0 ? -distance : distance);
  }
};

// The forward's scores of one warp tile (mma accumulator layout, rows from query0, keys from
// key0): softcap / ALiBi where the call has them, then -inf outside the window, the latter
// only on tiles whose block (queries [block_q0, block_q1)) meets the window's edge.
template <bool kHasWindow, int kMTiles, int kNTiles>
__device__ __forceinline__ void transform_and_mask(float (&acc_s)[kMTiles][kNTiles][4],
                                                   const ScoreTransform& transform,
                                                   const KeyWindow& window, int block_q0,
                                                   int block_q1, int query0, int key0, int lane) {
  if (!transform.plain) {
    for_each_element(acc_s, lane, [&](float& s, int r, int c) {
      float unused;
      s = transform.apply(s, query0 + r, key0 + c, window.diagonal_offset, &unused);
    });
  }
  if (window.tile_needs_mask<kHasWindow>(block_q0, block_q1, key0, key0 + 8 * kNTiles)) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int i = 0; i < kMTiles; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const ColumnRange keys =
            window.visible_key_columns<kHasWindow>(query0 + 16 * i + g + 8 * h, key0 + 2 * t);
#pragma unroll
        for (int j = 0; j < kNTiles; ++j)
#pragma unroll
          for (int c = 0; c < 2; ++c)
            if (!keys.contains(8 * j + c)) acc_s[i][j][2 * h + c] = -INFINITY;
      }
  }
}

// The backward's step for one element, shared by the key-block kernel and the deterministic
// dQ pass: the score (transformed and masked in the general path only), P = exp(score - lse)
// recomputed from the forward's lse (log2 units), and dS = P (dP - delta) (softcap') scale.
// Returns {P, dS}. lse = +inf (a query that saw no key) gives exactly 0 for both.
// With dropout, `keep` is the element's factor (dropout_scale if kept, else 0): V was
// weighted by Z = P keep, so the first result is Z and dS = P (dP keep - delta) ...
template <bool kGeneral, bool kHasWindow, bool kDropout = false>
__device__ __forceinline__ float2 probability_and_grad(float dot, float dp, float lse_log2,
                                                       float delta,
                                                       const ScoreTransform& transform,
                                                       const KeyWindow& window, bool window_masked,
                                                       bool hidden_by_segment, int query, int key,
                                                       float keep = 1.0f) {
  float score = dot, ds_scale = transform.scale;
  if constexpr (kGeneral) {
    if (!transform.plain) {
      float tanh_value;
      score = transform.apply(score, query, key, window.diagonal_offset, &tanh_value);
      ds_scale *= 1.0f - tanh_value * tanh_value;  // softcap'
    }
    if (window_masked && !window.visible<kHasWindow>(query, key)) score = -INFINITY;
    if (hidden_by_segment) score = -INFINITY;
  }
  const float prob = fast_exp2(fmaf(score, transform.exp_scale, -lse_log2));
  if constexpr (kDropout) return make_float2(prob * keep, prob * fmaf(dp, keep, -delta) * ds_scale);
  return make_float2(prob, prob * (dp - delta) * ds_scale);
}

}  // namespace jax_flash::cuda
