"""Sequence parallelism: ring attention and Ulysses on 8 devices (fake CPU devices here).

Run: python examples/ring_attention.py     (on a GPU host, pass --gpu to use the real GPUs)

A causal sequence of 8 x 512 tokens is split over 8 devices in the zigzag order, where
each device holds chunks i and 15 - i, so that causal attention costs every device the
same. The results are checked against one-device flash_attn_func.
"""

import argparse
import os
import sys

if "--gpu" not in sys.argv:
    # Must happen before JAX starts: 8 CPU devices stand in for 8 accelerators.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8")
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import jax_flash as jf  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--gpu", action="store_true", help="use the GPUs JAX finds")
parser.add_argument("--seqlen", type=int, default=8 * 512)
args = parser.parse_args()

devices = jax.devices()
n = len(devices)
mesh = Mesh(np.array(devices), ("seq",))
dtype = jnp.bfloat16 if devices[0].platform == "gpu" else jnp.float32
batch, heads, heads_kv, head_dim = 1, 8, 8, 64
keys = jax.random.split(jax.random.key(0), 3)
q = jax.random.normal(keys[0], (batch, args.seqlen, heads, head_dim), dtype)
k = jax.random.normal(keys[1], (batch, args.seqlen, heads_kv, head_dim), dtype)
v = jax.random.normal(keys[2], (batch, args.seqlen, heads_kv, head_dim), dtype)

# 1. Put the sequence into the zigzag order and shard it. Positions (for rotary embeddings,
#    targets, ...) follow with the same permutation: positions = perm.
perm = jf.sequence_permutation(args.seqlen, n, "zigzag")
sharding = NamedSharding(mesh, P(None, "seq", None, None))
q_sp, k_sp, v_sp = (jax.device_put(x[:, perm], sharding) for x in (q, k, v))


# 2a. Inside your own shard_map: ring_attention sees the local blocks.
@jax.jit
def ring_loss(q, k, v):
    def local(q, k, v):
        return jf.ring_attention(q, k, v, "seq", causal=True, layout="zigzag")

    spec = P(None, "seq", None, None)
    out = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)(q, k, v)
    return jnp.mean(out.astype(jnp.float32) ** 2), out


(loss, out_ring), grads = jax.value_and_grad(ring_loss, argnums=(0, 1, 2), has_aux=True)(
    q_sp, k_sp, v_sp)

# 2b. Or let jax_flash apply the shard_map: the same with Ulysses (all-to-all over heads).
out_ulysses = jax.jit(lambda q, k, v: jf.sequence_parallel_attention(
    q, k, v, mesh, "seq", method="ulysses", causal=True, layout="zigzag"))(q_sp, k_sp, v_sp)

# 3. Compare with one device, in global order.
inverse = np.argsort(perm)
expected = jf.flash_attn_func(q, k, v, causal=True)
for name, out in (("ring", out_ring), ("ulysses", out_ulysses)):
    error = jnp.max(jnp.abs(out[:, inverse].astype(jnp.float32) - expected.astype(jnp.float32)))
    print(f"{name:8s} on {n} {devices[0].platform} devices: out {out.shape}, sharding "
          f"{out.sharding.spec}, max |difference| from one device {float(error):.2e}")
print(f"ring loss {float(loss):.6f}; dq {grads[0].shape} sharded as {grads[0].sharding.spec}")

# 4. Attention dropout in training: the same key on every device. Ring attention draws one
#    mask per (query chunk, key chunk) pair; jf.ring_dropout_mask shows the whole mask.
dropout_key = jax.random.key(1)
out_dropout = jax.jit(lambda q, k, v, key: jf.sequence_parallel_attention(
    q, k, v, mesh, "seq", method="ring", causal=True, layout="zigzag", dropout_p=0.1,
    dropout_key=key))(q_sp, k_sp, v_sp, dropout_key)
mask = jf.ring_dropout_mask(dropout_key, 0.1, batch, heads, args.seqlen, args.seqlen, n)
visible = np.tril(np.ones((args.seqlen, args.seqlen), bool))
print(f"ring with dropout 0.1: out {out_dropout.shape}; the mask keeps "
      f"{float(jnp.mean(mask[:, :, visible])):.3f} of the visible probabilities")
