"""Sequence parallelism: one sequence split across devices along its length.

Inside `jax.shard_map`, with the sequence axis (axis 2 of `[B, H, T, D]`) sharded
over a mesh axis of P devices, each device p holds rows [p*m, (p+1)*m) of the
sequence (m = T / P). Lightning attention splits exactly at a shard boundary:

    o_p      = o_loc(p) + (lambda^(i+1) q_i) S_in(p)      for the local rows i
    S_in(p)  = lambda^(p*m) S0 + sum_{p' < p} lambda^((p-1-p')*m) S_loc(p')
    S_final  = lambda^(P*m) S0 + sum_{p'} lambda^((P-1-p')*m) S_loc(p')

where o_loc(p), S_loc(p) are the single-device op's output and final state on
the local shard from a zero state. So each device runs the single-device op on
its shard, the `[B, H, D, E]` local states are combined across devices (a few
collectives on states only: communication independent of T), and each device
adds a rank-`D` correction to its rows. The backward mirrors this: the gradient
reaching device p's incoming state, a_p = sum_i (lambda^(i+1) q_i)^T do_i, is
combined in reverse (it flows to the earlier devices and to `initial_state`):

    dS_out(p) = lambda^((P-1-p)*m) dS_final + sum_{p' > p} lambda^((p'-p-1)*m) a_{p'}
    dS0       = lambda^(P*m) dS_final + sum_{p'} lambda^(p'*m) a_{p'}

and the local backward (the single-device op's VJP, saved by the forward) runs
with the cotangents (do_p, dS_out(p)). Exponents are non-negative integers: no
decay with a negative exponent is ever formed.

Both shard_map modes are supported. With check_vma=True (jax's default) the
replicated initial state and final state are typed as such and their gradients
are returned whole; with check_vma=False each device holds a copy, and the
backward returns each copy's share, as autodiff of the forward would (shard_map
then sums the shares). `lightning_attention_sharded` uses check_vma=False.

Two combines are implemented. "ppermute" (the default): a decayed prefix scan
over devices by doubling, ceil(log2 P) `ppermute` steps of one state each, one
shift, and one all-reduce that hands the final state to every device: about
log2(P) + 2 states per device per pass. "all_gather": one all-gather of the P
local states, then a weighted sum on each device: one collective, P states per
device. On 8 host devices the ppermute scan was faster (fwd+bwd 5.4 vs 7.2 ms
with the combine dominating, seq 128; equal at P = 2) and moves fewer bytes
from P = 8 on; `benchmarks/bench_sp.py` measures both.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lightning_jax._checks import (
    check_inputs,
    check_segment_ids,
    compute_dtype,
    dims_of,
    layout_hint,
    segment_counts,
)
from lightning_jax._vma import axis_names as _axis_names
from lightning_jax._vma import to_varying as _to_varying
from lightning_jax._vma import varying_axes as _varying_axes
from lightning_jax.api import attention, check_options

HIGHEST = lax.Precision.HIGHEST
COMBINES = ("ppermute", "all_gather")

AxisName = Hashable  # a mesh axis name, or a tuple of them


def _shard_map(f, *, mesh: Mesh, in_specs, out_specs, check_vma: bool):
    """jax.shard_map (jax >= 0.7), else jax.experimental.shard_map (check_rep)."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(
            f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma
        )
    from jax.experimental.shard_map import shard_map  # pragma: no cover - older jax

    return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=check_vma)


def _all_gather_invariant(x: jax.Array, axis_name) -> jax.Array:
    """all_gather whose result is typed as the same on every device of axis_name."""
    try:
        return lax.all_gather(x, axis_name, to="invarying")
    except (TypeError, ValueError):  # pragma: no cover - jax without to="invarying"
        return lax.all_gather(x, axis_name)


