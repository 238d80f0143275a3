"""Lightning Attention-2 in Pallas on Mosaic TPU.

Layout. The kernels read q, k `[B, H, T, D]` and v, dO `[B, H, T, E]` where
they lie: block shapes `(None, None, rows, D)` whose last dimension is the
array's own, which the (8, 128) tiling rule allows for any D (64 included), so
the wrapper neither pads d or e nor slices the result. Only a sequence that is
not a multiple of the grid block is zero-padded at the end (docs/design.md section 4:
exact for the output; the final state is taken at the true last row).

Grid `(B * H, T / block_rows)`: the leading axis is "parallel" (megacore chips,
v4 and v5p, split it over their two TensorCores); the second is "arbitrary" and
runs in order, so the float32 state lives in VMEM scratch across the grid steps
of one (batch, head). A grid step fetches a large block (`block_rows`, 1024 to
2048 rows: the per-step pipeline overhead, about 0.35 us, is then small against
the step's work) and computes it in `sub_rows`-row sub-blocks (128 by default:
one MXU tile) with an inner `fori_loop`, as JAX's splash attention splits
`block_kv` from `block_kv_compute`.

Decays. The sub-block mask `[sub, sub]` (lambda^(i-j), i >= j) and the q decay
column `[sub, 1]` (lambda^(i+1)) are the same for every sub-block of a head:
they are computed once per (batch, head), at its first grid step, into VMEM
scratch. Only the k decay column lambda^(L-1-j) and the state decay lambda^L
depend on the sub-block's true length L (shorter in the last one), so each
sub-block computes those `sub + 1` values; all of them broadcast at use.

Backward (Algorithm 2), two kernels recomputing the states: dQ sweeps forward
rebuilding KV; dK, dV sweep in reverse (the index maps read block nb-1-c at
step c, the inner loop walks its sub-blocks last to first) carrying dKV, whose
value at the start is the gradient of the initial state.

Precision. bf16/f16 operands go to the MXU as they are, with float32
accumulation. float32 operands use the MXU's default precision unless
`precision="highest"` asks for exact (multi-pass) float32 matmuls.

Segment ids (packed sequences). Two float32 tables of run-boundary counts per
row (exact integers below 2^24) ride along, per batch row: `[B, T, 2]` holding
each row's count and the previous row's as columns, and `[B, 1, T]` the counts
as a row, so the sub-block's `[sub, sub]` "same run" mask is one broadcast
compare. Each sub-block zeroes the decays that span a run boundary
(`_cut_decays`: the mask, the q and k decay columns, the state decay), so a
boundary anywhere cuts both the intra-block product and the carried state.
Without segment ids the kernels take no tables (a static flag).

Block conventions (docs/design.md section 2), sub-block with L real rows: q row i
decays by lambda^(i+1), key row j by lambda^(L-1-j), the state by lambda^L.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import kernel_op, pallas_call, round_up, segment_tables

SUBLANES = 8
LANES = 128
PRECISIONS = ("default", "highest")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Rows per grid step (`block_rows`, one DMA per operand) and per MXU sub-block.

    `block_rows` is a multiple of `sub_rows`. The wrapper shrinks `block_rows`
    for short sequences (never below one sub-block) and to spread a ragged
    sequence evenly over the grid steps.
    """

    block_rows: int
    sub_rows: int = 128


# Defaults per input dtype. The largest footprint, the dK/dV kernel's six
# double-buffered [block_rows, 128] operands, is 6 MiB at 2048 bf16 rows or 1024
# float32 rows: within the 16 MiB scoped-VMEM default of v4/v5e/v5p (32 MiB on
# v6e, tpu7x), so one table serves every generation. At b4 h32 seq 32768 this
# is 2048 (bf16) or 4096 (float32) grid steps per kernel, against 32768 at one
# step per 128 rows.
DEFAULT_BLOCK_SIZES = {
    jnp.dtype(jnp.bfloat16): BlockSizes(block_rows=2048),
    jnp.dtype(jnp.float16): BlockSizes(block_rows=2048),
    jnp.dtype(jnp.float32): BlockSizes(block_rows=1024),
}


