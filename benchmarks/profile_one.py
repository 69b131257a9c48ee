"""Runs one implementation's forward and backward once on one benchmark shape, for Nsight
Compute:
    ncu --kernel-name regex:'backward_kernel' python benchmarks/profile_one.py jax_flash 128 8192 0
Arguments: an implementation of bench_attention.py (jax_flash, fa3, cudnn, ...), head_dim,
seqlen, causal (0/1); batch * seqlen = 16384 tokens, hidden 2048, bf16, a random dO."""

import sys

import jax
import jax.numpy as jnp

from bench_attention import implementations

impl, head_dim, seqlen, causal = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), bool(int(sys.argv[4]))
attention = lambda q, k, v: implementations()[impl](q, k, v, causal)
batch, heads = 16384 // seqlen, 2048 // head_dim
keys = jax.random.split(jax.random.key(0), 4)
q, k, v, dout = (jax.random.normal(key, (batch, seqlen, heads, head_dim), jnp.bfloat16) for key in keys)
grads = jax.jit(lambda q, k, v, dout: jax.vjp(attention, q, k, v)[1](dout))(q, k, v, dout)
jax.block_until_ready(grads)
print("profiled", impl, head_dim, seqlen, causal)
