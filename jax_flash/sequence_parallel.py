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

Ring attention's dropout cannot draw flash_attn_func's mask of the whole sequence: the
kernels number a mask's elements from each call's first query and key. It draws one mask
per (query chunk, key chunk) pair instead, from the key folded with the pair's number
(``ring_dropout_mask`` assembles them), so every element is still an independent draw
with the same keep probability, and the forward and backward rings draw the same masks.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_flash import _batching, _checks, dropout
from jax_flash._config import KernelConfig
from jax_flash.attention import _attention

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
    size = _chunk_size("seqlen", seqlen, num_devices, layout)
    chunks = seqlen // size
    order = [c for device in range(num_devices) for c in _chunk_ids(layout, num_devices, device)]
    return np.concatenate([np.arange(c * size, (c + 1) * size) for c in order])


def _chunk_size(name, seqlen, num_devices, layout):
    """The length of one chunk of a global sequence of `seqlen` (named `name` in errors)
    cut for `layout` on num_devices devices."""
    _check_layout(layout)
    for what, value in ((name, seqlen), ("num_devices", num_devices)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{what} must be a positive int, got {value!r}")
    chunks = _chunks_per_device(layout, num_devices) * num_devices
    if seqlen % chunks:
        raise ValueError(
            f"{name} {seqlen} must be divisible by {chunks} for layout {layout!r} on "
            f"{num_devices} devices")
    return seqlen // chunks


def _chunks_per_device(layout, num_devices):
    # On one device zigzag's two chunks are adjacent: the layouts coincide.
    return 2 if layout == "zigzag" and num_devices > 1 else 1


def _chunk_ids(layout, num_devices, device):
    """The global chunk numbers a device holds (device may be traced)."""
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


def _plan(modes, pieces, left, right, merge=True):
    """Kernel calls covering the piece pairs of one (device, step); modes[(pq, pk)].

    merge=False keeps one call per piece pair, each with its own diagonal: ALiBi's bias
    counts the distance from it, which the two zigzag chunks of a device do not share."""
    visible = {pair for pair, (mode, _) in modes.items() if mode != "none"}
    if not visible:
        return ()
    merged = _merged_call(modes, visible, pieces, left, right) if merge else None
    if merged is not None:
        return (merged,)
    return tuple(
        _Call((pq,), (pk,), mode == "masked", offset)
        for (pq, pk), (mode, offset) in sorted(modes.items()) if mode != "none")


def _merged_call(modes, visible, pieces, left, right):
    """One call covering every visible piece pair, where one exists; else None."""
    every = tuple(range(pieces))
    if all(modes[pair][0] == "all" for pair in visible):
        rows = tuple(sorted({pq for pq, _ in visible}))
        cols = tuple(sorted({pk for _, pk in visible}))
        if {(r, c) for r in rows for c in cols} == visible:  # a full rectangle
            return _Call(rows, cols, False, 0)
    elif pieces == 2 and left < 0 and right == 0:
        # Causal on both pieces of the same device: the two-chunk block is lower-triangular
        # in local order, so one causal call on the whole block covers it.
        diagonal = {(p, p) for p in every}
        if (all(modes[pair] == ("masked", 0) for pair in diagonal)
                and modes[(1, 0)][0] == "all" and modes[(0, 1)][0] == "none"):
            return _Call(every, every, True, 0)
    return None


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
                        keep = mode == "masked" or self.config.has_alibi
                        modes[(pq, pk)] = (mode, offset if keep else 0)
                # With dropout each chunk pair has its own mask: one call per pair.
                merge = not (self.config.has_alibi or self.config.has_dropout)
                plan = _plan(modes, pieces, left, right, merge=merge)
                if plan not in plans:
                    plans.append(plan)
                index.append(plans.index(plan))
            steps.append((tuple(plans), np.asarray(index, np.int32)))
        return steps

    def call_config(self, call):
        # An unmasked call's diagonal is 0 unless ALiBi needs it (fewer distinct plans).
        config = dataclasses.replace(self.config, diagonal_offset=call.diagonal_offset)
        if call.masked:
            return config
        return dataclasses.replace(config, window_left=-1, window_right=-1)


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


def _ring_steps(ring, blocks, branch, after_step=None):
    """Runs carry = branch(plan, blocks, carry, first=..., step=...) at every step while the
    key/value blocks (k, v and the keys' segment ids) go round, then after_step(carry).
    The first step has no carry: nothing is accumulated yet."""
    n, carry = ring.num_devices, ()
    for step in range(n):
        # Start passing the blocks on before computing with them, so the transfer overlaps.
        if step + 1 < n:
            next_blocks = jax.tree.map(functools.partial(_shift, ring=ring), blocks)
        carry = _run_step(ring, step, (blocks, carry),
                          functools.partial(branch, first=step == 0, step=step))
        if after_step is not None:
            carry = after_step(carry)
        if step + 1 < n:
            blocks = next_blocks
    return carry


def _join(pieces_list, axis):
    return pieces_list[0] if len(pieces_list) == 1 else jnp.concatenate(pieces_list, axis=axis)


@dataclasses.dataclass(frozen=True)
class _Pieces:
    """A device's query-side arrays cut into its chunks, and the per-call mask operands."""

    ring: _Ring
    q: list
    slopes: jax.Array
    q_segment_ids: list  # one per piece, or None
    pair_seeds: jax.Array  # dropout seeds of every chunk pair (_pair_seeds), or None

    @classmethod
    def make(cls, ring, q, slopes, q_segment_ids, pair_seeds):
        ids = None if q_segment_ids is None else _split(q_segment_ids, ring.pieces, 1)
        return cls(ring, _split(q, ring.pieces, 1), slopes, ids, pair_seeds)

    def seeds(self, call, step):
        """The dropout seeds of a call at a ring step: its chunk pair's (one pair a call
        when dropout is on; placeholders when it is off)."""
        batch, num_heads = self.q[0].shape[0], self.q[0].shape[2]
        if self.pair_seeds is None:
            return _checks.placeholder_seeds(batch, num_heads)
        assert len(call.q_pieces) == len(call.k_pieces) == 1, call
        ring, chunks = self.ring, self.ring.num_devices * self.ring.pieces
        device = lax.axis_index(ring.axis_name)
        source = (device - step) % ring.num_devices  # whose key block the device holds
        q_chunk = _chunk_ids(ring.layout, ring.num_devices, device)[call.q_pieces[0]]
        k_chunk = _chunk_ids(ring.layout, ring.num_devices, source)[call.k_pieces[0]]
        pair = q_chunk * chunks + k_chunk
        return lax.dynamic_index_in_dim(self.pair_seeds, pair, keepdims=False)

    def masks(self, call, step, seqlen_k, kv_segment_ids):
        """The kernel's mask operands for one call of seqlen_k keys at a ring step;
        kv_segment_ids: the held block's (None without segment ids)."""
        batch = self.q[0].shape[0]
        if self.q_segment_ids is None:
            seqlen_q = sum(self.q[i].shape[1] for i in call.q_pieces)
            q_ids, kv_ids = _checks.placeholder_segment_ids(batch, seqlen_q, seqlen_k)
        else:
            q_ids = _take(self.q_segment_ids, call.q_pieces, 1)
            kv_ids = _take(_split(kv_segment_ids, self.ring.pieces, 1), call.k_pieces, 1)
        return self.slopes, q_ids, kv_ids, self.seeds(call, step)


def _ring_forward(ring, q, k, v, slopes, q_segment_ids, kv_segment_ids, pair_seeds):
    pieces = ring.pieces
    local = _Pieces.make(ring, q, slopes, q_segment_ids, pair_seeds)

    def branch(plan, blocks, carry, first, step):
        k, v, kv_ids = blocks
        out_acc, lse_acc = ([None] * pieces, [None] * pieces) if first else map(list, carry)
        k_pieces, v_pieces = _split(k, pieces, 1), _split(v, pieces, 1)
        for call in plan:
            k_rows = _take(k_pieces, call.k_pieces, 1)
            out, lse = _batching.forward_fn(ring.call_config(call))(
                _take(local.q, call.q_pieces, 1), k_rows, _take(v_pieces, call.k_pieces, 1),
                *local.masks(call, step, k_rows.shape[1], kv_ids))
            outs = _split(out, len(call.q_pieces), 1)
            lses = _split(lse, len(call.q_pieces), 2)
            for piece, o, l in zip(call.q_pieces, outs, lses):
                out_acc[piece], lse_acc[piece] = _merge(out_acc[piece], lse_acc[piece], o, l)
        for piece, x in enumerate(local.q):  # pieces no key has reached yet
            if out_acc[piece] is None:
                out_acc[piece] = jnp.zeros(x.shape, jnp.float32)
                lse_acc[piece] = jnp.full((x.shape[0], x.shape[2], x.shape[1]), -jnp.inf,
                                          jnp.float32)
        return tuple(out_acc), tuple(lse_acc)

    out_acc, lse_acc = _ring_steps(ring, (k, v, kv_segment_ids), branch)
    out, lse = _join(out_acc, 1), _join(lse_acc, 2)
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)  # the kernels' convention for empty rows
    return out.astype(q.dtype), lse


