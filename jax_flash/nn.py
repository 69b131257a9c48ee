"""``jax.nn.dot_product_attention``'s signature and semantics, routed to jax_flash kernels.

The kernels take causal and sliding-window masks as static attributes; what they cannot
express (a dense ``bias`` or ``mask``, per-batch sequence lengths, dtypes or shapes the
kernels reject) is computed by ``jax.nn.dot_product_attention`` itself, with a warning the
first time each reason occurs, so that a swapped-in call never changes the result.
"""

from __future__ import annotations

import numbers
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_flash import _checks, _ffi
from jax_flash import dropout as _dropout
from jax_flash.attention import _attention as _kernel_attention


class FallbackWarning(UserWarning):
    """A call could not use jax_flash kernels and ran ``jax.nn.dot_product_attention``."""


# Reasons already reported: each distinct reason warns once per process, not once per
# call (a model calls attention in every layer, every step).
_warned_reasons: set[str] = set()


def _warn_fallback_once(reason: str) -> None:
    if reason in _warned_reasons:
        return
    _warned_reasons.add(reason)
    warnings.warn(
        f"jax_flash.dot_product_attention: {reason}; this call runs "
        "jax.nn.dot_product_attention (XLA, which materializes the score matrix) instead "
        "of the jax_flash kernels. The result is the same; the speed and memory are not.",
        FallbackWarning,
        stacklevel=4,
    )


def _check_inputs(query, key, value):
    """Rank, shape and dtype rules of jax.nn.dot_product_attention, with clear errors."""
    named = (("query", query), ("key", key), ("value", value))
    shapes = {name: _checks.array_shape(x, name) for name, x in named}
    rank = len(shapes["query"])
    if rank not in (3, 4):
        raise ValueError(
            "query must have rank 4 (batch, seqlen_q, num_heads, head_dim) or rank 3 "
            f"(seqlen_q, num_heads, head_dim), got shape {shapes['query']}"
        )
    for name in ("key", "value"):
        if len(shapes[name]) != rank:
            raise ValueError(
                f"{name} must have the rank of query ({rank}), got shape {shapes[name]}"
            )
    if shapes["key"] != shapes["value"]:
        raise ValueError(
            f"key and value must have the same shape, got {shapes['key']} and {shapes['value']}"
        )
    q4 = shapes["query"] if rank == 4 else (1, *shapes["query"])
    k4 = shapes["key"] if rank == 4 else (1, *shapes["key"])
    if q4[0] != k4[0]:
        raise ValueError(f"key must have the batch size of query ({q4[0]}), got {k4[0]}")
    if q4[3] != k4[3]:
        raise ValueError(
            f"key and value must have the head_dim of query ({q4[3]}), got {k4[3]}"
        )
    if k4[2] < 1 or q4[2] % k4[2] != 0:
        raise ValueError(
            f"the number of query heads ({q4[2]}) must be a multiple of the number of "
            f"key/value heads ({k4[2]})"
        )
    dtypes = [jnp.dtype(x.dtype) for x in (query, key, value)]
    if dtypes[1] != dtypes[0] or dtypes[2] != dtypes[0]:
        raise TypeError(
            f"query, key and value must share one dtype, got {dtypes[0]}, {dtypes[1]}, {dtypes[2]}"
        )
    return rank


def _normalize_window(local_window_size):
    """None, or (left, right) ints as jax.nn.dot_product_attention reads them."""
    if local_window_size is None:
        return None
    if isinstance(local_window_size, numbers.Integral) and not isinstance(local_window_size, bool):
        return int(local_window_size), int(local_window_size)
    if (
        isinstance(local_window_size, (tuple, list))
        and len(local_window_size) == 2
        and all(
            isinstance(side, numbers.Integral) and not isinstance(side, bool)
            for side in local_window_size
        )
    ):
        return int(local_window_size[0]), int(local_window_size[1])
    raise TypeError(
        f"local_window_size must be an int or a pair of ints (left, right), got {local_window_size!r}"
    )


def _static_scale(scale, head_dim):
    """The scale as a Python float, or None when it is traced (the kernels need it static)."""
    if scale is None:
        return 1.0 / float(np.sqrt(head_dim))
    if isinstance(scale, jax.core.Tracer):
        return None
    value = float(scale)
    if not np.isfinite(value):
        raise ValueError(f"scale must be finite, got {scale}")
    return value


