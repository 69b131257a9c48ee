// Host check of the CUDA kernels' mask arithmetic (csrc/cuda/key_window.cuh: visible(),
// tile_needs_mask() and the lanes' column ranges) against the CPU kernel's definition of
// which keys a query sees (visible_keys / visible_queries in common/attention_params.h), on
// random windows. Usage: key_window_check MODE SEED CASES, MODE one of none, causal, left,
// right, both. Prints "checked N mismatches M".
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>

#include "common/attention_params.h"
#include "cuda/key_window.cuh"

using jax_flash::AttentionParams;
using jax_flash::cuda::KeyWindow;

namespace {

long checked = 0, mismatches = 0;

void expect(bool kernel, bool cpu, const char* what, const AttentionParams& p, int a, int b, int c) {
  ++checked;
  if (kernel == cpu) return;
  if (mismatches++ < 10)
    std::printf("mismatch in %s: seqlen_q %lld seqlen_k %lld offset %lld window (%lld, %lld) "
                "at %d %d %d: kernel %d, cpu %d\n",
                what, static_cast<long long>(p.seqlen_q), static_cast<long long>(p.seqlen_k),
                static_cast<long long>(p.diagonal_offset), static_cast<long long>(p.window_left),
                static_cast<long long>(p.window_right), a, b, c, kernel, cpu);
}

bool cpu_visible(const AttentionParams& p, int query, int key) {
  const jax_flash::IndexRange keys = jax_flash::visible_keys(p, query, query + 1);
  return key >= keys.begin && key < keys.end;
}

template <bool kHasWindow>
void check_case(const AttentionParams& p, std::mt19937_64& rng) {
  const KeyWindow window = KeyWindow::make(p);
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  // Every (query, key) pair of a strip of queries, keys past seqlen_k included.
  const int query0 = pick(0, static_cast<int>(p.seqlen_q) - 1);
  const int query_end = query0 + 4 < p.seqlen_q ? query0 + 4 : static_cast<int>(p.seqlen_q);
  for (int key = 0; key < p.seqlen_k + 20; ++key) {
    const jax_flash::IndexRange queries = jax_flash::visible_queries(p, key, key + 1);
    for (int query = query0; query < query_end; ++query) {
      const bool kernel = window.visible<kHasWindow>(query, key);
      expect(kernel, cpu_visible(p, query, key), "visible", p, query, key, 0);
      if (key < p.seqlen_k)
        expect(kernel, query >= queries.begin && query < queries.end, "visible_queries", p,
               query, key, 0);
    }
  }
  // A lane's column ranges against the pairs they stand for, over the widths a lane covers
  // (up to 8 * 16 - 2t columns) from a first key or query anywhere, past seqlen_k included;
  // half the origins put a window edge inside the range.
  const int width = pick(1, 128);
  for (int query = query0; query < query_end; ++query) {
    int first_key = pick(0, static_cast<int>(p.seqlen_k) + 20);
    if (kHasWindow && pick(0, 1))
      first_key = query + window.diagonal_offset +
                  (pick(0, 1) ? window.right + 1 : -window.left) - pick(0, width);
    if (first_key < 0) first_key = 0;
    const auto keys = window.visible_key_columns<kHasWindow>(query, first_key);
    for (int column = 0; column < width; ++column)
      expect(keys.contains(column), cpu_visible(p, query, first_key + column),
             "visible_key_columns", p, query, first_key, column);
  }
  for (int sample = 0; sample < 8; ++sample) {
    const int key = pick(0, static_cast<int>(p.seqlen_k) + 20);
    int first_query = pick(0, static_cast<int>(p.seqlen_q) + 20);
    if (kHasWindow && pick(0, 1))
      first_query = key - window.diagonal_offset +
                    (pick(0, 1) ? window.left + 1 : -window.right) - pick(0, width);
    if (first_query < 0) first_query = 0;
    const auto queries = window.visible_query_columns<kHasWindow>(key, first_query);
    for (int column = 0; column < width; ++column)
      expect(queries.contains(column), cpu_visible(p, first_query + column, key),
             "visible_query_columns", p, key, first_query, column);
  }
  // A tile needs its mask exactly when one of its pairs is hidden; half the tiles end
  // within two keys of a window edge, where an off-by-one would show.
  const int q0 = pick(0, static_cast<int>(p.seqlen_q) - 1), q1 = q0 + pick(1, 40);
  int k0 = pick(0, static_cast<int>(p.seqlen_k) + 20), k1 = k0 + pick(1, 40);
  if (pick(0, 1)) {
    const int length = k1 - k0;
    const int edge = pick(0, 1) ? q0 + window.diagonal_offset + window.right + 1 + pick(-2, 2)
                                : q1 - 1 + window.diagonal_offset - window.left + pick(-2, 2);
    k0 = edge - (pick(0, 1) ? length : 0);
    if (k0 < 0) k0 = 0;
    k1 = k0 + length;
  }
  bool hidden = false;
  for (int q = q0; q < q1; ++q)
    for (int k = k0; k < k1; ++k) hidden = hidden || !cpu_visible(p, q, k);
  expect(window.tile_needs_mask<kHasWindow>(q0, q1, k0, k1), hidden, "tile_needs_mask", p, q0,
         k0, q1 - q0);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s none|causal|left|right|both SEED CASES\n", argv[0]);
    return 2;
  }
  const char* mode = argv[1];
  std::mt19937_64 rng(std::strtoull(argv[2], nullptr, 10));
  const long cases = std::strtol(argv[3], nullptr, 10);
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  for (long i = 0; i < cases; ++i) {
    AttentionParams p;
    p.seqlen_q = pick(1, 600);
    p.seqlen_k = pick(1, 600);
    p.diagonal_offset = pick(-700, 700);
    p.window_left = p.window_right = -1;
    if (!std::strcmp(mode, "causal")) p.window_right = 0;
    if (!std::strcmp(mode, "left") || !std::strcmp(mode, "both")) p.window_left = pick(0, 300);
    if (!std::strcmp(mode, "right") || !std::strcmp(mode, "both")) p.window_right = pick(0, 300);
    if (!std::strcmp(mode, "none")) {
      p.diagonal_offset = 0;  // without a window the diagonal plays no part
      check_case<false>(p, rng);
    }
    check_case<true>(p, rng);
  }
  std::printf("checked %ld mismatches %ld\n", checked, mismatches);
  return mismatches == 0 ? 0 : 1;
}
