"""vmap over any subset of arguments (folded into batch or heads, never a loop), nested
transforms, checkpoint and eval_shape."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash as jf
from helpers import alibi_slopes_for, random_qkv

SHAPE = (2, 13, 11, 4, 2, 16)  # batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim
N = 3  # mapped axis size


def mapped_inputs(in_axes, seed=0):
    """q, k, v with a mapped axis of size N inserted at each given position."""
    rng = np.random.default_rng(seed)
    arrays = []
    for x, axis in zip(random_qkv(seed, *SHAPE, jnp.float32), in_axes):
        if axis is not None:
            x = jnp.stack([x * (1 + 0.5 * i) + rng.standard_normal(x.shape) * 0.1
                           for i in range(N)], axis=axis).astype(jnp.float32)
        arrays.append(x)
    return arrays


def per_example(fn, arrays, in_axes, out_axes=0):
    """What vmap must equal: fn applied to each mapped slice in turn."""
    results = []
    for i in range(N):
        args = [x if a is None else jnp.take(x, i, axis=a) for x, a in zip(arrays, in_axes)]
        results.append(fn(*args))
    return jax.tree.map(lambda *xs: jnp.stack(xs, axis=out_axes), *results)


SUBSETS = [axes for axes in itertools.product([None, 0, 2], repeat=3) if axes != (None,) * 3]


@pytest.mark.parametrize("in_axes", SUBSETS, ids=str)
def test_vmap_forward_every_subset(in_axes):
    arrays = mapped_inputs(in_axes)
    fn = lambda q, k, v: jf.flash_attn_func(q, k, v, causal=True, return_lse=True)
    out, lse = jax.jit(jax.vmap(fn, in_axes=in_axes))(*arrays)
    want_out, want_lse = per_example(fn, arrays, in_axes)
    np.testing.assert_allclose(out, want_out, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(lse, want_lse, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("in_axes", [(0, None, None), (None, 1, 1), (3, 0, None), (0, 0, 0)], ids=str)
def test_vmap_of_grad(in_axes):
    arrays = mapped_inputs(in_axes, seed=1)
    loss = lambda q, k, v: jnp.sum(jnp.tanh(jf.flash_attn_func(q, k, v, window_size=(3, 1))))
    grad = jax.grad(loss, argnums=(0, 1, 2))
    got = jax.jit(jax.vmap(grad, in_axes=in_axes))(*arrays)
    want = per_example(grad, arrays, in_axes)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_grad_of_vmap_sums_over_the_mapped_axis():
    arrays = mapped_inputs((0, None, None), seed=2)
    fn = lambda q, k, v: jnp.sum(jax.vmap(jf.flash_attn_func, in_axes=(0, None, None))(q, k, v) ** 2)
    got = jax.grad(fn, argnums=(0, 1, 2))(*arrays)
    loop = lambda q, k, v: sum(jnp.sum(jf.flash_attn_func(q[i], k, v) ** 2) for i in range(N))
    want = jax.grad(loop, argnums=(0, 1, 2))(*arrays)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_nested_vmap():
    q, k, v = random_qkv(3, *SHAPE, jnp.float32)
    q2 = jnp.stack([jnp.stack([q * (i + 1) + j for j in range(2)]) for i in range(3)])  # (3, 2, ...)
    k2 = jnp.stack([k - i for i in range(2)])  # mapped by the inner vmap only
    inner = jax.vmap(lambda q, k: jf.flash_attn_func(q, k, v, causal=True), in_axes=(0, 0))
    out = jax.jit(jax.vmap(inner, in_axes=(0, None)))(q2, k2)
    for i in range(3):
        for j in range(2):
            np.testing.assert_allclose(out[i, j], jf.flash_attn_func(q2[i, j], k2[j], v, causal=True),
                                       rtol=2e-6, atol=2e-6)


def test_vmap_with_alibi_slopes_mapped_or_not():
    q, k, v = random_qkv(4, *SHAPE, jnp.float32)
    slopes = jnp.stack([alibi_slopes_for(4) * (i + 1) for i in range(N)])
    qs = jnp.stack([q + i for i in range(N)])
    fn = lambda q, s: jf.flash_attn_func(q, k, v, alibi_slopes=s, causal=True)
    got = jax.vmap(fn)(qs, slopes)
    np.testing.assert_allclose(got, per_example(fn, [qs, slopes], (0, 0)), rtol=2e-6, atol=2e-6)
    got = jax.vmap(fn, in_axes=(0, None))(qs, slopes[1])
    want = per_example(lambda q: fn(q, slopes[1]), [qs], (0,))
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)


def test_vmap_compiles_to_one_kernel_call_without_a_loop():
    arrays = mapped_inputs((0, None, 0))
    loss = lambda q, k, v: jnp.sum(jf.flash_attn_func(q, k, v) ** 2)
    hlo = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2)), in_axes=(0, None, 0))).lower(
        *arrays).as_text()
    assert hlo.count("custom_call @jax_flash_forward(") == 1
    assert hlo.count("custom_call @jax_flash_backward(") == 1
    assert "while" not in hlo


def test_query_only_vmap_folds_into_heads_without_copying_kv():
    arrays = mapped_inputs((0, None, None))
    hlo = jax.jit(jax.vmap(jf.flash_attn_func, in_axes=(0, None, None))).lower(*arrays).as_text()
    b, sq, sk, h, hk, d = SHAPE
    # The kernel sees N * h query heads against the original k and v; no copy of k or v
    # with a mapped axis (N x ...) or with N * batch rows appears anywhere.
    call = next(line for line in hlo.splitlines() if "custom_call @jax_flash_forward(" in line)
    assert f"tensor<{b}x{sq}x{h * N}x{d}xf32>" in call
    assert f"tensor<{b}x{sk}x{hk}x{d}xf32>" in call
    assert f"tensor<{N}x{b}x{sk}x{hk}x{d}xf32>" not in hlo
    assert f"tensor<{N * b}x{sk}x{hk}x{d}xf32>" not in hlo


def test_nested_jit_grad_checkpoint_and_eval_shape():
    q, k, v = random_qkv(5, *SHAPE, jnp.float32)

    def loss(q, k, v):
        f = jax.checkpoint(lambda q, k, v: jf.flash_attn_func(q, k, v, causal=True, softcap=3.0))
        return jnp.sum(jax.jit(f)(q, k, v) ** 2)

    g_checkpointed = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    plain = lambda q, k, v: jnp.sum(jf.flash_attn_func(q, k, v, causal=True, softcap=3.0) ** 2)
    g_plain = jax.grad(plain, argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_checkpointed, g_plain):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)

    shapes = jax.eval_shape(lambda q, k, v: jf.flash_attn_func(q, k, v, return_lse=True), q, k, v)
    assert shapes[0].shape == q.shape and shapes[1].shape == (SHAPE[0], SHAPE[3], SHAPE[1])
    assert shapes[1].dtype == jnp.float32


def test_value_and_grad_with_unused_lse_and_eager_mode():
    q, k, v = random_qkv(6, *SHAPE, jnp.bfloat16)
    value, grads = jax.value_and_grad(
        lambda q: jnp.sum(jf.flash_attn_func(q, k, v, return_lse=True)[0].astype(jnp.float32)))(q)
    assert grads.dtype == jnp.bfloat16 and np.isfinite(float(value))
    assert np.all(np.isfinite(np.asarray(grads, np.float32)))