def _check_axis(axis_name) -> tuple[int, bool]:
    """(devices along axis_name, whether shard_map types replication); clear errors."""
    if axis_name is None:
        raise ValueError(
            "axis_name is required: the mesh axis (or tuple of axes) that the sequence "
            "dimension (axis 2 of q, k, v) is sharded over inside jax.shard_map"
        )
    names = _axis_names(axis_name)
    if not names or not all(isinstance(a, Hashable) and a is not None for a in names):
        raise ValueError(
            f"axis_name must be a mesh axis name or a tuple of them, got {axis_name!r}"
        )
    try:
        size = lax.axis_size(axis_name)
    except NameError as err:
        raise ValueError(
            f"axis_name {axis_name!r} is not a bound mesh axis: call lightning_attention_sp "
            "inside jax.shard_map over a mesh with that axis, with the sequence dimension "
            "sharded over it (or use lightning_attention_sharded with a Mesh)"
        ) from err
    # Under shard_map(check_vma=True) the axis index is typed as varying over the axis;
    # under check_vma=False nothing is typed.
    index_varying = _varying_axes(lax.axis_index(axis_name))
    typed = index_varying is None or set(names) <= index_varying
    return int(size), typed


def _check_replicated(name: str, x, axis_name) -> None:
    if x is None:
        return
    varying = _varying_axes(x)
    if varying is not None and set(_axis_names(axis_name)) & varying:
        raise ValueError(
            f"{name} must be the same on every device of axis_name {axis_name!r} (replicated "
            f"over the sequence axis, in_specs without that axis), but it varies over it"
        )


# --- combines ---------------------------------------------------------------------------


class _Config(NamedTuple):
    """Static arguments of the custom_vjp."""

    axis_name: AxisName
    devices: int  # P, devices along axis_name
    typed: bool  # shard_map(check_vma=True): replicated values are typed as such
    impl: str
    block_size: int | None
    combine: str
    interpret: bool | None  # Pallas kernels: run them in the interpreter (None: on CPU)
    layout: str  # "bhtd" ([B, H, m, D] shards) or "bthd" ([B, m, H, D])


# The correction einsums of each layout: rows' decayed q times the incoming state (o),
# its transpose (the state's gradient a) and dq's share.
_O = {"bhtd": "bhtd,bhde->bhte", "bthd": "bthd,bhde->bthe"}
_A = {"bhtd": "bhtd,bhte->bhde", "bthd": "bthd,bthe->bhde"}
_DQ = {"bhtd": "bhte,bhde->bhtd", "bthd": "bthe,bhde->bthd"}


def _seq_axis(layout: str) -> int:
    return 1 if layout == "bthd" else 2


def _rows_factor(w: jax.Array, layout: str) -> jax.Array:
    """A per-row factor [B or 1, H, m] shaped to multiply q in the layout."""
    return (jnp.swapaxes(w, 1, 2) if layout == "bthd" else w)[..., None]


def _decay(slopes: jax.Array, exponent) -> jax.Array:
    """lambda^exponent per head: exponent [...] (non-negative) -> [..., H]."""
    exponent = jnp.asarray(exponent, slopes.dtype)
    return jnp.exp(-slopes * exponent[..., None])


def _scale(w: jax.Array, x: jax.Array) -> jax.Array:
    """w [H] times x [B, H, d, e]."""
    return w[None, :, None, None] * x


def _weighted_sum(w: jax.Array, xs: jax.Array) -> jax.Array:
    """sum_p w[p, h] xs[p, b, h] for w [P, H], xs [P, B, H, d, e]."""
    return jnp.einsum("ph,pbhde->bhde", w, xs, precision=HIGHEST)


def _shift(x: jax.Array, axis_name, devices: int, offset: int) -> jax.Array:
    """Device p receives x from device p - offset (zeros where there is none)."""
    if offset >= 0:
        perm = [(p, p + offset) for p in range(devices - offset)]
    else:
        perm = [(p, p + offset) for p in range(-offset, devices)]
    if not perm:
        return jnp.zeros_like(x)
    return lax.ppermute(x, axis_name, perm)


