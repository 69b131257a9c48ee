"""CUDA kernels against a float32 reference on the GPU: the CPU grid plus larger shapes.

Runs only where JAX has a GPU and jax_flash was built with its CUDA kernels; elsewhere
every test here is skipped with the reason.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash as jf
from jax_flash import dropout
from helpers import (alibi_slopes_for, assert_within_twice_plain, flash_offset, random_qkv,
                     reference_offset, run_selection_in_fresh_process)

GPU = [d for d in jax.devices() if d.platform == "gpu"] if jax.default_backend() == "gpu" else []
pytestmark = pytest.mark.skipif(
    not (GPU and jf.HAS_CUDA_KERNELS),
    reason="needs a GPU and a jax_flash build with CUDA kernels (JAX_FLASH_CUDA=ON)",
)

STATIC = ("softmax_scale", "causal", "window_size", "softcap", "return_lse")
flash = jax.jit(jf.flash_attn_func, static_argnames=STATIC)
flash_deterministic = jax.jit(functools.partial(jf.flash_attn_func, deterministic=True),
                              static_argnames=STATIC)
reference = jax.jit(jf.reference_attention, static_argnames=STATIC)

# (batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim)
SMALL = [(2, 1, 1, 2, 1, 16), (1, 17, 17, 4, 4, 40), (2, 17, 33, 4, 2, 64), (1, 33, 17, 4, 1, 24),
         (1, 130, 70, 2, 2, 7), (1, 70, 65, 2, 1, 256), (1, 1000, 1000, 2, 1, 64),
         (1, 1000, 377, 4, 2, 96)]
LARGE = [(2, 1024, 1024, 4, 4, 32), (1, 2048, 2048, 4, 2, 64), (1, 4096, 4096, 2, 1, 128),
         (1, 8192, 8192, 2, 2, 128), (1, 3000, 5000, 2, 1, 160), (1, 2048, 2048, 2, 2, 256)]
FEATURES = {
    "none": dict(),
    "causal": dict(causal=True),
    "window": dict(window_size=(100, 7)),
    "softcap_alibi": dict(softcap=4.0, alibi=True),
    "softcap_alibi_causal": dict(causal=True, softcap=4.0, alibi=True),
    "window_alibi": dict(window_size=(200, 50), alibi=True),
    # rows of thousands of keys under a window on both sides (the Hopper forward's long-row
    # tiles at head dims 64 and 128 once a row sees 2048 keys)
    "long_window_softcap_alibi": dict(window_size=(3000, 100), softcap=4.0, alibi=True),
    "segments_sorted_causal": dict(causal=True, segments="sorted"),
    "segments_random_softcap_alibi": dict(softcap=4.0, alibi=True, segments="random"),
    # softmax scales other than head_dim ** -0.5: another on the plain path, and a negative
    # one, which takes the general path (test_gpu_sm90.py's scale test)
    "scale_custom": dict(softmax_scale=0.3),
    "scale_negative_causal": dict(softmax_scale=-0.05, causal=True),
}


def segment_ids(kind, batch, seqlen, seed):
    """Sorted ids: five documents spread over the row (whatever its length); random: ids
    from {0, 1, 2} in any order."""
    if kind == "sorted":
        ids = np.arange(seqlen) * 5 // max(seqlen, 1)
        return jnp.asarray(np.broadcast_to(ids, (batch, seqlen)), jnp.int32)
    return jnp.asarray(np.random.default_rng(seed).integers(0, 3, (batch, seqlen)), jnp.int32)


def kwargs_for(feature, shape):
    kwargs = dict(FEATURES[feature])
    if kwargs.pop("alibi", False):
        kwargs["alibi_slopes"] = alibi_slopes_for(shape[3], batch=shape[0])
    kind = kwargs.pop("segments", None)
    if kind:
        kwargs["q_segment_ids"] = segment_ids(kind, shape[0], shape[1], seed=1)
        kwargs["kv_segment_ids"] = segment_ids(kind, shape[0], shape[2], seed=2)
    return kwargs


def exact(fn, *args):
    """fn on float32 inputs with float32 matmuls (XLA's GPU default would allow TF32)."""
    with jax.default_matmul_precision("highest"):
        return fn(*args)


def check(shape, feature, dtype, gradients, diagonal_offset=None, deterministic=False,
          dropout_p=0.0):
    q, k, v = random_qkv(sum(shape), *shape, dtype)
    kwargs = kwargs_for(feature, shape)
    ours_fn, reference_fn = (flash_deterministic if deterministic else flash), reference
    if diagonal_offset is not None:  # the private op with a moved mask diagonal
        ours_fn, reference_fn = flash_offset, reference_offset
        kwargs["diagonal_offset"] = diagonal_offset
    if dropout_p > 0:  # the reference applies the specified mask of the same key
        key = jax.random.key(sum(shape))
        ours_fn = functools.partial(jf.flash_attn_func, dropout_p=dropout_p, dropout_key=key,
                                    deterministic=deterministic)
        mask = jf.dropout_mask(key, dropout_p, shape[0], shape[3], shape[1], shape[2])
        reference_fn = functools.partial(jf.reference_attention, dropout_mask=mask,
                                         dropout_scale=dropout.keep_scale(dropout_p))
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    out, lse = ours_fn(q, k, v, return_lse=True, **kwargs)
    exact_out, exact_lse = exact(lambda *a: reference_fn(*a, return_lse=True, **kwargs), *f32)
    plain_out, _ = reference_fn(q, k, v, return_lse=True, **kwargs)
    assert_within_twice_plain("out", out, plain_out, exact_out, dtype)
    np.testing.assert_array_equal(np.isinf(np.asarray(lse)), np.isinf(np.asarray(exact_lse)))
    finite = np.isfinite(np.asarray(exact_lse))
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(exact_lse)[finite], atol=2e-2)
    if not gradients:
        return
    rng = np.random.default_rng(1)
    out_cot = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    lse_cot = jnp.asarray(rng.standard_normal(lse.shape), jnp.float32)

    def loss(fn):
        # Through out and lse, so the kernels' lse-gradient path is checked as well.
        def value(q, k, v):
            out, lse = fn(q, k, v, return_lse=True, **kwargs)
            lse = jnp.where(jnp.isinf(lse), 0.0, lse)
            return jnp.sum(out.astype(jnp.float32) * out_cot) + jnp.sum(lse * lse_cot)

        return jax.jit(jax.grad(value, argnums=(0, 1, 2)))

    ours = loss(ours_fn)(q, k, v)
    plain = loss(reference_fn)(q, k, v)
    exact_grads = exact(loss(reference_fn), *f32)
    for name, a, b, c in zip(("dq", "dk", "dv"), ours, plain, exact_grads):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert_within_twice_plain(name, a, b, c, dtype)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("feature", [f for f in FEATURES if not f.startswith(("long_", "scale_"))])