def _fallback_reason(query, head_dim, scale_value, bias, mask, query_seq_lengths,
                     key_value_seq_lengths, window):
    """Why the kernels cannot compute this call, or None when they can."""
    if bias is not None:
        return "a dense `bias` has no kernel equivalent (ALiBi has one: flash_attn_func's alibi_slopes)"
    if mask is not None:
        return ("a dense `mask` has no kernel equivalent (use is_causal / local_window_size "
                "where the mask is causal or banded)")
    if query_seq_lengths is not None or key_value_seq_lengths is not None:
        return "query_seq_lengths / key_value_seq_lengths (per-batch padding) are not supported by the kernels yet"
    dtype = jnp.dtype(query.dtype)
    if dtype not in _checks.SUPPORTED_DTYPES:
        return f"the kernels take float32, float16 or bfloat16, not {dtype}"
    if _ffi._target_platform() == "gpu":
        if not _ffi.HAS_CUDA_KERNELS:
            return "jax_flash was built without CUDA kernels and the default backend is GPU"
        if dtype == jnp.float32:
            return "the CUDA kernels take float16 / bfloat16, not float32"
    if head_dim > _checks.MAX_HEAD_DIM:
        return f"head_dim {head_dim} is above the kernels' maximum of {_checks.MAX_HEAD_DIM}"
    if scale_value is None:
        return "a traced `scale` (the kernels take it as a static number)"
    if window is not None and min(window) < 0:
        return f"a negative local_window_size {window} (the kernels read -1 as unbounded)"
    return None


def kernels_take(query, mask=None) -> bool:
    """Whether the kernels compute attention of ``query`` (its dtype, head dim and the
    platform; default scale) under ``mask``; where they do not, the one-time FallbackWarning
    says why. For callers with their own kernel path, such as the Flax layer's decode steps."""
    head_dim = query.shape[-1]
    reason = _fallback_reason(query, head_dim, _static_scale(None, head_dim), None, mask, None,
                              None, None)
    if reason is not None:
        _warn_fallback_once(reason)
    return reason is None


def _empty_query_rows(seqlen_q, seqlen_k, window_left):
    """Query rows that see no key under top-left alignment: rows i with i - left > S - 1.

    With the diagonal at key i for query i, a row's visible keys are [i - left, i + right]
    (right >= 0) clipped to [0, S): only the left bound can empty a row, and only when the
    query is longer than the keys plus the window."""
    rows = np.arange(seqlen_q)
    if window_left < 0:
        return np.zeros(seqlen_q, bool)
    return rows - window_left > seqlen_k - 1


