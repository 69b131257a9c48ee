"""jf.dot_product_attention against jax.nn.dot_product_attention (XLA) on the CPU."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash as jf
from jax_flash import nn as jf_nn
from helpers import DTYPES, assert_within_twice_plain, random_qkv, to64

STATIC = ("is_causal", "local_window_size", "scale")
ours = jax.jit(jf.dot_product_attention, static_argnames=STATIC)
theirs = jax.jit(
    lambda *args, **kwargs: jax.nn.dot_product_attention(*args, implementation="xla", **kwargs),
    static_argnames=STATIC,
)

# (seqlen_q, seqlen_k, num_heads, num_heads_kv, rank, is_causal, local_window_size)
CASES = [
    (16, 16, 4, 4, 4, False, None),
    (16, 16, 4, 2, 4, True, None),
    (16, 16, 4, 1, 3, False, 3),
    (16, 16, 2, 2, 4, True, (4, 0)),
    (16, 16, 4, 2, 3, False, (2, 5)),
    (7, 19, 4, 2, 4, True, None),       # seqlen_q < seqlen_k: top-left causal
    (19, 7, 4, 2, 4, True, None),       # seqlen_q > seqlen_k: late rows see every key
    (7, 19, 2, 2, 3, False, (1, 3)),
    (19, 7, 4, 4, 4, True, (2, 0)),     # rows 9.. see no key: the uniform-average rows
    (19, 7, 2, 1, 4, False, 1),
]


def _inputs(case, dtype, seed=0):
    seqlen_q, seqlen_k, num_heads, num_heads_kv, rank, _, _ = case
    q, k, v = random_qkv(seed, 2, seqlen_q, seqlen_k, num_heads, num_heads_kv, 32, dtype)
    if rank == 3:
        q, k, v = q[0], k[0], v[0]
    return q, k, v


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_forward_and_gradients_match_jax_nn(case, dtype_name):
    dtype = DTYPES[dtype_name]
    kwargs = dict(is_causal=case[5], local_window_size=case[6])
    q, k, v = _inputs(case, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", jf_nn.FallbackWarning)  # every case runs the kernels
        out = ours(q, k, v, **kwargs)
        plain = theirs(q, k, v, **kwargs)
        exact = theirs(to64(q), to64(k), to64(v), **kwargs)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert_within_twice_plain("out", out, plain, exact, dtype)

        cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float64)

        def loss(fn):
            return lambda q, k, v: jnp.sum(fn(q, k, v, **kwargs).astype(jnp.float64) * cotangent)

        grads = jax.grad(loss(ours), argnums=(0, 1, 2))(q, k, v)
        grads_plain = jax.grad(loss(theirs), argnums=(0, 1, 2))(q, k, v)
        grads_exact = jax.grad(loss(theirs), argnums=(0, 1, 2))(to64(q), to64(k), to64(v))
    for name, g, gp, ge in zip("qkv", grads, grads_plain, grads_exact):
        assert g.shape == ge.shape
        assert_within_twice_plain(f"d{name}", g, gp, ge, dtype)


def test_no_warning_on_the_kernel_path():
    q, k, v = _inputs(CASES[1], jnp.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(q, k, v, is_causal=True)
        ours(q, k, v, scale=0.5)


def test_traced_scale_falls_back():
    _fresh_fallback_warnings()
    q, k, v = _inputs(CASES[0], jnp.float32)
    with pytest.warns(jf_nn.FallbackWarning, match="traced `scale`"):
        out = jax.jit(jf.dot_product_attention)(q, k, v, scale=0.5)
    np.testing.assert_allclose(out, jax.nn.dot_product_attention(q, k, v, scale=0.5), atol=1e-6)


def _fresh_fallback_warnings():
    jf_nn._warned_reasons.clear()


@pytest.mark.parametrize("what", ["bias", "mask", "lengths", "float64"])
def test_fallback_equals_jax_nn_and_warns_once(what):
    _fresh_fallback_warnings()
    q, k, v = random_qkv(3, 2, 8, 8, 4, 2, 16, jnp.float32)
    rng = np.random.default_rng(4)
    kwargs = {}
    if what == "bias":
        kwargs["bias"] = jnp.asarray(rng.standard_normal((2, 4, 8, 8)), jnp.float32)
    elif what == "mask":
        kwargs["mask"] = jnp.asarray(rng.uniform(size=(1, 1, 8, 8)) > 0.3)
    elif what == "lengths":
        kwargs["query_seq_lengths"] = jnp.array([8, 5], jnp.int32)
        kwargs["key_value_seq_lengths"] = jnp.array([6, 3], jnp.int32)
    else:
        q, k, v = to64(q), to64(k), to64(v)
    with pytest.warns(jf_nn.FallbackWarning) as record:
        out = jf.dot_product_attention(q, k, v, is_causal=True, **kwargs)
    assert len(record) == 1
    expected = jax.nn.dot_product_attention(q, k, v, is_causal=True, **kwargs)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same reason does not warn twice
        jf.dot_product_attention(q, k, v, is_causal=True, **kwargs)


def test_bias_gradient_flows_through_the_fallback():
    _fresh_fallback_warnings()
    q, k, v = random_qkv(5, 1, 6, 6, 2, 2, 8, jnp.float32)
    bias = jnp.asarray(np.random.default_rng(6).standard_normal((1, 2, 6, 6)), jnp.float32)

    def loss(fn, bias):
        return jnp.sum(fn(q, k, v, bias) ** 2)

    with pytest.warns(jf_nn.FallbackWarning):
        ours_grad = jax.grad(lambda b: loss(jf.dot_product_attention, b))(bias)
    theirs_grad = jax.grad(lambda b: loss(jax.nn.dot_product_attention, b))(bias)
    assert float(jnp.max(jnp.abs(theirs_grad))) > 0
    np.testing.assert_allclose(ours_grad, theirs_grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "shapes, error, match",
    [
        (((2, 8, 4, 16), (2, 8, 4, 16), (2, 8, 4)), ValueError, "value must have the rank"),
        (((8, 4, 16, 1, 1), (8, 4, 16), (8, 4, 16)), ValueError, "query must have rank 4"),
        (((2, 8, 4, 16), (2, 8, 3, 16), (2, 8, 3, 16)), ValueError, "multiple of the number"),
        (((2, 8, 4, 16), (1, 8, 4, 16), (1, 8, 4, 16)), ValueError, "batch size"),
        (((2, 8, 4, 16), (2, 8, 4, 8), (2, 8, 4, 8)), ValueError, "head_dim"),
        (((2, 8, 4, 16), (2, 8, 4, 16), (2, 9, 4, 16)), ValueError, "same shape"),
    ],
)
def test_bad_shapes_name_the_argument(shapes, error, match):
    q, k, v = (jnp.zeros(s, jnp.float32) for s in shapes)
    with pytest.raises(error, match=match):
        jf.dot_product_attention(q, k, v)


def test_bad_arguments():
    q = jnp.ones((1, 4, 2, 8), jnp.float32)
    with pytest.raises(TypeError, match="share one dtype"):
        jf.dot_product_attention(q, q.astype(jnp.bfloat16), q.astype(jnp.bfloat16))
    with pytest.raises(TypeError, match="local_window_size"):
        jf.dot_product_attention(q, q, q, local_window_size=(1, 2, 3))
    with pytest.raises(TypeError, match="is_causal"):
        jf.dot_product_attention(q, q, q, is_causal="yes")
