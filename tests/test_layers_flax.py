"""jax_flash.layers.flax.MultiHeadAttention against flax.nnx.MultiHeadAttention."""

from __future__ import annotations

import importlib
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")

import jax_flash as jf  # noqa: E402
from jax_flash.layers.flax import MultiHeadAttention  # noqa: E402
from helpers import assert_within_twice_plain  # noqa: E402


def _inputs(seed, *shape, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _copy_params(source, target, dtype=None):
    """Loads source's parameters into target (optionally cast), like a checkpoint would."""
    params = nnx.state(source, nnx.Param)
    if dtype is not None:
        params = jax.tree.map(lambda x: x.astype(dtype), params)
    nnx.update(target, params)


def _layers(ours_kwargs=None, **kwargs):
    """Ours, nnx's with the same weights, and nnx's in float64 (the exact reference)."""
    theirs = nnx.MultiHeadAttention(**kwargs, decode=False, rngs=nnx.Rngs(0))
    ours = MultiHeadAttention(**kwargs, **(ours_kwargs or {}), decode=False, rngs=nnx.Rngs(1))
    exact = nnx.MultiHeadAttention(**kwargs, decode=False, param_dtype=jnp.float64, rngs=nnx.Rngs(2))
    _copy_params(theirs, ours)
    _copy_params(theirs, exact, jnp.float64)
    return ours, theirs, exact


def _assert_forward_and_grads_match(ours, theirs, exact, args, call_kwargs=None, their_kwargs=None):
    call_kwargs = call_kwargs or {}
    their_kwargs = call_kwargs if their_kwargs is None else their_kwargs
    out_shape = jax.eval_shape(lambda *a: theirs(*a, **their_kwargs), *args).shape
    cotangent = _inputs(99, *out_shape, dtype=jnp.float64)

    def loss(layer, kwargs):
        graphdef, rest = nnx.graphdef(layer), nnx.state(layer, nnx.Not(nnx.Param))

        def fn(params, *args):
            out = nnx.merge(graphdef, params, rest)(*args, **kwargs)
            return jnp.sum(out.astype(jnp.float64) * cotangent), out

        # Jitted: op-by-op dispatch of a layer and its gradient is what would cost time.
        return jax.jit(jax.grad(fn, argnums=(0, 1), has_aux=True))

    results = {}
    for name, layer, kwargs, dtype in (("ours", ours, call_kwargs, None),
                                       ("theirs", theirs, their_kwargs, None),
                                       ("exact", exact, their_kwargs, jnp.float64)):
        layer_args = [a if dtype is None else a.astype(dtype) for a in args]
        with warnings.catch_warnings():
            if layer is ours:
                warnings.simplefilter("error", jf.FallbackWarning)  # ours runs the kernels
            grads, out = loss(layer, kwargs)(nnx.state(layer, nnx.Param), *layer_args)
        results[name] = (out, grads)
    out, plain, exact_out = (results[n][0] for n in ("ours", "theirs", "exact"))
    assert out.shape == plain.shape and out.dtype == plain.dtype
    assert float(jnp.max(jnp.abs(out))) > 0
    assert_within_twice_plain("out", out, plain, exact_out, jnp.float32)
    grads = [jax.tree.leaves(results[n][1]) for n in ("ours", "theirs", "exact")]
    assert len(grads[0]) == len(grads[1]) > 4
    for index, (g, gp, ge) in enumerate(zip(*grads)):
        assert g.shape == gp.shape
        assert_within_twice_plain(f"grad {index}", g, gp, ge, jnp.float32)


def test_param_structure_and_initial_weights_match_nnx():
    kwargs = dict(num_heads=4, in_features=16, qkv_features=32, out_features=8)
    theirs = nnx.MultiHeadAttention(**kwargs, rngs=nnx.Rngs(0))
    ours = MultiHeadAttention(**kwargs, rngs=nnx.Rngs(0))
    their_params, our_params = nnx.state(theirs, nnx.Param), nnx.state(ours, nnx.Param)
    assert jax.tree.structure(their_params) == jax.tree.structure(our_params)
    for a, b in zip(jax.tree.leaves(their_params), jax.tree.leaves(our_params)):
        np.testing.assert_array_equal(a, b)


def test_self_attention():
    ours, theirs, exact = _layers(num_heads=4, in_features=16, qkv_features=32)
    _assert_forward_and_grads_match(ours, theirs, exact, [_inputs(0, 2, 12, 16)])


def test_causal_gqa_with_qk_norm():
    ours, theirs, exact = _layers(num_heads=4, num_kv_heads=2, in_features=16, normalize_qk=True)
    _assert_forward_and_grads_match(ours, theirs, exact, [_inputs(1, 2, 10, 16)],
                                    call_kwargs=dict(is_causal=True))


def test_causal_constructor_flag_equals_nnx_is_causal():
    ours, theirs, exact = _layers(num_heads=2, in_features=8, ours_kwargs=dict(causal=True))
    _assert_forward_and_grads_match(ours, theirs, exact, [_inputs(2, 3, 9, 8)],
                                    their_kwargs=dict(is_causal=True))


def test_cross_attention_with_other_lengths_and_extra_batch_dims():
    ours, theirs, exact = _layers(num_heads=2, in_features=8, in_kv_features=6, out_features=5)
    args = [_inputs(3, 2, 3, 7, 8), _inputs(4, 2, 3, 11, 6)]
    _assert_forward_and_grads_match(ours, theirs, exact, args)


def test_window_equals_nnx_with_the_band_mask():
    ours, theirs, exact = _layers(num_heads=2, in_features=8,
                                  ours_kwargs=dict(causal=True, window_size=(3, -1)))
    position = np.arange(10)
    band = (position[None, :] <= position[:, None]) & (position[None, :] >= position[:, None] - 3)
    _assert_forward_and_grads_match(ours, theirs, exact, [_inputs(5, 2, 10, 8)],
                                    their_kwargs=dict(mask=jnp.asarray(band)[None, None]))


def test_softcap_equals_the_reference():
    layer = MultiHeadAttention(num_heads=2, in_features=8, softcap=0.5, rngs=nnx.Rngs(0))
    x = _inputs(6, 2, 7, 8)
    q, k, v = layer.query(x), layer.key(x), layer.value(x)
    expected = layer.out(jf.reference_attention(q, k, v, softcap=0.5))
    uncapped = MultiHeadAttention(num_heads=2, in_features=8, rngs=nnx.Rngs(0))
    assert not np.allclose(layer(x), uncapped(x), atol=1e-3)
    np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-5)


