"""Ring and Ulysses attention on fake CPU devices against the one-device op and float64.

conftest.py gives the process eight CPU devices. Inputs are permuted into the sharded
order with sequence_permutation, results permuted back before comparing.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import jax_flash as jf
from helpers import (DTYPES, alibi_slopes_for, assert_within_twice_plain, flash, random_qkv,
                     reference, to64)

pytestmark = pytest.mark.skipif(
    len(jax.devices("cpu")) < 8, reason="needs 8 CPU devices (conftest sets XLA_FLAGS)")

MASKS = {
    "none": dict(),
    "causal": dict(causal=True),
    "window": dict(window_size=(7, 3)),
    "causal_window_softcap": dict(causal=True, window_size=(11, -1), softcap=3.0),
}


def mesh_of(num_devices):
    return Mesh(np.array(jax.devices("cpu")[:num_devices]), ("sp",))


@functools.lru_cache(maxsize=None)
def parallel_fn(method, num_devices, layout, mask_name, extra_names=()):
    """The jitted method on global arrays; extra_names: array keywords passed after v."""
    mesh = mesh_of(num_devices)
    kwargs = dict(MASKS[mask_name], layout=layout, return_lse=True)

    def run(q, k, v, *extra):
        return jf.sequence_parallel_attention(q, k, v, mesh, "sp", method=method, **kwargs,
                                              **dict(zip(extra_names, extra)))

    return jax.jit(run)


def losses(fn, perm=None):
    """A scalar through out and lse, with fixed cotangents given in global order."""

    def loss(q, k, v, out_cot, lse_cot, *extra):
        out, lse = fn(q, k, v, *extra)
        if perm is not None:  # bring the one-device result into the sharded order
            out, lse = out[:, perm], lse[:, :, perm]
        lse = jnp.where(jnp.isinf(lse), 0.0, lse)
        return jnp.sum(out.astype(jnp.float64) * out_cot) + jnp.sum(lse * lse_cot)

    return loss


def packed_segment_ids(rng, batch, seqlen, documents, shuffled=False):
    """(batch, seqlen) int32 ids of `documents` packed documents of random lengths per row
    (sorted ids), or, shuffled, ids drawn at random per position."""
    if shuffled:
        return jnp.asarray(rng.integers(0, documents, (batch, seqlen)), jnp.int32)
    rows = []
    for _ in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, seqlen), documents - 1, replace=False))
        rows.append(np.searchsorted(cuts, np.arange(seqlen), side="right"))
    return jnp.asarray(np.stack(rows), jnp.int32)


def extra_arrays(seed, shape, with_alibi, segments):
    """Global array keywords: ALiBi slopes (with_alibi: "heads" or "batch") and segment ids
    (segments: None, "packed" or "shuffled")."""
    batch, seqlen_q, seqlen_k, heads = shape[:4]
    extra = {}
    if with_alibi:
        extra["alibi_slopes"] = alibi_slopes_for(heads, batch if with_alibi == "batch" else None)
    if segments:
        rng, shuffled = np.random.default_rng(seed + 2), segments == "shuffled"
        extra["q_segment_ids"] = packed_segment_ids(rng, batch, seqlen_q, 3, shuffled)
        extra["kv_segment_ids"] = (extra["q_segment_ids"] if seqlen_q == seqlen_k else
                                   packed_segment_ids(rng, batch, seqlen_k, 3, shuffled))
    return extra


def check(method, num_devices, layout, mask_name, shape, dtype=jnp.float32, seed=0,
          with_alibi=None, segments=None):
    batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim = shape
    q, k, v = random_qkv(seed, *shape, dtype)
    perm_q = jf.sequence_permutation(seqlen_q, num_devices, layout)
    perm_k = jf.sequence_permutation(seqlen_k, num_devices, layout)
    extra = extra_arrays(seed, shape, with_alibi, segments)
    kwargs = dict(MASKS[mask_name], **extra)
    # The ids follow the sequence into the sharded order; the slopes are per head.
    order = {"q_segment_ids": perm_q, "kv_segment_ids": perm_k}
    sharded = tuple(x[:, order[name]] if name in order else x for name, x in extra.items())
    fn = parallel_fn(method, num_devices, layout, mask_name, tuple(extra))

    out, lse = fn(q[:, perm_q], k[:, perm_k], v[:, perm_k], *sharded)
    inverse = np.argsort(perm_q)
    out, lse = out[:, inverse], lse[:, :, inverse]
    assert out.dtype == q.dtype and lse.shape == (batch, heads, seqlen_q)
    one_device = flash(q, k, v, return_lse=True, **kwargs)
    exact = reference(*map(to64, (q, k, v)), return_lse=True, **kwargs)
    plain = reference(q, k, v, return_lse=True, **kwargs)
    for name, ours, single, ex, pl in zip(("out", "lse"), (out, lse), one_device, exact, plain):
        assert_within_twice_plain(name, ours, pl, ex, dtype if name == "out" else jnp.float32)
        np.testing.assert_array_equal(np.isinf(np.asarray(ours)), np.isinf(np.asarray(single)))

    rng = np.random.default_rng(seed + 1)
    out_cot = jnp.asarray(rng.standard_normal(q.shape))[:, perm_q]
    lse_cot = jnp.asarray(rng.standard_normal(lse.shape))[:, :, perm_q]
    grads = jax.jit(jax.grad(losses(fn), argnums=(0, 1, 2)))(
        q[:, perm_q], k[:, perm_k], v[:, perm_k], out_cot, lse_cot, *sharded)
    single = lambda q, k, v: reference(q, k, v, return_lse=True, **kwargs)  # noqa: E731
    grad_ref = jax.jit(jax.grad(losses(single, perm_q), argnums=(0, 1, 2)))
    exact_grads = grad_ref(*map(to64, (q, k, v)), out_cot, lse_cot)
    plain_grads = grad_ref(q, k, v, out_cot, lse_cot)
    for name, g, ex, pl, perm in zip(("dq", "dk", "dv"), grads, exact_grads, plain_grads,
                                     (perm_q, perm_k, perm_k)):
        assert g.dtype == dtype
        assert_within_twice_plain(name, g[:, np.argsort(perm)], pl, ex, dtype)


# (batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim): global lengths.
GQA = (2, 64, 64, 4, 2, 16)


@pytest.mark.parametrize("mask_name", MASKS)
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_ring_four_devices(layout, mask_name):
    check("ring", 4, layout, mask_name, GQA)


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("mask_name", ["causal", "causal_window_softcap"])
def test_ring_eight_devices_mqa_odd_chunks(layout, mask_name):
    check("ring", 8, layout, mask_name, (1, 80, 80, 3, 1, 24))  # zigzag chunks of 5


@pytest.mark.parametrize("mask_name", ["causal", "window"])
def test_ring_unequal_lengths_bottom_right(mask_name):
    # Cross attention with global lengths 48 and 96: masks align bottom-right globally.
    check("ring", 4, "zigzag", mask_name, (2, 48, 96, 2, 2, 16))
    check("ring", 2, "contiguous", mask_name, (1, 96, 48, 2, 1, 16))


@pytest.mark.parametrize("num_devices", [1, 2])
def test_ring_small_meshes(num_devices):
    check("ring", num_devices, "zigzag", "causal", (1, 36, 36, 2, 2, 32))


def test_ring_bfloat16():
    check("ring", 4, "zigzag", "causal", GQA, dtype=jnp.bfloat16)


@pytest.mark.parametrize("mask_name", ["causal", "window"])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_ulysses(layout, mask_name):
    check("ulysses", 2, layout, mask_name, GQA)


def test_ulysses_more_devices_than_kv_heads_with_alibi():
    check("ulysses", 4, "zigzag", "causal_window_softcap", (2, 64, 64, 8, 2, 16),
          with_alibi="heads")


def dropout_masks(method, key, p, batch, heads, seqlen_q, seqlen_k, num_devices, layout):
    """The mask a method draws from `key` over the whole sequence, in global order: Ulysses
    draws flash_attn_func's, ring attention one per chunk pair (ring_dropout_mask)."""
    if method == "ulysses":
        return jf.dropout_mask(key, p, batch, heads, seqlen_q, seqlen_k)
    return jf.ring_dropout_mask(key, p, batch, heads, seqlen_q, seqlen_k, num_devices, layout)