def _ring_backward(ring, q, k, v, slopes, q_segment_ids, kv_segment_ids, pair_seeds, out,
                   lse, dout, dlse):
    pieces = ring.pieces
    local = _Pieces.make(ring, q, slopes, q_segment_ids, pair_seeds)
    out_pieces, dout_pieces = _split(out, pieces, 1), _split(dout, pieces, 1)
    lse_pieces, dlse_pieces = _split(lse, pieces, 2), _split(dlse, pieces, 2)

    def branch(plan, blocks, carry, first, step):
        k, v, kv_ids = blocks
        if first:
            dq_acc, dk_acc, dv_acc = [None] * pieces, [None] * pieces, [None] * pieces
        else:
            dq_acc = list(carry[0])
            dk_acc, dv_acc = list(_split(carry[1], pieces, 1)), list(_split(carry[2], pieces, 1))
        k_pieces, v_pieces = _split(k, pieces, 1), _split(v, pieces, 1)
        for call in plan:
            rows = lambda xs, axis=1: _take(xs, call.q_pieces, axis)  # noqa: E731
            k_rows = _take(k_pieces, call.k_pieces, 1)
            dq, dk, dv = _batching.backward_fn(ring.call_config(call))(
                rows(local.q), k_rows, _take(v_pieces, call.k_pieces, 1), rows(out_pieces),
                rows(dout_pieces), rows(lse_pieces, 2), rows(dlse_pieces, 2),
                *local.masks(call, step, k_rows.shape[1], kv_ids))
            for piece, g in zip(call.q_pieces, _split(dq, len(call.q_pieces), 1)):
                dq_acc[piece] = _accumulate(dq_acc[piece], g)
            for piece, gk, gv in zip(call.k_pieces, _split(dk, len(call.k_pieces), 1),
                                     _split(dv, len(call.k_pieces), 1)):
                dk_acc[piece] = _accumulate(dk_acc[piece], gk)
                dv_acc[piece] = _accumulate(dv_acc[piece], gv)
        fill = lambda accs, like: [  # noqa: E731
            jnp.zeros(x.shape, jnp.float32) if a is None else a for a, x in zip(accs, like)]
        dk_acc, dv_acc = fill(dk_acc, k_pieces), fill(dv_acc, v_pieces)
        return tuple(fill(dq_acc, local.q)), _join(dk_acc, 1), _join(dv_acc, 1)

    def after_step(carry):
        # The gradient accumulators travel with their blocks; after the last step one more
        # shift brings each home to the device that owns the block.
        dq_acc, dk_acc, dv_acc = carry
        return dq_acc, _shift(dk_acc, ring), _shift(dv_acc, ring)

    dq_acc, dk_acc, dv_acc = _ring_steps(
        ring, (k, v, kv_segment_ids), branch, after_step if ring.num_devices > 1 else None)
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
def _ring_attention(ring, q, k, v, masks):
    """masks: (ALiBi slopes (batch, num_heads) float32, q and kv segment ids or None,
    dropout seeds of every chunk pair or None)."""
    out, lse = _ring_forward(ring, q, k, v, *masks)
    return _vary_like(out, q), _vary_like(lse, q)


