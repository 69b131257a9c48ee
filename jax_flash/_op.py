"""The differentiable attention op: custom_vjp over the batchable kernel calls."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_flash import _batching
from jax_flash._config import KernelConfig


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def attention(config: KernelConfig, q, k, v, alibi_slopes, q_segment_ids, kv_segment_ids,
              dropout_seeds):
    """Returns (out, lse). alibi_slopes is (batch, num_heads) float32 and gets no gradient;
    the segment ids are int32 (batch, seqlen_q) and (batch, seqlen_k); dropout_seeds uint32
    (batch, num_heads, 2). The backward regenerates the dropout mask from the seeds."""
    return _batching.forward_fn(config)(q, k, v, alibi_slopes, q_segment_ids, kv_segment_ids,
                                        dropout_seeds)


def _attention_fwd(config, q, k, v, *masks):
    out, lse = _batching.forward_fn(config)(q, k, v, *masks)
    return (out, lse), (q, k, v, out, lse, masks)


def _attention_bwd(config, residuals, cotangents):
    q, k, v, out, lse, masks = residuals
    dout, dlse = cotangents
    dq, dk, dv = _batching.backward_fn(config)(
        q, k, v, out, dout.astype(out.dtype), lse, dlse.astype(jnp.float32), *masks
    )
    # ALiBi slopes are constants of the model (as in FlashAttention); the public API applies
    # stop_gradient to them, so this zero is the true derivative of what the user sees.
    # Segment ids and seeds are integers: no cotangent.
    return dq, dk, dv, jnp.zeros_like(masks[0]), None, None, None


attention.defvjp(_attention_fwd, _attention_bwd)