def _packed_ids(seed, *shape, segments=3):
    """Sorted segment ids (documents packed back to back) of random lengths per row."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(np.sort(rng.integers(0, segments, size=shape), axis=-1), jnp.int32)


def test_segment_ids_equal_nnx_with_the_segment_mask():
    ours, theirs, exact = _layers(num_heads=4, num_kv_heads=2, in_features=16)
    x = _inputs(12, 2, 3, 13, 16)  # two batch dimensions
    ids = _packed_ids(13, 2, 3, 13)
    mask = nnx.make_attention_mask(ids, ids, jnp.equal)
    _assert_forward_and_grads_match(ours, theirs, exact, [x],
                                    call_kwargs=dict(q_segment_ids=ids, is_causal=True),
                                    their_kwargs=dict(mask=mask, is_causal=True))


def test_cross_attention_segment_ids_with_queries_that_see_no_key():
    # Query ids 0-3 against key ids 0-2: rows of id 3 see no key and, as under nnx's mask,
    # average all values.
    ours, theirs, exact = _layers(num_heads=2, in_features=8, in_kv_features=6)
    q_ids, kv_ids = _packed_ids(14, 3, 9, segments=4), _packed_ids(15, 3, 17)
    q_ids = q_ids.at[:, -1].set(3)
    args = [_inputs(16, 3, 9, 8), _inputs(17, 3, 17, 6)]
    mask = nnx.make_attention_mask(q_ids, kv_ids, jnp.equal)
    _assert_forward_and_grads_match(ours, theirs, exact, args,
                                    call_kwargs=dict(q_segment_ids=q_ids, kv_segment_ids=kv_ids),
                                    their_kwargs=dict(mask=mask))


def test_segment_ids_with_a_mask_fall_back_and_combine():
    jf.nn._warned_reasons.clear()
    ours, theirs, exact = _layers(num_heads=2, in_features=8)
    x, ids = _inputs(18, 2, 8, 8), _packed_ids(19, 2, 8)
    mask = jnp.asarray(np.random.default_rng(20).uniform(size=(2, 1, 8, 8)) > 0.3)
    with pytest.warns(jf.FallbackWarning, match="mask"):
        out = ours(x, mask=mask, q_segment_ids=ids)
    combined = mask & nnx.make_attention_mask(ids, ids, jnp.equal).astype(bool)
    np.testing.assert_allclose(out, theirs(x, mask=combined), rtol=1e-5, atol=1e-6)


def test_segment_id_errors():
    layer = MultiHeadAttention(num_heads=2, in_features=8, rngs=nnx.Rngs(0))
    x = _inputs(21, 2, 5, 8)
    with pytest.raises(ValueError, match=r"q_segment_ids must have shape \(batch..., length\)"):
        layer(x, q_segment_ids=jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="kv_segment_ids"):
        layer(x, _inputs(22, 2, 7, 8), q_segment_ids=jnp.zeros((2, 5), jnp.int32))
    with pytest.raises(TypeError, match="q_segment_ids must hold integers"):
        layer(x, q_segment_ids=jnp.zeros((2, 5), jnp.float32))
    layer.init_cache(x.shape)
    with pytest.raises(NotImplementedError, match="segment ids in decode mode"):
        layer(x, decode=True, q_segment_ids=jnp.zeros((2, 5), jnp.int32))


def test_mask_falls_back_with_a_warning_and_matches_nnx():
    jf.nn._warned_reasons.clear()
    ours, theirs, exact = _layers(num_heads=2, in_features=8)
    x = _inputs(7, 2, 6, 8)
    mask = jnp.asarray(np.random.default_rng(8).uniform(size=(2, 1, 6, 6)) > 0.4)
    with pytest.warns(jf.FallbackWarning, match="mask"):
        out = ours(x, mask=mask)
    np.testing.assert_allclose(out, theirs(x, mask=mask), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("broadcast", [True, False])
def test_dropout_draws_the_kernels_mask_on_every_path(broadcast):
    layer = MultiHeadAttention(num_heads=2, in_features=8, dropout_rate=0.3,
                               broadcast_dropout=broadcast, keep_rngs=False, rngs=nnx.Rngs(0))
    x = jnp.broadcast_to(_inputs(9, 1, 5, 8), (2, 5, 8))  # two identical batch rows
    with pytest.raises(ValueError, match="rngs"):
        layer(x, deterministic=False)
    first = layer(x, deterministic=False, rngs=nnx.Rngs(dropout=1))
    np.testing.assert_array_equal(np.asarray(first),
                                  np.asarray(layer(x, deterministic=False, rngs=nnx.Rngs(dropout=1))))
    assert float(jnp.max(jnp.abs(first - layer(x, deterministic=True)))) > 1e-4
    # broadcast_dropout shares one mask across the batch; otherwise each row draws its own.
    rows_differ = float(jnp.max(jnp.abs(first[0] - first[1])))
    assert (rows_differ == 0.0) if broadcast else (rows_differ > 1e-4)
    # A mask that hides nothing takes the XLA fallback, which must draw the same mask.
    jf.nn._warned_reasons.clear()
    with pytest.warns(jf.FallbackWarning, match="mask"):
        fallback = layer(x, mask=jnp.ones((2, 1, 5, 5), bool), deterministic=False,
                         rngs=nnx.Rngs(dropout=1))
    np.testing.assert_allclose(fallback, first, rtol=1e-5, atol=1e-6)
    with pytest.raises(NotImplementedError, match="decode"):
        layer.init_cache((2, 5, 8))
        layer(x, decode=True, deterministic=False, rngs=nnx.Rngs(dropout=1))


def test_dropout_needs_deterministic_and_matches_nnx_without_it():
    layer = MultiHeadAttention(num_heads=2, in_features=8, dropout_rate=0.1, rngs=nnx.Rngs(0))
    theirs = nnx.MultiHeadAttention(num_heads=2, in_features=8, dropout_rate=0.1, decode=False,
                                    rngs=nnx.Rngs(0))
    x = _inputs(9, 1, 5, 8)
    with pytest.raises(ValueError, match="deterministic"):
        layer(x)
    np.testing.assert_allclose(layer(x, deterministic=True), theirs(x, deterministic=True),
                               rtol=1e-5, atol=1e-6)


def test_bad_configuration():
    with pytest.raises(ValueError, match="num_kv_heads"):
        MultiHeadAttention(num_heads=4, num_kv_heads=3, in_features=8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        MultiHeadAttention(num_heads=3, in_features=8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="window_size"):
        MultiHeadAttention(num_heads=2, in_features=8, window_size=(3,), rngs=nnx.Rngs(0))
    layer = MultiHeadAttention(num_heads=2, in_features=8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="in_features"):
        layer(jnp.ones((1, 4, 6)))
    with pytest.raises(NotImplementedError, match="sow_weights"):
        layer(jnp.ones((1, 4, 8)), sow_weights=True)
    with pytest.raises(ValueError, match="init_cache"):
        layer(jnp.ones((1, 1, 8)), decode=True)


def _decode_in_chunks(layer, tokens, prefill, chunk, **call_kwargs):
    """The layer's decode calls over tokens: a prefill, then chunks of `chunk` tokens."""
    layer.init_cache(tokens.shape)

    @nnx.jit
    def step(layer, piece):
        return layer(piece, decode=True, **call_kwargs)

    starts = [0, *range(prefill, tokens.shape[1], chunk)]
    ends = [*starts[1:], tokens.shape[1]]
    decoded = jnp.concatenate([step(layer, tokens[:, a:b]) for a, b in zip(starts, ends)], axis=1)
    assert int(layer.cache_index[...]) == tokens.shape[1]
    return decoded