def _ring_attention_fwd(ring, q, k, v, masks):
    out, lse = _ring_attention(ring, q, k, v, masks)
    return (out, lse), (q, k, v, masks, out, lse)


def _ring_attention_bwd(ring, residuals, cotangents):
    q, k, v, masks, out, lse = residuals
    dout, dlse = cotangents
    grads = _ring_backward(ring, q, k, v, *masks, out, lse, dout.astype(out.dtype),
                           dlse.astype(jnp.float32))
    grads = tuple(_vary_like(g, x) for g, x in zip(grads, (q, k, v)))
    # The slopes are constants (stop_gradient in ring_attention); ids and seeds are integers.
    slopes = masks[0]
    return grads + ((jnp.zeros_like(slopes), None, None, None),)


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


def _pair_seeds(dropout_key, num_chunks, batch, num_heads):
    """uint32 (num_chunks ** 2, batch, num_heads, 2): the dropout seeds of the chunk pair
    (query chunk c, key chunk d) at c * num_chunks + d, drawn from the key folded with that
    number."""
    pairs = jnp.arange(num_chunks * num_chunks, dtype=jnp.uint32)
    return jax.vmap(lambda pair: dropout.seeds(jax.random.fold_in(dropout_key, pair), batch,
                                               num_heads))(pairs)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6, 7))
