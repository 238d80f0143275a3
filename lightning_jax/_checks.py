"""Argument checks shared by every implementation: they run before any compute."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def _shape_str(x) -> str:
    return f"{tuple(x.shape)} {x.dtype}"


def _check_float_array(name: str, x) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")


LAYOUTS = ("bhtd", "bthd")
# Axis names of q, k, v in each layout, in order.
_AXES = {"bhtd": ("batch", "heads", "seq", "dim"), "bthd": ("batch", "seq", "heads", "dim")}
_OTHER = {"bhtd": "bthd", "bthd": "bhtd"}


class Dims(NamedTuple):
    """The sizes of the op's axes, whatever the layout."""

    batch: int
    heads: int
    seq: int
    d: int
    e: int


def check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def dims_of(q, v, layout: str) -> Dims:
    """(batch, heads, seq, d, e) of q `[B, H, T, D]` ("bhtd") or `[B, T, H, D]` ("bthd")."""
    if layout == "bthd":
        batch, seq, heads, d = q.shape
    else:
        batch, heads, seq, d = q.shape
    return Dims(batch, heads, seq, d, v.shape[-1])


def layout_hint(layout: str, q, size: int, axis: str) -> str:
    """ " (... pass layout=...)" when `size` matches q's other layout's `axis`, else ""."""
    other = _OTHER[layout]
    if q.shape[_AXES[other].index(axis)] != size or q.shape[_AXES[layout].index(axis)] == size:
        return ""
    return (
        f"; q {tuple(q.shape)} has {size} {axis} in layout={other!r} "
        f"([{', '.join(_AXES[other])}]): pass layout={other!r} if that is its layout"
    )


def check_inputs(q, k, v, slopes, initial_state, layout: str = "bhtd") -> jax.Array:
    """Checks the op's arguments; returns the slopes as a float32 `[heads]` array.

    Raises:
      TypeError: an array argument has a non-floating dtype, or q, k, v differ
        in dtype.
      ValueError: a rank or shape does not match the contract
        q, k `[batch, heads, seq, d]` (layout "bhtd") or `[batch, seq, heads, d]`
        ("bthd"), v the same with e, slopes None / scalar / `[heads]`,
        initial_state `[batch, heads, d, e]`, or slopes are negative or not finite
        (checked when their values exist at the call, not when traced: see
        `normalize_slopes`).
    """
    check_layout(layout)
    axes = ", ".join(_AXES[layout])
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_float_array(name, x)
        if x.ndim != 4:
            raise ValueError(
                f"{name} must have rank 4 [{axes}] (layout={layout!r}), got shape {tuple(x.shape)}"
            )
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(
            f"q, k and v must have the same dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype} "
            "(cast them to one dtype first, e.g. v.astype(q.dtype))"
        )
    if q.shape != k.shape:
        raise ValueError(
            f"q and k must have the same shape [{axes}]; got q {_shape_str(q)}, k {_shape_str(k)}"
        )
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v must match q in every axis but the last ([{axes.replace('dim', 'e')}], "
            f"layout={layout!r}); got q {_shape_str(q)}, v {_shape_str(v)}"
        )
    batch, heads, seq, d, e = dims_of(q, v, layout)
    if seq < 1 or d < 1 or e < 1 or batch < 1 or heads < 1:
        raise ValueError(
            f"q, k, v must have non-empty dimensions; got q {_shape_str(q)}, v {_shape_str(v)}"
        )

    if initial_state is not None:
        _check_float_array("initial_state", initial_state)
        if tuple(initial_state.shape) != (batch, heads, d, e):
            hint = ""
            if initial_state.ndim == 4:
                hint = layout_hint(layout, q, initial_state.shape[1], "heads")
            raise ValueError(
                f"initial_state must have shape [batch, heads, d, e] = {(batch, heads, d, e)}, "
                f"got {tuple(initial_state.shape)}{hint}"
            )
    return normalize_slopes(slopes, heads, hint=lambda n: layout_hint(layout, q, n, "heads"))


