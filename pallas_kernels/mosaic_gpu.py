"""Lightning Attention-2 in Pallas on Mosaic GPU (Hopper and later: wgmma, TMA).

One kernel, `_sweep`, walks the blocks of one (batch, head) in order (or in
reverse) carrying a float32 state tile in registers, and serves the forward
pass and all three gradients (Algorithm 2 of DESIGN.md section 3). For
block c with rows r, a state tile `state` [A, W] and the block's real length L:

    scores = X_c @ Yt_c                   [C, C], times the decay mask
    out_c  = mask(scores) @ Z_c + out_decay[r] * (X_c @ state)
    state <- lambda^L * state + Yt_c @ (state_decay[r] * Z_c)

    pass      X    Yt     Z    state       direction  mask       out_decay  state_decay
    forward   Q    K^T    V    KV  [d, e]  forward    M          lambda^(i+1)  lambda^(L-1-j)
    dQ        dO   V^T    K    KV^T [e, d] forward    M          lambda^(i+1)  lambda^(L-1-j)
    dV        K    Q^T    dO   dKV [d, e]  reverse    M^T        lambda^(L-1-j) lambda^(i+1)
    dK        V    dO^T   Q    dKV^T[e, d] reverse    M^T        lambda^(L-1-j) lambda^(i+1)

(M[i, j] = lambda^(i-j) for i >= j.) The forward's final state is the op's
final state; the dV pass's final state is the gradient of the initial state.
Each pass writes its output once, in the input dtype: no partial sums.

Every wgmma operand is in its natural [M, K] / [K, N] layout in shared memory:
the transposed operands (K^T, V^T, Q^T, dO^T) are transposed by XLA in the
wrapper, because Mosaic GPU's interpreter (jax 0.10.2) cannot run
`plgpu.transpose_ref` operands. Float32 inputs: TF32 wgmma needs K-major
operands, which this layout does not give; they run in the interpreter (exact
float32) but `interpret=False` refuses them (see `lightning_attention_mosaic_gpu`).

One program per ((batch, head), 64-wide tile of Z's columns): the state tile
is [A, 64] float32 in registers (A = d or e padded to a multiple of 64, at
most 256), the sequence walk is sequential inside the program.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._common import round_up

DEFAULT_BLOCK = 64  # rows per block: wgmma's M granularity
MAX_BLOCK = 128
TILE = 64  # columns of Z (and of the state) per program
DIM_ALIGN = 64  # d and e are zero-padded to a multiple of this (exact)
MAX_DIM = 256  # wgmma N <= 256 and the state tile's registers
SWIZZLE_BYTES = 128
STATE_ROWS = 64  # rows of the state updated per wgmma


def interpret_params():
    """`InterpretGPUParams(detect_races=True)`: Mosaic GPU's CPU interpreter (private API).

    Raises:
      ImportError: naming the module when jax moved or removed it.
    """
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError as err:  # pragma: no cover - depends on the installed jax
        raise ImportError(
            "impl='mosaic_gpu' with interpret=True needs Mosaic GPU's interpreter, "
            "jax._src.pallas.mosaic_gpu.interpret.params.InterpretGPUParams (private; present "
            f"in jax 0.10.2); this jax ({jax.__version__}) does not have it"
        ) from err
    return InterpretGPUParams(detect_races=True)


def races_found() -> bool:
    """Whether the interpreter's race detector has seen a data race since the last reset."""
    from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races

    return bool(get_races().races_found)


def _smem(shape, dtype):
    """A shared-memory tile in the tiled, 128-byte-swizzled layout wgmma and TMA expect."""
    elems = SWIZZLE_BYTES // jnp.dtype(dtype).itemsize
    transforms = (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(SWIZZLE_BYTES))
    return plgpu.SMEM(shape, dtype, transforms=transforms)


