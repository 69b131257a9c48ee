"""jax_flash.layers.equinox.MultiheadAttention against equinox.nn.MultiheadAttention."""

from __future__ import annotations

import importlib
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

eqx = pytest.importorskip("equinox")

import jax_flash as jf  # noqa: E402
from jax_flash.layers.equinox import MultiheadAttention  # noqa: E402
from helpers import assert_within_twice_plain  # noqa: E402


def _inputs(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _to64(model):
    return jax.tree.map(lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, model)


# float32 explicitly: under x64 (the suite's setting) equinox defaults to float64 weights,
# which the kernels do not take (that would test the fallback).
F32 = jnp.float32
PROJECTIONS = lambda m: (m.query_proj, m.key_proj, m.value_proj, m.output_proj)  # noqa: E731


def _repeat_kv_heads(linear, num_kv_heads, group):
    """A Linear whose kv heads are repeated `group` times: eqx's MHA equivalent of GQA."""
    weight = linear.weight.reshape(num_kv_heads, 1, -1, linear.weight.shape[-1])
    weight = jnp.broadcast_to(weight, (num_kv_heads, group, *weight.shape[2:]))
    return eqx.tree_at(lambda l: l.weight, linear, weight.reshape(-1, linear.weight.shape[-1]))


def _batched_loss(model, their_kwargs, cotangent):
    @eqx.filter_jit
    @eqx.filter_grad(has_aux=True)
    def loss(model, query, key_, value):
        out = jax.vmap(lambda q, k, v: model(q, k, v, **their_kwargs))(query, key_, value)
        return jnp.sum(out.astype(jnp.float64) * cotangent), out
    return loss


def _compare(ours, theirs, args, their_kwargs=None, group=1):
    """Forward and parameter gradients under vmap, with the float64 eqx layer as exact."""
    their_kwargs = their_kwargs or {}
    out_shape = (args[0].shape[0], args[0].shape[1], ours.output_size)
    cotangent = jnp.asarray(np.random.default_rng(42).standard_normal(out_shape))
    results = []
    for model, kwargs, cast in ((ours, {}, False), (theirs, their_kwargs, False),
                                (theirs, their_kwargs, True)):
        model_args = [a.astype(jnp.float64) for a in args] if cast else args
        model = _to64(model) if cast else model
        with warnings.catch_warnings():
            if model is ours:
                warnings.simplefilter("error", jf.FallbackWarning)  # ours runs the kernels
            grads, out = _batched_loss(model, kwargs, cotangent)(model, *model_args)
        results.append((out, [getattr(p, "weight") for p in PROJECTIONS(grads)]))
    (out, grads), (plain, grads_plain), (exact, grads_exact) = results
    assert out.shape == plain.shape and float(jnp.max(jnp.abs(out))) > 0
    assert_within_twice_plain("out", out, plain, exact, jnp.float32)
    for index, (g, gp, ge) in enumerate(zip(grads, grads_plain, grads_exact)):
        if index in (1, 2) and group > 1:
            # eqx's layer holds every kv head `group` times: its gradient sums to ours.
            gp, ge = (x.reshape(ours.num_kv_heads, group, -1, x.shape[-1]).sum(1).reshape(g.shape)
                      for x in (gp, ge))
        assert float(jnp.max(jnp.abs(g))) > 0
        assert_within_twice_plain(f"grad {index}", g, gp, ge, jnp.float32)


def test_same_key_gives_same_weights_and_fields():
    ours = MultiheadAttention(4, 16, use_query_bias=True, dtype=F32, key=jax.random.key(0))
    theirs = eqx.nn.MultiheadAttention(4, 16, use_query_bias=True, dtype=F32, key=jax.random.key(0))
    for a, b in zip(PROJECTIONS(ours), PROJECTIONS(theirs)):
        np.testing.assert_array_equal(a.weight, b.weight)
    assert (ours.qk_size, ours.vo_size, ours.output_size) == (theirs.qk_size, theirs.vo_size, theirs.output_size)


def test_self_attention_under_vmap():
    ours = MultiheadAttention(4, 16, use_query_bias=True, use_output_bias=True, dtype=F32, key=jax.random.key(0))
    theirs = eqx.nn.MultiheadAttention(4, 16, use_query_bias=True, use_output_bias=True,
                                       dtype=F32, key=jax.random.key(1))
    theirs = eqx.tree_at(PROJECTIONS, theirs, PROJECTIONS(ours))  # load our weights
    x = _inputs(0, 3, 10, 16)
    _compare(ours, theirs, [x, x, x])


def test_cross_attention_causal_window_gqa():
    ours = MultiheadAttention(4, 16, key_size=12, value_size=6, output_size=8, num_kv_heads=2,
                              causal=True, window_size=(3, -1), dtype=F32, key=jax.random.key(2))
    theirs = eqx.nn.MultiheadAttention(4, 16, key_size=12, value_size=6, output_size=8,
                                       dtype=F32, key=jax.random.key(3))
    theirs = eqx.tree_at(PROJECTIONS, theirs, (
        ours.query_proj, _repeat_kv_heads(ours.key_proj, 2, 2),
        _repeat_kv_heads(ours.value_proj, 2, 2), ours.output_proj))
    seqlen_q, seqlen_k = 9, 13  # top-left aligned, as the band mask below
    position_q, position_k = np.arange(seqlen_q)[:, None], np.arange(seqlen_k)[None, :]
    band = jnp.asarray((position_k <= position_q) & (position_k >= position_q - 3))
    args = [_inputs(4, 2, seqlen_q, 16), _inputs(5, 2, seqlen_k, 12), _inputs(6, 2, seqlen_k, 6)]
    _compare(ours, theirs, args, their_kwargs=dict(mask=band), group=2)


def test_mask_falls_back_with_a_warning_and_matches_equinox():
    jf.nn._warned_reasons.clear()
    ours = MultiheadAttention(2, 8, dtype=F32, key=jax.random.key(0))
    theirs = eqx.nn.MultiheadAttention(2, 8, dtype=F32, key=jax.random.key(0))
    x = _inputs(7, 6, 8)
    mask = jnp.asarray(np.random.default_rng(8).uniform(size=(2, 6, 6)) > 0.4).at[1, 2].set(False)
    with pytest.warns(jf.FallbackWarning, match="mask"):
        out = ours(x, x, x, mask=mask)
    np.testing.assert_allclose(out, theirs(x, x, x, mask=mask), rtol=1e-5, atol=1e-6)


def test_segment_ids_under_vmap_equal_equinox_with_the_segment_mask():
    ours = MultiheadAttention(4, 16, key_size=12, num_kv_heads=2, causal=True, dtype=F32,
                              key=jax.random.key(4))
    theirs = eqx.nn.MultiheadAttention(4, 16, key_size=12, dtype=F32, key=jax.random.key(5))
    theirs = eqx.tree_at(PROJECTIONS, theirs, (
        ours.query_proj, _repeat_kv_heads(ours.key_proj, 2, 2),
        _repeat_kv_heads(ours.value_proj, 2, 2), ours.output_proj))
    rng = np.random.default_rng(9)
    q_ids = jnp.asarray(np.sort(rng.integers(0, 4, size=(3, 11)), axis=-1), jnp.int32)
    kv_ids = jnp.asarray(np.sort(rng.integers(0, 3, size=(3, 11)), axis=-1), jnp.int32)
    causal = np.arange(11)[None, :] <= np.arange(11)[:, None]
    masks = (q_ids[:, :, None] == kv_ids[:, None, :]) & causal  # some rows see no key
    args = [_inputs(10, 3, 11, 16), _inputs(11, 3, 11, 12), _inputs(12, 3, 11, 16)]
    # The ids and masks ride along as batched arguments of the vmapped call.
    ours_call = lambda m, q, k, v, qi, ki: m(q, k, v, q_segment_ids=qi, kv_segment_ids=ki)  # noqa: E731
    theirs_call = lambda m, q, k, v, mask: m(q, k, v, mask=mask)  # noqa: E731
    out = jax.vmap(ours_call, (None, 0, 0, 0, 0, 0))(ours, *args, q_ids, kv_ids)
    plain = jax.vmap(theirs_call, (None, 0, 0, 0, 0))(theirs, *args, masks)
    exact = jax.vmap(theirs_call, (None, 0, 0, 0, 0))(
        _to64(theirs), *(a.astype(jnp.float64) for a in args), masks)
    assert bool(jnp.any(~jnp.any(masks, axis=-1)))  # the uniform-average rows are exercised
    assert float(jnp.max(jnp.abs(out))) > 0
    assert_within_twice_plain("out", out, plain, exact, jnp.float32)
    with pytest.raises(ValueError, match=r"q_segment_ids must have shape \(seqlen,\)"):
        ours(args[0][0], args[1][0], args[2][0], q_segment_ids=q_ids)


def test_dropout_draws_the_kernels_mask_on_every_path():
    ours = MultiheadAttention(2, 8, dropout_p=0.3, dtype=F32, key=jax.random.key(0))
    x = _inputs(9, 5, 8)
    with pytest.raises(RuntimeError, match="needs a key"):
        ours(x, x, x)
    first, again = ours(x, x, x, key=jax.random.key(1)), ours(x, x, x, key=jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
    other = ours(x, x, x, key=jax.random.key(2))
    assert float(jnp.max(jnp.abs(first - other))) > 1e-4
    assert float(jnp.max(jnp.abs(first - ours(x, x, x, inference=True)))) > 1e-4
    # A mask that hides nothing takes the XLA fallback, which must draw the same mask.
    jf.nn._warned_reasons.clear()
    with pytest.warns(jf.FallbackWarning, match="mask"):
        fallback = ours(x, x, x, mask=jnp.ones((5, 5), bool), key=jax.random.key(1))
    np.testing.assert_allclose(fallback, first, rtol=1e-5, atol=1e-6)
    # vmap over a batch with one key per example, as equinox models do.
    keys = jax.random.split(jax.random.key(3), 2)
    batched = jax.vmap(lambda x, k: ours(x, x, x, key=k))(jnp.stack([x, x]), keys)
    np.testing.assert_allclose(batched[0], ours(x, x, x, key=keys[0]), rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(batched[0] - batched[1]))) > 1e-4
    theirs = eqx.nn.MultiheadAttention(2, 8, dropout_p=0.1, dtype=F32, key=jax.random.key(0))
    np.testing.assert_allclose(ours(x, x, x, inference=True), theirs(x, x, x, inference=True),
                               rtol=1e-5, atol=1e-6)
    in_inference = eqx.nn.inference_mode(ours)
    np.testing.assert_allclose(in_inference(x, x, x), theirs(x, x, x, inference=True),
                               rtol=1e-5, atol=1e-6)


def test_bad_configuration():
    with pytest.raises(ValueError, match="vo_size"):
        MultiheadAttention(2, 8, qk_size=4, vo_size=8, dtype=F32, key=jax.random.key(0))
    with pytest.raises(ValueError, match="num_kv_heads"):
        MultiheadAttention(4, 8, num_kv_heads=3, dtype=F32, key=jax.random.key(0))
    layer = MultiheadAttention(2, 8, dtype=F32, key=jax.random.key(0))
    with pytest.raises(ValueError, match="unbatched"):
        layer(jnp.ones((2, 4, 8)), jnp.ones((2, 4, 8)), jnp.ones((2, 4, 8)))


def test_import_without_equinox_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "equinox", None)
    monkeypatch.delitem(sys.modules, "jax_flash.layers.equinox")
    with pytest.raises(ImportError, match="pip install"):
        importlib.import_module("jax_flash.layers.equinox")
