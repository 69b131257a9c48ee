"""The only place that talks to XLA: registers the handlers and wraps ``jax.ffi.ffi_call``.

Two targets, ``jax_flash_forward`` and ``jax_flash_backward``, each registered for every
platform the extension was built for. Everything above this module (batching, autodiff,
checks) is plain JAX.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_flash import _jax_flash
from jax_flash._config import KernelConfig

FORWARD_TARGET = "jax_flash_forward"
BACKWARD_TARGET = "jax_flash_backward"

_PLATFORM_TARGETS = {"cpu": _jax_flash.cpu_targets(), "CUDA": _jax_flash.cuda_targets()}
for _platform, _targets in _PLATFORM_TARGETS.items():
    for _name, _capsule in _targets.items():
        jax.ffi.register_ffi_target(_name, _capsule, platform=_platform)

HAS_CUDA_KERNELS = bool(_PLATFORM_TARGETS["CUDA"])


def _target_platform():
    """Where the call will run: the default device's platform (what jit compiles for)."""
    default_device = jax.config.jax_default_device
    return getattr(default_device, "platform", None) or jax.default_backend()


def _check_platform(dtype):
    """Trace-time errors for calls the kernels of the target platform cannot run."""
    if _target_platform() != "gpu":
        return
    if not HAS_CUDA_KERNELS:
        raise RuntimeError(
            "jax_flash was built without CUDA kernels, but JAX's default backend is GPU. "
            "Rebuild with nvcc on PATH (JAX_FLASH_CUDA=ON pip install .) or run on CPU."
        )
    if jnp.dtype(dtype) == jnp.float32:
        raise TypeError(
            "q, k and v are float32, but the jax_flash CUDA kernels take float16 or bfloat16: "
            "cast them (e.g. q.astype(jnp.bfloat16)); float32 attention runs on the CPU backend"
        )


def forward(config: KernelConfig, q, k, v, alibi_slopes, q_segment_ids, kv_segment_ids,
            dropout_seeds):
    """out (like q) and lse (batch, num_heads, seqlen_q) float32.

    The mask operands are always passed, in full shape: slopes (batch, num_heads) float32,
    segment ids (batch, seqlen_q) and (batch, seqlen_k) int32, dropout seeds
    (batch, num_heads, 2) uint32; the config says which are on.
    """
    _check_platform(q.dtype)
    batch, seqlen_q, num_heads, _ = q.shape
    result_shapes = (
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct((batch, num_heads, seqlen_q), jnp.float32),
    )
    # Batching is handled a level up (jax_flash._batching) by folding mapped axes into the
    # batch or head axes, so the FFI call itself is never vmapped.
    call = jax.ffi.ffi_call(FORWARD_TARGET, result_shapes, vmap_method="broadcast_all")
    return call(q, k, v, alibi_slopes, q_segment_ids, kv_segment_ids, dropout_seeds,
                **config.attributes())


def _round_up(nbytes, alignment=256):
    return -(-nbytes // alignment) * alignment


def _cuda_backward_workspace_bytes(q):
    """Mirrors cuda::backward_workspace_bytes (the handler checks the size it is given):
    delta and lse * log2(e), each (batch, num_heads, seqlen_q rounded up to 4), and the dQ
    accumulator (batch, num_heads, seqlen_q, head_dim), all float32."""
    batch, seqlen_q, num_heads, head_dim = q.shape
    stats_stride = -(-seqlen_q // 4) * 4
    return (2 * _round_up(batch * num_heads * stats_stride * 4)
            + _round_up(batch * num_heads * seqlen_q * head_dim * 4))


def backward(config: KernelConfig, q, k, v, out, dout, lse, dlse, alibi_slopes, q_segment_ids,
             kv_segment_ids, dropout_seeds):
    """dq, dk, dv; dk and dv are summed over each group of query heads (GQA)."""
    _check_platform(q.dtype)
    grad_shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))
    attributes = config.attributes()

    def on_cpu(*operands):
        call = jax.ffi.ffi_call(BACKWARD_TARGET, grad_shapes, vmap_method="broadcast_all")
        return call(*operands, **attributes)

    def on_cuda(*operands):
        # The CUDA backward's float32 scratch comes back as an extra result, which XLA
        # allocates (and reuses) like any other buffer; the caller drops it.
        workspace = jax.ShapeDtypeStruct((_cuda_backward_workspace_bytes(q),), jnp.uint8)
        call = jax.ffi.ffi_call(BACKWARD_TARGET, grad_shapes + (workspace,),
                                vmap_method="broadcast_all")
        return tuple(call(*operands, **attributes)[:3])

    # Only the branch of the platform being compiled for is lowered.
    return jax.lax.platform_dependent(q, k, v, out, dout, lse, dlse, alibi_slopes,
                                      q_segment_ids, kv_segment_ids, dropout_seeds, cpu=on_cpu,
                                      cuda=on_cuda)


# ---- KV cache (flash_attn_with_kvcache) ----

