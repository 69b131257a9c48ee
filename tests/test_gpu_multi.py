"""Sequence parallelism across real GPUs: ring attention (zigzag and contiguous) and Ulysses
on meshes of 2 and of every GPU, against a float32 reference of the whole sequence on one
device (the 2x rule against plain bfloat16 JAX attention), forward and gradients.

Runs only where JAX sees two or more GPUs and jax_flash has its CUDA kernels; elsewhere
every test is skipped with the reason. The same cases on fake CPU devices are in
test_sequence_parallel.py; benchmarks/bench_sequence_parallel.py times them.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_flash as jf
from helpers import assert_within_twice_plain, random_qkv

GPU = [d for d in jax.devices() if d.platform == "gpu"] if jax.default_backend() == "gpu" else []
pytestmark = pytest.mark.skipif(
    not (len(GPU) >= 2 and jf.HAS_CUDA_KERNELS),
    reason="needs two or more GPUs and a jax_flash build with CUDA kernels",
)

MESH_SIZES = sorted({2, len(GPU)}) if len(GPU) >= 2 else [2]
METHODS = [("ring", "zigzag"), ("ring", "contiguous"), ("ulysses", "zigzag")]
MASKS = {"none": dict(), "causal": dict(causal=True),
         "causal_window_softcap": dict(causal=True, window_size=(700, -1), softcap=5.0)}


@functools.lru_cache(maxsize=None)
def whole_sequence(mask, seqlen_q, seqlen_k, heads, heads_kv):
    """Inputs, a cotangent and the float32 and plain bf16 references on one device."""
    q, k, v = random_qkv(seqlen_q + 3 * seqlen_k, 1, seqlen_q, seqlen_k, heads, heads_kv, 128,
                         jnp.bfloat16)
    cotangent = jnp.asarray(np.random.default_rng(seqlen_q).standard_normal(q.shape, np.float32))
    kwargs = MASKS[mask]

    def reference(q, k, v):
        return jf.reference_attention(q, k, v, **kwargs)

    with jax.default_matmul_precision("float32"):  # no TF32 in the float32 reference
        exact, exact_vjp = jax.vjp(reference, *(x.astype(jnp.float32) for x in (q, k, v)))
        exact_grads = exact_vjp(cotangent)
    plain, plain_vjp = jax.vjp(reference, q, k, v)
    plain_grads = plain_vjp(cotangent.astype(plain.dtype))
    return (q, k, v, cotangent), (exact, *exact_grads), (plain, *plain_grads)


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("method,layout", METHODS)
@pytest.mark.parametrize("num_devices", MESH_SIZES)
@pytest.mark.parametrize("shape", [(4096, 4096, 8, 2), (2048, 6144, 8, 8)],
                         ids=["gqa", "longer_keys"])
def test_matches_one_device(num_devices, method, layout, mask, shape):
    seqlen_q, seqlen_k, heads, heads_kv = shape
    if method == "ulysses" and heads % num_devices:
        pytest.skip(f"ulysses needs heads ({heads}) divisible by the devices ({num_devices})")
    (q, k, v, cotangent), exact, plain = whole_sequence(mask, *shape)
    mesh = Mesh(np.array(GPU[:num_devices]), ("seq",))
    sharding = NamedSharding(mesh, P(None, "seq", None, None))
    perm_q = jf.sequence_permutation(seqlen_q, num_devices, layout)
    perm_k = jf.sequence_permutation(seqlen_k, num_devices, layout)

    def parallel(q, k, v):
        return jf.sequence_parallel_attention(q, k, v, mesh, "seq", method=method,
                                              layout=layout, **MASKS[mask])

    inputs = [jax.device_put(x[:, perm], sharding)
              for x, perm in ((q, perm_q), (k, perm_k), (v, perm_k))]
    out, vjp = jax.vjp(jax.jit(parallel), *inputs)
    grads = vjp(jax.device_put(cotangent[:, perm_q].astype(out.dtype), sharding))
    assert out.sharding.spec == sharding.spec
    results = [x[:, np.argsort(perm)] for x, perm in
               zip((out, *grads), (perm_q, perm_q, perm_k, perm_k))]
    for name, result, ex, pl in zip(("out", "dq", "dk", "dv"), results, exact, plain):
        assert_within_twice_plain(name, result, pl, ex, jnp.bfloat16)