@pytest.mark.parametrize("shape", SMALL, ids=str)
def test_small_grid(shape, feature, dtype):
    check(shape, feature, dtype, gradients=True)


@pytest.mark.parametrize("feature", ["none", "causal", "segments_sorted_causal"])
@pytest.mark.parametrize("shape", LARGE, ids=str)
def test_large_shapes_bf16(shape, feature):
    check(shape, feature, jnp.bfloat16, gradients=True)


@pytest.mark.parametrize("head_dim", [8, 32, 64, 80, 96, 128, 160, 192, 256])
def test_every_head_dim_class(head_dim):
    check((2, 300, 257, 4, 2, head_dim), "causal", jnp.bfloat16, gradients=True)


A100_SMEM_LIMIT = 166912  # bytes of shared memory an sm80 CTA may opt into
SM86_SMEM_LIMIT = 101376  # the same on sm86 / sm89 (RTX 30xx / 40xx, L4, L40)


@pytest.mark.skipif("JAX_FLASH_CUDA_SMEM_LIMIT" in os.environ, reason="already a capped run")
@pytest.mark.parametrize("limit, selection", [
    (A100_SMEM_LIMIT, "test_every_head_dim_class"),
    (SM86_SMEM_LIMIT, "test_under_sm86_shared_memory"),
], ids=["sm80", "sm86"])
def test_tile_shapes_of_gpus_with_less_shared_memory(limit, selection):
    """The launchers pick smaller tiles where the GPU has less shared memory than Hopper.
    Those shapes run here, on this GPU, with the shared memory capped in a fresh process
    (the cap is read once per process); the subprocess must run its tests, not skip them."""
    run_selection_in_fresh_process(__file__, selection, JAX_FLASH_CUDA_SMEM_LIMIT=str(limit))


@pytest.mark.skipif(os.environ.get("JAX_FLASH_CUDA_SMEM_LIMIT") != str(SM86_SMEM_LIMIT),
                    reason="runs in the sm86-capped subprocess of "
                           "test_tile_shapes_of_gpus_with_less_shared_memory")
