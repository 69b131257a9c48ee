"""Bad input fails at trace time with an error naming the argument and the rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash as jf

B, S, H, D = 2, 8, 4, 16


def arrays(q_shape=(B, S, H, D), kv_shape=(B, S, 2, D), dtype=jnp.float32, v_shape=None):
    q = jax.ShapeDtypeStruct(q_shape, dtype)
    k = jax.ShapeDtypeStruct(kv_shape, dtype)
    v = jax.ShapeDtypeStruct(v_shape or kv_shape, dtype)
    return q, k, v


def trace(q, k, v, **kwargs):
    """Traces without running: the errors must come from tracing alone."""
    return jax.eval_shape(lambda q, k, v: jf.flash_attn_func(q, k, v, **kwargs), q, k, v)


@pytest.mark.parametrize("shapes,match", [
    (dict(q_shape=(S, H, D)), r"q must have rank 4"),
    (dict(kv_shape=(B, S, 2, D, 1)), r"k must have rank 4"),
    (dict(v_shape=(B, S + 1, 2, D)), r"k and v must have the same shape"),
    (dict(kv_shape=(B + 1, S, 2, D)), r"batch size of q"),
    (dict(kv_shape=(B, S, 2, D + 8)), r"head_dim of q"),
    (dict(kv_shape=(B, S, 3, D)), r"multiple of the number of key/value heads"),
    (dict(q_shape=(B, S, H, 264), kv_shape=(B, S, 2, 264)), r"head_dim must be between 1 and 256"),
])
def test_shape_errors(shapes, match):
    with pytest.raises(ValueError, match=match):
        trace(*arrays(**shapes))


def test_dtype_errors():
    with pytest.raises(TypeError, match="q must be float32, float16 or bfloat16"):
        trace(*arrays(dtype=jnp.int32))
    q, k, v = arrays()
    with pytest.raises(TypeError, match="share one dtype"):
        trace(q, jax.ShapeDtypeStruct(k.shape, jnp.bfloat16), v)
    with pytest.raises(TypeError, match="q must be an array"):
        jf.flash_attn_func([[1.0]], np.zeros((1, 1, 1, 1)), np.zeros((1, 1, 1, 1)))


@pytest.mark.parametrize("window_size,error,match", [
    ((-2, 0), ValueError, r"window_size entries must be >= -1"),
    ((1, 2, 3), ValueError, r"window_size must be a pair"),
    (5, ValueError, r"window_size must be a pair"),
    ((1.5, 2), TypeError, r"window_size must hold two ints"),
    ((True, 2), TypeError, r"window_size must hold two ints"),
])
def test_window_errors(window_size, error, match):
    with pytest.raises(error, match=match):
        trace(*arrays(), window_size=window_size)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
    (dict(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\)"),
    (dict(softcap=-1.0), ValueError, r"softcap must be a finite number >= 0"),
    (dict(softcap="big"), TypeError, r"softcap must be a real number"),
    (dict(softmax_scale=float("nan")), ValueError, r"softmax_scale must be finite"),
    (dict(causal=1), TypeError, r"causal must be a bool"),
    (dict(alibi_slopes=jnp.ones((H,), jnp.float16)), TypeError, r"alibi_slopes must be float32"),
    (dict(alibi_slopes=jnp.ones((H + 1,), jnp.float32)), ValueError, r"alibi_slopes must have shape"),
    (dict(alibi_slopes=jnp.ones((B, H, 1), jnp.float32)), ValueError, r"alibi_slopes must have shape"),
])
def test_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        trace(*arrays(), **kwargs)


def test_traced_scale_is_rejected():
    q, k, v = arrays()
    with pytest.raises(TypeError, match="softmax_scale must be a static Python number"):
        jax.eval_shape(lambda q, k, v, s: jf.flash_attn_func(q, k, v, softmax_scale=s),
                       q, k, v, jax.ShapeDtypeStruct((), jnp.float32))


def test_packed_shape_errors():
    with pytest.raises(ValueError, match=r"qkv must have shape \(batch, seqlen, 3"):
        jax.eval_shape(jf.flash_attn_qkvpacked_func, jax.ShapeDtypeStruct((B, S, 2, H, D), jnp.float32))
    with pytest.raises(ValueError, match=r"kv must have shape \(batch, seqlen, 2"):
        jax.eval_shape(jf.flash_attn_kvpacked_func, jax.ShapeDtypeStruct((B, S, H, D), jnp.float32),
                       jax.ShapeDtypeStruct((B, S, 3, H, D), jnp.float32))


def test_deterministic_must_be_a_bool():
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        trace(*arrays(), deterministic=1)
