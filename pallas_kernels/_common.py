"""Plumbing shared by the kernels: flatten (batch, head), pad, slice back; typing, custom_vjp.

Zero-padding d and e is exact. Zero-padding seq at the end is exact for the
output; the kernels take the final state at the true last row by decaying the
last block by its true length (docs/design.md section 4).

Inside `jax.shard_map(check_vma=True)` a `pallas_call` must say over which mesh
axes its outputs vary: `kernel_op` casts the operands to one common type and
`pallas_call` here types every `out_shape` like its operands.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lightning_jax._checks import segment_counts
from lightning_jax._vma import match_varying, typed_shape, union_of_varying


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def next_power_of_2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


class Padded(NamedTuple):
    """Padded operands: q, k [G, N, Dp] (or [B, N, H, Dp]), v [G, N, Ep] (or [B, N, H, Ep]),
    state [G, Dp, Ep]."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    slopes: jax.Array  # [G] float32
    state: jax.Array  # float32


def flatten_and_pad(
    q, k, v, slopes, initial_state, seq_to: int, d_to: int, e_to: int, layout: str = "bhtd"
) -> Padded:
    """Zero-pads seq to `seq_to` and the widths to `d_to`, `e_to`; slopes [H] -> [B*H].

    layout "bhtd": [B, H, n, *] -> [B*H, seq_to, *_to] (a free reshape, plus the
    pad if any). "bthd": [B, n, H, *] -> [B, seq_to, H, *_to], kept in its layout
    (no copy at all when nothing needs padding).
    """
    if layout == "bthd":
        batch, _, heads, _ = q.shape
    else:
        batch, heads = q.shape[:2]
    groups = batch * heads

    def pad(x, rows, cols):  # x: [G-like, rows, cols] after a free reshape
        x = x.reshape(groups, x.shape[-2], x.shape[-1])
        return jnp.pad(x, ((0, 0), (0, rows - x.shape[1]), (0, cols - x.shape[2])))

    def pad_rows(x, cols):
        if layout == "bhtd":
            return pad(x, seq_to, cols)
        widths = ((0, 0), (0, seq_to - x.shape[1]), (0, 0), (0, cols - x.shape[3]))
        return jnp.pad(x, widths) if any(w for _, w in widths) else x

    return Padded(
        q=pad_rows(q, d_to),
        k=pad_rows(k, d_to),
        v=pad_rows(v, e_to),
        slopes=jnp.tile(slopes.astype(jnp.float32), batch),
        state=pad(initial_state.astype(jnp.float32), d_to, e_to),
    )


def unpad(o, state, batch: int, heads: int, n: int, d: int, e: int):
    """o [G, N, Ep] -> [B, H, n, e] ([B, N, H, Ep] -> [B, n, H, e]); state -> [B, H, d, e]."""
    if o.ndim == 4:
        o = o[:, :n, :, :e]
    else:
        o = o[:, :n, :e].reshape(batch, heads, n, e)
    state = state[:, :d, :e].reshape(batch, heads, d, e)
    return o, state


def pallas_call(kernel: Callable, *, out_shape, interpret=False, **kwargs) -> Callable:
    """`pl.pallas_call` whose `out_shape` is typed with the mesh axes its operands vary over.

    Under `jax.shard_map(check_vma=True)` a bare `jax.ShapeDtypeStruct` out_shape
    is refused (jax cannot tell how the output varies); each output of a kernel
    here varies like its operands (one program per (batch, head) of this
    device's shard). Elsewhere the typing is empty and changes nothing.

    `interpret=True` (Pallas' HLO interpreter) with typed operands runs the
    kernel in the Pallas TPU interpreter instead: in jax 0.10 the HLO
    interpreter re-evaluates the kernel, traced untyped, on the typed operands
    and fails the varying-axes checks of its first dynamic slice, while the TPU
    interpreter (which runs any Pallas kernel on the host, simulating memory with
    callbacks) does not. Its callbacks cannot sit under `jax.checkpoint`.
    """

    def call(*operands):
        axes = union_of_varying(*operands)
        typed = jax.tree.map(
            lambda s: typed_shape(s, axes),
            out_shape,
            is_leaf=lambda s: isinstance(s, jax.ShapeDtypeStruct),
        )
        mode, params = interpret, kwargs
        if interpret is True and axes:
            from jax.experimental.pallas import tpu as pltpu

            mode = pltpu.InterpretParams()
            # The kernel's own backend's compiler parameters mean nothing to this interpreter.
            params = {k: v for k, v in kwargs.items() if k != "compiler_params"}
        return pl.pallas_call(kernel, out_shape=typed, interpret=mode, **params)(*operands)

    return call


