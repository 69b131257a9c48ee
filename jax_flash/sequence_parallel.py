"""Sequence parallelism inside shard_map: ring attention and Ulysses (all-to-all) attention.

Both take q, k, v whose sequence axis is sharded over a mesh axis, in the order that
``sequence_permutation`` gives, and return the output sharded the same way.

Ring attention keeps every array sharded: key/value blocks travel around the ring of
devices by ``ppermute`` while each device attends its queries to the block it holds, and
the partial results merge through their log-sum-exp. The backward pass rings again, with
each block's dk/dv accumulators travelling beside it and coming home at the end. With a
causal mask the "zigzag" layout gives every device the same amount of work: the sequence
is cut into 2n chunks and device i holds chunks i and 2n-1-i.

Which part of the mask a (query block, key block) pair sees depends on the devices, which
are only known at run time (``axis_index``); every device's plan for every step is known
at trace time, so each step is a ``lax.switch`` over the distinct plans, and a plan is one
or a few kernel calls whose mask diagonal is moved to the blocks' distance.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_flash import _batching, _checks
from jax_flash._config import KernelConfig
from jax_flash.attention import flash_attn_func

LAYOUTS = ("zigzag", "contiguous")


def _check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def sequence_permutation(seqlen, num_devices, layout="zigzag"):
    """Positions in global order that make up the sharded order: shard ``x[:, perm]``.

    With ``perm = sequence_permutation(S, n, layout)``, device i holds global positions
    ``perm[i * S // n:(i + 1) * S // n]``. Anything indexed by position (rotary angles,
    position ids, targets) follows with the same ``perm``; ``jnp.argsort(perm)`` undoes it.
    "contiguous" is the identity; "zigzag" needs seqlen divisible by 2 * num_devices.
    """
    _check_layout(layout)
    for name, value in (("seqlen", seqlen), ("num_devices", num_devices)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    chunks = _chunks_per_device(layout, num_devices) * num_devices
    if seqlen % chunks:
        raise ValueError(
            f"seqlen {seqlen} must be divisible by {chunks} for layout {layout!r} on "
            f"{num_devices} devices")
    size = seqlen // chunks
    order = [c for device in range(num_devices) for c in _chunk_ids(layout, num_devices, device)]
    return np.concatenate([np.arange(c * size, (c + 1) * size) for c in order])


def _chunks_per_device(layout, num_devices):
    # On one device zigzag's two chunks are adjacent: the layouts coincide.
    return 2 if layout == "zigzag" and num_devices > 1 else 1


def _chunk_ids(layout, num_devices, device):
    if _chunks_per_device(layout, num_devices) == 2:
        return (device, 2 * num_devices - 1 - device)
    return (device,)


# ---------------------------------------------------------------------------------------
# Planning: which kernel calls each device makes at each ring step (all static).


@dataclasses.dataclass(frozen=True)
class _Call:
    """One kernel call: query pieces x key pieces (local chunk indices), one mask."""

    q_pieces: tuple
    k_pieces: tuple
    masked: bool
    diagonal_offset: int  # only read when masked


def _piece_mode(offset, q_len, k_len, left, right):
    """'none', 'all' or 'masked' for a block pair whose diagonal is at ``offset``."""
    if right >= 0 and offset + q_len - 1 + right < 0:
        return "none"
    if left >= 0 and offset - left > k_len - 1:
        return "none"
    if (left < 0 or offset + q_len - 1 - left <= 0) and (right < 0 or offset + right >= k_len - 1):
        return "all"
    return "masked"


def _plan(modes, pieces, left, right):
    """Kernel calls covering the piece pairs of one (device, step); modes[(pq, pk)]."""
    every = tuple(range(pieces))
    visible = {pair for pair, (mode, _) in modes.items() if mode != "none"}
    if not visible:
        return ()
    if all(modes[pair][0] == "all" for pair in visible):
        rows = tuple(sorted({pq for pq, _ in visible}))
        cols = tuple(sorted({pk for _, pk in visible}))
        if {(r, c) for r in rows for c in cols} == visible:  # a full rectangle: one call
            return (_Call(rows, cols, False, 0),)
    if pieces == 2 and left < 0 and right == 0:
        # Causal on both pieces of the same device: the two-chunk block is lower-triangular
        # in local order, so one causal call on the whole block covers it.
        diagonal = {(p, p) for p in every}
        if (all(modes[pair] == ("masked", 0) for pair in diagonal)
                and modes[(1, 0)][0] == "all" and modes[(0, 1)][0] == "none"):
            return (_Call(every, every, True, 0),)
    return tuple(
        _Call((pq,), (pk,), mode == "masked", offset)
        for (pq, pk), (mode, offset) in sorted(modes.items()) if mode != "none")


@dataclasses.dataclass(frozen=True)
class _Ring:
    """Everything static about one ring attention call."""

    config: KernelConfig  # softmax scale, softcap, window (diagonal_offset unused)
    axis_name: object
    num_devices: int
    layout: str
    seqlen_q: int  # global
    seqlen_k: int

    @property
    def pieces(self):
        return _chunks_per_device(self.layout, self.num_devices)

    @functools.cached_property
    def steps(self):
        """For each ring step: (plans, plan index of each device)."""
        n, pieces = self.num_devices, self.pieces
        chunk_q, chunk_k = self.seqlen_q // (n * pieces), self.seqlen_k // (n * pieces)
        left, right = self.config.window_left, self.config.window_right
        steps = []
        for step in range(n):
            plans, index = [], []
            for device in range(n):
                source = (device - step) % n  # whose key/value block this device holds
                modes = {}
                for pq, cq in enumerate(_chunk_ids(self.layout, n, device)):
                    for pk, ck in enumerate(_chunk_ids(self.layout, n, source)):
                        # Global bottom-right alignment, seen from the two chunks.
                        offset = cq * chunk_q + (self.seqlen_k - self.seqlen_q) - ck * chunk_k
                        mode = _piece_mode(offset, chunk_q, chunk_k, left, right)
                        modes[(pq, pk)] = (mode, offset if mode == "masked" else 0)
                plan = _plan(modes, pieces, left, right)
                if plan not in plans:
                    plans.append(plan)
                index.append(plans.index(plan))
            steps.append((tuple(plans), np.asarray(index, np.int32)))
        return steps

    def call_config(self, call):
        if not call.masked:
            return dataclasses.replace(self.config, window_left=-1, window_right=-1,
                                       diagonal_offset=0)
        return dataclasses.replace(self.config, diagonal_offset=call.diagonal_offset)


def _split(x, pieces, axis):
    return jnp.split(x, pieces, axis=axis) if pieces > 1 else [x]


def _take(pieces_list, ids, axis):
    return _join([pieces_list[i] for i in ids], axis)


def _run_step(ring, step, operands, branch_fn):
    """Calls branch_fn(plan, *operands) for this device's plan of the step."""
    plans, index = ring.steps[step]
    if len(plans) == 1:
        return branch_fn(plans[0], *operands)
    branches = [functools.partial(branch_fn, plan) for plan in plans]
    device_plan = jnp.asarray(index)[lax.axis_index(ring.axis_name)]
    return lax.switch(device_plan, branches, *operands)


