"""Runs jax_flash forward and backward once on one benchmark shape, for Nsight Compute:
    ncu --kernel-name regex:'forward_kernel|backward_kernel' python benchmarks/profile_one.py 128 8192 0
Arguments: head_dim seqlen causal (0/1); batch * seqlen = 16384 tokens, hidden 2048, bf16."""

import sys

import jax
import jax.numpy as jnp

import jax_flash as jf

head_dim, seqlen, causal = int(sys.argv[1]), int(sys.argv[2]), bool(int(sys.argv[3]))
batch, heads = 16384 // seqlen, 2048 // head_dim
keys = jax.random.split(jax.random.key(0), 3)
q, k, v = (jax.random.normal(key, (batch, seqlen, heads, head_dim), jnp.bfloat16) for key in keys)
loss = lambda q, k, v: jnp.sum(jf.flash_attn_func(q, k, v, causal=causal).astype(jnp.float32))
grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
jax.block_until_ready(grads)
print("profiled", head_dim, seqlen, causal)
