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

precision="highest" (`split`): every product a @ b becomes three TF32 products of
the operands' heads and rests (`tf32_split`: a = a_head + a_rest exactly),
a_head @ b_head + a_head @ b_rest + a_rest @ b_head, accurate to about 2^-22
relative instead of TF32's 2^-11. XLA splits X, Y, Y^T and Z^T; the kernel splits
what it computes (decayed Z^T, P, each S^T chunk as it is used). Every operand
tile is then twice the bytes, so that sweep has one chunk buffer, its decayed
Z^T overwrites Z^T (reloaded by TMA for P Z), the output is staged in P's head,
S^T's chunk splits go to P's tiles (free during the width loop) and inter is
summed in shared memory (a third register accumulator with the split's operands
made ptxas spill): 208 KB of shared memory at d = 256, under Hopper's 227 KB.

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

from pallas_kernels import _mosaic_gpu_common as mgpu

CHUNK = 32  # columns of the width per wgmma: one 128-byte swizzle row of float32
F32 = 4  # bytes
SMEM_LIMIT = 227 * 1024  # Hopper's shared memory per block (Mosaic GPU: 232448 bytes)
HEAD_MASK = -(1 << 13)  # 0xFFFFE000: float32 bits a TF32 number keeps (19 of 32)


def smem_bytes(
    block: int, width: int, slots: int, state_only: bool, segmented: bool, split: bool = False
) -> int:
    """Shared memory of one program (bytes): chunk buffers, Z^T, decayed Z^T, S^T, and
    (unless state only) P, the decay mask and the output staging tile. `split`
    (precision="highest"): every operand tile twice (TF32 head and rest), Z^T and its
    decayed copy in one buffer, the output staged in P's head, and a tile for inter."""
    tile, parts = mgpu.TILE, 2 if split else 1
    per_slot = parts * ((0 if state_only else 2 * block * CHUNK) + CHUNK * block) * F32
    fixed = (1 if split else 2) * parts * tile * block * F32 + tile * width * F32
    if not state_only:
        fixed += (parts + 1) * block * block * F32  # P, the mask
        fixed += block * tile * F32  # the output staging tile (split: inter's)
    fixed += block * F32 + (mgpu.SEGMENT_ROWS * block * 4 if segmented else 0)
    return fixed + slots * per_slot


def chunk_slots(block: int, width: int, state_only: bool, segmented: bool, split: bool = False):
    """2 (prefetch the next chunk while this one computes) when shared memory allows, else 1."""
    fits = smem_bytes(block, width, 2, state_only, segmented, split) <= mgpu.SMEM_BUDGET
    return 2 if fits else 1


