"""Inputs and the accuracy rule shared by every test.

The rule: against a float64 reference, our error may be at most twice the error of
plain same-precision jax.numpy attention on the same inputs, plus a floor of 4 units in the last place of the dtype at
the result's scale (at least 1). The floor matters only where plain attention is exact by
structure: with one key, its softmax gradient is exactly zero, while the FlashAttention
form (delta = rowsum(dout * out)) leaves rounding noise of an ulp or two.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_flash as jf
from jax_flash.attention import _attention
from jax_flash.reference import reference_attention

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


STATIC_ARGS = ("softmax_scale", "causal", "window_size", "softcap", "return_lse")
# Jitted once per shape: eager op-by-op dispatch would dominate the suite's run time.
flash = jax.jit(jf.flash_attn_func, static_argnames=STATIC_ARGS)
reference = jax.jit(reference_attention, static_argnames=STATIC_ARGS)
# The private op with a movable mask diagonal, which the layers and ring attention build on.
flash_offset = jax.jit(_attention, static_argnames=STATIC_ARGS + ("diagonal_offset",))
reference_offset = jax.jit(reference_attention, static_argnames=STATIC_ARGS + ("diagonal_offset",))


def random_qkv(seed, batch, seqlen_q, seqlen_k, num_heads, num_heads_kv, head_dim, dtype):
    rng = np.random.default_rng(seed)
    shapes = [(batch, seqlen_q, num_heads, head_dim)] + [(batch, seqlen_k, num_heads_kv, head_dim)] * 2
    return tuple(jnp.asarray(rng.standard_normal(s, np.float32)).astype(dtype) for s in shapes)


def alibi_slopes_for(num_heads, batch=None, seed=7):
    slopes = 2.0 ** (-8.0 * (np.arange(num_heads) + 1) / num_heads)
    if batch is not None:
        jitter = np.random.default_rng(seed).uniform(0.5, 1.5, (batch, num_heads))
        slopes = slopes[None, :] * jitter
    return jnp.asarray(slopes, jnp.float32)


def to64(x):
    return jnp.asarray(x).astype(jnp.float64)


def max_error(actual, expected):
    actual, expected = np.asarray(to64(actual)), np.asarray(to64(expected))
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    both_inf = np.isinf(actual) & np.isinf(expected) & (np.sign(actual) == np.sign(expected))
    with np.errstate(invalid="ignore"):  # inf - inf where both are the same infinity
        diff = np.where(both_inf, 0.0, np.abs(actual - expected))
    return float(np.max(diff)) if diff.size else 0.0


def assert_within_twice_plain(name, ours, plain, exact, dtype):
    assert not np.any(np.isnan(np.asarray(to64(ours)))), f"{name}: NaN in the kernel's result"
    err_ours, err_plain = max_error(ours, exact), max_error(plain, exact)
    finite = np.asarray(to64(exact))
    scale = float(np.max(np.abs(finite[np.isfinite(finite)]), initial=1.0))
    floor = 4 * float(jnp.finfo(dtype).eps) * max(scale, 1.0)
    assert err_ours <= 2 * err_plain + floor, (
        f"{name}: error {err_ours:.3e} vs float64 exceeds twice the plain {jnp.dtype(dtype).name} "
        f"attention error {err_plain:.3e} (+4 ulp {floor:.1e})"
    )


def attention_kwargs(case):
    """The subset of a feature-grid case that both flash_attn_func and the reference take."""
    keys = ("softmax_scale", "causal", "window_size", "softcap", "alibi_slopes", "diagonal_offset",
            "q_segment_ids", "kv_segment_ids")
    return {k: case[k] for k in keys if k in case}


def losses(kwargs, flash_fn=None, reference_fn=None):
    """Scalar losses through out and lse with fixed random cotangents, for jf and reference."""

    def make(fn):
        def loss(q, k, v, out_cotangent, lse_cotangent):
            out, lse = fn(q, k, v, return_lse=True, **kwargs)
            lse = jnp.where(jnp.isinf(lse), 0.0, lse)
            return jnp.sum(out.astype(jnp.float64) * out_cotangent) + jnp.sum(
                lse.astype(jnp.float64) * lse_cotangent
            )

        return loss

    return make(flash_fn or flash), make(reference_fn or reference)


def run_selection_in_fresh_process(test_file, selection, workers=4, **environment):
    """Runs `pytest -k selection` on test_file in a fresh process with extra environment
    variables (settings the library reads once per process, such as the GPU test aids) and
    asserts that its tests ran and passed: a skip there would hide the case it exists for.
    With pytest-xdist installed the selection runs on `workers` processes, each started with
    the same environment: one process took over 140 s for the 72 cases of the three-CTA
    backward (device calls of 2026-12-06), more than a device step allows."""
    test_file = os.path.abspath(test_file)
    parallel = ["-n", str(workers)] if workers > 1 and importlib.util.find_spec("xdist") else []
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *parallel, "-k",
         selection, test_file],
        env=dict(os.environ, **environment), capture_output=True, text=True,
        cwd=os.path.dirname(test_file))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]
