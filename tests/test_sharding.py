"""flash_attn_func under jit with sharded inputs: shard-local kernels, shardings kept.

conftest.py gives the process eight CPU devices.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_flash as jf
from helpers import alibi_slopes_for, random_qkv

pytestmark = pytest.mark.skipif(
    len(jax.devices("cpu")) < 8, reason="needs 8 CPU devices (conftest sets XLA_FLAGS)")

MESH = Mesh(np.array(jax.devices("cpu")[:8]).reshape(2, 4), ("data", "model"))
COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "all-reduce", "reduce-scatter")
KWARGS = dict(causal=True, window_size=(9, -1), softcap=4.0)


def loss(q, k, v, slopes):
    out, lse = jf.flash_attn_func(q, k, v, alibi_slopes=slopes, return_lse=True, **KWARGS)
    return jnp.sum(out * jnp.cos(out)) + jnp.sum(jnp.where(jnp.isinf(lse), 0, lse))


forward = jax.jit(lambda q, k, v, slopes: jf.flash_attn_func(
    q, k, v, alibi_slopes=slopes, return_lse=True, **KWARGS))
gradient = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def place(spec, *arrays):
    return [jax.device_put(x, NamedSharding(MESH, spec)) for x in arrays]


def spec_of(array, ndim):
    spec = tuple(array.sharding.spec)
    return spec + (None,) * (ndim - len(spec))


def collectives_in(fn, *args):
    text = fn.lower(*args).compile().as_text()
    return [name for name in COLLECTIVES if name in text]


# spec of q, k, v (BSHD); the heads of a 2-kv-head GQA call split 2 ways, batch 2 or 4 ways.
SPECS = {
    "batch": P("data", None, None, None),
    "heads": P(None, None, "data", None),
    "batch_and_heads": P("model", None, "data", None),
    "batch_two_axes": P(("data", "model"), None, None, None),
}


@pytest.mark.parametrize("spec_name", SPECS)
def test_batch_and_head_sharding_is_local(spec_name):
    spec = SPECS[spec_name]
    q, k, v = random_qkv(0, 8, 40, 40, 4, 2, 16, jnp.float32)
    slopes = alibi_slopes_for(4, batch=8)
    sq, sk, sv = place(spec, q, k, v)
    (sslopes,) = place(P(spec[0], spec[2]), slopes)
    assert collectives_in(forward, sq, sk, sv, sslopes) == []
    assert collectives_in(gradient, sq, sk, sv, sslopes) == []

    out, lse = forward(sq, sk, sv, sslopes)
    assert spec_of(out, 4) == spec_of(sq, 4)
    assert spec_of(lse, 3) == (spec[0], spec[2], None)
    expected_out, expected_lse = forward(q, k, v, slopes)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected_out))
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(expected_lse))
    grads = gradient(sq, sk, sv, sslopes)
    for g, expected in zip(grads, gradient(q, k, v, slopes)):
        assert spec_of(g, 4) == spec_of(sq, 4)
        np.testing.assert_array_equal(np.asarray(g), np.asarray(expected))


def test_vmap_inside_jit_with_sharding():
    q, k, v = random_qkv(1, 4, 24, 24, 2, 2, 16, jnp.float32)
    many_q = jnp.stack([q, 2 * q])
    fn = jax.jit(jax.vmap(lambda q: jf.flash_attn_func(q, k, v, causal=True)))
    (sharded,) = [jax.device_put(many_q, NamedSharding(MESH, P(None, "data")))]
    np.testing.assert_array_equal(np.asarray(fn(sharded)), np.asarray(fn(many_q)))


@pytest.mark.parametrize("spec,kv_spec,what", [
    (P(None, "model", None, None), P(None, "model", None, None), "sequence axis of q, k, v"),
    # q's 4 heads over 4 devices, but 2 kv heads: each device would need a part of a group.
    (P(None, None, "model", None), P(), "head axis"),
])
def test_unsupported_sharding_is_gathered_with_a_warning(spec, kv_spec, what):
    from jax_flash import _sharding

    _sharding._warned.clear()
    q, k, v = random_qkv(2, 2, 48, 48, 4, 2, 16, jnp.float32)
    slopes = alibi_slopes_for(4, batch=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        operands = place(spec, q) + place(kv_spec, k, v)
        out, lse = forward(*operands, slopes)
        grads = gradient(*operands, slopes)
    assert any(what in str(w.message) for w in caught), [str(w.message) for w in caught]
    expected_out, expected_lse = forward(q, k, v, slopes)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected_out))
    for g, expected in zip(grads, gradient(q, k, v, slopes)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(expected))


def test_gspmd_partitioner_too():
    """The rules also serve the older GSPMD partitioner (infer_sharding_from_operands)."""
    if not hasattr(jax.config, "jax_use_shardy_partitioner"):
        pytest.skip("this jax has no GSPMD partitioner switch")
    previous = jax.config.jax_use_shardy_partitioner
    jax.config.update("jax_use_shardy_partitioner", False)
    try:
        spec = SPECS["batch_and_heads"]
        q, k, v = random_qkv(3, 8, 40, 40, 4, 2, 16, jnp.float32)
        slopes = alibi_slopes_for(4, batch=8)
        sq, sk, sv = place(spec, q, k, v)
        (sslopes,) = place(P(spec[0], spec[2]), slopes)
        fwd = jax.jit(lambda *a: forward(*a))  # a fresh function: compiled under GSPMD
        grad = jax.jit(lambda *a: gradient(*a))
        assert collectives_in(fwd, sq, sk, sv, sslopes) == []
        assert collectives_in(grad, sq, sk, sv, sslopes) == []
        out, _ = fwd(sq, sk, sv, sslopes)
        assert spec_of(out, 4) == spec_of(sq, 4)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(forward(q, k, v, slopes)[0]))
    finally:
        jax.config.update("jax_use_shardy_partitioner", previous)


def test_batch_sharded_segment_ids_stay_local():
    """Segment ids sharded with the batch: shard-local kernels, the unsharded result."""
    q, k, v = random_qkv(11, 4, 48, 48, 4, 2, 16, jnp.float32)
    ids = jnp.asarray(np.random.default_rng(12).integers(0, 3, (4, 48)), jnp.int32)

    def loss(q, k, v, ids):
        out = jf.flash_attn_func(q, k, v, causal=True, q_segment_ids=ids, kv_segment_ids=ids)
        return jnp.sum(out * jnp.cos(out))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    sharded = place(P("data", None, None, None), q, k, v) + place(P("data", None), ids)
    assert collectives_in(grad, *sharded) == []
    for a, b in zip(grad(*sharded), grad(q, k, v, ids)):
        assert spec_of(a, 4)[0] == "data"
        np.testing.assert_allclose(a, b, atol=1e-6)