def ring_dropout_mask(dropout_key, dropout_p, batch, num_heads, seqlen_q, seqlen_k,
                      num_devices, layout="zigzag"):
    """Which attention probabilities ring_attention(..., dropout_p, dropout_key=...) keeps,
    for global lengths seqlen_q, seqlen_k on num_devices: boolean (batch, num_heads,
    seqlen_q, seqlen_k) in global order (not the sharded one). Each (query chunk, key chunk)
    pair of the layout has its own draw; the mask does not depend on the attention mask,
    ALiBi or segment ids. For tests and inspection: it materializes the mask."""
    chunk_q = _chunk_size("seqlen_q", seqlen_q, num_devices, layout)
    chunk_k = _chunk_size("seqlen_k", seqlen_k, num_devices, layout)
    chunks = seqlen_q // chunk_q
    dropout_p = _checks.check_dropout(dropout_p, dropout_key)
    seeds = _pair_seeds(dropout_key, chunks, batch, num_heads)
    blocks = jax.vmap(lambda s: dropout.mask_from_seeds(s, dropout_p, chunk_q, chunk_k))(seeds)
    blocks = blocks.reshape(chunks, chunks, batch, num_heads, chunk_q, chunk_k)
    return jnp.transpose(blocks, (2, 3, 0, 4, 1, 5)).reshape(batch, num_heads, seqlen_q,
                                                              seqlen_k)


