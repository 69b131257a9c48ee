"""Causal attention with jax_flash under jit, grad and vmap; runs on CPU and GPU."""

import jax
import jax.numpy as jnp

import jax_flash as jf

batch, seqlen, num_heads, num_heads_kv, head_dim = 2, 256, 8, 2, 64
kq, kk, kv = jax.random.split(jax.random.key(0), 3)
dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
q = jax.random.normal(kq, (batch, seqlen, num_heads, head_dim), dtype)
k = jax.random.normal(kk, (batch, seqlen, num_heads_kv, head_dim), dtype)  # GQA: 4 query heads per kv head
v = jax.random.normal(kv, (batch, seqlen, num_heads_kv, head_dim), dtype)


@jax.jit
def loss(q, k, v):
    out = jf.flash_attn_func(q, k, v, causal=True)
    return jnp.mean(out.astype(jnp.float32) ** 2)


out, lse = jax.jit(lambda q, k, v: jf.flash_attn_func(q, k, v, causal=True, return_lse=True))(q, k, v)
reference = jf.reference_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), causal=True)
print("backend:", jax.default_backend(), "| out", out.shape, out.dtype, "| lse", lse.shape, lse.dtype)
print("max |out - reference|:", float(jnp.max(jnp.abs(out.astype(jnp.float32) - reference))))

grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
print("grad shapes:", [g.shape for g in grads])

# vmap over an extra axis of queries folds it into the kernel's heads (no loop, no kv copy)
many_q = jnp.stack([q, 2 * q])
print("vmapped:", jax.vmap(lambda q: jf.flash_attn_func(q, k, v, causal=True))(many_q).shape)