def segment_tables(segment_ids: jax.Array, heads: int, seq_to: int) -> tuple[jax.Array, jax.Array]:
    """Run-boundary counts for the kernels: `counts`, `before` int32 `[B*H, seq_to]`.

    counts[g, t]: run boundaries at or before row t (padding rows repeat the last
    real row's, so they join the last run); before[g, t] = counts[g, t-1]
    (0 at t = 0). In a block of rows, rows i, j are in one run iff their counts
    are equal; the block-start state reaches row i iff counts[i] == before[start].
    """
    counts = jnp.repeat(segment_counts(segment_ids), heads, axis=0)
    counts = jnp.pad(counts, ((0, 0), (0, seq_to - counts.shape[1])), mode="edge")
    before = jnp.pad(counts[:, :-1], ((0, 0), (1, 0)))
    return counts, before


def kernel_op(forward: Callable, backward: Callable, segmented: bool = False) -> Callable:
    """The op as a `jax.custom_vjp` around a backend's forward and backward kernels.

    forward(q, k, v, slopes, s0, block, seq_len, interpret) -> (o, final_state);
    backward(q, k, v, slopes, s0, do, dstate, block, seq_len, interpret)
      -> (dq, dk, dv, d_s0). The backward recomputes states from the inputs, so
    the residuals are the inputs themselves.

    The returned op first casts q, k, v, slopes and s0 to vary over the same
    mesh axes (inside `jax.shard_map(check_vma=True)`: a replicated slopes or
    initial state beside a sharded q), so the kernels see one typing and the
    gradient of a replicated operand comes back summed over the axes and typed
    as replicated (the transpose of the cast), as jax's autodiff requires.

    With `segmented=True` the op takes a sixth operand, the `(counts, before)`
    pair of `segment_tables`, passed to both as the keyword `segments`
    (integers: no gradient).
    """
    if segmented:

        @functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
        def seg_op(q, k, v, slopes, s0, segments, block, seq_len, interpret):
            return forward(q, k, v, slopes, s0, block, seq_len, interpret, segments=segments)

        def seg_fwd(q, k, v, slopes, s0, segments, block, seq_len, interpret):
            out = forward(q, k, v, slopes, s0, block, seq_len, interpret, segments=segments)
            return out, (q, k, v, slopes, s0, segments)

        def seg_bwd(block, seq_len, interpret, residuals, cotangents):
            q, k, v, slopes, s0, segments = residuals
            do, dstate = cotangents
            dq, dk, dv, ds0 = backward(
                q,
                k,
                v,
                slopes,
                s0,
                do.astype(q.dtype),
                dstate,
                block,
                seq_len,
                interpret,
                segments=segments,
            )
            return dq, dk, dv, jnp.zeros_like(slopes), ds0, None

        seg_op.defvjp(seg_fwd, seg_bwd)

        def typed_seg_op(q, k, v, slopes, s0, segments, block, seq_len, interpret):
            q, k, v, slopes, s0 = match_varying(q, k, v, slopes, s0)
            return seg_op(q, k, v, slopes, s0, segments, block, seq_len, interpret)

        return typed_seg_op

    @functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
    def op(q, k, v, slopes, s0, block, seq_len, interpret):
        return forward(q, k, v, slopes, s0, block, seq_len, interpret)

    def op_fwd(q, k, v, slopes, s0, block, seq_len, interpret):
        out = forward(q, k, v, slopes, s0, block, seq_len, interpret)
        return out, (q, k, v, slopes, s0)

    def op_bwd(block, seq_len, interpret, residuals, cotangents):
        q, k, v, slopes, s0 = residuals
        do, dstate = cotangents
        dq, dk, dv, ds0 = backward(
            q, k, v, slopes, s0, do.astype(q.dtype), dstate, block, seq_len, interpret
        )
        # Slopes are constants of the operator (as in the paper): no gradient.
        return dq, dk, dv, jnp.zeros_like(slopes), ds0

    op.defvjp(op_fwd, op_bwd)

    def typed_op(q, k, v, slopes, s0, block, seq_len, interpret):
        q, k, v, slopes, s0 = match_varying(q, k, v, slopes, s0)
        return op(q, k, v, slopes, s0, block, seq_len, interpret)

    return typed_op