def _scan_ppermute(x, slopes, m: int, axis_name, devices: int, reverse: bool):
    """Inclusive decayed scan over devices by doubling (log2(P) ppermutes).

    Forward: y_p = sum_{p' <= p} lambda^((p-p')*m) x_p'; reverse: over p' >= p.
    """
    shift = 1
    while shift < devices:
        received = _shift(x, axis_name, devices, -shift if reverse else shift)
        x = x + _scale(_decay(slopes, shift * m), received)
        shift *= 2
    return x


def _from_device(x: jax.Array, axis_name, index, device: int) -> jax.Array:
    """Device `device`'s x on every device (an all-reduce), typed as replicated."""
    return lax.psum(jnp.where(index == device, x, jnp.zeros_like(x)), axis_name)


def _combine_forward(s_loc, s0, slopes, m: int, cfg: _Config):
    """(state entering this device, final state) from the local states and S0."""
    n, axis = cfg.devices, cfg.axis_name
    p = lax.axis_index(axis)
    if cfg.combine == "all_gather":
        gathered = _all_gather_invariant(s_loc, axis)  # [P, B, H, d, e]
        src = jnp.arange(n)
        gap = jnp.maximum(p - 1 - src, 0) * m
        w_in = jnp.where((src < p)[:, None], _decay(slopes, gap), 0)
        s_in = _weighted_sum(w_in, gathered)
        final = _weighted_sum(_decay(slopes, (n - 1 - src) * m), gathered)
        if s0 is not None:
            s_in = s_in + _scale(_decay(slopes, p * m), s0)
            final = final + _scale(_decay(slopes, n * m), s0)
        return s_in, final
    # ppermute: fold S0 into device 0's element, then an inclusive scan and a shift.
    x = s_loc
    if s0 is not None:
        x = x + jnp.where(p == 0, _scale(_decay(slopes, m), s0), 0)
    out = _scan_ppermute(x, slopes, m, axis, n, reverse=False)  # state after device p
    s_in = _shift(out, axis, n, 1)
    if s0 is not None:
        s_in = s_in + jnp.where(p == 0, s0, 0)
    return s_in, _from_device(out, axis, p, n - 1)


def _combine_backward(a, d_final, slopes, m: int, has_s0: bool, cfg: _Config):
    """(dL/d state leaving this device, dL/d S0) from a_p and dL/d final state.

    Under check_vma=True, d_final is typed as replicated: it is the whole cotangent,
    and dS0 is returned whole (typed as replicated). Under check_vma=False every
    device holds its own copy of the final state and of S0: shard_map hands each copy
    1/P of the cotangent and sums the copies' gradients afterwards, so d_final is
    summed here and each device returns the gradient of its own copy of S0 (exactly
    what autodiff of the forward would do).
    """
    n, axis = cfg.devices, cfg.axis_name
    p = lax.axis_index(axis)
    d_final_local = d_final
    if not cfg.typed:
        d_final = lax.psum(d_final, axis)
    if cfg.combine == "all_gather":
        gathered = _all_gather_invariant(a, axis)  # [P, B, H, d, e]
        src = jnp.arange(n)
        gap = jnp.maximum(src - p - 1, 0) * m
        w_out = jnp.where((src > p)[:, None], _decay(slopes, gap), 0)
        d_out = _weighted_sum(w_out, gathered) + _scale(_decay(slopes, (n - 1 - p) * m), d_final)
        d_s0 = None
        if has_s0 and cfg.typed:
            d_s0 = _weighted_sum(_decay(slopes, src * m), gathered)
            d_s0 = d_s0 + _scale(_decay(slopes, n * m), d_final)
    else:
        # ppermute: fold dS_final into the last device's element, reverse scan, shift.
        x = a + jnp.where(p == n - 1, _scale(_decay(slopes, m), d_final), 0)
        grad_in = _scan_ppermute(x, slopes, m, axis, n, reverse=True)  # dL/d S_in(p)
        d_out = _shift(grad_in, axis, n, -1) + jnp.where(p == n - 1, d_final, 0)
        d_s0 = _from_device(grad_in, axis, p, 0) if has_s0 and cfg.typed else None
    if has_s0 and not cfg.typed:
        d_s0 = _scale(_decay(slopes, p * m), a) + _scale(_decay(slopes, n * m), d_final_local)
    return d_out, d_s0


