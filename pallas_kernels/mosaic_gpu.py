"""Lightning Attention-2 in Pallas on Mosaic GPU (Hopper and later: wgmma, TMA).

One kernel, `_sweep`, walks the blocks of one (batch, head) in order (or in
reverse) carrying a float32 state tile, and serves the forward pass and all
three gradients (Algorithm 2 of docs/design.md section 3). For block c with rows r,
a state tile `state` [A, 64] and the block's real length L:

    scores = X_c @ Y_c^T                  [C, C], times the decay mask
    out_c  = mask(scores) @ Z_c + out_decay[r] * (X_c @ state)
    state <- lambda^L * state + Y_c^T @ (state_decay[r] * Z_c)

    pass      X    Y      Z    state       direction  mask       out_decay  state_decay
    forward   Q    K      V    KV  [d, e]  forward    M          lambda^(i+1)  lambda^(L-1-j)
    dQ        dO   V      K    KV^T [e, d] forward    M          lambda^(i+1)  lambda^(L-1-j)
    dV        K    Q      dO   dKV [d, e]  reverse    M^T        lambda^(L-1-j) lambda^(i+1)
    dK        V    dO     Q    dKV^T[e, d] reverse    M^T        lambda^(L-1-j) lambda^(i+1)

(M[i, j] = lambda^(i-j) for i >= j.) The forward's final state is the op's
final state; the dV pass's final state is the gradient of the initial state.
Each pass writes its output once, in the input dtype: no partial sums.

Compiled, every operand is read from HBM untransposed; wgmma reads Y
transposed from shared memory (`plgpu.transpose_ref`, free for 16-bit types).
Mosaic GPU's interpreter (jax 0.10.2) cannot run transposed operands, so in
interpret mode `_sweep` hands the kernel Y^T made by XLA instead: the same math,
with every operand in its natural [M, K] / [K, N] layout. Float32 inputs: TF32
wgmma takes only K-major operands, which this layout does not give, so `_sweep`
hands them to the TF32 sweep of `mosaic_gpu_f32` (its own layouts, the same
passes and wrapper), compiled and interpreted alike.

One program per ((batch, head), 64-wide tile of Z's columns), the sequence
walked in order inside the program (the next block's tiles prefetched by TMA
into a second buffer when shared memory allows, `_buffer_slots`), the float32
state tile [A, 64] in shared memory (A = d or e padded to a multiple of 64, at
most 256). When batch x heads
leaves SMs idle, the sequence is also split (`choose_tiling`): a state-only
sweep per split, an XLA scan combining the split states, then every split swept
in parallel from its entering state.

Segment ids (packed sequences): a static flag adds one operand, an int32 table of
run-boundary counts (`segment_tables`: each row's count and the count before it),
copied by TMA as a [2, block] tile per block beside X, Y and Z. Each block cuts its
decays where the count changes: the mask between runs, the forward's out_decay
outside the block's first run and state_decay outside its last, lambda^L when the
block holds a boundary (Triton's `_cut_decays`; the reverse passes swap the row
decays' roles, so their cuts too). The splits' `_combine` zeroes a split's decay
when the split holds a boundary.
Without segment ids the kernels have no table and compile as before.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import mosaic_gpu_f32
from pallas_kernels._common import flatten_and_pad, kernel_op, round_up, segment_tables, unpad
from pallas_kernels._mosaic_gpu_common import (  # noqa: F401 (re-exported: tests, tools)
    SEGMENT_ROWS,
    SMEM_BUDGET,
    SWIZZLE_BYTES,
    TILE,
    cut_at_runs,
    decay_mask,
    interpret_params,
    layout_iota,
    recording_races,
    reset_interpreter,
    run_counts,
    smem_tile,
    transpose,
)

DEFAULT_BLOCK = 64  # rows per block: wgmma's M granularity
DIM_ALIGN = 64  # d and e are zero-padded to a multiple of this (exact)
MAX_DIM = 256  # wgmma N <= 256 and the state tile's registers
STATE_ROWS = 64  # rows of the state updated per wgmma
DEFAULT_NUM_SMS = 132  # H100 SXM and H200
MIN_SPLIT_BLOCKS = 8  # blocks per sequence split, at least
MAX_SEQ = 1 << 24  # sequence lengths travel as float32 (exact below 2^24)


def _buffer_slots(
    block: int, x_width: int, width: int, dtype, state_only: bool, segmented: bool = False
) -> int:
    """2 (prefetch the next block's tiles while this one computes) when shared memory
    allows, else 1. Counts the kernel's shared-memory tiles (bytes)."""
    item = jnp.dtype(dtype).itemsize
    per_slot = (0 if state_only else block * x_width * item) + (block * width + block * TILE) * item
    per_slot += SEGMENT_ROWS * block * 4 if segmented else 0  # int32 run counts
    fixed = (
        width * TILE * 4  # f32 state
        + block * TILE * (4 + item)  # decays, decayed Z
        + (0 if state_only else block * block * (item + 4) + (width + block) * TILE * item)
    )
    return 2 if fixed + 2 * per_slot <= SMEM_BUDGET else 1


def _sweep_kernel(
    *refs, block: int, reverse: bool, state_only: bool, interpret: bool, segmented: bool
):
    """One program: group g, Z-column tile t; walks every block of its sequence.

    refs: params [G, block] f32 (slope, real length), X [G, N, A] (absent when
    state_only), Yt [G, A, N], Z [G, N, Zc], state0 [G, A, Zc] f32, segment
    table [G, 2, N] int32 (only when segmented: `_segment_table`); outputs: out
    [G, N, Zc] (absent when state_only), final state [G, A, Zc] f32.
    """
    num_inputs = (4 if state_only else 5) + segmented
    inputs, outputs = refs[:num_inputs], refs[num_inputs:]
    seg_ref = inputs[-1] if segmented else None
    if state_only:
        params_ref, yt_ref, z_ref, state0_ref = inputs[:4]
        (state_ref,) = outputs
        x_ref = out_ref = None
    else:
        params_ref, x_ref, yt_ref, z_ref, state0_ref = inputs[:5]
        out_ref, state_ref = outputs
    dtype = z_ref.dtype
    # Compiled, Y arrives untransposed ([G, N, A]) and wgmma reads it transposed from
    # shared memory (free for 16-bit types); the interpreter cannot run transposed
    # operands (jax 0.10.2), so there the wrapper passes Yt [G, A, N].
    y_natural = not interpret
    width = yt_ref.shape[-1] if y_natural else yt_ref.shape[1]  # A: rows of the state
    num_blocks = z_ref.shape[1] // block
    g = lax.axis_index("g")
    cols = pl.ds(lax.axis_index("t") * TILE, TILE)
    state_chunks = [pl.ds(i, STATE_ROWS) for i in range(0, width, STATE_ROWS)]

    iota = functools.partial(layout_iota, interpret=interpret)
    counts_along = functools.partial(run_counts, interpret=interpret)

    x_width = x_ref.shape[-1] if x_ref is not None else width
    slots = _buffer_slots(block, x_width, width, dtype, state_only, segmented)
    per_slot = 4 if segmented else 3  # barriers per buffer slot: X, Y, Z (and segment table)

    def scoped(
        x_s, yt_s, z_s, p_s, st_s, zs_s, o_s, f32_s, mask_s, dec_s, params_s, seg_s, barriers
    ):
        plgpu.copy_gmem_to_smem(params_ref.at[g], params_s, barriers.at[0])
        plgpu.copy_gmem_to_smem(state0_ref.at[g, :, cols], f32_s, barriers.at[1])
        plgpu.barrier_wait(barriers.at[0])
        plgpu.barrier_wait(barriers.at[1])
        slope = params_s[0]
        seq_len = params_s[1].astype(jnp.int32)  # real rows of this group's sequence
        # The decays shared by every block live in shared memory: held in registers
        # across the loop they would crowd out the state (ptxas spills).
        dec_s[...] = jnp.exp(-slope * (iota((block, TILE), 0) + 1).astype(jnp.float32))
        if not state_only:
            mask_s[...] = decay_mask(slope, block, reverse, interpret=interpret)
            for rs in state_chunks:
                st_s[rs] = f32_s[rs].astype(dtype)
        plgpu.commit_smem()

        def load(step):
            """TMA copies of block `step`'s tiles into buffer slot step % slots."""
            c = num_blocks - 1 - step if reverse else step
            rows = pl.ds(c * block, block)
            slot = lax.rem(step, slots)
            if not state_only:
                plgpu.copy_gmem_to_smem(
                    x_ref.at[g, rows, :], x_s.at[slot], barriers.at[per_slot * slot]
                )
            y_rows = yt_ref.at[g, rows, :] if y_natural else yt_ref.at[g, :, rows]
            plgpu.copy_gmem_to_smem(y_rows, yt_s.at[slot], barriers.at[per_slot * slot + 1])
            plgpu.copy_gmem_to_smem(
                z_ref.at[g, rows, cols], z_s.at[slot], barriers.at[per_slot * slot + 2]
            )
            if segmented:
                plgpu.copy_gmem_to_smem(
                    seg_ref.at[g, :, rows], seg_s.at[slot], barriers.at[per_slot * slot + 3]
                )

        if slots == 2:
            load(0)

        def body(step, carry):
            c = num_blocks - 1 - step if reverse else step
            rows = pl.ds(c * block, block)
            slot = lax.rem(step, slots)
            if slots == 2:  # prefetch the next block while this one computes

                @pl.when(step + 1 < num_blocks)
                def _():
                    load(step + 1)

            else:
                load(step)
            x_t, yt_t, z_t = x_s.at[slot] if x_s is not None else None, yt_s.at[slot], z_s.at[slot]
            length = jnp.clip(seq_len - c * block, 0, block)  # real rows in this block

            # lambda^(i+1) per row, and lambda^(L-1-j) in a block of L real rows.
            q_dec = dec_s[...]
            rows_left = jnp.maximum(length - 1 - iota((block, TILE), 0), 0)
            k_dec = jnp.exp(-slope * rows_left.astype(jnp.float32))
            state_dec = jnp.exp(-slope * length.astype(jnp.float32))
            if segmented:
                # Cut every decay that spans a run boundary (docs/design.md, segment ids):
                # the block-start state reaches only rows of the run it belongs to (the
                # first), only rows of the last run reach the block-end state, and the state
                # passes through only a block that continues one run.
                plgpu.barrier_wait(barriers.at[per_slot * slot + 3])
                seg_t = seg_s.at[slot]
                start, end = seg_t[1, 0], seg_t[0, block - 1]  # counts before / at the end
                row_counts = counts_along(seg_t.at[0], 0, (block, TILE))
                q_dec = jnp.where(row_counts == start, q_dec, 0.0)
                k_dec = jnp.where(row_counts == end, k_dec, 0.0)
                state_dec = jnp.where(start == end, state_dec, 0.0)
            out_dec, upd_dec = (k_dec, q_dec) if reverse else (q_dec, k_dec)

            plgpu.barrier_wait(barriers.at[per_slot * slot + 1])
            if not state_only:
                plgpu.barrier_wait(barriers.at[per_slot * slot])

                def scores_mm(acc):
                    plgpu.wgmma(acc, x_t, plgpu.transpose_ref(yt_t, (1, 0)) if y_natural else yt_t)
                    return acc[...]

                scores = pl.run_scoped(scores_mm, plgpu.ACC((block, block), jnp.float32))
                mask = mask_s[...]
                if segmented:
                    mask = cut_at_runs(mask, seg_t.at[0], interpret=interpret)
                p_s[...] = (scores * mask).astype(dtype)
                plgpu.commit_smem()
            plgpu.barrier_wait(barriers.at[per_slot * slot + 2])

            if not state_only:

                def out_mm(acc_intra, acc_inter):
                    plgpu.wgmma(acc_intra, p_s, z_t)
                    plgpu.wgmma(acc_inter, x_t, st_s)
                    return acc_intra[...], acc_inter[...]

                intra, inter = pl.run_scoped(
                    out_mm,
                    plgpu.ACC((block, TILE), jnp.float32),
                    plgpu.ACC((block, TILE), jnp.float32),
                )
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # o_s is free again
                o_s[...] = (intra + out_dec * inter).astype(dtype)
            zs_s[...] = (z_t[...].astype(jnp.float32) * upd_dec).astype(dtype)
            plgpu.commit_smem()
            if not state_only:
                plgpu.copy_smem_to_gmem(o_s, out_ref.at[g, rows, cols])

            # The state lives in shared memory (float32, and in the input dtype as
            # the next block's wgmma operand), updated 64 rows at a time so that
            # d = 256 fits in registers.
            for rs in state_chunks:

                def state_mm(acc, rs=rs):
                    if y_natural:
                        y_rows = plgpu.transpose_ref(yt_t.at[:, rs], (1, 0))
                    else:
                        y_rows = yt_t.at[rs]
                    plgpu.wgmma(acc, y_rows, zs_s)
                    return acc[...]

                update = pl.run_scoped(state_mm, plgpu.ACC((STATE_ROWS, TILE), jnp.float32))
                state = state_dec * f32_s[rs] + update
                f32_s[rs] = state
                if not state_only:
                    st_s[rs] = state.astype(dtype)
            plgpu.commit_smem()
            return carry

        lax.fori_loop(0, num_blocks, body, None)
        plgpu.copy_smem_to_gmem(f32_s, state_ref.at[g, :, cols])
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(
        scoped,
        None if state_only else smem_tile((slots, block, x_width), dtype),  # x_s
        smem_tile((slots, block, width) if y_natural else (slots, width, block), dtype),  # Y or Yt
        smem_tile((slots, block, TILE), dtype),  # z_s
        None if state_only else smem_tile((block, block), dtype),  # p_s: masked scores
        None if state_only else smem_tile((width, TILE), dtype),  # st_s: state as an operand
        smem_tile((block, TILE), dtype),  # zs_s: decayed Z
        None if state_only else smem_tile((block, TILE), dtype),  # o_s: output staging
        smem_tile((width, TILE), jnp.float32),  # f32_s: the state
        None if state_only else smem_tile((block, block), jnp.float32),  # mask_s: decay mask
        smem_tile((block, TILE), jnp.float32),  # dec_s: lambda^(i+1) per row
        plgpu.SMEM((block,), jnp.float32),  # params_s
        plgpu.SMEM((slots, SEGMENT_ROWS, block), jnp.int32) if segmented else None,  # seg_s
        plgpu.Barrier(num_barriers=per_slot * slots),
    )


def _sweep(params, x, y, z, state0, *, block, reverse, interpret, seg=None, exact=False):
    """out [G, N, Zc] (None when x is None: state only) and final state [G, A, Zc] f32.

    params [G, block] f32 holds each group's slope and real sequence length; y is
    Y [G, N, A], the operand the kernel multiplies transposed (module docstring);
    seg: None (no segment ids: the unsegmented kernel) or the `_segment_table`;
    exact: float32 products to about float32 accuracy (3-pass TF32) instead of TF32.
    """
    if z.dtype == jnp.float32:  # TF32 wgmma needs other operand layouts
        return mosaic_gpu_f32.sweep(
            params, x, y, z, state0, block=block, reverse=reverse, interpret=interpret, seg=seg,
            split=exact,
        )  # fmt: skip
    groups, _, width = y.shape
    yt = transpose(y) if interpret else y  # the interpreter takes no transposed operands
    z_cols = z.shape[-1]
    state_only = x is None
    kernel = functools.partial(
        _sweep_kernel,
        block=block,
        reverse=reverse,
        state_only=state_only,
        interpret=bool(interpret),
        segmented=seg is not None,
    )
    state_type = jax.ShapeDtypeStruct((groups, width, z_cols), jnp.float32)
    out_type = (state_type,) if state_only else (jax.ShapeDtypeStruct(z.shape, z.dtype), state_type)
    name = "lightning_states" if state_only else "lightning_sweep"
    outs = plgpu.kernel(
        kernel,
        out_type=out_type,
        grid=(groups, z_cols // TILE),
        grid_names=("g", "t"),
        interpret=interpret_params() if interpret else False,
        kernel_name=name + ("_reverse" if reverse else ""),
    )(
        *((params, yt, z, state0) if state_only else (params, x, yt, z, state0)),
        *(() if seg is None else (seg,)),
    )
    return (None, outs[0]) if state_only else tuple(outs)


class Tiling(NamedTuple):
    """Static tiling of one call: rows per block and sequence splits (each of `blocks` blocks)."""

    block: int
    splits: int
    split_blocks: int


def _num_sms() -> int:
    """Streaming multiprocessors of the default GPU; 132 (H100 SXM / H200) without one."""
    device = jax.devices()[0]
    cores = getattr(device, "core_count", None) if device.platform == "gpu" else None
    return int(cores) if cores else DEFAULT_NUM_SMS


def choose_tiling(groups: int, e: int, n: int, splits: int | None = None) -> Tiling:
    """Sequence splits so that small batch x heads still fill the GPU.

    With fewer programs than SMs (groups x e-tiles < SMs), the sequence is split
    into pieces of at least MIN_SPLIT_BLOCKS blocks until there are about two
    programs per SM; each split costs one extra state-only pass. `splits`
    forces a count (capped at one block per split).
    """
    block = DEFAULT_BLOCK
    num_blocks = -(-n // block)
    programs = groups * (round_up(e, DIM_ALIGN) // TILE)
    if splits is None:
        sms = _num_sms()
        splits = 1
        if programs < sms:
            splits = min(-(-2 * sms // programs), num_blocks // MIN_SPLIT_BLOCKS)
    splits = max(1, min(splits, num_blocks))
    split_blocks = -(-num_blocks // splits)
    return Tiling(block, -(-num_blocks // split_blocks), split_blocks)


def _params(slopes, tiling: Tiling, seq_len: int) -> jax.Array:
    """[G * S, block] float32: each split's slope (column 0) and real length (column 1)."""
    split_rows = tiling.block * tiling.split_blocks
    lengths = np.clip(seq_len - np.arange(tiling.splits) * split_rows, 0, split_rows)
    params = jnp.zeros((slopes.shape[0] * tiling.splits, tiling.block), jnp.float32)
    params = params.at[:, 0].set(jnp.repeat(slopes.astype(jnp.float32), tiling.splits))
    return params.at[:, 1].set(jnp.tile(jnp.asarray(lengths, jnp.float32), slopes.shape[0]))


def _segment_table(segments, tiling: Tiling) -> jax.Array | None:
    """[G * S, 2, N / S] int32: per split, the run counts of its rows and the counts before.

    segments: None or the (counts, before) pair of `segment_tables`, each [G, N].
    """
    if segments is None:
        return None
    table = jnp.stack(segments, axis=1)  # [G, 2, N]
    groups, rows = table.shape[0], table.shape[2]
    table = table.reshape(groups, 2, tiling.splits, rows // tiling.splits)
    return jnp.moveaxis(table, 2, 1).reshape(groups * tiling.splits, 2, rows // tiling.splits)


def _split_keeps(segments, tiling: Tiling) -> jax.Array | None:
    """[S, G] float32: 1 where split s continues one run (its state passes through), else 0.

    A split passes the state entering it (either direction) only when its rows and the
    row before it are one run: the count at its last row equals the count before it.
    """
    if segments is None:
        return None
    counts, before = segments
    split_rows = tiling.block * tiling.split_blocks
    ends, starts = counts[:, split_rows - 1 :: split_rows], before[:, ::split_rows]
    return (ends == starts).T.astype(jnp.float32)


def _combine(local, boundary, slopes, tiling: Tiling, seq_len: int, reverse: bool, keeps=None):
    """States at every split boundary from each split's local state (an XLA scan over S).

    local [G * S, A, Z]: the state each split adds, starting from zero.
    boundary [G, A, Z]: the state entering the first split (the last when reverse).
    keeps: None, or [S, G] (`_split_keeps`): 0 cuts the state at a split holding a
    run boundary (segment ids).
    Returns the entering state of every split [G * S, A, Z] and the state leaving
    the last (first when reverse) split [G, A, Z].
    """
    groups, width, cols = boundary.shape
    split_rows = tiling.block * tiling.split_blocks
    lengths = np.clip(seq_len - np.arange(tiling.splits) * split_rows, 0, split_rows)
    decays = jnp.exp(-slopes.astype(jnp.float32)[None, :] * jnp.asarray(lengths)[:, None])
    if keeps is not None:
        decays = decays * keeps
    local = jnp.moveaxis(local.reshape(groups, tiling.splits, width, cols), 1, 0)

    def step(state, xs):
        local_s, decay_s = xs
        return decay_s[:, None, None] * state + local_s, state

    leaving, entering = lax.scan(step, boundary, (local, decays), reverse=reverse)
    return jnp.moveaxis(entering, 0, 1).reshape(-1, width, cols), leaving


def _split(x: jax.Array, tiling: Tiling) -> jax.Array:
    """[G, N, c] -> [G * S, N / S, c]: each split of the sequence as its own group (free)."""
    groups, rows, cols = x.shape
    return x.reshape(groups * tiling.splits, rows // tiling.splits, cols)


def _entering_states(
    params, y, z, boundary, slopes, tiling, seq_len, interpret, reverse, segments=None, exact=False
):
    """The state entering each split: a state-only pass, then `_combine`."""
    if tiling.splits == 1:
        return boundary, None
    zeros = jnp.zeros((y.shape[0], y.shape[2], z.shape[-1]), jnp.float32)
    _, local = _sweep(
        params,
        None,
        y,
        z,
        zeros,
        block=tiling.block,
        reverse=reverse,
        interpret=interpret,
        seg=_segment_table(segments, tiling),
        exact=exact,
    )
    keeps = _split_keeps(segments, tiling)
    return _combine(local, boundary, slopes, tiling, seq_len, reverse, keeps)


def _forward(q, k, v, slopes, s0, tiling, seq_len, interpret, segments=None, exact=False):
    """Padded [G, N, Dp] operands -> o [G, N, Ep], final state [G, Dp, Ep] float32.

    segments: None, or the (counts, before) pair of `segment_tables` [G, N] int32.
    exact: float32 inputs multiply in 3-pass TF32 (precision="highest").
    """
    params = _params(slopes, tiling, seq_len)
    ks, vs = _split(k, tiling), _split(v, tiling)
    starts, final = _entering_states(
        params, ks, vs, s0, slopes, tiling, seq_len, interpret, reverse=False, segments=segments,
        exact=exact,
    )  # fmt: skip
    o, last = _sweep(
        params,
        _split(q, tiling),
        ks,
        vs,
        starts,
        block=tiling.block,
        reverse=False,
        interpret=interpret,
        seg=_segment_table(segments, tiling),
        exact=exact,
    )
    return o.reshape(v.shape), last if final is None else final


def _backward(
    q, k, v, slopes, s0, do, dstate, tiling, seq_len, interpret, segments=None, exact=False
):
    """Algorithm 2 in three passes (module docstring): dQ forward; dV and dK in reverse.

    Every pass cuts its decays with the same segment table: the reverse passes swap
    the roles of the row decays (out_decay, state_decay), and so of their cuts.
    """
    params = _params(slopes, tiling, seq_len)
    sweep = functools.partial(
        _sweep,
        block=tiling.block,
        interpret=interpret,
        seg=_segment_table(segments, tiling),
        exact=exact,
    )
    states = functools.partial(
        _entering_states,
        slopes=slopes,
        tiling=tiling,
        seq_len=seq_len,
        interpret=interpret,
        segments=segments,
        exact=exact,
    )
    qs, ks, vs, dos = (_split(x, tiling) for x in (q, k, v, do))
    starts_t, _ = states(params, vs, ks, transpose(s0), reverse=False)  # KV^T entering each split
    dq, _ = sweep(params, dos, vs, ks, starts_t, reverse=False)
    ends, ds0 = states(params, qs, dos, dstate, reverse=True)  # dKV entering each (from the end)
    dv, first = sweep(params, ks, qs, dos, ends, reverse=True)
    dk, _ = sweep(params, vs, dos, qs, transpose(ends), reverse=True)
    ds0 = first if ds0 is None else ds0
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape), ds0


PRECISIONS = ("default", "highest")
# (precision, segmented) -> the op; "highest" changes only float32 inputs (3-pass TF32).
_LIGHTNING = {
    (name, segmented): kernel_op(
        functools.partial(_forward, exact=name == "highest"),
        functools.partial(_backward, exact=name == "highest"),
        segmented=segmented,
    )
    for name in PRECISIONS
    for segmented in (False, True)
}


@functools.partial(
    jax.jit, static_argnames=("block_size", "interpret", "precision", "seq_splits", "layout")
)
def lightning_attention_mosaic_gpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slopes: jax.Array,
    initial_state: jax.Array,
    *,
    block_size: int | None = None,
    interpret: bool = False,
    precision: str = "default",
    seq_splits: int | None = None,
    segment_ids: jax.Array | None = None,
    layout: str = "bhtd",
) -> tuple[jax.Array, jax.Array]:
    """Pallas/Mosaic GPU Lightning Attention-2 on checked inputs; returns (o, final_state).

    Args:
      q, k: `[B, H, T, D]`; v: `[B, H, T, E]`: bfloat16 or float16 (the 16-bit
        kernels), or float32 (the TF32 kernels of `mosaic_gpu_f32`). D, E <= 256.
      slopes: float32 `[H]`.
      initial_state: `[B, H, D, E]`, used in float32.
      block_size: rows per block, at most 64. The kernel's blocks are always 64
        rows (wgmma's M); a smaller value is accepted and rounded up, since the
        block size changes no result beyond rounding.
      interpret: run the kernels in Mosaic GPU's CPU interpreter (with its race
        detector on) instead of compiling them for the GPU.
      precision: "default" or "highest"; the matmul precision for float32
        inputs: "default" multiplies at TF32 on the GPU, "highest" in split
        TF32 (three TF32 products per product, about 2^-22 relative; slower);
        the interpreter multiplies float32 exactly either way. bf16/f16 inputs
        always multiply in their dtype with float32 accumulation.
      seq_splits: split the sequence into this many pieces, each run by its own
        programs after a state-only pass (None: `choose_tiling` decides, splitting
        only when batch x heads leaves SMs idle). Changes no result beyond rounding.
      segment_ids: optional int `[B, T]`: the state resets where the id changes (see
        `lightning_attention`); each block cuts its decays at run boundaries, and a
        sequence split holding one does not pass the state through. None: the
        unsegmented kernels (no segment table, the same code as without the argument).
      layout: "bhtd", or "bthd" (`[B, T, H, D]`): transposed to "bhtd" around the
        kernels (their TMA copies take one head's contiguous `[64, D]` tiles; a
        strided per-head TMA over `[B, T, H, D]` is not built yet).

    Returns:
      o in q's layout and dtype, and the final state `[B, H, D, E]` float32.

    Raises:
      ValueError: D or E above 256, T >= 2^24, block_size above 64, an unknown
        precision, seq_splits < 1.
    """
    if layout == "bthd":
        o, state = lightning_attention_mosaic_gpu(
            *(jnp.swapaxes(x, 1, 2) for x in (q, k, v)), slopes, initial_state,
            block_size=block_size, interpret=interpret, precision=precision,
            seq_splits=seq_splits, segment_ids=segment_ids,
        )  # fmt: skip
        return jnp.swapaxes(o, 1, 2), state
    batch, heads, n, d = q.shape
    e = v.shape[-1]
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if d > MAX_DIM or e > MAX_DIM:
        raise ValueError(
            f"the Mosaic GPU kernel takes d and e up to {MAX_DIM}; got q [..., {d}], v [..., {e}]"
        )
    if block_size is not None and block_size > DEFAULT_BLOCK:
        raise ValueError(
            f"block_size must be <= {DEFAULT_BLOCK} for the Mosaic GPU kernel (its blocks are "
            f"{DEFAULT_BLOCK} rows, wgmma's M), got {block_size}"
        )
    if seq_splits is not None and seq_splits < 1:
        raise ValueError(f"seq_splits must be None or >= 1, got {seq_splits}")
    if n >= MAX_SEQ:  # the kernels read each sequence's length as a float32
        raise ValueError(f"the Mosaic GPU kernel takes seq < {MAX_SEQ}, got q [..., {n}, {d}]")
    tiling = choose_tiling(batch * heads, e, n, seq_splits)
    padded = flatten_and_pad(
        q,
        k,
        v,
        slopes,
        initial_state,
        tiling.splits * tiling.split_blocks * tiling.block,
        round_up(d, DIM_ALIGN),
        round_up(e, DIM_ALIGN),
    )
    precision = precision if q.dtype == jnp.float32 else "default"  # 16-bit: one kernel
    if segment_ids is None:
        o, state = _LIGHTNING[precision, False](*padded, tiling, n, interpret)
    else:
        segments = segment_tables(segment_ids, heads, padded.q.shape[1])
        o, state = _LIGHTNING[precision, True](*padded, segments, tiling, n, interpret)
    return unpad(o, state, batch, heads, n, d, e)
