"""``flax.nnx.MultiHeadAttention`` with its attention computed by jax_flash.

Swap the attention of an NNX model in one line::

    from jax_flash.layers.flax import MultiHeadAttention   # instead of nnx.MultiHeadAttention

The constructor, the call, the parameter tree (``query``, ``key``, ``value`` and ``out``
``nnx.LinearGeneral``; ``query_ln`` / ``key_ln`` with ``normalize_qk``) and the decode cache
(``cached_key``, ``cached_value``, ``cache_index``) are those of ``nnx.MultiHeadAttention``,
so weights and checkpoints move between the two unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

try:
    from flax import nnx
    from flax.nnx.nn import dtypes as _nnx_dtypes
except ImportError as error:  # pragma: no cover - exercised only without flax installed
    raise ImportError(
        "jax_flash.layers.flax needs Flax with NNX (flax>=0.12.8): "
        'pip install "jax-flash[flax]" or pip install "flax>=0.12.8"'
    ) from error

from jax_flash import _checks
from jax_flash.kvcache import flash_attn_with_kvcache
from jax_flash.nn import NO_DROPOUT, Dropout, attend, kernels_take, window_to_local_window

_default_kernel_init = nnx.initializers.lecun_normal()
_NO_METADATA = MappingProxyType({})


def _first_set(*values):
    for value in values:
        if value is not None:
            return value
    return None


def cached_attention(query, cached_key, cached_value, first_position, *, scale, softcap,
                     window_left, mask=None):
    """Plain jnp attention of new queries over a KV cache: the decode step where the
    kernels cannot run it (a dense mask, float32 on a GPU).

    query: (batch, new, num_heads, head_dim) at absolute positions first_position + t;
    cached_key / cached_value: (batch, max_length, num_kv_heads, head_dim), already holding
    the new keys. Query t sees cache slot j iff j <= first_position + t (and within the
    window).
    """
    batch, new, num_heads, head_dim = query.shape
    max_length, num_kv_heads = cached_key.shape[1], cached_key.shape[2]
    group = num_heads // num_kv_heads
    grouped_query = query.reshape(batch, new, num_kv_heads, group, head_dim)
    logits = jnp.einsum("btkgh,bskh->bkgts", grouped_query, cached_key,
                        preferred_element_type=jnp.float32) * scale
    if softcap > 0:
        logits = softcap * jnp.tanh(logits / softcap)
    position = first_position + jnp.arange(new)[:, None]
    slot = jnp.arange(max_length)[None, :]
    visible = slot <= position
    if window_left >= 0:
        visible &= slot >= position - window_left
    visible = visible[None, None, None]
    if mask is not None:
        mask = jnp.broadcast_to(mask, (batch, num_heads, new, max_length))
        visible = visible & mask.reshape(batch, num_kv_heads, group, new, max_length)
    logits = jnp.where(visible, logits, -0.7 * float(jnp.finfo(jnp.float32).max))
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, cached_value.astype(jnp.float32))
    return out.reshape(batch, new, num_heads, head_dim).astype(query.dtype)


class MultiHeadAttention(nnx.Module):
    """Multi-head attention with ``nnx.MultiHeadAttention``'s interface, run by jax_flash.

    Arguments as ``nnx.MultiHeadAttention`` (``num_heads, in_features, qkv_features=None,
    out_features=None, num_kv_heads=None, in_kv_features=None, *, dtype, param_dtype,
    broadcast_dropout, dropout_rate, deterministic, precision, kernel_init, out_kernel_init,
    bias_init, out_bias_init, use_bias, decode, normalize_qk, qkv_promote_dtype,
    out_promote_dtype, ln_promote_dtype, rngs, keep_rngs`` and the metadata dicts), plus:

      causal: mask future keys in every call (the call's ``is_causal`` also does).
      window_size: (left, right) sliding window, -1 = unbounded on that side; with causal,
        right is 0. Aligned top-left (query i sees keys i - left .. i + right), like
        jax.nn.dot_product_attention.
      softcap: if > 0, scores become softcap * tanh(scores / softcap).

    Not taken: ``attention_fn`` (the point of this layer is to fix it) and the deprecated
    ``qkv_dot_general*`` / ``out_dot_general*`` arguments.

    What runs where:
      - Attention runs ``jax_flash.nn.attend``: the jax_flash kernels for causal / windowed
        / unmasked attention; a ``mask`` falls back to XLA with a one-time
        ``jax_flash.FallbackWarning`` (see ``jax_flash.dot_product_attention``). The GPU
        kernels take float16 / bfloat16: use ``dtype=jnp.bfloat16`` there (float32 falls
        back).
      - Dropout: with ``dropout_rate > 0`` and ``deterministic=False`` the kernels drop
        attention probabilities (``flash_attn_func``'s dropout) with a key from the call's
        ``rngs.dropout()`` or, with ``keep_rngs``, the layer's own stream, as nnx does.
        ``broadcast_dropout=True`` (nnx's default) shares one mask across the batch
        dimensions; heads always get their own. The draws differ from nnx's (another
        generator), the distribution is the same. Decode mode with dropout raises
        NotImplementedError.
      - ``sow_weights=True`` raises NotImplementedError: the kernels never form the weights.
      - Decode (``init_cache`` then ``decode=True``): each call appends its tokens to the
        cache at ``cache_index`` and attends causally over the cache (query t sees slots up
        to its own position). A call that starts at index 0 (the prefill) runs the
        attention kernels on its own tokens; a later call (usually one token) runs
        ``flash_attn_with_kvcache`` over the cache's first ``cache_index`` slots, which
        takes the traced index as the row's key count. With a ``mask`` (or where the
        kernels do not take the dtype) it runs plain jnp attention over the cache instead,
        with the one-time FallbackWarning. Unlike nnx, a decode call may hold several
        tokens.
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        qkv_features: int | None = None,
        out_features: int | None = None,
        num_kv_heads: int | None = None,
        in_kv_features: int | None = None,
        *,
        causal: bool = False,
        window_size: tuple[int, int] = (-1, -1),
        softcap: float = 0.0,
        dtype=None,
        param_dtype=jnp.float32,
        broadcast_dropout: bool = True,
        dropout_rate: float = 0.0,
        deterministic: bool | None = None,
        precision=None,
        kernel_init=_default_kernel_init,
        out_kernel_init=None,
        bias_init=nnx.initializers.zeros_init(),
        out_bias_init=None,
        use_bias: bool = True,
        decode: bool | None = None,
        normalize_qk: bool = False,
        qkv_promote_dtype=_nnx_dtypes.promote_dtype,
        out_promote_dtype=_nnx_dtypes.promote_dtype,
        ln_promote_dtype=_nnx_dtypes.promote_dtype,
        rngs: nnx.Rngs,
        keep_rngs: bool = True,
        kernel_metadata: Mapping = _NO_METADATA,
        out_kernel_metadata: Mapping = _NO_METADATA,
        bias_metadata: Mapping = _NO_METADATA,
        out_bias_metadata: Mapping = _NO_METADATA,
        query_ln_scale_metadata: Mapping = _NO_METADATA,
        key_ln_scale_metadata: Mapping = _NO_METADATA,
    ):
        self.num_heads = num_heads
        self.in_features = in_features
        self.qkv_features = in_features if qkv_features is None else qkv_features
        self.out_features = in_features if out_features is None else out_features
        self.in_kv_features = in_features if in_kv_features is None else in_kv_features
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.qkv_features % self.num_heads != 0:
            raise ValueError(
                f"qkv_features ({self.qkv_features}) must be divisible by num_heads "
                f"({self.num_heads})"
            )
        self.head_dim = self.qkv_features // self.num_heads
        self.causal = bool(causal)
        # Validated now (the call would only find out at trace time); right = 0 under causal.
        self.window_size = _checks.check_window(window_size, self.causal)
        self.softcap = _checks.check_softcap(softcap)
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.broadcast_dropout = broadcast_dropout
        self.dropout_rate = dropout_rate
        self.deterministic = deterministic
        self.precision = precision
        self.use_bias = use_bias
        self.decode = decode
        self.normalize_qk = normalize_qk

        def projection(in_features, out_features, **overrides):
            settings = dict(
                dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init,
                bias_init=bias_init, use_bias=use_bias, precision=precision,
                promote_dtype=qkv_promote_dtype, kernel_metadata=kernel_metadata,
                bias_metadata=bias_metadata, rngs=rngs,
            )
            settings.update(overrides)
            return nnx.LinearGeneral(in_features, out_features, **settings)

        # Created in nnx.MultiHeadAttention's order, so that one Rngs seed gives the same
        # initial weights in both layers.
        self.query = projection(in_features, (self.num_heads, self.head_dim))
        self.key = projection(self.in_kv_features, (self.num_kv_heads, self.head_dim))
        self.value = projection(self.in_kv_features, (self.num_kv_heads, self.head_dim))
        if normalize_qk:
            def head_norm(scale_metadata):
                return nnx.LayerNorm(
                    self.head_dim, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                    promote_dtype=ln_promote_dtype, rngs=rngs, scale_metadata=scale_metadata,
                )

            self.query_ln = head_norm(query_ln_scale_metadata)
            self.key_ln = head_norm(key_ln_scale_metadata)
        else:
            self.query_ln = nnx.data(None)
            self.key_ln = nnx.data(None)
        self.out = projection(
            (self.num_heads, self.head_dim), self.out_features, axis=(-2, -1),
            kernel_init=out_kernel_init or kernel_init, bias_init=out_bias_init or bias_init,
            promote_dtype=out_promote_dtype,
            kernel_metadata=out_kernel_metadata or kernel_metadata,
            bias_metadata=out_bias_metadata or bias_metadata,
        )
        self.rngs = rngs.dropout.fork() if keep_rngs and dropout_rate > 0 else None
        self.cached_key = nnx.data(None)
        self.cached_value = nnx.data(None)
        self.cache_index = nnx.data(None)

    def __call__(
        self,
        inputs_q,
        inputs_k=None,
        inputs_v=None,
        *,
        mask=None,
        deterministic: bool | None = None,
        rngs=None,
        sow_weights: bool = False,
        decode: bool | None = None,
        is_causal: bool = False,
        out_sharding=None,
        qkv_sharding=None,
        q_segment_ids=None,
        kv_segment_ids=None,
    ):
        """inputs_q (batch..., length, in_features); inputs_k / inputs_v default to
        inputs_q / inputs_k. mask: boolean, broadcastable to (batch..., num_heads,
        q_length, kv_length), True = attend (falls back to XLA). q_segment_ids (batch...,
        q_length) and kv_segment_ids (batch..., kv_length), integers (kv_segment_ids
        defaults to q_segment_ids): packed sequences, query i sees key j only where their
        ids are equal (run by the kernels; as the equivalent mask would). Returns
        (batch..., length, out_features)."""
        if inputs_k is None:
            if inputs_v is not None:
                raise ValueError(
                    "inputs_k cannot be None when inputs_v is given: pass the same array as "
                    "inputs_k and leave inputs_v None"
                )
            inputs_k = inputs_q
        if inputs_v is None:
            inputs_v = inputs_k
        if inputs_q.shape[-1] != self.in_features:
            raise ValueError(
                f"inputs_q has {inputs_q.shape[-1]} features, the layer expects "
                f"in_features = {self.in_features}"
            )
        if sow_weights:
            raise NotImplementedError(
                "sow_weights=True: jax_flash never forms the attention weights; use "
                "nnx.MultiHeadAttention to inspect them"
            )
        dropout = self._dropout(deterministic, rngs)

        sharding = {} if qkv_sharding is None else {"out_sharding": qkv_sharding}
        query = self.query(inputs_q, **sharding)
        key = self.key(inputs_k, **sharding)
        value = self.value(inputs_v, **sharding)
        if self.normalize_qk:
            query, key = self.query_ln(query), self.key_ln(key)
        query, key, value = (x.astype(jnp.result_type(query, key, value)) for x in (query, key, value))

        if kv_segment_ids is None:
            kv_segment_ids = q_segment_ids
        segment_ids = None if q_segment_ids is None else (q_segment_ids, kv_segment_ids)
        if _first_set(decode, self.decode):
            if dropout.rate > 0:
                raise NotImplementedError(
                    "attention dropout in decode mode: call with deterministic=True")
            if segment_ids is not None:
                raise NotImplementedError(
                    "segment ids in decode mode (the cache keeps no ids): give the prefill "
                    "without decode, or a mask")
            attended = self._decode_step(query, key, value, mask)
        else:
            attended = self._attend(query, key, value, mask, self.causal or bool(is_causal),
                                    dropout, segment_ids)
        sharding = {} if out_sharding is None else {"out_sharding": out_sharding}
        return self.out(attended, **sharding)

    def _dropout(self, deterministic, rngs):
        """The call's attention dropout: none when deterministic, else a key drawn as nnx
        draws it (the call's rngs first, then the layer's kept stream)."""
        if self.dropout_rate == 0.0:
            return NO_DROPOUT
        deterministic = _first_set(deterministic, self.deterministic)
        if deterministic is None:
            raise ValueError(
                "dropout_rate > 0 needs `deterministic`, given to the call or the constructor"
            )
        if deterministic:
            return NO_DROPOUT
        if rngs is None and self.rngs is None:
            raise ValueError(
                "dropout needs a key: pass rngs to the call (the layer was built with "
                "keep_rngs=False)"
            )
        key = rngs.dropout() if rngs is not None else self.rngs()
        return Dropout(self.dropout_rate, key, bool(self.broadcast_dropout))

    def _attend(self, query, key, value, mask, causal, dropout=NO_DROPOUT, segment_ids=None):
        """Attention over (batch..., length, heads, head_dim), flattening batch dims."""
        batch_shape = query.shape[:-3]
        seqlen_q, seqlen_k = query.shape[-3], key.shape[-3]
        flat = lambda x: x.reshape((-1, *x.shape[-3:]))  # noqa: E731
        if mask is not None:
            mask = jnp.asarray(mask).astype(bool)
            mask = mask.reshape((1,) * (len(batch_shape) + 3 - mask.ndim) + mask.shape)
            mask = flat(jnp.broadcast_to(mask, batch_shape + mask.shape[-3:]))
        if segment_ids is not None:
            flat_ids = []
            for name, ids, length in (("q_segment_ids", segment_ids[0], seqlen_q),
                                      ("kv_segment_ids", segment_ids[1], seqlen_k)):
                shape = _checks.array_shape(ids, name)
                if shape != (*batch_shape, length):
                    raise ValueError(f"{name} must have shape (batch..., length) = "
                                     f"{(*batch_shape, length)}, got {shape}")
                flat_ids.append(jnp.asarray(ids).reshape(-1, length))
            segment_ids = tuple(flat_ids)
        # Under causal the right side is implied; leaving it unbounded here keeps a plain
        # causal call free of any window.
        window = (self.window_size[0], -1) if causal else self.window_size
        out = attend(
            flat(query), flat(key), flat(value), mask=mask, is_causal=causal,
            local_window_size=window_to_local_window(window, seqlen_q, seqlen_k),
            softcap=self.softcap, dropout=dropout, segment_ids=segment_ids,
        )
        return out.reshape(query.shape)

    def _decode_step(self, query, key, value, mask):
        if self.cached_key is None or self.cached_value is None or self.cache_index is None:
            raise ValueError("the decode cache is not initialized: call init_cache first")
        cache_shape = self.cached_key.shape
        batch_shape, max_length = cache_shape[:-3], cache_shape[-3]
        new = key.shape[-3]
        if key.shape[:-3] != batch_shape or key.shape[-2:] != cache_shape[-2:] or new > max_length:
            raise ValueError(
                f"decode inputs give keys of shape {key.shape}, which do not fit the cache "
                f"{cache_shape} (batch..., max_length, num_kv_heads, head_dim)"
            )
        first_position = self.cache_index[...]
        zero = jnp.zeros((), first_position.dtype)
        start = (zero,) * len(batch_shape) + (first_position, zero, zero)
        cache_dtype = self.cached_key.dtype
        self.cached_key[...] = lax.dynamic_update_slice(self.cached_key[...], key.astype(cache_dtype), start)
        self.cached_value[...] = lax.dynamic_update_slice(self.cached_value[...], value.astype(cache_dtype), start)
        self.cache_index[...] = first_position + new

        flat = lambda x: x.reshape((-1, *x.shape[-3:]))  # noqa: E731
        if mask is not None:
            mask = jnp.asarray(mask).astype(bool)
            mask = mask.reshape((1,) * (len(batch_shape) + 3 - mask.ndim) + mask.shape)
            mask = flat(jnp.broadcast_to(mask, batch_shape + mask.shape[-3:]))

        all_keys, all_values = self.cached_key[...], self.cached_value[...]
        scale = 1.0 / float(np.sqrt(self.head_dim))

        def over_cache(query):
            keys, values = (flat(x).astype(query.dtype) for x in (all_keys, all_values))
            if kernels_take(query, mask):
                # Causal from the bottom right of the row's first_position + new keys: query
                # t sees slots up to first_position + t, as below.
                key_counts = jnp.full((keys.shape[0],), first_position + new, jnp.int32)
                out = flash_attn_with_kvcache(
                    flat(query), keys, values, cache_seqlens=key_counts, softmax_scale=scale,
                    causal=True, window_size=(self.window_size[0], 0), softcap=self.softcap)
            else:
                out = cached_attention(
                    flat(query), keys, values, first_position, scale=scale,
                    softcap=self.softcap, window_left=self.window_size[0], mask=mask)
            return out.reshape(query.shape)

        if new == 1 or mask is not None:
            return over_cache(query)

        def prefill(query):
            # From an empty cache the new tokens see only each other, causally: exactly what
            # the kernels compute with equal lengths.
            return self._attend(query, key.astype(query.dtype), value.astype(query.dtype), None, True)

        return lax.cond(first_position == 0, prefill, over_cache, query)

    def init_cache(self, input_shape, dtype=jnp.float32):
        """Allocates the decode cache for inputs of shape (batch..., max_length, features)."""
        cache_shape = (*input_shape[:-1], self.num_kv_heads, self.head_dim)
        self.cached_key = nnx.Cache(jnp.zeros(cache_shape, dtype))
        self.cached_value = nnx.Cache(jnp.zeros(cache_shape, dtype))
        self.cache_index = nnx.Cache(jnp.array(0, dtype=jnp.int32))

    def set_view(self, deterministic=None, decode=None, batch_size=None, max_length=None):
        """Used by ``nnx.view``, as in nnx.MultiHeadAttention: sets the modes and allocates
        the cache (batch_size and max_length needed) when decode is switched on."""
        if deterministic is not None:
            self.deterministic = deterministic
        if decode is not None:
            self.decode = decode
            if decode and self.cached_key is None:
                if batch_size is None or max_length is None:
                    raise TypeError("batch_size and max_length are needed to allocate the cache")
                batch_shape = (batch_size,) if isinstance(batch_size, int) else tuple(batch_size)
                self.init_cache((*batch_shape, max_length, self.in_features),
                                self.dtype or jnp.float32)
