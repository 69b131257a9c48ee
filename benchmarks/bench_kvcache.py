"""Decoding bandwidth of flash_attn_with_kvcache beside jax.nn.dot_product_attention.

The decode shapes of ../shared/ANCHORS.md: one query token per sequence against a full
cache, 32 query heads and 8 KV heads, head dim 128, bf16. Bandwidth = K and V bytes read /
time. jax_flash runs on a contiguous cache and on a paged one (pages in a shuffled pool);
cuDNN and XLA get the contiguous cache. Also a chunked prefill: 512 new queries against a
16k cache, causal (bottom-right) for jax_flash; jax.nn aligns causal masks top-left, so
cuDNN runs that shape without a mask (an upper bound on its speed). Timing as in
bench_attention.py (median of batches of back-to-back jitted calls after warm-up).

    python benchmarks/bench_kvcache.py --json kvcache.json
"""

from __future__ import annotations

import argparse
import os

os.environ["JAX_FLASH_POISON_OUTPUTS"] = "0"  # before jax_flash reads it (see bench_attention)

import jax
import jax.numpy as jnp
import numpy as np

import jax_flash as jf
from bench_attention import save_rows, time_call

HEADS, HEADS_KV, HEAD_DIM = 32, 8, 128
DECODE_SHAPES = [(32, 8192), (8, 32768), (128, 2048), (1, 131072)]


def paged(cache, page_size, seed):
    """The same keys as a shuffled pool of pages and the block table that finds them."""
    batch, seqlen = cache.shape[:2]
    pages_per_row = seqlen // page_size
    pool = cache.reshape(batch * pages_per_row, page_size, *cache.shape[2:])
    order = np.random.default_rng(seed).permutation(batch * pages_per_row)
    inverse = np.argsort(order)
    table = jnp.asarray(inverse.reshape(batch, pages_per_row), jnp.int32)
    return pool[order], table


def decode_rows(batch, seqlen, page_sizes, only=None):
    keys = jax.random.split(jax.random.key(batch * 7 + seqlen), 3)
    q = jax.random.normal(keys[0], (batch, 1, HEADS, HEAD_DIM), jnp.bfloat16)
    k_cache, v_cache = (jax.random.normal(key, (batch, seqlen, HEADS_KV, HEAD_DIM), jnp.bfloat16)
                        for key in keys[1:])
    lengths = jnp.full((batch,), seqlen, jnp.int32)
    kv_bytes = 2 * batch * seqlen * HEADS_KV * HEAD_DIM * 2
    impls = {
        "jax_flash": (lambda q, k, v, n: jf.flash_attn_with_kvcache(q, k, v, cache_seqlens=n),
                      (q, k_cache, v_cache, lengths)),
        "cudnn": (lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"),
                  (q, k_cache, v_cache)),
        "xla": (lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"),
                (q, k_cache, v_cache)),
    }
    for page_size in page_sizes:
        (k_pages, table), (v_pages, _) = paged(k_cache, page_size, 0), paged(v_cache, page_size, 0)
        impls[f"jax_flash_paged{page_size}"] = (
            lambda q, k, v, n, t: jf.flash_attn_with_kvcache(q, k, v, cache_seqlens=n,
                                                             block_table=t),
            (q, k_pages, v_pages, lengths, table))
    rows, cells = [], [f"decode {batch:3d} x {seqlen:6d}"]
    for name, (fn, args) in impls.items():
        if only and name not in only:
            continue
        try:
            seconds = time_call(jax.jit(fn), args)
        except Exception as error:  # unsupported configuration, out of memory
            rows.append(dict(impl=name, batch=batch, seqlen=seqlen, error=str(error).splitlines()[0][:160]))
            cells.append(f"{name}=fail")
            continue
        rows.append(dict(impl=name, batch=batch, seqlen=seqlen, us=seconds * 1e6,
                         tb_per_s=kv_bytes / seconds / 1e12))
        cells.append(f"{name}={kv_bytes / seconds / 1e12:5.2f} TB/s ({seconds * 1e6:6.1f} us)")
    print("  ".join(cells), flush=True)
    return rows


def prefill_rows(seqlen_q=512, seqlen=16384):
    keys = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(keys[0], (1, seqlen_q, HEADS, HEAD_DIM), jnp.bfloat16)
    k_cache, v_cache = (jax.random.normal(key, (1, seqlen, HEADS_KV, HEAD_DIM), jnp.bfloat16)
                        for key in keys[1:])
    lengths = jnp.full((1,), seqlen, jnp.int32)
    flops = 4 * HEADS * seqlen_q * seqlen * HEAD_DIM  # causal at the bottom right: ~all keys
    impls = {
        "jax_flash_causal": lambda q, k, v: jf.flash_attn_with_kvcache(
            q, k, v, cache_seqlens=lengths, causal=True),
        "jax_flash": lambda q, k, v: jf.flash_attn_with_kvcache(q, k, v, cache_seqlens=lengths),
        "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"),
    }
    rows, cells = [], [f"prefill {seqlen_q} x {seqlen}"]
    for name, fn in impls.items():
        seconds = time_call(jax.jit(fn), (q, k_cache, v_cache))
        rows.append(dict(impl=name, seqlen_q=seqlen_q, seqlen=seqlen, us=seconds * 1e6,
                         tflops=flops / seconds / 1e12))
        cells.append(f"{name}={seconds * 1e6:7.1f} us ({flops / seconds / 1e12:5.1f} TFLOP/s)")
    print("  ".join(cells), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--page-sizes", type=int, nargs="+", default=[256, 16])
    parser.add_argument("--impls", nargs="+", default=None, help="decode rows: only these")
    parser.add_argument("--no-prefill", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    rows = []
    for batch, seqlen in DECODE_SHAPES:
        rows += decode_rows(batch, seqlen, args.page_sizes, args.impls)
    if not args.no_prefill:
        rows += prefill_rows()
    save_rows(args.json, rows)


if __name__ == "__main__":
    main()