@pytest.mark.parametrize("prefill,chunk", [(5, 1), (1, 1), (4, 3)])
@pytest.mark.parametrize("extra", [dict(), dict(num_kv_heads=1, window_size=(2, -1), softcap=3.0)])
def test_decode_equals_the_full_causal_forward(prefill, chunk, extra, monkeypatch):
    layer = MultiHeadAttention(num_heads=2, in_features=8, causal=True, rngs=nnx.Rngs(0), **extra)
    tokens = _inputs(10, 2, 11, 8)
    full = layer(tokens)
    # The steps after the prefill run the KV-cache kernel, not the jnp fallback.
    import jax_flash.layers.flax as flax_layer

    calls = []
    monkeypatch.setattr(flax_layer, "flash_attn_with_kvcache",
                        lambda *a, **k: calls.append(k) or jf.flash_attn_with_kvcache(*a, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("error", jf.FallbackWarning)
        decoded = _decode_in_chunks(layer, tokens, prefill, chunk)
    assert calls and all(call["causal"] for call in calls)
    np.testing.assert_allclose(decoded, full, rtol=1e-5, atol=1e-5)


def test_decode_with_a_mask_falls_back_and_matches_the_masked_forward():
    layer = MultiHeadAttention(num_heads=2, in_features=8, causal=True, rngs=nnx.Rngs(0))
    tokens = _inputs(11, 2, 9, 8)
    # A mask over cache slots that hides slot 2 from every query (with causal on top).
    mask = jnp.arange(9) != 2
    full = layer(tokens, mask=mask[None, None, None, :])
    jf.nn._warned_reasons.clear()
    with pytest.warns(jf.FallbackWarning, match="mask"):
        decoded = _decode_in_chunks(layer, tokens, 4, 1, mask=mask[None, None, None, :])
    np.testing.assert_allclose(decoded, full, rtol=1e-5, atol=1e-5)


def test_import_without_flax_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "flax", None)
    monkeypatch.delitem(sys.modules, "jax_flash.layers.flax")
    with pytest.raises(ImportError, match="pip install"):
        importlib.import_module("jax_flash.layers.flax")
