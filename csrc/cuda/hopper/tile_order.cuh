// The order in which the persistent Hopper kernels take their tiles (a tile: one row block
// of the forward, one key block of the backward, of one (batch, head)).
// Host-compilable: tests/test_host_checks.py checks that every tile is taken once.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define JAX_FLASH_ORDER_INLINE __host__ __device__ __forceinline__
#else
#define JAX_FLASH_ORDER_INLINE inline
#endif

namespace jax_flash::cuda {

// A tile as the order names it: `head` counts (batch, head) pairs (batch-major), `index`
// counts a head's blocks from the one with the most work under a causal mask (the caller
// maps it to a block: the forward's last row block, the backward's first key block).
struct OrderedTile {
  int head, index;
  bool exists;  // false for a paired unit's missing second tile
};

// CTA c takes units c, c + ctas, ...; a unit is kTilesPerUnit tiles, taken in turn.
// Unpaired (no mask window: every tile's work is equal), a unit is one tile, and units run
// through one head's blocks before the next head's.
// Paired (a mask window makes the work differ), a unit is index i of head 2h and index
// blocks - 1 - i of head 2h + 1: under a causal mask every unit has the same work, so the
// CTAs stay balanced. Pairing across two heads rather than within one keeps the tiles that
// run at once (the first tiles of consecutive units, then the second ones) on as few heads
// as the unpaired order: within one head, 132 CTAs would span three heads' Q, dO and dQ (or
// K and V) in L2 at a time. An odd last head pairs its own indices i and blocks - 1 - i.
template <bool kPaired>
struct TileOrder {
  static constexpr int kTilesPerUnit = kPaired ? 2 : 1;
  int blocks, heads;  // blocks per head; (batch, head) pairs

  JAX_FLASH_ORDER_INLINE int64_t units() const {
    if constexpr (!kPaired) return int64_t{blocks} * heads;
    return int64_t{heads / 2} * blocks + (heads % 2) * ((blocks + 1) / 2);
  }
  // The tiles CTA `cta` of `ctas` takes (a paired unit counts two, existing or not).
  JAX_FLASH_ORDER_INLINE int own_tiles(int cta, int ctas) const {
    return kTilesPerUnit * static_cast<int>((units() - cta + ctas - 1) / ctas);
  }
  JAX_FLASH_ORDER_INLINE OrderedTile tile(int cta, int ctas, int own_tile) const {
    const int unit = cta + (own_tile / kTilesPerUnit) * ctas;
    if constexpr (!kPaired) return {unit / blocks, unit % blocks, true};
    const bool second = own_tile % 2 == 1;
    const int cross_units = (heads / 2) * blocks;
    if (unit < cross_units) {
      const int within = unit % blocks;
      return {2 * (unit / blocks) + second, second ? blocks - 1 - within : within, true};
    }
    const int within = unit - cross_units, index = second ? blocks - 1 - within : within;
    return {heads - 1, index, !second || index != within};
  }
};

}  // namespace jax_flash::cuda
