"""Chunked pure-jnp Lightning Attention-2 (Algorithm 1) with the paper's backward (Algorithm 2).

Layout of the computation. The sequence is cut into blocks of `block` rows
(masked attention inside a block, a d x e state between blocks). Blocks are
grouped into chunks of `chunk` rows; a `lax.scan` walks the chunks carrying the
float32 state, and inside a chunk every block is processed at once with batched
matmuls. The block-start states of one chunk are formed by one small matmul
with a `[blocks+1, blocks]` decay matrix, so per-block states only ever exist
for one chunk: the working set stays in cache and time per token is flat in
seq. The backward is a reverse scan over chunks carrying dKV; it recomputes the
block-start states of each chunk from the chunk-start state saved by the
forward (one d x e state per chunk).

A last block shorter than `block` (seq not a multiple of it) uses its true
length in the key and block decays (docs/design.md section 2), so the final state is
exact. No decay with a negative exponent is ever formed.

Segment ids (packed sequences) enter only through the decay tables: with the
cumulative count of run boundaries at each row, rows i >= j are in the same run
exactly when their counts are equal, so every decay factor that spans a boundary
is multiplied by zero (`_cut`): the intra-block mask, the block-start state
reaching a row, a key reaching its block's end state, and the block-to-block
and chunk-to-block state carries. A boundary may fall anywhere inside a block.
Without segment ids that step is skipped entirely (a static branch).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lightning_jax._checks import segment_counts
from lightning_jax._vma import match_varying

# `precision` argument -> lax precision of every matmul (DEFAULT is exact on CPU,
# TF32 on NVIDIA GPUs, bf16 passes on TPU).
MATMUL_PRECISION = {"default": lax.Precision.DEFAULT, "highest": lax.Precision.HIGHEST}
DEFAULT_BLOCK = 32
DEFAULT_CHUNK = 256


def _einsum(spec: str, a: jax.Array, b: jax.Array, precision: lax.Precision) -> jax.Array:
    return jnp.einsum(spec, a, b, precision=precision, preferred_element_type=a.dtype)


class _Decays(NamedTuple):
    """Decay factors of one chunk of `blocks` blocks of `block` rows, per head."""

    q: jax.Array  # [G, 1, C] ([G, nb, C] cut by segments): lambda^(i+1) on query row i
    mask: jax.Array  # [G, 1, C, C] ([G, nb, C, C] cut): lambda^(i-j) for i >= j, else 0
    k: jax.Array  # [G, nb, C]: lambda^(len_c-1-j) on key row j of block c
    prefix: jax.Array  # [G, nb+1, nb]: increment of block c' -> start of block c
    suffix: jax.Array  # [G, nb, nb+1]: prefix transposed (the reverse sweep of dKV)
    carry: jax.Array  # [G, nb+1]: chunk-start state -> start of block c


def _decays(slopes: jax.Array, block: int, blocks: int, valid: int, dtype) -> _Decays:
    """Decays of a chunk whose first `valid` rows are real (the rest is padding).

    slopes: `[G]`, one per (batch, head) row of the flattened layout.

    Exponents are static integers; block c holds len_c = clip(valid - c*block,
    0, block) real rows, so padded blocks pass the state through unchanged.
    """
    rows = np.arange(block)
    starts = np.arange(blocks) * block
    lens = np.clip(valid - starts, 0, block)
    cum = np.minimum(np.arange(blocks + 1) * block, valid)  # real rows before block c
    gap = rows[:, None] - rows[None, :]
    later = np.arange(blocks + 1)[:, None] > np.arange(blocks)[None, :]
    exps = dict(
        q=rows + 1,
        mask=np.maximum(gap, 0),
        k=np.maximum(lens[:, None] - 1 - rows[None, :], 0),
        prefix=np.maximum(cum[:, None] - cum[None, 1:], 0),
        carry=cum,
    )
    s = slopes.astype(dtype)

    def decay(e: np.ndarray) -> jax.Array:
        return jnp.exp(-s.reshape((-1,) + (1,) * e.ndim) * e.astype(np.float32))

    return _Decays(
        q=decay(exps["q"])[:, None],
        mask=jnp.where(gap >= 0, decay(exps["mask"]), 0)[:, None],
        k=decay(exps["k"]),
        prefix=jnp.where(later, decay(exps["prefix"]), 0),
        # Built transposed rather than transposing `prefix`, so the matmul stays row-major.
        suffix=jnp.where(later.T, decay(exps["prefix"].T), 0),
        carry=decay(exps["carry"]),
    )


def _cut(dec: _Decays, counts: jax.Array, before: jax.Array) -> _Decays:
    """The decays of one chunk with every factor that spans a run boundary zeroed.

    counts: int `[G, nb, C]` boundary counts of the chunk's rows (padding rows
    repeat the last real row's count); before: `[G]` the count of the row before
    the chunk (0 for the first chunk). Rows with equal counts are in one run.
    """
    ends = counts[:, :, -1]  # [G, nb]: count at the end of each block
    pre = jnp.concatenate([before[:, None], ends], axis=1)  # [G, nb+1]: before block c
    # The increment of block c' reaches the start of block c iff no boundary between.
    reaches = ends[:, None, :] == pre[:, :, None]  # [G, nb+1, nb]
    return _Decays(
        q=dec.q * (counts == pre[:, :-1, None]),
        mask=dec.mask * (counts[..., :, None] == counts[..., None, :]),
        k=dec.k * (counts == ends[..., None]),
        prefix=dec.prefix * reaches,
        suffix=dec.suffix * _t(reaches),
        carry=dec.carry * (pre == before[:, None]),
    )


def _prefix(matrix: jax.Array, states: jax.Array) -> jax.Array:
    """[G, m, n] decay matrix times [G, n, d, e] states -> [G, m, d, e].

    Always exact: these are float32 states, which a fast (TF32 / bf16) matmul
    would round.
    """
    g, n, d, e = states.shape
    out = jnp.matmul(matrix, states.reshape(g, n, d * e), precision=lax.Precision.HIGHEST)
    return out.reshape(g, -1, d, e)


def _t(x: jax.Array) -> jax.Array:
    """Swaps the last two axes."""
    return jnp.swapaxes(x, -1, -2)


def _transposed(*xs: jax.Array):
    """Physically transposed copies of the last two axes.

    XLA folds a plain transpose into the dot's dimension numbers, and XLA:CPU
    runs such [K, M]^T x [K, N] dots on a slower path than row-major ones; the
    barrier keeps the transpose, which fuses into the copy that reads the chunk.
    """
    return lax.optimization_barrier(tuple(_t(x) for x in xs))


def _block_states(k_t, v, kv, dec: _Decays, precision: lax.Precision):
    """State at every block start of a chunk, and after its last block.

    k_t: [G, nb, d, C] keys, transposed; v: [G, nb, C, e]; kv: [G, d, e] state
    before the chunk. Returns starts [G, nb+1, d, e].
    """
    increments = _einsum("gndc,gnce->gnde", k_t, v * dec.k[..., None], precision)
    return _prefix(dec.prefix, increments) + dec.carry[..., None, None] * kv[:, None]


def _chunk_forward(q, k, v, kv, dec: _Decays, precision: lax.Precision):
    """Output rows [G, nb, C, e] of one chunk and the state after it."""
    (k_t,) = _transposed(k)
    scores = _einsum("gncd,gndk->gnck", q, k_t, precision) * dec.mask
    o = _einsum("gnck,gnke->gnce", scores, v, precision)
    starts = _block_states(k_t, v, kv, dec, precision)
    o = o + _einsum("gncd,gnde->gnce", q, starts[:, :-1], precision) * dec.q[..., None]
    return o, starts[:, -1]


def _chunk_backward(q, k, v, do, kv, dkv_end, dec: _Decays, precision: lax.Precision):
    """Gradients of one chunk (Algorithm 2) given dL/d(state after the chunk).

    Returns dq, dk, dv (blocked like the inputs) and dL/d(state before the chunk).
    """
    q_t, k_t, do_t = _transposed(q, k, do)
    starts = _block_states(k_t, v, kv, dec, precision)
    # dL/d(start state of block c) from the outputs of block c, and from the chunk end.
    grads = _einsum("gndc,gnce->gnde", q_t, do * dec.q[..., None], precision)
    grads = jnp.concatenate([grads, dkv_end[:, None]], axis=1)  # [G, nb+1, d, e]
    # dL/d(state increment of block c'): the transposed prefix sweep (dKV in reverse).
    d_increments = _prefix(dec.suffix, grads)
    dkv_start = _prefix(dec.carry[:, None, :], grads)[:, 0]

    mask_t = _t(dec.mask)
    dscores_t = _einsum("gnke,gnec->gnkc", v, do_t, precision) * mask_t  # [.., key, query]
    scores_t = _einsum("gnkd,gndc->gnkc", k, q_t, precision) * mask_t
    dscores, starts_t, d_increments_t = _transposed(dscores_t, starts[:, :-1], d_increments)
    dq = _einsum("gnck,gnkd->gncd", dscores, k, precision)
    dq = dq + _einsum("gnce,gned->gncd", do, starts_t, precision) * dec.q[..., None]
    dk = _einsum("gnkc,gncd->gnkd", dscores_t, q, precision)
    dk = dk + _einsum("gnce,gned->gncd", v, d_increments_t, precision) * dec.k[..., None]
    dv = _einsum("gnkc,gnce->gnke", scores_t, do, precision)
    dv = dv + _einsum("gncd,gnde->gnce", k * dec.k[..., None], d_increments, precision)
    return dq, dk, dv, dkv_start


class _Plan(NamedTuple):
    """Static tiling of a sequence: `full` chunks of `chunk` rows, then a tail."""

    block: int
    chunk: int
    precision: lax.Precision  # of the input matmuls
    full: int  # number of full chunks
    tail: int  # real rows after the full chunks (0 if none)
    tail_padded: int  # tail rounded up to a multiple of block


def _plan(seq: int, block: int, chunk: int, precision: str) -> _Plan:
    block = min(block, seq)
    chunk = max(block, chunk // block * block)
    full, tail = divmod(seq, chunk)
    return _Plan(block, chunk, MATMUL_PRECISION[precision], full, tail, -(-tail // block) * block)


def _read(x: jax.Array, start, rows: int, padded: int, plan: _Plan, dtype) -> jax.Array:
    """Rows [start, start+rows) of x, zero-padded to `padded` rows: [G, nb, block, d].

    x: [G, T, d], or [B, T, H, d] (layout "bthd"): then the chunk's rows are
    moved head-major (G = b*H + h, as the flattened layout) in the copy that
    reads them, so the whole input is never transposed.
    """
    x = lax.dynamic_slice_in_dim(x, start, rows, axis=1).astype(dtype)
    if x.ndim == 4:
        x = jnp.swapaxes(x, 1, 2).reshape(-1, rows, x.shape[-1])
    if padded > rows:
        x = jnp.pad(x, ((0, 0), (0, padded - rows), (0, 0)))
    return x.reshape(x.shape[0], padded // plan.block, plan.block, x.shape[-1])


def _write(buf: jax.Array, start, rows: int, blocked: jax.Array) -> jax.Array:
    """Writes the first `rows` rows of blocked [G, nb, block, d] into buf at row `start`.

    buf: [G, T, d], or [B, T, H, d] (layout "bthd", see `_read`).
    """
    x = blocked.reshape(blocked.shape[0], -1, blocked.shape[-1])[:, :rows].astype(buf.dtype)
    if buf.ndim == 4:
        x = jnp.swapaxes(x.reshape(buf.shape[0], buf.shape[2], rows, x.shape[-1]), 1, 2)
    return lax.dynamic_update_slice_in_dim(buf, x, start, axis=1)


def _chunk_decays(dec: _Decays, counts, start, rows: int, padded: int, plan: _Plan) -> _Decays:
    """`dec` for the chunk of rows [start, start+rows), cut at run boundaries if any."""
    if counts is None:
        return dec
    chunk = lax.dynamic_slice_in_dim(counts, start, rows, axis=1)
    if padded > rows:
        chunk = jnp.pad(chunk, ((0, 0), (0, padded - rows)), mode="edge")
    # counts[:, 0] == 0, so the first chunk reads "no boundary before it".
    before = lax.dynamic_index_in_dim(counts, jnp.maximum(start - 1, 0), axis=1, keepdims=False)
    return _cut(dec, chunk.reshape(chunk.shape[0], -1, plan.block), before)


def _forward(q, k, v, slopes, s0, counts, plan: _Plan):
    """Returns o [G, T, e] in q's dtype, the final state, and what the backward needs."""
    dtype = s0.dtype
    # zeros_like keeps the inputs' type (e.g. their varying axes inside shard_map).
    o = jnp.zeros_like(v, dtype=q.dtype)
    kv, chunk_starts = s0, None
    if plan.full:
        dec = _decays(slopes, plan.block, plan.chunk // plan.block, plan.chunk, dtype)

        def step(carry, i):
            kv, o = carry
            start = i * plan.chunk
            qkv = (_read(x, start, plan.chunk, plan.chunk, plan, dtype) for x in (q, k, v))
            cut = _chunk_decays(dec, counts, start, plan.chunk, plan.chunk, plan)
            o_chunk, kv_next = _chunk_forward(*qkv, kv, cut, plan.precision)
            return (kv_next, _write(o, start, plan.chunk, o_chunk)), kv

        (kv, o), chunk_starts = lax.scan(step, (kv, o), jnp.arange(plan.full))
    tail_start = kv
    if plan.tail:
        start = plan.full * plan.chunk
        dec = _decays(slopes, plan.block, plan.tail_padded // plan.block, plan.tail, dtype)
        qkv = (_read(x, start, plan.tail, plan.tail_padded, plan, dtype) for x in (q, k, v))
        dec = _chunk_decays(dec, counts, start, plan.tail, plan.tail_padded, plan)
        o_chunk, kv = _chunk_forward(*qkv, kv, dec, plan.precision)
        o = _write(o, start, plan.tail, o_chunk)
    return o, kv, (chunk_starts, tail_start)


def _backward(q, k, v, slopes, counts, do, dkv, starts, plan: _Plan):
    """Reverse sweep: returns dq, dk, dv in the inputs' dtypes and dL/d(initial state)."""
    dtype = dkv.dtype
    chunk_starts, tail_start = starts
    grads = tuple(jnp.zeros_like(x) for x in (q, k, v))

    def chunk_grads(grads, dkv, kv, start, rows, padded, dec):
        dec = _chunk_decays(dec, counts, start, rows, padded, plan)
        blocked = (_read(x, start, rows, padded, plan, dtype) for x in (q, k, v, do))
        *chunk, dkv = _chunk_backward(*blocked, kv, dkv, dec, plan.precision)
        return tuple(_write(g, start, rows, c) for g, c in zip(grads, chunk)), dkv

    if plan.tail:
        dec = _decays(slopes, plan.block, plan.tail_padded // plan.block, plan.tail, dtype)
        start = plan.full * plan.chunk
        grads, dkv = chunk_grads(grads, dkv, tail_start, start, plan.tail, plan.tail_padded, dec)
    if plan.full:
        dec = _decays(slopes, plan.block, plan.chunk // plan.block, plan.chunk, dtype)

        def step(carry, xs):
            i, kv = xs
            grads, dkv = carry
            return chunk_grads(grads, dkv, kv, i * plan.chunk, plan.chunk, plan.chunk, dec), None

        (grads, dkv), _ = lax.scan(
            step, (grads, dkv), (jnp.arange(plan.full), chunk_starts), reverse=True
        )
    return (*grads, dkv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _lightning(q, k, v, slopes, s0, counts, block, chunk, precision):
    plan = _plan(q.shape[1], block, chunk, precision)
    o, kv, _ = _forward(q, k, v, slopes, s0, counts, plan)
    return o, kv


def _lightning_fwd(q, k, v, slopes, s0, counts, block, chunk, precision):
    plan = _plan(q.shape[1], block, chunk, precision)
    o, kv, starts = _forward(q, k, v, slopes, s0, counts, plan)
    return (o, kv), (q, k, v, slopes, counts, starts)


def _lightning_bwd(block, chunk, precision, res, cotangents):
    q, k, v, slopes, counts, starts = res
    do, dkv = cotangents
    plan = _plan(q.shape[1], block, chunk, precision)
    dq, dk, dv, ds0 = _backward(q, k, v, slopes, counts, do, dkv, starts, plan)
    # Slopes are constants of the operator (as in the paper): no gradient flows to them;
    # the boundary counts are integers (None: their cotangent is zero).
    return dq, dk, dv, jnp.zeros_like(slopes), ds0, None


_lightning.defvjp(_lightning_fwd, _lightning_bwd)


@functools.partial(jax.jit, static_argnames=("block_size", "chunk_size", "precision", "layout"))
def lightning_attention_xla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slopes: jax.Array,
    initial_state: jax.Array,
    *,
    block_size: int | None = None,
    chunk_size: int | None = None,
    precision: str = "default",
    segment_ids: jax.Array | None = None,
    layout: str = "bhtd",
) -> tuple[jax.Array, jax.Array]:
    """Chunked XLA path on checked inputs; returns (o, final_state).

    Args:
      q, k: `[B, H, T, D]` (`[B, T, H, D]` with layout="bthd"); v: `[B, H, T, E]`
      (`[B, T, H, E]`); slopes: float32 `[H]`;
      initial_state: `[B, H, D, E]` in the compute dtype (float32, or float64).
      block_size: rows per block of the masked intra-block product.
      chunk_size: rows per scan step (rounded down to a multiple of the block).
      precision: "default" or "highest", the precision of the matmuls on the
        inputs (float32 states are always combined exactly).
      segment_ids: optional int `[B, T]`; the state resets where the id changes
        (see `lightning_attention`). None keeps the unsegmented code path.
      layout: "bhtd" or "bthd". In "bthd" each scan step reads its chunk's rows
        of every head and moves them head-major in the same copy (and the
        reverse for o and the gradients): no pass over the whole arrays.
    """
    block = DEFAULT_BLOCK if block_size is None else block_size
    chunk = DEFAULT_CHUNK if chunk_size is None else chunk_size
    if layout == "bthd":
        batch, seq, heads, d = q.shape
    else:
        batch, heads, seq, d = q.shape
    e = v.shape[-1]
    groups = batch * heads
    # Inside shard_map(check_vma=True), a replicated initial state (or slopes) beside a
    # sharded q would give the scan a carry whose typing changes in the first step: cast
    # everything to q's typing first (the cast's transpose sums the state's gradient).
    q, k, v, slopes, initial_state = match_varying(q, k, v, slopes, initial_state)
    counts = None
    if segment_ids is not None:
        counts = jnp.repeat(segment_counts(segment_ids), heads, axis=0)  # [G, T]
    # Flatten (batch, head) into one leading axis G so that every contraction is a
    # plain batched matmul with no transposes (per-G decay tables are tiny).
    if layout == "bhtd":
        q, k, v = q.reshape(groups, seq, d), k.reshape(groups, seq, d), v.reshape(groups, seq, e)
    o, state = _lightning(
        q,
        k,
        v,
        jnp.tile(lax.stop_gradient(slopes), batch),
        initial_state.reshape(groups, d, e),
        counts,
        block,
        chunk,
        precision,
    )
    if layout == "bhtd":
        o = o.reshape(batch, heads, seq, e)
    return o, state.reshape(batch, heads, d, e)
