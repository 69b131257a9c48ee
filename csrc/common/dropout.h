// Attention dropout's random bits: Philox4x32-10 (Salmon et al., "Parallel random numbers:
// as easy as 1, 2, 3", SC'11) keyed per (batch, head), with a fixed map from (query, key)
// to a 16-bit slice of one Philox output. jax_flash/dropout.py implements the same map in
// jax.numpy; it is the specification, and tests hold the CPU and CUDA kernels to it.
//
// One Philox call yields 128 bits = eight 16-bit draws. They go to the 2 x 4 elements
//   queries {y, y + 8} of a 16-query group  x  keys {x, x + 8, x + 16, x + 24} of a 32-key
//   group, y = query % 8, x = key % 8,
// which is a whole number of the elements one thread owns in an mma.sync accumulator
// tile, whether the tile is queries x keys (forward, dQ pass) or keys x queries (backward
// main kernel): each call's eight draws are all used by the thread that makes it.
#pragma once

#include <cstdint>

#include "common/attention_params.h"

namespace jax_flash {

struct PhiloxCounter {
  uint32_t key_word;    // counter word 0: (key / 32) * 8 + key % 8
  uint32_t query_word;  // counter word 1: (query / 16) * 8 + query % 8
};

JAX_FLASH_HOST_DEVICE inline PhiloxCounter dropout_counter(uint32_t query, uint32_t key) {
  return {(key >> 5) * 8u + (key & 7u), (query >> 4) * 8u + (query & 7u)};
}

// Which of the eight 16-bit draws of the call belongs to (query, key): draw `slot` is
// bits [16 * (slot & 1), +16) of output word slot / 2.
JAX_FLASH_HOST_DEVICE inline uint32_t dropout_slot(uint32_t query, uint32_t key) {
  return ((key >> 4) & 1u) * 4u + ((query >> 3) & 1u) * 2u + ((key >> 3) & 1u);
}

JAX_FLASH_HOST_DEVICE inline uint32_t mul_hi_u32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

struct PhiloxOutput {
  uint32_t word[4];
};

// Philox4x32 with 10 rounds on the counter (key_word, query_word, 0, 0).
JAX_FLASH_HOST_DEVICE inline PhiloxOutput philox4x32_10(uint32_t seed0, uint32_t seed1,
                                                         PhiloxCounter counter) {
  uint32_t c0 = counter.key_word, c1 = counter.query_word, c2 = 0, c3 = 0;
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mul_hi_u32(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const uint32_t hi1 = mul_hi_u32(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    c0 = hi1 ^ c1 ^ seed0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ seed1;
    c3 = lo0;
    seed0 += 0x9E3779B9u;
    seed1 += 0xBB67AE85u;
  }
  return {{c0, c1, c2, c3}};
}

JAX_FLASH_HOST_DEVICE inline uint32_t dropout_draw(const PhiloxOutput& bits, uint32_t slot) {
  return (bits.word[slot >> 1] >> (16u * (slot & 1u))) & 0xFFFFu;
}

// The Philox key of (batch, head): two words of the seeds operand.
JAX_FLASH_HOST_DEVICE inline const uint32_t* dropout_seed(const AttentionParams& p, int64_t batch,
                                                          int64_t head) {
  return p.dropout_seeds + 2 * (batch * p.num_heads + head);
}

// Whether dropout keeps (query, key) of (batch, head): one Philox call per element, for
// code that does not share calls across elements (the CPU kernels, tests).
JAX_FLASH_HOST_DEVICE inline bool dropout_keeps(const AttentionParams& p, int64_t batch,
                                                int64_t head, uint32_t query, uint32_t key) {
  const uint32_t* seed = dropout_seed(p, batch, head);
  const PhiloxOutput bits = philox4x32_10(seed[0], seed[1], dropout_counter(query, key));
  return dropout_draw(bits, dropout_slot(query, key)) < p.dropout_keep_threshold;
}

}  // namespace jax_flash
