"""flash_attn_with_kvcache on the GPU against a float32 reference, for decode-sized calls.

Runs only where JAX has a GPU and jax_flash was built with its CUDA kernels; elsewhere
every test here is skipped with the reason.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash as jf
from helpers import alibi_slopes_for, assert_within_twice_plain, run_selection_in_fresh_process
from kvcache_cases import build, capacity_of, check_append

GPU = [d for d in jax.devices() if d.platform == "gpu"] if jax.default_backend() == "gpu" else []
pytestmark = pytest.mark.skipif(
    not (GPU and jf.HAS_CUDA_KERNELS),
    reason="needs a GPU and a jax_flash build with CUDA kernels (JAX_FLASH_CUDA=ON)",
)

STATIC = ("softmax_scale", "causal", "window_size", "softcap", "rotary_interleaved", "num_splits",
          "return_lse")
flash = jax.jit(jf.flash_attn_with_kvcache, static_argnames=STATIC)
reference = jax.jit(jf.reference_attn_with_kvcache, static_argnames=STATIC)


def exact(fn, *args):
    """fn with float32 matmuls (XLA's GPU default would allow TF32)."""
    with jax.default_matmul_precision("highest"):
        return fn(*args)


def check(args, kwargs, dtype, capacity):
    ours = flash(**args, return_lse=True, **kwargs)
    f32 = {k: x.astype(jnp.float32) if x is not None and jnp.issubdtype(x.dtype, jnp.floating) else x
           for k, x in args.items()}
    exact_results = exact(lambda a: reference(**a, return_lse=True, **kwargs), f32)
    plain = reference(**args, return_lse=True, **kwargs)
    out, lse = ours[:2]
    assert out.shape == args["q"].shape and out.dtype == dtype
    assert_within_twice_plain("out", out, plain[0], exact_results[0], dtype)
    np.testing.assert_array_equal(np.isinf(np.asarray(lse)), np.isinf(np.asarray(exact_results[1])))
    finite = np.isfinite(np.asarray(exact_results[1]))
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(exact_results[1])[finite], atol=2e-2)
    if "k" in args:
        check_append(args, ours[2:], plain[2:], capacity, rotary="rotary_cos" in args)


