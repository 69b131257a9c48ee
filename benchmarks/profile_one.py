"""Runs one implementation's forward and backward once on one benchmark shape, for Nsight
Compute:
    ncu --kernel-name regex:'backward_kernel' python benchmarks/profile_one.py jax_flash 128 8192 0
Arguments: an implementation of bench_attention.py (jax_flash, fa3, cudnn, ...), head_dim,
seqlen, causal (0/1); batch * seqlen = 16384 tokens, hidden 2048, bf16, a random dO."""

import sys

import jax

from bench_attention import grid_inputs, implementations

impl, head_dim, seqlen, causal = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), bool(int(sys.argv[4]))
implementation = implementations()[impl]
attention = lambda q, k, v: implementation(q, k, v, causal)
q, k, v, dout = grid_inputs(head_dim, seqlen, seed=0)
grads = jax.jit(lambda q, k, v, dout: jax.vjp(attention, q, k, v)[1](dout))(q, k, v, dout)
jax.block_until_ready(grads)
print("profiled", impl, head_dim, seqlen, causal)
