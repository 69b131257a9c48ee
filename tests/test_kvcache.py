"""flash_attn_with_kvcache on the CPU: attention against a float64 reference, the append
checked slot by slot, the out-of-range rules, jit with donated caches, and the transforms."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash as jf
from helpers import DTYPES, alibi_slopes_for, assert_within_twice_plain, to64
from jax_flash.reference_kvcache import reference_rotary
from kvcache_cases import CACHES, MASKS, MODES, build, capacity_of, check_append, widen

STATIC = ("softmax_scale", "causal", "window_size", "softcap", "rotary_interleaved", "num_splits",
          "return_lse")
# Jitted once per shape and static configuration (op-by-op dispatch would dominate).
flash = jax.jit(jf.flash_attn_with_kvcache, static_argnames=STATIC)
reference = jax.jit(jf.reference_attn_with_kvcache, static_argnames=STATIC)


def check(args, kwargs, dtype, capacity):
    """The call against the float64 reference (out, lse, and the append)."""
    ours = flash(**args, return_lse=True, **kwargs)
    exact = reference(**widen(args), return_lse=True, **kwargs)
    plain = reference(**args, return_lse=True, **kwargs)
    appending = "k" in args
    assert len(ours) == (4 if appending else 2)
    out, lse = ours[:2]
    q = args["q"]
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == jnp.float32
    assert_within_twice_plain("out", out, plain[0], exact[0], dtype)
    assert_within_twice_plain("lse", lse, plain[1], exact[1], jnp.float32)
    empty = np.isinf(np.asarray(exact[1]))
    np.testing.assert_array_equal(np.isinf(np.asarray(lse)), empty)
    assert np.all(np.asarray(to64(out)).transpose(0, 2, 1, 3)[empty] == 0)
    if appending:
        check_append(args, ours[2:], plain[2:], capacity, rotary="rotary_cos" in args)
    return ours, exact


# ---- the feature grid ----

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cache", CACHES)
def test_caches_and_modes(cache, mode):
    check(build(0, cache, mode, jnp.float32), dict(causal=True), jnp.float32, capacity_of(cache))


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("cache,mode", [("paged16", "prefill"), ("contiguous", "decode"),
                                        ("paged48", "read")])
def test_masks(cache, mode, mask):
    check(build(1, cache, mode, jnp.float32), MASKS[mask], jnp.float32, capacity_of(cache))


@pytest.mark.parametrize("rotary_dim,interleaved,mask", [
    (12, True, "causal"), (12, False, "causal"), (32, True, "causal"), (32, False, "causal"),
    (12, True, "none"), (32, False, "none"), (12, False, "window"), (32, True, "causal_window"),
], ids=str)
def test_rotary(rotary_dim, interleaved, mask):
    """Both styles, rotary_dim < and == head_dim; q's positions move only when causal or
    local (FlashAttention's rule), which the reference states independently."""
    args = build(2, "paged48", "prefill", jnp.float32, rotary_dim=rotary_dim)
    kwargs = dict(MASKS[mask], rotary_interleaved=interleaved)
    check(args, kwargs, jnp.float32, capacity_of("paged48"))


def test_rotary_matches_a_rotation_by_hand():
    """One vector, one position, against the 2x2 rotations written out."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 1, 1, 8))
    theta = rng.uniform(0, 6, (5, 3))
    cos, sin, position = np.cos(theta), np.sin(theta), 4
    c, s = np.cos(theta[position]), np.sin(theta[position])
    inter = x.copy()
    inter[..., 0:6:2] = x[..., 0:6:2] * c - x[..., 1:6:2] * s
    inter[..., 1:6:2] = x[..., 0:6:2] * s + x[..., 1:6:2] * c
    neox = x.copy()
    neox[..., 0:3] = x[..., 0:3] * c - x[..., 3:6] * s
    neox[..., 3:6] = x[..., 0:3] * s + x[..., 3:6] * c
    positions = jnp.full((1, 1), position)
    for interleaved, expected in ((True, inter), (False, neox)):
        for fn in (reference_rotary, jf.kvcache.apply_rotary):
            got = fn(jnp.asarray(x), jnp.asarray(cos), jnp.asarray(sin), positions, interleaved)
            np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-12, atol=1e-12)


def test_rotary_window_past_the_capacity_is_not_local():
    """FlashAttention makes window sides >= the capacity -1 before it decides whether a call
    is local: without causal, such a window leaves every query at cache_seqlens, exactly
    like no window; a side of capacity - 1 (which masks nothing here either) is local, so
    query i moves to cache_seqlens + i."""
    capacity = capacity_of("paged48")
    args = build(24, "paged48", "prefill", jnp.float32, rotary_dim=16)
    no_window = flash(**args, return_lse=True)
    for window in ((capacity, capacity), (-1, capacity), (capacity + 100, -1), (2**63, -1)):
        ours, _ = check(args, dict(window_size=window), jnp.float32, capacity)
        for a, b in zip(ours, no_window):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    ours, _ = check(args, dict(window_size=(capacity - 1, -1)), jnp.float32, capacity)
    assert not np.allclose(np.asarray(ours[0]), np.asarray(no_window[0]), atol=1e-3)


@pytest.mark.parametrize("extra", ["softcap", "alibi_heads", "alibi_batch_softcap_scale"])
@pytest.mark.parametrize("cache,mode,mask", [("contiguous", "prefill", "causal"),
                                             ("paged16", "decode", "window"),
                                             ("paged48", "read", "none")])
def test_softcap_and_alibi(cache, mode, mask, extra):
    kwargs = dict(MASKS[mask])
    if extra == "softcap":
        kwargs["softcap"] = 2.0
    elif extra == "alibi_heads":
        kwargs["alibi_slopes"] = alibi_slopes_for(4)
    else:
        kwargs.update(alibi_slopes=alibi_slopes_for(4, batch=3), softcap=5.0, softmax_scale=0.3)
    args = build(4, cache, mode, jnp.float32)
    args["alibi_slopes"] = kwargs.pop("alibi_slopes", None)
    check(args, kwargs, jnp.float32, capacity_of(cache))


@pytest.mark.parametrize("heads,heads_kv", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("cache", ["contiguous", "paged16"])
def test_head_groups(cache, heads, heads_kv):
    args = build(5, cache, "decode", jnp.float32, heads=heads, heads_kv=heads_kv)
    check(args, dict(causal=True), jnp.float32, capacity_of(cache))


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
@pytest.mark.parametrize("cache,mode,rotary_dim", [("contiguous", "decode", None),
                                                   ("paged48", "prefill", 16),
                                                   ("paged16", "read", None)])
def test_half_precision(cache, mode, rotary_dim, dtype_name):
    dtype = DTYPES[dtype_name]
    args = build(6, cache, mode, dtype, rotary_dim=rotary_dim)
    check(args, dict(causal=True, softcap=4.0), dtype, capacity_of(cache))


def test_odd_sizes():
    """head_dim 7 (rotary over 6 of it), 3 query heads on 1 kv head, a 37-long cache, 5 rows
    of which 3 are used, in a different order, with lengths crossing no tile boundary."""
    args = build(7, dict(seqlen_cache=37), "prefill", jnp.float32, batch=4, heads=3, heads_kv=1,
                 head_dim=7, lengths=[0, 5, 30, 13], batch_idx=True, rotary_dim=6)
    check(args, dict(causal=True), jnp.float32, 37)


@pytest.mark.parametrize("cache", ["contiguous", "paged16"])
def test_long_cache_many_tiles(cache):
    """Rows much longer than one 64-key tile, keys across many pages."""
    layout = (dict(seqlen_cache=700) if cache == "contiguous"
              else dict(page_size=16, max_blocks=44, num_blocks=100))
    args = build(8, layout, "prefill", jnp.float32, batch=2, lengths=[650, 301])
    check(args, dict(causal=True, window_size=(200, -1)), jnp.float32, capacity_of(layout))


# ---- arguments: cache_batch_idx, cache_seqlens, num_splits, return order ----

@pytest.mark.parametrize("mode", ["decode", "read"])
def test_cache_batch_idx(mode):
    args = build(9, "contiguous", mode, jnp.float32, batch_idx=True)
    check(args, dict(causal=True), jnp.float32, capacity_of("contiguous"))


def test_cache_seqlens_int_and_scalar_array_equal_the_array():
    args = build(10, "paged16", "prefill", jnp.float32, lengths=[40, 40, 40])
    expected = flash(**args, causal=True, return_lse=True)
    for lengths in (40, np.int64(40), jnp.asarray(40, jnp.int32), jnp.asarray([40] * 3, jnp.int64)):
        args["cache_seqlens"] = lengths
        got = jf.flash_attn_with_kvcache(**args, causal=True, return_lse=True)  # not jitted: a Python int
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_cache_seqlens_none_means_full():
    args = build(11, "paged48", "read", jnp.float32)
    args["cache_seqlens"] = None
    full = jnp.full((3,), capacity_of("paged48"), jnp.int32)
    np.testing.assert_array_equal(flash(**args), flash(**dict(args, cache_seqlens=full)))
    check(dict(args, cache_seqlens=full), dict(window_size=(30, 3)), jnp.float32,
          capacity_of("paged48"))


def test_return_order():
    args = build(12, "contiguous", "decode", jnp.float32)
    out = flash(**args)
    out_lse = flash(**args, return_lse=True)
    assert isinstance(out, tuple) and len(out) == 3  # (out, k_cache, v_cache)
    assert len(out_lse) == 4                         # (out, lse, k_cache, v_cache)
    for a, b in zip(out, out_lse[:1] + out_lse[2:]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert out_lse[1].shape == (3, 4, 1)
    read = {k: v for k, v in args.items() if k not in ("k", "v")}
    assert isinstance(flash(**read), jax.Array)
    assert len(flash(**read, return_lse=True)) == 2


def test_num_splits_is_accepted_and_ignored_on_cpu():
    args = build(13, "paged16", "decode", jnp.float32)
    expected = flash(**args, causal=True)
    for splits in (1, 3, 64):
        for a, b in zip(flash(**args, causal=True, num_splits=splits), expected):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("window_size,equivalent", [
    ((2**63 - 1, 2**63 - 1), (-1, -1)),
    ((-1, 2**63 - 1), (-1, -1)),
    ((2**40, 3), (-1, 3)),
    ((2**63, 2**64 + 5), (-1, -1)),                 # past int64
], ids=["max_max", "none_max", "2e40_3", "2e63_2e64"])
@pytest.mark.parametrize("cache,mode", [("paged16", "prefill"), ("contiguous", "read")])
def test_huge_window_sides_are_unbounded(cache, mode, window_size, equivalent):
    """A side too wide to mask anything acts as -1 (no int64 overflow of diagonal + side in
    the kernels, no OverflowError for sides past int64), against the reference and bit for
    bit against the equivalent window."""
    args = build(25, cache, mode, jnp.float32, rotary_dim=16 if mode == "prefill" else None)
    ours, _ = check(args, dict(window_size=window_size), jnp.float32, capacity_of(cache))
    for a, b in zip(ours, flash(**args, window_size=equivalent, return_lse=True)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    check(args, dict(window_size=equivalent), jnp.float32, capacity_of(cache))


# ---- out-of-range run-time values ----

def _out_and_caches(args, **kwargs):
    return [np.asarray(x) for x in flash(**args, return_lse=True, causal=True, **kwargs)]


@pytest.mark.parametrize("cache", ["contiguous", "paged16"])
def test_lengths_past_capacity_and_negative(cache):
    """Writes past the capacity or before position 0 are dropped; the key count is clamped
    into [0, capacity], the causal diagonal with it."""
    capacity = capacity_of(cache)
    for lengths in ([capacity - 3, -4, capacity + 50], [-20, capacity, 2]):
        args = build(14, cache, "prefill", jnp.float32, lengths=lengths)
        check(args, dict(causal=True), jnp.float32, capacity)


def test_huge_lengths_do_not_wrap():
    """int32-max and int64 lengths behave like any length past the capacity (no overflow
    of cache_seqlens + seqlen_new into a small or negative count)."""
    capacity = capacity_of("paged16")
    args = build(15, "paged16", "prefill", jnp.float32)
    expected = _out_and_caches(dict(args, cache_seqlens=jnp.asarray([capacity + 1] * 3, jnp.int32)))
    for lengths in (jnp.asarray([2**31 - 1] * 3, jnp.int32), jnp.asarray([2**40] * 3, jnp.int64),
                    np.asarray([2**32 + 3] * 3, np.int64), np.asarray([2**63 + 1] * 3, np.uint64)):
        got = _out_and_caches(dict(args, cache_seqlens=lengths))
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a, b)
        # The reference clamps the same way (an int32 cast would wrap 2**40 to 0).
        check(dict(args, cache_seqlens=lengths), dict(causal=True), jnp.float32, capacity)
    # Every row is past its capacity: nothing written, every key of each row visible.
    np.testing.assert_array_equal(expected[2], np.asarray(args["k_cache"]))


def test_bad_block_ids_are_skipped_and_not_written():
    """Pages outside [0, num_blocks) are unreadable (masked) and never written, however far
    outside (negative ids must not wrap around to the last page)."""
    args = build(16, "paged16", "prefill", jnp.float32, lengths=[10, 40, 85])
    table = np.asarray(args["block_table"]).copy()
    table[0, 0] = -1            # row 0: its first page, which the append writes to
    table[1, 1] = 23            # == num_blocks
    table[1, 2] = 10**6
    table[2, :] = -7            # row 2: nothing readable at all
    args["block_table"] = jnp.asarray(table, jnp.int32)
    ours, _ = check(args, dict(causal=True), jnp.float32, capacity_of("paged16"))
    assert np.all(np.asarray(ours[0])[2] == 0) and np.all(np.isinf(np.asarray(ours[1])[2]))


def test_bad_cache_batch_idx_is_skipped_and_not_written():
    args = build(17, "contiguous", "decode", jnp.float32, batch_idx=True)
    args["cache_batch_idx"] = jnp.asarray([-1, 3, 5], jnp.int32)  # 5 rows: -1 and 5 are outside
    ours, _ = check(args, dict(causal=True), jnp.float32, capacity_of("contiguous"))
    for b in (0, 2):
        assert np.all(np.asarray(ours[0])[b] == 0) and np.all(np.isinf(np.asarray(ours[1])[b]))
    # Wide indices are clamped before the int32 cast, so they stay outside.
    wide = dict(args, cache_batch_idx=jnp.asarray([-(2**33), 3, 2**32 + 1], jnp.int64))
    for a, b in zip(_out_and_caches(wide), _out_and_caches(args)):
        np.testing.assert_array_equal(a, b)


_X64_OFF_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
import jax_flash as jf
assert not jax.config.jax_enable_x64
rng = np.random.default_rng(0)
def normal(*shape):
    return jnp.asarray(rng.standard_normal(shape, np.float32))
def run(**kwargs):
    results = jf.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, causal=True,
                                         return_lse=True, **kwargs)
    reference = jf.reference_attn_with_kvcache(q, k_cache, v_cache, k, v, causal=True,
                                               return_lse=True, **kwargs)
    for a, b in zip(results, reference):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    return [np.asarray(x) for x in results]
def same(a, b):
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
q, k, v = normal(2, 2, 2, 16), normal(2, 2, 1, 16), normal(2, 2, 1, 16)

# Paged, 6 pages of 16: entry 2**32 + 5 must be out of range (skipped, never written), not
# page 5 (which no row owns, so a wrapped entry would show up in its slots).
k_cache, v_cache = normal(6, 16, 1, 16), normal(6, 16, 1, 16)
lengths = np.asarray([3, 20], np.int32)
table = np.asarray([[0, 1], [2, 3]], np.int64)
outside = run(cache_seqlens=lengths, block_table=np.where(table == 0, 6, table).astype(np.int32))
for wide in (np.where(table == 0, 2**32 + 5, table),
             np.where(table == 0, 2**32 + 5, table).astype(np.uint64)):
    got = run(cache_seqlens=lengths, block_table=wide)
    same(got, outside)
    assert got[2][5].tobytes() == np.asarray(k_cache)[5].tobytes()

# Contiguous, 4 cache rows of 32: cache_batch_idx 2**32 + 3 is outside (not row 3), and
# cache_seqlens 2**32 + 3 is past the capacity (not 3).
k_cache, v_cache = normal(4, 32, 1, 16), normal(4, 32, 1, 16)
index = np.asarray([2**32 + 3, 1], np.int64)
same(run(cache_seqlens=lengths, cache_batch_idx=index),
     run(cache_seqlens=lengths, cache_batch_idx=np.asarray([4, 1], np.int32)))
same(run(cache_seqlens=np.asarray([2**32 + 3, 5], np.int64)),
     run(cache_seqlens=np.asarray([33, 5], np.int32)))
print("x64-off ok")
"""


def test_wide_numpy_indices_do_not_wrap_with_x64_off():
    """With x64 off (JAX's default; conftest turns it on, hence a subprocess), int64 / uint64
    NumPy block_table, cache_batch_idx and cache_seqlens are clamped by NumPy before any
    conversion to 32 bits, in the op and in the reference."""
    env = dict(os.environ, JAX_ENABLE_X64="0", JAX_PLATFORMS="cpu")
    # From the tests folder: from the repository root, `import jax_flash` would find the
    # source tree (no compiled extension) before the installed package.
    done = subprocess.run([sys.executable, "-c", _X64_OFF_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert done.returncode == 0 and "x64-off ok" in done.stdout, done.stdout + done.stderr


# ---- jit, donation, transforms ----

def _decode_step(q, k_cache, v_cache, k, v, cache_seqlens, block_table=None):
    return jf.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens,
                                      block_table=block_table, causal=True)


@pytest.mark.parametrize("dtype_name", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("cache", ["contiguous", "paged16"])
def test_donated_caches_are_updated_in_place(cache, dtype_name):
    """With the caches donated, the compiled call aliases each cache input to its output and
    (float16 / float32) allocates no copy of it: the scatter updates the donated buffer and
    the kernel reads it there. XLA's CPU backend computes bfloat16 scatters in float32, so
    there a bfloat16 cache is converted (a temporary), though still aliased;
    test_gpu_kvcache.py checks that the GPU has no such copy."""
    dtype = DTYPES[dtype_name]
    args = build(18, cache, "decode", dtype)
    order = ("q", "k_cache", "v_cache", "k", "v", "cache_seqlens", "block_table")
    operands = [args.get(name) for name in order]
    step = jax.jit(_decode_step, donate_argnums=(1, 2))
    lowered = step.lower(*operands)
    text = lowered.as_text()
    assert "tf.aliasing_output = 1" in text and "tf.aliasing_output = 2" in text, text[:2000]
    assert "custom_call @jax_flash_kvcache_forward(" in text
    memory = lowered.compile().memory_analysis()
    cache_bytes = args["k_cache"].size * jnp.dtype(dtype).itemsize
    assert memory.alias_size_in_bytes == 2 * cache_bytes
    if dtype != jnp.bfloat16:
        assert memory.temp_size_in_bytes < cache_bytes

    # And it runs: a few decode steps through the donated buffers equal the undonated ones.
    expected_k, expected_v = args["k_cache"], args["v_cache"]
    k_cache, v_cache = jnp.array(expected_k), jnp.array(expected_v)  # copies to donate
    lengths = args["cache_seqlens"].at[2].add(-3)
    plain = jax.jit(_decode_step)
    for _ in range(3):
        out, k_cache, v_cache = step(args["q"], k_cache, v_cache, args["k"], args["v"], lengths,
                                     args.get("block_table"))
        expected_out, expected_k, expected_v = plain(args["q"], expected_k, expected_v, args["k"],
                                                     args["v"], lengths, args.get("block_table"))
        for a, b in ((out, expected_out), (k_cache, expected_k), (v_cache, expected_v)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        lengths = lengths + 1


def test_differentiating_raises_a_clear_error():
    args = build(19, "contiguous", "decode", jnp.float32)
    loss = lambda q: jnp.sum(flash(**dict(args, q=q))[0])  # noqa: E731
    with pytest.raises(NotImplementedError, match="inference-only and has no derivative"):
        jax.grad(loss)(args["q"])
    with pytest.raises(NotImplementedError, match="no derivative"):
        jax.jvp(loss, (args["q"],), (args["q"],))


def test_vmap_over_queries():
    args = build(20, "paged16", "read", jnp.float32)
    many = jnp.stack([args["q"], -args["q"]])
    run = lambda q: flash(**dict(args, q=q), causal=True)  # noqa: E731
    got = jax.vmap(run)(many)
    for i in range(2):
        np.testing.assert_array_equal(np.asarray(got[i]), np.asarray(run(many[i])))


def test_lowers_to_the_kvcache_custom_call_only():
    args = build(21, "paged16", "prefill", jnp.bfloat16, rotary_dim=8)
    text = flash.lower(**args, causal=True).as_text()
    assert text.count("custom_call @jax_flash_kvcache_forward(") == 1
    assert "@jax_flash_forward(" not in text
