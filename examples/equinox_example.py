"""Swapping the attention of an Equinox model for jax_flash's, in one line.

    python examples/equinox_example.py

A small causal transformer block is built twice from the same key: once with
`eqx.nn.MultiheadAttention` (given a causal mask) and once with
`jax_flash.layers.equinox.MultiheadAttention(causal=True)`. Both are applied to a batch
under `jax.vmap`, differentiated under `eqx.filter_jit`, and compared.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from jax_flash.layers.equinox import MultiheadAttention

WIDTH, HEADS, SEQLEN, BATCH = 64, 4, 128, 8
DTYPE = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32


class Block(eqx.Module):
    attention: eqx.Module
    norm: eqx.nn.LayerNorm
    mlp: eqx.nn.MLP
    causal_mask: jax.Array | None

    def __init__(self, use_jax_flash, key):
        attention_key, mlp_key = jax.random.split(key)
        if use_jax_flash:  # the one-line swap
            self.attention = MultiheadAttention(HEADS, WIDTH, causal=True, dtype=DTYPE, key=attention_key)
            self.causal_mask = None
        else:
            self.attention = eqx.nn.MultiheadAttention(HEADS, WIDTH, dtype=DTYPE, key=attention_key)
            self.causal_mask = jnp.tril(jnp.ones((SEQLEN, SEQLEN), bool))
        self.norm = eqx.nn.LayerNorm(WIDTH, dtype=DTYPE)
        self.mlp = eqx.nn.MLP(WIDTH, WIDTH, 4 * WIDTH, depth=1, dtype=DTYPE, key=mlp_key)

    def __call__(self, x):  # x: (seqlen, width), unbatched as Equinox layers are
        h = jax.vmap(self.norm)(x)
        x = x + self.attention(h, h, h, mask=self.causal_mask)
        return x + jax.vmap(self.mlp)(x)


@eqx.filter_jit
def loss_and_grads(block, x):
    def loss(block):
        return jnp.mean(jax.vmap(block)(x).astype(jnp.float32) ** 2)
    return eqx.filter_value_and_grad(loss)(block)


key = jax.random.key(0)
flash_block, plain_block = Block(True, key), Block(False, key)
x = jax.random.normal(jax.random.key(1), (BATCH, SEQLEN, WIDTH), DTYPE)

flash_loss, flash_grads = loss_and_grads(flash_block, x)
plain_loss, plain_grads = loss_and_grads(plain_block, x)
weight_difference = max(
    float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
    for a, b in zip(jax.tree.leaves(flash_grads.attention), jax.tree.leaves(plain_grads.attention))
)
output_difference = float(jnp.max(jnp.abs(
    (jax.vmap(flash_block)(x) - jax.vmap(plain_block)(x)).astype(jnp.float32))))
print(f"backend: {jax.default_backend()}, dtype: {jnp.dtype(DTYPE).name}")
print(f"loss: jax_flash {float(flash_loss):.6f}, equinox {float(plain_loss):.6f}")
print(f"max |output difference|: {output_difference:.2e}")
print(f"max |attention weight-gradient difference|: {weight_difference:.2e}")
assert output_difference < (5e-2 if DTYPE == jnp.bfloat16 else 1e-4)