def _shift(x, ring):
    """Each device sends x to the next one around the ring."""
    n = ring.num_devices
    return lax.ppermute(x, ring.axis_name, [(i, (i + 1) % n) for i in range(n)])


# ---------------------------------------------------------------------------------------
# Forward and backward rings.


def _merge(out_acc, lse_acc, out, lse):
    """Combines two softmax-normalised partial results by their log-sum-exp (-inf: empty).

    out_acc is None for a piece nothing has reached yet: the result is then taken as is."""
    lse = jnp.where(lse == jnp.inf, -jnp.inf, lse)  # the kernels mark empty rows with +inf
    if out_acc is None:
        return out.astype(jnp.float32), lse
    new_lse = jnp.logaddexp(lse_acc, lse)
    safe = jnp.where(jnp.isfinite(new_lse), new_lse, 0.0)
    weight_acc = jnp.swapaxes(jnp.exp(lse_acc - safe), 1, 2)[..., None]  # (b, s, h, 1)
    weight = jnp.swapaxes(jnp.exp(lse - safe), 1, 2)[..., None]
    return out_acc * weight_acc + out.astype(jnp.float32) * weight, new_lse


def _accumulate(total, part):
    part = part.astype(jnp.float32)
    return part if total is None else total + part


def _ring_steps(ring, k, v, branch, after_step=None):
    """Runs carry = branch(plan, k, v, *carry, first=...) at every step while k and v go
    round, then after_step(carry). The first step has no carry: nothing is accumulated."""
    n, carry = ring.num_devices, ()
    for step in range(n):
        # Start passing the block on before computing with it, so the transfer overlaps.
        if step + 1 < n:
            next_k, next_v = _shift(k, ring), _shift(v, ring)
        carry = _run_step(ring, step, (k, v) + tuple(carry),
                          functools.partial(branch, first=step == 0))
        if after_step is not None:
            carry = after_step(carry)
        if step + 1 < n:
            k, v = next_k, next_v
    return carry


