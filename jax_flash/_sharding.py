"""Sharding rules for the kernel calls under jit: batch and heads partition, nothing else.

Attention is independent across batch rows and across key/value head groups, so a call on
arrays sharded over those axes runs as the same call on each device's shard, with no
communication. The sequence axes are different: every query needs every key. A sharded
sequence (or head_dim) axis is gathered before the call, with a one-time warning that
points to ``ring_attention`` (which keeps the sequence sharded) for long sequences.

Heads are split only in whole query groups: q's head axis and the key/value head axis
take the same mesh axes, which must divide num_heads_kv, so every device holds the whole
query group of each of its key/value heads and dk/dv need no cross-device sum. Otherwise
heads are gathered, with a warning.
Written with ``custom_partitioning``: a Shardy rule where Shardy is on (the default on
jax 0.10 and 0.11), and ``infer_sharding_from_operands`` for the older GSPMD partitioner.
"""

from __future__ import annotations

import functools
import math
import warnings

from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from jax_flash import _ffi
from jax_flash._config import KernelConfig

_GATHER_WARNING = (
    "jax_flash: {what} is sharded across devices; attention needs the whole {axis} on each "
    "device, so it is gathered before the call (an all-gather per call). For sequences too "
    "long for one device use jax_flash.ring_attention or ulysses_attention, which keep the "
    "sequence sharded."
)
_warned = set()


def _warn_once(what, axis):
    if axis not in _warned:
        _warned.add(axis)
        warnings.warn(_GATHER_WARNING.format(what=what, axis=axis), stacklevel=2)


def _spec(sharding, ndim):
    spec = tuple(getattr(sharding, "spec", ()) or ())
    return spec + (None,) * (ndim - len(spec))


def _axis_size(mesh, entry):
    if entry is None:
        return 1
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[name] for name in names)


def _plan(mesh, q_shape, k_shape, v_shape):
    """(batch entry, head entry) of the mesh that the call keeps; warns for what it gathers."""
    q_spec, k_spec, v_spec = (_spec(s.sharding, 4) for s in (q_shape, k_shape, v_shape))
    specs = {"q": q_spec, "k": k_spec, "v": v_spec}
    for dim, axis in ((1, "sequence"), (3, "head_dim")):
        sharded = [name for name, spec in specs.items() if spec[dim] is not None]
        if sharded:
            _warn_once(f"the {axis} axis of {', '.join(sharded)}", axis)
    batch_entry = q_spec[0]
    if q_shape.shape[0] % _axis_size(mesh, batch_entry):
        batch_entry = None
    head_entry = q_spec[2] if q_spec[2] is not None else k_spec[2]
    num_heads_kv = k_shape.shape[2]
    if head_entry is not None and num_heads_kv % _axis_size(mesh, head_entry):
        _warn_once(
            f"the head axis (over {_axis_size(mesh, head_entry)} devices, more than the "
            f"{num_heads_kv} key/value heads divide)", "head group")
        head_entry = None
    if batch_entry is not None and head_entry is not None:
        used = set(batch_entry if isinstance(batch_entry, tuple) else (batch_entry,))
        if used & set(head_entry if isinstance(head_entry, tuple) else (head_entry,)):
            head_entry = None
    return batch_entry, head_entry


def _shardings(mesh, batch, heads, layouts):
    """NamedShardings for arrays laid out as 'bshd' (q, k, v, out), 'bhs' (lse), 'bh'
    (slopes), 'bs' (segment ids) or 'bhr' (dropout seeds; r is never sharded)."""
    entries = {"b": batch, "h": heads}
    return tuple(
        NamedSharding(mesh, PartitionSpec(*(entries.get(axis) for axis in layout)))
        for layout in layouts
    )


# The array layouts of each call's operands and results (q-like arrays are 'bshd').
_LAYOUTS = {
    "forward": (("bshd", "bshd", "bshd", "bh", "bs", "bs", "bhr"), ("bshd", "bhs")),
    "backward": (("bshd",) * 5 + ("bhs", "bhs", "bh", "bs", "bs", "bhr"), ("bshd",) * 3),
}


def _rule(kind):
    # Query heads (h) and key/value heads (k) are separate factors: tying them as a compound
    # (k g) lets Shardy split a mesh axis into sub-axes that custom_partitioning cannot hand
    # to the partition callback. The callback reconciles the two (see _plan).
    q, kv, lse, masks = "b s h d", "b t k d", "b h s", "b h, b s, b t, b h r"
    if kind == "forward":
        return f"{q}, {kv}, {kv}, {masks} -> {q}, {lse}"
    return f"{q}, {kv}, {kv}, {q}, {q}, {lse}, {lse}, {masks} -> {q}, {kv}, {kv}"


@functools.lru_cache(maxsize=None)
def _partitioned(kind, config: KernelConfig):
    local_call = functools.partial(_ffi.forward if kind == "forward" else _ffi.backward, config)
    operand_layouts, result_layouts = _LAYOUTS[kind]

    @custom_partitioning
    def call(*operands):
        return local_call(*operands)

    def decide(mesh, arg_shapes):
        batch, heads = _plan(mesh, *arg_shapes[:3])
        return (_shardings(mesh, batch, heads, result_layouts),
                _shardings(mesh, batch, heads, operand_layouts))

    def partition(mesh, arg_shapes, result_shape):
        result_shardings, operand_shardings = decide(mesh, arg_shapes)
        return mesh, local_call, result_shardings, operand_shardings

    def infer_sharding_from_operands(mesh, arg_shapes, result_shape):
        return decide(mesh, arg_shapes)[0]

    call.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer_sharding_from_operands,
        sharding_rule=_rule(kind),
    )
    return call


def forward(config: KernelConfig, *operands):
    """_ffi.forward, partitioned over batch and heads under jit."""
    return tuple(_partitioned("forward", config)(*operands))


def backward(config: KernelConfig, *operands):
    """_ffi.backward, partitioned over batch and heads under jit."""
    return tuple(_partitioned("backward", config)(*operands))
