"""jax_flash: FlashAttention for JAX."""

from jax_flash._ffi import HAS_CUDA_KERNELS
from jax_flash.attention import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
)
from jax_flash.dropout import dropout_mask
from jax_flash.kvcache import flash_attn_with_kvcache
from jax_flash.nn import FallbackWarning, dot_product_attention
from jax_flash.reference import reference_attention
from jax_flash.reference_kvcache import reference_attn_with_kvcache
from jax_flash.varlen import (
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from jax_flash.sequence_parallel import (
    ring_attention,
    ring_dropout_mask,
    sequence_parallel_attention,
    sequence_permutation,
    ulysses_attention,
)

__version__ = "0.1.0"

__all__ = [
    "FallbackWarning",
    "HAS_CUDA_KERNELS",
    "dot_product_attention",
    "dropout_mask",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "reference_attention",
    "reference_attn_with_kvcache",
    "ring_attention",
    "ring_dropout_mask",
    "sequence_parallel_attention",
    "sequence_permutation",
    "ulysses_attention",
]
