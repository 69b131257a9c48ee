// Building blocks shared by the CPU forward and backward passes: moving a tile of rows
// between storage and scratch in the accumulator type, and turning Q·Kᵀ into masked,
// capped, biased scores.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "common/attention_params.h"
#include "cpu/numeric.h"

namespace jax_flash::cpu {

inline constexpr int kBlockM = 64;  // query rows per tile
inline constexpr int kBlockN = 64;  // key rows per tile

// The arithmetic type of a call: float32 for 16-bit inputs (as on the GPU), float64 for
// float32 inputs, so that the CPU path stays at least as accurate as plain float32
// attention even though it recomputes probabilities from a stored lse.
template <typename T> struct AccumulatorOf { using type = float; };
template <> struct AccumulatorOf<float> { using type = double; };
template <typename T> using Accumulator = typename AccumulatorOf<T>::type;

template <typename A>
inline constexpr A kNegInf = -std::numeric_limits<A>::infinity();

template <typename T>
const T* row_ptr(const void* base, const TensorStrides& s, int64_t b, int64_t row, int64_t head) {
  return static_cast<const T*>(base) + b * s.batch + row * s.row + head * s.head;
}

template <typename T>
T* row_ptr(void* base, const TensorStrides& s, int64_t b, int64_t row, int64_t head) {
  return static_cast<T*>(base) + b * s.batch + row * s.row + head * s.head;
}

// dst[r * d + c] = src row (row0 + r), column c.
template <typename T, typename A>
void load_rows(const void* base, const TensorStrides& s, int64_t b, int64_t head, int64_t row0,
               int rows, int64_t d, A* dst) {
  for (int r = 0; r < rows; ++r) {
    const T* src = row_ptr<T>(base, s, b, row0 + r, head);
    for (int64_t c = 0; c < d; ++c) dst[r * d + c] = to_float(src[c]);
  }
}

// dst[c * ld + r] = src row (row0 + r), column c: keys laid out so that Q·Kᵀ vectorizes
// over keys without reassociating float sums.
template <typename T, typename A>
void load_rows_transposed(const void* base, const TensorStrides& s, int64_t b, int64_t head,
                          int64_t row0, int rows, int64_t d, int ld, A* dst) {
  for (int r = 0; r < rows; ++r) {
    const T* src = row_ptr<T>(base, s, b, row0 + r, head);
    for (int64_t c = 0; c < d; ++c) dst[c * ld + r] = to_float(src[c]);
  }
}

template <typename T, typename A>
void store_rows(const A* src, int rows, int64_t d, void* base, const TensorStrides& s,
                int64_t b, int64_t head, int64_t row0) {
  for (int r = 0; r < rows; ++r) {
    T* dst = row_ptr<T>(base, s, b, row0 + r, head);
    for (int64_t c = 0; c < d; ++c) dst[c] = from_float<T>(static_cast<float>(src[r * d + c]));
  }
}

// c[m × n] = a[m × d] · bt[d × n] (bt row stride kBlockN).
template <typename A>
void matmul_abt(const A* a, const A* bt, int m, int n, int64_t d, A* c) {
  for (int i = 0; i < m; ++i) {
    A* c_row = c + i * kBlockN;
    for (int j = 0; j < n; ++j) c_row[j] = 0;
    const A* a_row = a + i * d;
    for (int64_t k = 0; k < d; ++k) {
      const A a_ik = a_row[k];
      const A* bt_row = bt + k * kBlockN;
      for (int j = 0; j < n; ++j) c_row[j] += a_ik * bt_row[j];
    }
  }
}

// acc[m × d] += w[m × n] · b[n × d] (w row stride kBlockN).
template <typename A>
void matmul_accumulate(const A* w, const A* b, int m, int n, int64_t d, A* acc) {
  for (int i = 0; i < m; ++i) {
    A* acc_row = acc + i * d;
    const A* w_row = w + i * kBlockN;
    for (int j = 0; j < n; ++j) {
      const A w_ij = w_row[j];
      if (w_ij == 0) continue;
      const A* b_row = b + j * d;
      for (int64_t k = 0; k < d; ++k) acc_row[k] += w_ij * b_row[k];
    }
  }
}

// acc[n × d] += wᵀ · a, with w [m × n] (row stride kBlockN) and a [m × d].
template <typename A>
void matmul_at_accumulate(const A* w, const A* a, int m, int n, int64_t d, A* acc) {
  for (int i = 0; i < m; ++i) {
    const A* w_row = w + i * kBlockN;
    const A* a_row = a + i * d;
    for (int j = 0; j < n; ++j) {
      const A w_ij = w_row[j];
      if (w_ij == 0) continue;
      A* acc_row = acc + j * d;
      for (int64_t k = 0; k < d; ++k) acc_row[k] += w_ij * a_row[k];
    }
  }
}

// The segment ids of query rows row0.. and key rows col0.. of batch row b, or nulls when
// the call has none.
struct SegmentIds {
  const int32_t* q = nullptr;
  const int32_t* kv = nullptr;

  static SegmentIds of(const AttentionParams& p, int64_t b, int64_t row0, int64_t col0) {
    if (!p.has_segment_ids()) return {};
    return {p.q_segment_ids + b * p.seqlen_q + row0, p.kv_segment_ids + b * p.seqlen_k + col0};
  }

  // Whether some query of the m rows may share a segment with some key of the n keys:
  // tiles whose id ranges cannot meet are skipped.
  bool meet(int m, int n) const {
    if (q == nullptr || m == 0 || n == 0) return true;
    const auto q_range = std::minmax_element(q, q + m);
    const auto kv_range = std::minmax_element(kv, kv + n);
    return *q_range.first <= *kv_range.second && *kv_range.first <= *q_range.second;
  }
};

// Turns raw dot products s[m × n] (row stride kBlockN) for query rows row0.. and key rows
// col0.. into final scores: scale, softcap, ALiBi, then the window and segment masks (-inf).
// When softcap_grad is given it receives d(score)/d(scaled dot) = 1 - tanh², needed by
// the backward pass.
template <typename A>
void finish_scores(const AttentionParams& p, float alibi_slope, int64_t row0, int m,
                   int64_t col0, int n, const SegmentIds& segments, A* s, A* softcap_grad) {
  const int64_t offset = p.diagonal_offset;
  const bool capped = p.softcap > 0.0f;
  const A softcap = p.softcap, scale = p.softmax_scale, slope = alibi_slope;
  const A inv_cap = capped ? 1 / softcap : 0;
  for (int i = 0; i < m; ++i) {
    A* s_row = s + i * kBlockN;
    const int64_t diagonal = row0 + i + offset;  // the key aligned with this query
    for (int j = 0; j < n; ++j) {
      A x = s_row[j] * scale;
      if (capped) {
        const A t = std::tanh(x * inv_cap);
        x = softcap * t;
        if (softcap_grad) softcap_grad[i * kBlockN + j] = 1 - t * t;
      }
      const int64_t key = col0 + j;
      if (p.has_alibi()) x -= slope * static_cast<A>(std::llabs(diagonal - key));
      if ((p.window_left >= 0 && key < diagonal - p.window_left) ||
          (p.window_right >= 0 && key > diagonal + p.window_right) ||
          (segments.q != nullptr && segments.q[i] != segments.kv[j])) {
        x = kNegInf<A>;
      }
      s_row[j] = x;
    }
  }
}

inline float alibi_slope_for(const AttentionParams& p, int64_t b, int64_t head) {
  return p.has_alibi() ? p.alibi_slopes[b * p.num_heads + head] : 0.0f;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace jax_flash::cpu
