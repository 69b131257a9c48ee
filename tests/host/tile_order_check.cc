// Host check of the persistent Hopper kernels' tile order (csrc/cuda/hopper/tile_order.cuh):
// over grids of blocks, heads and CTA counts, every (head, index) tile is taken exactly once,
// paired units add up to the same causal work (index sum blocks - 1), and the paired order's
// first tiles of the first `ctas` units lie on no more heads than the unpaired order's.
// Usage: tile_order_check. Prints "checked N mismatches M".
#include <cstdio>
#include <vector>

#include "cuda/hopper/tile_order.cuh"

using jax_flash::cuda::OrderedTile;
using jax_flash::cuda::TileOrder;

namespace {

long checked = 0, mismatches = 0;

void expect(bool ok, const char* what, bool paired, int blocks, int heads, int ctas) {
  ++checked;
  if (ok) return;
  if (mismatches++ < 10)
    std::printf("mismatch in %s: paired %d blocks %d heads %d ctas %d\n", what, paired, blocks,
                heads, ctas);
}

template <bool kPaired>
void check(int blocks, int heads, int ctas) {
  const TileOrder<kPaired> order{blocks, heads};
  std::vector<int> taken(static_cast<size_t>(blocks) * heads, 0);
  std::vector<char> first_heads(heads, 0);
  for (int cta = 0; cta < ctas; ++cta) {
    const int own = order.own_tiles(cta, ctas);
    expect(own % TileOrder<kPaired>::kTilesPerUnit == 0, "own_tiles whole units", kPaired,
           blocks, heads, ctas);
    for (int own_tile = 0; own_tile < own; ++own_tile) {
      const OrderedTile tile = order.tile(cta, ctas, own_tile);
      if (!tile.exists) continue;
      const bool inside = tile.head >= 0 && tile.head < heads && tile.index >= 0 &&
                          tile.index < blocks;
      expect(inside, "tile inside the grid", kPaired, blocks, heads, ctas);
      if (!inside) continue;
      ++taken[static_cast<size_t>(tile.head) * blocks + tile.index];
      if (own_tile == 0) first_heads[tile.head] = 1;
      if (kPaired && own_tile % 2 == 1) {
        const OrderedTile first = order.tile(cta, ctas, own_tile - 1);
        expect(first.index + tile.index == blocks - 1, "paired work adds up", kPaired, blocks,
               heads, ctas);
      }
    }
  }
  for (int count : taken) expect(count == 1, "every tile once", kPaired, blocks, heads, ctas);
  // The tiles running at once: the unpaired order's first `ctas` tiles span
  // ceil(ctas / blocks) heads, or one more where they straddle a boundary.
  int spanned = 0;
  for (char used : first_heads) spanned += used;
  const int plain_span = (ctas + blocks - 1) / blocks + 1;
  expect(spanned <= plain_span, "first tiles on few heads", kPaired, blocks, heads, ctas);
}

}  // namespace

int main() {
  for (int blocks = 1; blocks <= 70; blocks += (blocks < 12 ? 1 : 7))
    for (int heads = 1; heads <= 13; ++heads)
      for (int ctas : {1, 2, 3, 7, 66, 132}) {
        check<false>(blocks, heads, ctas);
        check<true>(blocks, heads, ctas);
      }
  std::printf("checked %ld mismatches %ld\n", checked, mismatches);
  return mismatches == 0 ? 0 : 1;
}