@dataclasses.dataclass(frozen=True)
class _Tiling:
    """The static configuration of one call (hashable: a custom_vjp nondiff argument)."""

    block_rows: int
    sub_rows: int
    heads: int
    precision: lax.Precision
    interpret: bool
    layout: str = "bhtd"  # q, k, v, o [B, H, T, *], or "bthd": [B, T, H, *], read in place


_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b
_NN = (((1,), (0,)), ((), ()))  # a @ b


def _dot(a: jax.Array, b: jax.Array, precision: lax.Precision, dims=_NN) -> jax.Array:
    """Matmul with float32 accumulation; `precision` matters for float32 operands only."""
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _decay(slope, exponent: jax.Array) -> jax.Array:
    return jnp.exp(-slope * exponent.astype(jnp.float32))


def _fill_head_tables(slope, mask_ref, q_dec_ref, k_dec_ref, state_dec_ref) -> None:
    """The head's decays for a full sub-block, into scratch: the mask [sub, sub], the q
    decay column [sub, 1] (lambda^(i+1)), the k decay column [sub, 1] (lambda^(sub-1-j))
    and the state decay [1, 1] (lambda^sub)."""
    sub = mask_ref.shape[0]
    row = lax.broadcasted_iota(jnp.int32, (sub, sub), 0)
    col = lax.broadcasted_iota(jnp.int32, (sub, sub), 1)
    mask_ref[...] = jnp.where(row >= col, _decay(slope, jnp.maximum(row - col, 0)), 0.0)
    q_dec_ref[...] = _decay(slope, lax.broadcasted_iota(jnp.int32, (sub, 1), 0) + 1)
    k_dec_ref[...], state_dec_ref[...] = _length_decays(slope, sub, sub)


def _length_decays(slope, length, sub: int):
    """k decay column [sub, 1] (lambda^(L-1-j), 1 past L) and state decay [1, 1] (lambda^L)."""
    k_rows = lax.broadcasted_iota(jnp.int32, (sub, 1), 0)
    k_dec = _decay(slope, jnp.maximum(length - 1 - k_rows, 0))
    state_dec = _decay(slope, jnp.full((1, 1), length, jnp.int32))
    return k_dec, state_dec


def _sub_block_decays(slope, length, k_dec_ref, state_dec_ref, ragged: bool):
    """k and state decays of a sub-block with `length` real rows: the head's tables when
    it is full, else computed for its length (sub + 1 exps). Without padding (`ragged`
    False, the usual case) every sub-block is full: no branch, no exp."""
    sub = k_dec_ref.shape[0]
    if not ragged:
        return k_dec_ref[...], state_dec_ref[...]
    return lax.cond(
        length == sub,
        lambda: (k_dec_ref[...], state_dec_ref[...]),
        lambda: _length_decays(slope, length, sub),
    )


def _cut_decays(seg_refs, i, sub: int, mask, q_dec, k_dec, state_dec):
    """The sub-block's decays with every factor spanning a run boundary zeroed.

    seg_refs: None (no segments: the decays unchanged) or the (columns, row)
    table refs of this grid block: columns [block_rows, 2] (count, previous
    row's count), row [1, block_rows] (count). Counts never decrease, so the
    smallest previous count is the one before the sub-block, the largest count
    the one at its end.
    """
    if seg_refs is None:
        return mask, q_dec, k_dec, state_dec
    cols_ref, row_ref = seg_refs
    start_row = pl.multiple_of(i * sub, sub)
    cols = cols_ref[pl.ds(start_row, sub), :]
    counts, before = cols[:, 0:1], cols[:, 1:2]  # [sub, 1]
    counts_row = row_ref[:, pl.ds(start_row, sub)]  # [1, sub]
    start = jnp.min(before, axis=0, keepdims=True)  # [1, 1]
    end = jnp.max(counts, axis=0, keepdims=True)
    return (
        jnp.where(counts == counts_row, mask, 0.0),
        jnp.where(counts == start, q_dec, 0.0),
        jnp.where(counts == end, k_dec, 0.0),
        jnp.where(end == start, state_dec, 0.0),
    )