def _join(pieces_list, axis):
    return pieces_list[0] if len(pieces_list) == 1 else jnp.concatenate(pieces_list, axis=axis)


def _ring_forward(ring, q, k, v):
    pieces = ring.pieces
    q_pieces = _split(q, pieces, 1)

    def branch(plan, k, v, *carry, first):
        out_acc, lse_acc = ([None] * pieces, [None] * pieces) if first else map(list, carry)
        k_pieces, v_pieces = _split(k, pieces, 1), _split(v, pieces, 1)
        for call in plan:
            q_rows, k_rows = _take(q_pieces, call.q_pieces, 1), _take(k_pieces, call.k_pieces, 1)
            out, lse = _batching.forward_fn(ring.call_config(call))(
                q_rows, k_rows, _take(v_pieces, call.k_pieces, 1),
                *_checks.placeholder_masks(q.shape[0], q.shape[2], q_rows.shape[1], k_rows.shape[1]))
            outs = _split(out, len(call.q_pieces), 1)
            lses = _split(lse, len(call.q_pieces), 2)
            for piece, o, l in zip(call.q_pieces, outs, lses):
                out_acc[piece], lse_acc[piece] = _merge(out_acc[piece], lse_acc[piece], o, l)
        for piece, x in enumerate(q_pieces):  # pieces no key has reached yet
            if out_acc[piece] is None:
                out_acc[piece] = jnp.zeros(x.shape, jnp.float32)
                lse_acc[piece] = jnp.full((x.shape[0], x.shape[2], x.shape[1]), -jnp.inf,
                                          jnp.float32)
        return tuple(out_acc), tuple(lse_acc)

    out_acc, lse_acc = _ring_steps(ring, k, v, branch)
    out, lse = _join(out_acc, 1), _join(lse_acc, 2)
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)  # the kernels' convention for empty rows
    return out.astype(q.dtype), lse


def _ring_backward(ring, q, k, v, out, lse, dout, dlse):
    pieces = ring.pieces
    q_pieces, out_pieces, dout_pieces = (_split(x, pieces, 1) for x in (q, out, dout))
    lse_pieces, dlse_pieces = _split(lse, pieces, 2), _split(dlse, pieces, 2)

    def branch(plan, k, v, *carry, first):
        if first:
            dq_acc, dk_acc, dv_acc = [None] * pieces, [None] * pieces, [None] * pieces
        else:
            dq_acc = list(carry[0])
            dk_acc, dv_acc = list(_split(carry[1], pieces, 1)), list(_split(carry[2], pieces, 1))
        k_pieces, v_pieces = _split(k, pieces, 1), _split(v, pieces, 1)
        for call in plan:
            rows = lambda xs, axis=1: _take(xs, call.q_pieces, axis)  # noqa: E731
            q_rows, k_rows = rows(q_pieces), _take(k_pieces, call.k_pieces, 1)
            dq, dk, dv = _batching.backward_fn(ring.call_config(call))(
                q_rows, k_rows, _take(v_pieces, call.k_pieces, 1), rows(out_pieces),
                rows(dout_pieces), rows(lse_pieces, 2), rows(dlse_pieces, 2),
                *_checks.placeholder_masks(q.shape[0], q.shape[2], q_rows.shape[1], k_rows.shape[1]))
            for piece, g in zip(call.q_pieces, _split(dq, len(call.q_pieces), 1)):
                dq_acc[piece] = _accumulate(dq_acc[piece], g)
            for piece, gk, gv in zip(call.k_pieces, _split(dk, len(call.k_pieces), 1),
                                     _split(dv, len(call.k_pieces), 1)):
                dk_acc[piece] = _accumulate(dk_acc[piece], gk)
                dv_acc[piece] = _accumulate(dv_acc[piece], gv)
        fill = lambda accs, like: [  # noqa: E731
            jnp.zeros(x.shape, jnp.float32) if a is None else a for a, x in zip(accs, like)]
        dk_acc, dv_acc = fill(dk_acc, k_pieces), fill(dv_acc, v_pieces)
        return tuple(fill(dq_acc, q_pieces)), _join(dk_acc, 1), _join(dv_acc, 1)

    def after_step(carry):
        # The gradient accumulators travel with their blocks; after the last step one more
        # shift brings each home to the device that owns the block.
        dq_acc, dk_acc, dv_acc = carry
        return dq_acc, _shift(dk_acc, ring), _shift(dv_acc, ring)

    dq_acc, dk_acc, dv_acc = _ring_steps(
        ring, k, v, branch, after_step if ring.num_devices > 1 else None)
    return _join(dq_acc, 1).astype(q.dtype), dk_acc.astype(k.dtype), dv_acc.astype(v.dtype)


