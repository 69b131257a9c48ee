"""Attention dropout: the Philox specification, the kernels' masks against it, outputs and
gradients against the reference with the same mask, and the statistics of the mask."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash as jf
from jax_flash import dropout
from helpers import (alibi_slopes_for, assert_within_twice_plain, losses, max_error, random_qkv,
                     to64)

STATIC = ("dropout_p", "causal", "window_size", "softcap", "return_lse", "deterministic")
flash = jax.jit(jf.flash_attn_func, static_argnames=STATIC)


# Known answers of Philox4x32-10 from its authors' Random123 test vectors.
@pytest.mark.parametrize("counter,key,expected", [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(counter, key, expected):
    words = dropout.philox4x32_10(counter, key)
    assert tuple(int(w) for w in words) == expected


def kernel_mask(key, p, batch, seqlen_q, seqlen_k, num_heads, num_heads_kv, **kwargs):
    """The mask a kernel applied, read back through V = identity: with head_dim = seqlen_k,
    out[b, i, h, j] = P_ij * keep_ij * scale, nonzero exactly where key j is kept (P > 0)."""
    q, k, _ = random_qkv(3, batch, seqlen_q, seqlen_k, num_heads, num_heads_kv, seqlen_k,
                         jnp.float32)
    v = jnp.broadcast_to(jnp.eye(seqlen_k, dtype=jnp.float32)[None, :, None, :],
                         (batch, seqlen_k, num_heads_kv, seqlen_k))
    out = flash(q, k, v, dropout_p=p, dropout_key=key, **kwargs)
    return np.asarray(jnp.moveaxis(out, 2, 1) != 0)


@pytest.mark.parametrize("shape", [(1, 1, 16, 2, 1), (2, 17, 33, 4, 2), (1, 70, 130, 2, 2),
                                   (1, 130, 96, 3, 1)])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_kernel_mask_is_the_specified_mask(shape, p):
    key = jax.random.key(11)
    batch, seqlen_q, seqlen_k, num_heads, _ = shape
    ours = kernel_mask(key, p, *shape)
    expected = np.asarray(jf.dropout_mask(key, p, batch, num_heads, seqlen_q, seqlen_k))
    np.testing.assert_array_equal(ours, expected)


def test_mask_statistics():
    mask = np.asarray(jf.dropout_mask(jax.random.key(5), 0.3, 2, 4, 256, 256))
    assert abs(mask.mean() - dropout.keep_threshold(0.3) / 2 ** 16) < 0.005
    # Neighbours along both axes are independent (no shared draws between elements).
    agree_keys = (mask[..., 1:] == mask[..., :-1]).mean()
    agree_queries = (mask[..., 1:, :] == mask[..., :-1, :]).mean()
    expected_agree = 0.7 ** 2 + 0.3 ** 2
    assert abs(agree_keys - expected_agree) < 0.01 and abs(agree_queries - expected_agree) < 0.01
    # Heads and batch rows draw different masks.
    assert (mask[0, 0] != mask[0, 1]).mean() > 0.3 and (mask[0, 0] != mask[1, 0]).mean() > 0.3


def test_keep_scale_is_exactly_unbiased():
    for p in (0.1, 0.25, 0.5, 0.9, 1 - 2 ** -16):
        threshold = dropout.keep_threshold(p)
        assert abs(threshold / 2 ** 16 - (1 - p)) <= 2 ** -17
        assert dropout.keep_scale(p) * threshold == 2 ** 16


CASES = [
    ("len1", (2, 1, 1, 2, 1, 16), dict()),
    ("q17_k33_gqa_causal", (2, 17, 33, 4, 2, 32), dict(causal=True)),
    ("q70_k65_window_softcap", (1, 70, 65, 2, 1, 64), dict(window_size=(20, 3), softcap=2.0)),
    ("q40_k50_alibi", (2, 40, 50, 4, 4, 24), dict(alibi=True, causal=True)),
    ("segments", (2, 48, 48, 2, 1, 16), dict(segments=True, causal=True)),
    ("d256", (1, 33, 40, 2, 2, 256), dict()),
]


def resolve(shape, kwargs):
    kwargs = dict(kwargs)
    if kwargs.pop("alibi", False):
        kwargs["alibi_slopes"] = alibi_slopes_for(shape[3])
    if kwargs.pop("segments", False):
        rng = np.random.default_rng(2)
        ids = jnp.asarray(np.sort(rng.integers(0, 3, (shape[0], shape[1]))), jnp.int32)
        kwargs["q_segment_ids"] = kwargs["kv_segment_ids"] = ids
    return kwargs


def with_dropout(shape, kwargs, p, key):
    """flash_attn_func with dropout, and the reference with the specified mask."""
    batch, seqlen_q, seqlen_k, num_heads = shape[:4]
    mask = jf.dropout_mask(key, p, batch, num_heads, seqlen_q, seqlen_k)
    ours = functools.partial(jf.flash_attn_func, dropout_p=p, dropout_key=key)
    reference = functools.partial(jf.reference_attention, dropout_mask=mask,
                                  dropout_scale=dropout.keep_scale(p))
    return ours, reference


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name,shape,kwargs", CASES, ids=[c[0] for c in CASES])
def test_forward_matches_reference_with_the_same_mask(name, shape, kwargs, dtype):
    kwargs = resolve(shape, kwargs)
    q, k, v = random_qkv(4, *shape, dtype)
    ours_fn, reference_fn = with_dropout(shape, kwargs, 0.2, jax.random.key(9))
    out, lse = jax.jit(lambda *x: ours_fn(*x, return_lse=True, **kwargs))(q, k, v)
    reference = jax.jit(lambda *x: reference_fn(*x, return_lse=True, **kwargs))
    plain, plain_lse = reference(q, k, v)
    exact, exact_lse = reference(*map(to64, (q, k, v)))
    assert_within_twice_plain("out", out, plain, exact, dtype)
    assert_within_twice_plain("lse", lse, plain_lse, exact_lse, dtype)
    # lse is the undropped row's.
    undropped_lse = jax.jit(lambda *x: jf.reference_attention(*x, return_lse=True, **kwargs))(
        *map(to64, (q, k, v)))[1]
    assert max_error(exact_lse, undropped_lse) == 0.0


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("name,shape,kwargs", CASES, ids=[c[0] for c in CASES])
def test_gradients_match_reference_with_the_same_mask(name, shape, kwargs, deterministic):
    kwargs = resolve(shape, kwargs)
    q, k, v = random_qkv(6, *shape, jnp.float32)
    rng = np.random.default_rng(7)
    out_cot = jnp.asarray(rng.standard_normal(q.shape))
    lse_cot = jnp.asarray(rng.standard_normal((shape[0], shape[3], shape[1])))
    ours_fn, reference_fn = with_dropout(shape, kwargs, 0.3, jax.random.key(1))
    flash_loss, reference_loss = losses(kwargs, functools.partial(ours_fn, deterministic=deterministic),
                                        reference_fn)
    grad = lambda fn, *x: jax.jit(jax.grad(fn, argnums=(0, 1, 2)))(*x, out_cot, lse_cot)
    ours, plain, exact = grad(flash_loss, q, k, v), grad(reference_loss, q, k, v), grad(
        reference_loss, *map(to64, (q, k, v)))
    for name_, g_ours, g_plain, g_exact in zip(("dq", "dk", "dv"), ours, plain, exact):
        assert_within_twice_plain(name_, g_ours, g_plain, g_exact, jnp.float32)


def test_gradients_agree_with_finite_differences():
    shape = (1, 20, 24, 2, 1, 16)
    q, k, v = random_qkv(8, *shape, jnp.float32)
    key = jax.random.key(4)
    rng = np.random.default_rng(9)
    cot = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    loss = jax.jit(lambda q, k, v: jnp.sum(
        flash(q, k, v, dropout_p=0.4, dropout_key=key, causal=True).astype(jnp.float64) * cot))
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    for arg in range(3):
        direction = jnp.asarray(rng.standard_normal(shape[:1] + (q, k, v)[arg].shape[1:]),
                                jnp.float32)
        eps = 1e-2
        plus = [q, k, v]
        minus = [q, k, v]
        plus[arg] = plus[arg] + eps * direction
        minus[arg] = minus[arg] - eps * direction
        numeric = (loss(*plus) - loss(*minus)) / (2 * eps)
        analytic = jnp.sum(grads[arg].astype(jnp.float64) * direction)
        assert abs(float(numeric - analytic)) <= 1e-2 * max(1.0, abs(float(analytic))), (
            arg, float(numeric), float(analytic))


def test_same_key_same_output_different_keys_differ():
    q, k, v = random_qkv(1, 2, 30, 30, 2, 2, 16, jnp.float32)
    a = flash(q, k, v, dropout_p=0.3, dropout_key=jax.random.key(1))
    b = flash(q, k, v, dropout_p=0.3, dropout_key=jax.random.key(1))
    c = flash(q, k, v, dropout_p=0.3, dropout_key=jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert max_error(a, c) > 1e-3
    # A raw uint32 key works the same way as the typed key it holds.
    raw = flash(q, k, v, dropout_p=0.3, dropout_key=jax.random.key_data(jax.random.key(1)))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(raw))


def test_mean_over_keys_approaches_no_dropout():
    q, k, v = random_qkv(2, 1, 8, 16, 1, 1, 8, jnp.float32)
    keys = jax.random.split(jax.random.key(0), 4000)
    outs = jax.vmap(lambda key: jf.flash_attn_func(q, k, v, dropout_p=0.5, dropout_key=key))(keys)
    mean, spread = np.asarray(outs.mean(0)), np.asarray(outs.std(0))
    expected = np.asarray(jf.flash_attn_func(q, k, v))
    # Within 5 standard errors everywhere (4000 samples).
    assert np.all(np.abs(mean - expected) <= 5 * spread / np.sqrt(len(keys)) + 1e-6)


def test_vmap_over_keys_and_over_queries_equals_a_loop():
    q, k, v = random_qkv(3, 2, 24, 24, 4, 2, 16, jnp.float32)
    keys = jax.random.split(jax.random.key(3), 3)
    call = lambda q, key: jf.flash_attn_func(q, k, v, dropout_p=0.25, dropout_key=key, causal=True)
    mapped = jax.jit(jax.vmap(call))(jnp.stack([q, 2 * q, -q]), keys)
    for i, scale in enumerate((1, 2, -1)):
        np.testing.assert_allclose(mapped[i], call(scale * q, keys[i]), rtol=1e-5, atol=1e-6)
    # Only q mapped (one key): the mapped axis folds into the heads, and each copy must
    # still draw its own head's mask.
    queries_only = jax.jit(jax.vmap(lambda q: call(q, keys[0])))(jnp.stack([q, 2 * q]))
    for i, scale in enumerate((1, 2)):
        np.testing.assert_allclose(queries_only[i], call(scale * q, keys[0]), rtol=1e-5, atol=1e-6)


def test_dropout_zero_ignores_the_key():
    q, k, v = random_qkv(1, 1, 10, 10, 2, 2, 8, jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(flash(q, k, v, dropout_p=0.0, dropout_key=jax.random.key(0))),
        np.asarray(flash(q, k, v)))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(dropout_p=0.1), ValueError, "needs dropout_key"),
    (dict(dropout_p=1.0, dropout_key=jax.random.key(0)), ValueError, r"\[0, 1\)"),
    (dict(dropout_p=1 - 2 ** -20, dropout_key=jax.random.key(0)), ValueError, "2\\*\\*-17"),
    (dict(dropout_p=1 - 2 ** -17, dropout_key=jax.random.key(0)), ValueError, "keep nothing"),
    (dict(dropout_p=-0.1, dropout_key=jax.random.key(0)), ValueError, r"\[0, 1\)"),
    (dict(dropout_p=0.1, dropout_key=3), TypeError, "PRNG key"),
    (dict(dropout_p=0.1, dropout_key=jnp.zeros((2,), jnp.int32)), TypeError, "PRNG key"),
    (dict(dropout_p=0.1, dropout_key=jax.random.split(jax.random.key(0), 2)), ValueError,
     "single PRNG key"),
])
def test_errors(kwargs, error, match):
    q, k, v = random_qkv(1, 1, 4, 4, 1, 1, 8, jnp.float32)
    with pytest.raises(error, match=match):
        jf.flash_attn_func(q, k, v, **kwargs)


def test_traced_dropout_p_is_rejected():
    q, k, v = random_qkv(1, 1, 4, 4, 1, 1, 8, jnp.float32)
    with pytest.raises(TypeError, match="dropout_p must be a static"):
        jax.jit(lambda p: jf.flash_attn_func(q, k, v, dropout_p=p,
                                             dropout_key=jax.random.key(0)))(0.1)
