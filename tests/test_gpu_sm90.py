"""The Hopper (sm_90a) kernels against a float32 reference on an H100/H200.

On compute capability 9.0, every forward and backward call with head_dim 64, 128 or 256
(without segment ids or dropout) runs the wgmma kernels; this grid covers what they
handle: odd lengths on both sides (partial query and key blocks, TMA zero fill), GQA,
batch and head counts that are not powers of two (the forward's tiles are one flat list,
taken in turn by persistent grids), causal / window masks with softcap and ALiBi, and
both dtypes, with gradients (through out and lse). Elsewhere every test here is skipped
with the reason.
"""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import jax_flash as jf
from helpers import run_selection_in_fresh_process
from test_gpu import GPU, check

HOPPER = bool(GPU) and all(getattr(d, "compute_capability", "") == "9.0" for d in GPU)
pytestmark = pytest.mark.skipif(
    not (HOPPER and jf.HAS_CUDA_KERNELS),
    reason="needs an sm90 GPU (H100/H200) and a jax_flash build with CUDA kernels",
)

# (batch, seqlen_q, seqlen_k, heads, heads_kv); head_dim is the test's parameter.
SHAPES = [(2, 1, 1, 2, 1), (1, 17, 1000, 4, 2), (2, 1000, 17, 2, 2), (1, 1000, 1000, 4, 1),
          (2, 129, 257, 6, 3), (1, 384, 127, 2, 2)]
# softcap_alibi runs the kernels without a window on their general (non-plain) score path.
FEATURES = ["none", "causal", "window", "softcap_alibi", "softcap_alibi_causal", "window_alibi"]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward(shape, head_dim, feature, dtype):
    check(shape + (head_dim,), feature, dtype, gradients=False)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backward(shape, head_dim, feature, dtype):
    """The Hopper backward (keys split between the consumers at 64 and 128, columns at 256),
    every shape and mask."""
    check(shape + (head_dim,), feature, dtype, gradients=True)


@pytest.mark.parametrize("feature", ["none", "causal", "window_alibi"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_backward_deterministic(head_dim, feature):
    """The Hopper backward leaves dQ to the deterministic pass."""
    check((2, 300, 517, 4, 2, head_dim), feature, jnp.bfloat16, gradients=True,
          deterministic=True)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "deterministic"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("feature", ["scale_custom", "scale_negative_causal"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_backward_softmax_scale(head_dim, feature, dtype, deterministic):
    """A softmax scale other than head_dim ** -0.5 reaches P, dK and dQ on both dQ paths:
    another positive scale (the plain path) and a negative one (the general path)."""
    check((2, 300, 517, 4, 2, head_dim), feature, dtype, gradients=True,
          deterministic=deterministic)


# At head dims 64 and 128 a windowed forward takes long-row tiles where the middle query
# row sees 2048 keys or more: causal on the first shape (2049) and the long window on both
# (2149, 2077) do, causal on the second shape (1977) does not.
@pytest.mark.parametrize("shape", [(1, 4096, 4096, 4, 4), (2, 2048, 3000, 8, 2)], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("feature", ["none", "causal", "long_window_softcap_alibi"])
def test_large(shape, head_dim, feature):
    check(shape + (head_dim,), feature, jnp.bfloat16, gradients=True)


@pytest.mark.skipif("JAX_FLASH_CUDA_PERSISTENT_CTAS" in os.environ, reason="already a capped run")
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_on_few_persistent_ctas(direction):
    """The persistent forward and backward on three CTAs (JAX_FLASH_CUDA_PERSISTENT_CTAS,
    read once per process, so in a fresh one): each CTA takes many tiles in a row, fully
    masked ones, partial ones and paired ones included, through one ring of stages (and, in
    the backward, one run of dQ handoffs). The subprocess must run its tests, not skip
    them."""
    run_selection_in_fresh_process(__file__, f"{direction}_tiles_shared",
                                   JAX_FLASH_CUDA_PERSISTENT_CTAS="3",
                                   XLA_PYTHON_CLIENT_PREALLOCATE="false")


FEW_CTAS = pytest.mark.skipif(os.environ.get("JAX_FLASH_CUDA_PERSISTENT_CTAS") != "3",
                              reason="runs in the subprocess of test_on_few_persistent_ctas")


@FEW_CTAS
@pytest.mark.parametrize("feature", ["none", "causal", "window_alibi"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_tiles_shared(shape, head_dim, feature):
    check(shape + (head_dim,), feature, jnp.bfloat16, gradients=False)


@FEW_CTAS
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "deterministic"])
@pytest.mark.parametrize("feature", ["none", "causal", "window_alibi"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("shape", [(2, 1000, 17, 2, 2), (2, 129, 257, 6, 3), (1, 17, 1000, 4, 2),
                                   (5, 200, 300, 4, 2)], ids=str)
def test_backward_tiles_shared(shape, head_dim, feature, deterministic):
    check(shape + (head_dim,), feature, jnp.bfloat16, gradients=True, deterministic=deterministic)


def test_sm80_fallback_agrees(tmp_path):
    """JAX_FLASH_CUDA_SM90=0 runs the sm80 forward on the same GPU; both must be within the
    tolerance of the reference and close to each other."""
    script = (
        "import jax, jax.numpy as jnp, numpy as np, jax_flash as jf\n"
        "from helpers import random_qkv\n"
        "q, k, v = random_qkv(5, 2, 777, 901, 4, 2, 128, jnp.bfloat16)\n"
        "import sys\n"
        "np.save(sys.argv[1], np.asarray(jf.flash_attn_func(q, k, v, causal=True), np.float32))\n")
    outputs = []
    for flag in ("1", "0"):
        env = dict(os.environ, JAX_FLASH_CUDA_SM90=flag, XLA_PYTHON_CLIENT_PREALLOCATE="false")
        path = tmp_path / f"out_{flag}.npy"
        subprocess.run([sys.executable, "-c", script, str(path)], env=env,
                       cwd=os.path.dirname(__file__), check=True)
        outputs.append(np.load(path))
    assert np.all(np.isfinite(outputs[0])) and np.all(np.isfinite(outputs[1]))
    np.testing.assert_allclose(outputs[0], outputs[1], atol=2e-2, rtol=0)
