"""The only place that talks to XLA: registers the handlers and wraps ``jax.ffi.ffi_call``.

Two targets, ``jax_flash_forward`` and ``jax_flash_backward``, each registered for every
platform the extension was built for. Everything above this module (batching, autodiff,
checks) is plain JAX.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_flash import _jax_flash
from jax_flash._config import KernelConfig

FORWARD_TARGET = "jax_flash_forward"
BACKWARD_TARGET = "jax_flash_backward"

_PLATFORM_TARGETS = {"cpu": _jax_flash.cpu_targets(), "CUDA": _jax_flash.cuda_targets()}
for _platform, _targets in _PLATFORM_TARGETS.items():
    for _name, _capsule in _targets.items():
        jax.ffi.register_ffi_target(_name, _capsule, platform=_platform)

HAS_CUDA_KERNELS = bool(_PLATFORM_TARGETS["CUDA"])


def _check_backend():
    if HAS_CUDA_KERNELS:
        return
    default_device = jax.config.jax_default_device
    platform = getattr(default_device, "platform", None) or jax.default_backend()
    if platform == "gpu":
        raise RuntimeError(
            "jax_flash was built without CUDA kernels, but JAX's default backend is GPU. "
            "Rebuild with nvcc on PATH (JAX_FLASH_CUDA=ON pip install .) or run on CPU."
        )


def forward(config: KernelConfig, q, k, v, alibi_slopes):
    """out (like q) and lse (batch, num_heads, seqlen_q) float32; slopes (batch, num_heads)."""
    _check_backend()
    batch, seqlen_q, num_heads, _ = q.shape
    result_shapes = (
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct((batch, num_heads, seqlen_q), jnp.float32),
    )
    # Batching is handled a level up (jax_flash._batching) by folding mapped axes into the
    # batch or head axes, so the FFI call itself is never vmapped.
    call = jax.ffi.ffi_call(FORWARD_TARGET, result_shapes, vmap_method="broadcast_all")
    return call(q, k, v, alibi_slopes, **config.attributes())


def backward(config: KernelConfig, q, k, v, out, dout, lse, dlse, alibi_slopes):
    """dq, dk, dv; dk and dv are summed over each group of query heads (GQA)."""
    _check_backend()
    result_shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))
    call = jax.ffi.ffi_call(BACKWARD_TARGET, result_shapes, vmap_method="broadcast_all")
    return call(q, k, v, out, dout, lse, dlse, alibi_slopes, **config.attributes())