# --- the op -------------------------------------------------------------------------------


def _q_decay(slopes: jax.Array, m: int) -> jax.Array:
    """lambda^(i+1) for local rows i: [H, m]."""
    return jnp.exp(-slopes[:, None] * jnp.arange(1, m + 1, dtype=slopes.dtype))


def _local_op(slopes, cfg: _Config, segment_ids=None):
    def op(q, k, v):
        # An explicit zero state typed like q (varying over the mesh axes q varies
        # over): a zero state built inside the op would be typed as replicated while
        # the implementation's VJP returns its gradient as varying.
        batch, heads, _, d, e = dims_of(q, v, cfg.layout)
        zeros = jnp.zeros((batch, heads, d, e), compute_dtype(q, k, v))
        varying = _varying_axes(q)
        if varying:
            zeros = _to_varying(zeros, tuple(sorted(varying, key=str)))
        return attention(
            q,
            k,
            v,
            slopes,
            initial_state=zeros,
            return_final_state=True,
            impl=cfg.impl,
            block_size=cfg.block_size,
            interpret=cfg.interpret,
            precision="default",
            segment_ids=segment_ids,
            layout=cfg.layout,
        )

    return op


def _sp_forward(q, k, v, slopes, s0, cfg: _Config, with_vjp: bool):
    dtype = compute_dtype(q, k, v)
    m = q.shape[_seq_axis(cfg.layout)]
    s = slopes.astype(dtype)
    if with_vjp:
        (o_loc, s_loc), local_vjp = jax.vjp(_local_op(slopes, cfg), q, k, v)
    else:
        o_loc, s_loc = _local_op(slopes, cfg)(q, k, v)
        local_vjp = None
    s0c = None if s0 is None else s0.astype(dtype)
    s_in, final = _combine_forward(s_loc.astype(dtype), s0c, s, m, cfg)
    q_dec = q.astype(dtype) * _rows_factor(_q_decay(s, m)[None], cfg.layout)
    correction = jnp.einsum(_O[cfg.layout], q_dec, s_in, precision=HIGHEST)
    o = (o_loc.astype(dtype) + correction).astype(q.dtype)
    return (o, final.astype(jnp.float32)), (local_vjp, q, slopes, s_in)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _sp(q, k, v, slopes, s0, cfg: _Config):
    return _sp_forward(q, k, v, slopes, s0, cfg, with_vjp=False)[0]


def _sp_fwd(q, k, v, slopes, s0, cfg: _Config):
    out, (local_vjp, q, slopes, s_in) = _sp_forward(q, k, v, slopes, s0, cfg, with_vjp=True)
    s0_like = None if s0 is None else jnp.zeros((0,), s0.dtype)  # carries S0's dtype only
    return out, (local_vjp, q, slopes, s_in, s0_like)


def _sp_bwd(cfg: _Config, res, cotangents):
    local_vjp, q, slopes, s_in, s0_like = res
    do, d_final = cotangents
    dtype = s_in.dtype
    m = q.shape[_seq_axis(cfg.layout)]
    s = slopes.astype(dtype)
    q_dec = _rows_factor(_q_decay(s, m)[None], cfg.layout)
    do_c = do.astype(dtype)
    # dL/d S_in(p) from this device's own rows.
    a = jnp.einsum(_A[cfg.layout], q.astype(dtype) * q_dec, do_c, precision=HIGHEST)
    d_out, d_s0 = _combine_backward(a, d_final.astype(dtype), s, m, s0_like is not None, cfg)
    dq, dk, dv = local_vjp((do, d_out.astype(jnp.float32)))
    dq_corr = jnp.einsum(_DQ[cfg.layout], do_c, s_in, precision=HIGHEST) * q_dec
    dq = (dq.astype(dtype) + dq_corr).astype(q.dtype)
    if d_s0 is not None:
        d_s0 = d_s0.astype(s0_like.dtype)
    # Slopes are constants of the operator (as in the single-device op): no gradient.
    return dq, dk, dv, jnp.zeros_like(slopes), d_s0


