"""Runs one implementation's forward and backward once on one benchmark shape, for Nsight
Compute:
    ncu --kernel-name regex:'backward_kernel' python benchmarks/profile_one.py jax_flash 128 8192 0
Arguments: implementation (jax_flash, or fa3: the flash-attn3-jax wheel), head_dim, seqlen,
causal (0/1); batch * seqlen = 16384 tokens, hidden 2048, bf16, and a random cotangent."""

import sys

import jax
import jax.numpy as jnp

impl, head_dim, seqlen, causal = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), bool(int(sys.argv[4]))
if impl == "fa3":
    from flash_attn3_jax import flash_mha

    attention = lambda q, k, v: flash_mha(q, k, v, is_causal=causal)
else:
    import jax_flash as jf

    attention = lambda q, k, v: jf.flash_attn_func(q, k, v, causal=causal)
batch, heads = 16384 // seqlen, 2048 // head_dim
keys = jax.random.split(jax.random.key(0), 4)
q, k, v, dout = (jax.random.normal(key, (batch, seqlen, heads, head_dim), jnp.bfloat16) for key in keys)
grads = jax.jit(lambda q, k, v, dout: jax.vjp(attention, q, k, v)[1](dout))(q, k, v, dout)
jax.block_until_ready(grads)
print("profiled", impl, head_dim, seqlen, causal)