@pytest.mark.parametrize("mask_name", ["none", "causal", "causal_window_softcap"])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("method", ["ulysses", "ring"])
def test_dropout_against_the_methods_masks(method, layout, mask_name):
    """Ring and Ulysses attention with dropout against the float64 reference under the mask
    the method documents for the key, forward and gradients."""
    check_dropout(method, layout, mask_name, None, seqlen_q=64, seqlen_k=64)


@pytest.mark.parametrize("method", ["ulysses", "ring"])
def test_dropout_with_the_batch_sharded_too(method):
    """Each batch shard draws the masks of the key folded with its index."""
    check_dropout(method, "zigzag", "causal_window_softcap", "data", seqlen_q=64, seqlen_k=64)


@pytest.mark.parametrize("seqlen_q, seqlen_k", [(32, 64), (64, 32)])
def test_ring_dropout_unequal_lengths_with_alibi(seqlen_q, seqlen_k):
    check_dropout("ring", "zigzag", "causal", None, seqlen_q, seqlen_k, with_alibi=True)


def check_dropout(method, layout, mask_name, batch_axis, seqlen_q, seqlen_k, with_alibi=False):
    batch, heads, heads_kv, head_dim, p = 2, 8, 2, 16, 0.25
    num_devices = 4
    q, k, v = random_qkv(11, batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim, jnp.float32)
    perm_q = jf.sequence_permutation(seqlen_q, num_devices, layout)
    perm_k = jf.sequence_permutation(seqlen_k, num_devices, layout)
    key = jax.random.key(21)
    masks = functools.partial(dropout_masks, method, p=p, heads=heads, seqlen_q=seqlen_q,
                              seqlen_k=seqlen_k, num_devices=num_devices, layout=layout)
    if batch_axis is None:
        mesh = mesh_of(num_devices)
        mask = masks(key=key, batch=batch)
    else:
        mesh = Mesh(np.array(jax.devices("cpu")[:2 * num_devices]).reshape(2, num_devices),
                    ("data", "sp"))
        mask = jnp.concatenate([masks(key=jax.random.fold_in(key, shard), batch=1)
                                for shard in range(2)])
    kwargs = dict(MASKS[mask_name])
    if with_alibi:
        kwargs["alibi_slopes"] = alibi_slopes_for(heads)

    def parallel(q, k, v, key):
        return jf.sequence_parallel_attention(
            q, k, v, mesh, "sp", method=method, batch_axis=batch_axis, layout=layout,
            return_lse=True, dropout_p=p, dropout_key=key, **kwargs)

    def single(q, k, v):
        return reference(q, k, v, return_lse=True, dropout_mask=mask,
                         dropout_scale=jf.dropout.keep_scale(p), **kwargs)

    inverse = np.argsort(perm_q)
    out, lse = jax.jit(parallel)(q[:, perm_q], k[:, perm_k], v[:, perm_k], key)
    exact = single(*map(to64, (q, k, v)))
    plain = single(q, k, v)
    assert_within_twice_plain("out", out[:, inverse], plain[0], exact[0], jnp.float32)
    assert_within_twice_plain("lse", lse[:, :, inverse], plain[1], exact[1], jnp.float32)
    no_dropout = reference(q, k, v, **kwargs)
    assert float(jnp.max(jnp.abs(out[:, inverse] - no_dropout))) > 0.05  # masks were drawn

    rng = np.random.default_rng(12)
    out_cot = jnp.asarray(rng.standard_normal(q.shape))[:, perm_q]
    lse_cot = jnp.asarray(rng.standard_normal(lse.shape))[:, :, perm_q]
    grads = jax.jit(jax.grad(losses(lambda q, k, v: parallel(q, k, v, key)), argnums=(0, 1, 2)))(
        q[:, perm_q], k[:, perm_k], v[:, perm_k], out_cot, lse_cot)
    grad_ref = jax.jit(jax.grad(losses(single, perm_q), argnums=(0, 1, 2)))
    exact_grads = grad_ref(*map(to64, (q, k, v)), out_cot, lse_cot)
    plain_grads = grad_ref(q, k, v, out_cot, lse_cot)
    for name, g, ex, pl, perm in zip(("dq", "dk", "dv"), grads, exact_grads, plain_grads,
                                     (perm_q, perm_k, perm_k)):
        assert_within_twice_plain(name, g[:, np.argsort(perm)], pl, ex, jnp.float32)


