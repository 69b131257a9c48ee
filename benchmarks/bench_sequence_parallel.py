"""Sequence parallelism over the GPUs of one host: ring attention (contiguous and zigzag)
and Ulysses, checked against one device, timed against one GPU at the same per-GPU length,
and the ring's transfers timed apart from its kernels.

    python benchmarks/bench_sequence_parallel.py --json sp.json      # every GPU JAX finds
    python benchmarks/bench_sequence_parallel.py --cpu-devices 4 --heads 2 --head-dim 32 \
        --check-seqlen 256 --seqlens 512 --dtype float32              # a smoke run on CPU

Check: out, dq, dk and dv of each method, causal or not, on fresh random inputs put into
the sharded order and permuted back. Each error against a plain-JAX reference on one
device (float32 without TF32; float64 on fake CPU devices) must be at most twice that of
plain JAX attention in the input precision (the tests' rule); the largest difference from
one-device flash_attn_func is printed beside it.

Scaling: forward+backward with a random output gradient, batch 1. TFLOP/s per GPU is the
whole sequence's FLOPs (bench_attention.py's count) over the number of GPUs and the time;
"efficiency" divides it by one GPU's TFLOP/s at the per-GPU length, same causal flag.

Transfers (ring only): the same call with every ring shift replaced by the identity
(kernels and merges alone, "no_transfers"), and with the kernels replaced by cheap
stand-ins of the same shapes (transfers and merges alone, "no_kernels"). exposed = full -
no_transfers is the transfer time the kernels did not hide; no_kernels is what there was
to hide.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--num-devices", type=int, nargs="+", default=None,
                    help="mesh sizes, each on the first n devices (default: 2, 4, ... up to all)")
parser.add_argument("--methods", nargs="+", default=["ring_zigzag", "ring_contiguous", "ulysses"])
parser.add_argument("--causal", type=int, nargs="+", default=[1, 0])
parser.add_argument("--seqlens", type=int, nargs="+", default=[32768, 65536, 131072, 262144],
                    help="total sequence lengths timed (the whole sequence, all devices)")
parser.add_argument("--check-seqlen", type=int, default=8192,
                    help="total sequence length of the correctness check (0: no check)")
parser.add_argument("--heads", type=int, default=16)
parser.add_argument("--head-dim", type=int, default=128)
parser.add_argument("--dtype", default="bfloat16")
parser.add_argument("--no-transfers-split", action="store_true",
                    help="skip the ring's no_transfers / no_kernels timings")
parser.add_argument("--cpu-devices", type=int, default=0,
                    help="run on this many fake CPU devices instead (a smoke test)")
parser.add_argument("--json", default=None)
args = parser.parse_args()

if args.cpu_devices:  # must happen before JAX starts
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={args.cpu_devices}")
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["JAX_ENABLE_X64"] = "1"  # a float64 reference, so float32 runs can be checked
# NVLink multicast can take a shared host's GPUs out of service (device KINDS.md): keep it
# off in NCCL whatever the environment says.
os.environ["NCCL_NVLS_ENABLE"] = "0"

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import jax_flash as jf  # noqa: E402
from bench_attention import save_rows, time_call  # noqa: E402  (turns output poisoning off)
from jax_flash import _batching, sequence_parallel  # noqa: E402

METHODS = {"ring_zigzag": ("ring", "zigzag"), "ring_contiguous": ("ring", "contiguous"),
           "ulysses": ("ulysses", "zigzag")}
DTYPE = jnp.dtype(args.dtype)


def fwd_bwd(attention):
    """jit of (q, k, v, dout) -> (out, (dq, dk, dv))."""

    def run(q, k, v, dout):
        out, vjp = jax.vjp(attention, q, k, v)
        return out, vjp(dout)

    return jax.jit(run)


def one_device(causal):
    return lambda q, k, v: jf.flash_attn_func(q, k, v, causal=causal)


def parallel(mesh, method, causal):
    name, layout = METHODS[method]
    return lambda q, k, v: jf.sequence_parallel_attention(
        q, k, v, mesh, "seq", method=name, layout=layout, causal=causal)


def unsupported(method, num_devices):
    """Why a method cannot run on this mesh (None if it can), printed instead of a crash."""
    if METHODS[method][0] == "ulysses" and args.heads % num_devices:
        return f"ulysses needs heads ({args.heads}) divisible by the devices ({num_devices})"
    return None


def random_inputs(seqlen, seed):
    """q, k, v and an output gradient, (1, seqlen, heads, head_dim), normal (never zero)."""
    keys = jax.random.split(jax.random.key(seed), 4)
    shape = (1, seqlen, args.heads, args.head_dim)
    return tuple(jax.random.normal(key, shape, jnp.float32).astype(DTYPE) for key in keys)


def sharded(mesh, perm, arrays):
    sharding = NamedSharding(mesh, P(None, "seq", None, None))
    return tuple(jax.device_put(x[:, perm], sharding) for x in arrays)


def flops(seqlen, causal):
    """Forward+backward FLOPs of the whole sequence, counted as bench_attention.py does."""
    return 3.5 * 4 * args.heads * seqlen * seqlen * args.head_dim * (0.5 if causal else 1.0)


def max_errors(results, exact):
    return [float(jnp.max(jnp.abs(x.astype(e.dtype) - e))) for x, e in zip(results, exact)]


def check(meshes, causal):
    """Rows of the correctness check at --check-seqlen, one per (mesh, method)."""
    seqlen = args.check_seqlen
    inputs = random_inputs(seqlen, seed=seqlen + int(causal))
    precise = jnp.float64 if args.cpu_devices else jnp.float32
    reference = fwd_bwd(lambda q, k, v: jf.reference_attention(q, k, v, causal=causal))
    with jax.default_matmul_precision("float32"):  # no TF32 in the reference
        exact = reference(*(x.astype(precise) for x in inputs))
    exact = [exact[0], *exact[1]]
    plain = reference(*inputs)
    plain_errors = max_errors([plain[0], *plain[1]], exact)
    single = fwd_bwd(one_device(causal))(*inputs)
    single = [single[0], *single[1]]
    rows = []
    for mesh in meshes:
        n = mesh.devices.size
        for method in args.methods:
            if unsupported(method, n):
                print(f"check n={n} {method}: skipped, {unsupported(method, n)}")
                continue
            perm = jf.sequence_permutation(seqlen, n, METHODS[method][1])
            out, grads = fwd_bwd(parallel(mesh, method, causal))(*sharded(mesh, perm, inputs))
            inverse = np.argsort(perm)
            results = [x[:, inverse] for x in (out, *grads)]
            errors = max_errors(results, exact)
            from_single = max_errors(results, [x.astype(precise) for x in single])
            scale = max(1.0, max(float(jnp.max(jnp.abs(e))) for e in exact))
            floor = 4 * float(jnp.finfo(DTYPE).eps) * scale
            finite = all(bool(jnp.all(jnp.isfinite(x))) for x in results)
            passed = finite and all(e <= 2 * p + floor for e, p in zip(errors, plain_errors))
            rows.append(dict(kind="check", method=method, num_devices=n, causal=causal,
                             seqlen=seqlen, passed=passed, errors=errors,
                             plain_errors=plain_errors, from_one_device=from_single))
            print(f"check n={n} {method:15s} causal={int(causal)} s={seqlen}: "
                  f"{'PASS' if passed else 'FAIL'}  error out/dq/dk/dv "
                  + " ".join(f"{e:.2e}" for e in errors) + "  (plain "
                  + " ".join(f"{e:.2e}" for e in plain_errors) + ")  max |from one device| "
                  + f"{max(from_single):.2e}", flush=True)
    return rows


@contextlib.contextmanager
def replaced(module, name, value):
    """module.name = value while tracing inside the block (a benchmark's instrument only)."""
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def stand_in_forward(config):
    """The forward kernel's shapes and data flow at the cost of one elementwise pass."""

    def forward(q, k, v, *masks):
        out = q + (k[:, :1, :1] + v[:, :1, :1]).astype(q.dtype)
        return out, jnp.swapaxes(q[..., 0], 1, 2).astype(jnp.float32)

    return forward


def stand_in_backward(config):
    def backward(q, k, v, out, dout, lse, dlse, *masks):
        return q + dout[:, :1, :1], k + q[:, :1, :1], v + dout[:, :1, :1]

    return backward


def timed(name, fn, inputs, total_flops, num_devices, baseline=None, **fields):
    try:
        # One call per batch on fake CPU devices: many collective programs in flight at
        # once can deadlock XLA's CPU rendezvous (seen with 2 devices on 2 cores).
        seconds = time_call(fn, inputs, batches=5, min_calls=1,
                            min_batch_seconds=0.0 if args.cpu_devices else 0.03)
    except Exception as error:  # out of memory, an unsupported configuration
        print(f"  {name}: failed: {str(error).splitlines()[0][:160]}", flush=True)
        return dict(kind="time", impl=name, error=str(error).splitlines()[0][:160], **fields)
    row = dict(kind="time", impl=name, ms=seconds * 1e3, num_devices=num_devices,
               tflops_per_device=total_flops / num_devices / seconds / 1e12, **fields)
    if baseline is not None and "tflops_per_device" in baseline:
        row["efficiency"] = row["tflops_per_device"] / baseline["tflops_per_device"]
    text = f"  {name:28s} {row['ms']:9.2f} ms {row['tflops_per_device']:6.1f} TFLOP/s per device"
    print(text + (f"  efficiency {row['efficiency']:.3f}" if "efficiency" in row else ""),
          flush=True)
    return row


def scaling(meshes, seqlen, causal):
    rows, baselines = [], {}
    for n in sorted({mesh.devices.size for mesh in meshes}):
        local = seqlen // n
        print(f"one device, seqlen {local} (the per-device length on {n}), causal={int(causal)}")
        baselines[n] = timed("one_device", fwd_bwd(one_device(causal)), random_inputs(local, 1),
                             flops(local, causal), 1, seqlen=local, causal=causal)
        rows.append(baselines[n])
    whole = random_inputs(seqlen, 2)  # one draw, permuted for each mesh and layout
    for mesh in meshes:
        n = mesh.devices.size
        print(f"{n} devices, total seqlen {seqlen}, causal={int(causal)}")
        for method in args.methods:
            if unsupported(method, n):
                print(f"  {method}: skipped, {unsupported(method, n)}")
                continue
            perm = jf.sequence_permutation(seqlen, n, METHODS[method][1])
            inputs = sharded(mesh, perm, whole)
            fields = dict(method=method, seqlen=seqlen, causal=causal)
            call = lambda: fwd_bwd(parallel(mesh, method, causal))  # noqa: E731
            full = timed(method, call(), inputs, flops(seqlen, causal), n, baselines[n], **fields)
            rows.append(full)
            if METHODS[method][0] != "ring" or args.no_transfers_split or "ms" not in full:
                continue
            with replaced(sequence_parallel, "_shift", lambda x, ring: x):
                alone = timed(method + " no_transfers", call(), inputs, flops(seqlen, causal), n,
                              **fields)
            with replaced(_batching, "forward_fn", stand_in_forward), \
                    replaced(_batching, "backward_fn", stand_in_backward):
                transfers = timed(method + " no_kernels", call(), inputs, flops(seqlen, causal),
                                  n, **fields)
            rows += [alone, transfers]
            if "ms" in alone and "ms" in transfers:
                exposed = full["ms"] - alone["ms"]
                full["exposed_transfer_ms"], full["transfers_alone_ms"] = exposed, transfers["ms"]
                print(f"  {method}: exposed transfers {exposed:.2f} ms of {transfers['ms']:.2f} ms "
                      f"alone ({exposed / full['ms']:.1%} of the call)", flush=True)
    return rows


def main():
    devices = jax.devices()
    sizes = args.num_devices or [n for n in (2, 4, 8, 16) if n <= len(devices)]
    if not sizes or max(sizes) > len(devices):
        raise SystemExit(f"needs at least {max(sizes or [2])} devices; JAX sees {len(devices)}")
    meshes = [Mesh(np.array(devices[:n]), ("seq",)) for n in sizes]
    print(f"devices: {len(devices)} x {devices[0].device_kind}, jax {jax.__version__}; "
          f"meshes {sizes}; heads {args.heads}, head_dim {args.head_dim}, {DTYPE.name}")
    rows = []
    for causal in (bool(c) for c in args.causal):
        if args.check_seqlen:
            rows += check(meshes, causal)
        save_rows(args.json, rows)
        for seqlen in args.seqlens:
            rows += scaling(meshes, seqlen, causal)
            save_rows(args.json, rows)  # what has run so far survives a time limit
    failed = [row for row in rows if row["kind"] == "check" and not row["passed"]]
    if failed:
        raise SystemExit(f"{len(failed)} correctness checks failed")


if __name__ == "__main__":
    main()