@pytest.mark.parametrize("head_dim", [32, 64, 96, 128, 256])
def test_under_sm86_shared_memory(head_dim):
    """With 99 KB per CTA the forward runs at every head dim and the backward up to 64;
    beyond that the backward is a clear error, not a crash or a wrong result."""
    shape = (2, 300, 257, 4, 2, head_dim)
    check(shape, "causal", jnp.bfloat16, gradients=head_dim <= 64)
    if head_dim <= 64:
        return
    q, k, v = random_qkv(1, *shape, jnp.bfloat16)
    loss = lambda q: jnp.sum(flash(q, k, v, causal=True).astype(jnp.float32))
    with pytest.raises(Exception, match="bytes of shared memory per block"):
        jax.block_until_ready(jax.grad(loss)(q))


@pytest.mark.parametrize("feature", ["causal", "window_alibi"])
@pytest.mark.parametrize("offset", [-700, -90, 0, 333, 1200])
def test_diagonal_offset(offset, feature):
    check((2, 300, 500, 4, 2, 128), feature, jnp.bfloat16, gradients=True, diagonal_offset=offset)


def test_float32_on_gpu_is_a_clear_error():
    q, k, v = random_qkv(0, 1, 16, 16, 2, 2, 32, jnp.float32)
    with pytest.raises(Exception, match="float16 or bfloat16"):
        jax.block_until_ready(jf.flash_attn_func(q, k, v))


def ring_on_one_gpu(**kwargs):
    """ring_attention(q, k, v, **kwargs) inside the user's shard_map over a one-device mesh
    of the first GPU (with shard_map's type checks on), as a function of global q, k, v."""
    from jax.sharding import Mesh, PartitionSpec as P

    mesh = Mesh(np.array(GPU[:1]), ("seq",))
    spec = P(None, "seq", None, None)

    def ring(q, k, v):
        return jax.shard_map(lambda q, k, v: jf.ring_attention(q, k, v, "seq", **kwargs),
                             mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)(q, k, v)

    return ring


@pytest.mark.parametrize("causal", [False, True])
def test_ring_attention_on_one_gpu_equals_the_op(causal):
    """The ring machinery on a one-device mesh: the same numbers as flash_attn_func, forward
    and gradients."""
    q, k, v = random_qkv(11, 2, 2048, 2048, 8, 2, 128, jnp.bfloat16)
    ring = ring_on_one_gpu(causal=causal)

    def plain(q, k, v):
        return jf.flash_attn_func(q, k, v, causal=causal)

    def loss(fn):
        return jax.jit(jax.value_and_grad(
            lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) ** 2), argnums=(0, 1, 2)))

    np.testing.assert_array_equal(np.asarray(jax.jit(ring)(q, k, v)), np.asarray(plain(q, k, v)))
    (value, grads), (expected_value, expected_grads) = loss(ring)(q, k, v), loss(plain)(q, k, v)
    np.testing.assert_allclose(float(value), float(expected_value), rtol=1e-6)
    # dk and dv are summed inside one CTA per key block: bitwise the same. dq sums the key
    # blocks with float32 atomics in no fixed order, so two runs of the plain op differ in
    # the last bits too (0.007% of elements by one bf16 ulp, seen on the H100).
    dq, expected_dq = (np.asarray(x, np.float32) for x in (grads[0], expected_grads[0]))
    np.testing.assert_allclose(dq, expected_dq, rtol=2e-2, atol=1e-3 * np.abs(expected_dq).max())
    for g, e in zip(grads[1:], expected_grads[1:]):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(e))


