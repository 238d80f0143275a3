"""Lightning Attention-2 in Pallas with the Triton lowering (NVIDIA and AMD GPUs).

Forward: one program per ((batch, head), e-tile) walks the blocks of the
sequence in order: the masked intra-block product, the inter-block product with
the carried state, and the state update, the state living in float32 registers;
no per-block state is written to HBM.

Backward (Algorithm 2), three kernels, all recomputing states rather than
storing them, each writing its gradient once in the input dtype:
  - dQ: one program per ((batch, head), d-tile) sweeps forward, rebuilding the
    d-tile of KV's rows as it goes;
  - dK (and the initial state's gradient): one program per ((batch, head),
    d-tile) sweeps backward carrying the d-tile of dKV's rows;
  - dV: one program per ((batch, head), e-tile) sweeps backward carrying the
    e-tile of dKV's columns.
Splitting dK from dV keeps each kernel's live tiles within the register file
(the fused dK/dV kernel spilled) and avoids float32 partial sums of dK.

float32 inputs multiply on TF32 tensor cores unless precision="highest".

Segment ids (packed sequences): two int tables of run-boundary counts per row
(`segment_tables`) ride along; each block zeroes its decays that span a run
boundary (`_cut_decays`: the mask, the q and k decays, the state decay), so a
boundary anywhere in a block cuts the intra-block product and the carried
state. Without segment ids the kernels take no tables (a static flag).

Block conventions (docs/design.md section 2), block c with L real rows (L = block
except in a padded last block): q row i decays by lambda^(i+1), key row j by
lambda^(L-1-j), the state by lambda^L per block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import (
    flatten_and_pad,
    kernel_op,
    next_power_of_2,
    pallas_call,
    round_up,
    segment_tables,
    unpad,
)

DEFAULT_BLOCK = 64
MIN_DIM = 16  # tl.dot needs every matmul dimension >= 16
TILE = 64  # d / e tile of the state kept in registers


def _state_tile(width: int, other: int) -> int:
    """Columns of the state tile a program keeps, tiling `width` (the other dim whole).

    A [other, 64] float32 tile plus [block, other] operands fits the register
    file up to other = 128; at 256 the forward and dV kernels spill, less with
    the tile halved (measured with tools/compile_report.py for H200).
    """
    return min(width, TILE if other <= 128 else TILE // 2)


def _dot(
    a: jax.Array, b: jax.Array, precision, trans_a: bool = False, trans_b: bool = False
) -> jax.Array:
    """a @ b with float32 accumulation at `precision` (None: TF32 for float32 operands)."""
    if a.dtype != b.dtype:
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    dims = (((0,) if trans_a else (1,), (1,) if trans_b else (0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _cut_decays(decays, counts, before):
    """Zeroes the decays of one block that span a run boundary (segment ids).

    counts: int [B] boundary counts of the block's rows; before: [B] the previous
    rows' counts (before[0]: the count before the block). Counts never decrease,
    so min(before) is the count before the block and max(counts) the one at its end.
    """
    q_dec, k_dec, mask, state_dec = decays
    start, end = jnp.min(before), jnp.max(counts)
    return (
        jnp.where(counts == start, q_dec, 0.0),
        jnp.where(counts == end, k_dec, 0.0),
        jnp.where(counts[:, None] == counts[None, :], mask, 0.0),
        jnp.where(end == start, state_dec, 0.0),
    )


def _decays_of(slope, c, block: int, seq_len: int, seg_refs):
    """The decays of block c, cut at run boundaries when seg_refs = (counts, before) refs."""
    decays = _block_decays(slope, c * block, block, seq_len)
    if seg_refs is None:
        return decays
    rows = pl.ds(c * block, block)
    return _cut_decays(decays, seg_refs[0][rows], seg_refs[1][rows])


def _split_refs(refs, segmented: bool):
    """(counts, before) refs or None, and the remaining (output) refs."""
    if segmented:
        return (refs[0], refs[1]), refs[2:]
    return None, refs


def _block_decays(slope, start, block: int, seq_len: int):
    """Decays of the block starting at row `start`: q [B], k [B], mask [B, B], state scalar."""
    rows = lax.broadcasted_iota(jnp.int32, (block,), 0)
    length = jnp.clip(seq_len - start, 0, block)  # real rows in this block
    q_dec = jnp.exp(-slope * (rows + 1).astype(jnp.float32))
    k_dec = jnp.exp(-slope * jnp.maximum(length - 1 - rows, 0).astype(jnp.float32))
    gap = rows[:, None] - rows[None, :]
    mask = jnp.where(gap >= 0, jnp.exp(-slope * jnp.maximum(gap, 0).astype(jnp.float32)), 0.0)
    state_dec = jnp.exp(-slope * length.astype(jnp.float32))
    return q_dec, k_dec, mask, state_dec


# The cut decays of `_cut_decays` one at a time, for kernels that compute each where it
# is used (fewer live values): counts int [B] of the block's rows, start / end the counts
# before the block and at its last row, length its real rows.


def _cut_mask(slope, counts, block: int):
    """The [B, B] decay mask, zero between rows of different runs."""
    row = lax.broadcasted_iota(jnp.int32, (block,), 0)
    # Pairs in different runs get gap -1, which the causal test drops.
    gap = jnp.where(counts[:, None] == counts[None, :], row[:, None] - row[None, :], -1)
    return jnp.where(gap >= 0, jnp.exp(-slope * jnp.maximum(gap, 0).astype(jnp.float32)), 0.0)


def _cut_q_decay(slope, counts, start, block: int):
    """lambda^(i+1) for rows i of the block's first run, else 0: [B]."""
    row = lax.broadcasted_iota(jnp.int32, (block,), 0)
    return jnp.where(counts == start, jnp.exp(-slope * (row + 1).astype(jnp.float32)), 0.0)


