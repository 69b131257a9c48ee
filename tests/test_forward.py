"""Forward outputs and lse against a float64 reference over the feature grid."""

import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash as jf
from helpers import (DTYPES, alibi_slopes_for, assert_within_twice_plain, attention_kwargs,
                     flash, flash_offset, random_qkv, reference, reference_offset, to64)

# (batch, seqlen_q, seqlen_k, num_heads, num_heads_kv, head_dim)
SHAPES = {
    "len1": (2, 1, 1, 2, 1, 16),
    "q1_k17": (1, 1, 17, 4, 2, 32),
    "len17": (1, 17, 17, 4, 4, 40),
    "q17_k33_gqa": (2, 17, 33, 4, 2, 64),
    "q33_k17_mqa": (1, 33, 17, 4, 1, 24),
    "q130_k70_d7": (1, 130, 70, 2, 2, 7),
    "d1": (1, 20, 20, 1, 1, 1),
    "d256": (1, 70, 65, 2, 1, 256),
    "len1000": (1, 1000, 1000, 2, 1, 64),
}

MASKS = {
    "none": dict(),
    "causal": dict(causal=True),
    "window": dict(window_size=(8, 3)),
    "window_left_causal": dict(causal=True, window_size=(5, -1)),
    "window_right_only": dict(window_size=(-1, 0)),
}

EXTRAS = {
    "plain": dict(),
    "softcap": dict(softcap=2.0),
    "alibi": dict(alibi="heads"),
    "alibi_batch_softcap_scale": dict(alibi="batch", softcap=5.0, softmax_scale=0.3),
}


def build_case(shape_name, mask_name, extra_name):
    shape = SHAPES[shape_name]
    case = dict(MASKS[mask_name], **EXTRAS[extra_name])
    alibi = case.pop("alibi", None)
    if alibi == "heads":
        case["alibi_slopes"] = alibi_slopes_for(shape[3])
    elif alibi == "batch":
        case["alibi_slopes"] = alibi_slopes_for(shape[3], batch=shape[0])
    return shape, case


def check_forward(shape, case, dtype, seed=0, flash_fn=flash, reference_fn=reference):
    """Returns the reference lse (float64) for callers with more to check."""
    q, k, v = random_qkv(seed, *shape, dtype)
    kwargs = attention_kwargs(case)
    out, lse = flash_fn(q, k, v, return_lse=True, **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (shape[0], shape[3], shape[1]) and lse.dtype == jnp.float32
    exact_out, exact_lse = reference_fn(*map(to64, (q, k, v)), return_lse=True, **kwargs)
    plain_out, plain_lse = reference_fn(q, k, v, return_lse=True, **kwargs)
    assert_within_twice_plain("out", out, plain_out, exact_out, dtype)
    assert_within_twice_plain("lse", lse, plain_lse, exact_lse, jnp.float32)
    # Fully masked rows: zero output and lse = +inf, exactly.
    empty = np.isinf(np.asarray(exact_lse))
    np.testing.assert_array_equal(np.isinf(np.asarray(lse)), empty)
    assert np.all(np.asarray(to64(out)).transpose(0, 2, 1, 3)[empty] == 0)
    return exact_lse


@pytest.mark.parametrize("mask_name", MASKS)
@pytest.mark.parametrize("shape_name", SHAPES)
def test_masks_and_shapes_float32(shape_name, mask_name):
    check_forward(*build_case(shape_name, mask_name, "plain"), jnp.float32)


@pytest.mark.parametrize("extra_name", EXTRAS)
@pytest.mark.parametrize("mask_name", ["none", "causal", "window"])
@pytest.mark.parametrize("shape_name", ["len17", "q17_k33_gqa", "q33_k17_mqa", "d256"])
def test_softcap_alibi_combinations(shape_name, mask_name, extra_name):
    check_forward(*build_case(shape_name, mask_name, extra_name), jnp.float32)


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
@pytest.mark.parametrize("mask_name", ["none", "causal", "window"])
@pytest.mark.parametrize("shape_name", ["len1", "q17_k33_gqa", "q130_k70_d7", "d256", "len1000"])
def test_half_precision(shape_name, mask_name, dtype_name):
    check_forward(*build_case(shape_name, mask_name, "plain"), DTYPES[dtype_name])


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_half_precision_softcap_alibi(dtype_name):
    check_forward(*build_case("q17_k33_gqa", "causal", "alibi_batch_softcap_scale"),
                  DTYPES[dtype_name])


@pytest.mark.parametrize("head_dim", [2, 3, 8, 15, 33, 63, 64, 65, 96, 100, 127, 128, 129, 160, 200, 255])
def test_every_kind_of_head_dim(head_dim):
    check_forward((1, 19, 23, 2, 1, head_dim), dict(causal=True), jnp.float32, seed=head_dim)


def test_packed_variants_equal_unpacked():
    q, k, v = random_qkv(3, 2, 21, 21, 4, 4, 32, jnp.float32)
    qkv = jnp.stack([q, k, v], axis=2)
    np.testing.assert_array_equal(
        jf.flash_attn_qkvpacked_func(qkv, causal=True), jf.flash_attn_func(q, k, v, causal=True)
    )
    q, k, v = random_qkv(4, 2, 13, 29, 4, 2, 32, jnp.float32)
    kv = jnp.stack([k, v], axis=2)
    out, lse = jf.flash_attn_kvpacked_func(q, kv, window_size=(4, 4), return_lse=True)
    ref_out, ref_lse = jf.flash_attn_func(q, k, v, window_size=(4, 4), return_lse=True)
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_array_equal(lse, ref_lse)


def test_large_window_equals_no_window():
    q, k, v = random_qkv(5, 1, 40, 40, 2, 2, 16, jnp.float32)
    np.testing.assert_array_equal(
        jf.flash_attn_func(q, k, v, window_size=(1000, 1000)), jf.flash_attn_func(q, k, v)
    )


@pytest.mark.parametrize("case,equivalent", [
    (dict(window_size=(2**63 - 1, 2**63 - 1)), dict(window_size=(-1, -1))),
    (dict(window_size=(-1, 2**63 - 1)), dict(window_size=(-1, -1))),
    (dict(window_size=(2**40, 3)), dict(window_size=(-1, 3))),
    (dict(window_size=(5, 2**63)), dict(window_size=(5, -1))),          # past int64
    (dict(window_size=(2**70, 2**64), causal=True), dict(causal=True)),
], ids=["max_max", "none_max", "2e40_3", "5_2e63", "2e70_2e64_causal"])
@pytest.mark.parametrize("offset", [None, -40, 45])
def test_huge_window_sides_are_unbounded(case, equivalent, offset):
    """A side too wide to mask anything acts as -1: diagonal + side must not overflow int64
    in the kernels, and a side past int64 must not fail to become an attribute."""
    shape = (2, 17, 33, 4, 2, 32)
    case, equivalent = dict(case, diagonal_offset=offset), dict(equivalent, diagonal_offset=offset)

    def reference_equivalent(q, k, v, return_lse, **_):
        return reference_offset(q, k, v, return_lse=return_lse, **equivalent)

    check_forward(shape, case, jnp.float32, seed=9, flash_fn=flash_offset,
                  reference_fn=reference_equivalent)
    q, k, v = random_qkv(9, *shape, jnp.float32)
    for a, b in zip(flash_offset(q, k, v, return_lse=True, **case),
                    flash_offset(q, k, v, return_lse=True, **equivalent)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
