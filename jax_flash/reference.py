"""Attention in plain jax.numpy with exactly the semantics of flash_attn_func.

It materializes the whole score matrix, so it is for tests, documentation and small
inputs. It computes in the dtype it is given (pass float64 inputs, under
jax.config.update("jax_enable_x64", True), for a high-precision reference).
"""

from __future__ import annotations

import jax.numpy as jnp


def _diagonal(seqlen_q, seqlen_k, diagonal_offset):
    """(seqlen_q, 1): the key aligned with each query (bottom-right when offset is None)."""
    offset = seqlen_k - seqlen_q if diagonal_offset is None else diagonal_offset
    return jnp.arange(seqlen_q)[:, None] + offset


def visible_mask(seqlen_q, seqlen_k, window_left=-1, window_right=-1, diagonal_offset=None):
    """Boolean (seqlen_q, seqlen_k): may query i see key j (bottom-right aligned unless
    diagonal_offset, the key aligned with query 0, says otherwise)."""
    diagonal = _diagonal(seqlen_q, seqlen_k, diagonal_offset)
    key = jnp.arange(seqlen_k)[None, :]
    mask = jnp.ones((seqlen_q, seqlen_k), bool)
    if window_left >= 0:
        mask &= key >= diagonal - window_left
    if window_right >= 0:
        mask &= key <= diagonal + window_right
    return mask


def reference_attention(
    q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
    alibi_slopes=None, return_lse=False, diagonal_offset=None, q_segment_ids=None,
    kv_segment_ids=None, dropout_mask=None, dropout_scale=1.0,
):
    """out (and lse) for q (b, sq, h, d), k/v (b, sk, hk, d); see flash_attn_func.

    diagonal_offset moves the masks' (and ALiBi's) diagonal: the key aligned with query 0,
    seqlen_k - seqlen_q when None. Segment ids (b, sq) and (b, sk) mask pairs whose ids differ.
    dropout_mask (b, h, sq, sk) boolean, e.g. from jax_flash.dropout_mask, zeroes dropped
    probabilities after lse is taken and multiplies the kept ones by dropout_scale."""
    batch, seqlen_q, num_heads, head_dim = q.shape
    seqlen_k, num_heads_kv = k.shape[1], k.shape[2]
    group = num_heads // num_heads_kv
    k = jnp.repeat(k, group, axis=2)
    v = jnp.repeat(v, group, axis=2)
    scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * jnp.asarray(scale, q.dtype)
    if softcap > 0:
        scores = softcap * jnp.tanh(scores / softcap)
    if alibi_slopes is not None:
        slopes = jnp.broadcast_to(alibi_slopes, (batch, num_heads)).astype(scores.dtype)
        diagonal = _diagonal(seqlen_q, seqlen_k, diagonal_offset)
        distance = jnp.abs(diagonal - jnp.arange(seqlen_k)[None, :]).astype(scores.dtype)
        scores = scores - slopes[:, :, None, None] * distance
    left, right = window_size
    mask = visible_mask(seqlen_q, seqlen_k, left, 0 if causal else right, diagonal_offset)
    if q_segment_ids is not None:
        same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
        mask = mask[None, None] & same[:, None]
    scores = jnp.where(mask, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0)
    weights = jnp.exp(scores - row_max)
    row_sum = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(row_sum == 0, 1, row_sum)
    if dropout_mask is not None:
        probs = jnp.where(dropout_mask, probs * jnp.asarray(dropout_scale, probs.dtype), 0)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
    if not return_lse:
        return out
    row_sum = row_sum[..., 0]
    empty = row_sum == 0
    # log of a guarded sum: an unguarded log(0) would put NaN into the gradient of where().
    lse = jnp.where(empty, jnp.inf, row_max[..., 0] + jnp.log(jnp.where(empty, 1, row_sum)))
    return out, lse.astype(jnp.float32) if lse.dtype != jnp.float64 else lse
