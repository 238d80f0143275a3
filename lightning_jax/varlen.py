"""Packed variable-length sequences with one state each (FLA's `cu_seqlens` convention)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lightning_jax._checks import check_inputs, compute_dtype, dims_of
from lightning_jax.api import attention, check_options
from lightning_jax.xla import MATMUL_PRECISION


def _check_cu_seqlens(cu_seqlens, total: int) -> np.ndarray:
    """The concrete `[n + 1]` offsets as int64 numpy, or a ValueError/TypeError naming them."""
    if isinstance(cu_seqlens, jax.core.Tracer):
        raise TypeError(
            "cu_seqlens must be concrete (numpy or a concrete array), not traced: the sequence "
            "boundaries set static slices (pass it as a static/closed-over value under jit)"
        )
    if not hasattr(cu_seqlens, "shape") or not hasattr(cu_seqlens, "dtype"):
        cu_seqlens = np.asarray(cu_seqlens)
    if not np.issubdtype(np.dtype(cu_seqlens.dtype), np.integer):
        raise TypeError(f"cu_seqlens must have an integer dtype, got {cu_seqlens.dtype}")
    cu = np.asarray(cu_seqlens, np.int64)
    if cu.ndim != 1 or cu.shape[0] < 2:
        raise ValueError(f"cu_seqlens must have shape [n + 1] with n >= 1, got {cu.shape}")
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cu[0]}")
    if np.any(np.diff(cu) <= 0):
        raise ValueError(f"cu_seqlens must be strictly increasing (no empty sequence), got {cu}")
    if cu[-1] != total:
        raise ValueError(
            f"cu_seqlens must end at total (the packed length of q) = {total}, got {cu[-1]}"
        )
    return cu


def lightning_attention_varlen(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slopes: jax.Array | float | None = None,
    *,
    cu_seqlens,
    initial_states: jax.Array | None = None,
    return_final_states: bool = False,
    impl: str = "auto",
    block_size: int | None = None,
    interpret: bool | None = None,
    precision: str = "default",
    layout: str = "bhtd",
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """`lightning_attention` on n sequences packed into one row, one state per sequence.

    Sequence i is rows [cu_seqlens[i], cu_seqlens[i+1]) of the packed inputs; no
    token sees another sequence. This is what a server needs to prefill many
    prompts at once and then decode each from its own state.

    Built on the segment-id path (`segment_ids` = the sequence index of each
    row, so the kernel cuts the state at every boundary); the per-sequence
    initial states enter as lambda^(t+1) q_t S_i on each sequence's rows and
    the final states are each sequence's sum of lambda^(L-1-t) k_t^T v_t (plus
    lambda^L S_i), both as plain matmuls over static slices: about one extra
    pass over q, k, v. Differentiable in q, k, v and initial_states.

    Args:
      q: `[1, H, total, D]` packed queries (`[1, total, H, D]` with
        layout="bthd").
      k: packed keys, the shape of q.
      v: `[1, H, total, E]` packed values (`[1, total, H, E]`).
      slopes: as in `lightning_attention` (None, a scalar or `[H]`).
      cu_seqlens: `[n + 1]` integer offsets, 0 = cu_seqlens[0] < ... <
        cu_seqlens[n] = total. Concrete values (numpy, or a concrete jax array):
        they set static slices, so under `jax.jit` pass them as a static or
        closed-over value (each distinct packing compiles once).
      initial_states: optional `[n, H, D, E]` state before each sequence
        (zeros if None).
      return_final_states: also return the `[n, H, D, E]` float32 states after
        each sequence.
      impl, block_size, interpret, precision, layout: as in `lightning_attention`.

    Returns:
      o `[1, H, total, E]` (`[1, total, H, E]`) in q's dtype, or `(o, final_states)`.

    Raises:
      ValueError: q not of batch 1, cu_seqlens not of shape [n + 1], not
        starting at 0, not strictly increasing or not ending at total,
        initial_states not `[n, H, D, E]`, or any error of `lightning_attention`.
      TypeError: cu_seqlens traced or not integer, or as `lightning_attention`.
    """
    slopes = check_inputs(q, k, v, slopes, None, layout)
    if q.shape[0] != 1:
        raise ValueError(
            f"q, k, v must be packed with batch 1 ([1, heads, total, dim], or [1, total, heads, "
            f"dim] with layout='bthd'), got batch {q.shape[0]} (q {tuple(q.shape)})"
        )
    _, heads, total, d, e = dims_of(q, v, layout)
    cu = _check_cu_seqlens(cu_seqlens, total)
    n = cu.shape[0] - 1
    if initial_states is not None:
        if not hasattr(initial_states, "shape") or not jnp.issubdtype(
            initial_states.dtype, jnp.floating
        ):
            raise TypeError("initial_states must be a floating [n, heads, d, e] array")
        if tuple(initial_states.shape) != (n, heads, d, e):
            raise ValueError(
                f"initial_states must have shape [n, heads, d, e] = {(n, heads, d, e)} "
                f"(n = len(cu_seqlens) - 1), got {tuple(initial_states.shape)}"
            )
    if not isinstance(return_final_states, bool):
        raise TypeError(f"return_final_states must be a bool, got {return_final_states!r}")
    name = check_options(impl, False, block_size, interpret, precision, q.dtype)

    lengths = np.diff(cu)
    segment_ids = jnp.asarray(np.repeat(np.arange(n, dtype=np.int32), lengths)[None])
    o = attention(
        q,
        k,
        v,
        slopes,
        initial_state=None,
        return_final_state=False,
        impl=name,
        block_size=block_size,
        interpret=interpret,
        precision=precision,
        segment_ids=segment_ids,
        layout=layout,
    )
    if initial_states is None and not return_final_states:
        return o

    dtype = compute_dtype(q, k, v)
    mm = MATMUL_PRECISION[precision]

    def rows(x: jax.Array, i: int) -> jax.Array:
        """Sequence i of packed x: [H, L_i, width] in either layout."""
        if layout == "bthd":
            return jnp.swapaxes(x[0, cu[i] : cu[i + 1]], 0, 1)
        return x[0, :, cu[i] : cu[i + 1]]

    exact = lax.Precision.HIGHEST  # float32 states: never rounded to a fast matmul
    s = lax.stop_gradient(slopes).astype(dtype)[:, None]  # [H, 1]
    if initial_states is not None:
        states0 = initial_states.astype(dtype)
        corrections = []
        for i in range(n):
            decay = jnp.exp(-s * jnp.arange(1, lengths[i] + 1, dtype=dtype))  # [H, L]
            q_i = rows(q, i).astype(dtype) * decay[..., None]
            corrections.append(jnp.einsum("htd,hde->hte", q_i, states0[i], precision=exact))
        correction = jnp.concatenate(corrections, axis=1)[None]  # [1, H, total, e]
        if layout == "bthd":
            correction = jnp.swapaxes(correction, 1, 2)
        o = (o.astype(dtype) + correction).astype(q.dtype)
    if not return_final_states:
        return o
    finals = []
    for i in range(n):
        k_i, v_i = rows(k, i), rows(v, i)
        k_decay = jnp.exp(-s * jnp.arange(lengths[i] - 1, -1, -1, dtype=dtype))  # [H, L]
        k_i = (k_i.astype(dtype) * k_decay[..., None]).astype(k_i.dtype)
        state = jnp.einsum(
            "htd,hte->hde", k_i, v_i.astype(k_i.dtype), precision=mm,
            preferred_element_type=jnp.float32,
        )  # fmt: skip
        if initial_states is not None:
            state = state + jnp.exp(-s * lengths[i])[..., None] * states0[i]
        finals.append(state)
    return o, jnp.stack(finals).astype(jnp.float32)
