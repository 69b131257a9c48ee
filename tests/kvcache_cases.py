"""Inputs of flash_attn_with_kvcache tests, shared by the CPU and GPU test files: cache
layouts, call modes, argument builders and the slot-by-slot check of the append."""

import jax.numpy as jnp
import numpy as np

from helpers import to64

# Contiguous: (batch_cache, seqlen_cache, ...); paged: (num_blocks, page_size, ...) with a
# block table of max_blocks pages per row (distinct pages, so no two rows write one slot).
CACHES = {
    "contiguous": dict(seqlen_cache=80),
    "paged16": dict(page_size=16, max_blocks=6, num_blocks=23),
    "paged48": dict(page_size=48, max_blocks=3, num_blocks=11),
}
# seqlen_q and seqlen_new (0: a read-only call without k and v).
MODES = {
    "decode": (1, 1),
    "prefill": (7, 7),  # chunked prefill: several new tokens attend causally to the cache
    "read": (3, 0),
}
MASKS = {
    "none": dict(),
    "causal": dict(causal=True),
    "window": dict(window_size=(9, 2)),
    "causal_window": dict(causal=True, window_size=(5, -1)),
}


def capacity_of(cache):
    """cache: a name in CACHES or a layout dict of the same form."""
    layout = CACHES[cache] if isinstance(cache, str) else cache
    return layout.get("seqlen_cache") or layout["page_size"] * layout["max_blocks"]


def build(seed, cache, mode, dtype, batch=3, heads=4, heads_kv=2, head_dim=32, lengths=None,
          batch_idx=False, rotary_dim=None):
    """Arguments of one call. cache: a CACHES name or a layout dict; mode: a MODES name or
    (seqlen_q, seqlen_new). Default lengths: an empty row, a middle one, and one that the
    append fills exactly to capacity (a read-only call: a full row)."""
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)

    seqlen_q, seqlen_new = MODES[mode] if isinstance(mode, str) else mode
    layout = CACHES[cache] if isinstance(cache, str) else cache
    capacity = capacity_of(cache)
    if "page_size" in layout:
        rows, per_row = layout["num_blocks"], layout["page_size"]
    else:
        rows, per_row = batch + (2 if batch_idx else 0), capacity
    args = dict(q=normal(batch, seqlen_q, heads, head_dim),
                k_cache=normal(rows, per_row, heads_kv, head_dim),
                v_cache=normal(rows, per_row, heads_kv, head_dim))
    if seqlen_new:
        args.update(k=normal(batch, seqlen_new, heads_kv, head_dim),
                    v=normal(batch, seqlen_new, heads_kv, head_dim))
    if lengths is None:
        lengths = [0, 29, capacity - seqlen_new][:batch] + [11] * max(0, batch - 3)
    args["cache_seqlens"] = jnp.asarray(lengths, jnp.int32)
    if "page_size" in layout:
        pages = rng.permutation(rows)[:batch * layout["max_blocks"]]
        args["block_table"] = jnp.asarray(pages.reshape(batch, -1), jnp.int32)
    if batch_idx:
        args["cache_batch_idx"] = jnp.asarray(rng.permutation(rows)[:batch], jnp.int32)
    if rotary_dim:
        inv_freq = 1.0 / 10000 ** (np.arange(0, rotary_dim, 2) / rotary_dim)
        angles = np.arange(capacity + 8)[:, None] * inv_freq[None, :]
        args["rotary_cos"] = jnp.asarray(np.cos(angles), jnp.float32)
        args["rotary_sin"] = jnp.asarray(np.sin(angles), jnp.float32)
    return args


def widen(args):
    return {k: to64(x) if x is not None and jnp.issubdtype(x.dtype, jnp.floating) else x
            for k, x in args.items()}


def expected_writes(args, capacity):
    """{(page, slot): (b, t)}: where new token t of row b must land, by the documented
    rule, computed with plain loops."""
    if "k" not in args:
        return {}
    batch, seqlen_new = args["k"].shape[:2]
    num_rows, per_row = args["k_cache"].shape[:2]
    lengths = np.broadcast_to(np.asarray(args["cache_seqlens"]), (batch,))
    table = None if args.get("block_table") is None else np.asarray(args["block_table"])
    index = args.get("cache_batch_idx")
    writes = {}
    for b in range(batch):
        for t in range(seqlen_new):
            position = int(lengths[b]) + t
            if not 0 <= position < capacity:
                continue
            if table is not None:
                page, slot = int(table[b, position // per_row]), position % per_row
            else:
                page, slot = (b if index is None else int(index[b])), position
            if 0 <= page < num_rows:
                writes[(page, slot)] = (b, t)
    return writes


def check_append(args, caches, reference_caches, capacity, rotary):
    """Written slots hold the new k / v (k rotated like the reference when rotary), and
    every other slot is the old cache, bit for bit."""
    writes = expected_writes(args, capacity)
    for name, new, cache, expected in zip(("k", "v"), ("k", "v"), caches, reference_caches):
        old = np.asarray(args[f"{name}_cache"])
        cache = np.asarray(cache)
        assert cache.shape == old.shape and cache.dtype == old.dtype
        written = np.zeros(old.shape[:2], bool)
        for (page, slot), (b, t) in writes.items():
            written[page, slot] = True
            if rotary and name == "k":
                scale = np.max(np.abs(np.asarray(to64(expected[page, slot]))), initial=1.0)
                np.testing.assert_allclose(
                    np.asarray(to64(cache[page, slot])), np.asarray(to64(expected[page, slot])),
                    rtol=0, atol=2 * float(jnp.finfo(old.dtype).eps) * scale)
            else:
                assert cache[page, slot].tobytes() == np.asarray(args[new][b, t]).tobytes(), (page, slot)
        assert cache[~written].tobytes() == old[~written].tobytes(), f"{name}_cache: untouched slots changed"