def _split_refs(refs, segmented: bool, outputs: int):
    """(seg_refs or None, output refs, scratch refs) from a kernel's trailing refs."""
    seg_refs, refs = ((refs[0], refs[1]), refs[2:]) if segmented else (None, refs)
    return seg_refs, refs[:outputs], refs[outputs:]


def _sub_block_loop(num_subs: int, body, reverse: bool = False) -> None:
    """body(i) for the sub-blocks of this grid step, in order or last to first."""

    def step(t, carry):
        body(num_subs - 1 - t if reverse else t)
        return carry

    lax.fori_loop(0, num_subs, step, 0)


def _forward_kernel(
    slopes_ref,
    q_ref,
    k_ref,
    v_ref,
    s0_ref,
    *refs,
    tiling: _Tiling,
    seq_len: int,
    ragged: bool,
    segmented: bool,
):
    seg_refs, (o_ref, state_ref), scratch = _split_refs(refs, segmented, 2)
    kv_ref, mask_ref, q_dec_ref, k_dec_ref, state_dec_ref = scratch
    g, c = pl.program_id(0), pl.program_id(1)
    slope = slopes_ref[lax.rem(g, tiling.heads)]
    sub, precision = tiling.sub_rows, tiling.precision

    @pl.when(c == 0)
    def _():
        kv_ref[...] = s0_ref[...]
        _fill_head_tables(slope, mask_ref, q_dec_ref, k_dec_ref, state_dec_ref)

    def sub_block(i):
        rows = pl.ds(pl.multiple_of(i * sub, sub), sub)
        q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
        in_dtype = q.dtype
        start = c * tiling.block_rows + i * sub
        length = jnp.clip(seq_len - start, 0, sub)
        k_dec, state_dec = _sub_block_decays(slope, length, k_dec_ref, state_dec_ref, ragged)
        mask, q_dec, k_dec, state_dec = _cut_decays(
            seg_refs, i, sub, mask_ref[...], q_dec_ref[...], k_dec, state_dec
        )
        kv = kv_ref[...]
        scores = _dot(q, k, precision, _NT) * mask
        o = _dot(scores.astype(in_dtype), v, precision) + q_dec * _dot(
            q, kv.astype(in_dtype), precision
        )
        o_ref[rows, :] = o.astype(o_ref.dtype)
        k_scaled = (k.astype(jnp.float32) * k_dec).astype(in_dtype)
        kv_ref[...] = kv * state_dec + _dot(k_scaled, v, precision, _TN)

    _sub_block_loop(tiling.block_rows // sub, sub_block)

    @pl.when(c == pl.num_programs(1) - 1)
    def _():
        state_ref[...] = kv_ref[...]


def _dq_kernel(
    slopes_ref,
    k_ref,
    v_ref,
    do_ref,
    s0_ref,
    *refs,
    tiling: _Tiling,
    seq_len: int,
    ragged: bool,
    segmented: bool,
):
    seg_refs, (dq_ref,), scratch = _split_refs(refs, segmented, 1)
    kv_ref, mask_ref, q_dec_ref, k_dec_ref, state_dec_ref = scratch
    g, c = pl.program_id(0), pl.program_id(1)
    slope = slopes_ref[lax.rem(g, tiling.heads)]
    sub, precision = tiling.sub_rows, tiling.precision

    @pl.when(c == 0)
    def _():
        kv_ref[...] = s0_ref[...]
        _fill_head_tables(slope, mask_ref, q_dec_ref, k_dec_ref, state_dec_ref)

    def sub_block(i):
        rows = pl.ds(pl.multiple_of(i * sub, sub), sub)
        k, v, do = k_ref[rows, :], v_ref[rows, :], do_ref[rows, :]
        in_dtype = k.dtype
        start = c * tiling.block_rows + i * sub
        length = jnp.clip(seq_len - start, 0, sub)
        k_dec, state_dec = _sub_block_decays(slope, length, k_dec_ref, state_dec_ref, ragged)
        mask, q_dec, k_dec, state_dec = _cut_decays(
            seg_refs, i, sub, mask_ref[...], q_dec_ref[...], k_dec, state_dec
        )
        kv = kv_ref[...]
        dscores = _dot(do, v, precision, _NT) * mask
        dq = _dot(dscores.astype(in_dtype), k, precision) + q_dec * _dot(
            do, kv.astype(in_dtype), precision, _NT
        )
        dq_ref[rows, :] = dq.astype(dq_ref.dtype)
        k_scaled = (k.astype(jnp.float32) * k_dec).astype(in_dtype)
        kv_ref[...] = kv * state_dec + _dot(k_scaled, v, precision, _TN)

    _sub_block_loop(tiling.block_rows // sub, sub_block)


def _dkdv_kernel(
    slopes_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    dstate_ref,
    *refs,
    tiling: _Tiling,
    seq_len: int,
    ragged: bool,
    segmented: bool,
):
    seg_refs, (dk_ref, dv_ref, ds0_ref), scratch = _split_refs(refs, segmented, 3)
    dkv_ref, mask_ref, q_dec_ref, k_dec_ref, state_dec_ref = scratch
    g, step = pl.program_id(0), pl.program_id(1)
    c = pl.num_programs(1) - 1 - step  # the index maps read blocks in reverse
    slope = slopes_ref[lax.rem(g, tiling.heads)]
    sub, precision = tiling.sub_rows, tiling.precision

    @pl.when(step == 0)
    def _():
        dkv_ref[...] = dstate_ref[...]
        _fill_head_tables(slope, mask_ref, q_dec_ref, k_dec_ref, state_dec_ref)

    def sub_block(i):
        rows = pl.ds(pl.multiple_of(i * sub, sub), sub)
        q, k, v, do = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], do_ref[rows, :]
        in_dtype = q.dtype
        start = c * tiling.block_rows + i * sub
        length = jnp.clip(seq_len - start, 0, sub)
        k_dec, state_dec = _sub_block_decays(slope, length, k_dec_ref, state_dec_ref, ragged)
        mask, q_dec, k_dec, state_dec = _cut_decays(
            seg_refs, i, sub, mask_ref[...], q_dec_ref[...], k_dec, state_dec
        )
        dkv = dkv_ref[...]
        dkv_in = dkv.astype(in_dtype)
        scores = _dot(q, k, precision, _NT) * mask  # [query, key]
        dscores = _dot(do, v, precision, _NT) * mask
        k_scaled = (k.astype(jnp.float32) * k_dec).astype(in_dtype)
        dv = _dot(scores.astype(in_dtype), do, precision, _TN) + _dot(k_scaled, dkv_in, precision)
        dk = _dot(dscores.astype(in_dtype), q, precision, _TN) + k_dec * _dot(
            v, dkv_in, precision, _NT
        )
        dk_ref[rows, :] = dk.astype(dk_ref.dtype)
        dv_ref[rows, :] = dv.astype(dv_ref.dtype)
        q_scaled = (q.astype(jnp.float32) * q_dec).astype(in_dtype)
        dkv_ref[...] = dkv * state_dec + _dot(q_scaled, do, precision, _TN)

    _sub_block_loop(tiling.block_rows // sub, sub_block, reverse=True)

    @pl.when(step == pl.num_programs(1) - 1)
    def _():
        ds0_ref[...] = dkv_ref[...]


def _params(interpret: bool) -> pltpu.CompilerParams:
    # The TPU interpreter (jax 0.10) does not extend dimension_semantics over the grid
    # axis that vmap prepends (Mosaic's lowering does): leave them unset there, which
    # runs every axis in order.
    if interpret:
        return pltpu.CompilerParams()
    return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))