_sp.defvjp(_sp_fwd, _sp_bwd)


def _sp_segmented(q, k, v, slopes, s0, segment_ids, cfg: _Config):
    """Sequence parallelism with segment ids (ppermute combine, plain autodiff).

    The combine becomes an affine scan over devices: S_out(p) = s_loc(p) +
    A_p S_out(p-1), with A_p = lambda^m where device p's first row continues the
    previous device's last run and its shard has no boundary inside, else 0. The
    state entering device p reaches only its first run, and only if that run
    continues from device p-1. The doubling scan composes (A, x) pairs.
    """
    dtype = compute_dtype(q, k, v)
    n, axis = cfg.devices, cfg.axis_name
    m = q.shape[_seq_axis(cfg.layout)]
    p = lax.axis_index(axis)
    s = slopes.astype(dtype)
    o_loc, s_loc = _local_op(slopes, cfg, segment_ids)(q, k, v)
    counts = segment_counts(segment_ids)  # [B, m]
    prev_last = _shift(segment_ids[:, -1], axis, n, 1)  # device p-1's last id
    continues = (segment_ids[:, 0] == prev_last) | (p == 0)  # [B]
    through = counts[:, -1] == 0  # no boundary inside this shard
    gate = jnp.where((continues & through)[:, None], _decay(s, m)[None], 0)  # [B, H]
    x = s_loc.astype(dtype)
    s0c = None if s0 is None else s0.astype(dtype)
    if s0c is not None:
        x = x + jnp.where(p == 0, gate[..., None, None] * s0c, 0)
    shift = 1
    while shift < n:
        received_x = _shift(x, axis, n, shift)
        received_gate = _shift(gate, axis, n, shift)
        x = x + gate[..., None, None] * received_x
        gate = gate * received_gate
        shift *= 2
    s_in = _shift(x, axis, n, 1)  # the state after device p-1
    if s0c is not None:
        s_in = s_in + jnp.where(p == 0, s0c, 0)
    s_in = jnp.where(continues[:, None, None, None], s_in, 0)
    first_run = (counts == 0).astype(dtype)  # [B, m]: rows the incoming state reaches
    q_dec = q.astype(dtype) * _rows_factor(_q_decay(s, m)[None] * first_run[:, None, :], cfg.layout)
    correction = jnp.einsum(_O[cfg.layout], q_dec, s_in, precision=HIGHEST)
    o = (o_loc.astype(dtype) + correction).astype(q.dtype)
    return o, _from_device(x, axis, p, n - 1).astype(jnp.float32)


def _check_call(q, k, v, slopes, initial_state, segment_ids, options: dict, layout: str):
    """The sequence-parallel ops' checks, once at their public entry.

    Returns (slopes as float32 `[H]`, the resolved impl name).
    """
    slopes = check_inputs(q, k, v, slopes, initial_state, layout)
    name = check_options(
        options["impl"], options["return_final_state"], options["block_size"],
        options["interpret"], "default", q.dtype,
    )  # fmt: skip
    if options["combine"] not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {options['combine']!r}")
    if segment_ids is not None:
        dims = dims_of(q, v, layout)
        check_segment_ids(
            segment_ids, dims.batch, dims.seq, hint=lambda n: layout_hint(layout, q, n, "seq")
        )
        if options["combine"] != "ppermute":
            raise NotImplementedError('segment_ids need combine="ppermute" (all_gather: not yet)')
    return slopes, name