def ring_attention(q, k, v, axis_name, *, causal=False, softmax_scale=None,
                   window_size=(-1, -1), softcap=0.0, alibi_slopes=None, layout="zigzag",
                   return_lse=False, q_segment_ids=None, kv_segment_ids=None, dropout_p=0.0,
                   dropout_key=None):
    """Attention over a sequence sharded on ``axis_name``, for use inside ``shard_map``.

    q: (batch, seqlen_q / n, num_heads, head_dim) and k, v: (batch, seqlen_k / n,
    num_heads_kv, head_dim) on each of the n devices of the axis, in the sharded order of
    ``sequence_permutation(seqlen, n, layout)``. Masks, ALiBi and segment ids are those of
    flash_attn_func on the whole sequence (bottom-right aligned when the global lengths
    differ): alibi_slopes (num_heads,) or (batch, num_heads) for all heads; the segment ids
    are the local (batch, seqlen / n) blocks, sharded like q and k, and the kv ids travel
    with k and v. Returns the local output (and its lse, (batch, num_heads, seqlen_q / n)
    float32). No device ever holds more than its own block and one travelling key/value
    block. dropout_p, dropout_key: attention dropout, with one mask per (query chunk, key
    chunk) pair (``ring_dropout_mask`` gives the whole-sequence mask; it is not
    flash_attn_func's, which ulysses_attention draws). The key must be the same on every
    device of the axis; where the batch is also sharded, fold the batch shard's index into
    it (as sequence_parallel_attention does).
    """
    _check_layout(layout)
    num_devices = _axis_size(axis_name, "ring_attention")
    batch, seqlen_q, num_heads, head_dim, seqlen_k, _ = _checks.check_qkv(q, k, v)
    _check_local_lengths("ring_attention", layout, num_devices, seqlen_q, seqlen_k)
    slopes = _checks.check_alibi_slopes(alibi_slopes, batch, num_heads)
    has_segment_ids, q_ids, kv_ids = _checks.check_segment_ids(
        q_segment_ids, kv_segment_ids, batch, seqlen_q, seqlen_k)
    # Sides no distance in the whole sequence reaches become unbounded (exactly equivalent,
    # and no overflow in the kernels' index arithmetic).
    window_left, window_right = _checks.drop_idle_window_sides(
        *_checks.check_window(window_size, causal), 2 * (seqlen_q + seqlen_k) * num_devices)
    dropout_p = _checks.check_dropout(dropout_p, dropout_key)
    config = KernelConfig(
        softmax_scale=_checks.check_softmax_scale(softmax_scale, head_dim),
        softcap=_checks.check_softcap(softcap),
        window_left=window_left,
        window_right=window_right,
        diagonal_offset=0,
        has_alibi=slopes is not None,
        has_segment_ids=has_segment_ids,
        **dropout.kernel_fields(dropout_p),
    )
    ring = _Ring(config, axis_name, num_devices, layout, seqlen_q * num_devices,
                 seqlen_k * num_devices)
    slopes = (jnp.zeros((batch, num_heads), jnp.float32) if slopes is None
              else lax.stop_gradient(slopes))
    masks = (slopes, q_ids, kv_ids) if has_segment_ids else (slopes, None, None)
    pair_seeds = (_pair_seeds(dropout_key, num_devices * ring.pieces, batch, num_heads)
                  if dropout_p > 0.0 else None)
    out, lse = _ring_attention(ring, q, k, v, masks + (pair_seeds,))
    return (out, lse) if return_lse else out


def _to_heads(x, axis_name, num_devices, layout):
    """(b, s/n, h, d) sequence-sharded -> (b, s, h/n, d) head-sharded, in global order."""
    x = lax.all_to_all(x, axis_name, split_axis=2, concat_axis=1, tiled=True)
    if _chunks_per_device(layout, num_devices) > 1:
        x = x[:, np.argsort(sequence_permutation(x.shape[1], num_devices, layout))]
    return x


def _gathered(ids, axis_name, num_devices, layout):
    """(b, s/n) sequence-sharded segment ids -> (b, s) on every device, in global order."""
    ids = lax.all_gather(ids, axis_name, axis=1, tiled=True)
    if _chunks_per_device(layout, num_devices) > 1:
        ids = ids[:, np.argsort(sequence_permutation(ids.shape[1], num_devices, layout))]
    return ids


def _to_sequence(x, axis_name, num_devices, layout):
    if _chunks_per_device(layout, num_devices) > 1:
        x = x[:, sequence_permutation(x.shape[1], num_devices, layout)]
    return lax.all_to_all(x, axis_name, split_axis=1, concat_axis=2, tiled=True)