@pytest.mark.parametrize("causal", [False, True])
def test_ring_attention_dropout_on_one_gpu_draws_its_documented_mask(causal):
    """Ring attention's dropout on a one-device mesh: the kernels under the seeds it passes
    apply jf.ring_dropout_mask's mask, forward and gradients (2x rule, float32 reference)."""
    batch, seqlen, heads, p = 2, 1000, 4, 0.2
    q, k, v = random_qkv(13, batch, seqlen, seqlen, heads, 2, 128, jnp.bfloat16)
    key = jax.random.key(31)
    # One device holds one chunk in either layout, so the layouts draw the same mask.
    mask = jf.ring_dropout_mask(key, p, batch, heads, seqlen, seqlen, 1, "zigzag")

    ring = ring_on_one_gpu(causal=causal, dropout_p=p, dropout_key=key)

    def single(q, k, v):
        return jf.reference_attention(q, k, v, causal=causal, dropout_mask=mask,
                                      dropout_scale=dropout.keep_scale(p))

    rng = np.random.default_rng(14)
    cotangent = jnp.asarray(rng.standard_normal(q.shape, np.float32))
    exact_inputs = [x.astype(jnp.float32) for x in (q, k, v)]
    out, ring_vjp = jax.vjp(jax.jit(ring), q, k, v)
    exact, exact_vjp = jax.vjp(single, *exact_inputs)
    plain, plain_vjp = jax.vjp(single, q, k, v)
    assert_within_twice_plain("out", out, plain, exact, jnp.bfloat16)
    no_dropout = jf.reference_attention(*exact_inputs, causal=causal)
    assert float(jnp.max(jnp.abs(exact - no_dropout))) > 0.05  # the mask drops something
    grads = ring_vjp(cotangent.astype(out.dtype))
    exact_grads = exact_vjp(cotangent)
    plain_grads = plain_vjp(cotangent.astype(plain.dtype))
    for name, g, ex, pl in zip(("dq", "dk", "dv"), grads, exact_grads, plain_grads):
        assert_within_twice_plain(name, g, pl, ex, jnp.bfloat16)


@pytest.mark.parametrize("shape", [(2, 300, 500, 8, 2, 128), (2, 500, 300, 4, 4, 64)], ids=str)
@pytest.mark.parametrize("masks", [dict(is_causal=True), dict(local_window_size=(64, 16)),
                                   dict(is_causal=True, local_window_size=(100, 0))], ids=str)
def test_dot_product_attention_matches_jax_nn(shape, masks):
    """The drop-in jf.dot_product_attention (top-left masks, run by our kernels) against
    jax.nn.dot_product_attention's XLA path: float32 'exact' and plain bf16."""
    import warnings

    q, k, v = random_qkv(sum(shape), *shape, jnp.bfloat16)
    jax_nn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, implementation="xla", **masks))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to XLA would not test the kernels
        ours = jax.jit(lambda q, k, v: jf.dot_product_attention(q, k, v, **masks))(q, k, v)
    expected = exact(jax_nn, *(x.astype(jnp.float32) for x in (q, k, v)))
    assert_within_twice_plain("out", ours, jax_nn(q, k, v), expected, jnp.bfloat16)


@pytest.mark.parametrize("shared", [True, False], ids=["self", "cross"])
def test_varlen(shared):
    """flash_attn_varlen_func on the GPU against a float32 reference per sequence, forward
    and gradients (the self-attention path, and the scattered layout of unequal q/k lengths)."""
    lengths_q = [300, 1, 0, 1000, 77]
    lengths_k = lengths_q if shared else [120, 64, 30, 1300, 77]
    heads, heads_kv, head_dim = 4, 2, 128
    q, k, v = random_qkv(21, 1, sum(lengths_q), sum(lengths_k), heads, heads_kv, head_dim, jnp.bfloat16)
    q, k, v = q[0], k[0], v[0]
    cu = lambda lengths: jnp.asarray(np.concatenate([[0], np.cumsum(lengths)]), jnp.int32)  # noqa: E731
    cu_q = cu(lengths_q)
    cu_k = cu_q if shared else cu(lengths_k)
    out_cot = jnp.asarray(np.random.default_rng(22).standard_normal(q.shape), jnp.float32)

    def varlen(q, k, v):
        out = jf.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), causal=True)
        return jnp.sum(out.astype(jnp.float32) * out_cot), out

    def per_sequence(fn):
        def value(q, k, v):
            outs, start_q, start_k = [], 0, 0
            for n_q, n_k in zip(lengths_q, lengths_k):
                if n_q:
                    outs.append(fn(q[None, start_q:start_q + n_q], k[None, start_k:start_k + n_k],
                                   v[None, start_k:start_k + n_k], causal=True)[0])
                start_q, start_k = start_q + n_q, start_k + n_k
            out = jnp.concatenate(outs, 0)
            return jnp.sum(out.astype(jnp.float32) * out_cot), out
        return value

    grad = lambda fn: jax.jit(jax.grad(fn, argnums=(0, 1, 2), has_aux=True))  # noqa: E731
    ours_grads, ours = grad(varlen)(q, k, v)
    plain_grads, plain = grad(per_sequence(jf.reference_attention))(q, k, v)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    exact_grads, exact_out = exact(grad(per_sequence(jf.reference_attention)), *f32)
    assert_within_twice_plain("out", ours, plain, exact_out, jnp.bfloat16)
    for name, a, b, c in zip(("dq", "dk", "dv"), ours_grads, plain_grads, exact_grads):
        assert_within_twice_plain(name, a, b, c, jnp.bfloat16)


