"""Packed sequences (q_segment_ids / kv_segment_ids): the same as separate calls, and within
twice plain attention's error of a float64 reference, forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash as jf
from helpers import (DTYPES, alibi_slopes_for, assert_within_twice_plain, flash, losses,
                     random_qkv, reference, to64)
from test_errors import B, D, H, S, arrays, trace


def runs(lengths, batch=1):
    """int32 (batch, sum(lengths)) ids: run i of lengths[i] tokens has id i (sorted docs)."""
    ids = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)])
    return jnp.asarray(np.broadcast_to(ids, (batch, ids.size)), jnp.int32)


def random_ids(seed, shape, values):
    return jnp.asarray(np.random.default_rng(seed).integers(0, values, shape), jnp.int32)


# Documents that straddle the CPU kernels' 64-row tiles, one-token documents, and a document
# longer than a tile.
DOC_LENGTHS = [5, 17, 1, 90, 40, 1, 66]


@pytest.mark.parametrize("causal", [False, True])
def test_packed_equals_separate_calls(causal):
    """Forward, lse and gradients of a packed row equal one call per document."""
    total = sum(DOC_LENGTHS)
    q, k, v = random_qkv(3, 1, total, total, 4, 2, 32, jnp.float32)
    ids = runs(DOC_LENGTHS)
    rng = np.random.default_rng(4)
    out_cot = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def packed(q, k, v):
        out, lse = jf.flash_attn_func(q, k, v, causal=causal, return_lse=True,
                                      q_segment_ids=ids, kv_segment_ids=ids)
        return jnp.sum(out * out_cot) + jnp.sum(lse), (out, lse)

    def separate(q, k, v):
        outs, lses, start = [], [], 0
        for n in DOC_LENGTHS:
            doc = slice(start, start + n)
            out, lse = jf.flash_attn_func(q[:, doc], k[:, doc], v[:, doc], causal=causal,
                                          return_lse=True)
            outs.append(out)
            lses.append(lse)
            start += n
        out, lse = jnp.concatenate(outs, 1), jnp.concatenate(lses, 2)
        return jnp.sum(out * out_cot) + jnp.sum(lse), (out, lse)

    (grads_p, (out_p, lse_p)) = jax.jit(jax.grad(packed, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    (grads_s, (out_s, lse_s)) = jax.jit(jax.grad(separate, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    np.testing.assert_allclose(out_p, out_s, atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(lse_p, lse_s, atol=2e-6, rtol=1e-6)
    for name, gp, gs in zip("dq dk dv".split(), grads_p, grads_s):
        np.testing.assert_allclose(gp, gs, atol=2e-5, rtol=1e-4, err_msg=name)


# (name, shape (batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim), kwargs, ids)
# ids: "runs" = sorted documents (self-attention lengths), "random" = unsorted ids from a
# few values (each query still sees some keys), "absent" = some query ids have no key.
CASES = [
    ("runs_causal_gqa", (2, 200, 200, 4, 2, 32), dict(causal=True), "runs"),
    ("runs_window_alibi", (1, 150, 150, 2, 1, 16), dict(window_size=(20, 5), alibi="heads"), "runs"),
    ("random_softcap", (2, 70, 90, 2, 2, 24), dict(softcap=2.0), "random"),
    ("random_causal_q_ne_k", (1, 45, 130, 4, 1, 40), dict(causal=True), "random"),
    ("absent_ids", (2, 33, 17, 2, 2, 8), dict(), "absent"),
    ("len1", (1, 1, 1, 1, 1, 16), dict(), "random"),
]


def make_case(shape, kwargs, ids_kind, seed=0):
    batch, seqlen_q, seqlen_k, num_heads = shape[:4]
    kwargs = dict(kwargs)
    if kwargs.pop("alibi", None):
        kwargs["alibi_slopes"] = alibi_slopes_for(num_heads)
    if ids_kind == "runs":
        lengths = [13, 70, 1, 64, 29, 23][: max(1, seqlen_q // 30)]
        lengths[-1] += seqlen_q - sum(lengths)
        q_ids = kv_ids = runs(lengths, batch)
    elif ids_kind == "random":
        q_ids = random_ids(seed, (batch, seqlen_q), 3)
        kv_ids = random_ids(seed + 1, (batch, seqlen_k), 3)
    else:  # ids 0..3 for queries, only 0 and 1 for keys: queries with 2 or 3 see nothing
        q_ids = random_ids(seed, (batch, seqlen_q), 4)
        kv_ids = random_ids(seed + 1, (batch, seqlen_k), 2)
    kwargs.update(q_segment_ids=q_ids, kv_segment_ids=kv_ids)
    return kwargs


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("name,shape,kwargs,ids_kind", CASES, ids=[c[0] for c in CASES])
def test_forward_against_reference(name, shape, kwargs, ids_kind, dtype_name):
    dtype = DTYPES[dtype_name]
    kwargs = make_case(shape, kwargs, ids_kind)
    q, k, v = random_qkv(1, *shape, dtype)
    out, lse = flash(q, k, v, return_lse=True, **kwargs)
    plain_out, plain_lse = reference(q, k, v, return_lse=True, **kwargs)
    exact_out, exact_lse = reference(*map(to64, (q, k, v)), return_lse=True, **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_within_twice_plain("out", out, plain_out, exact_out, dtype)
    assert_within_twice_plain("lse", lse, plain_lse, exact_lse, dtype)
    if ids_kind == "absent":
        seen = np.asarray(kwargs["q_segment_ids"]) < 2
        assert np.all(np.isinf(np.asarray(lse)).transpose(0, 2, 1) == ~seen[:, :, None])
        assert np.all(np.asarray(out, np.float32)[~seen] == 0)


@pytest.mark.parametrize("name,shape,kwargs,ids_kind", CASES, ids=[c[0] for c in CASES])
def test_gradients_against_reference(name, shape, kwargs, ids_kind):
    kwargs = make_case(shape, kwargs, ids_kind)
    q, k, v = random_qkv(2, *shape, jnp.float32)
    rng = np.random.default_rng(5)
    out_cot = jnp.asarray(rng.standard_normal(q.shape))
    lse_cot = jnp.asarray(rng.standard_normal((shape[0], shape[3], shape[1])))
    flash_loss, reference_loss = losses(kwargs)
    grad = lambda loss: jax.jit(jax.grad(loss, argnums=(0, 1, 2)))  # noqa: E731
    ours = grad(flash_loss)(q, k, v, out_cot, lse_cot)
    plain = grad(reference_loss)(q, k, v, out_cot, lse_cot)
    exact = grad(reference_loss)(*map(to64, (q, k, v)), out_cot, lse_cot)
    for name, g_ours, g_plain, g_exact in zip("dq dk dv".split(), ours, plain, exact):
        assert_within_twice_plain(name, g_ours, g_plain, g_exact, jnp.float32)


def test_vmap_over_segment_ids_only():
    """A batch of id patterns for the same q, k, v: one folded call, each pattern its own."""
    q, k, v = random_qkv(6, 1, 40, 40, 2, 2, 16, jnp.float32)
    patterns = jnp.stack([runs([40]), runs([10, 30]), runs([25, 15])])  # (3, 1, 40)
    fn = lambda ids: jf.flash_attn_func(q, k, v, causal=True, q_segment_ids=ids,  # noqa: E731
                                        kv_segment_ids=ids)
    batched = jax.jit(jax.vmap(fn))(patterns)
    for i in range(3):
        np.testing.assert_allclose(batched[i], fn(patterns[i]), atol=1e-6)
    assert not np.allclose(batched[0], batched[1])


def test_qkvpacked_segment_ids():
    q, k, v = random_qkv(7, 2, 50, 50, 2, 2, 16, jnp.float32)
    ids = runs([20, 30], batch=2)
    packed = jf.flash_attn_qkvpacked_func(jnp.stack([q, k, v], 2), causal=True, segment_ids=ids)
    direct = jf.flash_attn_func(q, k, v, causal=True, q_segment_ids=ids, kv_segment_ids=ids)
    np.testing.assert_array_equal(packed, direct)


def test_ids_of_other_integer_types():
    q, k, v = random_qkv(8, 1, 30, 30, 1, 1, 8, jnp.float32)
    ids = runs([12, 18])
    base = jf.flash_attn_func(q, k, v, q_segment_ids=ids, kv_segment_ids=ids)
    for dtype in (jnp.int8, jnp.uint16, jnp.int64):
        other = ids.astype(dtype)
        np.testing.assert_array_equal(
            jf.flash_attn_func(q, k, v, q_segment_ids=other, kv_segment_ids=other), base)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(q_segment_ids=jnp.zeros((B, S), jnp.int32)), ValueError, "must be given together"),
    (dict(kv_segment_ids=jnp.zeros((B, S), jnp.int32)), ValueError, "must be given together"),
    (dict(q_segment_ids=jnp.zeros((B, S + 1), jnp.int32), kv_segment_ids=jnp.zeros((B, S), jnp.int32)),
     ValueError, r"q_segment_ids must have shape \(batch, seqlen_q\) = \(2, 8\)"),
    (dict(q_segment_ids=jnp.zeros((B, S), jnp.int32), kv_segment_ids=jnp.zeros((S,), jnp.int32)),
     ValueError, r"kv_segment_ids must have shape \(batch, seqlen_k\)"),
    (dict(q_segment_ids=jnp.zeros((B, S), jnp.float32), kv_segment_ids=jnp.zeros((B, S), jnp.int32)),
     TypeError, "q_segment_ids must hold integers"),
    (dict(q_segment_ids=[[0] * S] * B, kv_segment_ids=jnp.zeros((B, S), jnp.int32)),
     TypeError, "q_segment_ids must be an array"),
])
def test_segment_id_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        trace(*arrays(), **kwargs)
    assert (B, S, H, D) == arrays()[0].shape