def _kernel_path(query, key, value, scale_value, is_causal, window, softcap, dropout,
                 segment_ids=None):
    """4-D inputs, top-left aligned masks, XLA's value for rows that see no key."""
    seqlen_q, num_heads = query.shape[1], query.shape[2]
    seqlen_k, num_heads_kv = key.shape[1], key.shape[2]
    left, right = (-1, -1) if window is None else window
    q_ids, kv_ids = (None, None) if segment_ids is None else segment_ids
    result = _kernel_attention(
        query, key, value, softmax_scale=scale_value, causal=bool(is_causal),
        window_size=(left, right), softcap=softcap, diagonal_offset=0, dropout_p=dropout.rate,
        dropout_key=dropout.key, dropout_broadcast_batch=dropout.broadcast_batch,
        q_segment_ids=q_ids, kv_segment_ids=kv_ids, return_lse=segment_ids is not None,
    )
    # jax.nn.dot_product_attention fills masked scores with one large finite negative
    # number, so a row with no visible key softmaxes to a uniform average of all values
    # (our kernels return 0 there). Reproduce that average so the swap is exact. Without
    # segment ids only the window empties rows, known at trace time; with them the kernels'
    # lse says which rows saw nothing (+inf).
    if segment_ids is None:
        out = result
        empty = _empty_query_rows(seqlen_q, seqlen_k, left)
        if not empty.any():
            return out
        empty = jnp.asarray(empty)[None, :, None, None]
    else:
        out, lse = result
        empty = jnp.isinf(jnp.swapaxes(lse, 1, 2))[..., None]
    uniform = jnp.mean(value.astype(jnp.float32), axis=1, keepdims=True)
    uniform = jnp.repeat(uniform, num_heads // num_heads_kv, axis=2).astype(out.dtype)
    return jnp.where(empty, uniform, out)


def _check_layer_segment_ids(segment_ids, query, key):
    """attend's segment_ids as int32 (batch, seqlen) pairs for 4-D inputs, or None."""
    if segment_ids is None:
        return None
    if not isinstance(segment_ids, (tuple, list)) or len(segment_ids) != 2:
        raise TypeError(f"segment_ids must be a pair (q_segment_ids, kv_segment_ids), got "
                        f"{type(segment_ids).__name__}")
    q_ids, kv_ids = segment_ids
    if query.ndim == 3:  # unbatched: (seqlen,) ids
        for name, ids, x in (("q_segment_ids", q_ids, query), ("kv_segment_ids", kv_ids, key)):
            shape = _checks.array_shape(ids, name)
            if shape != x.shape[:1]:
                raise ValueError(f"{name} must have shape (seqlen,) = {x.shape[:1]} for "
                                 f"unbatched inputs, got {shape}")
        q_ids, kv_ids = jnp.asarray(q_ids)[None], jnp.asarray(kv_ids)[None]
        query, key = query[None], key[None]
    _, q_ids, kv_ids = _checks.check_segment_ids(q_ids, kv_ids, query.shape[0], query.shape[1],
                                                 key.shape[1])
    return q_ids, kv_ids


def _segment_mask(mask, segment_ids):
    """A 4-D mask with the segment ids' rule (equal ids) folded in."""
    if segment_ids is None:
        return mask
    q_ids, kv_ids = segment_ids
    same = (q_ids[:, None, :, None] == kv_ids[:, None, None, :])
    return same if mask is None else mask & same


def _plain_attention(query, key, value, bias, mask, scale, is_causal, query_seq_lengths,
                     key_value_seq_lengths, window, softcap, dropout):
    """jax.nn.dot_product_attention's XLA computation plus a softcap on the scaled scores
    and attention dropout (the kernels' mask, materialized); the fallback for the layers'
    softcap and dropout, which jax.nn.dot_product_attention lacks."""
    batch, seqlen_q, num_heads, head_dim = query.shape
    seqlen_k, num_heads_kv = key.shape[1], key.shape[2]
    group = num_heads // num_heads_kv
    key = jnp.repeat(key, group, axis=2)
    value = jnp.repeat(value, group, axis=2)
    scale = 1.0 / np.sqrt(head_dim) if scale is None else scale
    logits = jnp.einsum("btnh,bsnh->bnts", query, key,
                        preferred_element_type=jnp.promote_types(query.dtype, jnp.float32))
    logits = logits * jnp.asarray(scale, logits.dtype)
    if softcap > 0:
        logits = softcap * jnp.tanh(logits / softcap)
    if bias is not None:
        logits = logits + bias
    visible = jnp.ones((1, 1, seqlen_q, seqlen_k), bool)
    query_index = jnp.arange(seqlen_q)[:, None]
    key_index = jnp.arange(seqlen_k)[None, :]
    if is_causal:
        visible &= key_index <= query_index
    if window is not None:
        visible &= (key_index >= query_index - window[0]) & (key_index <= query_index + window[1])
    if mask is not None:
        visible &= mask
    if key_value_seq_lengths is not None:
        visible &= key_index[None, None] < key_value_seq_lengths[:, None, None, None]
    if query_seq_lengths is not None:
        visible &= query_index[None, None] < query_seq_lengths[:, None, None, None]
    large_negative = -0.7 * float(jnp.finfo(jnp.float32).max)
    logits = jnp.where(visible, logits, jnp.asarray(large_negative, logits.dtype))
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    if dropout.rate > 0:
        keep = _dropout.dropout_mask(dropout.key, dropout.rate, batch, num_heads, seqlen_q,
                                     seqlen_k, dropout.broadcast_batch)
        probs = jnp.where(keep, probs * _dropout.keep_scale(dropout.rate), 0.0)
    probs = probs.astype(value.dtype)
    out = jnp.einsum("bnts,bsnh->btnh", probs, value)
    if query_seq_lengths is not None:
        rows = jnp.arange(seqlen_q)[None, :] < query_seq_lengths[:, None]
        out = out * rows[:, :, None, None].astype(out.dtype)
    return out


def window_to_local_window(window_size, seqlen_q, seqlen_k):
    """FlashAttention's (left, right) with -1 = unbounded as jax.nn's local_window_size
    (None, or two non-negative ints): an unbounded side becomes a bound no key reaches."""
    left, right = window_size
    if left < 0 and right < 0:
        return None
    reach_everything = seqlen_q + seqlen_k
    return (left if left >= 0 else reach_everything, right if right >= 0 else reach_everything)


def _to_4d(x):
    return None if x is None else jnp.asarray(x)[None] if jnp.ndim(x) == 3 else jnp.asarray(x)


class Dropout(NamedTuple):
    """Attention dropout for attend: rate, PRNG key, and whether every batch row shares
    one mask (Flax's broadcast_dropout)."""

    rate: float = 0.0
    key: object = None
    broadcast_batch: bool = False


NO_DROPOUT = Dropout()


def attend(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False,
           query_seq_lengths=None, key_value_seq_lengths=None, local_window_size=None,
           softcap=0.0, dropout=NO_DROPOUT, segment_ids=None):
    """dot_product_attention plus ``softcap``, attention ``dropout`` and ``segment_ids``
    (for the layers); see dot_product_attention. Dropout draws flash_attn_func's mask
    (jax_flash.dropout) on every path, the XLA fallback included. segment_ids: None or
    (q_segment_ids, kv_segment_ids), integer (batch, seqlen_q) and (batch, seqlen_k), or
    (seqlen,) each for unbatched inputs: query i sees key j only where their ids are
    equal, exactly as the mask q_ids[:, None] == kv_ids[None, :] would (a row that sees no
    key averages all values, as jax.nn's does)."""
    rank = _check_inputs(query, key, value)
    segment_ids = _check_layer_segment_ids(segment_ids, query, key)
    if not isinstance(is_causal, (bool, np.bool_)):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    softcap = _checks.check_softcap(softcap)
    window = _normalize_window(local_window_size)
    head_dim = query.shape[-1]
    scale_value = _static_scale(scale, head_dim)
    reason = _fallback_reason(query, head_dim, scale_value, bias, mask, query_seq_lengths,
                              key_value_seq_lengths, window)
    if reason is None:
        out = _kernel_path(_to_4d(query), _to_4d(key), _to_4d(value), scale_value,
                           bool(is_causal), window, softcap, dropout, segment_ids)
        return out[0] if rank == 3 else out
    _warn_fallback_once(reason)
    if segment_ids is not None:
        mask = _segment_mask(None if mask is None else _to_4d(mask).astype(bool), segment_ids)
    if softcap > 0 or dropout.rate > 0 or segment_ids is not None:
        if query_seq_lengths is not None:
            query_seq_lengths = jnp.asarray(query_seq_lengths)
        if key_value_seq_lengths is not None:
            key_value_seq_lengths = jnp.asarray(key_value_seq_lengths)
        out = _plain_attention(
            _to_4d(query), _to_4d(key), _to_4d(value), _to_4d(bias),
            None if mask is None else _to_4d(mask).astype(bool), scale, bool(is_causal),
            query_seq_lengths, key_value_seq_lengths, window, softcap, dropout,
        )
        return out[0] if rank == 3 else out
    return jax.nn.dot_product_attention(
        query, key, value, bias, mask, scale=scale, is_causal=bool(is_causal),
        query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=window, implementation=None,
    )


def dot_product_attention(query, key, value, bias=None, mask=None, *, scale=None,
                          is_causal=False, query_seq_lengths=None,
                          key_value_seq_lengths=None, local_window_size=None):
    """Drop-in replacement for ``jax.nn.dot_product_attention``, computed by jax_flash.

    Same arguments and results as ``jax.nn.dot_product_attention`` (without
    ``implementation`` and ``return_residual``):

    Args:
      query: (batch, seqlen_q, num_heads, head_dim), or (seqlen_q, num_heads, head_dim).
      key, value: (batch, seqlen_k, num_heads_kv, head_dim), or without the batch axis
        like query; num_heads % num_heads_kv == 0 (GQA / MQA). One dtype for all three.
      bias: added to the scaled scores, broadcastable to (batch, num_heads, seqlen_q,
        seqlen_k). Falls back (see below).
      mask: boolean, True where a score takes part, broadcastable like bias. Falls back.
      scale: multiplies q·k; default 1 / sqrt(head_dim).
      is_causal: query i sees key j only if j <= i: aligned to the **top-left** corner
        when seqlen_q != seqlen_k, as in jax.nn (flash_attn_func aligns bottom-right).
      query_seq_lengths, key_value_seq_lengths: int32 (batch,) padding lengths. Fall back.
      local_window_size: int w (meaning (w, w)) or (left, right): query i sees keys
        i - left <= j <= i + right, top-left aligned; combined with is_causal.

    Returns:
      An array with the shape and dtype of query.

    What runs where. The jax_flash kernels compute causal, windowed and unmasked
    attention of float32 (CPU only), float16 and bfloat16 inputs with head_dim <= 256, in
    O(seqlen) memory. Everything else runs ``jax.nn.dot_product_attention(...,
    implementation=None)`` (the XLA path) and warns once per reason with a
    ``jax_flash.nn.FallbackWarning``:

      - ``bias`` or ``mask`` given (the kernels take no dense bias or mask; express causal
        and banded masks with ``is_causal`` / ``local_window_size``);
      - ``query_seq_lengths`` or ``key_value_seq_lengths`` given;
      - a dtype other than float32 / float16 / bfloat16, or float32 on a GPU;
      - head_dim > 256, a traced ``scale``, a negative window side;
      - a GPU backend with a CPU-only jax_flash build.

    Rows that see no key (possible only with a window and seqlen_q > seqlen_k + left):
    jax.nn fills masked scores with a large finite negative number, so such a row is the
    uniform average of all values; jax_flash reproduces that (its kernels alone give 0).

    Differences: results agree to rounding, and jax_flash is usually the more accurate
    of the two for float16 / bfloat16 (its probabilities stay in float32 until they are
    multiplied by the values; XLA rounds them to the input dtype first).
    """
    return attend(
        query, key, value, bias, mask, scale=scale, is_causal=is_causal,
        query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size,
    )
