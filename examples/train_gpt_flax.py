"""A small byte-level GPT in Flax NNX, trained twice from the same initial weights: once
with jax_flash attention and once with Flax's own attention (plain XLA attention). Prints
both loss curves side by side (they must agree) and the tokens/s of each.

    python examples/train_gpt_flax.py                 # 200 steps
    python examples/train_gpt_flax.py --steps 5       # what CI runs

The swap is one line: `attention=MultiHeadAttention` (jax_flash) instead of
`attention=nnx.MultiHeadAttention`. On a GPU both models run in bfloat16 (the jax_flash
CUDA kernels take float16 / bfloat16); on the CPU in float32.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jax_flash.layers.flax import MultiHeadAttention

TEXT = (
    "Attention looks at every pair of positions in a sequence, so its score matrix grows "
    "with the square of the length. FlashAttention never builds that matrix: it walks over "
    "blocks of keys, keeps a running maximum and a running sum for every query, and rescales "
    "what it has accumulated whenever the maximum grows. The result is exact, the memory is "
    "linear in the length, and the time goes to arithmetic instead of to moving scores "
    "between memory and the processor. A language model trained with it learns the same "
    "thing as one trained with the plain formula, because it computes the same numbers. "
) * 4


class Block(nnx.Module):
    def __init__(self, width, num_heads, attention, dtype, rngs):
        self.attention_norm = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)
        self.attention = attention(num_heads=num_heads, in_features=width, dtype=dtype,
                                   decode=False, rngs=rngs)
        self.mlp_norm = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)
        self.mlp_in = nnx.Linear(width, 4 * width, dtype=dtype, rngs=rngs)
        self.mlp_out = nnx.Linear(4 * width, width, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = x + self.attention(self.attention_norm(x), is_causal=True)
        return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))


class GPT(nnx.Module):
    def __init__(self, *, attention, seqlen, width=64, num_heads=4, depth=2,
                 dtype=jnp.float32, rngs):
        self.token_embedding = nnx.Embed(256, width, dtype=dtype, rngs=rngs)
        self.position_embedding = nnx.Embed(seqlen, width, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([Block(width, num_heads, attention, dtype, rngs) for _ in range(depth)])
        self.final_norm = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(width, 256, dtype=dtype, rngs=rngs)

    def __call__(self, tokens):
        x = self.token_embedding(tokens) + self.position_embedding(jnp.arange(tokens.shape[-1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.final_norm(x)).astype(jnp.float32)


def batches(data, batch_size, seqlen, seed):
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(data) - seqlen - 1, batch_size)
        window = np.stack([data[s:s + seqlen + 1] for s in starts])
        yield jnp.asarray(window[:, :-1]), jnp.asarray(window[:, 1:])


def train(model, steps, batch_size, seqlen, learning_rate):
    """Returns the loss of every step and tokens/s over the steps after the first."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer = optax.adam(learning_rate)
    opt_state = optimizer.init(params)

    def loss_fn(params, inputs, targets):
        logits = nnx.merge(graphdef, params, rest)(inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, inputs, targets):
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    data = np.frombuffer(TEXT.encode(), np.uint8).astype(np.int32)
    losses, start = [], None
    for index, (inputs, targets) in zip(range(steps), batches(data, batch_size, seqlen, seed=0)):
        params, opt_state, loss = step(params, opt_state, inputs, targets)
        losses.append(float(loss))  # waits for the step, so the clock below is honest
        if index == 0:
            start = time.perf_counter()  # the first step includes compilation
    elapsed = time.perf_counter() - start if steps > 1 else float("nan")
    tokens_per_second = (steps - 1) * batch_size * seqlen / elapsed if steps > 1 else float("nan")
    return losses, tokens_per_second


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--width", type=int, default=64, help="model width")
    parser.add_argument("--num-heads", type=int, default=4, help="head_dim = width / heads")
    parser.add_argument("--depth", type=int, default=2, help="number of blocks")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="largest allowed loss difference (default: 1e-3 in float32, "
                             "5e-2 in bfloat16)")
    args = parser.parse_args(argv)

    on_gpu = jax.default_backend() == "gpu"
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    tolerance = args.tolerance or (5e-2 if on_gpu else 1e-3)
    build = functools.partial(GPT, seqlen=args.seqlen, width=args.width,
                              num_heads=args.num_heads, depth=args.depth, dtype=dtype)
    flash_model = build(attention=MultiHeadAttention, rngs=nnx.Rngs(0))
    plain_model = build(attention=nnx.MultiHeadAttention, rngs=nnx.Rngs(1))
    # Identical initial weights; copies, since each training loop donates its buffers.
    nnx.update(plain_model, jax.tree.map(jnp.copy, nnx.state(flash_model, nnx.Param)))

    print(f"backend: {jax.default_backend()}, dtype: {jnp.dtype(dtype).name}, "
          f"{args.steps} steps of {args.batch_size} x {args.seqlen} tokens, width "
          f"{args.width}, {args.num_heads} heads, {args.depth} blocks")
    flash_losses, flash_speed = train(flash_model, args.steps, args.batch_size, args.seqlen,
                                      args.learning_rate)
    plain_losses, plain_speed = train(plain_model, args.steps, args.batch_size, args.seqlen,
                                      args.learning_rate)

    print(f"{'step':>5} {'jax_flash':>10} {'plain':>10}")
    every = max(1, args.steps // 20)
    for index, (ours, theirs) in enumerate(zip(flash_losses, plain_losses)):
        if index % every == 0 or index == args.steps - 1:
            print(f"{index:>5} {ours:>10.4f} {theirs:>10.4f}")
    difference = max(abs(a - b) for a, b in zip(flash_losses, plain_losses))
    print(f"tokens/s: jax_flash {flash_speed:,.0f}, plain {plain_speed:,.0f}")
    print(f"max loss difference: {difference:.2e} (tolerance {tolerance:.0e})")
    if not difference <= tolerance:
        print("the loss curves disagree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