def _row_spec(tiling: _Tiling, num_blocks: int, cols: int, reverse: bool = False):
    """Rows of grid block c (or nb-1-c) of one (batch, head): [block_rows, cols].

    In layout "bthd" the operand is [B, T, H*cols] (a free reshape of
    [B, T, H, cols]) and the block is head h's `cols` lanes of its rows: the DMA
    reads them in place. Mosaic needs such a lane block to be a multiple of 128
    wide (the wrapper transposes narrower heads).
    """
    heads = tiling.heads

    def index_map(g, c):
        block = num_blocks - 1 - c if reverse else c
        if tiling.layout == "bthd":
            return (lax.div(g, heads), block, lax.rem(g, heads))
        return (lax.div(g, heads), lax.rem(g, heads), block, 0)

    if tiling.layout == "bthd":
        return pl.BlockSpec((None, tiling.block_rows, cols), index_map)
    return pl.BlockSpec((None, None, tiling.block_rows, cols), index_map)


def _state_spec(tiling: _Tiling, d: int, e: int):
    heads = tiling.heads
    return pl.BlockSpec(
        (None, None, d, e), lambda g, c: (lax.div(g, heads), lax.rem(g, heads), 0, 0)
    )


_SLOPES_SPEC = pl.BlockSpec(memory_space=pltpu.SMEM)


