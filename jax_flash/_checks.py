"""Trace-time validation: every rule the kernels rely on, with errors that name the
argument and the rule. Runs on shapes and dtypes only, so it costs nothing under jit."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jax_flash import dropout

MAX_HEAD_DIM = 256
MAX_DIAGONAL_OFFSET = 1 << 29  # the CUDA kernels' index arithmetic is 32-bit
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


def array_shape(x, name):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    return tuple(x.shape)


def check_qkv(q, k, v):
    """Returns (batch, seqlen_q, num_heads, head_dim, seqlen_k, num_heads_kv)."""
    shapes = {name: array_shape(x, name) for name, x in (("q", q), ("k", k), ("v", v))}
    for name, shape in shapes.items():
        if len(shape) != 4:
            raise ValueError(
                f"{name} must have rank 4 (batch, seqlen, num_heads, head_dim), got shape {shape}"
            )
    batch, seqlen_q, num_heads, head_dim = shapes["q"]
    if shapes["k"] != shapes["v"]:
        raise ValueError(f"k and v must have the same shape, got {shapes['k']} and {shapes['v']}")
    batch_k, seqlen_k, num_heads_kv, head_dim_k = shapes["k"]
    if batch_k != batch:
        raise ValueError(f"k must have the batch size of q ({batch}), got {batch_k}")
    if head_dim_k != head_dim:
        raise ValueError(f"k and v must have the head_dim of q ({head_dim}), got {head_dim_k}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be between 1 and {MAX_HEAD_DIM}, got {head_dim}")
    if num_heads_kv < 1 or num_heads % num_heads_kv != 0:
        raise ValueError(
            f"the number of query heads ({num_heads}) must be a multiple of the number of "
            f"key/value heads ({num_heads_kv})"
        )
    dtypes = [jnp.dtype(x.dtype) for x in (q, k, v)]
    if dtypes[0] not in SUPPORTED_DTYPES:
        raise TypeError(f"q must be float32, float16 or bfloat16, got {dtypes[0]}")
    if dtypes[1] != dtypes[0] or dtypes[2] != dtypes[0]:
        raise TypeError(f"q, k and v must share one dtype, got {dtypes[0]}, {dtypes[1]}, {dtypes[2]}")
    return batch, seqlen_q, num_heads, head_dim, seqlen_k, num_heads_kv


def _static_number(value, name):
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name} must be a static Python number, not a traced value")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_softmax_scale(softmax_scale, head_dim):
    if softmax_scale is None:
        return 1.0 / float(np.sqrt(head_dim))
    scale = _static_number(softmax_scale, "softmax_scale")
    if not np.isfinite(scale):
        raise ValueError(f"softmax_scale must be finite, got {scale}")
    return scale


def check_softcap(softcap):
    value = _static_number(softcap, "softcap")
    if not (value >= 0.0 and np.isfinite(value)):
        raise ValueError(f"softcap must be a finite number >= 0 (0 disables it), got {softcap}")
    return value


def check_window(window_size, causal):
    """Returns (window_left, window_right) with causal folded in as window_right = 0."""
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise ValueError(f"window_size must be a pair (left, right), got {window_size!r}")
    for side in window_size:
        if isinstance(side, (bool, np.bool_)) or not isinstance(side, numbers.Integral):
            raise TypeError(f"window_size must hold two ints, got {window_size!r}")
        if side < -1:
            raise ValueError(f"window_size entries must be >= -1 (-1 = unbounded), got {window_size!r}")
    left, right = (int(side) for side in window_size)
    if causal:
        right = 0
    return left, right


def drop_idle_window_sides(window_left, window_right, reach):
    """The window with each side that can never mask a key made unbounded (-1).

    reach: a bound no query-key distance from the diagonal reaches (callers pass one that
    holds for every row). A side >= reach hides nothing, so -1 is exactly equivalent, and
    the kernels' 64-bit index arithmetic (diagonal + side) stays far from overflowing, as
    does the int64 attribute the side is passed in."""
    return tuple(-1 if side >= reach else side for side in (window_left, window_right))


def check_diagonal_offset(diagonal_offset, seqlen_q, seqlen_k):
    """The key aligned with query 0; None means bottom-right (seqlen_k - seqlen_q)."""
    if diagonal_offset is None:
        return seqlen_k - seqlen_q
    if isinstance(diagonal_offset, (bool, np.bool_)) or not isinstance(diagonal_offset, numbers.Integral):
        raise TypeError(f"diagonal_offset must be a static int, got {type(diagonal_offset).__name__}")
    offset = int(diagonal_offset)
    if abs(offset) > MAX_DIAGONAL_OFFSET:
        raise ValueError(f"diagonal_offset must be within +-2**29, got {offset}")
    return offset


def check_dropout(dropout_p, dropout_key):
    """Returns dropout_p as a float; dropout_key is checked where it is used."""
    p = _static_number(dropout_p, "dropout_p")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout.keep_threshold(p) < 1:
        raise ValueError(
            f"dropout_p must be below 1 - 2**-17 (the mask is drawn with 16-bit resolution, "
            f"so it would keep nothing), got {dropout_p}")
    if p > 0.0 and dropout_key is None:
        raise ValueError(
            "dropout_p > 0 needs dropout_key, a JAX PRNG key (e.g. jax.random.key(0)): "
            "the same key gives the same mask, in the forward and the backward")
    return p


def check_deterministic(deterministic):
    if not isinstance(deterministic, (bool, np.bool_)):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    return bool(deterministic)


def placeholder_segment_ids(batch, seqlen_q, seqlen_k):
    """What the kernels get when a call has no segment ids (the config says they are off)."""
    return jnp.zeros((batch, seqlen_q), jnp.int32), jnp.zeros((batch, seqlen_k), jnp.int32)


def placeholder_seeds(batch, num_heads):
    """What the kernels get when a call has no dropout (the config says it is off)."""
    return jnp.zeros((batch, num_heads, 2), jnp.uint32)


def placeholder_masks(batch, num_heads, seqlen_q, seqlen_k):
    """Every mask operand of a call with none on: ALiBi slopes, segment ids, dropout seeds."""
    return (jnp.zeros((batch, num_heads), jnp.float32),
            *placeholder_segment_ids(batch, seqlen_q, seqlen_k),
            placeholder_seeds(batch, num_heads))


def check_segment_ids(q_segment_ids, kv_segment_ids, batch, seqlen_q, seqlen_k):
    """Returns (has_segment_ids, q_ids, kv_ids) with int32 (batch, seqlen_q) and
    (batch, seqlen_k) ids, placeholders when both are None."""
    if q_segment_ids is None and kv_segment_ids is None:
        return (False,) + placeholder_segment_ids(batch, seqlen_q, seqlen_k)
    if q_segment_ids is None or kv_segment_ids is None:
        raise ValueError(
            "q_segment_ids and kv_segment_ids must be given together "
            "(for self-attention pass the same array as both)"
        )
    checked = []
    for name, ids, seqlen, side in (("q_segment_ids", q_segment_ids, seqlen_q, "q"),
                                    ("kv_segment_ids", kv_segment_ids, seqlen_k, "k")):
        shape = array_shape(ids, name)
        if shape != (batch, seqlen):
            raise ValueError(
                f"{name} must have shape (batch, seqlen_{side}) = ({batch}, {seqlen}), got {shape}"
            )
        dtype = jnp.dtype(ids.dtype)
        if not (jnp.issubdtype(dtype, jnp.integer) or dtype == jnp.bool_):
            raise TypeError(f"{name} must hold integers (int32), got {dtype}")
        checked.append(ids.astype(jnp.int32))
    return (True,) + tuple(checked)


def check_alibi_slopes(alibi_slopes, batch, num_heads):
    """Returns slopes as (batch, num_heads) float32, or None."""
    if alibi_slopes is None:
        return None
    shape = array_shape(alibi_slopes, "alibi_slopes")
    if jnp.dtype(alibi_slopes.dtype) != jnp.float32:
        raise TypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
    if shape == (num_heads,):
        return jnp.broadcast_to(alibi_slopes[None, :], (batch, num_heads))
    if shape == (batch, num_heads):
        return alibi_slopes
    raise ValueError(
        f"alibi_slopes must have shape (num_heads,) = ({num_heads},) or (batch, num_heads) = "
        f"({batch}, {num_heads}), got {shape}"
    )
