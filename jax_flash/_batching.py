"""vmap for the kernel calls, without sequential loops.

A vmapped axis becomes part of the kernel's batch axis: the call is the same attention on
more independent rows. When only query-side arrays are mapped, the mapped axis folds into
the head axis instead, as extra query heads sharing the same key/value heads (GQA), so k
and v are never copied. Nested vmaps work because each rule calls the batched function
again, which the next vmap level batches in turn.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap

from jax_flash import _sharding
from jax_flash._config import KernelConfig


def _materialize(x, batched, axis_size):
    """Gives x a leading mapped axis of axis_size (custom_vmap puts mapped axes first)."""
    return x if batched else jnp.broadcast_to(x, (axis_size,) + x.shape)


def _merge_leading(x):
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _split_leading(x, axis_size):
    return x.reshape((axis_size, x.shape[0] // axis_size) + x.shape[1:])


def _fold_into_batch(fn, axis_size, in_batched, args):
    """Runs fn on (axis_size * batch) rows and splits every result back."""
    flat = [_merge_leading(_materialize(x, b, axis_size)) for x, b in zip(args, in_batched)]
    results = fn(*flat)
    return tuple(_split_leading(r, axis_size) for r in results)


@functools.lru_cache(maxsize=None)
def forward_fn(config: KernelConfig):
    """(q, k, v, alibi_slopes, q_segment_ids, kv_segment_ids, dropout_seeds) -> (out, lse),
    batchable over any subset of arguments."""

    @custom_vmap
    def forward(*operands):
        return _sharding.forward(config, *operands)

    @forward.def_vmap
    def forward_vmap(axis_size, in_batched, *operands):
        if in_batched[0] and not any(in_batched[1:]):
            out, lse = _fold_query_into_heads(forward, axis_size, *operands)
        else:
            out, lse = _fold_into_batch(forward, axis_size, in_batched, operands)
        return (out, lse), (True, True)

    return forward


def _fold_query_into_heads(forward, axis_size, q, k, v, alibi_slopes, q_segment_ids,
                          kv_segment_ids, dropout_seeds):
    # Head h of copy c becomes head h * axis_size + c, so it still maps to kv head
    # h // (num_heads // num_heads_kv): the copies form part of each GQA group. Per-head
    # operands are repeated, so every copy keeps its head's slope and dropout seeds.
    n, batch, seqlen_q, num_heads, head_dim = q.shape
    q_heads = jnp.moveaxis(q, 0, 3).reshape(batch, seqlen_q, num_heads * n, head_dim)
    slopes = jnp.repeat(alibi_slopes, n, axis=1)
    seeds = jnp.repeat(dropout_seeds, n, axis=1)
    out, lse = forward(q_heads, k, v, slopes, q_segment_ids, kv_segment_ids, seeds)
    out = jnp.moveaxis(out.reshape(batch, seqlen_q, num_heads, n, head_dim), 3, 0)
    lse = jnp.moveaxis(lse.reshape(batch, num_heads, n, seqlen_q), 2, 0)
    return out, lse


@functools.lru_cache(maxsize=None)
def backward_fn(config: KernelConfig):
    """(q, k, v, out, dout, lse, dlse, alibi_slopes, q_segment_ids, kv_segment_ids,
    dropout_seeds) -> (dq, dk, dv), batchable.

    Mapped axes always fold into the batch: each mapped copy needs its own dk and dv, which
    folding into heads would sum together.
    """

    @custom_vmap
    def backward(*operands):
        return _sharding.backward(config, *operands)

    @backward.def_vmap
    def backward_vmap(axis_size, in_batched, *args):
        return _fold_into_batch(backward, axis_size, in_batched, args), (True, True, True)

    return backward