# (batch, seqlen_q = seqlen_new, heads, heads_kv, head_dim, lengths): decode, speculative
# decoding (a few tokens) and a chunked prefill, MHA / GQA / MQA, every head-dim class.
SHAPES = [
    (4, 1, 32, 8, 128, [0, 1, 2047, 4000]),
    (8, 1, 16, 1, 64, [5, 17, 64, 65, 127, 128, 1000, 2000]),
    (2, 1, 8, 8, 256, [300, 999]),
    (3, 4, 8, 2, 128, [12, 600, 2900]),
    (2, 1, 4, 4, 32, [0, 16]),
    (2, 128, 8, 2, 96, [0, 3000]),
    (2, 3, 4, 2, 12, [5, 700]),  # head_dim not a multiple of 8: the element-wise loads
]
LAYOUTS = {
    "contiguous": lambda capacity: dict(seqlen_cache=capacity),
    "paged16": lambda capacity: dict(page_size=16, max_blocks=-(-capacity // 16), num_blocks=0),
    "paged64": lambda capacity: dict(page_size=64, max_blocks=-(-capacity // 64), num_blocks=0),
    "paged256": lambda capacity: dict(page_size=256, max_blocks=-(-capacity // 256), num_blocks=0),
}
FEATURES = {
    "causal": dict(causal=True),
    "plain": dict(),
    "window_softcap": dict(causal=True, window_size=(256, 0), softcap=30.0),
    "alibi": dict(causal=True, alibi=True),
    "rotary": dict(causal=True, rotary_dim=64),
    "rotary_neox_noncausal": dict(rotary_dim=32, rotary_interleaved=False),
}


def layout_for(name, shape):
    batch, seqlen_new, *_, lengths = shape
    capacity = max(lengths) + seqlen_new + 37
    layout = LAYOUTS[name](capacity)
    if "num_blocks" in layout:
        layout["num_blocks"] = batch * layout["max_blocks"] + 3  # three pages nobody uses
    return layout


def case(shape, layout_name, feature, dtype, seed=0):
    batch, seqlen_q, heads, heads_kv, head_dim, lengths = shape
    layout = layout_for(layout_name, shape)
    kwargs = dict(FEATURES[feature])
    rotary_dim = min(kwargs.pop("rotary_dim", 0), head_dim)
    args = build(seed, layout, (seqlen_q, seqlen_q), dtype, batch=batch, heads=heads,
                 heads_kv=heads_kv, head_dim=head_dim, lengths=lengths, rotary_dim=rotary_dim)
    if kwargs.pop("alibi", False):
        args["alibi_slopes"] = alibi_slopes_for(heads, batch=batch)
    return args, kwargs, capacity_of(layout)


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("layout", ["contiguous", "paged16", "paged256"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_decode_grid_bf16(shape, layout, feature):
    args, kwargs, capacity = case(shape, layout, feature, jnp.bfloat16)
    check(args, kwargs, jnp.bfloat16, capacity)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_decode_fp16(shape, layout):
    args, kwargs, capacity = case(shape, layout, "rotary", jnp.float16, seed=1)
    check(args, kwargs, jnp.float16, capacity)


@pytest.mark.parametrize("num_splits", [0, 1, 2, 7, 64])
def test_num_splits_give_the_same_attention(num_splits):
    args, kwargs, capacity = case((4, 1, 32, 8, 128, [0, 1, 2047, 4000]), "paged64", "causal",
                                  jnp.bfloat16)
    check(args, dict(kwargs, num_splits=num_splits), jnp.bfloat16, capacity)


def test_read_only_call_and_cache_batch_idx():
    args = build(3, dict(seqlen_cache=3000), (1, 0), jnp.bfloat16, batch=4, heads=16, heads_kv=4,
                 head_dim=128, lengths=[0, 7, 2999, 3000], batch_idx=True)
    check(args, dict(causal=True), jnp.bfloat16, 3000)


def test_out_of_range_rules_match_the_cpu():
    """Lengths past the capacity or negative, bad page ids: the rule of common/kv_cache.h,
    which the reference states independently."""
    shape = (4, 3, 8, 2, 128, [0, 0, 0, 0])
    args, kwargs, capacity = case(shape, "paged16", "causal", jnp.bfloat16)
    args["cache_seqlens"] = jnp.asarray([capacity - 1, -2, capacity + 100, 40], jnp.int32)
    table = np.asarray(args["block_table"]).copy()
    table[3, 1] = -1
    table[3, 2] = table.max() + 1000
    args["block_table"] = jnp.asarray(table, jnp.int32)
    check(args, kwargs, jnp.bfloat16, capacity)


def test_donated_bfloat16_caches_are_not_copied():
    """On the GPU the append's scatter runs in bfloat16 on the donated buffer (on the CPU,
    XLA computes it in float32 and converts the cache)."""
    args, _, _ = case((4, 1, 32, 8, 128, [0, 1, 2047, 4000]), "paged64", "causal", jnp.bfloat16)

    def step(q, k_cache, v_cache, k, v, cache_seqlens, block_table):
        return jf.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens,
                                          block_table=block_table, causal=True)

    order = ("q", "k_cache", "v_cache", "k", "v", "cache_seqlens", "block_table")
    compiled = jax.jit(step, donate_argnums=(1, 2)).lower(*[args[n] for n in order]).compile()
    memory = compiled.memory_analysis()
    cache_bytes = args["k_cache"].size * 2
    assert memory.alias_size_in_bytes == 2 * cache_bytes
    assert memory.temp_size_in_bytes < cache_bytes, memory


def test_cache_batch_idx_out_of_range_is_skipped():
    """Cache rows past the cache or negative: those batch rows see no key (zero output, lse
    +inf) and receive no write, as on the CPU (common/kv_cache.h)."""
    args = build(4, dict(seqlen_cache=500), (2, 2), jnp.bfloat16, batch=4, heads=8, heads_kv=2,
                 head_dim=64, lengths=[3, 100, 250, 7], batch_idx=True)
    index = np.asarray(args["cache_batch_idx"]).copy()
    index[1], index[3] = -1, 10**6
    args["cache_batch_idx"] = jnp.asarray(index, jnp.int32)
    check(args, dict(causal=True), jnp.bfloat16, 500)


SM86_SMEM_LIMIT = 101376  # bytes of shared memory an sm86 / sm89 CTA may opt into


@pytest.mark.skipif("JAX_FLASH_CUDA_SMEM_LIMIT" in os.environ, reason="already a capped run")
def test_kvcache_with_sm86_shared_memory():
    """Head dim 256 needs the smaller tiles on GPUs with 99 KB per CTA: run them here, with
    the shared memory capped in a fresh process; it must run its tests, not skip them."""
    run_selection_in_fresh_process(__file__, "capped_shared_memory",
                                   JAX_FLASH_CUDA_SMEM_LIMIT=str(SM86_SMEM_LIMIT))


@pytest.mark.skipif(os.environ.get("JAX_FLASH_CUDA_SMEM_LIMIT") != str(SM86_SMEM_LIMIT),
                    reason="runs in the capped subprocess of test_kvcache_with_sm86_shared_memory")
@pytest.mark.parametrize("layout", ["contiguous", "paged16"])
@pytest.mark.parametrize("shape", [(2, 1, 8, 8, 256, [300, 999]), (2, 40, 4, 2, 256, [0, 1500]),
                                   (4, 1, 32, 8, 128, [0, 1, 2047, 4000]),
                                   (2, 128, 8, 2, 96, [0, 3000])], ids=str)
def test_capped_shared_memory(shape, layout):
    args, kwargs, capacity = case(shape, layout, "causal", jnp.bfloat16)
    check(args, kwargs, jnp.bfloat16, capacity)
