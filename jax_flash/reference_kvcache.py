"""flash_attn_with_kvcache's semantics in plain jax.numpy, for tests and documentation.

Written independently of jax_flash.kvcache (which scatters into the cache and calls the
kernel): here every cache page looks up the batch row that owns it and takes that row's new
keys where they fall, each batch row's keys are gathered from the cache into a contiguous
array, right-aligned so that one bottom-right diagonal serves every row, and
reference_attention masks what a row may not see through segment ids. It materializes all
of that, so it is for small inputs; it computes in the dtype it is given (float64 inputs,
with jax_enable_x64, for a high-precision reference).
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jax_flash.reference import reference_attention

# Integer arguments are clamped into [-_BOUND, _BOUND] (lengths into [-seqlen_new, _BOUND])
# before they become int32, as flash_attn_with_kvcache does (its MAX_CACHE_SEQLEN): a row
# holds at most 2**29 keys, so the clamp changes no result, and no value wraps around.
_BOUND = 1 << 30


def _clamped_int32(x, lower, upper=_BOUND):
    """x (a Python int, a NumPy or a JAX integer array) clamped into [lower, upper], as an
    int32 JAX array. NumPy input is clamped by NumPy in its own width: with x64 off, jnp
    would first truncate int64 to 32 bits (2**32 + 5 would become 5)."""
    if isinstance(x, numbers.Integral):
        return jnp.asarray(min(max(int(x), lower), upper), jnp.int32)
    xp = np if isinstance(x, (np.ndarray, np.generic)) else jnp
    x = xp.asarray(x)
    if xp.issubdtype(x.dtype, xp.unsignedinteger):
        if x.dtype.itemsize >= 4:
            x = xp.minimum(x, upper)            # now fits int32
        x = x.astype(xp.int32)
    elif x.dtype.itemsize > 4:
        x = xp.clip(x, lower, upper)            # in int64
    return jnp.clip(jnp.asarray(x.astype(xp.int32)), lower, upper)


def reference_rotary(x, cos, sin, positions, interleaved=True):
    """x (batch, seqlen, heads, head_dim) with its first rotary_dim = 2 * cos.shape[1] dims
    rotated by the angles of cos / sin (seqlen_ro, rotary_dim / 2) at positions (batch,
    seqlen), clamped into the table. interleaved: dims (2i, 2i+1) form the complex number
    x[2i] + i x[2i+1]; otherwise (GPT-NeoX) x * cos + rotate_half(x) * sin over the halves."""
    half = cos.shape[1]
    real = jnp.promote_types(x.dtype, jnp.float32)
    positions = jnp.clip(positions, 0, cos.shape[0] - 1)
    c = cos.astype(real)[positions][:, :, None, :]
    s = sin.astype(real)[positions][:, :, None, :]
    head = x[..., :2 * half].astype(real)
    if interleaved:
        z = jax.lax.complex(head[..., 0::2], head[..., 1::2]) * jax.lax.complex(c, s)
        rotated = jnp.stack([jnp.real(z), jnp.imag(z)], axis=-1).reshape(head.shape)
    else:
        rotate_half = jnp.concatenate([-head[..., half:], head[..., :half]], axis=-1)
        rotated = head * jnp.concatenate([c, c], -1) + rotate_half * jnp.concatenate([s, s], -1)
    return jnp.concatenate([rotated.astype(x.dtype), x[..., 2 * half:]], axis=-1)


def _page_table(batch, cache_batch_idx, block_table):
    """(batch, max_blocks): the page holding each block of page_size keys of each row. A
    contiguous cache is one page (its cache row) of capacity keys per batch row."""
    if block_table is not None:
        return _clamped_int32(block_table, -_BOUND)
    rows = (jnp.arange(batch) if cache_batch_idx is None
            else _clamped_int32(cache_batch_idx, -_BOUND))
    return rows[:, None]


def _append(cache, new, table, cached):
    """The cache after the append: each page looks up the (row b, block) that owns it in
    the table, and its slots that are positions cached[b] .. cached[b] + seqlen_new - 1 of
    that row take the new rows; everything else stays. Table entries that name no page own
    nothing, so their writes vanish. (A page owned twice takes its first owner's writes.)"""
    num_pages, page_size = cache.shape[:2]
    max_blocks = table.shape[1]
    owners = table.reshape(-1)[None, :] == jnp.arange(num_pages)[:, None]
    owned, first = jnp.any(owners, axis=1), jnp.argmax(owners, axis=1)
    b, block = first // max_blocks, first % max_blocks                    # (num_pages,)
    position = block[:, None] * page_size + jnp.arange(page_size)[None, :]  # (pages, slots)
    start = cached[b][:, None]
    written = owned[:, None] & (position >= start) & (position < start + new.shape[1])
    values = new[b[:, None], jnp.clip(position - start, 0, new.shape[1] - 1)]
    return jnp.where(written[:, :, None, None], values, cache)


def reference_attn_with_kvcache(
    q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
    cache_batch_idx=None, block_table=None, softmax_scale=None, causal=False,
    window_size=(-1, -1), softcap=0.0, rotary_interleaved=True, alibi_slopes=None,
    num_splits=0, return_lse=False,
):
    """flash_attn_with_kvcache's results (same arguments, same return order), computed in
    plain jnp. num_splits is accepted and ignored."""
    del num_splits
    batch, seqlen_q = q.shape[:2]
    num_pages, page_size = k_cache.shape[:2]
    capacity = page_size * (block_table.shape[1] if block_table is not None else 1)
    seqlen_new = 0 if k is None else k.shape[1]
    if cache_seqlens is None:
        cached = jnp.full((batch,), capacity, jnp.int32)
    else:
        # Clamped first, so cached + seqlen_new cannot overflow int32 either.
        cached = jnp.broadcast_to(_clamped_int32(cache_seqlens, -seqlen_new), (batch,))

    if rotary_cos is not None:
        k = reference_rotary(k, rotary_cos, rotary_sin, cached[:, None] + jnp.arange(seqlen_new),
                             rotary_interleaved)
        # FlashAttention's rule: queries move under a causal or local mask, where a window
        # side >= the capacity counts as unbounded.
        moving = causal or any(0 <= side < capacity for side in window_size)
        steps = jnp.arange(seqlen_q) if moving else jnp.zeros(seqlen_q, jnp.int32)
        q = reference_rotary(q, rotary_cos, rotary_sin, cached[:, None] + steps, rotary_interleaved)

    table = _page_table(batch, cache_batch_idx, block_table)
    if seqlen_new:
        k_cache = _append(k_cache, k, table, cached)
        v_cache = _append(v_cache, v, table, cached)

    # Key j of row b: page table[b, j // page_size], slot j % page_size; readable if the
    # cache has that page (or row).
    j = jnp.arange(capacity)[None, :]
    page = table[:, jnp.arange(capacity) // page_size]
    slot = jnp.broadcast_to(j % page_size, page.shape)
    readable = (page >= 0) & (page < num_pages)
    count = jnp.clip(cached + seqlen_new, 0, capacity)
    visible = readable & (j < count[:, None])
    safe_page = jnp.clip(page, 0, num_pages - 1)
    keys, values = k_cache[safe_page, slot], v_cache[safe_page, slot]   # (batch, capacity, hk, d)

    # Right-align each row's keys: key j of row b goes to column j + capacity - count[b], so
    # the common bottom-right diagonal (capacity - seqlen_q) is each row's own diagonal
    # (count[b] - seqlen_q); columns left of a row's keys, and keys it cannot see, get
    # segment id 1 against the queries' 0.
    column = jnp.arange(capacity)[None, :]
    source = column - (capacity - count)[:, None]
    inside = source >= 0
    source = jnp.clip(source, 0, capacity - 1)

    def take(x):  # x (batch, capacity, ...) right-aligned
        return jnp.take_along_axis(x, source.reshape(source.shape + (1,) * (x.ndim - 2)), axis=1)

    kv_ids = jnp.where(inside & take(visible), 0, 1).astype(jnp.int32)
    # Over these capacity columns a window side of capacity + seqlen_q already hides
    # nothing; wider sides are cut to it, which keeps the mask arithmetic small.
    window_size = tuple(min(int(side), capacity + seqlen_q) for side in window_size)
    results = reference_attention(
        q, take(keys), take(values), softmax_scale=softmax_scale, causal=causal,
        window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
        return_lse=return_lse, q_segment_ids=jnp.zeros((batch, seqlen_q), jnp.int32),
        kv_segment_ids=kv_ids)
    results = results if return_lse else (results,)
    if k is not None:
        results = tuple(results) + (k_cache, v_cache)
    return results[0] if len(results) == 1 else tuple(results)
