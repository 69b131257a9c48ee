"""flash_attn_with_kvcache: attention of new queries over a KV cache, for inference.

The append (a scatter of the new keys and values into the cache) and the rotary embedding
are plain JAX, so under ``jax.jit`` with the caches donated XLA updates them in place; the
attention is one custom call, ``jax_flash_kvcache_forward``, that reads the updated caches
where they are (contiguous or paged) with per-row lengths. The run-time rules for lengths,
rows and pages out of range live in one place for every kernel: csrc/common/kv_cache.h.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_flash import _checks, _ffi

PAGE_SIZE_MULTIPLE = 16  # csrc/ffi/decode_kvcache.h checks the same
# cache_seqlens are clamped into [-seqlen_new, MAX_CACHE_SEQLEN] before any arithmetic, so
# that cache_seqlens + seqlen_new cannot overflow int32. No cache row may be longer (checked:
# MAX_CACHE_CAPACITY), so the clamp changes no result.
MAX_CACHE_SEQLEN = 1 << 30
# What the CUDA dispatcher accepts at run time (csrc/cuda/dispatch.cu: kMaxSeqlen for a cache
# row's capacity, kMaxGridYZ for batch and heads), checked at trace time on every platform.
MAX_CACHE_CAPACITY = 1 << 29
MAX_BATCH_OR_HEADS = 65535

_NO_DERIVATIVE = (
    "flash_attn_with_kvcache is inference-only and has no derivative (nor has "
    "FlashAttention's): differentiate flash_attn_func (or reference_attn_with_kvcache) instead"
)


@dataclasses.dataclass(frozen=True)
class KvCacheConfig:
    """The attributes of a jax_flash_kvcache_forward call (hashable: a jvp nondiff arg)."""

    softmax_scale: float
    softcap: float
    window_left: int
    window_right: int
    has_alibi: bool
    has_kv_batch_idx: bool
    has_block_table: bool
    num_splits: int

    def attributes(self) -> dict:
        return dict(
            softmax_scale=np.float32(self.softmax_scale),
            softcap=np.float32(self.softcap),
            window_left=np.int64(self.window_left),
            window_right=np.int64(self.window_right),
            has_alibi=bool(self.has_alibi),
            has_kv_batch_idx=bool(self.has_kv_batch_idx),
            has_block_table=bool(self.has_block_table),
            num_splits=np.int64(self.num_splits),
        )


class CacheLayout(NamedTuple):
    batch: int
    seqlen_q: int
    num_heads: int
    head_dim: int
    num_heads_kv: int
    paged: bool
    page_size: int      # keys per page; a contiguous cache row is one page of `capacity`
    max_blocks: int     # block_table's row length (1 when contiguous)
    capacity: int       # the keys one batch row can hold


# ---- trace-time checks ----

def _is_int(value):
    return isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, (bool, np.bool_))


def _as_int32(x):
    """An integer array as int32; wider values are clamped first so that none wraps around
    into range (a huge page id stays out of range, a huge length stays huge).

    A NumPy array is clamped by NumPy, in its own dtype: with x64 off (JAX's default) jnp
    would first convert an int64 / uint64 array to 32 bits, wrapping 2**32 + 5 to 5 (a
    block_table entry would then read and write another sequence's page). A JAX array is
    only 64-bit with x64 on, where jnp.clip keeps its dtype."""
    dtype = np.dtype(x.dtype)
    unsigned = np.issubdtype(dtype, np.unsignedinteger)
    if dtype.itemsize > 4 or (unsigned and dtype.itemsize == 4):
        lower = 0 if unsigned else -MAX_CACHE_SEQLEN
        if isinstance(x, (np.ndarray, np.generic)):
            return jnp.asarray(np.clip(x, lower, MAX_CACHE_SEQLEN).astype(np.int32))
        x = jnp.clip(x, lower, MAX_CACHE_SEQLEN)
    return jnp.asarray(x).astype(jnp.int32)


def _integer_array(x, name, shape, shape_text):
    got = _checks.array_shape(x, name)
    if got != shape:
        raise ValueError(f"{name} must have shape {shape_text} = {shape}, got {got}")
    dtype = jnp.dtype(x.dtype)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{name} must hold integers (int32), got {dtype}")
    return _as_int32(x)


def check_caches(q, k_cache, v_cache, cache_batch_idx, block_table):
    """Shapes and dtypes of q and the caches; returns the CacheLayout."""
    q_shape = _checks.array_shape(q, "q")
    if len(q_shape) != 4:
        raise ValueError(f"q must have rank 4 (batch, seqlen_q, num_heads, head_dim), got shape {q_shape}")
    batch, seqlen_q, num_heads, head_dim = q_shape
    for name, axis, size in (("batch", 0, batch), ("num_heads", 2, num_heads)):
        if size > MAX_BATCH_OR_HEADS:
            raise ValueError(
                f"q's {name} (q.shape[{axis}]) must be at most {MAX_BATCH_OR_HEADS} (the CUDA "
                f"kernels' grid limit), got {size}")
    paged = block_table is not None
    cache_text = ("(num_blocks, page_size, num_heads_kv, head_dim) (paged, with block_table)" if paged
                  else "(batch_cache, seqlen_cache, num_heads_kv, head_dim)")
    shapes = {}
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        shapes[name] = _checks.array_shape(cache, name)
        if len(shapes[name]) != 4:
            raise ValueError(f"{name} must have rank 4 {cache_text}, got shape {shapes[name]}")
    if shapes["k_cache"] != shapes["v_cache"]:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {shapes['k_cache']} "
                         f"and {shapes['v_cache']}")
    num_pages, page_size, num_heads_kv, cache_head_dim = shapes["k_cache"]
    if cache_head_dim != head_dim:
        raise ValueError(f"k_cache and v_cache must have the head_dim of q ({head_dim}), got {cache_head_dim}")
    if not 1 <= head_dim <= _checks.MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be between 1 and {_checks.MAX_HEAD_DIM}, got {head_dim}")
    if num_heads_kv < 1 or num_heads % num_heads_kv != 0:
        raise ValueError(
            f"the number of query heads ({num_heads}) must be a multiple of the number of "
            f"key/value heads in the cache ({num_heads_kv})")
    dtype = jnp.dtype(q.dtype)
    if dtype not in _checks.SUPPORTED_DTYPES:
        raise TypeError(f"q must be float32, float16 or bfloat16, got {dtype}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if jnp.dtype(cache.dtype) != dtype:
            raise TypeError(f"{name} must have the dtype of q ({dtype}), got {jnp.dtype(cache.dtype)}")

    if paged:
        if cache_batch_idx is not None:
            raise ValueError(
                "cache_batch_idx cannot be combined with block_table (as in FlashAttention): "
                "a paged cache picks each row's pages through block_table")
        table_shape = _checks.array_shape(block_table, "block_table")
        if len(table_shape) != 2 or table_shape[0] != batch or table_shape[1] < 1:
            raise ValueError(
                f"block_table must have shape (batch, max_blocks_per_seq) = ({batch}, >= 1), "
                f"got {table_shape}")
        if not jnp.issubdtype(jnp.dtype(block_table.dtype), jnp.integer):
            raise TypeError(f"block_table must hold integers (int32), got {jnp.dtype(block_table.dtype)}")
        if page_size < 1 or page_size % PAGE_SIZE_MULTIPLE:
            raise ValueError(
                f"the page size (k_cache.shape[1] of a paged cache) must be a positive multiple "
                f"of {PAGE_SIZE_MULTIPLE}, got {page_size}")
        max_blocks = table_shape[1]
        capacity = max_blocks * page_size
        capacity_text = (f"block_table.shape[1] * page_size = {max_blocks} * {page_size} "
                         f"= {capacity}")
    else:
        if cache_batch_idx is None and num_pages < batch:
            raise ValueError(
                f"k_cache has {num_pages} rows but q has batch {batch}: without cache_batch_idx, "
                f"batch row b reads cache row b")
        if page_size < 1:
            raise ValueError(
                "k_cache and v_cache hold no key per row (seqlen_cache = k_cache.shape[1] "
                "is 0): a cache row must hold at least one key")
        max_blocks, capacity = 1, page_size
        capacity_text = f"seqlen_cache = k_cache.shape[1] = {capacity}"
    if capacity > MAX_CACHE_CAPACITY:
        raise ValueError(
            f"a cache row may hold at most 2**29 keys (the CUDA kernels' limit), this one "
            f"holds {capacity_text}")
    return CacheLayout(batch, seqlen_q, num_heads, head_dim, num_heads_kv, paged, page_size,
                       max_blocks, capacity)


def check_new_kv(k, v, layout, dtype):
    """The new keys and values to append: returns seqlen_new (0 without them)."""
    if k is None and v is None:
        return 0
    if k is None or v is None:
        raise ValueError("k and v (the new keys and values to append) must be given together")
    expected = (layout.batch, None, layout.num_heads_kv, layout.head_dim)
    for name, x in (("k", k), ("v", v)):
        shape = _checks.array_shape(x, name)
        if len(shape) != 4 or any(e is not None and e != g for e, g in zip(expected, shape)):
            raise ValueError(
                f"{name} must have shape (batch, seqlen_new, num_heads_kv, head_dim) = "
                f"({layout.batch}, seqlen_new, {layout.num_heads_kv}, {layout.head_dim}), got {shape}")
        if jnp.dtype(x.dtype) != jnp.dtype(dtype):
            raise TypeError(f"{name} must have the dtype of q ({jnp.dtype(dtype)}), got {jnp.dtype(x.dtype)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
    return k.shape[1]


def check_cache_seqlens(cache_seqlens, layout, seqlen_new):
    """(batch,) int32 keys already in each row before the append, clamped into
    [-seqlen_new, MAX_CACHE_SEQLEN]; None = a full cache (capacity)."""
    batch = layout.batch
    if cache_seqlens is None:
        if seqlen_new:
            raise ValueError(
                "k and v are written at positions cache_seqlens[b]..: pass cache_seqlens "
                "(None means every cache row is full, leaving no room to append)")
        return jnp.full((batch,), layout.capacity, jnp.int32)
    if _is_int(cache_seqlens):
        value = int(np.clip(int(cache_seqlens), -seqlen_new, MAX_CACHE_SEQLEN))
        return jnp.full((batch,), value, jnp.int32)
    shape = _checks.array_shape(cache_seqlens, "cache_seqlens")
    if shape not in ((), (batch,)):
        raise ValueError(f"cache_seqlens must be an int or have shape (batch,) = ({batch},), got {shape}")
    dtype = jnp.dtype(cache_seqlens.dtype)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"cache_seqlens must hold integers (int32), got {dtype}")
    if seqlen_new == 0 and dtype == jnp.int32 and shape == (batch,):
        # Read-only: the kernels clamp lengths into [0, capacity] themselves
        # (common/kv_cache.h), so int32 lengths go in as they are, with no op before the call.
        return cache_seqlens
    lengths = jnp.broadcast_to(_as_int32(cache_seqlens), (batch,))
    return jnp.clip(lengths, -seqlen_new, MAX_CACHE_SEQLEN)


def check_rotary(rotary_cos, rotary_sin, rotary_interleaved, head_dim, seqlen_new):
    """Returns (cos, sin) or None."""
    if not isinstance(rotary_interleaved, (bool, np.bool_)):
        raise TypeError(f"rotary_interleaved must be a bool, got {type(rotary_interleaved).__name__}")
    if rotary_cos is None and rotary_sin is None:
        return None
    if rotary_cos is None or rotary_sin is None:
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if not seqlen_new:
        raise ValueError(
            "rotary_cos / rotary_sin rotate the new k (and q) at their cache positions, so they "
            "need k and v (as in FlashAttention); rotate q yourself for a call without k and v")
    shape = _checks.array_shape(rotary_cos, "rotary_cos")
    sin_shape = _checks.array_shape(rotary_sin, "rotary_sin")
    if len(shape) != 2:
        raise ValueError(f"rotary_cos must have rank 2 (seqlen_ro, rotary_dim / 2), got shape {shape}")
    if sin_shape != shape:
        raise ValueError(f"rotary_sin must have the shape of rotary_cos {shape}, got {sin_shape}")
    seqlen_ro, half = shape
    if seqlen_ro < 1:
        raise ValueError("rotary_cos / rotary_sin must have at least one position (seqlen_ro >= 1)")
    if not 1 <= half or 2 * half > head_dim:
        raise ValueError(
            f"rotary_dim = 2 * rotary_cos.shape[1] = {2 * half} must be between 2 and "
            f"head_dim ({head_dim})")
    for name, x in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        if not jnp.issubdtype(jnp.dtype(x.dtype), jnp.floating):
            raise TypeError(f"{name} must be a floating-point array, got {jnp.dtype(x.dtype)}")
    return rotary_cos, rotary_sin


def check_num_splits(num_splits):
    if not _is_int(num_splits):
        raise TypeError(f"num_splits must be an int, got {type(num_splits).__name__}")
    if not 0 <= num_splits <= _ffi.MAX_KVCACHE_SPLITS:
        raise ValueError(f"num_splits must be in [0, {_ffi.MAX_KVCACHE_SPLITS}] "
                         f"(0 = choose automatically), got {num_splits}")
    return int(num_splits)


# ---- rotary embedding and the append, in JAX ----

def apply_rotary(x, cos, sin, positions, interleaved):
    """x (batch, seqlen, heads, head_dim) rotated at integer positions (batch, seqlen) by the
    tables cos, sin (seqlen_ro, rotary_dim / 2): pairs (2i, 2i+1) when interleaved, else
    (i, i + rotary_dim / 2) (GPT-NeoX). Dims past rotary_dim are unchanged. Positions are
    clamped into the table; the arithmetic is float32 (float64 for float64 x)."""
    half = cos.shape[1]
    compute = jnp.promote_types(x.dtype, jnp.float32)
    positions = jnp.clip(positions, 0, cos.shape[0] - 1)
    c = jnp.take(cos.astype(compute), positions, axis=0)[:, :, None, :]
    s = jnp.take(sin.astype(compute), positions, axis=0)[:, :, None, :]
    rotated = x[..., :2 * half].astype(compute)
    if interleaved:
        x1, x2 = rotated[..., 0::2], rotated[..., 1::2]
        rotated = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1).reshape(rotated.shape)
    else:
        x1, x2 = rotated[..., :half], rotated[..., half:]
        rotated = jnp.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
    return jnp.concatenate([rotated.astype(x.dtype), x[..., 2 * half:]], axis=-1)


def cache_slots(layout, num_pages, positions, kv_batch_idx, block_table):
    """(page, row) of each position (batch, n) in the cache, and whether it is writable:
    inside the row's capacity and on a page (or cache row) in [0, num_pages)."""
    if layout.paged:
        block = jnp.clip(positions // layout.page_size, 0, layout.max_blocks - 1)
        page = jnp.take_along_axis(block_table, block, axis=1)
        row = positions % layout.page_size
    else:
        rows = kv_batch_idx if kv_batch_idx is not None else jnp.arange(layout.batch, dtype=jnp.int32)
        page = jnp.broadcast_to(rows[:, None], positions.shape)
        row = positions
    valid = (positions >= 0) & (positions < layout.capacity) & (page >= 0) & (page < num_pages)
    return page, row, valid


def append_to_cache(cache, new, layout, seqlens, kv_batch_idx, block_table):
    """cache with new (batch, seqlen_new, heads_kv, head_dim) written at positions
    seqlens[b] + t of each batch row; writes that fall outside are dropped."""
    positions = seqlens[:, None] + jnp.arange(new.shape[1], dtype=jnp.int32)[None, :]
    page, row, valid = cache_slots(layout, cache.shape[0], positions, kv_batch_idx, block_table)
    # A dropped write gets an index past the end, which mode="drop" discards; a negative
    # index would not do: .at[] wraps it around to the end.
    page = jnp.where(valid, page, cache.shape[0])
    row = jnp.where(valid, row, cache.shape[1])
    return cache.at[page, row].set(new, mode="drop")


# ---- the kernel call: no derivative ----

@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _kernel(config, q, k_cache, v_cache, alibi_slopes, seqlens_k, kv_batch_idx, block_table):
    return tuple(_ffi.kvcache_forward(config, q, k_cache, v_cache, alibi_slopes, seqlens_k,
                                      kv_batch_idx, block_table))


@_kernel.defjvp
def _kernel_jvp(config, primals, tangents):
    raise NotImplementedError(_NO_DERIVATIVE)


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens=None,
    cache_batch_idx=None,
    block_table=None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    rotary_interleaved=True,
    alibi_slopes=None,
    num_splits=0,
    return_lse=False,
):
    """Attention of q over a KV cache, optionally appending new keys and values first.

    FlashAttention's flash_attn_with_kvcache, functional: the updated caches are returned
    (under jax.jit with the caches donated, XLA writes them in place). Inference only: it
    has no derivative, and differentiating through it raises NotImplementedError.

    Args:
      q: (batch, seqlen_q, num_heads, head_dim): seqlen_q = 1 for decoding, more for a
        chunked prefill or speculative tokens.
      k_cache, v_cache: the cache, with q's dtype. Contiguous: (batch_cache, seqlen_cache,
        num_heads_kv, head_dim); batch row b uses cache row cache_batch_idx[b] (default b,
        then batch_cache >= batch). Paged (with block_table): (num_blocks, page_size,
        num_heads_kv, head_dim), page_size a multiple of 16. num_heads % num_heads_kv == 0.
        A row holds 1 to 2**29 keys (its capacity: seqlen_cache, or max_blocks_per_seq *
        page_size) and batch and num_heads are at most 65535: the CUDA kernels' limits,
        checked at trace time on every platform.
      k, v: optional new keys and values (batch, seqlen_new, num_heads_kv, head_dim), written
        at positions cache_seqlens[b] .. cache_seqlens[b] + seqlen_new - 1 of row b and
        attended in the same call. Requires cache_seqlens. If several batch rows write the
        same cache slot (repeated cache_batch_idx, shared pages) any one of them may win.
      rotary_cos, rotary_sin: optional (seqlen_ro, rotary_dim / 2) tables, rotary_dim <=
        head_dim; need k and v. The new k is rotated at positions cache_seqlens[b] + t before
        it is written. q is rotated at cache_seqlens[b] + i when causal or a window side is
        in [0, capacity), else every query at cache_seqlens[b] (FlashAttention's rule, which
        treats sides >= capacity as -1 first). The tables
        must cover those positions: a position past seqlen_ro - 1 uses the last row
        (clamped; this depends on run-time lengths, so it cannot be checked at trace time).
        The rotation is computed in float32 and rounded to q's dtype.
      rotary_interleaved: rotate dims (2i, 2i + 1) (True) or (i, i + rotary_dim / 2)
        (False, GPT-NeoX style).
      cache_seqlens: int or (batch,) integer array: keys already in each row. None = every
        row is full (seqlen_cache, or max_blocks_per_seq * page_size keys).
      cache_batch_idx: optional (batch,) integer array: the cache row of each batch row
        (contiguous caches only, as in FlashAttention).
      block_table: optional (batch, max_blocks_per_seq) integer array: key j of row b lives
        in page block_table[b, j // page_size], slot j % page_size.
      softmax_scale, causal, window_size, softcap, alibi_slopes: as in flash_attn_func, with
        the masks and ALiBi aligned bottom-right per row: query i of row b sees key j iff
        j <= i + seqlens_k[b] - seqlen_q (causal), where seqlens_k[b] = cache_seqlens[b] +
        seqlen_new is the number of keys the row holds after the append.
      num_splits: int in [0, 128], how many pieces the GPU splits each row's keys into
        (0 = a heuristic from the SM count); accepted and ignored on the CPU.
      return_lse: also return lse (batch, num_heads, seqlen_q) float32 (natural log; +inf for
        a row that sees no key, whose output is 0).

    Out-of-range values at run time (lengths, rows and pages are data, so they are not
    checked at trace time) are made safe the same way on every platform:
      - a row's key count seqlens_k[b] is clamped into [0, capacity], capacity being
        seqlen_cache, or max_blocks_per_seq * page_size when paged (and the causal diagonal
        moves with it);
      - a key on a page (block_table entry) or cache row (cache_batch_idx) outside
        [0, num_blocks) / [0, batch_cache) is skipped, as if masked: a row with nothing
        readable outputs 0 with lse +inf;
      - writes of k, v to a position outside [0, capacity) of the row or to such a page or
        row are dropped (never wrapped around): the rest of the cache is left bit for bit.

    Returns:
      out (like q); (out, lse) with return_lse; then, when k and v are given, the updated
      caches: (out, k_cache, v_cache) or (out, lse, k_cache, v_cache).
    """
    layout = check_caches(q, k_cache, v_cache, cache_batch_idx, block_table)
    seqlen_new = check_new_kv(k, v, layout, q.dtype)
    appending = k is not None
    window_left, window_right = _checks.check_window(window_size, causal)
    # Rotary: FlashAttention turns sides >= seqlen_k (the capacity) into -1 before it
    # decides whether the call is local, which moves the queries' rotary positions; causal
    # is local (its right side is 0).
    local = any(0 <= side < layout.capacity for side in (window_left, window_right))
    # The masks: a row's diagonal (seqlens_k[b] - seqlen_q) lies in [-seqlen_q, capacity),
    # so a side >= capacity + seqlen_q masks nothing in any row: unbounded, exactly (and no
    # overflow of diagonal + side in the kernels).
    window_left, window_right = _checks.drop_idle_window_sides(
        window_left, window_right, layout.capacity + layout.seqlen_q)
    slopes = _checks.check_alibi_slopes(alibi_slopes, layout.batch, layout.num_heads)
    seqlens = check_cache_seqlens(cache_seqlens, layout, seqlen_new)
    rotary = check_rotary(rotary_cos, rotary_sin, rotary_interleaved, layout.head_dim, seqlen_new)
    batch_idx = (None if cache_batch_idx is None else
                 _integer_array(cache_batch_idx, "cache_batch_idx", (layout.batch,), "(batch,)"))
    table = None if block_table is None else _as_int32(block_table)
    config = KvCacheConfig(
        softmax_scale=_checks.check_softmax_scale(softmax_scale, layout.head_dim),
        softcap=_checks.check_softcap(softcap),
        window_left=window_left,
        window_right=window_right,
        has_alibi=slopes is not None,
        has_kv_batch_idx=batch_idx is not None,
        has_block_table=table is not None,
        num_splits=check_num_splits(num_splits),
    )

    if appending:
        if rotary is not None:
            cos, sin = rotary
            k_positions = seqlens[:, None] + jnp.arange(seqlen_new, dtype=jnp.int32)
            # As in FlashAttention: queries count on from cache_seqlens under a causal or
            # local mask (local as decided above); otherwise all of them sit at cache_seqlens.
            q_steps = jnp.arange(layout.seqlen_q, dtype=jnp.int32)
            if not local:
                q_steps = jnp.zeros_like(q_steps)
            k = apply_rotary(k, cos, sin, k_positions, rotary_interleaved)
            q = apply_rotary(q, cos, sin, seqlens[:, None] + q_steps, rotary_interleaved)
        k_cache = append_to_cache(k_cache, k, layout, seqlens, batch_idx, table)
        v_cache = append_to_cache(v_cache, v, layout, seqlens, batch_idx, table)

    # Placeholders cost nothing at run time: an empty slopes array, and the lengths
    # themselves (reshaped) where kv_batch_idx or block_table is off.
    seqlens_k = seqlens + seqlen_new if seqlen_new else seqlens
    out, lse = _kernel(
        config, q, k_cache, v_cache,
        jnp.zeros((0,), jnp.float32) if slopes is None else slopes,
        seqlens_k,
        seqlens_k if batch_idx is None else batch_idx,
        seqlens_k[:, None] if table is None else table,
    )
    results = (out, lse) if return_lse else (out,)
    if appending:
        results += (k_cache, v_cache)
    return results[0] if len(results) == 1 else results
