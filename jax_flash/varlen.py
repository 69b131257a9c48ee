"""Variable-length sequences with FlashAttention's varlen API, built on segment ids.

Sequence b of a varlen call holds queries cu_seqlens_q[b]:cu_seqlens_q[b+1] and keys
cu_seqlens_k[b]:cu_seqlens_k[b+1], and causal masks, windows and ALiBi align bottom-right
within each sequence (query i of b faces key i + len_k(b) - len_q(b)). The kernels see one
packed row with segment ids:

- When q and k share their cu_seqlens (self-attention, the usual training case) the packed
  arrays are that row already, and nothing is copied.
- Otherwise each sequence gets a region of max(len_q, len_k) rows in which its queries and
  its keys both end at the region's end. Then the row index is a position with the
  per-sequence bottom-right alignment built in, and one mask diagonal (offset 0) serves
  every sequence; q, k and v are scattered into the regions and the results gathered back.

Rows no token fills carry ids that match nothing (-1 for queries, -2 for keys), and the
kernels skip the blocks they cannot meet, so a call costs what its sequences cost.
"""

from __future__ import annotations

import numbers

import jax.numpy as jnp
import numpy as np

from jax_flash import _checks
from jax_flash.attention import _attention

_NO_QUERY, _NO_KEY = -1, -2


def _check_tokens(q, k, v):
    shapes = {name: _checks.array_shape(x, name) for name, x in (("q", q), ("k", k), ("v", v))}
    for name, shape in shapes.items():
        if len(shape) != 3:
            raise ValueError(
                f"{name} must have rank 3 (total_tokens, num_heads, head_dim) in the varlen API, "
                f"got shape {shape}")
    _checks.check_qkv(q[None], k[None], v[None])


def _check_cu_seqlens(cu_seqlens_q, cu_seqlens_k):
    checked = []
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        shape = _checks.array_shape(cu, name)
        if len(shape) != 1 or shape[0] < 1:
            raise ValueError(f"{name} must be a 1-D array of num_sequences + 1 offsets, got shape {shape}")
        if not jnp.issubdtype(cu.dtype, jnp.integer):
            raise TypeError(f"{name} must hold integers (int32), got {cu.dtype}")
        checked.append(cu.astype(jnp.int32))
    if checked[0].shape != checked[1].shape:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
            f"shapes {checked[0].shape} and {checked[1].shape}")
    return checked


def _check_max_seqlen(value, name):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < 0:
        raise TypeError(f"{name} must be a static int >= 0, got {value!r}")


