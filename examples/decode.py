"""Greedy generation with a KV cache: a toy 2-layer transformer (random weights, GQA, rotary)
prefills a batch of prompts of different lengths, then decodes one token per step with
jf.flash_attn_with_kvcache under jit, the caches donated so XLA updates them in place.

At the end every sequence is recomputed without a cache (jf.flash_attn_func over the whole
sequence), and the logits that chose each generated token are compared. Runs on CPU
(float32) and GPU (bfloat16):

    python examples/decode.py [--tokens 32] [--paged]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_flash as jf

VOCAB, WIDTH, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 256, 128, 4, 2, 32, 2
PAGE_SIZE = 16


def init_params(key):
    def dense(key, fan_in, fan_out):
        return jax.random.normal(key, (fan_in, fan_out)) / np.sqrt(fan_in)

    keys = iter(jax.random.split(key, 2 + 6 * LAYERS))
    layers = [dict(wq=dense(next(keys), WIDTH, HEADS * HEAD_DIM),
                   wk=dense(next(keys), WIDTH, KV_HEADS * HEAD_DIM),
                   wv=dense(next(keys), WIDTH, KV_HEADS * HEAD_DIM),
                   wo=dense(next(keys), HEADS * HEAD_DIM, WIDTH),
                   w1=dense(next(keys), WIDTH, 4 * WIDTH),
                   w2=dense(next(keys), 4 * WIDTH, WIDTH)) for _ in range(LAYERS)]
    return dict(embed=jax.random.normal(next(keys), (VOCAB, WIDTH)),
                unembed=dense(next(keys), WIDTH, VOCAB), layers=layers)


def rotary_tables(max_len):
    inv_freq = 1.0 / 10000 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    angles = np.arange(max_len)[:, None] * inv_freq[None, :]
    return jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)


def rms_norm(x):
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 ** 2, -1, keepdims=True) + 1e-6)).astype(x.dtype)


def block(x, layer, attend):
    """One pre-norm transformer block; attend(q, k, v) does the attention."""
    batch, length, _ = x.shape
    h = rms_norm(x)
    q = (h @ layer["wq"]).reshape(batch, length, HEADS, HEAD_DIM)
    k = (h @ layer["wk"]).reshape(batch, length, KV_HEADS, HEAD_DIM)
    v = (h @ layer["wv"]).reshape(batch, length, KV_HEADS, HEAD_DIM)
    out = attend(q, k, v)
    x = x + out.reshape(batch, length, HEADS * HEAD_DIM) @ layer["wo"]
    return x + jax.nn.gelu(rms_norm(x) @ layer["w1"]) @ layer["w2"]


def step_with_cache(params, tokens, caches, cache_seqlens, block_table, rotary):
    """Logits of tokens (batch, n) at positions cache_seqlens[b].. of each row, appending
    their keys and values to the caches: [(k_cache, v_cache)] per layer."""
    cos, sin = rotary
    x = params["embed"][tokens]
    new_caches = []
    for layer, (k_cache, v_cache) in zip(params["layers"], caches):
        def attend(q, k, v, k_cache=k_cache, v_cache=v_cache):
            out, k_cache, v_cache = jf.flash_attn_with_kvcache(
                q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin,
                cache_seqlens=cache_seqlens, block_table=block_table, causal=True,
                rotary_interleaved=False)
            new_caches.append((k_cache, v_cache))
            return out

        x = block(x, layer, attend)
    return rms_norm(x) @ params["unembed"], new_caches


def rotate(x, cos, sin):
    """GPT-NeoX rotary at positions 0.. (what the cache call does at the cache positions)."""
    half = HEAD_DIM // 2
    c, s = cos[: x.shape[1], None, :], sin[: x.shape[1], None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], -1).astype(x.dtype)


def logits_without_cache(params, tokens, rotary):
    """The whole sequence at once, with plain causal flash attention."""
    cos, sin = rotary
    x = params["embed"][tokens]
    for layer in params["layers"]:
        x = block(x, layer, lambda q, k, v: jf.flash_attn_func(
            rotate(q, cos, sin), rotate(k, cos, sin), v, causal=True))
    return rms_norm(x) @ params["unembed"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32, help="tokens to generate per row")
    parser.add_argument("--prompt", type=int, default=24, help="longest prompt")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--paged", action="store_true", help="a paged cache (16-key pages)")
    args = parser.parse_args()

    dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    params = jax.tree.map(lambda w: w.astype(dtype), init_params(jax.random.key(0)))
    rng = np.random.default_rng(0)
    # Rows of different lengths, right-padded: each row's cache_seqlens is its own length.
    lengths = np.maximum(args.prompt - 5 * np.arange(args.batch), 1)
    prompts = rng.integers(0, VOCAB, (args.batch, args.prompt))
    max_len = args.prompt + args.tokens
    rotary = rotary_tables(max_len)

    shape = (args.batch, max_len, KV_HEADS, HEAD_DIM)
    block_table = None
    if args.paged:
        blocks = -(-max_len // PAGE_SIZE)
        shape = (args.batch * blocks + 4, PAGE_SIZE, KV_HEADS, HEAD_DIM)  # a shared pool
        block_table = jnp.asarray(rng.permutation(shape[0])[:args.batch * blocks]
                                  .reshape(args.batch, blocks), jnp.int32)
    caches = [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(LAYERS)]

    step = jax.jit(step_with_cache, donate_argnums=(2,))  # the caches are updated in place
    # Prefill: all prompt tokens at once (the padding too; the next steps overwrite it).
    logits, caches = step(params, jnp.asarray(prompts), caches, jnp.zeros(args.batch, jnp.int32),
                          block_table, rotary)
    chosen = [logits[np.arange(args.batch), lengths - 1]]
    token = jnp.argmax(chosen[-1], -1)
    generated = [token]
    cache_seqlens = jnp.asarray(lengths, jnp.int32)
    start = None
    for i in range(args.tokens - 1):
        if i == 1:
            jax.block_until_ready(token)
            start = time.perf_counter()  # after the decode step's compilation
        logits, caches = step(params, token[:, None], caches, cache_seqlens, block_table, rotary)
        chosen.append(logits[:, 0])
        token = jnp.argmax(chosen[-1], -1)
        generated.append(token)
        cache_seqlens = cache_seqlens + 1
    jax.block_until_ready(token)
    steps = args.tokens - 2
    if start is not None and steps > 0:
        rate = steps * args.batch / (time.perf_counter() - start)
        print(f"decode: {rate:.0f} tokens/s ({jax.default_backend()}, {jnp.dtype(dtype).name}, "
              f"batch {args.batch}, {'paged' if args.paged else 'contiguous'} cache)")

    generated = np.stack([np.asarray(t) for t in generated], 1)   # (batch, tokens)
    chosen = np.stack([np.asarray(c, np.float32) for c in chosen], 1)
    difference, agree = 0.0, True
    for b in range(args.batch):
        sequence = np.concatenate([prompts[b, :lengths[b]], generated[b]])
        full = logits_without_cache(params, jnp.asarray(sequence[None, :-1]), rotary)[0]
        expected = np.asarray(full[lengths[b] - 1:], np.float32)
        difference = max(difference, float(np.max(np.abs(expected - chosen[b]))))
        agree &= bool(np.all(np.argmax(expected, -1) == generated[b]))
        print(f"row {b}: prompt {lengths[b]} tokens -> {' '.join(map(str, generated[b][:12]))} ...")
    print(f"max |logit difference| (cache vs recompute): {difference:.3e}")
    print(f"greedy tokens agree: {agree}")


if __name__ == "__main__":
    main()
