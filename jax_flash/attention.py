"""Public attention functions, with FlashAttention's names and argument conventions."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_flash import _checks, dropout
from jax_flash._config import KernelConfig
from jax_flash._op import attention as _op_attention


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_lse=False,
    dropout_key=None,
    q_segment_ids=None,
    kv_segment_ids=None,
):
    """Exact attention computed by tiled kernels, never materializing the score matrix.

    Args:
      q: (batch, seqlen_q, num_heads, head_dim).
      k, v: (batch, seqlen_k, num_heads_kv, head_dim); num_heads % num_heads_kv == 0
        (grouped-query / multi-query attention when num_heads_kv < num_heads).
      dropout_p, dropout_key: attention dropout. With dropout_p > 0 each probability is
        kept with probability 1 - dropout_p (rounded to a multiple of 2**-16) and kept ones
        are divided by that probability, so the output is unbiased; lse is that of the
        undropped row. dropout_key (a JAX PRNG key, required then) fixes the mask: the same
        key gives the same mask on CPU and GPU, and the backward regenerates it rather than
        storing it. jax_flash.dropout_mask(key, dropout_p, batch, num_heads, seqlen_q,
        seqlen_k) returns the mask of a call. dropout_p = 0 ignores the key.
      softmax_scale: scale of q·k, default 1 / sqrt(head_dim).
      causal: mask keys after the query, aligned to the bottom-right corner when
        seqlen_q != seqlen_k (query i sees key j iff j <= i + seqlen_k - seqlen_q).
      window_size: (left, right) sliding window, same alignment; -1 leaves a side
        unbounded. causal=True sets right to 0.
      softcap: if > 0, scores become softcap * tanh(scores / softcap) after scaling.
      alibi_slopes: float32 (num_heads,) or (batch, num_heads); adds
        -slope * |i + seqlen_k - seqlen_q - j| after softcap. Treated as constants: no
        gradient flows to them.
      deterministic: a backward pass whose result does not depend on the order in which
        GPU thread blocks run (bitwise the same from run to run): dQ comes from a pass over
        query blocks instead of atomic additions, at some cost (see benchmarks/RESULTS.md).
        The CPU backward is deterministic either way.
      return_lse: also return the log-sum-exp of each row, (batch, num_heads, seqlen_q)
        float32, natural log; +inf for a row whose keys are all masked (its output is 0).
        Gradients flow through lse as well.
      q_segment_ids, kv_segment_ids: packed sequences: integer (batch, seqlen_q) and
        (batch, seqlen_k) arrays (compared as int32), given together. Query i sees key j
        only if q_segment_ids[b, i] == kv_segment_ids[b, j], on top of causal and the window,
        which count positions in the packed row. A query whose segment has no visible key
        gets a zero output (lse +inf). Key blocks whose ids cannot meet a query block's are
        skipped, so packed documents sorted by id cost what the documents cost.

    Returns:
      out with the shape and dtype of q, or (out, lse) when return_lse is True.
    """
    return _attention(
        q, k, v, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
        softcap=softcap, alibi_slopes=alibi_slopes, return_lse=return_lse,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        deterministic=deterministic, dropout_p=dropout_p, dropout_key=dropout_key,
    )


def _attention(
    q, k, v, *, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
    alibi_slopes=None, return_lse=False, diagonal_offset=None, q_segment_ids=None,
    kv_segment_ids=None, deterministic=False, dropout_p=0.0, dropout_key=None,
    dropout_broadcast_batch=False, dropout_seeds=None,
):
    """flash_attn_func's op with a movable mask diagonal, for the layers built on it.

    diagonal_offset is the key aligned with query 0: causal lets query i see key j iff
    j <= i + diagonal_offset, and the window and ALiBi distances count from the same
    diagonal. None is FlashAttention's bottom-right alignment (seqlen_k - seqlen_q); 0 is
    the top-left alignment of jax.nn.dot_product_attention; ring attention passes the
    distance between two blocks of one sequence. dropout_broadcast_batch draws one
    dropout mask for every batch row (Flax's broadcast_dropout). dropout_seeds, uint32
    (batch, num_heads, 2), replaces the seeds drawn from dropout_key (Ulysses passes its
    heads' share of the whole call's, so its masks are the one-device call's).
    """
    batch, seqlen_q, num_heads, head_dim, seqlen_k, _ = _checks.check_qkv(q, k, v)
    window_left, window_right = _checks.check_window(window_size, causal)
    slopes = _checks.check_alibi_slopes(alibi_slopes, batch, num_heads)
    has_segment_ids, q_ids, kv_ids = _checks.check_segment_ids(
        q_segment_ids, kv_segment_ids, batch, seqlen_q, seqlen_k)
    dropout_p = _checks.check_dropout(dropout_p, dropout_key)
    has_dropout = dropout_p > 0.0
    diagonal_offset = _checks.check_diagonal_offset(diagonal_offset, seqlen_q, seqlen_k)
    # Query i and key j are at most seqlen_q + seqlen_k + |offset| apart from the diagonal,
    # so a wider side masks nothing: unbounded, exactly (and no overflow in the kernels).
    window_left, window_right = _checks.drop_idle_window_sides(
        window_left, window_right, seqlen_q + seqlen_k + abs(diagonal_offset))
    if not has_dropout:
        seeds = _checks.placeholder_seeds(batch, num_heads)
    elif dropout_seeds is not None:
        seeds = dropout_seeds
    else:
        seeds = dropout.seeds(dropout_key, batch, num_heads, dropout_broadcast_batch)
    config = KernelConfig(
        softmax_scale=_checks.check_softmax_scale(softmax_scale, head_dim),
        softcap=_checks.check_softcap(softcap),
        window_left=window_left,
        window_right=window_right,
        diagonal_offset=diagonal_offset,
        has_alibi=slopes is not None,
        has_segment_ids=has_segment_ids,
        deterministic=_checks.check_deterministic(deterministic),
        **dropout.kernel_fields(dropout_p),
    )
    if slopes is None:
        slopes = jnp.zeros((batch, num_heads), jnp.float32)
    out, lse = _op_attention(config, q, k, v, jax.lax.stop_gradient(slopes), q_ids, kv_ids,
                             seeds)
    return (out, lse) if return_lse else out


def _unpack(packed, name, count):
    shape = getattr(packed, "shape", None)
    if shape is None or len(shape) != 5 or shape[2] != count:
        raise ValueError(
            f"{name} must have shape (batch, seqlen, {count}, num_heads, head_dim), got {shape}"
        )
    return [packed[:, :, i] for i in range(count)]


def flash_attn_qkvpacked_func(
    qkv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_lse=False,
    dropout_key=None,
    segment_ids=None,
):
    """flash_attn_func on qkv (batch, seqlen, 3, num_heads, head_dim); gradients flow to qkv.
    segment_ids (batch, seqlen) serve as both q_segment_ids and kv_segment_ids."""
    q, k, v = _unpack(qkv, "qkv", 3)
    return flash_attn_func(
        q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
        window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
        deterministic=deterministic, return_lse=return_lse, dropout_key=dropout_key,
        q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
    )


def flash_attn_kvpacked_func(
    q,
    kv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_lse=False,
    dropout_key=None,
    q_segment_ids=None,
    kv_segment_ids=None,
):
    """flash_attn_func with kv (batch, seqlen_k, 2, num_heads_kv, head_dim); gradients flow to kv."""
    k, v = _unpack(kv, "kv", 2)
    return flash_attn_func(
        q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
        window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
        deterministic=deterministic, return_lse=return_lse, dropout_key=dropout_key,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
    )