def test_ring_dropout_mask_draws_each_chunk_pair_apart():
    """Every element is its own draw: the keep rate is 1 - p, and no two chunk pairs (nor
    two keys, nor the batch rows) repeat one mask."""
    p, chunks, size = 0.3, 8, 16
    mask = np.asarray(jf.ring_dropout_mask(jax.random.key(5), p, 2, 3, chunks * size,
                                           chunks * size, 4, "zigzag"))
    assert mask.shape == (2, 3, chunks * size, chunks * size)
    assert abs(mask.mean() - (1 - p)) < 0.01
    blocks = mask.reshape(2, 3, chunks, size, chunks, size).transpose(0, 1, 2, 4, 3, 5)
    blocks = blocks.reshape(2, 3, chunks * chunks, size * size)
    for b in range(2):
        for h in range(3):
            agreement = (blocks[b, h][:, None] == blocks[b, h][None]).mean(-1)
            off_diagonal = agreement[~np.eye(chunks * chunks, dtype=bool)]
            # Independent pairs agree on p^2 + (1 - p)^2 = 0.58 of their elements.
            assert off_diagonal.max() < 0.75, off_diagonal.max()
    assert (mask[0] != mask[1]).mean() > 0.3
    other_key = np.asarray(jf.ring_dropout_mask(jax.random.key(6), p, 2, 3, chunks * size,
                                                chunks * size, 4, "zigzag"))
    assert (mask != other_key).mean() > 0.3