def _cut_k_decay(slope, counts, end, length, block: int):
    """lambda^(L-1-j) for rows j of the block's last run, else 0: [B]."""
    row = lax.broadcasted_iota(jnp.int32, (block,), 0)
    k_dec = jnp.exp(-slope * jnp.maximum(length - 1 - row, 0).astype(jnp.float32))
    return jnp.where(counts == end, k_dec, 0.0)


def _cut_state_decay(slope, start, end, length):
    """lambda^L if the block holds no run boundary, else 0."""
    return jnp.where(end == start, jnp.exp(-slope * length.astype(jnp.float32)), 0.0)


def _forward_kernel(
    slopes_ref, q_ref, k_ref, v_ref, s0_ref, *refs, block, seq_len, precision, segmented
):
    """o and the final state for one e-tile, the state swept forward.

    With segment ids the block step is `segmented_body`: the same math as `body`
    with `_decays_of`, but the masked scores come before the mask and every cut
    decay is computed where it is used (the key and state cuts after o is
    written). Computed first, as in `body`, the cut decays stayed live across
    the matmuls and the kernel spilled (160 B at d = e = 128 bf16 on H200,
    tools/compile_report.py --segments); so ordered, it does not, at the
    same state tile as the unsegmented kernel. `body` is unchanged.
    """
    seg_refs, (o_ref, state_ref) = _split_refs(refs, segmented)
    slope = slopes_ref[0]
    in_dtype = q_ref.dtype
    dot = functools.partial(_dot, precision=precision)

    def body(c, kv):
        rows = pl.ds(c * block, block)
        q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
        q_dec, k_dec, mask, state_dec = _decays_of(slope, c, block, seq_len, seg_refs)
        scores = dot(q, k, trans_b=True) * mask
        o = dot(scores.astype(in_dtype), v)
        o += q_dec[:, None] * dot(q, kv.astype(in_dtype))
        o_ref[rows, :] = o.astype(o_ref.dtype)
        k_scaled = (k.astype(jnp.float32) * k_dec[:, None]).astype(in_dtype)
        return state_dec * kv + dot(k_scaled, v, trans_a=True)

    def segmented_body(c, kv):
        """body's math, each cut decay computed just before its use (see the docstring)."""
        rows = pl.ds(c * block, block)
        counts_ref, before_ref = seg_refs
        q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
        scores = dot(q, k, trans_b=True)
        counts = counts_ref[rows]
        o = dot((scores * _cut_mask(slope, counts, block)).astype(in_dtype), v)
        start = jnp.min(before_ref[rows])  # the count before the block
        q_dec = _cut_q_decay(slope, counts, start, block)
        o += q_dec[:, None] * dot(q, kv.astype(in_dtype))
        o_ref[rows, :] = o.astype(o_ref.dtype)
        end = jnp.max(counts)  # the count at the block's end
        length = jnp.clip(seq_len - c * block, 0, block)  # real rows in this block
        k_dec = _cut_k_decay(slope, counts, end, length, block)
        state_dec = _cut_state_decay(slope, start, end, length)
        k_scaled = (k.astype(jnp.float32) * k_dec[:, None]).astype(in_dtype)
        return state_dec * kv + dot(k_scaled, v, trans_a=True)

    step = segmented_body if segmented else body
    kv = lax.fori_loop(0, q_ref.shape[0] // block, step, s0_ref[...])
    state_ref[...] = kv


def _dq_kernel(
    slopes_ref, k_ref, v_ref, do_ref, s0_ref, *refs, block, seq_len, precision, segmented
):
    """dQ for one d-tile: dQ = ((dO V^T) * M) K + lambda^(i+1) dO KV^T, KV swept forward."""
    seg_refs, (dq_ref,) = _split_refs(refs, segmented)
    slope = slopes_ref[0]
    in_dtype = k_ref.dtype
    dot = functools.partial(_dot, precision=precision)

    def body(c, kv):
        rows = pl.ds(c * block, block)
        k, v, do = k_ref[rows, :], v_ref[rows, :], do_ref[rows, :]
        q_dec, k_dec, mask, state_dec = _decays_of(slope, c, block, seq_len, seg_refs)
        dscores = dot(do, v, trans_b=True) * mask
        dq = dot(dscores.astype(in_dtype), k)
        dq += q_dec[:, None] * dot(do, kv.astype(in_dtype), trans_b=True)
        dq_ref[rows, :] = dq.astype(dq_ref.dtype)
        k_scaled = (k.astype(jnp.float32) * k_dec[:, None]).astype(in_dtype)
        return state_dec * kv + dot(k_scaled, v, trans_a=True)

    lax.fori_loop(0, k_ref.shape[0] // block, body, s0_ref[...])


def _dk_kernel(
    slopes_ref, q_ref, v_ref, do_ref, dstate_ref, *refs, block, seq_len, precision, segmented
):
    """dK and dS0 for one d-tile, rows dKV[d-tile, :] swept backward.

    dK = ((dO V^T) * M)^T Q + lambda^(B-1-j) V dKV^T; the d-tile of dK needs
    only the d-tile of Q and of dKV's rows, so dK is written once, in its dtype.
    """
    seg_refs, (dk_ref, ds0_ref) = _split_refs(refs, segmented)
    slope = slopes_ref[0]
    in_dtype = q_ref.dtype
    num_blocks = q_ref.shape[0] // block
    dot = functools.partial(_dot, precision=precision)

    def body(step, dkv):
        c = num_blocks - 1 - step
        rows = pl.ds(c * block, block)
        q, v, do = q_ref[rows, :], v_ref[rows, :], do_ref[rows, :]
        q_dec, k_dec, mask, state_dec = _decays_of(slope, c, block, seq_len, seg_refs)
        dscores = dot(do, v, trans_b=True) * mask  # [query, key]
        dk = dot(dscores.astype(in_dtype), q, trans_a=True)
        dk += k_dec[:, None] * dot(v, dkv.astype(in_dtype), trans_b=True)
        dk_ref[rows, :] = dk.astype(dk_ref.dtype)
        q_scaled = (q.astype(jnp.float32) * q_dec[:, None]).astype(in_dtype)
        return state_dec * dkv + dot(q_scaled, do, trans_a=True)

    ds0_ref[...] = lax.fori_loop(0, num_blocks, body, dstate_ref[...])


def _dv_kernel(
    slopes_ref, q_ref, k_ref, do_ref, dstate_ref, *refs, block, seq_len, precision, segmented
):
    """dV for one e-tile, columns dKV[:, e-tile] swept backward.

    dV = ((Q K^T) * M)^T dO + lambda^(B-1-j) K dKV. With segment ids the block
    step is `segmented_body`, ordered like the segmented forward (each cut decay
    where it is used): with `_decays_of` first it used 255 registers at
    d = e = 128 bf16 on H200 and spilled 384 B at d = 256; so ordered, 226
    registers and 40 B (tools/compile_report.py --segments).
    """
    seg_refs, (dv_ref,) = _split_refs(refs, segmented)
    slope = slopes_ref[0]
    in_dtype = q_ref.dtype
    num_blocks = q_ref.shape[0] // block
    dot = functools.partial(_dot, precision=precision)

    def body(step, dkv):
        c = num_blocks - 1 - step
        rows = pl.ds(c * block, block)
        q, k, do = q_ref[rows, :], k_ref[rows, :], do_ref[rows, :]
        q_dec, k_dec, mask, state_dec = _decays_of(slope, c, block, seq_len, seg_refs)
        scores = dot(q, k, trans_b=True) * mask  # [query, key]
        k_scaled = (k.astype(jnp.float32) * k_dec[:, None]).astype(in_dtype)
        dv = dot(scores.astype(in_dtype), do, trans_a=True) + dot(k_scaled, dkv.astype(in_dtype))
        dv_ref[rows, :] = dv.astype(dv_ref.dtype)
        q_scaled = (q.astype(jnp.float32) * q_dec[:, None]).astype(in_dtype)
        return state_dec * dkv + dot(q_scaled, do, trans_a=True)

    def segmented_body(step, dkv):
        """body's math, each cut decay computed just before its use (see the docstring)."""
        c = num_blocks - 1 - step
        rows = pl.ds(c * block, block)
        counts_ref, before_ref = seg_refs
        q, k, do = q_ref[rows, :], k_ref[rows, :], do_ref[rows, :]
        scores = dot(q, k, trans_b=True)  # [query, key]
        counts = counts_ref[rows]
        dv = dot((scores * _cut_mask(slope, counts, block)).astype(in_dtype), do, trans_a=True)
        end = jnp.max(counts)  # the count at the block's end
        length = jnp.clip(seq_len - c * block, 0, block)  # real rows in this block
        k_dec = _cut_k_decay(slope, counts, end, length, block)
        k_scaled = (k.astype(jnp.float32) * k_dec[:, None]).astype(in_dtype)
        dv += dot(k_scaled, dkv.astype(in_dtype))
        dv_ref[rows, :] = dv.astype(dv_ref.dtype)
        start = jnp.min(before_ref[rows])  # the count before the block
        q_dec = _cut_q_decay(slope, counts, start, block)
        state_dec = _cut_state_decay(slope, start, end, length)
        q_scaled = (q.astype(jnp.float32) * q_dec[:, None]).astype(in_dtype)
        return state_dec * dkv + dot(q_scaled, do, trans_a=True)

    lax.fori_loop(0, num_blocks, segmented_body if segmented else body, dstate_ref[...])


def _compiler_params(width: int, dtype) -> plgpu.CompilerParams:
    """Warps by tile width; a single pipeline stage for float32 tiles 256 wide.

    Two stages (the next block's tiles loaded while this one computes) double the
    shared memory of the loaded tiles: at width 256 in float32 the dQ/dK/dV
    kernels asked for 244 KiB, over the 227 KiB of an H100/H200 block
    (tools/compile_report.py).
    """
    stages = 1 if width > 128 and jnp.dtype(dtype).itemsize == 4 else 2
    return plgpu.CompilerParams(num_warps=4 if width <= 64 else 8, num_stages=stages)


def _rows_spec(
    rows: int, cols: int, width: int, heads: int | None, tile: bool = False
) -> pl.BlockSpec:
    """All rows of one (batch, head) g; its `width` columns whole, or the program's tile t.

    heads None: the array is [G, N, width]. Else it is [B, N, H*width] (layout
    "bthd", a free reshape of [B, N, H, width]) and the block is head g % H's
    columns of batch row g // H, read and written in place (no transpose).
    """
    if heads is None:
        return pl.BlockSpec((None, rows, cols), lambda g, t: (g, 0, t if tile else 0))
    per_head = width // cols
    return pl.BlockSpec(
        (None, rows, cols),
        lambda g, t: (g // heads, 0, (g % heads) * per_head + (t if tile else 0)),
    )


def _flat(x: jax.Array) -> jax.Array:
    """[B, N, H, W] (layout "bthd") -> [B, N, H*W], a free reshape; [G, N, W] unchanged."""
    return x.reshape(*x.shape[:2], -1) if x.ndim == 4 else x


def _heads(x: jax.Array) -> int | None:
    """H of a [B, N, H, W] operand ("bthd"), None for [G, N, W]."""
    return x.shape[2] if x.ndim == 4 else None


def _state_spec(rows: int, cols: int, row_tile: bool) -> pl.BlockSpec:
    """A [rows, cols] tile of one (batch, head)'s state: tiled over d rows or e columns."""
    if row_tile:
        return pl.BlockSpec((None, rows, cols), lambda g, t: (g, t, 0))
    return pl.BlockSpec((None, rows, cols), lambda g, t: (g, 0, t))


def _slope_spec() -> pl.BlockSpec:
    return pl.BlockSpec((1,), lambda g, t: (g,))


def _segment_specs(segments, rows: int) -> list[pl.BlockSpec]:
    """Specs of the (counts, before) tables, all rows of one (batch, head); none without."""
    if segments is None:
        return []
    return [pl.BlockSpec((None, rows), lambda g, t: (g, 0))] * 2


def _cost(
    programs: int, rows: int, block: int, full: int, tile: int, row_widths: int, itemsize: int
) -> pl.CostEstimate:
    """XLA's cost estimate of one kernel over all its programs.

    Every kernel has the same shape of work per block: a [block, block] product
    over the full width `full`, a [block, block] x [block, tile] product, and two
    state matmuls of block x full x tile (inter product and state update).
    row_widths: how many rows of width full or tile it reads or writes, in
    elements per row (e.g. q and k of width d plus v and o of width te).
    Transcendentals: the exp of the q and k decays, the mask, the state decay.
    """
    blocks = programs * (rows // block)
    macs = block * block * (full + tile) + 2 * block * full * tile
    return pl.CostEstimate(
        flops=2 * blocks * macs,
        transcendentals=blocks * (block * block + 2 * block + 1),
        bytes_accessed=programs * (rows * row_widths * itemsize + 2 * full * tile * 4),
    )


def _forward(q, k, v, slopes, s0, block, seq_len, interpret, precision, segments=None):
    """q, k [G, N, Dp], v [G, N, Ep]; or [B, N, H, Dp], [B, N, H, Ep] (layout "bthd")."""
    groups, rows, d = slopes.shape[0], q.shape[1], q.shape[-1]
    e = v.shape[-1]
    rows_spec = functools.partial(_rows_spec, heads=_heads(q))
    te = _state_tile(e, d)
    programs = groups * (e // te)
    static = {"block": block, "seq_len": seq_len, "precision": precision}
    o, state = pallas_call(
        functools.partial(_forward_kernel, **static, segmented=segments is not None),
        grid=(groups, e // te),
        in_specs=[
            _slope_spec(),
            rows_spec(rows, d, d),
            rows_spec(rows, d, d),
            rows_spec(rows, te, e, tile=True),
            _state_spec(d, te, row_tile=False),
            *_segment_specs(segments, rows),
        ],
        out_specs=[rows_spec(rows, te, e, tile=True), _state_spec(d, te, row_tile=False)],
        out_shape=[
            jax.ShapeDtypeStruct(_flat(v).shape, q.dtype),
            jax.ShapeDtypeStruct((groups, d, e), jnp.float32),
        ],
        compiler_params=_compiler_params(max(d, te), q.dtype),
        interpret=interpret,
        cost_estimate=_cost(programs, rows, block, d, te, 2 * d + 2 * te, q.dtype.itemsize),
        name="lightning_forward",
    )(slopes, _flat(q), _flat(k), _flat(v), s0, *(segments or ()))
    return o.reshape(v.shape), state


def _backward(q, k, v, slopes, s0, do, dstate, block, seq_len, interpret, precision, segments=None):
    """Three kernels, each writing its gradient once in the input dtype.

    dQ and dK are tiled over d (their d-tile needs only the same d-tile of KV /
    dKV rows), dV over e (its e-tile needs only dKV's e-tile columns), so no
    kernel writes partial sums for XLA to add. Operands as in `_forward`.
    """
    groups, rows, d = slopes.shape[0], q.shape[1], q.shape[-1]
    e = v.shape[-1]
    rows_spec = functools.partial(_rows_spec, heads=_heads(q))
    shapes = (q.shape, k.shape, v.shape)
    q, k, v, do = (_flat(x) for x in (q, k, v, do))
    # dQ and dK keep their d-tile at 64 even for e = 256: halving it spilled more.
    td, te = min(d, TILE), _state_tile(e, d)
    itemsize = q.dtype.itemsize
    static = {
        "block": block,
        "seq_len": seq_len,
        "precision": precision,
        "segmented": segments is not None,
    }
    seg_specs, seg_args = _segment_specs(segments, rows), tuple(segments or ())
    d_programs, e_programs = groups * (d // td), groups * (e // te)
    dq = pallas_call(
        functools.partial(_dq_kernel, **static),
        grid=(groups, d // td),
        in_specs=[
            _slope_spec(),
            rows_spec(rows, td, d, tile=True),
            rows_spec(rows, e, e),
            rows_spec(rows, e, e),
            _state_spec(td, e, row_tile=True),
            *seg_specs,
        ],
        out_specs=rows_spec(rows, td, d, tile=True),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(max(td, e), q.dtype),
        interpret=interpret,
        cost_estimate=_cost(d_programs, rows, block, e, td, 2 * td + 2 * e, itemsize),
        name="lightning_dq",
    )(slopes, k, v, do, s0, *seg_args)
    dk, ds0 = pallas_call(
        functools.partial(_dk_kernel, **static),
        grid=(groups, d // td),
        in_specs=[
            _slope_spec(),
            rows_spec(rows, td, d, tile=True),
            rows_spec(rows, e, e),
            rows_spec(rows, e, e),
            _state_spec(td, e, row_tile=True),
            *seg_specs,
        ],
        out_specs=[rows_spec(rows, td, d, tile=True), _state_spec(td, e, row_tile=True)],
        out_shape=[
            jax.ShapeDtypeStruct(k.shape, k.dtype),
            jax.ShapeDtypeStruct(s0.shape, jnp.float32),
        ],
        compiler_params=_compiler_params(max(td, e), q.dtype),
        interpret=interpret,
        cost_estimate=_cost(d_programs, rows, block, e, td, 2 * td + 2 * e, itemsize),
        name="lightning_dk",
    )(slopes, q, v, do, dstate, *seg_args)
    dv = pallas_call(
        functools.partial(_dv_kernel, **static),
        grid=(groups, e // te),
        in_specs=[
            _slope_spec(),
            rows_spec(rows, d, d),
            rows_spec(rows, d, d),
            rows_spec(rows, te, e, tile=True),
            _state_spec(d, te, row_tile=False),
            *seg_specs,
        ],
        out_specs=rows_spec(rows, te, e, tile=True),
        out_shape=jax.ShapeDtypeStruct(v.shape, v.dtype),
        compiler_params=_compiler_params(max(d, te), q.dtype),
        interpret=interpret,
        cost_estimate=_cost(e_programs, rows, block, d, te, 2 * d + 2 * te, itemsize),
        name="lightning_dv",
    )(slopes, q, k, do, dstate, *seg_args)
    dq, dk, dv = (g.reshape(shape) for g, shape in zip((dq, dk, dv), shapes))
    return dq, dk, dv, ds0


# precision argument -> lax precision of the kernels' matmuls (None: TF32 for float32).
_MATMUL_PRECISION = {"default": None, "highest": lax.Precision.HIGHEST}
_LIGHTNING = {
    (name, segmented): kernel_op(
        functools.partial(_forward, precision=p),
        functools.partial(_backward, precision=p),
        segmented=segmented,
    )
    for name, p in _MATMUL_PRECISION.items()
    for segmented in (False, True)
}


def _padded_dim(x: int) -> int:
    """A power of two >= 16: Triton tensors have power-of-two shapes (zero padding is exact)."""
    return max(MIN_DIM, next_power_of_2(x))


@functools.partial(jax.jit, static_argnames=("block_size", "interpret", "precision", "layout"))
def lightning_attention_triton(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slopes: jax.Array,
    initial_state: jax.Array,
    *,
    block_size: int | None = None,
    interpret: bool = False,
    precision: str = "default",
    segment_ids: jax.Array | None = None,
    layout: str = "bhtd",
) -> tuple[jax.Array, jax.Array]:
    """Pallas/Triton Lightning Attention-2 on checked inputs; returns (o, final_state).

    Args:
      q, k: `[B, H, T, D]`; v: `[B, H, T, E]` (float32, bfloat16 or float16);
        `[B, T, H, D]` and `[B, T, H, E]` with layout="bthd".
      slopes: float32 `[H]`.
      initial_state: `[B, H, D, E]`, used in float32.
      block_size: rows per block, a power of two >= 16 (default 64; smaller
        when T is short).
      interpret: run the kernels in the Pallas interpreter (any backend).
      precision: float32 inputs only: "default" multiplies on TF32 tensor
        cores, "highest" in exact float32 (no tensor cores).
      segment_ids: optional int `[B, T]`: the state resets where the id changes
        (every decay spanning a run boundary is zeroed per block; see
        `lightning_attention`). None: the unsegmented kernels.
      layout: "bhtd" or "bthd". In "bthd" the kernels address each head's
        columns of `[B, T, H*D]` (a free reshape) in place: no transpose, and no
        copy at all when T is a multiple of the block and D, E are powers of
        two >= 16 (otherwise the zero padding is one copy, as in "bhtd").

    Returns:
      o in q's layout and dtype, and the final state `[B, H, D, E]` float32.
    """
    if layout == "bthd":
        batch, n, heads, d = q.shape
    else:
        batch, heads, n, d = q.shape
    e = v.shape[-1]
    block = block_size or min(DEFAULT_BLOCK, max(MIN_DIM, next_power_of_2(n)))
    if block < MIN_DIM or block & (block - 1):
        raise ValueError(
            f"block_size must be a power of two >= {MIN_DIM} for the Triton kernel, got {block}"
        )
    padded = flatten_and_pad(
        q, k, v, slopes, initial_state, round_up(n, block), _padded_dim(d), _padded_dim(e), layout
    )
    if segment_ids is None:
        o, state = _LIGHTNING[precision, False](*padded, block, n, interpret)
    else:
        segments = segment_tables(segment_ids, heads, padded.q.shape[1])
        o, state = _LIGHTNING[precision, True](*padded, segments, block, n, interpret)
    return unpad(o, state, batch, heads, n, d, e)