def _segment_specs(segments, tiling: _Tiling, num_blocks: int, reverse: bool = False) -> list:
    """Specs of the (columns [B, T, 2], row [B, 1, T]) tables of the grid block; none
    without segments. Per batch row: every head of it reads the same tables."""
    if segments is None:
        return []
    heads, rows = tiling.heads, tiling.block_rows

    def block(c):
        return num_blocks - 1 - c if reverse else c

    return [
        pl.BlockSpec((None, rows, 2), lambda g, c: (lax.div(g, heads), block(c), 0)),
        pl.BlockSpec((None, 1, rows), lambda g, c: (lax.div(g, heads), 0, block(c))),
    ]


def _scratch(tiling: _Tiling, d: int, e: int) -> list:
    """The carried state [d, e] and the head's decay tables (see `_fill_head_tables`)."""
    sub = tiling.sub_rows
    return [
        pltpu.VMEM((d, e), jnp.float32),
        pltpu.VMEM((sub, sub), jnp.float32),
        pltpu.VMEM((sub, 1), jnp.float32),
        pltpu.VMEM((sub, 1), jnp.float32),
        pltpu.VMEM((1, 1), jnp.float32),
    ]


def cost_estimate(
    kernel: str, groups: int, rows: int, seq_len: int, d: int, e: int, itemsize: int, sub_rows: int
) -> pl.CostEstimate:
    """What one kernel computes and moves, from the shapes and the tiling.

    kernel: "forward", "dq" or "dkdv"; groups = batch * heads; rows = the
    padded sequence length, seq_len the real one. FLOPs count the matmuls as
    computed (the masked upper triangle of each sub-block included).
    Transcendentals are the `exp`s: per (batch, head) the tables (sub^2 + 2 sub
    + 1), per sub-block that is not full (the last real one and the padding after
    it) its k decay column and state decay (sub + 1). Bytes: every operand
    read once and every result written once (inputs and outputs in the input
    dtype, states float32).
    """
    subs = rows // sub_rows
    tables = sub_rows * sub_rows + 2 * sub_rows + 1
    partial_subs = subs - seq_len // sub_rows
    transcendentals = groups * (tables + partial_subs * (sub_rows + 1))
    state_bytes = d * e * 4
    # Per sub-block: score tiles (sub x sub x d or e) and state products (sub x d x e).
    intra = 2 * sub_rows * sub_rows
    inter = 2 * sub_rows * d * e
    if kernel == "forward":  # q k^T, scores v; q kv, k^T v
        flops = intra * (d + e) + 2 * inter
        io_bytes = rows * (2 * d + 2 * e) * itemsize + 2 * state_bytes  # q k v o; s0, state
    elif kernel == "dq":  # dO v^T, dscores k; dO kv^T, k^T v
        flops = intra * (d + e) + 2 * inter
        io_bytes = rows * (2 * d + 2 * e) * itemsize + state_bytes  # k v dO dq; s0
    elif kernel == "dkdv":  # q k^T, dO v^T, scores^T dO, dscores^T q; k dKV, v dKV^T, q^T dO
        flops = 2 * intra * (d + e) + 3 * inter
        io_bytes = (
            rows * (3 * d + 3 * e) * itemsize + 2 * state_bytes
        )  # q k v dO dk dv; dstate, ds0
    else:
        raise ValueError(f"kernel must be 'forward', 'dq' or 'dkdv', got {kernel!r}")
    return pl.CostEstimate(
        flops=groups * subs * flops,
        transcendentals=transcendentals,
        bytes_accessed=groups * io_bytes,
    )