def ulysses_attention(q, k, v, axis_name, *, causal=False, softmax_scale=None,
                      window_size=(-1, -1), softcap=0.0, alibi_slopes=None, layout="zigzag",
                      return_lse=False, q_segment_ids=None, kv_segment_ids=None,
                      dropout_p=0.0, dropout_key=None):
    """Attention over a sequence sharded on ``axis_name`` by trading it for heads (Ulysses).

    Same inputs and outputs as ring_attention. An all-to-all gives each device the whole
    sequence for num_heads / n query heads (and their key/value heads), flash_attn_func
    runs locally, and a second all-to-all restores the sequence sharding. num_heads must be
    divisible by n, and num_heads_kv must divide or be divisible by n (fewer key/value
    heads than devices are repeated so that each device gets the one its queries use).
    alibi_slopes, if given, are (num_heads,) or (batch, num_heads) for all heads. Segment
    ids are the local (batch, seqlen / n) blocks; each device gathers the whole rows.
    dropout_p, dropout_key: flash_attn_func's attention dropout, with the masks of
    flash_attn_func on the whole sequence and the same key (each device draws its heads'
    share). The key must be the same on every device of the axis; where the batch is also
    sharded, fold the batch shard's index into it (as sequence_parallel_attention does), or
    the shards' rows share masks.
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
    has_segment_ids, q_ids, kv_ids = _checks.check_segment_ids(
        q_segment_ids, kv_segment_ids, batch, seqlen_q, seqlen_k)
    if has_segment_ids:
        q_ids, kv_ids = (_gathered(ids, axis_name, num_devices, layout) for ids in (q_ids, kv_ids))
    else:
        q_ids = kv_ids = None
    dropout_p = _checks.check_dropout(dropout_p, dropout_key)
    per_device = num_heads // num_devices

    def own_heads(x):  # this device's share of a (batch, num_heads, ...) array
        return lax.dynamic_slice_in_dim(x, lax.axis_index(axis_name) * per_device, per_device,
                                        axis=1)

    if slopes is not None:
        slopes = own_heads(slopes)
    seeds = own_heads(dropout.seeds(dropout_key, batch, num_heads)) if dropout_p > 0 else None
    to_heads = functools.partial(_to_heads, axis_name=axis_name, num_devices=num_devices,
                                 layout=layout)
    out, lse = _attention(
        to_heads(q), to_heads(k), to_heads(v), softmax_scale=softmax_scale, causal=causal,
        window_size=window_size, softcap=softcap, alibi_slopes=slopes, return_lse=True,
        q_segment_ids=q_ids, kv_segment_ids=kv_ids, dropout_p=dropout_p,
        dropout_key=dropout_key, dropout_seeds=seeds)
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
    ``mesh`` and, if given, the batch over ``batch_axis``. kwargs go to the method; the
    global segment ids (batch, seqlen), in the same order, are split like q, k and v, and
    (batch, num_heads) ALiBi slopes like the batch. With dropout (dropout_p, dropout_key)
    and batch_axis, each batch shard folds its index into the key. Returns global arrays in
    the same order and sharding.
    """
    methods = {"ring": ring_attention, "ulysses": ulysses_attention}
    if method not in methods:
        raise ValueError(f"method must be one of {tuple(methods)}, got {method!r}")
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh {mesh.axis_names}")
    P = jax.sharding.PartitionSpec
    spec = P(batch_axis, axis_name, None, None)
    out_specs = (spec, P(batch_axis, None, axis_name)) if kwargs.get("return_lse") else spec
    # Array keywords enter the shard_map as arguments, each with its sharding.
    names, arrays, in_specs = [], [q, k, v], [spec, spec, spec]
    for name in ("alibi_slopes", "q_segment_ids", "kv_segment_ids"):
        value = kwargs.pop(name, None)
        if value is None:
            continue
        split = P(batch_axis, None if name == "alibi_slopes" else axis_name)
        in_specs.append(split if jnp.ndim(value) == 2 else P())  # else: the method's error
        names.append(name)
        arrays.append(value)

    key = kwargs.pop("dropout_key", None)
    if key is not None:  # replicated: every device draws from the same key
        names.append("dropout_key")
        arrays.append(key)
        in_specs.append(P())

    def fn(q, k, v, *values):
        keywords = dict(zip(names, values))
        if batch_axis is not None and keywords.get("dropout_key") is not None:
            # The batch shards hold different rows under one key: give each its own masks.
            keywords["dropout_key"] = jax.random.fold_in(keywords["dropout_key"],
                                                          lax.axis_index(batch_axis))
        return methods[method](q, k, v, axis_name=axis_name, **kwargs, **keywords)

    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(in_specs), out_specs=out_specs,
                         check_vma=False)(*arrays)
