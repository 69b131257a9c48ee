"""``equinox.nn.MultiheadAttention`` with its attention computed by jax_flash.

Swap the attention of an Equinox model in one line::

    from jax_flash.layers.equinox import MultiheadAttention   # instead of eqx.nn.MultiheadAttention

Fields (``query_proj``, ``key_proj``, ``value_proj``, ``output_proj`` as ``eqx.nn.Linear``,
``dropout``, and the static sizes) and the call are those of ``eqx.nn.MultiheadAttention``:
unbatched inputs, ``jax.vmap`` over the batch.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

try:
    import equinox as eqx
except ImportError as error:  # pragma: no cover - exercised only without equinox installed
    raise ImportError(
        "jax_flash.layers.equinox needs Equinox (equinox>=0.13): "
        'pip install "jax-flash[equinox]" or pip install "equinox>=0.13"'
    ) from error

from jax_flash import _checks
from jax_flash.nn import NO_DROPOUT, Dropout, attend, window_to_local_window


class MultiheadAttention(eqx.Module):
    """Multi-head attention with ``eqx.nn.MultiheadAttention``'s interface, run by jax_flash.

    Arguments as ``eqx.nn.MultiheadAttention`` (``num_heads, query_size, key_size=None,
    value_size=None, output_size=None, qk_size=None, vo_size=None, use_query_bias=False,
    use_key_bias=False, use_value_bias=False, use_output_bias=False, dropout_p=0.0,
    inference=False, dtype=None, *, key``), plus:

      num_kv_heads: key / value heads (default num_heads); fewer gives grouped-query
        attention, and key_proj / value_proj then have num_kv_heads * size outputs.
      causal: query i sees keys j <= i.
      window_size: (left, right) sliding window, -1 = unbounded on that side; with causal,
        right is 0. Aligned top-left (query i sees keys i - left .. i + right).
      softcap: if > 0, scores become softcap * tanh(scores / softcap).

    qk_size must equal vo_size: the kernels use one head dim for queries, keys and values.

    What runs where: attention runs ``jax_flash.nn.attend``, the jax_flash kernels for
    causal / windowed / unmasked attention. A ``mask`` falls back to XLA with a one-time
    ``jax_flash.FallbackWarning``, with equinox's semantics (a row with every key masked
    averages all values, as equinox's does). With ``dropout_p > 0`` outside inference mode
    the kernels drop attention probabilities (``flash_attn_func``'s dropout) with the
    call's ``key``, which is then required, as in equinox; the draws differ from
    equinox's (another generator), the distribution is the same. The GPU kernels take
    float16 / bfloat16: use
    ``dtype=jnp.bfloat16`` there (float32 falls back).
    """

    query_proj: eqx.nn.Linear
    key_proj: eqx.nn.Linear
    value_proj: eqx.nn.Linear
    output_proj: eqx.nn.Linear
    dropout: eqx.nn.Dropout

    num_heads: int = eqx.field(static=True)
    query_size: int = eqx.field(static=True)
    key_size: int = eqx.field(static=True)
    value_size: int = eqx.field(static=True)
    output_size: int = eqx.field(static=True)
    qk_size: int = eqx.field(static=True)
    vo_size: int = eqx.field(static=True)
    use_query_bias: bool = eqx.field(static=True)
    use_key_bias: bool = eqx.field(static=True)
    use_value_bias: bool = eqx.field(static=True)
    use_output_bias: bool = eqx.field(static=True)
    num_kv_heads: int = eqx.field(static=True)
    causal: bool = eqx.field(static=True)
    window_size: tuple[int, int] = eqx.field(static=True)
    softcap: float = eqx.field(static=True)

    def __init__(
        self,
        num_heads: int,
        query_size: int,
        key_size: int | None = None,
        value_size: int | None = None,
        output_size: int | None = None,
        qk_size: int | None = None,
        vo_size: int | None = None,
        use_query_bias: bool = False,
        use_key_bias: bool = False,
        use_value_bias: bool = False,
        use_output_bias: bool = False,
        dropout_p: float = 0.0,
        inference: bool = False,
        dtype=None,
        *,
        num_kv_heads: int | None = None,
        causal: bool = False,
        window_size: tuple[int, int] = (-1, -1),
        softcap: float = 0.0,
        key,
    ):
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        key_size = query_size if key_size is None else key_size
        value_size = query_size if value_size is None else value_size
        output_size = query_size if output_size is None else output_size
        qk_size = query_size // num_heads if qk_size is None else qk_size
        vo_size = query_size // num_heads if vo_size is None else vo_size
        if qk_size != vo_size:
            raise ValueError(
                f"qk_size ({qk_size}) must equal vo_size ({vo_size}): the jax_flash kernels "
                "use one head dim for queries, keys and values"
            )
        if qk_size < 1:
            raise ValueError(f"qk_size must be at least 1, got {qk_size}")
        # The same split and creation order as eqx.nn.MultiheadAttention, so one key gives
        # the same initial weights (with num_kv_heads == num_heads).
        query_key, key_key, value_key, output_key = jax.random.split(key, 4)
        self.query_proj = eqx.nn.Linear(query_size, num_heads * qk_size,
                                        use_bias=use_query_bias, dtype=dtype, key=query_key)
        self.key_proj = eqx.nn.Linear(key_size, num_kv_heads * qk_size,
                                      use_bias=use_key_bias, dtype=dtype, key=key_key)
        self.value_proj = eqx.nn.Linear(value_size, num_kv_heads * vo_size,
                                        use_bias=use_value_bias, dtype=dtype, key=value_key)
        self.output_proj = eqx.nn.Linear(num_heads * vo_size, output_size,
                                         use_bias=use_output_bias, dtype=dtype, key=output_key)
        self.dropout = eqx.nn.Dropout(dropout_p, inference=inference)
        self.num_heads = num_heads
        self.query_size = query_size
        self.key_size = key_size
        self.value_size = value_size
        self.output_size = output_size
        self.qk_size = qk_size
        self.vo_size = vo_size
        self.use_query_bias = use_query_bias
        self.use_key_bias = use_key_bias
        self.use_value_bias = use_value_bias
        self.use_output_bias = use_output_bias
        self.num_kv_heads = num_kv_heads
        self.causal = bool(causal)
        self.window_size = _checks.check_window(window_size, self.causal)
        self.softcap = _checks.check_softcap(softcap)

    def __call__(self, query, key_, value, mask=None, *, key=None, inference=None,
                 deterministic=None, process_heads=None, q_segment_ids=None,
                 kv_segment_ids=None):
        """query (q_seq, query_size), key_ (kv_seq, key_size), value (kv_seq, value_size);
        mask (q_seq, kv_seq) or (num_heads, q_seq, kv_seq), True = attend (falls back to
        XLA). ``key`` and ``inference`` are dropout's. q_segment_ids (q_seq,) and
        kv_segment_ids (kv_seq,), integers (kv_segment_ids defaults to q_segment_ids):
        packed sequences, query i sees key j only where their ids are equal (run by the
        kernels; as the equivalent mask would). Returns (q_seq, output_size)."""
        if deterministic is not None:
            inference = deterministic
            warnings.warn("MultiheadAttention()(deterministic=...) is deprecated in favour of "
                          "MultiheadAttention()(inference=...)")
        dropout = self._dropout(inference, key)
        for name, x in (("query", query), ("key_", key_), ("value", value)):
            if jnp.ndim(x) != 2:
                raise ValueError(
                    f"{name} must be unbatched, (seq_length, features), got shape "
                    f"{jnp.shape(x)}; use jax.vmap over a batch"
                )
        if key_.shape[0] != value.shape[0]:
            raise ValueError("key_ and value must both be sequences of equal length")
        query_heads = self._project(self.query_proj, query, self.num_heads)
        key_heads = self._project(self.key_proj, key_, self.num_kv_heads)
        value_heads = self._project(self.value_proj, value, self.num_kv_heads)
        if process_heads is not None:
            shapes = (query_heads.shape, key_heads.shape, value_heads.shape)
            query_heads, key_heads, value_heads = process_heads(query_heads, key_heads, value_heads)
            if (query_heads.shape, key_heads.shape, value_heads.shape) != shapes:
                raise ValueError("process_heads must not change the shape of the heads")
        if mask is not None:
            mask = jnp.asarray(mask).astype(bool)
            if mask.ndim == 2:
                mask = mask[None]
            if mask.ndim != 3:
                raise ValueError(
                    "mask must have shape (q_seq, kv_seq) or (num_heads, q_seq, kv_seq), "
                    f"got {mask.shape}"
                )
        seqlen_q, seqlen_k = query.shape[0], key_.shape[0]
        window = (self.window_size[0], -1) if self.causal else self.window_size
        attended = attend(
            query_heads, key_heads, value_heads, mask=mask, is_causal=self.causal,
            local_window_size=window_to_local_window(window, seqlen_q, seqlen_k),
            softcap=self.softcap, dropout=dropout,
            segment_ids=None if q_segment_ids is None else (
                q_segment_ids, q_segment_ids if kv_segment_ids is None else kv_segment_ids),
        )
        return jax.vmap(self.output_proj)(attended.reshape(seqlen_q, -1))

    def _dropout(self, inference, key):
        """The call's attention dropout: none in inference mode or at p = 0."""
        if inference is None:
            inference = self.dropout.inference
        p = self.dropout.p
        if inference or (isinstance(p, (int, float)) and p == 0):
            return NO_DROPOUT
        if not isinstance(p, (int, float)):
            raise TypeError(
                f"dropout_p must be a Python number for the jax_flash kernels, got {type(p).__name__}")
        if key is None:
            raise RuntimeError(
                "attention dropout needs a key outside inference mode: pass key=..., or "
                "call with inference=True")
        return Dropout(float(p), key)

    @staticmethod
    def _project(projection, x, num_heads):
        return jax.vmap(projection)(x).reshape(x.shape[0], num_heads, -1)