def _vary_like(x, like):
    """x marked as varying over the mesh axes that ``like`` varies over.

    Under shard_map's type checks (check_vma=True) a result must vary over the same axes as
    the input it belongs to; values that come out of the kernels carry no such marks.
    """
    missing = tuple(sorted(_varying_axes(like) - _varying_axes(x), key=str))
    return lax.pcast(x, missing, to="varying") if missing else x


def _varying_axes(x):
    aval = jax.typeof(x)
    if hasattr(aval, "vma"):  # the attribute's name before jax 0.10
        return frozenset(aval.vma)
    manual = getattr(aval, "mat", None)
    return frozenset(getattr(manual, "varying", ()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_attention(ring, q, k, v):
    out, lse = _ring_forward(ring, q, k, v)
    return _vary_like(out, q), _vary_like(lse, q)


def _ring_attention_fwd(ring, q, k, v):
    out, lse = _ring_attention(ring, q, k, v)
    return (out, lse), (q, k, v, out, lse)


def _ring_attention_bwd(ring, residuals, cotangents):
    q, k, v, out, lse = residuals
    dout, dlse = cotangents
    grads = _ring_backward(ring, q, k, v, out, lse, dout.astype(out.dtype),
                           dlse.astype(jnp.float32))
    return tuple(_vary_like(g, x) for g, x in zip(grads, (q, k, v)))


_ring_attention.defvjp(_ring_attention_fwd, _ring_attention_bwd)


# ---------------------------------------------------------------------------------------
# Public functions.


def _axis_size(axis_name, function):
    try:
        return lax.axis_size(axis_name)
    except NameError as error:
        raise ValueError(
            f"{function}: axis_name {axis_name!r} is not a mesh axis bound here; call it inside "
            f"jax.shard_map (or use jax_flash.sequence_parallel_attention) with the sequence "
            f"axis of q, k and v sharded over that mesh axis") from error


def _check_local_lengths(function, layout, num_devices, seqlen_q, seqlen_k):
    pieces = _chunks_per_device(layout, num_devices)
    for name, length in (("q", seqlen_q), ("k and v", seqlen_k)):
        if length % pieces:
            raise ValueError(
                f"{function}: the local sequence length of {name} ({length}) must be divisible "
                f"by {pieces} for layout {layout!r} (each device holds {pieces} chunks)")


def ring_attention(q, k, v, axis_name, *, causal=False, softmax_scale=None,
                   window_size=(-1, -1), softcap=0.0, layout="zigzag", return_lse=False):
    """Attention over a sequence sharded on ``axis_name``, for use inside ``shard_map``.

    q: (batch, seqlen_q / n, num_heads, head_dim) and k, v: (batch, seqlen_k / n,
    num_heads_kv, head_dim) on each of the n devices of the axis, in the sharded order of
    ``sequence_permutation(seqlen, n, layout)``. Masks are those of flash_attn_func on the
    whole sequence (bottom-right aligned when the global lengths differ). Returns the
    local output (and its lse, (batch, num_heads, seqlen_q / n) float32). No device ever
    holds more than its own block and one travelling key/value block.
    """
    _check_layout(layout)
    num_devices = _axis_size(axis_name, "ring_attention")
    batch, seqlen_q, num_heads, head_dim, seqlen_k, _ = _checks.check_qkv(q, k, v)
    _check_local_lengths("ring_attention", layout, num_devices, seqlen_q, seqlen_k)
    # Sides no distance in the whole sequence reaches become unbounded (exactly equivalent,
    # and no overflow in the kernels' index arithmetic).
    window_left, window_right = _checks.drop_idle_window_sides(
        *_checks.check_window(window_size, causal), 2 * (seqlen_q + seqlen_k) * num_devices)
    config = KernelConfig(
        softmax_scale=_checks.check_softmax_scale(softmax_scale, head_dim),
        softcap=_checks.check_softcap(softcap),
        window_left=window_left,
        window_right=window_right,
        diagonal_offset=0,
        has_alibi=False,
    )
    ring = _Ring(config, axis_name, num_devices, layout, seqlen_q * num_devices,
                 seqlen_k * num_devices)
    out, lse = _ring_attention(ring, q, k, v)
    return (out, lse) if return_lse else out


def _to_heads(x, axis_name, num_devices, layout):
    """(b, s/n, h, d) sequence-sharded -> (b, s, h/n, d) head-sharded, in global order."""
    x = lax.all_to_all(x, axis_name, split_axis=2, concat_axis=1, tiled=True)
    if _chunks_per_device(layout, num_devices) > 1:
        x = x[:, np.argsort(sequence_permutation(x.shape[1], num_devices, layout))]
    return x


def _to_sequence(x, axis_name, num_devices, layout):
    if _chunks_per_device(layout, num_devices) > 1:
        x = x[:, sequence_permutation(x.shape[1], num_devices, layout)]
    return lax.all_to_all(x, axis_name, split_axis=1, concat_axis=2, tiled=True)


def ulysses_attention(q, k, v, axis_name, *, causal=False, softmax_scale=None,
                      window_size=(-1, -1), softcap=0.0, alibi_slopes=None, layout="zigzag",
                      return_lse=False):
    """Attention over a sequence sharded on ``axis_name`` by trading it for heads (Ulysses).

    Same inputs and outputs as ring_attention. An all-to-all gives each device the whole
    sequence for num_heads / n query heads (and their key/value heads), flash_attn_func
    runs locally, and a second all-to-all restores the sequence sharding. num_heads must be
    divisible by n, and num_heads_kv must divide or be divisible by n (fewer key/value
    heads than devices are repeated so that each device gets the one its queries use).
    alibi_slopes, if given, are (num_heads,) or (batch, num_heads) for all heads.
    """
    _check_layout(layout)
    num_devices = _axis_size(axis_name, "ulysses_attention")
    batch, seqlen_q, num_heads, _, seqlen_k, num_heads_kv = _checks.check_qkv(q, k, v)
    _check_local_lengths("ulysses_attention", layout, num_devices, seqlen_q, seqlen_k)
    if num_heads % num_devices:
        raise ValueError(
            f"ulysses_attention: num_heads ({num_heads}) must be divisible by the size of "
            f"axis {axis_name!r} ({num_devices})")
    if num_heads_kv % num_devices and num_devices % num_heads_kv:
        raise ValueError(
            f"ulysses_attention: num_heads_kv ({num_heads_kv}) must divide or be divisible by "
            f"the size of axis {axis_name!r} ({num_devices})")
    if num_heads_kv < num_devices:
        k, v = (jnp.repeat(x, num_devices // num_heads_kv, axis=2) for x in (k, v))
    slopes = _checks.check_alibi_slopes(alibi_slopes, batch, num_heads)
    if slopes is not None:
        per_device = num_heads // num_devices
        slopes = lax.dynamic_slice_in_dim(
            slopes, lax.axis_index(axis_name) * per_device, per_device, axis=1)
    to_heads = functools.partial(_to_heads, axis_name=axis_name, num_devices=num_devices,
                                 layout=layout)
    out, lse = flash_attn_func(
        to_heads(q), to_heads(k), to_heads(v), softmax_scale=softmax_scale, causal=causal,
        window_size=window_size, softcap=softcap, alibi_slopes=slopes, return_lse=True)
    out = _to_sequence(out, axis_name, num_devices, layout)
    if not return_lse:
        return out
    # lse is (b, h/n, s): move its sequence axis to where _to_sequence expects it.
    lse = _to_sequence(jnp.swapaxes(lse, 1, 2)[..., None], axis_name, num_devices, layout)
    return out, jnp.swapaxes(lse[..., 0], 1, 2)


def sequence_parallel_attention(q, k, v, mesh, axis_name, *, method="ring", batch_axis=None,
                                **kwargs):
    """ring_attention or ulysses_attention on global arrays, with the shard_map applied.

    q, k, v: global (batch, seqlen, heads, head_dim) arrays in sharded order (permute them
    with ``sequence_permutation``); the sequence axis is split over ``axis_name`` of
    ``mesh`` and, if given, the batch over ``batch_axis``. kwargs go to the method.
    Returns global arrays in the same order and sharding.
    """
    methods = {"ring": ring_attention, "ulysses": ulysses_attention}
    if method not in methods:
        raise ValueError(f"method must be one of {tuple(methods)}, got {method!r}")
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh {mesh.axis_names}")
    spec = jax.sharding.PartitionSpec(batch_axis, axis_name, None, None)
    lse_spec = jax.sharding.PartitionSpec(batch_axis, None, axis_name)
    out_specs = (spec, lse_spec) if kwargs.get("return_lse") else spec
    fn = functools.partial(methods[method], axis_name=axis_name, **kwargs)
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec), out_specs=out_specs,
                         check_vma=False)(q, k, v)