DETERMINISTIC_CASES = [((2, 300, 257, 4, 2, d), "causal") for d in (32, 64, 128, 256)] + [
    ((1, 1000, 377, 4, 2, 96), "window_alibi"), ((2, 17, 33, 4, 2, 64), "softcap_alibi_causal"),
    ((1, 130, 70, 2, 2, 7), "segments_random_softcap_alibi"),
    ((1, 2048, 2048, 2, 1, 128), "segments_sorted_causal"), ((2, 1, 1, 2, 1, 16), "none")]


@pytest.mark.parametrize("shape,feature", DETERMINISTIC_CASES, ids=str)
def test_deterministic_backward(shape, feature):
    check(shape, feature, jnp.bfloat16, gradients=True, deterministic=True)


@pytest.mark.parametrize("deterministic", [True])
def test_deterministic_backward_is_bitwise_reproducible(deterministic):
    """Repeated runs of a backward with many key blocks per query row give the same bits."""
    q, k, v = random_qkv(31, 1, 4096, 4096, 8, 2, 128, jnp.bfloat16)
    loss = lambda q, k, v: jnp.sum(jf.flash_attn_func(  # noqa: E731
        q, k, v, causal=True, deterministic=deterministic).astype(jnp.float32) ** 2)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    first = [np.asarray(g) for g in grad(q, k, v)]
    for _ in range(3):
        for a, b in zip(first, grad(q, k, v)):
            np.testing.assert_array_equal(a, np.asarray(b))


def applied_dropout_mask(device, key, p, batch, seqlen_q, seqlen_k, num_heads, num_heads_kv,
                         causal):
    """The mask a kernel applied on `device`, read back through V = identity (head_dim =
    seqlen_k): out[b, i, h, j] = P_ij keep_ij scale is nonzero exactly where j is kept."""
    q, k, _ = random_qkv(5, batch, seqlen_q, seqlen_k, num_heads, num_heads_kv, seqlen_k,
                         jnp.bfloat16)
    v = jnp.broadcast_to(jnp.eye(seqlen_k, dtype=jnp.bfloat16)[None, :, None, :],
                         (batch, seqlen_k, num_heads_kv, seqlen_k))
    if device.platform == "cpu":
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    q, k, v = jax.device_put((q, k, v), device)
    with jax.default_device(device):
        out = jax.jit(functools.partial(jf.flash_attn_func, dropout_p=p, causal=causal))(
            q, k, v, dropout_key=key)
    return np.asarray(jnp.moveaxis(out, 2, 1) != 0)


# seqlen_k picks the head-dim class (64, 128, 256), and with it the forward's tile shape.
@pytest.mark.parametrize("shape", [(1, 300, 64, 2, 1), (2, 77, 128, 4, 2), (1, 129, 200, 2, 2)],
                         ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_mask_is_the_specified_mask_and_the_cpus(shape, causal):
    key, p = jax.random.key(17), 0.3
    batch, seqlen_q, seqlen_k, num_heads, _ = shape
    gpu = applied_dropout_mask(GPU[0], key, p, *shape, causal)
    cpu = applied_dropout_mask(jax.devices("cpu")[0], key, p, *shape, causal)
    spec = np.asarray(jf.dropout_mask(key, p, batch, num_heads, seqlen_q, seqlen_k))
    visible = np.asarray(jf.reference.visible_mask(seqlen_q, seqlen_k, -1, 0 if causal else -1))
    np.testing.assert_array_equal(gpu, spec & visible)
    np.testing.assert_array_equal(cpu, gpu)


DROPOUT_CASES = [(s, f) for s in SMALL for f in ("none", "causal", "segments_random_softcap_alibi")] + [
    ((2, 300, 257, 4, 2, d), "window_alibi") for d in (32, 64, 128, 256)] + [
    ((1, 2048, 2048, 4, 2, 128), "segments_sorted_causal")]


@pytest.mark.parametrize("shape,feature", DROPOUT_CASES, ids=str)
def test_dropout(shape, feature):
    check(shape, feature, jnp.bfloat16, gradients=True, dropout_p=0.15)


@pytest.mark.parametrize("shape,feature", [((2, 300, 257, 4, 2, d), "causal")
                                           for d in (64, 256)] + [((1, 1000, 377, 4, 2, 96), "none")],
                         ids=str)
def test_dropout_deterministic(shape, feature):
    check(shape, feature, jnp.float16, gradients=True, deterministic=True, dropout_p=0.4)