def _token_rows(cu, total, region_end, well_formed, num_rows):
    """Row of each token in the packed layout (num_rows where it has none) and its sequence."""
    num_sequences = cu.shape[0] - 1
    token = jnp.arange(total)
    sequence = jnp.minimum(jnp.searchsorted(cu[1:], token, side="right"), num_sequences - 1)
    lengths = cu[1:] - cu[:-1]
    valid = well_formed & (token >= cu[0]) & (token < cu[-1])
    row = region_end[sequence] - lengths[sequence] + (token - cu[sequence])
    return jnp.where(valid, row, num_rows), jnp.where(valid, sequence, -1)


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_lse=False,
    dropout_key=None,
):
    """Attention over a batch of sequences of different lengths, packed without padding.

    Args:
      q: (total_q, num_heads, head_dim); k, v: (total_k, num_heads_kv, head_dim).
      cu_seqlens_q, cu_seqlens_k: int32 (num_sequences + 1,) offsets, starting at 0 and
        non-decreasing: sequence b is q[cu_seqlens_q[b]:cu_seqlens_q[b+1]] against
        k, v[cu_seqlens_k[b]:cu_seqlens_k[b+1]]. Traced arrays: they run under jit, and a new
        set of lengths does not recompile. Tokens outside [cu[0], cu[-1]) get zero outputs
        (lse +inf) and no gradient; offsets that are not a valid partition (decreasing,
        or not starting at 0) make every output zero rather than mix sequences.
      max_seqlen_q, max_seqlen_k: static ints, FlashAttention's grid hints; accepted and
        checked for type, not needed here.
      The other arguments are flash_attn_func's, applied within each sequence with
      bottom-right alignment; alibi_slopes must be (num_heads,). The dropout mask is drawn
        over the internal packed layout (one row, or one region per sequence when the q and
        k offsets differ), so it differs from flash_attn_func's on the same sequences; the
        same key still gives the same mask.

    Returns:
      out (total_q, num_heads, head_dim), or (out, lse) with lse (num_heads, total_q).
    """
    _checks.check_dropout(dropout_p, dropout_key)
    _check_tokens(q, k, v)
    _check_max_seqlen(max_seqlen_q, "max_seqlen_q")
    _check_max_seqlen(max_seqlen_k, "max_seqlen_k")
    shared_offsets = cu_seqlens_q is cu_seqlens_k
    cu_q, cu_k = _check_cu_seqlens(cu_seqlens_q, cu_seqlens_k)
    total_q, num_heads = q.shape[:2]
    total_k = k.shape[0]
    if alibi_slopes is not None and _checks.array_shape(alibi_slopes, "alibi_slopes") != (num_heads,):
        raise ValueError(
            f"alibi_slopes must have shape (num_heads,) = ({num_heads},) in the varlen API, got "
            f"{alibi_slopes.shape}")
    kwargs = dict(softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                  softcap=softcap, alibi_slopes=alibi_slopes, return_lse=True,
                  diagonal_offset=0, deterministic=deterministic, dropout_p=dropout_p,
                  dropout_key=dropout_key)

    if cu_q.shape[0] == 1:
        # No sequences: one empty sequence at the single offset leaves every token outside
        # the sequences (zero outputs), through the same path as any other call.
        cu_q, cu_k = (jnp.concatenate([cu, cu]) for cu in (cu_q, cu_k))
        shared_offsets = False

    len_q, len_k = cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1]
    well_formed = (cu_q[0] == 0) & (cu_k[0] == 0) & jnp.all(len_q >= 0) & jnp.all(len_k >= 0)
    if shared_offsets and total_q == total_k:
        # Self-attention: the packed arrays are the layout; only the ids are new.
        _, q_ids = _token_rows(cu_q, total_q, cu_q[1:], well_formed, total_q)
        kv_ids = jnp.where(q_ids >= 0, q_ids, _NO_KEY)
        q_ids = jnp.where(q_ids >= 0, q_ids, _NO_QUERY)
        out, lse = _attention(q[None], k[None], v[None], q_segment_ids=q_ids[None],
                              kv_segment_ids=kv_ids[None], **kwargs)
        return (out[0], lse[0]) if return_lse else out[0]

    num_rows = total_q + total_k  # bounds the sum of max(len_q, len_k)
    region_end = jnp.cumsum(jnp.maximum(len_q, len_k))
    rows_q, seq_q = _token_rows(cu_q, total_q, region_end, well_formed, num_rows)
    rows_k, seq_k = _token_rows(cu_k, total_k, region_end, well_formed, num_rows)

    def scatter(x, rows, fill):
        return jnp.full((num_rows,) + x.shape[1:], fill, x.dtype).at[rows].set(x, mode="drop")

    out, lse = _attention(
        scatter(q, rows_q, 0)[None], scatter(k, rows_k, 0)[None], scatter(v, rows_k, 0)[None],
        q_segment_ids=scatter(seq_q, rows_q, _NO_QUERY)[None],
        kv_segment_ids=scatter(seq_k, rows_k, _NO_KEY)[None], **kwargs)
    out = out[0].at[rows_q].get(mode="fill", fill_value=0)
    if not return_lse:
        return out
    return out, lse[0].at[:, rows_q].get(mode="fill", fill_value=jnp.inf)


def flash_attn_varlen_qkvpacked_func(
    qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
    window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
    return_lse=False, dropout_key=None,
):
    """flash_attn_varlen_func on qkv (total, 3, num_heads, head_dim); gradients flow to qkv."""
    shape = _checks.array_shape(qkv, "qkv")
    if len(shape) != 4 or shape[1] != 3:
        raise ValueError(f"qkv must have shape (total, 3, num_heads, head_dim), got {shape}")
    return flash_attn_varlen_func(
        qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
        dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
        window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
        deterministic=deterministic, return_lse=return_lse, dropout_key=dropout_key)


def flash_attn_varlen_kvpacked_func(
    q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
    deterministic=False, return_lse=False, dropout_key=None,
):
    """flash_attn_varlen_func with kv (total_k, 2, num_heads_kv, head_dim); gradients flow to kv."""
    shape = _checks.array_shape(kv, "kv")
    if len(shape) != 4 or shape[1] != 2:
        raise ValueError(f"kv must have shape (total_k, 2, num_heads_kv, head_dim), got {shape}")
    return flash_attn_varlen_func(
        q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
        window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
        deterministic=deterministic, return_lse=return_lse, dropout_key=dropout_key)
