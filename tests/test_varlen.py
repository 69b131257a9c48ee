"""flash_attn_varlen_func and its packed forms: the same as one flash_attn_func call per
sequence (outputs, lse and gradients), under jit with traced offsets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash as jf
from helpers import alibi_slopes_for


def offsets(lengths):
    return jnp.asarray(np.concatenate([[0], np.cumsum(lengths)]), jnp.int32)


def tokens(seed, total, heads, head_dim, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((total, heads, head_dim)), dtype)


def per_sequence(q, k, v, lengths_q, lengths_k, **kwargs):
    """out, lse from one flash_attn_func call per sequence (zeros / +inf without keys)."""
    outs, lses, start_q, start_k = [], [], 0, 0
    for n_q, n_k in zip(lengths_q, lengths_k):
        if n_q and n_k:
            out, lse = jf.flash_attn_func(q[None, start_q:start_q + n_q], k[None, start_k:start_k + n_k],
                                          v[None, start_k:start_k + n_k], return_lse=True, **kwargs)
            outs.append(out[0])
            lses.append(lse[0])
        elif n_q:
            outs.append(jnp.zeros((n_q,) + q.shape[1:], q.dtype))
            lses.append(jnp.full((q.shape[1], n_q), jnp.inf, jnp.float32))
        start_q += n_q
        start_k += n_k
    pad = q.shape[0] - start_q  # tokens past the last sequence
    outs.append(jnp.zeros((pad,) + q.shape[1:], q.dtype))
    lses.append(jnp.full((q.shape[1], pad), jnp.inf, jnp.float32))
    return jnp.concatenate(outs, 0), jnp.concatenate(lses, 1)


# (name, lengths_q, lengths_k (None: shared offsets), kwargs, extra tokens past the end)
CASES = [
    ("self_causal", [5, 0, 17, 64, 1, 30], None, dict(causal=True), 0),
    ("self_window_softcap_tail", [40, 3, 70], None, dict(window_size=(9, 4), softcap=3.0), 6),
    ("cross_causal", [3, 10, 0, 20, 7, 65], [8, 4, 5, 20, 0, 90], dict(causal=True), 0),
    ("cross_window_alibi", [12, 30, 1], [30, 12, 1], dict(window_size=(5, 2), alibi=True), 4),
    ("cross_plain", [7, 0, 33], [2, 9, 70], dict(), 0),
]


@pytest.mark.parametrize("name,lengths_q,lengths_k,kwargs,tail", CASES, ids=[c[0] for c in CASES])
def test_varlen_equals_per_sequence_calls(name, lengths_q, lengths_k, kwargs, tail):
    shared = lengths_k is None
    lengths_k = lengths_q if shared else lengths_k
    kwargs = dict(kwargs)
    if kwargs.pop("alibi", False):
        kwargs["alibi_slopes"] = alibi_slopes_for(4)
    total_q, total_k = sum(lengths_q) + tail, sum(lengths_k) + (tail if shared else 0)
    q, k, v = tokens(1, total_q, 4, 16), tokens(2, total_k, 2, 16), tokens(3, total_k, 2, 16)
    cu_q = offsets(lengths_q)
    cu_k = cu_q if shared else offsets(lengths_k)
    rng = np.random.default_rng(4)
    out_cot = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    lse_cot = jnp.asarray(rng.standard_normal((4, total_q)), jnp.float32)

    def loss(result):
        out, lse = result
        return jnp.sum(out * out_cot) + jnp.sum(jnp.where(jnp.isinf(lse), 0, lse) * lse_cot)

    def varlen(q, k, v, cu_q, cu_k):
        cu_k = cu_q if shared else cu_k  # the same traced array, as a user would pass it
        result = jf.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k),
                                           return_lse=True, **kwargs)
        return loss(result), result

    def separate(q, k, v):
        result = per_sequence(q, k, v, lengths_q, lengths_k, **kwargs)
        return loss(result), result

    grads, (out, lse) = jax.jit(jax.grad(varlen, argnums=(0, 1, 2), has_aux=True))(q, k, v, cu_q, cu_k)
    grads_ref, (out_ref, lse_ref) = jax.jit(jax.grad(separate, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    assert out.shape == q.shape and lse.shape == (4, total_q)
    np.testing.assert_allclose(out, out_ref, atol=2e-6, rtol=1e-5)
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(lse_ref))
    np.testing.assert_allclose(np.where(np.isinf(lse), 0, lse), np.where(np.isinf(lse_ref), 0, lse_ref),
                               atol=2e-6, rtol=1e-6)
    for name, g, g_ref in zip("dq dk dv".split(), grads, grads_ref):
        np.testing.assert_allclose(g, g_ref, atol=2e-5, rtol=1e-4, err_msg=name)


def test_new_lengths_do_not_recompile():
    q, k, v = tokens(5, 50, 2, 8), tokens(6, 50, 2, 8), tokens(7, 50, 2, 8)
    fn = jax.jit(lambda q, k, v, cu: jf.flash_attn_varlen_func(q, k, v, cu, cu, 50, 50, causal=True))
    first = fn(q, k, v, offsets([20, 30]))
    second = fn(q, k, v, offsets([35, 15]))  # same number of sequences: same shapes
    assert fn._cache_size() == 1
    np.testing.assert_allclose(second, per_sequence(q, k, v, [35, 15], [35, 15], causal=True)[0],
                               atol=2e-6)
    assert not np.allclose(first, second)


def test_malformed_offsets_give_zeros():
    q = tokens(8, 20, 1, 8)
    decreasing = jnp.asarray([0, 12, 5, 20], jnp.int32)
    out, lse = jf.flash_attn_varlen_func(q, q, q, decreasing, decreasing, 20, 20, return_lse=True)
    assert np.all(np.asarray(out) == 0) and np.all(np.isinf(lse))


def test_no_sequences():
    q = tokens(9, 6, 2, 8)
    out, lse = jf.flash_attn_varlen_func(q, q, q, jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32),
                                         0, 0, return_lse=True)
    assert np.all(np.asarray(out) == 0) and np.all(np.isinf(lse))


def test_packed_forms():
    lengths_q, lengths_k = [9, 21], [13, 6]
    q, k, v = tokens(10, 30, 4, 16), tokens(11, 19, 2, 16), tokens(12, 19, 2, 16)
    cu_q, cu_k = offsets(lengths_q), offsets(lengths_k)
    direct = jf.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 21, 13, causal=True)
    kv = jf.flash_attn_varlen_kvpacked_func(q, jnp.stack([k, v], 1), cu_q, cu_k, 21, 13, causal=True)
    np.testing.assert_array_equal(kv, direct)
    qkv = jnp.stack([q, q, q], 1)
    self_direct = jf.flash_attn_varlen_func(q, q, q, cu_q, cu_q, 21, 21, causal=True)
    np.testing.assert_array_equal(jf.flash_attn_varlen_qkvpacked_func(qkv, cu_q, 21, causal=True),
                                  self_direct)


def test_bfloat16_matches_per_sequence_bfloat16():
    lengths_q, lengths_k = [33, 70], [50, 64]
    q = tokens(13, 103, 4, 32, jnp.bfloat16)
    k, v = tokens(14, 114, 1, 32, jnp.bfloat16), tokens(15, 114, 1, 32, jnp.bfloat16)
    out = jf.flash_attn_varlen_func(q, k, v, offsets(lengths_q), offsets(lengths_k), 70, 64, causal=True)
    ref, _ = per_sequence(q, k, v, lengths_q, lengths_k, causal=True)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))


@pytest.mark.parametrize("call,error,match", [
    (lambda q, cu: jf.flash_attn_varlen_func(q[None], q, q, cu, cu, 4, 4), ValueError,
     r"q must have rank 3 \(total_tokens, num_heads, head_dim\)"),
    (lambda q, cu: jf.flash_attn_varlen_func(q, q, q, cu[None], cu[None], 4, 4), ValueError,
     "cu_seqlens_q must be a 1-D array"),
    (lambda q, cu: jf.flash_attn_varlen_func(q, q, q, cu, cu[:-1], 4, 4), ValueError,
     "the same number of sequences"),
    (lambda q, cu: jf.flash_attn_varlen_func(q, q, q, cu.astype(jnp.float32), cu, 4, 4), TypeError,
     "cu_seqlens_q must hold integers"),
    (lambda q, cu: jf.flash_attn_varlen_func(q, q, q, cu, cu, 4.0, 4), TypeError,
     "max_seqlen_q must be a static int"),
    (lambda q, cu: jf.flash_attn_varlen_func(q, q, q, cu, cu, 4, 4, alibi_slopes=jnp.ones((2, 2), jnp.float32)),
     ValueError, r"alibi_slopes must have shape \(num_heads,\)"),
    (lambda q, cu: jf.flash_attn_varlen_qkvpacked_func(q, cu, 4), ValueError,
     r"qkv must have shape \(total, 3"),
])
def test_varlen_errors(call, error, match):
    q, cu = jnp.zeros((8, 2, 16), jnp.float32), offsets([3, 5])
    with pytest.raises(error, match=match):
        jax.eval_shape(call, q, cu)