def _rows_of(q: jax.Array, tiling: _Tiling) -> int:
    """The (padded) sequence length of q: [B, H, T, D] or, in "bthd", [B, T, H*D]."""
    return q.shape[1] if tiling.layout == "bthd" else q.shape[2]


def _width(x: jax.Array, tiling: _Tiling) -> int:
    """One head's width (d or e) of an operand in the tiling's layout."""
    return x.shape[-1] // tiling.heads if tiling.layout == "bthd" else x.shape[-1]


def _forward(q, k, v, slopes, s0, tiling: _Tiling, seq_len: int, interpret, segments=None):
    batch, heads, rows = q.shape[0], tiling.heads, _rows_of(q, tiling)
    d, e = _width(q, tiling), _width(v, tiling)
    nb = rows // tiling.block_rows
    static = dict(
        tiling=tiling, seq_len=seq_len, ragged=rows != seq_len, segmented=segments is not None
    )
    return pallas_call(
        functools.partial(_forward_kernel, **static),
        grid=(batch * heads, nb),
        in_specs=[
            _SLOPES_SPEC,
            _row_spec(tiling, nb, d),
            _row_spec(tiling, nb, d),
            _row_spec(tiling, nb, e),
            _state_spec(tiling, d, e),
            *_segment_specs(segments, tiling, nb),
        ],
        out_specs=[_row_spec(tiling, nb, e), _state_spec(tiling, d, e)],
        out_shape=[
            jax.ShapeDtypeStruct(v.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, heads, d, e), jnp.float32),
        ],
        scratch_shapes=_scratch(tiling, d, e),
        compiler_params=_params(tiling.interpret),
        cost_estimate=cost_estimate(
            "forward", batch * heads, rows, seq_len, d, e, q.dtype.itemsize, tiling.sub_rows
        ),
        interpret=interpret,
        name="lightning_forward",
    )(slopes, q, k, v, s0, *(segments or ()))


