#include "cpu/attention_cpu.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/dropout.h"
#include "cpu/kv_cache_tile.h"
#include "cpu/tile.h"

namespace jax_flash::cpu {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

float* lse_row(float* base, const AttentionParams& p, int64_t b, int64_t head) {
  return base + (b * p.num_heads + head) * p.seqlen_q;
}
const float* lse_row(const float* base, const AttentionParams& p, int64_t b, int64_t head) {
  return base + (b * p.num_heads + head) * p.seqlen_q;
}

// One task: a block of query rows of one (batch, head), swept over all visible keys with
// the online softmax: a running row max and row sum rescale the accumulator as keys arrive.
template <typename T>
void forward_block(const AttentionParams& call, int64_t b, int64_t head, int64_t row0, int m) {
  using A = Accumulator<T>;
  // A KV-cache call gives each batch row its own key count and diagonal; else p == call.
  const AttentionParams p = kv_cache_row_params(call, b);
  const bool from_cache = has_kv_cache(p);
  bool readable[kBlockN];
  const int64_t d = p.head_dim;
  const int64_t head_kv = head / p.group_size();
  const float slope = alibi_slope_for(p, b, head);

  std::vector<A> q(kBlockM * d), kt(d * kBlockN), v(kBlockN * d), acc(kBlockM * d, 0);
  std::vector<A> s(kBlockM * kBlockN);
  std::vector<A> row_max(kBlockM, kNegInf<A>), row_sum(kBlockM, 0);
  load_rows<T>(p.q, p.q_strides, b, head, row0, m, d, q.data());

  const IndexRange keys = visible_keys(p, row0, row0 + m);
  for (int64_t col0 = keys.begin; col0 < keys.end; col0 += kBlockN) {
    const int n = static_cast<int>(std::min<int64_t>(kBlockN, keys.end - col0));
    const SegmentIds segments = SegmentIds::of(p, b, row0, col0);
    if (!segments.meet(m, n)) continue;
    if (from_cache) {
      load_kv_cache_tile<T>(p, b, head_kv, col0, n, kt.data(), v.data(), readable);
    } else {
      load_rows_transposed<T>(p.k, p.k_strides, b, head_kv, col0, n, d, kBlockN, kt.data());
      load_rows<T>(p.v, p.v_strides, b, head_kv, col0, n, d, v.data());
    }
    matmul_abt(q.data(), kt.data(), m, n, d, s.data());
    finish_scores<A>(p, slope, row0, m, col0, n, segments, s.data(), nullptr);
    if (from_cache) mask_unreadable_keys(readable, m, n, s.data());

    for (int i = 0; i < m; ++i) {
      A* s_row = s.data() + i * kBlockN;
      A block_max = kNegInf<A>;
      for (int j = 0; j < n; ++j) block_max = std::max(block_max, s_row[j]);
      const A new_max = std::max(row_max[i], block_max);
      if (new_max == kNegInf<A>) {  // every key so far is masked for this row
        for (int j = 0; j < n; ++j) s_row[j] = 0;
        continue;
      }
      const A rescale = std::exp(row_max[i] - new_max);
      A sum = 0;
      for (int j = 0; j < n; ++j) {
        s_row[j] = std::exp(s_row[j] - new_max);
        sum += s_row[j];
      }
      row_sum[i] = row_sum[i] * rescale + sum;
      row_max[i] = new_max;
      A* acc_row = acc.data() + i * d;
      for (int64_t c = 0; c < d; ++c) acc_row[c] *= rescale;
      // Dropout zeroes probabilities after the row sum took them: lse stays that of the
      // whole row, and the kept ones are scaled once, at the end.
      if (p.has_dropout()) {
        for (int j = 0; j < n; ++j)
          if (!dropout_keeps(p, b, head, static_cast<uint32_t>(row0 + i),
                             static_cast<uint32_t>(col0 + j)))
            s_row[j] = 0;
      }
    }
    matmul_accumulate(s.data(), v.data(), m, n, d, acc.data());
  }

  float* lse = lse_row(p.lse, p, b, head) + row0;
  for (int i = 0; i < m; ++i) {
    // A row that saw no key gets a zero output and lse = +inf, so that exp(s - lse) = 0
    // in the backward pass and in any lse-based merge.
    const bool empty = row_sum[i] == 0;
    const A inv_sum = empty ? 0 : A{p.dropout_scale} / row_sum[i];
    for (int64_t c = 0; c < d; ++c) acc[i * d + c] *= inv_sum;
    lse[i] = empty ? kInf : static_cast<float>(row_max[i] + std::log(row_sum[i]));
  }
  store_rows<T>(acc.data(), m, d, p.out, p.out_strides, b, head, row0);
}

// Scratch for the backward tiles, sized once per task.
template <typename A>
struct BackwardTile {
  explicit BackwardTile(int64_t d)
      : s(kBlockM * kBlockN), dp(kBlockM * kBlockN), softcap_grad(kBlockM * kBlockN, 1),
        kt(d * kBlockN), vt(d * kBlockN) {}
  std::vector<A> s, dp, softcap_grad, kt, vt;
};

// Given q, dout [m × d] and kt, vt [d × kBlockN], leaves in tile.s the weights that
// multiplied V (P, or with dropout P ∘ mask · scale) and in tile.dp dS (already multiplied
// by the softcap derivative and the softmax scale). With dropout, dP reaches P through the
// mask: dS = P (dP ∘ mask · scale - delta).
template <typename A>
void probabilities_and_score_grads(const AttentionParams& p, int64_t b, int64_t head, float slope,
                                   int64_t row0, int m, int64_t col0, int n,
                                   const SegmentIds& segments, const A* q, const A* dout,
                                   const float* lse, const A* delta, BackwardTile<A>& tile) {
  const int64_t d = p.head_dim;
  const A scale = p.softmax_scale;
  matmul_abt(q, tile.kt.data(), m, n, d, tile.s.data());
  finish_scores<A>(p, slope, row0, m, col0, n, segments, tile.s.data(),
                   p.softcap > 0.0f ? tile.softcap_grad.data() : nullptr);
  matmul_abt(dout, tile.vt.data(), m, n, d, tile.dp.data());
  for (int i = 0; i < m; ++i) {
    A* s_row = tile.s.data() + i * kBlockN;
    A* dp_row = tile.dp.data() + i * kBlockN;
    const A* g_row = tile.softcap_grad.data() + i * kBlockN;
    const A row_lse = lse[i];
    for (int j = 0; j < n; ++j) {
      const A prob = std::exp(s_row[j] - row_lse);  // 0 for masked keys and empty rows
      A keep = 1;
      if (p.has_dropout())
        keep = dropout_keeps(p, b, head, static_cast<uint32_t>(row0 + i),
                             static_cast<uint32_t>(col0 + j))
                   ? A{p.dropout_scale}
                   : 0;
      s_row[j] = prob * keep;
      dp_row[j] = prob * (dp_row[j] * keep - delta[i]) * g_row[j] * scale;
    }
  }
}

// delta[i] = rowsum(dout ∘ out) - dlse: the term the softmax gradient subtracts; folding
// the lse cotangent in here is all it takes to differentiate through lse.
template <typename T, typename A = Accumulator<T>>
void compute_delta(const AttentionParams& p, const ParallelFor& parallel_for, A* delta) {
  const int64_t d = p.head_dim;
  parallel_for(p.batch * p.num_heads, [&](int64_t task) {
    const int64_t b = task / p.num_heads, head = task % p.num_heads;
    A* delta_row = delta + task * p.seqlen_q;
    const float* dlse = lse_row(p.dlse, p, b, head);
    for (int64_t i = 0; i < p.seqlen_q; ++i) {
      const T* o = row_ptr<T>(p.out, p.out_strides, b, i, head);
      const T* g = row_ptr<T>(p.dout, p.out_strides, b, i, head);
      A sum = 0;
      for (int64_t c = 0; c < d; ++c) sum += A{to_float(o[c])} * A{to_float(g[c])};
      delta_row[i] = sum - dlse[i];
    }
  });
}

// dK and dV for one block of keys of one (batch, kv head), summed over the query heads of
// its group and over every query block that can see it. Owning the key block makes the
// accumulation race-free.
template <typename T, typename A = Accumulator<T>>
void backward_key_block(const AttentionParams& p, const A* delta, int64_t b, int64_t head_kv,
                        int64_t col0, int n) {
  const int64_t d = p.head_dim;
  BackwardTile<A> tile(d);
  std::vector<A> q(kBlockM * d), dout(kBlockM * d);
  std::vector<A> dk(kBlockN * d, 0), dv(kBlockN * d, 0);
  load_rows_transposed<T>(p.k, p.k_strides, b, head_kv, col0, n, d, kBlockN, tile.kt.data());
  load_rows_transposed<T>(p.v, p.v_strides, b, head_kv, col0, n, d, kBlockN, tile.vt.data());

  const IndexRange rows = visible_queries(p, col0, col0 + n);
  for (int64_t head = head_kv * p.group_size(); head < (head_kv + 1) * p.group_size(); ++head) {
    const float slope = alibi_slope_for(p, b, head);
    const float* lse = lse_row(p.lse, p, b, head);
    const A* delta_row = delta + (b * p.num_heads + head) * p.seqlen_q;
    for (int64_t row0 = rows.begin; row0 < rows.end; row0 += kBlockM) {
      const int m = static_cast<int>(std::min<int64_t>(kBlockM, rows.end - row0));
      const SegmentIds segments = SegmentIds::of(p, b, row0, col0);
      if (!segments.meet(m, n)) continue;
      load_rows<T>(p.q, p.q_strides, b, head, row0, m, d, q.data());
      load_rows<T>(p.dout, p.out_strides, b, head, row0, m, d, dout.data());
      probabilities_and_score_grads(p, b, head, slope, row0, m, col0, n, segments, q.data(),
                                    dout.data(), lse + row0, delta_row + row0, tile);
      matmul_at_accumulate(tile.s.data(), dout.data(), m, n, d, dv.data());
      matmul_at_accumulate(tile.dp.data(), q.data(), m, n, d, dk.data());
    }
  }
  store_rows<T>(dk.data(), n, d, p.dk, p.k_strides, b, head_kv, col0);
  store_rows<T>(dv.data(), n, d, p.dv, p.v_strides, b, head_kv, col0);
}

// dQ for one block of query rows: recomputes P and dS against every visible key block.
template <typename T, typename A = Accumulator<T>>
void backward_query_block(const AttentionParams& p, const A* delta, int64_t b, int64_t head,
                          int64_t row0, int m) {
  const int64_t d = p.head_dim;
  const int64_t head_kv = head / p.group_size();
  const float slope = alibi_slope_for(p, b, head);
  BackwardTile<A> tile(d);
  std::vector<A> q(kBlockM * d), dout(kBlockM * d), k(kBlockN * d), dq(kBlockM * d, 0);
  load_rows<T>(p.q, p.q_strides, b, head, row0, m, d, q.data());
  load_rows<T>(p.dout, p.out_strides, b, head, row0, m, d, dout.data());
  const float* lse = lse_row(p.lse, p, b, head) + row0;
  const A* delta_row = delta + (b * p.num_heads + head) * p.seqlen_q + row0;

  const IndexRange keys = visible_keys(p, row0, row0 + m);
  for (int64_t col0 = keys.begin; col0 < keys.end; col0 += kBlockN) {
    const int n = static_cast<int>(std::min<int64_t>(kBlockN, keys.end - col0));
    const SegmentIds segments = SegmentIds::of(p, b, row0, col0);
    if (!segments.meet(m, n)) continue;
    load_rows_transposed<T>(p.k, p.k_strides, b, head_kv, col0, n, d, kBlockN, tile.kt.data());
    load_rows_transposed<T>(p.v, p.v_strides, b, head_kv, col0, n, d, kBlockN, tile.vt.data());
    load_rows<T>(p.k, p.k_strides, b, head_kv, col0, n, d, k.data());
    probabilities_and_score_grads(p, b, head, slope, row0, m, col0, n, segments, q.data(),
                                  dout.data(), lse, delta_row, tile);
    matmul_accumulate(tile.dp.data(), k.data(), m, n, d, dq.data());
  }
  store_rows<T>(dq.data(), m, d, p.dq, p.q_strides, b, head, row0);
}

template <typename T>
void forward_impl(const AttentionParams& p, const ParallelFor& parallel_for) {
  const int64_t blocks_q = ceil_div(p.seqlen_q, kBlockM);
  parallel_for(p.batch * p.num_heads * blocks_q, [&](int64_t task) {
    const int64_t block = task % blocks_q, bh = task / blocks_q;
    const int64_t row0 = block * kBlockM;
    forward_block<T>(p, bh / p.num_heads, bh % p.num_heads, row0,
                     static_cast<int>(std::min<int64_t>(kBlockM, p.seqlen_q - row0)));
  });
}

template <typename T>
void backward_impl(const AttentionParams& p, const ParallelFor& parallel_for) {
  std::vector<Accumulator<T>> delta(p.batch * p.num_heads * p.seqlen_q);
  compute_delta<T>(p, parallel_for, delta.data());

  const int64_t blocks_k = ceil_div(p.seqlen_k, kBlockN);
  parallel_for(p.batch * p.num_heads_kv * blocks_k, [&](int64_t task) {
    const int64_t block = task % blocks_k, bh = task / blocks_k;
    const int64_t col0 = block * kBlockN;
    backward_key_block<T>(p, delta.data(), bh / p.num_heads_kv, bh % p.num_heads_kv, col0,
                          static_cast<int>(std::min<int64_t>(kBlockN, p.seqlen_k - col0)));
  });

  const int64_t blocks_q = ceil_div(p.seqlen_q, kBlockM);
  parallel_for(p.batch * p.num_heads * blocks_q, [&](int64_t task) {
    const int64_t block = task % blocks_q, bh = task / blocks_q;
    const int64_t row0 = block * kBlockM;
    backward_query_block<T>(p, delta.data(), bh / p.num_heads, bh % p.num_heads, row0,
                            static_cast<int>(std::min<int64_t>(kBlockM, p.seqlen_q - row0)));
  });
}

template <template <typename> class Fn, typename... Args>
void dispatch_element_type(ElementType type, Args&&... args) {
  switch (type) {
    case ElementType::kFloat32: return Fn<float>::run(args...);
    case ElementType::kFloat16: return Fn<Float16>::run(args...);
    case ElementType::kBFloat16: return Fn<BFloat16>::run(args...);
  }
}

template <typename T> struct Forward {
  static void run(const AttentionParams& p, const ParallelFor& pf) { forward_impl<T>(p, pf); }
};
template <typename T> struct Backward {
  static void run(const AttentionParams& p, const ParallelFor& pf) { backward_impl<T>(p, pf); }
};

}  // namespace

void attention_forward(const AttentionParams& p, const ParallelFor& parallel_for) {
  dispatch_element_type<Forward>(p.element_type, p, parallel_for);
}

void attention_backward(const AttentionParams& p, const ParallelFor& parallel_for) {
  dispatch_element_type<Backward>(p.element_type, p, parallel_for);
}

}  // namespace jax_flash::cpu
