"""Pure-jnp references of the Lightning Attention operator, for numerical checks.

Both compute in float32 (float64 when the inputs are float64) with
`precision=HIGHEST` and follow the public op's conventions: q, k
`[batch, heads, seq, d]`, v `[batch, heads, seq, e]`, slopes None / scalar /
`[heads]`, state `[batch, heads, d, e]` (kv after the last token). They are
differentiable by ordinary autodiff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from lightning_jax._checks import check_inputs, compute_dtype

HIGHEST = lax.Precision.HIGHEST


def _prepare(q, k, v, slopes, initial_state):
    s = check_inputs(q, k, v, slopes, initial_state)
    dtype = compute_dtype(q, k, v)
    batch, heads, _, d = q.shape
    e = v.shape[-1]
    if initial_state is None:
        s0 = jnp.zeros_like(q, shape=(batch, heads, d, e), dtype=dtype)
    else:
        s0 = initial_state.astype(dtype)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), s.astype(dtype), s0


def _finish(o, state, out_dtype, return_final_state):
    o = o.astype(out_dtype)
    return (o, state.astype(jnp.float32)) if return_final_state else o


def naive_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slopes=None,
    *,
    initial_state: jax.Array | None = None,
    return_final_state: bool = False,
):
    """O(seq^2) masked formula: o = ((Q K^T) * D) V + (lambda^(t+1) q_t) S0.

    D[i, j] = lambda^(i-j) for i >= j else 0, lambda = exp(-slope) per head. The
    final state is lambda^n S0 + sum_t lambda^(n-1-t) k_t^T v_t.

    Args:
      q: `[B, H, T, D]` queries.
      k: `[B, H, T, D]` keys.
      v: `[B, H, T, E]` values.
      slopes: None (no decay), a scalar, or `[H]`.
      initial_state: optional `[B, H, D, E]` state before the first token.
      return_final_state: also return the `[B, H, D, E]` float32 state.

    Returns:
      o `[B, H, T, E]` in q's dtype, or (o, final_state).
    """
    out_dtype = q.dtype
    q, k, v, s, s0 = _prepare(q, k, v, slopes, initial_state)
    n = q.shape[2]
    t = jnp.arange(n, dtype=s.dtype)
    gap = t[:, None] - t[None, :]
    causal = gap >= 0
    decay = jnp.where(causal, jnp.exp(-s[:, None, None] * jnp.maximum(gap, 0)), 0)  # [H, T, T]
    scores = jnp.einsum("bhid,bhjd->bhij", q, k, precision=HIGHEST) * decay
    o = jnp.einsum("bhij,bhje->bhie", scores, v, precision=HIGHEST)
    q_decay = jnp.exp(-s[:, None] * (t + 1))  # [H, T]
    o = o + jnp.einsum("bhtd,bhde->bhte", q * q_decay[..., None], s0, precision=HIGHEST)
    k_decay = jnp.exp(-s[:, None] * (n - 1 - t))
    state = jnp.exp(-s * n)[:, None, None] * s0 + jnp.einsum(
        "bhtd,bhte->bhde", k * k_decay[..., None], v, precision=HIGHEST
    )
    return _finish(o, state, out_dtype, return_final_state)


def recurrent_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slopes=None,
    *,
    initial_state: jax.Array | None = None,
    return_final_state: bool = False,
):
    """Per-token recurrence: kv_t = lambda kv_{t-1} + k_t^T v_t, o_t = q_t kv_t.

    A `lax.scan` over the sequence; the decoding step of a model is one step of
    this. Arguments and returns as in `naive_attention`.
    """
    out_dtype = q.dtype
    q, k, v, s, s0 = _prepare(q, k, v, slopes, initial_state)
    lam = jnp.exp(-s)[None, :, None, None]

    def step(kv, qkv_t):
        q_t, k_t, v_t = qkv_t  # [B, H, d], [B, H, d], [B, H, e]
        kv = lam * kv + k_t[..., :, None] * v_t[..., None, :]
        o_t = jnp.einsum("bhd,bhde->bhe", q_t, kv, precision=HIGHEST)
        return kv, o_t

    seq_first = tuple(jnp.moveaxis(x, 2, 0) for x in (q, k, v))
    state, o = lax.scan(step, s0, seq_first)
    return _finish(jnp.moveaxis(o, 0, 2), state, out_dtype, return_final_state)