def _backward(
    q, k, v, slopes, s0, do, dstate, tiling: _Tiling, seq_len: int, interpret, segments=None
):
    batch, heads, rows = q.shape[0], tiling.heads, _rows_of(q, tiling)
    d, e = _width(q, tiling), _width(v, tiling)
    nb = rows // tiling.block_rows
    groups, itemsize = batch * heads, q.dtype.itemsize
    static = dict(
        tiling=tiling, seq_len=seq_len, ragged=rows != seq_len, segmented=segments is not None
    )
    seg_args = tuple(segments or ())
    dq = pallas_call(
        functools.partial(_dq_kernel, **static),
        grid=(groups, nb),
        in_specs=[
            _SLOPES_SPEC,
            _row_spec(tiling, nb, d),
            _row_spec(tiling, nb, e),
            _row_spec(tiling, nb, e),
            _state_spec(tiling, d, e),
            *_segment_specs(segments, tiling, nb),
        ],
        out_specs=_row_spec(tiling, nb, d),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=_scratch(tiling, d, e),
        compiler_params=_params(tiling.interpret),
        cost_estimate=cost_estimate("dq", groups, rows, seq_len, d, e, itemsize, tiling.sub_rows),
        interpret=interpret,
        name="lightning_dq",
    )(slopes, k, v, do, s0, *seg_args)
    dk, dv, ds0 = pallas_call(
        functools.partial(_dkdv_kernel, **static),
        grid=(groups, nb),
        in_specs=[
            _SLOPES_SPEC,
            _row_spec(tiling, nb, d, reverse=True),
            _row_spec(tiling, nb, d, reverse=True),
            _row_spec(tiling, nb, e, reverse=True),
            _row_spec(tiling, nb, e, reverse=True),
            _state_spec(tiling, d, e),
            *_segment_specs(segments, tiling, nb, reverse=True),
        ],
        out_specs=[
            _row_spec(tiling, nb, d, reverse=True),
            _row_spec(tiling, nb, e, reverse=True),
            _state_spec(tiling, d, e),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(k.shape, k.dtype),
            jax.ShapeDtypeStruct(v.shape, v.dtype),
            jax.ShapeDtypeStruct(s0.shape, jnp.float32),
        ],
        scratch_shapes=_scratch(tiling, d, e),
        compiler_params=_params(tiling.interpret),
        cost_estimate=cost_estimate("dkdv", groups, rows, seq_len, d, e, itemsize, tiling.sub_rows),
        interpret=interpret,
        name="lightning_dkdv",
    )(slopes, q, k, v, do, dstate, *seg_args)
    return dq, dk, dv, ds0


_lightning = kernel_op(_forward, _backward)
_lightning_segmented = kernel_op(_forward, _backward, segmented=True)


