"""The static part of an attention call: everything the kernels take as attributes."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Hashable, so it can be a nondiff argument of custom_vjp and a cache key.

    ``window_right == 0`` is how causal attention reaches the kernels: one masking
    mechanism serves causal and sliding-window attention. ``diagonal_offset`` is the key
    aligned with query 0 (``seqlen_k - seqlen_q`` for FlashAttention's bottom-right masks).
    """

    softmax_scale: float
    softcap: float
    window_left: int
    window_right: int
    diagonal_offset: int
    has_alibi: bool
    has_segment_ids: bool = False
    deterministic: bool = False
    # Dropout (jax_flash.dropout): on when has_dropout; the 16-bit draw below which a
    # probability is kept, and the factor kept probabilities are multiplied by.
    has_dropout: bool = False
    dropout_keep_threshold: int = 1 << 16
    dropout_scale: float = 1.0

    def attributes(self) -> dict:
        import numpy as np

        return dict(
            softmax_scale=np.float32(self.softmax_scale),
            softcap=np.float32(self.softcap),
            window_left=np.int64(self.window_left),
            window_right=np.int64(self.window_right),
            diagonal_offset=np.int64(self.diagonal_offset),
            has_alibi=bool(self.has_alibi),
            has_segment_ids=bool(self.has_segment_ids),
            deterministic=bool(self.deterministic),
            has_dropout=bool(self.has_dropout),
            dropout_keep_threshold=np.int64(self.dropout_keep_threshold),
            dropout_scale=np.float32(self.dropout_scale),
        )