KVCACHE_FORWARD_TARGET = "jax_flash_kvcache_forward"


def kvcache_forward(config, q, k_cache, v_cache, alibi_slopes, seqlens_k, kv_batch_idx,
                    block_table):
    """out (like q) and lse (batch, num_heads, seqlen_q) float32 of q against caches read in
    place: k_cache / v_cache (batch_cache, seqlen_cache, heads_kv, head_dim) or, paged,
    (num_blocks, page_size, heads_kv, head_dim). Every operand is always passed; the config
    (a jax_flash.kvcache.KvCacheConfig) says which are on, and those that are off are cheap
    placeholders (csrc/ffi/decode_kvcache.h checks their shapes):
      alibi_slopes: (batch, num_heads) float32 with ALiBi, else an empty (0,) float32 array;
      seqlens_k: (batch,) int32, the keys each row sees (always used);
      kv_batch_idx: (batch,) int32 with cache_batch_idx, else any (batch,) int32 array
        (flash_attn_with_kvcache passes seqlens_k itself);
      block_table: (batch, max_blocks) int32 when paged, else any (batch, n) int32 array
        (flash_attn_with_kvcache passes seqlens_k[:, None]).
    """
    _check_platform(q.dtype)
    batch, seqlen_q, num_heads, _ = q.shape
    result_shapes = (
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct((batch, num_heads, seqlen_q), jnp.float32),
    )
    operands = (q, k_cache, v_cache, alibi_slopes, seqlens_k, kv_batch_idx, block_table)

    # Under vmap: one call per mapped element (the caches are shared pools, so the mapped
    # axis cannot simply fold into the batch).
    def on_cpu(*operands):
        call = jax.ffi.ffi_call(KVCACHE_FORWARD_TARGET, result_shapes, vmap_method="sequential")
        return tuple(call(*operands, **config.attributes()))

    def on_cuda(*operands):
        # The split count is fixed here, at trace time, because it sizes the workspace
        # result (each split's float32 rows and lse), which XLA allocates like any buffer.
        capacity = block_table.shape[1] * k_cache.shape[1] if config.has_block_table else k_cache.shape[1]
        splits = config.num_splits or kvcache_num_splits(
            batch, k_cache.shape[2], seqlen_q * (num_heads // k_cache.shape[2]), q.shape[3],
            capacity, _gpu_sm_count())
        attributes = dict(config.attributes(), num_splits=np.int64(splits))
        workspace = jax.ShapeDtypeStruct((_kvcache_workspace_bytes(q, splits),), jnp.uint8)
        call = jax.ffi.ffi_call(KVCACHE_FORWARD_TARGET, result_shapes + (workspace,),
                                vmap_method="sequential")
        return tuple(call(*operands, **attributes)[:2])

    return jax.lax.platform_dependent(*operands, cpu=on_cpu, cuda=on_cuda)


MAX_KVCACHE_SPLITS = 128  # csrc/cuda/dispatch.cu checks the same


def kvcache_num_splits(batch, num_heads_kv, rows, head_dim, capacity, sm_count):
    """How many slices of the keys the CUDA kernel splits each (batch row, KV head, row
    block) into: enough CTAs to fill every SM when the call alone would leave SMs idle (decoding
    a few long sequences), none when it fills the GPU, and at least 4 key blocks (256 keys)
    per slice. Mirrors the kernel's tile shapes (csrc/cuda/kvcache_kernel.cuh): 16 rows per
    CTA up to 16 rows, else 128 (64 above head dim 128)."""
    decode = rows <= 16
    rows_per_cta = 16 if decode else (64 if head_dim > 128 else 128)
    row_blocks = -(-rows // rows_per_cta)
    ctas = batch * num_heads_kv * row_blocks
    # CTAs that fit an SM (shared memory): decode 3, prefill 2, either 1 above head dim 128.
    slots = (1 if head_dim > 128 else 3 if decode else 2) * sm_count
    if ctas == 0 or ctas >= 0.8 * slots:
        return 1
    key_blocks = -(-capacity // 64)
    return int(max(1, min(slots // ctas, key_blocks // 4, MAX_KVCACHE_SPLITS)))


def _gpu_sm_count():
    """SMs of the first GPU (what split-KV fills); 132 (an H100) when JAX does not say."""
    gpus = [d for d in jax.devices() if d.platform == "gpu"] if jax.default_backend() == "gpu" else []
    return int(getattr(gpus[0], "core_count", 0) or 132) if gpus else 132


def _kvcache_workspace_bytes(q, num_splits):
    """Mirrors cuda::kvcache_workspace_bytes: each split's rows (float32) and lse."""
    if num_splits <= 1:
        return 1  # XLA wants a nonzero buffer; the kernels do not touch it
    batch, seqlen_q, num_heads, head_dim = q.shape
    rows = num_splits * batch * num_heads * seqlen_q
    return _round_up(rows * head_dim * 4) + _round_up(rows * 4)
