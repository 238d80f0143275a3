"""Argument checks shared by every implementation: they run before any compute."""

from __future__ import annotations

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


def check_inputs(q, k, v, slopes, initial_state) -> jax.Array:
    """Checks the op's arguments; returns the slopes as a float32 `[heads]` array.

    Raises:
      TypeError: an array argument has a non-floating dtype.
      ValueError: a rank or shape does not match the contract
        q, k `[batch, heads, seq, d]`, v `[batch, heads, seq, e]`,
        slopes None / scalar / `[heads]`, initial_state `[batch, heads, d, e]`,
        or slopes are negative or not finite (checked when their values exist at
        the call, not when traced: see `normalize_slopes`).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_float_array(name, x)
        if x.ndim != 4:
            raise ValueError(
                f"{name} must have rank 4 [batch, heads, seq, dim], got shape {tuple(x.shape)}"
            )
    if q.shape != k.shape:
        raise ValueError(
            f"q and k must have the same shape [batch, heads, seq, d]; got q {_shape_str(q)}, "
            f"k {_shape_str(k)}"
        )
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            "v must match q in batch, heads and seq ([batch, heads, seq, e]); got "
            f"q {_shape_str(q)}, v {_shape_str(v)}"
        )
    batch, heads, seq, d = q.shape
    e = v.shape[-1]
    if seq < 1 or d < 1 or e < 1 or batch < 1 or heads < 1:
        raise ValueError(
            f"q, k, v must have non-empty dimensions; got q {_shape_str(q)}, v {_shape_str(v)}"
        )

    if initial_state is not None:
        _check_float_array("initial_state", initial_state)
        if tuple(initial_state.shape) != (batch, heads, d, e):
            raise ValueError(
                f"initial_state must have shape [batch, heads, d, e] = {(batch, heads, d, e)}, "
                f"got {tuple(initial_state.shape)}"
            )
    return normalize_slopes(slopes, heads)


def normalize_slopes(slopes, heads: int) -> jax.Array:
    """None -> zeros, scalar -> repeated over heads, `[heads]` -> itself; as float32.

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
    if isinstance(slopes, bool):
        raise TypeError(f"slopes must be None, a number or a [heads] array, got {slopes!r}")
    if isinstance(slopes, (int, float, np.integer, np.floating)):
        slopes = np.float32(slopes)
    else:
        _check_float_array("slopes", slopes)
    if np.ndim(slopes) != 0 and tuple(np.shape(slopes)) != (heads,):
        raise ValueError(
            f"slopes must be None, a scalar or shape [heads] = ({heads},), got shape "
            f"{tuple(np.shape(slopes))}"
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


def check_segment_ids(segment_ids, batch: int, seq: int) -> None:
    """Checks `segment_ids` against the contract: an integer `[batch, seq]` array.

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
        raise ValueError(
            f"segment_ids must have shape [batch, seq] = {(batch, seq)}, got "
            f"{tuple(segment_ids.shape)}"
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