def tf32_split(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x = head + rest exactly: head keeps x's top 19 bits (a TF32 number), rest the others.

    a_head @ b_head + a_head @ b_rest + a_rest @ b_head (3 TF32 products) is a @ b to
    about 2^-22 relative: the 3-pass scheme behind precision="highest" (the rests' own
    TF32 rounding and the dropped a_rest @ b_rest are both of that order).
    """
    bits = lax.bitcast_convert_type(x, jnp.int32) & HEAD_MASK
    head = lax.bitcast_convert_type(bits, jnp.float32)
    return head, x - head


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
    *refs,
    block: int,
    reverse: bool,
    state_only: bool,
    interpret: bool,
    segmented: bool,
    split: bool,
):
    """One program: group g, Z-column tile t; walks every block of its sequence.

    refs: params [G, block] f32 (slope, real length), X [G, N, A] and Y [G, N, A]
    (both absent when state_only), Yt [G, A, N], Zt [G, Zc, N] (each as its TF32
    head and rest, two refs, when `split`), St0 [G, Zc, A], segment table
    [G, 2, N] int32 (only when segmented); outputs: out [G, N, Zc] (absent when
    state_only), final St [G, Zc, A]. All float32 but the table.
    """
    parts = 2 if split else 1
    names = ("yt", "zt") if state_only else ("x", "y", "yt", "zt")
    num_inputs = 2 + parts * len(names) + segmented
    inputs, outputs = refs[:num_inputs], refs[num_inputs:]
    params_ref, st0_ref = inputs[0], inputs[1 + parts * len(names)]
    seg_ref = inputs[-1] if segmented else None
    operand = {n: inputs[1 + parts * i : 1 + parts * (i + 1)] for i, n in enumerate(names)}
    out_ref, st_ref = (None, *outputs) if state_only else outputs
    tile = mgpu.TILE
    width = operand["yt"][0].shape[1]  # A: the state's (untransposed) rows
    num_blocks = operand["zt"][0].shape[-1] // block
    num_chunks = width // CHUNK  # even: width is a multiple of 64
    g = lax.axis_index("g")
    cols = pl.ds(lax.axis_index("t") * tile, tile)
    slots = chunk_slots(block, width, state_only, segmented, split)
    iota = functools.partial(mgpu.layout_iota, interpret=interpret)
    counts_along = functools.partial(mgpu.run_counts, interpret=interpret)
    # Barriers: params, state, segment table, Z^T's parts; then X, Y, Y^T's parts per slot.
    bar_params, bar_state, bar_seg, bar_zt = 0, 1, 2, 3
    bar_chunks = bar_zt + parts
    # The products: head @ head (+ head @ rest + rest @ head when split).
    terms = ((0, 0), (0, 1), (1, 0)) if split else ((0, 0),)

    def scoped(*scratch_refs):
        (x_s, y_s, yt_s, zt_s, zs_s, st_s, inter_s, p_s, o_s, mask_s, dec_s, params_s, seg_s,
         scratch, barriers) = scratch_refs  # fmt: skip
        zs_s = zt_s if zs_s is None else zs_s  # split: decayed Z^T over Z^T

        def mm(acc, a, b, b_scratch):
            """acc += A @ B from their parts (lists of refs): a's stored [M, K], b's [N, K]."""
            for i, j in terms:
                b_view = _b_operand(b[j], b_scratch.at[j] if interpret else None, interpret)
                plgpu.wgmma(acc, a[i], b_view)

        def split_store(ref, value):
            """value into ref [parts, ...]: as it is, or its TF32 head and rest."""
            for part, x in enumerate(tf32_split(value) if split else (value,)):
                ref.at[part][...] = x

        def parts_of(ref):
            return [ref.at[part] for part in range(parts)]

        plgpu.copy_gmem_to_smem(params_ref.at[g], params_s, barriers.at[bar_params])
        plgpu.copy_gmem_to_smem(st0_ref.at[g, cols, :], st_s, barriers.at[bar_state])
        plgpu.barrier_wait(barriers.at[bar_params])
        plgpu.barrier_wait(barriers.at[bar_state])
        slope = params_s[0]
        seq_len = params_s[1].astype(jnp.int32)  # real rows of this group's sequence
        rows = iota((block,), 0, layout=mgpu.ROW_LAYOUTS[0])
        dec_s[...] = jnp.exp(-slope * (rows + 1).astype(jnp.float32))
        if not state_only:
            mask_s[...] = mgpu.decay_mask(slope, block, reverse, interpret=interpret)
        plgpu.commit_smem()

        def block_rows(step):
            return pl.ds((num_blocks - 1 - step if reverse else step) * block, block)

        def load_chunk(step, i, slot: int):
            """TMA copies of chunk i (traced) of block `step`'s X, Y and Y^T tiles."""
            rows, chunk = block_rows(step), pl.ds(i * CHUNK, CHUNK)
            bar = bar_chunks + 3 * parts * slot
            for part in range(parts):
                if not state_only:
                    plgpu.copy_gmem_to_smem(
                        operand["x"][part].at[g, rows, chunk],
                        x_s.at[slot, part],
                        barriers.at[bar + part],
                    )
                    plgpu.copy_gmem_to_smem(
                        operand["y"][part].at[g, rows, chunk],
                        y_s.at[slot, part],
                        barriers.at[bar + parts + part],
                    )
                plgpu.copy_gmem_to_smem(
                    operand["yt"][part].at[g, chunk, rows],
                    yt_s.at[slot, part],
                    barriers.at[bar + 2 * parts + part],
                )

        def wait_chunk(slot: int):
            bar = bar_chunks + 3 * parts * slot
            for k in range(2 * parts if state_only else 0, 3 * parts):  # (X, Y,) Y^T parts
                plgpu.barrier_wait(barriers.at[bar + k])

        def load_z(step):
            for part in range(parts):
                plgpu.copy_gmem_to_smem(
                    operand["zt"][part].at[g, cols, block_rows(step)],
                    zt_s.at[part],
                    barriers.at[bar_zt + part],
                )

        def wait_z():
            for part in range(parts):
                plgpu.barrier_wait(barriers.at[bar_zt + part])

        if slots == 2:
            load_chunk(0, 0, 0)

        def body(step, carry):
            c = num_blocks - 1 - step if reverse else step
            rows = block_rows(step)
            # The previous block's wgmmas are done (their accumulators were read).
            load_z(step)
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
            wait_z()
            z_t = zt_s.at[0][...]
            if split:
                z_t = z_t + zt_s.at[1][...]  # head + rest: exact
            split_store(zs_s, z_t * upd_dec)  # split: over Z^T (reloaded for P Z)
            if split and not state_only:
                # P's tiles hold the state's chunks in the width loop (and P's head stages the
                # output: its store must be done); inter accumulates in inter_s.
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                zeros = jnp.zeros((block, tile), jnp.float32)
                inter_s[...] = zeros if interpret else plgpu.layout_cast(zeros, plgpu.Layout.WGMMA)
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
                    if split:  # the old state's chunk as head and rest, in P's free tile
                        state_parts = [p_s.at[0, :, pl.ds(part * CHUNK, CHUNK)] for part in (0, 1)]
                        for part, x in zip(state_parts, tf32_split(st_s[:, chunk])):
                            part[...] = x
                        plgpu.commit_smem()
                    else:
                        state_parts = [st_s.at[:, chunk]]
                    x_parts = parts_of(x_s.at[slot])
                    mm(acc_scores, x_parts, parts_of(y_s.at[slot]), scratch[0])
                    if split:
                        # inter accumulates in shared memory: a third accumulator held across
                        # the loop with the split's extra operands made ptxas spill.
                        def inter_mm(acc):
                            mm(acc, x_parts, state_parts, scratch[1])
                            return acc[...]

                        inter_c = pl.run_scoped(inter_mm, plgpu.ACC((block, tile), jnp.float32))
                        inter_s[...] = inter_s[...] + inter_c
                    else:
                        mm(acc_inter, x_parts, state_parts, scratch[1])

                def update_mm(acc):
                    mm(acc, parts_of(zs_s), parts_of(yt_s.at[slot]), scratch[2])
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

            accs = [plgpu.ACC((block, block), jnp.float32)]  # scores (, inter)
            accs += [] if split else [plgpu.ACC((block, tile), jnp.float32)]
            scores, *inter = pl.run_scoped(width_loop, *accs)
            if split:  # Z^T again, over its decayed copy (no wgmma reads that any more)
                load_z(step)
            mask = mask_s[...]
            if segmented:
                mask = mgpu.cut_at_runs(mask, seg_s.at[0], interpret=interpret)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the output staging tile is free
            split_store(p_s, scores * mask)
            plgpu.commit_smem()
            if split:
                wait_z()

            def intra_mm(acc):
                mm(acc, parts_of(p_s), parts_of(zt_s), scratch[3])
                return acc[...]

            intra = pl.run_scoped(intra_mm, plgpu.ACC((block, tile), jnp.float32))
            first, last = row_decays(0)
            out_dec = lax.broadcast_in_dim(last if reverse else first, (block, tile), [0])
            out_s = p_s.at[0] if split else o_s  # split: staged in P's head (P is used)
            inter = inter_s[...] if split else inter[0]
            out_s[...] = intra + out_dec * inter
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_s, out_ref.at[g, rows, cols])
            return carry

        lax.fori_loop(0, num_blocks, body, None)
        plgpu.copy_smem_to_gmem(st_s, st_ref.at[g, cols, :])
        plgpu.wait_smem_to_gmem(0)

    def smem(*shape):
        return mgpu.smem_tile(shape, jnp.float32)

    # Interpreted, the B operands' transposes: Y chunk, S^T chunk, Y^T chunk, Z^T.
    scratch = [
        smem(parts, CHUNK, block) if interpret else None,
        smem(parts, CHUNK, tile) if interpret else None,
        smem(parts, block, CHUNK) if interpret else None,
        smem(parts, block, tile) if interpret else None,
    ]
    full = not state_only
    zt_s = smem(parts, tile, block)  # Z^T
    pl.run_scoped(
        scoped,
        smem(slots, parts, block, CHUNK) if full else None,  # x_s
        smem(slots, parts, block, CHUNK) if full else None,  # y_s
        smem(slots, parts, CHUNK, block),  # yt_s
        zt_s,
        None if split else smem(parts, tile, block),  # zs_s: decayed Z^T (split: in zt_s)
        smem(tile, width),  # st_s: the state S^T
        smem(block, tile) if full and split else None,  # inter_s: inter, split
        smem(parts, block, block) if full else None,  # p_s: masked scores
        smem(block, tile) if full and not split else None,  # o_s: output staging
        smem(block, block) if full else None,  # mask_s: decay mask
        plgpu.SMEM((block,), jnp.float32),  # dec_s: lambda^(i+1) per row
        plgpu.SMEM((block,), jnp.float32),  # params_s
        plgpu.SMEM((mgpu.SEGMENT_ROWS, block), jnp.int32) if segmented else None,  # seg_s
        scratch,
        plgpu.Barrier(num_barriers=bar_chunks + 3 * parts * slots),
    )


