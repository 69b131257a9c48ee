"""Packed documents: one row of 16384 tokens with segment ids (and the same through
flash_attn_varlen_func) against the same documents as a padded batch, for jax_flash and for jax.nn.dot_product_attention (cuDNN, padded with
sequence lengths), causal, bf16, head dim 128, 16 heads.

Useful FLOPs count only each document's own causal attention: 4 * h * d * sum(n_i^2) / 2
(forward; forward + backward 3.5 times that). Timing as in bench_attention.py.

    python benchmarks/bench_packed.py --json packed.json
"""

from __future__ import annotations

import argparse
import os

os.environ["JAX_FLASH_POISON_OUTPUTS"] = "0"  # before jax_flash is imported, as in bench_attention

import jax
import jax.numpy as jnp
import numpy as np

import jax_flash as jf
from bench_attention import save_rows, time_call

HEADS, HEAD_DIM = 16, 128
LAYOUTS = {
    "8 x 2048": [2048] * 8,
    "mixed 8 docs": [4096, 3072, 2048, 2048, 2048, 1536, 1024, 512],
    "64 x 256": [256] * 64,
}


def inputs(lengths, padded):
    total, longest = sum(lengths), max(lengths)
    shape = (len(lengths), longest) if padded else (1, total)
    keys = jax.random.split(jax.random.key(total + len(lengths)), 3)
    return [jax.random.normal(key, shape + (HEADS, HEAD_DIM), jnp.bfloat16) for key in keys]


def variants(lengths):
    ids = jnp.asarray(np.repeat(np.arange(len(lengths)), lengths)[None], jnp.int32)
    seq_lengths = jnp.asarray(lengths, jnp.int32)

    def packed(q, k, v):
        return jf.flash_attn_func(q, k, v, causal=True, q_segment_ids=ids, kv_segment_ids=ids)

    cu_seqlens = jnp.asarray(np.concatenate([[0], np.cumsum(lengths)]), jnp.int32)

    def varlen(q, k, v):  # the same row through the varlen API (batch axis dropped)
        out = jf.flash_attn_varlen_func(q[0], k[0], v[0], cu_seqlens, cu_seqlens, max(lengths),
                                        max(lengths), causal=True)
        return out[None]

    def padded(q, k, v):  # pad tokens are computed and thrown away
        return jf.flash_attn_func(q, k, v, causal=True)

    def cudnn_padded(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn",
                                            query_seq_lengths=seq_lengths,
                                            key_value_seq_lengths=seq_lengths)

    def cudnn_unpacked(q, k, v):  # the packed row as one causal sequence: what ids save
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    return {"jax_flash packed": (packed, False), "jax_flash varlen": (varlen, False),
            "jax_flash padded": (padded, True),
            "cudnn padded+lengths": (cudnn_padded, True),
            "cudnn whole row (no ids)": (cudnn_unpacked, False)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd_bwd"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    rows = []
    for layout, lengths in LAYOUTS.items():
        useful = 4 * HEADS * HEAD_DIM * sum(n * n for n in lengths) / 2
        for mode in args.modes:
            line = [f"{layout:14s} {mode:7s}"]
            for name, (fn, padded) in variants(lengths).items():
                if mode == "fwd":
                    call, flops = jax.jit(fn), useful
                else:
                    loss = lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32))  # noqa: E731
                    call, flops = jax.jit(jax.grad(loss, argnums=(0, 1, 2))), 3.5 * useful
                try:
                    seconds = time_call(call, inputs(lengths, padded))
                    row = dict(layout=layout, mode=mode, impl=name, ms=seconds * 1e3,
                               useful_tflops=flops / seconds / 1e12)
                    line.append(f"{name}={row['ms']:.2f} ms ({row['useful_tflops']:.0f})")
                except Exception as error:  # an unsupported configuration
                    row = dict(layout=layout, mode=mode, impl=name, error=str(error).splitlines()[0][:160])
                    line.append(f"{name}=fail")
                rows.append(row)
            print("  ".join(line), flush=True)
    save_rows(args.json, rows)


if __name__ == "__main__":
    main()