def normalize_slopes(slopes, heads: int, hint=None) -> jax.Array:
    """None -> zeros, scalar -> repeated over heads, `[heads]` -> itself; as float32.

    Slopes may be any real array-like: a Python or NumPy number, a list or tuple,
    a NumPy or JAX array of any integer or floating dtype (not bool or complex).
    `hint(n)`: text to append when `[n]` slopes do not match `heads`.

    Which slopes are checked (finite and >= 0): every slope whose value exists when
    the op is called, i.e. Python numbers and NumPy arrays always (also under
    `jax.jit`), and JAX arrays that are not tracers (eager calls, or arrays a jitted
    function closes over, such as the constant slopes of `lm_train`'s model). Traced
    slopes (an argument of a function under `jax.jit`, `vmap` or `nnx.jit`, or
    computed inside one) have no value at trace time and are not checked: a
    negative one silently gives a decay exp(-slope) > 1.
    """
    if slopes is None:
        return jnp.zeros((heads,), jnp.float32)
    if isinstance(slopes, (bool, np.bool_)):
        raise TypeError(f"slopes must be None, a number or a [heads] array, got {slopes!r}")
    if isinstance(slopes, (list, tuple)):
        slopes = np.asarray(slopes)
    elif isinstance(slopes, (int, float, np.integer, np.floating)):
        slopes = np.float32(slopes)
    if not hasattr(slopes, "shape") or not hasattr(slopes, "dtype"):
        raise TypeError(
            f"slopes must be None, a number, a sequence or a [heads] array, got "
            f"{type(slopes).__name__}"
        )
    if not (
        jnp.issubdtype(slopes.dtype, jnp.integer) or jnp.issubdtype(slopes.dtype, jnp.floating)
    ):
        raise TypeError(f"slopes must be real numbers (integer or floating), got {slopes.dtype}")
    if np.ndim(slopes) != 0 and tuple(np.shape(slopes)) != (heads,):
        size = np.shape(slopes)[0] if np.ndim(slopes) == 1 else None
        extra = hint(size) if hint is not None and size is not None else ""
        raise ValueError(
            f"slopes must be None, a scalar or shape [heads] = ({heads},), got shape "
            f"{tuple(np.shape(slopes))}{extra}"
        )
    # Before any jnp call: under jit, jnp turns even a constant into a tracer.
    if not isinstance(slopes, jax.core.Tracer):
        concrete = np.asarray(slopes, np.float32)
        if not np.all(np.isfinite(concrete)) or np.any(concrete < 0):
            raise ValueError(
                f"slopes must be finite and >= 0 (decay exp(-slope) <= 1), got {concrete}"
            )
    if np.ndim(slopes) == 0:
        return jnp.full((heads,), slopes, jnp.float32)
    return jnp.asarray(slopes, jnp.float32)


def compute_dtype(*arrays) -> jnp.dtype:
    """float32, or float64 when an input is float64 (x64 enabled)."""
    return jnp.result_type(jnp.float32, *(a.dtype for a in arrays))


def check_segment_ids(segment_ids, batch: int, seq: int, hint=None) -> None:
    """Checks `segment_ids` against the contract: an integer `[batch, seq]` array.

    `hint(n)`: text to append when the ids hold `n` positions, not `seq`.

    Raises:
      TypeError: not an array, or a non-integer dtype.
      ValueError: a shape other than `[batch, seq]`.
    """
    if not hasattr(segment_ids, "shape") or not hasattr(segment_ids, "dtype"):
        raise TypeError(
            f"segment_ids must be an integer [batch, seq] array, got {type(segment_ids).__name__}"
        )
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise TypeError(f"segment_ids must have an integer dtype, got {segment_ids.dtype}")
    if tuple(segment_ids.shape) != (batch, seq):
        extra = ""
        if hint is not None and segment_ids.ndim == 2:
            extra = hint(segment_ids.shape[1])
        raise ValueError(
            f"segment_ids must have shape [batch, seq] = {(batch, seq)}, got "
            f"{tuple(segment_ids.shape)}{extra}"
        )


def segment_counts(segment_ids: jax.Array) -> jax.Array:
    """int32 `[batch, seq]`: how many run boundaries lie at or before each position.

    A run boundary is a position t > 0 whose id differs from the id at t - 1, so
    two positions i >= j are in the same run exactly when their counts are equal
    (counts never decrease along a row). Position 0 always has count 0.
    """
    changes = (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)
    return jnp.concatenate(
        [jnp.zeros_like(changes, shape=(changes.shape[0], 1)), jnp.cumsum(changes, axis=1)],
        axis=1,
    )
