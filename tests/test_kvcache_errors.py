"""flash_attn_with_kvcache: bad input fails at trace time with an error naming the argument
and the rule (the run-time values, lengths and page ids, are test_kvcache.py's concern)."""

import jax
import jax.numpy as jnp
import pytest

import jax_flash as jf

B, SQ, H, HK, D, S = 2, 3, 4, 2, 16, 32          # contiguous cache (B, S, HK, D)
NB, PS, MB = 6, 16, 3                            # paged: (NB, PS, HK, D), block_table (B, MB)


def spec(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def base(paged=False, new=True, **changes):
    """Arguments of a valid call (as shapes), with some replaced."""
    cache = (NB, PS, HK, D) if paged else (B, S, HK, D)
    args = dict(q=spec((B, SQ, H, D)), k_cache=spec(cache), v_cache=spec(cache),
                cache_seqlens=spec((B,), jnp.int32))
    if new:
        args.update(k=spec((B, SQ, HK, D)), v=spec((B, SQ, HK, D)))
    if paged:
        args["block_table"] = spec((B, MB), jnp.int32)
    args.update(changes)
    return args


def trace(args, **static):
    """Traces without running: every error here must come from tracing alone."""
    arrays = {k: v for k, v in args.items() if isinstance(v, jax.ShapeDtypeStruct)}
    others = {k: v for k, v in args.items() if k not in arrays}
    return jax.eval_shape(
        lambda arrays: jf.flash_attn_with_kvcache(**arrays, **others, **static), arrays)


def test_valid_calls_trace():
    out, k_cache, v_cache = trace(base())
    assert out.shape == (B, SQ, H, D) and k_cache.shape == (B, S, HK, D)
    out, lse, k_cache, _ = trace(base(paged=True), return_lse=True)
    assert lse.shape == (B, H, SQ) and k_cache.shape == (NB, PS, HK, D)
    assert trace(base(new=False)).shape == (B, SQ, H, D)


@pytest.mark.parametrize("changes,match", [
    (dict(q=spec((SQ, H, D))), r"q must have rank 4"),
    (dict(k_cache=spec((B, S, HK * D))), r"k_cache must have rank 4 \(batch_cache, seqlen_cache"),
    (dict(v_cache=spec((B, S + 1, HK, D))), r"k_cache and v_cache must have the same shape"),
    (dict(k_cache=spec((B, S, HK, D + 1)), v_cache=spec((B, S, HK, D + 1))),
     r"must have the head_dim of q"),
    (dict(q=spec((B, SQ, H, 264)), k_cache=spec((B, S, HK, 264)), v_cache=spec((B, S, HK, 264)),
          k=spec((B, SQ, HK, 264)), v=spec((B, SQ, HK, 264))), r"head_dim must be between 1 and 256"),
    (dict(k_cache=spec((B, S, 3, D)), v_cache=spec((B, S, 3, D))),
     r"query heads \(4\) must be a multiple of the number of key/value heads in the cache \(3\)"),
    (dict(k_cache=spec((B - 1, S, HK, D)), v_cache=spec((B - 1, S, HK, D))),
     r"k_cache has 1 rows but q has batch 2"),
])
def test_cache_shape_errors(changes, match):
    with pytest.raises(ValueError, match=match):
        trace(base(**changes))


@pytest.mark.parametrize("changes,match", [
    (dict(block_table=spec((B + 1, MB), jnp.int32)), r"block_table must have shape \(batch, max_blocks_per_seq\)"),
    (dict(block_table=spec((B,), jnp.int32)), r"block_table must have shape"),
    (dict(block_table=spec((B, 0), jnp.int32)), r"block_table must have shape"),
    (dict(k_cache=spec((NB, 24, HK, D)), v_cache=spec((NB, 24, HK, D))),
     r"page size \(k_cache.shape\[1\] of a paged cache\) must be a positive multiple of 16, got 24"),
    (dict(k_cache=spec((NB, 8, HK, D)), v_cache=spec((NB, 8, HK, D))), r"multiple of 16, got 8"),
    (dict(cache_batch_idx=spec((B,), jnp.int32)), r"cache_batch_idx cannot be combined with block_table"),
])
def test_paged_errors(changes, match):
    with pytest.raises(ValueError, match=match):
        trace(base(paged=True, **changes))


@pytest.mark.parametrize("paged,changes,match", [
    (True, dict(block_table=spec((B, 2**25 + 1), jnp.int32)),
     r"at most 2\*\*29 keys \(the CUDA kernels' limit\), this one holds "
     r"block_table.shape\[1\] \* page_size = 33554433 \* 16 = 536870928"),
    (False, dict(k_cache=spec((B, 2**29 + 1, HK, D)), v_cache=spec((B, 2**29 + 1, HK, D))),
     r"at most 2\*\*29 keys .* seqlen_cache = k_cache.shape\[1\] = 536870913"),
])
def test_capacity_limit(paged, changes, match):
    """The CUDA dispatcher rejects rows of more than 2**29 keys at run time; the trace-time
    check says so first, on every platform."""
    with pytest.raises(ValueError, match=match):
        trace(base(paged=paged, new=False, **changes))


def test_capacity_at_the_limit_traces():
    assert trace(base(paged=True, new=False, block_table=spec((B, 2**25), jnp.int32))).shape == (B, SQ, H, D)
    cache = spec((B, 2**29, HK, D))
    assert trace(base(new=False, k_cache=cache, v_cache=cache)).shape == (B, SQ, H, D)


def test_empty_cache_rows():
    cache = spec((B, 0, HK, D))
    with pytest.raises(ValueError, match=r"seqlen_cache = k_cache.shape\[1\] is 0\): a cache row "
                                         r"must hold at least one key"):
        trace(base(k_cache=cache, v_cache=cache))


@pytest.mark.parametrize("q_shape,match", [
    ((65536, SQ, H, D), r"q's batch \(q.shape\[0\]\) must be at most 65535 \(the CUDA kernels' "
                        r"grid limit\), got 65536"),
    ((B, SQ, 65536, D), r"q's num_heads \(q.shape\[2\]\) must be at most 65535"),
])
def test_batch_and_heads_limit(q_shape, match):
    batch = q_shape[0]
    cache = spec((batch, S, HK, D))
    with pytest.raises(ValueError, match=match):
        trace(base(new=False, q=spec(q_shape), k_cache=cache, v_cache=cache,
                   cache_seqlens=spec((batch,), jnp.int32)))


def test_paged_cache_rank_error_names_the_paged_layout():
    with pytest.raises(ValueError, match=r"k_cache must have rank 4 \(num_blocks, page_size"):
        trace(base(paged=True, k_cache=spec((NB, PS, HK * D)), v_cache=spec((NB, PS, HK * D))))


@pytest.mark.parametrize("changes,error,match", [
    (dict(block_table=spec((B, MB), jnp.float32)), TypeError, r"block_table must hold integers"),
])
def test_paged_type_errors(changes, error, match):
    with pytest.raises(error, match=match):
        trace(base(paged=True, **changes))


@pytest.mark.parametrize("changes,error,match", [
    (dict(k=None), ValueError, r"k and v \(the new keys and values to append\) must be given together"),
    (dict(v=None), ValueError, r"must be given together"),
    (dict(k=spec((B, SQ, HK + 1, D)), v=spec((B, SQ, HK + 1, D))), ValueError,
     r"k must have shape \(batch, seqlen_new, num_heads_kv, head_dim\) = \(2, seqlen_new, 2, 16\)"),
    (dict(k=spec((B + 1, SQ, HK, D))), ValueError, r"k must have shape"),
    (dict(v=spec((B, SQ, HK, D + 1))), ValueError, r"v must have shape"),
    (dict(v=spec((B, SQ + 1, HK, D))), ValueError, r"k and v must have the same shape"),
    (dict(k=spec((B, SQ, HK, D), jnp.bfloat16)), TypeError, r"k must have the dtype of q \(float32\)"),
    (dict(cache_seqlens=None), ValueError, r"pass cache_seqlens \(None means every cache row is full"),
])
def test_new_kv_errors(changes, error, match):
    with pytest.raises(error, match=match):
        trace(base(**changes))


@pytest.mark.parametrize("changes,error,match", [
    (dict(q=spec((B, SQ, H, D), jnp.int32)), TypeError, r"q must be float32, float16 or bfloat16"),
    (dict(k_cache=spec((B, S, HK, D), jnp.bfloat16)), TypeError, r"k_cache must have the dtype of q"),
    (dict(v_cache=spec((B, S, HK, D), jnp.float16)), TypeError, r"v_cache must have the dtype of q"),
])
def test_dtype_errors(changes, error, match):
    with pytest.raises(error, match=match):
        trace(base(new=False, **changes))


@pytest.mark.parametrize("changes,error,match", [
    (dict(cache_seqlens=spec((B + 1,), jnp.int32)), ValueError,
     r"cache_seqlens must be an int or have shape \(batch,\) = \(2,\)"),
    (dict(cache_seqlens=spec((B, 1), jnp.int32)), ValueError, r"cache_seqlens must be an int or have shape"),
    (dict(cache_seqlens=spec((B,), jnp.float32)), TypeError, r"cache_seqlens must hold integers"),
    (dict(cache_seqlens=spec((B,), jnp.bool_)), TypeError, r"cache_seqlens must hold integers"),
    (dict(cache_seqlens=True), TypeError, r"cache_seqlens must be an array"),
    (dict(cache_seqlens=2.0), TypeError, r"cache_seqlens must be an array"),
    (dict(cache_batch_idx=spec((B + 1,), jnp.int32)), ValueError,
     r"cache_batch_idx must have shape \(batch,\) = \(2,\)"),
    (dict(cache_batch_idx=spec((B,), jnp.float32)), TypeError, r"cache_batch_idx must hold integers"),
])
def test_index_errors(changes, error, match):
    with pytest.raises(error, match=match):
        trace(base(**changes))


COS = spec((S + 4, 4))


@pytest.mark.parametrize("changes,error,match", [
    (dict(rotary_cos=COS), ValueError, r"rotary_cos and rotary_sin must be given together"),
    (dict(rotary_sin=COS), ValueError, r"must be given together"),
    (dict(rotary_cos=spec((S, 4, 1)), rotary_sin=spec((S, 4, 1))), ValueError,
     r"rotary_cos must have rank 2 \(seqlen_ro, rotary_dim / 2\)"),
    (dict(rotary_cos=COS, rotary_sin=spec((S, 4))), ValueError, r"rotary_sin must have the shape of rotary_cos"),
    (dict(rotary_cos=spec((S, 9)), rotary_sin=spec((S, 9))), ValueError,
     r"rotary_dim = 2 \* rotary_cos.shape\[1\] = 18 must be between 2 and head_dim \(16\)"),
    (dict(rotary_cos=spec((S, 0)), rotary_sin=spec((S, 0))), ValueError, r"must be between 2 and head_dim"),
    (dict(rotary_cos=spec((0, 4)), rotary_sin=spec((0, 4))), ValueError, r"at least one position"),
    (dict(rotary_cos=spec((S, 4), jnp.int32), rotary_sin=spec((S, 4), jnp.int32)), TypeError,
     r"rotary_cos must be a floating-point array"),
    (dict(rotary_cos=COS, rotary_sin=COS, rotary_interleaved=1), TypeError,
     r"rotary_interleaved must be a bool"),
])
def test_rotary_errors(changes, error, match):
    with pytest.raises(error, match=match):
        trace(base(**changes))


def test_rotary_needs_new_keys():
    with pytest.raises(ValueError, match=r"they need k and v \(as in FlashAttention\)"):
        trace(base(new=False, rotary_cos=COS, rotary_sin=COS))


@pytest.mark.parametrize("static,error,match", [
    (dict(window_size=(-2, 0)), ValueError, r"window_size entries must be >= -1"),
    (dict(window_size=(1, 2, 3)), ValueError, r"window_size must be a pair"),
    (dict(window_size=(1.5, 2)), TypeError, r"window_size must hold two ints"),
    (dict(causal=1), TypeError, r"causal must be a bool"),
    (dict(softcap=-1.0), ValueError, r"softcap must be a finite number >= 0"),
    (dict(softmax_scale=float("inf")), ValueError, r"softmax_scale must be finite"),
    (dict(num_splits=-1), ValueError, r"num_splits must be in \[0, 128\]"),
    (dict(num_splits=129), ValueError, r"num_splits must be in \[0, 128\]"),
    (dict(num_splits=1.0), TypeError, r"num_splits must be an int"),
    (dict(num_splits=True), TypeError, r"num_splits must be an int"),
    (dict(alibi_slopes=jnp.ones((H + 1,), jnp.float32)), ValueError, r"alibi_slopes must have shape"),
    (dict(alibi_slopes=jnp.ones((H,), jnp.float16)), TypeError, r"alibi_slopes must be float32"),
])
def test_scalar_and_mask_errors(static, error, match):
    with pytest.raises(error, match=match):
        trace(base(), **static)


def test_kernel_rejects_a_bad_direct_call():
    """The handler checks shapes too, for calls that bypass the Python checks."""
    from jax_flash import _ffi
    from jax_flash.kvcache import KvCacheConfig

    config = KvCacheConfig(1.0, 0.0, -1, -1, False, False, True, 0)
    q = jnp.ones((B, 1, H, D), jnp.float32)
    cache = jnp.ones((NB, 24, HK, D), jnp.float32)  # page size 24: not a multiple of 16
    zeros = jnp.zeros((B,), jnp.int32)
    with pytest.raises(Exception, match="multiple of 16"):
        jax.block_until_ready(_ffi.kvcache_forward(
            config, q, cache, cache, jnp.zeros((0,), jnp.float32), zeros, zeros,
            jnp.zeros((B, MB), jnp.int32)))
