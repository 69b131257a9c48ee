"""The movable mask diagonal (the key aligned with query 0) that top-left masks and ring
attention use: forward, lse and gradients against the float64 reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_forward import check_forward

from helpers import (DTYPES, alibi_slopes_for, assert_within_twice_plain, flash_offset, losses,
                     random_qkv, reference_offset, to64)

SHAPE = (2, 17, 33, 4, 2, 32)  # (batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim)
# From "every key hidden" through top-left (0) and bottom-right (16) to "every key visible".
OFFSETS = [-40, -5, 0, 7, 16, 45]
MASKS = {
    "causal": dict(causal=True),
    "window": dict(window_size=(6, 3)),
    "window_left_causal_alibi": dict(causal=True, window_size=(9, -1), alibi=True),
    "alibi_softcap": dict(alibi=True, softcap=2.0),
}


def kwargs_for(mask_name, offset):
    kwargs = dict(MASKS[mask_name], diagonal_offset=offset)
    if kwargs.pop("alibi", False):
        kwargs["alibi_slopes"] = alibi_slopes_for(SHAPE[3], batch=SHAPE[0])
    return kwargs


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("mask_name", MASKS)
@pytest.mark.parametrize("offset", OFFSETS)
def test_forward(offset, mask_name, dtype_name):
    exact_lse = check_forward(SHAPE, kwargs_for(mask_name, offset), DTYPES[dtype_name],
                              seed=offset + 50, flash_fn=flash_offset,
                              reference_fn=reference_offset)
    if offset == -40 and mask_name.startswith(("causal", "window")):
        assert np.isinf(np.asarray(exact_lse)).all()  # the diagonal lies before every key


@pytest.mark.parametrize("mask_name", MASKS)
@pytest.mark.parametrize("offset", [-5, 0, 7, 45])
def test_gradients(offset, mask_name):
    dtype = jnp.float32
    q, k, v = random_qkv(offset + 60, *SHAPE, dtype)
    rng = np.random.default_rng(offset + 160)
    out_cot = jnp.asarray(rng.standard_normal(q.shape))
    lse_cot = jnp.asarray(rng.standard_normal((SHAPE[0], SHAPE[3], SHAPE[1])))
    flash_loss, reference_loss = losses(kwargs_for(mask_name, offset), flash_offset, reference_offset)
    grad = lambda f, *x: jax.jit(jax.grad(f, argnums=(0, 1, 2)))(*x, out_cot, lse_cot)
    ours = grad(flash_loss, q, k, v)
    plain = grad(reference_loss, q, k, v)
    exact = grad(reference_loss, *map(to64, (q, k, v)))
    for name, g_ours, g_plain, g_exact in zip("dq dk dv".split(), ours, plain, exact):
        assert_within_twice_plain(name, g_ours, g_plain, g_exact, dtype)


def test_default_is_bottom_right():
    q, k, v = random_qkv(3, *SHAPE, jnp.float32)
    bottom_right = flash_offset(q, k, v, causal=True, diagonal_offset=SHAPE[2] - SHAPE[1])
    default = flash_offset(q, k, v, causal=True)
    np.testing.assert_array_equal(np.asarray(default), np.asarray(bottom_right))


@pytest.mark.parametrize("bad,error", [(1.5, TypeError), (True, TypeError), (2**30, ValueError)])
def test_bad_offset(bad, error):
    q, k, v = random_qkv(0, *SHAPE, jnp.float32)
    with pytest.raises(error, match="diagonal_offset"):
        flash_offset(q, k, v, causal=True, diagonal_offset=bad)