def sweep(params, x, y, z, state0, *, block, reverse, interpret, seg=None, split=False):
    """`mosaic_gpu._sweep` for float32 operands (same arguments and results); `split`:
    the 3-pass TF32 products of precision="highest".

    Transposes Y and Z for the kernel (module docstring), and the state in and out.
    """
    groups, _, width = y.shape
    z_cols = z.shape[-1]
    state_only = x is None
    if split and smem_bytes(block, width, 1, state_only, seg is not None, True) > SMEM_LIMIT:
        raise ValueError(f"the split-TF32 sweep does not fit in shared memory at width {width}")
    kernel = functools.partial(
        _sweep_kernel,
        block=block,
        reverse=reverse,
        state_only=state_only,
        interpret=bool(interpret),
        segmented=seg is not None,
        split=split,
    )
    state_type = jax.ShapeDtypeStruct((groups, z_cols, width), jnp.float32)
    out_type = (state_type,) if state_only else (jax.ShapeDtypeStruct(z.shape, z.dtype), state_type)
    name = "lightning_states_f32" if state_only else "lightning_sweep_f32"
    operands = [mgpu.transpose(y), mgpu.transpose(z)]
    operands = operands if state_only else [x, y, *operands]
    if split:
        operands = [part for a in operands for part in tf32_split(a)]
    outs = plgpu.kernel(
        kernel,
        out_type=out_type,
        grid=(groups, z_cols // mgpu.TILE),
        grid_names=("g", "t"),
        interpret=mgpu.interpret_params() if interpret else False,
        kernel_name=name + ("_split" if split else "") + ("_reverse" if reverse else ""),
    )(params, *operands, mgpu.transpose(state0), *(() if seg is None else (seg,)))
    final = mgpu.transpose(outs[-1])
    return (None, final) if state_only else (outs[0], final)