@pytest.mark.parametrize("mask_name", ["none", "causal", "causal_window_softcap"])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_ring_alibi(layout, mask_name):
    # Every block pair keeps its own diagonal, from which the bias counts the distance.
    check("ring", 4, layout, mask_name, GQA, with_alibi="batch")


def test_ring_alibi_unequal_lengths():
    check("ring", 4, "zigzag", "causal", (2, 48, 96, 2, 1, 16), with_alibi="heads")


@pytest.mark.parametrize("segments", ["packed", "shuffled"])
@pytest.mark.parametrize("mask_name", ["none", "causal", "window"])
@pytest.mark.parametrize("method,layout", [("ring", "zigzag"), ("ring", "contiguous"),
                                           ("ulysses", "zigzag")])
def test_segment_ids(method, layout, mask_name, segments):
    check(method, 4, layout, mask_name, (2, 64, 64, 4, 2, 16), segments=segments)


@pytest.mark.parametrize("method", ["ring", "ulysses"])
def test_segment_ids_unequal_lengths_with_alibi(method):
    # Cross attention: query documents whose ids meet no visible key get empty rows.
    check(method, 2, "zigzag", "causal", (2, 48, 96, 4, 2, 16), with_alibi="heads",
          segments="packed")


def test_ring_inside_users_shard_map_with_vma_checks():
    """Called directly in a shard_map with the default check_vma=True, batch sharded too."""
    mesh = Mesh(np.array(jax.devices("cpu")[:8]).reshape(2, 4), ("dp", "sp"))
    q, k, v = random_qkv(5, 2, 64, 64, 2, 2, 16, jnp.float32)
    perm = jf.sequence_permutation(64, 4, "zigzag")
    spec = P("dp", "sp", None, None)

    @jax.jit
    def loss(q, k, v):
        out = jax.shard_map(
            lambda q, k, v: jf.ring_attention(q, k, v, "sp", causal=True), mesh=mesh,
            in_specs=(spec,) * 3, out_specs=spec)(q, k, v)
        return jnp.sum(out ** 2), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
        q[:, perm], k[:, perm], v[:, perm])
    (_, expected), expected_grads = jax.value_and_grad(
        lambda q, k, v: (jnp.sum(flash(q, k, v, causal=True) ** 2),
                         flash(q, k, v, causal=True)), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    np.testing.assert_allclose(np.asarray(out)[:, np.argsort(perm)], expected, atol=2e-6)
    for g, e in zip(grads, expected_grads):
        np.testing.assert_allclose(np.asarray(g)[:, np.argsort(perm)], e, atol=2e-5)


def test_ring_step_plans_balance_causal_work():
    """Zigzag gives every device the same causal work at every step; contiguous does not."""
    from jax_flash.sequence_parallel import _Ring
    from jax_flash._config import KernelConfig

    config = KernelConfig(1.0, 0.0, -1, 0, 0, False)
    for layout, balanced in (("zigzag", True), ("contiguous", False)):
        ring = _Ring(config, "sp", 4, layout, 64, 64)
        for plans, index in ring.steps[1:]:
            work = [sum(len(c.q_pieces) * len(c.k_pieces) for c in plans[i]) for i in index]
            assert (len(set(work)) == 1) == balanced, (layout, work)


def test_sequence_permutation():
    np.testing.assert_array_equal(jf.sequence_permutation(8, 2, "contiguous"), np.arange(8))
    np.testing.assert_array_equal(jf.sequence_permutation(8, 2, "zigzag"),
                                  [0, 1, 6, 7, 2, 3, 4, 5])
    np.testing.assert_array_equal(jf.sequence_permutation(6, 1, "zigzag"), np.arange(6))
    for n in (2, 4, 8):
        perm = jf.sequence_permutation(16 * n, n)
        assert sorted(perm.tolist()) == list(range(16 * n))


@pytest.mark.parametrize("call,match", [
    (lambda: jf.sequence_permutation(10, 4), "divisible by 8"),
    (lambda: jf.sequence_permutation(16, 4, "striped"), "layout must be one of"),
    (lambda: jf.sequence_permutation(16, 0), "num_devices must be a positive int"),
])
def test_permutation_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_errors():
    q, k, v = random_qkv(0, 1, 32, 32, 6, 2, 16, jnp.float32)
    with pytest.raises(ValueError, match="axis_name 'sp' is not a mesh axis bound here"):
        jf.ring_attention(q, k, v, "sp")
    mesh = mesh_of(4)
    with pytest.raises(ValueError, match="layout must be one of"):
        jf.sequence_parallel_attention(q, k, v, mesh, "sp", layout="striped")
    with pytest.raises(ValueError, match="num_heads \\(6\\) must be divisible"):
        jf.sequence_parallel_attention(q, k, v, mesh, "sp", method="ulysses")
    with pytest.raises(ValueError, match="not an axis of the mesh"):
        jf.sequence_parallel_attention(q, k, v, mesh, "tp")
    with pytest.raises(ValueError, match="method must be one of"):
        jf.sequence_parallel_attention(q, k, v, mesh, "sp", method="tree")
    q, k, v = random_qkv(0, 1, 36, 36, 2, 2, 16, jnp.float32)  # 9 per device: odd
    with pytest.raises(ValueError, match="must be divisible by 2 for layout 'zigzag'"):
        jf.sequence_parallel_attention(q, k, v, mesh, "sp")
    q, k, v = random_qkv(0, 1, 32, 32, 4, 3, 16, jnp.float32)
    with pytest.raises(ValueError, match="must be a multiple of the number of key/value heads"):
        jf.sequence_parallel_attention(q, k, v, mesh, "sp")
    q, k, v = random_qkv(0, 1, 32, 32, 4, 2, 16, jnp.float32)
    ids = jnp.zeros((1, 32), jnp.int32)
    for method in ("ring", "ulysses"):
        with pytest.raises(ValueError, match="must be given together"):
            jf.sequence_parallel_attention(q, k, v, mesh, "sp", method=method, q_segment_ids=ids)
        with pytest.raises(ValueError, match=r"kv_segment_ids must have shape \(batch, seqlen_k\)"
                                             r" = \(1, 8\), got \(2, 8\)"):
            jf.sequence_parallel_attention(q, k, v, mesh, "sp", method=method, q_segment_ids=ids,
                                           kv_segment_ids=jnp.zeros((2, 32), jnp.int32))
        with pytest.raises(TypeError, match="alibi_slopes must be float32"):
            jf.sequence_parallel_attention(q, k, v, mesh, "sp", method=method,
                                           alibi_slopes=jnp.ones((4,), jnp.float16))
        with pytest.raises(ValueError, match="alibi_slopes must have shape"):
            jf.sequence_parallel_attention(q, k, v, mesh, "sp", method=method,
                                           alibi_slopes=jnp.ones((3,), jnp.float32))
    with pytest.raises(ValueError, match="dropout_p > 0 needs dropout_key"):
        jf.sequence_parallel_attention(q, k, v, mesh, "sp", dropout_p=0.1)
    with pytest.raises(ValueError, match="must be divisible by 8 for layout 'zigzag'"):
        jf.ring_dropout_mask(jax.random.key(0), 0.1, 1, 2, 60, 64, 4)
    with pytest.raises(ValueError, match="dropout_p > 0 needs dropout_key"):
        jf.sequence_parallel_attention(q, k, v, mesh, "sp", method="ulysses", dropout_p=0.1)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        jf.sequence_parallel_attention(q, k, v, mesh, "sp", method="ulysses", dropout_p=1.5,
                                       dropout_key=jax.random.key(0))


def test_pmap_users():
    """flash_attn_func under pmap, and ring_attention over a pmap axis, with gradients."""
    n, seqlen = 4, 64
    q, k, v = random_qkv(9, 1, seqlen, seqlen, 4, 2, 16, jnp.float32)
    perm = jf.sequence_permutation(seqlen, n, "zigzag")
    split = lambda x: jnp.swapaxes(x[:, perm].reshape(1, n, seqlen // n, *x.shape[2:]), 0, 1)  # noqa: E731
    join = lambda x: jnp.swapaxes(x, 0, 1).reshape(1, seqlen, *x.shape[3:])[:, np.argsort(perm)]  # noqa: E731
    devices = jax.devices("cpu")[:n]

    def loss(q, k, v):
        return jnp.sum(jf.ring_attention(q, k, v, "sp", causal=True) ** 2)

    ring = jax.pmap(lambda q, k, v: jf.ring_attention(q, k, v, "sp", causal=True),
                    axis_name="sp", devices=devices)
    grads = jax.pmap(jax.grad(loss, argnums=(0, 1, 2)), axis_name="sp", devices=devices)(
        split(q), split(k), split(v))
    expected_grads = jax.grad(lambda q, k, v: jnp.sum(flash(q, k, v, causal=True) ** 2),
                              argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(join(ring(split(q), split(k), split(v))),
                               flash(q, k, v, causal=True), atol=2e-6)
    for g, e in zip(grads, expected_grads):
        np.testing.assert_allclose(join(g), e, atol=2e-5)

    batched = jax.pmap(lambda q, k, v: jf.flash_attn_func(q, k, v, causal=True), devices=devices)
    per_device = [random_qkv(s, 2, 24, 24, 4, 2, 16, jnp.float32) for s in range(n)]
    stacked = [jnp.stack(x) for x in zip(*per_device)]
    for i, out in enumerate(batched(*stacked)):
        np.testing.assert_array_equal(out, flash(*per_device[i], causal=True))


@pytest.mark.parametrize("window_size", [(2**63 - 1, 2**63 - 1), (-1, 2**64), (2**40, 2**40)])
def test_ring_window_sides_past_the_sequence_mean_unbounded(window_size):
    """Sides no distance reaches become unbounded before the kernels (no int64 overflow):
    bit for bit the call without a window."""
    mesh = mesh_of(4)
    q, k, v = random_qkv(3, *GQA, jnp.float32)

    def ring(window):
        return jax.jit(lambda q, k, v: jf.sequence_parallel_attention(
            q, k, v, mesh, "sp", method="ring", window_size=window))(q, k, v)

    np.testing.assert_array_equal(np.asarray(ring(window_size)), np.asarray(ring((-1, -1))))
