"""Attention dropout's mask, specified in jax.numpy.

The kernels (csrc/common/dropout.h) draw the same bits; this module is what they are held
to, and what a test or a user calls to see which probabilities a call dropped.

Each (batch, head) gets its own 64-bit Philox4x32-10 key, two words of
``jax.random.bits(dropout_key, (batch, num_heads, 2), uint32)``. Element (query i, key j)
is kept iff a 16-bit slice of one Philox output is below ``keep_threshold(dropout_p)``:
the counter is ((j // 32) * 8 + j % 8, (i // 16) * 8 + i % 8, 0, 0) and the slice is
number 4 * ((j // 16) % 2) + 2 * ((i // 8) % 2) + (j // 8) % 2 of the eight 16-bit
halves of the output words (low half first). That grouping gives each call's eight draws
to one GPU thread in both of the kernels' tile layouts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
KEEP_RESOLUTION = 1 << 16  # draws are 16-bit


def _mul_hi_lo(a, b):
    """(high, low) 32-bit words of the 64-bit product of uint32 a and the constant b,
    computed in uint32 (no x64 needed)."""
    b = jnp.uint32(b)
    a_lo, a_hi = a & 0xFFFF, a >> 16
    b_lo, b_hi = b & 0xFFFF, b >> 16
    lo_lo, lo_hi, hi_lo, hi_hi = a_lo * b_lo, a_lo * b_hi, a_hi * b_lo, a_hi * b_hi
    middle = (lo_lo >> 16) + (lo_hi & 0xFFFF) + (hi_lo & 0xFFFF)
    high = hi_hi + (lo_hi >> 16) + (hi_lo >> 16) + (middle >> 16)
    return high, a * b


def philox4x32_10(counter, key):
    """Philox4x32 with 10 rounds: four uint32 counter words and two key words (arrays that
    broadcast together) -> the four output words."""
    c0, c1, c2, c3 = (jnp.asarray(c, jnp.uint32) for c in counter)
    k0, k1 = (jnp.asarray(k, jnp.uint32) for k in key)
    for _ in range(10):
        hi0, lo0 = _mul_hi_lo(c0, _PHILOX_M[0])
        hi1, lo1 = _mul_hi_lo(c2, _PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = k0 + jnp.uint32(_PHILOX_W[0]), k1 + jnp.uint32(_PHILOX_W[1])
    return c0, c1, c2, c3


def keep_threshold(dropout_p):
    """The 16-bit draw below which an element is kept: (1 - p) * 2^16, rounded."""
    return int(round((1.0 - float(dropout_p)) * KEEP_RESOLUTION))


def keep_scale(dropout_p):
    """What kept probabilities are multiplied by: 1 / (exact keep probability)."""
    return KEEP_RESOLUTION / keep_threshold(dropout_p)


def kernel_fields(dropout_p):
    """KernelConfig's dropout fields for a checked dropout_p (0 turns dropout off)."""
    return dict(has_dropout=dropout_p > 0.0, dropout_keep_threshold=keep_threshold(dropout_p),
                dropout_scale=keep_scale(dropout_p))


def _check_key(dropout_key):
    dtype = getattr(dropout_key, "dtype", None)
    if dtype is None:
        raise TypeError(f"dropout_key must be a JAX PRNG key, got {type(dropout_key).__name__}")
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
        if dropout_key.shape != ():
            raise ValueError(
                f"dropout_key must be a single PRNG key (shape ()), got shape {dropout_key.shape}; "
                "vmap over keys to use several")
    elif dtype != jnp.uint32 or dropout_key.ndim != 1:
        raise TypeError(
            "dropout_key must be a PRNG key (jax.random.key(seed), or a raw uint32 key from "
            f"jax.random.PRNGKey), got dtype {dtype} and shape {dropout_key.shape}")


def seeds(dropout_key, batch, num_heads, broadcast_batch=False):
    """The Philox key of every (batch, head): uint32 (batch, num_heads, 2). With
    broadcast_batch, every batch row gets row 0's keys (one mask for the whole batch, as
    Flax's broadcast_dropout asks)."""
    _check_key(dropout_key)
    if broadcast_batch:
        head_seeds = jax.random.bits(dropout_key, (1, num_heads, 2), jnp.uint32)
        return jnp.broadcast_to(head_seeds, (batch, num_heads, 2))
    return jax.random.bits(dropout_key, (batch, num_heads, 2), jnp.uint32)


def mask_from_seeds(head_seeds, dropout_p, seqlen_q, seqlen_k):
    """Boolean (batch, num_heads, seqlen_q, seqlen_k): which probabilities are kept."""
    query = jnp.arange(seqlen_q, dtype=jnp.uint32)[:, None]
    key = jnp.arange(seqlen_k, dtype=jnp.uint32)[None, :]
    counter = ((key >> 5) * 8 + (key & 7), (query >> 4) * 8 + (query & 7), 0, 0)
    slot = ((key >> 4) & 1) * 4 + ((query >> 3) & 1) * 2 + ((key >> 3) & 1)
    words = philox4x32_10(counter, (head_seeds[..., 0, None, None], head_seeds[..., 1, None, None]))
    word = jnp.select([slot // 2 == w for w in range(3)], list(words[:3]), words[3])
    draw = (word >> (16 * (slot % 2))) & 0xFFFF
    return draw < jnp.uint32(keep_threshold(dropout_p))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def dropout_mask(dropout_key, dropout_p, batch, num_heads, seqlen_q, seqlen_k,
                 broadcast_batch=False):
    """Which attention probabilities flash_attn_func(..., dropout_p, dropout_key=...) keeps
    for inputs of these sizes: boolean (batch, num_heads, seqlen_q, seqlen_k). Kept ones
    are scaled by keep_scale(dropout_p). For tests and inspection: it materializes the mask.
    Sizes and dropout_p are static.
    """
    head_seeds = seeds(dropout_key, batch, num_heads, broadcast_batch)
    return mask_from_seeds(head_seeds, dropout_p, seqlen_q, seqlen_k)


__all__ = ["dropout_mask", "keep_scale", "keep_threshold", "philox4x32_10"]