def lightning_attention_sp(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slopes: jax.Array | float | None = None,
    *,
    axis_name: AxisName,
    initial_state: jax.Array | None = None,
    return_final_state: bool = False,
    impl: str = "auto",
    block_size: int | None = None,
    combine: str = "ppermute",
    interpret: bool | None = None,
    segment_ids: jax.Array | None = None,
    layout: str = "bhtd",
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Sequence-parallel Lightning Attention, called inside `jax.shard_map`.

    The arguments are this device's shards: the sequence dimension (axis 2) is
    sharded over the mesh axis `axis_name` of P devices, device p holding rows
    [p*m, (p+1)*m) of the global sequence. The result equals the single-device
    `lightning_attention` on the whole sequence (up to rounding), gradients too.
    Each device runs the single-device op (`impl`) on its shard; the `[B, H, D, E]`
    states are combined across devices (communication independent of T), then
    each device adds lambda^(i+1) q_i S_in to its rows. Works under
    `jax.shard_map` with check_vma=True or False; the final state comes back
    typed as replicated over `axis_name` (out_specs without that axis).

    Args:
      q: `[B, H, m, D]` this device's queries (m = T / P).
      k: `[B, H, m, D]` keys.
      v: `[B, H, m, E]` values.
      slopes: None (no decay), a scalar, or `[H]`, all >= 0; the same on every
        device. Constants: no gradient flows to them.
      axis_name: the mesh axis (or tuple of axes, in mesh order) that the sequence
        is sharded over.
      initial_state: optional `[B, H, D, E]` state before the first token of the
        global sequence, replicated over `axis_name`. Differentiable.
      return_final_state: also return the float32 `[B, H, D, E]` state after the
        last token of the global sequence (the same on every device).
      impl: the single-device implementation run on each shard ("auto", "xla",
        "triton", "mosaic_tpu", "reference"), as in `lightning_attention`.
      block_size: rows per block of that implementation's tiling (None: default).
      combine: "ppermute" (default; a doubling scan, ceil(log2 P) + 1 ppermute
        steps plus one all-reduce per pass) or "all_gather" (one all-gather of
        the P local states per pass).
      interpret: for the Pallas implementations, run the kernel in the Pallas
        interpreter, as in `lightning_attention`. None: exactly when the default
        backend is CPU; False forces the real kernel (what lowering for another
        platform on a CPU host needs). Ignored by "xla" and "reference".
      segment_ids: optional int `[B, m]`, this device's shard of the global
        `[B, T]` ids (sharded like q's sequence axis): the state resets where
        the id changes, as in `lightning_attention`. A run that crosses a
        device boundary carries its state across; one that starts on a device
        does not receive the incoming state. ppermute combine only.
      layout: "bhtd" (shards `[B, H, m, D]`, the sequence on axis 2) or "bthd"
        (`[B, m, H, D]`, the sequence on axis 1), as in `lightning_attention`.

    Returns:
      o `[B, H, m, E]` (`[B, m, H, E]` in "bthd"; this device's rows) in q's dtype; with
      `return_final_state=True`, `(o, final_state)`.

    Raises:
      ValueError: a wrong rank or shape of a shard (naming the argument), an
        unbound or missing `axis_name`, an initial_state or slopes that vary over
        `axis_name`, an unknown `impl` or `combine`, a bad `block_size`, negative
        slopes.
      TypeError: a non-floating dtype.
    """
    options = dict(
        impl=impl, return_final_state=return_final_state, block_size=block_size,
        interpret=interpret, combine=combine,
    )  # fmt: skip
    slopes, name = _check_call(q, k, v, slopes, initial_state, segment_ids, options, layout)
    return _sp_checked(
        q, k, v, slopes, axis_name=axis_name, initial_state=initial_state,
        segment_ids=segment_ids, layout=layout, **(options | {"impl": name}),
    )  # fmt: skip


def _sp_checked(
    q, k, v, slopes, *, axis_name, initial_state, return_final_state, impl, block_size,
    combine, interpret, segment_ids, layout,
):  # fmt: skip
    """`lightning_attention_sp` on checked arguments (slopes `[H]` float32, impl resolved)."""
    devices, typed = _check_axis(axis_name)
    _check_replicated("initial_state", initial_state, axis_name)
    _check_replicated("slopes", slopes, axis_name)
    if devices == 1 and not typed:  # nothing to combine
        return attention(
            q,
            k,
            v,
            slopes,
            initial_state=initial_state,
            return_final_state=return_final_state,
            impl=impl,
            block_size=block_size,
            interpret=interpret,
            precision="default",
            segment_ids=segment_ids,
            layout=layout,
        )
    if typed:
        q, k, v = (_to_varying(x, axis_name) for x in (q, k, v))
    cfg = _Config(axis_name, devices, typed, impl, block_size, combine, interpret, layout)
    if segment_ids is not None:
        if typed:
            segment_ids = _to_varying(segment_ids, axis_name)
        o, final = _sp_segmented(
            q, k, v, lax.stop_gradient(slopes), initial_state, segment_ids, cfg
        )
        return (o, final) if return_final_state else o
    o, final = _sp(q, k, v, lax.stop_gradient(slopes), initial_state, cfg)
    return (o, final) if return_final_state else o


# --- the convenience wrapper over a Mesh --------------------------------------------------


def _mesh_axes(mesh: Mesh, name: str, axis) -> tuple:
    names = _axis_names(axis)
    unknown = [a for a in names if a not in mesh.axis_names]
    if not names or unknown:
        raise ValueError(
            f"{name} must name axes of the mesh {tuple(mesh.axis_names)}, got {axis!r}"
        )
    return names


def _explicit_axes(mesh: Mesh) -> frozenset:
    types = getattr(mesh, "axis_types", None)
    if types is None:
        return frozenset()
    explicit = getattr(jax.sharding.AxisType, "Explicit", None)
    return frozenset(a for a, t in zip(mesh.axis_names, types) if t == explicit)


def _place(x: jax.Array, mesh: Mesh, spec: P, explicit: frozenset) -> jax.Array:
    """On meshes with Explicit axes, reshard x to spec (its Explicit axes) for shard_map."""
    if not explicit:
        return x

    def keep(entry):
        if entry is None:
            return None
        kept = tuple(a for a in _axis_names(entry) if a in explicit)
        return kept if len(kept) > 1 else (kept[0] if kept else None)

    return jax.reshard(x, NamedSharding(mesh, P(*(keep(e) for e in spec))))


def lightning_attention_sharded(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slopes: jax.Array | float | None = None,
    *,
    mesh: Mesh,
    seq_axis: AxisName,
    batch_axis: AxisName | None = None,
    initial_state: jax.Array | None = None,
    return_final_state: bool = False,
    impl: str = "auto",
    block_size: int | None = None,
    combine: str = "ppermute",
    interpret: bool | None = None,
    segment_ids: jax.Array | None = None,
    layout: str = "bhtd",
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Sequence-parallel Lightning Attention on global arrays over a `Mesh`.

    Runs `lightning_attention_sp` under `jax.shard_map`, the sequence dimension
    sharded over `seq_axis` (and the batch over `batch_axis` if given); heads and
    head dims are replicated; other mesh axes see replicated work. Works eagerly
    and inside `jax.jit`, on meshes with Auto or Explicit axes; the result equals
    `lightning_attention` on one device (up to rounding), gradients too.

    Args:
      q: `[B, H, T, D]` queries (the global arrays).
      k: `[B, H, T, D]` keys.
      v: `[B, H, T, E]` values.
      slopes: None, a scalar, or `[H]`, all >= 0 (constants, no gradient).
      mesh: a `jax.sharding.Mesh` holding `seq_axis` (and `batch_axis`).
      seq_axis: mesh axis (or tuple of axes) to shard the sequence over; T must
        be divisible by its number of devices.
      batch_axis: optional mesh axis (or tuple) to shard the batch over; B must
        be divisible by its number of devices.
      initial_state: optional `[B, H, D, E]` state before the first token.
      return_final_state: also return the float32 `[B, H, D, E]` final state.
      impl: the single-device implementation run on each shard.
      block_size: rows per block of that implementation (None: default).
      combine: "ppermute" (default) or "all_gather"; see `lightning_attention_sp`.
      interpret: Pallas implementations only: run the kernel in the Pallas
        interpreter (None: exactly when the default backend is CPU); see
        `lightning_attention`.
      segment_ids: optional int `[B, T]` ids of packed sequences (the state
        resets where the id changes); sharded like q. ppermute combine only.
      layout: "bhtd" (`[B, H, T, D]`) or "bthd" (`[B, T, H, D]`), as in
        `lightning_attention`; the sequence axis is sharded in either.

    Returns:
      o `[B, H, T, E]` in q's dtype (sharded like q), or `(o, final_state)`.

    Raises:
      ValueError: bad shapes (naming the argument), axes not in the mesh or
        shared by seq_axis and batch_axis, T (or B) not divisible by the number
        of devices on seq_axis (batch_axis), an unknown `impl` or `combine`.
      TypeError: a non-floating dtype, or `mesh` not a `jax.sharding.Mesh`.
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    options = dict(
        impl=impl, return_final_state=True, block_size=block_size, interpret=interpret,
        combine=combine,
    )  # fmt: skip
    if not isinstance(return_final_state, bool):
        raise TypeError(f"return_final_state must be a bool, got {return_final_state!r}")
    slopes, name = _check_call(q, k, v, slopes, initial_state, segment_ids, options, layout)
    seq_names = _mesh_axes(mesh, "seq_axis", seq_axis)
    batch_names = () if batch_axis is None else _mesh_axes(mesh, "batch_axis", batch_axis)
    if set(seq_names) & set(batch_names):
        raise ValueError(
            f"seq_axis {seq_axis!r} and batch_axis {batch_axis!r} must not share mesh axes"
        )
    batch, _, seq, _, _ = dims_of(q, v, layout)
    n_seq = math.prod(mesh.shape[a] for a in seq_names)
    if seq % n_seq:
        raise ValueError(
            f"seq (= {seq}, axis {_seq_axis(layout)} of q, k, v) must be divisible by the "
            f"number of devices on seq_axis {seq_axis!r} (= {n_seq})"
        )
    n_batch = math.prod(mesh.shape[a] for a in batch_names)
    if batch % n_batch:
        raise ValueError(
            f"batch (= {batch}, axis 0 of q, k, v) must be divisible by the number of devices "
            f"on batch_axis {batch_axis!r} (= {n_batch})"
        )

    x_spec = (
        P(batch_axis, seq_axis, None, None)
        if layout == "bthd"
        else P(batch_axis, None, seq_axis, None)
    )
    state_spec = P(batch_axis, None, None, None)
    has_s0 = initial_state is not None
    has_ids = segment_ids is not None

    def body(q, k, v, slopes, *rest):
        return _sp_checked(
            q, k, v, slopes, axis_name=seq_axis, initial_state=rest[0] if has_s0 else None,
            segment_ids=rest[-1] if has_ids else None, layout=layout,
            **(options | {"impl": name}),
        )  # fmt: skip

    in_specs = (
        (x_spec, x_spec, x_spec, P(None))
        + ((state_spec,) if has_s0 else ())
        + ((P(batch_axis, seq_axis),) if has_ids else ())
    )
    args = (
        (q, k, v, slopes)
        + ((initial_state,) if has_s0 else ())
        + ((segment_ids,) if has_ids else ())
    )
    explicit = _explicit_axes(mesh)
    args = tuple(_place(x, mesh, spec, explicit) for x, spec in zip(args, in_specs))
    # check_vma=False: the single-device XLA path builds some scan carries with plain
    # jnp.zeros, which shard_map's replication typing rejects for long shards; the
    # sequence-parallel backward handles both modes.
    fn = _shard_map(
        body, mesh=mesh, in_specs=in_specs, out_specs=(x_spec, state_spec), check_vma=False
    )
    o, final = fn(*args)
    return (o, final) if return_final_state else o