def choose_block_sizes(
    seq_len: int, dtype, block_size: int | None = None, block_sizes: BlockSizes | None = None
) -> tuple[BlockSizes, int]:
    """The block sizes for a sequence of `seq_len` rows, and the padded length.

    `block_size` (the public op's argument) sets the sub-block; `block_sizes`
    sets both (default: `DEFAULT_BLOCK_SIZES` for the dtype). The grid block
    is cut to the fewest steps that cover the sequence, spread evenly, so a
    ragged sequence pads less than one sub-block per grid step.
    """
    sizes = block_sizes or DEFAULT_BLOCK_SIZES[jnp.dtype(dtype)]
    sub = block_size or sizes.sub_rows
    if sub % SUBLANES:
        raise ValueError(
            f"block_size must be a multiple of {SUBLANES} for the Mosaic TPU kernel, got {sub}"
        )
    if sub > sizes.block_rows:
        raise ValueError(
            f"block_size ({sub}) must be at most the grid block ({sizes.block_rows} rows) for "
            "the Mosaic TPU kernel: it is the sub-block computed in VMEM"
        )
    if sizes.block_rows % sizes.sub_rows:
        raise ValueError(
            f"block_sizes.block_rows ({sizes.block_rows}) must be a multiple of "
            f"block_sizes.sub_rows ({sizes.sub_rows})"
        )
    max_subs = max(1, sizes.block_rows // sub)
    subs = -(-seq_len // sub)
    steps = -(-subs // max_subs)
    block_rows = -(-subs // steps) * sub
    return BlockSizes(block_rows=block_rows, sub_rows=sub), round_up(seq_len, block_rows)


@functools.partial(
    jax.jit, static_argnames=("block_size", "interpret", "precision", "block_sizes", "layout")
)
def lightning_attention_mosaic_tpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slopes: jax.Array,
    initial_state: jax.Array,
    *,
    block_size: int | None = None,
    interpret: bool = False,
    precision: str = "default",
    block_sizes: BlockSizes | None = None,
    segment_ids: jax.Array | None = None,
    layout: str = "bhtd",
) -> tuple[jax.Array, jax.Array]:
    """Pallas/Mosaic TPU Lightning Attention-2 on checked inputs; returns (o, final_state).

    Args:
      q, k: `[B, H, T, D]`; v: `[B, H, T, E]` (float32, bfloat16 or float16);
        `[B, T, H, D]`, `[B, T, H, E]` with layout="bthd".
      slopes: float32 `[H]`.
      initial_state: `[B, H, D, E]`, used in float32.
      block_size: rows per compute sub-block (the tiling of docs/design.md section 2),
        a multiple of 8 (default 128, one MXU tile).
      interpret: run the kernels in the Pallas TPU interpreter (any backend).
      precision: "default" (float32 operands at the MXU's default precision)
        or "highest" (exact float32 matmuls); bf16/f16 operands ignore it.
      block_sizes: rows per grid step and per sub-block (default: tuned per
        dtype, `DEFAULT_BLOCK_SIZES`); `block_size` overrides its sub_rows.
      segment_ids: optional int `[B, T]`: the state resets where the id changes
        (see `lightning_attention`); T below 2^24. None: the unsegmented kernels.
      layout: "bhtd" or "bthd". In "bthd" with D and E multiples of 128, each
        grid step's DMA reads one head's lanes of `[B, T, H*D]` (a free reshape)
        in place and o is written back the same way: no transpose around the
        kernels. Narrower heads (Mosaic's lane blocks are 128 wide) are
        transposed to "bhtd" around the kernels.

    Returns:
      o in q's layout and dtype, and the final state `[B, H, D, E]` float32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if layout == "bthd":
        batch, n, heads, d = q.shape
        e = v.shape[-1]
        if heads > 1 and (d % LANES or e % LANES):
            o, state = lightning_attention_mosaic_tpu(
                *(jnp.swapaxes(x, 1, 2) for x in (q, k, v)), slopes, initial_state,
                block_size=block_size, interpret=interpret, precision=precision,
                block_sizes=block_sizes, segment_ids=segment_ids,
            )  # fmt: skip
            return jnp.swapaxes(o, 1, 2), state
        q, k, v = (x.reshape(batch, n, -1) for x in (q, k, v))
    else:
        batch, heads, n, _ = q.shape
    dtype = q.dtype
    sizes, padded_n = choose_block_sizes(n, dtype, block_size, block_sizes)
    tiling = _Tiling(
        block_rows=sizes.block_rows,
        sub_rows=sizes.sub_rows,
        heads=heads,
        precision=lax.Precision.HIGHEST if precision == "highest" else lax.Precision.DEFAULT,
        interpret=bool(interpret),
        layout=layout,
    )
    seq_axis = 1 if layout == "bthd" else 2
    if padded_n != n:  # zeros at the end: exact (the kernels decay by true lengths)
        pad = [(0, 0)] * q.ndim
        pad[seq_axis] = (0, padded_n - n)
        q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
    interpret_params = pltpu.InterpretParams() if interpret else False
    operands = (q, k, v, slopes.astype(jnp.float32), initial_state.astype(jnp.float32))
    if segment_ids is None:
        o, state = _lightning(*operands, tiling, n, interpret_params)
    else:
        counts, before = segment_tables(segment_ids, 1, padded_n)  # [B, padded_n]
        columns = jnp.stack([counts, before], axis=-1).astype(jnp.float32)
        row = counts[:, None, :].astype(jnp.float32)
        o, state = _lightning_segmented(*operands, (columns, row), tiling, n, interpret_params)
    if padded_n != n:
        o = lax.slice_in_dim(o, 0, n, axis=seq_axis)
    if layout == "bthd":
        o = o.reshape(batch, n, heads, -1)
    return o, state