def _sweep_kernel(
    slope_ref,
    x_ref,
    yt_ref,
    z_ref,
    state0_ref,
    out_ref,
    state_ref,
    *,
    block: int,
    seq_len: int,
    reverse: bool,
    interpret: bool,
):
    """One program: group g, Z-column tile t; walks every block of the sequence."""
    dtype = x_ref.dtype
    width = x_ref.shape[-1]  # A: the contraction width of X @ state
    num_blocks = x_ref.shape[1] // block
    g = lax.axis_index("g")
    cols = pl.ds(lax.axis_index("t") * TILE, TILE)
    state_chunks = [pl.ds(i, STATE_ROWS) for i in range(0, width, STATE_ROWS)]

    def iota(shape, dim):
        x = lax.broadcasted_iota(jnp.int32, shape, dim)
        # The compiler needs the register layout of an iota; the interpreter has no
        # layout_cast rule (jax 0.10.2), and needs none.
        return x if interpret else plgpu.layout_cast(x, plgpu.Layout.WGMMA)

    def scoped(x_s, yt_s, z_s, p_s, st_s, zs_s, o_s, f32_s, mask_s, dec_s, slope_s, barriers):
        plgpu.copy_gmem_to_smem(slope_ref.at[g], slope_s, barriers.at[0])
        plgpu.copy_gmem_to_smem(state0_ref.at[g, :, cols], f32_s, barriers.at[1])
        plgpu.barrier_wait(barriers.at[0])
        plgpu.barrier_wait(barriers.at[1])
        slope = slope_s[0]
        # The decays shared by every block live in shared memory: held in registers
        # across the loop they would crowd out the state (ptxas spills).
        r = iota((block, block), 0)
        q = iota((block, block), 1)
        gap = (q - r) if reverse else (r - q)
        mask_s[...] = jnp.where(
            gap >= 0, jnp.exp(-slope * jnp.maximum(gap, 0).astype(jnp.float32)), 0.0
        )
        dec_s[...] = jnp.exp(-slope * (iota((block, TILE), 0) + 1).astype(jnp.float32))
        for rs in state_chunks:
            st_s[rs] = f32_s[rs].astype(dtype)
        plgpu.commit_smem()

        def body(step, carry):
            c = num_blocks - 1 - step if reverse else step
            rows = pl.ds(c * block, block)
            plgpu.copy_gmem_to_smem(x_ref.at[g, rows, :], x_s, barriers.at[0])
            plgpu.copy_gmem_to_smem(yt_ref.at[g, :, rows], yt_s, barriers.at[1])
            plgpu.copy_gmem_to_smem(z_ref.at[g, rows, cols], z_s, barriers.at[2])
            length = jnp.clip(seq_len - c * block, 0, block)  # real rows in this block

            # lambda^(i+1) per row, and lambda^(L-1-j) in a block of L real rows.
            q_dec = dec_s[...]
            rows_left = jnp.maximum(length - 1 - iota((block, TILE), 0), 0)
            k_dec = jnp.exp(-slope * rows_left.astype(jnp.float32))
            out_dec, upd_dec = (k_dec, q_dec) if reverse else (q_dec, k_dec)
            state_dec = jnp.exp(-slope * length.astype(jnp.float32))

            plgpu.barrier_wait(barriers.at[0])
            plgpu.barrier_wait(barriers.at[1])

            def scores_mm(acc):
                plgpu.wgmma(acc, x_s, yt_s)
                return acc[...]

            scores = pl.run_scoped(scores_mm, plgpu.ACC((block, block), jnp.float32))
            p_s[...] = (scores * mask_s[...]).astype(dtype)
            plgpu.commit_smem()
            plgpu.barrier_wait(barriers.at[2])

            def out_mm(acc_intra, acc_inter):
                plgpu.wgmma(acc_intra, p_s, z_s)
                plgpu.wgmma(acc_inter, x_s, st_s)
                return acc_intra[...], acc_inter[...]

            intra, inter = pl.run_scoped(
                out_mm,
                plgpu.ACC((block, TILE), jnp.float32),
                plgpu.ACC((block, TILE), jnp.float32),
            )
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # o_s is free again
            o_s[...] = (intra + out_dec * inter).astype(dtype)
            zs_s[...] = (z_s[...].astype(jnp.float32) * upd_dec).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_s, out_ref.at[g, rows, cols])

            # The state lives in shared memory (float32, and in the input dtype as
            # the next block's wgmma operand), updated 64 rows at a time so that
            # d = 256 fits in registers.
            for rs in state_chunks:

                def state_mm(acc, rs=rs):
                    plgpu.wgmma(acc, yt_s.at[rs], zs_s)
                    return acc[...]

                update = pl.run_scoped(state_mm, plgpu.ACC((STATE_ROWS, TILE), jnp.float32))
                state = state_dec * f32_s[rs] + update
                f32_s[rs] = state
                st_s[rs] = state.astype(dtype)
            plgpu.commit_smem()
            return carry

        lax.fori_loop(0, num_blocks, body, None)
        plgpu.copy_smem_to_gmem(f32_s, state_ref.at[g, :, cols])
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(
        scoped,
        _smem((block, width), dtype),  # x_s
        _smem((width, block), dtype),  # yt_s
        _smem((block, TILE), dtype),  # z_s
        _smem((block, block), dtype),  # p_s: masked scores
        _smem((width, TILE), dtype),  # st_s: the state, as a wgmma operand
        _smem((block, TILE), dtype),  # zs_s: decayed Z
        _smem((block, TILE), dtype),  # o_s: output staging
        _smem((width, TILE), jnp.float32),  # f32_s: state in / out
        _smem((block, block), jnp.float32),  # mask_s: the decay mask
        _smem((block, TILE), jnp.float32),  # dec_s: lambda^(i+1) per row
        plgpu.SMEM((block,), jnp.float32),  # slope_s
        plgpu.Barrier(num_barriers=3),
    )


def _sweep(x, yt, z, slope_rows, state0, *, block, seq_len, reverse, interpret):
    """out [G, N, Z], final state [G, A, Z] float32 of one pass (module docstring)."""
    groups, _, width = x.shape
    z_cols = z.shape[-1]
    kernel = functools.partial(
        _sweep_kernel,
        block=block,
        seq_len=seq_len,
        reverse=reverse,
        interpret=bool(interpret),
    )
    return plgpu.kernel(
        kernel,
        out_type=(
            jax.ShapeDtypeStruct(z.shape, x.dtype),
            jax.ShapeDtypeStruct((groups, width, z_cols), jnp.float32),
        ),
        grid=(groups, z_cols // TILE),
        grid_names=("g", "t"),
        interpret=interpret_params() if interpret else False,
        kernel_name="lightning_sweep_reverse" if reverse else "lightning_sweep",
    )(slope_rows, x, yt, z, state0)
