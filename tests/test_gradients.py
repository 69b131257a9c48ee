"""Gradients of q, k, v through out and lse against a float64 reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash as jf
from helpers import (DTYPES, alibi_slopes_for, assert_within_twice_plain, losses, random_qkv,
                     to64)

# (name, shape (batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim), kwargs)
CASES = [
    ("len1", (2, 1, 1, 2, 1, 16), dict()),
    ("len17_causal", (1, 17, 17, 4, 4, 40), dict(causal=True)),
    ("q17_k33_gqa_window", (2, 17, 33, 4, 2, 64), dict(window_size=(6, 2))),
    ("q33_k17_mqa_causal", (1, 33, 17, 4, 1, 24), dict(causal=True)),
    ("q130_k70_d7", (1, 130, 70, 2, 2, 7), dict()),
    ("d256_causal_window", (1, 70, 65, 2, 1, 256), dict(causal=True, window_size=(20, -1))),
    ("softcap_gqa", (2, 40, 50, 4, 2, 32), dict(softcap=1.5)),
    ("alibi_heads_causal", (2, 40, 50, 4, 2, 32), dict(causal=True, alibi="heads")),
    ("alibi_batch_softcap_window", (2, 45, 45, 4, 4, 16),
     dict(alibi="batch", softcap=3.0, window_size=(9, 9), softmax_scale=0.4)),
    ("len300_causal_mqa", (1, 300, 300, 4, 1, 64), dict(causal=True)),
]


def resolve(shape, kwargs):
    kwargs = dict(kwargs)
    alibi = kwargs.pop("alibi", None)
    if alibi == "heads":
        kwargs["alibi_slopes"] = alibi_slopes_for(shape[3])
    elif alibi == "batch":
        kwargs["alibi_slopes"] = alibi_slopes_for(shape[3], batch=shape[0])
    return kwargs


def check_gradients(shape, kwargs, dtype, seed=1):
    q, k, v = random_qkv(seed, *shape, dtype)
    rng = np.random.default_rng(seed + 100)
    out_cot = jnp.asarray(rng.standard_normal(q.shape))
    lse_cot = jnp.asarray(rng.standard_normal((shape[0], shape[3], shape[1])))
    flash_loss, reference_loss = losses(kwargs)
    ours = jax.jit(jax.grad(flash_loss, argnums=(0, 1, 2)))(q, k, v, out_cot, lse_cot)
    plain = jax.jit(jax.grad(reference_loss, argnums=(0, 1, 2)))(q, k, v, out_cot, lse_cot)
    exact = jax.jit(jax.grad(reference_loss, argnums=(0, 1, 2)))(
        *map(to64, (q, k, v)), out_cot, lse_cot)
    for name, g_ours, g_plain, g_exact, x in zip("dq dk dv".split(), ours, plain, exact, (q, k, v)):
        assert g_ours.shape == x.shape and g_ours.dtype == x.dtype, name
        assert_within_twice_plain(name, g_ours, g_plain, g_exact, dtype)


@pytest.mark.parametrize("name,shape,kwargs", CASES, ids=[c[0] for c in CASES])
def test_gradients_float32(name, shape, kwargs):
    check_gradients(shape, resolve(shape, kwargs), jnp.float32)


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
@pytest.mark.parametrize("name,shape,kwargs", CASES[1:4] + CASES[7:9],
                         ids=[c[0] for c in CASES[1:4] + CASES[7:9]])
def test_gradients_half_precision(name, shape, kwargs, dtype_name):
    check_gradients(shape, resolve(shape, kwargs), DTYPES[dtype_name])


def test_lse_gradient_alone():
    """Only lse feeds the loss: dq, dk come entirely from the folded dlse term."""
    q, k, v = random_qkv(11, 1, 23, 31, 2, 2, 16, jnp.float64)

    def lse_loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, causal=True, return_lse=True)[1]))

    ours = jax.grad(lse_loss(jf.flash_attn_func), argnums=(0, 1, 2))(
        *(x.astype(jnp.float32) for x in (q, k, v)))
    exact = jax.grad(lse_loss(jf.reference_attention), argnums=(0, 1, 2))(q, k, v)
    for g_ours, g_exact in zip(ours, exact):
        np.testing.assert_allclose(g_ours, g_exact, atol=2e-5, rtol=1e-4)
    np.testing.assert_array_equal(ours[2], 0.0)  # v does not affect lse


def test_packed_gradients_flow_to_packed_arrays():
    q, k, v = random_qkv(12, 2, 19, 19, 2, 2, 16, jnp.float32)
    qkv = jnp.stack([q, k, v], axis=2)
    g_packed = jax.grad(lambda x: jnp.sum(jf.flash_attn_qkvpacked_func(x, causal=True) ** 2))(qkv)
    g_q, g_k, g_v = jax.grad(
        lambda q, k, v: jnp.sum(jf.flash_attn_func(q, k, v, causal=True) ** 2), argnums=(0, 1, 2)
    )(q, k, v)
    np.testing.assert_array_equal(g_packed, jnp.stack([g_q, g_k, g_v], axis=2))
    kv = jnp.stack([k, v], axis=2)
    g_q2, g_kv = jax.grad(
        lambda q, kv: jnp.sum(jf.flash_attn_kvpacked_func(q, kv, causal=True) ** 2), argnums=(0, 1)
    )(q, kv)
    np.testing.assert_array_equal(g_q2, g_q)
    np.testing.assert_array_equal(g_kv, jnp.stack([g_k, g_v], axis=2))


def test_alibi_slopes_get_no_gradient():
    q, k, v = random_qkv(13, 1, 9, 9, 2, 2, 8, jnp.float32)
    slopes = alibi_slopes_for(2)
    g = jax.grad(lambda s: jnp.sum(jf.flash_attn_func(q, k, v, alibi_slopes=s)))(slopes)
    np.testing.assert_array_equal(g, 0.0)


def test_deterministic_flag_on_cpu():
    """The CPU backward is deterministic either way: the flag changes nothing."""
    shape, kwargs = (2, 40, 50, 4, 2, 32), dict(causal=True, softcap=2.0)
    q, k, v = random_qkv(9, *shape, jnp.float32)
    grads = [jax.jit(jax.grad(lambda q, k, v, det=det: jnp.sum(jf.flash_attn_func(
        q, k, v, deterministic=det, **kwargs) ** 2), argnums=(0, 1, 2)))(q, k, v)
        for det in (False, True)]
    for a, b in zip(*grads):
        np.testing.assert_array_equal(a, b)
