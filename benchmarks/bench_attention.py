"""Forward and forward+backward TFLOP/s of jax_flash beside jax.nn.dot_product_attention.

The FlashAttention benchmark grid: batch * seqlen = 16384 tokens, hidden 2048 (heads =
2048 / head_dim), bf16. FLOPs: forward 4 * b * h * s^2 * d (halved when causal), forward +
backward 3.5 times that. Each figure is the median over several batches of back-to-back
jitted calls (at least 10 and about 30 ms per batch) after warm-up, on fresh random
(never zero) inputs and a random output gradient, with the tests' output poisoning off.

    python benchmarks/bench_attention.py --head-dims 64 128 256 --seqlens 512 1024 2048 4096 8192 16384 \
        --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

# The test aid that fills every output with NaN before each kernel would add a memset per
# output to every timed call. Set before jax_flash is imported, so it holds however early
# jax_flash reads it.
os.environ["JAX_FLASH_POISON_OUTPUTS"] = "0"

import jax
import jax.numpy as jnp
import numpy as np

import jax_flash as jf

TOKENS, HIDDEN = 16384, 2048


def implementations():
    def ours(q, k, v, causal):
        return jf.flash_attn_func(q, k, v, causal=causal)

    def ours_deterministic(q, k, v, causal):
        return jf.flash_attn_func(q, k, v, causal=causal, deterministic=True)

    def ours_wide_window(q, k, v, causal):
        # The windowed kernels on the plain op's work: a window of (seqlen - 2, seqlen - 2)
        # masks two of the seqlen^2 scores (two corner tiles), so beside jax_flash
        # (non-causal) it prices the windowed kernels themselves rather than their mask.
        seqlen = q.shape[1]
        return jf.flash_attn_func(q, k, v, causal=causal, window_size=(seqlen - 2, seqlen - 2))

    dropout_key = jax.random.key(0)

    def ours_dropout(q, k, v, causal):
        return jf.flash_attn_func(q, k, v, causal=causal, dropout_p=0.1, dropout_key=dropout_key)

    def cudnn_dropout(q, k, v, causal):
        # jax.nn.dot_product_attention has no dropout; its cuDNN backend does (private API,
        # so a failure here becomes an error row rather than stopping the run).
        from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

        mask_type = cudnn_attention.MaskType.CAUSAL if causal else cudnn_attention.MaskType.NO_MASK
        return cudnn_attention.dot_product_attention(
            q, k, v, scale=q.shape[-1] ** -0.5, dropout_rate=0.1, mask_type=mask_type)

    def cudnn(q, k, v, causal):
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")

    def xla(q, k, v, causal):
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")

    def fa3(q, k, v, causal):
        # The flash-attn3-jax wheel (FlashAttention-3 behind XLA FFI; head dims <= 128),
        # carried to the device by ../shared/tools/peer-wheels.sh.
        from flash_attn3_jax import flash_mha

        return flash_mha(q, k, v, is_causal=causal)

    def ring_one_device(q, k, v, causal):
        # The ring machinery (shard_map, plans, lse merges, custom_vjp) on a one-device mesh:
        # what it costs beyond the kernels.
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("seq",))
        return jf.sequence_parallel_attention(q, k, v, mesh, "seq", causal=causal)

    return {"jax_flash": ours, "jax_flash_det": ours_deterministic,
            "jax_flash_wide_window": ours_wide_window,
            "jax_flash_dropout": ours_dropout, "cudnn": cudnn, "cudnn_dropout": cudnn_dropout,
            "xla": xla, "ring_1dev": ring_one_device, "fa3": fa3}


def time_call(fn, args, batches=5, min_batch_seconds=0.03, min_calls=10):
    jax.block_until_ready(fn(*args))  # compile + warm-up
    jax.block_until_ready(fn(*args))
    # Batches of at least min_calls calls and about 30 ms, so that a short call's figure is
    # not dominated by the host's dispatch and timer jitter.
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    calls_per_batch = max(min_calls,
                          min(500, int(min_batch_seconds / (time.perf_counter() - start)) + 1))
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(calls_per_batch):
            result = fn(*args)
        jax.block_until_ready(result)
        times.append((time.perf_counter() - start) / calls_per_batch)
    return statistics.median(times)


def save_rows(path, rows):
    """Writes the measured rows as JSON (nothing when path is None)."""
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)


def grid_inputs(head_dim, seqlen, seed):
    """q, k, v and an output gradient of one grid point, normal bf16 (batch, seqlen, heads,
    head_dim)."""
    batch, heads = TOKENS // seqlen, HIDDEN // head_dim
    keys = jax.random.split(jax.random.key(seed), 4)
    return tuple(jax.random.normal(key, (batch, seqlen, heads, head_dim), jnp.bfloat16)
                 for key in keys)


def measure(name, attention, head_dim, seqlen, causal, mode, cotangent="random"):
    q, k, v, dout = grid_inputs(head_dim, seqlen, seed=seqlen * 7 + head_dim)
    batch, _, heads, _ = q.shape
    flops = 4 * batch * heads * seqlen * seqlen * head_dim * (0.5 if causal else 1.0)
    args = (q, k, v)
    if mode != "fwd":
        flops *= 3.5
    if mode == "fwd":
        fn = jax.jit(lambda q, k, v: attention(q, k, v, causal))
    elif cotangent == "random":
        # A random output gradient, as FlashAttention's own benchmark draws it: a constant
        # one (the gradient of sum(out)) makes every row of dP alike.
        forward = lambda q, k, v: attention(q, k, v, causal)
        fn = jax.jit(lambda q, k, v, dout: jax.vjp(forward, q, k, v)[1](dout))
        args = (q, k, v, dout)
    else:
        loss = lambda q, k, v: jnp.sum(attention(q, k, v, causal).astype(jnp.float32))
        fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    try:
        seconds = time_call(fn, args)
    except Exception as error:  # out of memory, unsupported configuration
        return dict(impl=name, head_dim=head_dim, seqlen=seqlen, causal=causal, mode=mode,
                    error=str(error).splitlines()[0][:160])
    row = dict(impl=name, head_dim=head_dim, seqlen=seqlen, causal=causal, mode=mode,
               ms=seconds * 1e3, tflops=flops / seconds / 1e12)
    if seqlen == 16384:
        memory = fn.lower(*args).compile().memory_analysis()
        row["temp_mib"] = memory.temp_size_in_bytes / 2**20
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--impls", nargs="+", default=["jax_flash", "cudnn", "xla"])
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd_bwd"])
    parser.add_argument("--json", default=None)
    parser.add_argument("--causal", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--cotangent", choices=["random", "ones"], default="random",
                        help="fwd_bwd's output gradient: random normal, or ones (grad of sum(out))")
    parser.add_argument("--tag", default="",
                        help="appended to our rows' names: which build or setting ran them")
    args = parser.parse_args()
    impls = implementations()
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    rows = []
    for head_dim in args.head_dims:
        for causal in (bool(c) for c in args.causal):
            for seqlen in args.seqlens:
                for mode in args.modes:
                    line = [f"d={head_dim:3d} s={seqlen:5d} causal={int(causal)} {mode:7s}"]
                    for name in args.impls:
                        label = name + args.tag if name.startswith("jax_flash") else name
                        row = measure(label, impls[name], head_dim, seqlen, causal, mode,
                                      args.cotangent)
                        rows.append(row)
                        cell = f"{row['tflops']:6.1f}" if "tflops" in row else "  fail"
                        if "temp_mib" in row:
                            cell += f" ({row['temp_mib']:.0f} MiB)"
                        line.append(f"{label}={cell}")
                    print("  ".join(line), flush=True)
    save_rows(args.json, rows)


if __name__ == "__main__":
    main()
