"""Float32 inputs on Mosaic GPU: `mosaic_gpu`'s sweep with TF32 wgmma, operands K-major.

Hopper's TF32 wgmma reads both operands from shared memory K-major: A stored
[M, K], B stored [N, K] and viewed through `plgpu.transpose_ref` (tf32 has no
transpose bits; A in registers is refused). The 16-bit sweep's B operands (Y^T,
Z, the state) are [K, N], so this sweep lays its tiles out differently, with the
same math and passes as `mosaic_gpu._sweep_kernel` (its docstring's table):

    product                          A (stored [M, K])     B (stored [N, K])
    scores  [C, C] = X @ Y^T         X chunk [C, k]        Y chunk [C, k]
    inter   [C, T] = X @ S           X chunk [C, k]        S^T chunk [T, k]
    intra   [C, T] = P @ Z           P [C, C]              Z^T [T, C]
    update^T [T, k] = Zs^T @ Y       Zs^T [T, C]           Y^T chunk [k, C]

so the state is kept transposed (S^T [T, A]), and XLA hands the kernel Y^T and
Z^T beside X and Y (one more read of Y; the [G, A, Zc] state is transposed in and
out). Float32 tiles are twice the bytes of 16-bit ones: the width A (d or e, up
to 256) is walked in CHUNK-column pieces, whose X, Y and Y^T tiles are double
buffered when shared memory allows; the whole state S^T [64, A] stays resident.
The state is updated and carried in float32; the tensor cores read it, like
every operand, at TF32.

Mosaic GPU's interpreter (jax 0.10.2) cannot run `transpose_ref`; there each B
operand is transposed in registers into a scratch tile (`_b_operand`), so the
interpreter runs this kernel's layouts and indexing, not a different layout.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import mosaic_gpu as mgpu

CHUNK = 32  # columns of the width per wgmma: one 128-byte swizzle row of float32
F32 = 4  # bytes


def smem_bytes(block: int, width: int, slots: int, state_only: bool, segmented: bool) -> int:
    """Shared memory of one program (bytes): chunk buffers, Z^T, decayed Z^T, S^T, and
    (unless state only) P, the output staging tile and the decay mask."""
    tile = mgpu.TILE
    per_slot = ((0 if state_only else 2 * block * CHUNK) + CHUNK * block) * F32
    fixed = 2 * tile * block * F32 + tile * width * F32
    fixed += 0 if state_only else (2 * block * block + block * tile) * F32
    fixed += block * F32 + (mgpu.SEGMENT_ROWS * block * 4 if segmented else 0)
    return fixed + slots * per_slot


def chunk_slots(block: int, width: int, state_only: bool, segmented: bool) -> int:
    """2 (prefetch the next chunk while this one computes) when shared memory allows, else 1."""
    fits = smem_bytes(block, width, 2, state_only, segmented) <= mgpu.SMEM_BUDGET
    return 2 if fits else 1


def _b_operand(ref, scratch, interpret: bool):
    """`ref` (stored [N, K]) as wgmma's B operand [K, N].

    Compiled: a transposed view (free). Interpreted: `ref`'s transpose written into
    `scratch` (the interpreter has no transposed views).
    """
    if not interpret:
        return plgpu.transpose_ref(ref, (1, 0))
    scratch[...] = ref[...].T
    return scratch


def _sweep_kernel(
    *refs, block: int, reverse: bool, state_only: bool, interpret: bool, segmented: bool
):
    """One program: group g, Z-column tile t; walks every block of its sequence.

    refs: params [G, block] f32 (slope, real length), X [G, N, A] and Y [G, N, A]
    (both absent when state_only), Yt [G, A, N], Zt [G, Zc, N], St0 [G, Zc, A],
    segment table [G, 2, N] int32 (only when segmented); outputs: out [G, N, Zc]
    (absent when state_only), final St [G, Zc, A]. All float32 but the table.
    """
    num_inputs = (4 if state_only else 6) + segmented
    inputs, outputs = refs[:num_inputs], refs[num_inputs:]
    seg_ref = inputs[-1] if segmented else None
    if state_only:
        params_ref, yt_ref, zt_ref, st0_ref = inputs[:4]
        (st_ref,) = outputs
        x_ref = y_ref = out_ref = None
    else:
        params_ref, x_ref, y_ref, yt_ref, zt_ref, st0_ref = inputs[:6]
        out_ref, st_ref = outputs
    tile = mgpu.TILE
    width = yt_ref.shape[1]  # A: the state's (untransposed) rows
    num_blocks = zt_ref.shape[-1] // block
    num_chunks = width // CHUNK  # even: width is a multiple of 64
    g = lax.axis_index("g")
    cols = pl.ds(lax.axis_index("t") * tile, tile)
    slots = chunk_slots(block, width, state_only, segmented)
    iota = functools.partial(mgpu.layout_iota, interpret=interpret)
    counts_along = functools.partial(mgpu.run_counts, interpret=interpret)
    # Barriers: params, state, Z^T, segment table; then X, Y, Y^T per chunk slot.
    bar_params, bar_state, bar_zt, bar_seg, bar_chunks = 0, 1, 2, 3, 4

    def scoped(
        x_s,
        y_s,
        yt_s,
        zt_s,
        zs_s,
        st_s,
        p_s,
        o_s,
        mask_s,
        dec_s,
        params_s,
        seg_s,
        scratch,
        barriers,
    ):
        b_op = functools.partial(_b_operand, interpret=interpret)
        plgpu.copy_gmem_to_smem(params_ref.at[g], params_s, barriers.at[bar_params])
        plgpu.copy_gmem_to_smem(st0_ref.at[g, cols, :], st_s, barriers.at[bar_state])
        plgpu.barrier_wait(barriers.at[bar_params])
        plgpu.barrier_wait(barriers.at[bar_state])
        slope = params_s[0]
        seq_len = params_s[1].astype(jnp.int32)  # real rows of this group's sequence
        rows = iota((block,), 0, layout=mgpu.ROW_LAYOUTS[0])
        dec_s[...] = jnp.exp(-slope * (rows + 1).astype(jnp.float32))
        if not state_only:
            r = iota((block, block), 0)
            q = iota((block, block), 1)
            gap = (q - r) if reverse else (r - q)
            mask_s[...] = jnp.where(
                gap >= 0, jnp.exp(-slope * jnp.maximum(gap, 0).astype(jnp.float32)), 0.0
            )
        plgpu.commit_smem()

        def load_chunk(step, i, slot: int):
            """TMA copies of chunk i (traced) of block `step`'s X, Y and Y^T tiles."""
            c = num_blocks - 1 - step if reverse else step
            rows, chunk = pl.ds(c * block, block), pl.ds(i * CHUNK, CHUNK)
            bar = bar_chunks + 3 * slot
            if not state_only:
                plgpu.copy_gmem_to_smem(x_ref.at[g, rows, chunk], x_s.at[slot], barriers.at[bar])
                plgpu.copy_gmem_to_smem(
                    y_ref.at[g, rows, chunk], y_s.at[slot], barriers.at[bar + 1]
                )
            plgpu.copy_gmem_to_smem(yt_ref.at[g, chunk, rows], yt_s.at[slot], barriers.at[bar + 2])

        def wait_chunk(slot: int):
            bar = bar_chunks + 3 * slot
            if not state_only:
                plgpu.barrier_wait(barriers.at[bar])
                plgpu.barrier_wait(barriers.at[bar + 1])
            plgpu.barrier_wait(barriers.at[bar + 2])

        if slots == 2:
            load_chunk(0, 0, 0)

        def body(step, carry):
            c = num_blocks - 1 - step if reverse else step
            rows = pl.ds(c * block, block)
            # The previous block's wgmmas are done (their accumulators were read).
            plgpu.copy_gmem_to_smem(zt_ref.at[g, cols, rows], zt_s, barriers.at[bar_zt])
            if segmented:
                plgpu.copy_gmem_to_smem(seg_ref.at[g, :, rows], seg_s, barriers.at[bar_seg])
            length = jnp.clip(seq_len - c * block, 0, block)  # real rows in this block

            def row_decays(dim):
                """[block] vectors laid out to broadcast along `dim` of a WGMMA tile:
                lambda^(i+1) (from the block's start) and lambda^(L-1-i) (to its end) for
                the block's row i, each cut at run boundaries. Vectors, not tiles: tiles of
                loop-invariant decays would be hoisted out of the loop into registers."""
                i = iota((block,), 0, layout=mgpu.ROW_LAYOUTS[dim])
                # Read from shared memory: computed here, it would be hoisted out of the loop
                # and held in registers, broadcast, across it (ptxas spills).
                first = counts_along(dec_s, dim)
                last = jnp.exp(-slope * jnp.maximum(length - 1 - i, 0).astype(jnp.float32))
                if segmented:
                    # The block-start state reaches only rows of the block's first run, and
                    # only rows of its last run reach the block-end state (docs/design.md).
                    start, end = seg_s[1, 0], seg_s[0, block - 1]
                    counts = counts_along(seg_s.at[0], dim)
                    first = jnp.where(counts == start, first, 0.0)
                    last = jnp.where(counts == end, last, 0.0)
                return first, last

            if segmented:
                plgpu.barrier_wait(barriers.at[bar_seg])
            state_dec = jnp.exp(-slope * length.astype(jnp.float32))
            if segmented:  # the state passes only through a block continuing one run
                state_dec = jnp.where(seg_s[1, 0] == seg_s[0, block - 1], state_dec, 0.0)
            # Zs^T [T, C]: Z^T with each block row (a column here) decayed to the state.
            first, last = row_decays(1)
            upd_dec = lax.broadcast_in_dim(first if reverse else last, (tile, block), [1])
            plgpu.barrier_wait(barriers.at[bar_zt])
            zs_s[...] = zt_s[...] * upd_dec
            plgpu.commit_smem()

            def chunk_step(i, slot: int, acc_scores=None, acc_inter=None):
                """Chunk i (traced) of the width, in buffer `slot`: scores and inter from the
                old state's chunk, then that chunk of the state updated."""
                chunk = pl.ds(pl.multiple_of(i * CHUNK, CHUNK), CHUNK)
                if slots == 1:
                    load_chunk(step, i, 0)
                wait_chunk(slot)
                if slot == 0 and slots == 2:  # prefetch chunk i + 1 (num_chunks is even)
                    load_chunk(step, i + 1, 1)
                elif slot == 1:  # prefetch chunk i + 1, or the next block's first

                    @pl.when(i + 1 < num_chunks)
                    def _():
                        load_chunk(step, i + 1, 0)

                    @pl.when((i + 1 == num_chunks) & (step + 1 < num_blocks))
                    def _():
                        load_chunk(step + 1, 0, 0)

                if not state_only:
                    plgpu.wgmma(acc_scores, x_s.at[slot], b_op(y_s.at[slot], scratch[0]))
                    plgpu.wgmma(acc_inter, x_s.at[slot], b_op(st_s.at[:, chunk], scratch[1]))

                def update_mm(acc):
                    plgpu.wgmma(acc, zs_s, b_op(yt_s.at[slot], scratch[2]))
                    return acc[...]  # waits for every wgmma in flight (inter's read of S^T)

                update = pl.run_scoped(update_mm, plgpu.ACC((tile, CHUNK), jnp.float32))
                st_s[:, chunk] = state_dec * st_s[:, chunk] + update
                plgpu.commit_smem()

            def width_loop(*accs):
                """Every chunk of the width, `slots` at a time (a loop: unrolled, ptxas spills)."""

                def chunk_group(j, carry):
                    for slot in range(slots):
                        chunk_step(j * slots + slot, slot, *accs)
                    return carry

                lax.fori_loop(0, num_chunks // slots, chunk_group, None)
                return tuple(acc[...] for acc in accs)

            if state_only:
                width_loop()
                return carry

            scores, inter = pl.run_scoped(
                width_loop,
                plgpu.ACC((block, block), jnp.float32),
                plgpu.ACC((block, tile), jnp.float32),
            )
            mask = mask_s[...]
            if segmented:  # rows i, j interact only within one run (equal counts)
                shape = (block, block)
                same_run = counts_along(seg_s.at[0], 0, shape) == counts_along(
                    seg_s.at[0], 1, shape
                )
                mask = jnp.where(same_run, mask, 0.0)
            p_s[...] = scores * mask
            plgpu.commit_smem()

            def intra_mm(acc):
                plgpu.wgmma(acc, p_s, b_op(zt_s, scratch[3]))
                return acc[...]

            intra = pl.run_scoped(intra_mm, plgpu.ACC((block, tile), jnp.float32))
            first, last = row_decays(0)
            out_dec = lax.broadcast_in_dim(last if reverse else first, (block, tile), [0])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # o_s is free again
            o_s[...] = intra + out_dec * inter
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_s, out_ref.at[g, rows, cols])
            return carry

        lax.fori_loop(0, num_blocks, body, None)
        plgpu.copy_smem_to_gmem(st_s, st_ref.at[g, cols, :])
        plgpu.wait_smem_to_gmem(0)

    smem = mgpu.smem_tile
    # Interpreted, the B operands' transposes: Y chunk, S^T chunk, Y^T chunk, Z^T.
    scratch = (
        [
            smem((CHUNK, block), jnp.float32),
            smem((CHUNK, tile), jnp.float32),
            smem((block, CHUNK), jnp.float32),
            smem((block, tile), jnp.float32),
        ]
        if interpret
        else [None] * 4
    )
    pl.run_scoped(
        scoped,
        None if state_only else smem((slots, block, CHUNK), jnp.float32),  # x_s
        None if state_only else smem((slots, block, CHUNK), jnp.float32),  # y_s
        smem((slots, CHUNK, block), jnp.float32),  # yt_s
        smem((tile, block), jnp.float32),  # zt_s: Z^T
        smem((tile, block), jnp.float32),  # zs_s: decayed Z^T
        smem((tile, width), jnp.float32),  # st_s: the state S^T
        None if state_only else smem((block, block), jnp.float32),  # p_s: masked scores
        None if state_only else smem((block, tile), jnp.float32),  # o_s: output staging
        None if state_only else smem((block, block), jnp.float32),  # mask_s: decay mask
        plgpu.SMEM((block,), jnp.float32),  # dec_s: lambda^(i+1) per row
        plgpu.SMEM((block,), jnp.float32),  # params_s
        plgpu.SMEM((mgpu.SEGMENT_ROWS, block), jnp.int32) if segmented else None,  # seg_s
        scratch,
        plgpu.Barrier(num_barriers=bar_chunks + 3 * slots),
    )


def sweep(params, x, y, z, state0, *, block, reverse, interpret, seg=None):
    """`mosaic_gpu._sweep` for float32 operands (same arguments and results).

    Transposes Y and Z for the kernel (module docstring), and the state in and out.
    """
    groups, _, width = y.shape
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
    state_type = jax.ShapeDtypeStruct((groups, z_cols, width), jnp.float32)
    out_type = (state_type,) if state_only else (jax.ShapeDtypeStruct(z.shape, z.dtype), state_type)
    name = "lightning_states_f32" if state_only else "lightning_sweep_f32"
    operands = (y, mgpu.transpose(y), mgpu.transpose(z), mgpu.transpose(state0))
    outs = plgpu.kernel(
        kernel,
        out_type=out_type,
        grid=(groups, z_cols // mgpu.TILE),
        grid_names=("g", "t"),
        interpret=mgpu.interpret_params() if interpret else False,
        kernel_name=name + ("_reverse" if reverse else ""),
    )(
        params,
        *(operands[1:] if state_only else (x, *operands)),
        *(() if seg is None else (seg,)),
    )
    final = mgpu.transpose(outs[-1])
    return (None, final) if state_only else (outs[0], final)
