"""Pure-jnp references of the Lightning Attention operator, for numerical checks.

Both compute in float32 (float64 when the inputs are float64) with
`precision=HIGHEST` and follow the public op's conventions: q, k
`[batch, heads, seq, d]`, v `[batch, heads, seq, e]`, slopes None / scalar /
`[heads]`, state `[batch, heads, d, e]` (kv after the last token). They are
differentiable by ordinary autodiff.

With `segment_ids` (int `[batch, seq]`), the state is reset to zero at every
position whose id differs from the previous position's: each run of equal ids is
an independent sequence. `initial_state` feeds only the first run of each row,
and the final state is that of the last run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from lightning_jax._checks import check_inputs, check_segment_ids, compute_dtype, segment_counts

HIGHEST = lax.Precision.HIGHEST


def _prepare(q, k, v, slopes, initial_state, segment_ids=None):
    s = check_inputs(q, k, v, slopes, initial_state)
    if segment_ids is not None:
        check_segment_ids(segment_ids, q.shape[0], q.shape[2])
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
    segment_ids: jax.Array | None = None,
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
      segment_ids: optional int `[B, T]`; D[i, j] is also zero when a run
        boundary lies in (j, i], S0 reaches only the first run and the final
        state is the last run's.

    Returns:
      o `[B, H, T, E]` in q's dtype, or (o, final_state).
    """
    out_dtype = q.dtype
    q, k, v, s, s0 = _prepare(q, k, v, slopes, initial_state, segment_ids)
    n = q.shape[2]
    t = jnp.arange(n, dtype=s.dtype)
    gap = t[:, None] - t[None, :]
    causal = gap >= 0
    decay = jnp.where(causal, jnp.exp(-s[:, None, None] * jnp.maximum(gap, 0)), 0)  # [H, T, T]
    q_decay = jnp.exp(-s[:, None] * (t + 1))[None]  # [1, H, T]
    k_decay = jnp.exp(-s[:, None] * (n - 1 - t))[None]
    s0_decay = jnp.broadcast_to(jnp.exp(-s * n)[None], (q.shape[0], s.shape[0]))  # [B, H]
    if segment_ids is not None:
        counts = segment_counts(segment_ids)  # [B, T]
        same = counts[:, :, None] == counts[:, None, :]  # [B, T, T]
        decay = decay * same[:, None]  # [B, H, T, T]
        q_decay = q_decay * (counts == 0)[:, None, :]  # S0 reaches the first run only
        k_decay = k_decay * (counts == counts[:, -1:])[:, None, :]  # the last run's keys
        s0_decay = s0_decay * (counts[:, -1:] == 0)
    scores = jnp.einsum("bhid,bhjd->bhij", q, k, precision=HIGHEST) * decay
    o = jnp.einsum("bhij,bhje->bhie", scores, v, precision=HIGHEST)
    o = o + jnp.einsum("bhtd,bhde->bhte", q * q_decay[..., None], s0, precision=HIGHEST)
    state = s0_decay[..., None, None] * s0 + jnp.einsum(
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
    segment_ids: jax.Array | None = None,
):
    """Per-token recurrence: kv_t = lambda kv_{t-1} + k_t^T v_t, o_t = q_t kv_t.

    A `lax.scan` over the sequence; the decoding step of a model is one step of
    this. With `segment_ids`, kv_{t-1} is replaced by zero where the id changes
    (segment_ids[:, t] != segment_ids[:, t-1]). Arguments and returns as in
    `naive_attention`.
    """
    out_dtype = q.dtype
    q, k, v, s, s0 = _prepare(q, k, v, slopes, initial_state, segment_ids)
    lam = jnp.exp(-s)[None, :, None, None]
    batch, seq = q.shape[0], q.shape[2]
    if segment_ids is None:
        keep = jnp.ones((seq, batch), bool)
    else:
        starts_run = jnp.concatenate(
            [jnp.zeros((batch, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
        )
        keep = ~starts_run.T  # [T, B]

    def step(kv, xs):
        q_t, k_t, v_t, keep_t = xs  # [B, H, d], [B, H, d], [B, H, e], [B]
        kv = (
            jnp.where(keep_t[:, None, None, None], lam * kv, 0)
            + k_t[..., :, None] * v_t[..., None, :]
        )
        o_t = jnp.einsum("bhd,bhde->bhe", q_t, kv, precision=HIGHEST)
        return kv, o_t

    seq_first = tuple(jnp.moveaxis(x, 2, 0) for x in (q, k, v))
    state, o = lax.scan(step, s0, (*seq_first, keep))
    return _finish(jnp.moveaxis(o, 0, 2), state, out_dtype, return_final_state)
