"""Lightning Attention-2 in Pallas with the Triton lowering (NVIDIA and AMD GPUs).

Forward: one program per ((batch, head), e-tile) walks the blocks of the
sequence in order: the masked intra-block product, the inter-block product with
the carried state, and the state update, the state living in float32 registers;
no per-block state is written to HBM.

Backward (Algorithm 2), two kernels, both recomputing states rather than
storing them:
  - dQ: one program per ((batch, head), d-tile) sweeps forward, rebuilding the
    d-tile of KV as it goes;
  - dK, dV: one program per ((batch, head), e-tile) sweeps backward carrying
    dKV; each e-tile contributes a partial dK that the wrapper sums.

Block conventions (DESIGN.md section 2), block c with L real rows (L = block
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
    unpad,
)

DEFAULT_BLOCK = 64
MIN_DIM = 16  # tl.dot needs every matmul dimension >= 16
TILE = 64  # d / e tile of the state kept in registers


def _dot(a: jax.Array, b: jax.Array, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """a @ b with float32 accumulation; full float32 precision for float32 operands."""
    if a.dtype != b.dtype:
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    dims = (((0,) if trans_a else (1,), (1,) if trans_b else (0,)), ((), ()))
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


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


def _forward_kernel(slopes_ref, q_ref, k_ref, v_ref, s0_ref, o_ref, state_ref, *, block, seq_len):
    slope = slopes_ref[0]
    in_dtype = q_ref.dtype

    def body(c, kv):
        rows = pl.ds(c * block, block)
        q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
        q_dec, k_dec, mask, state_dec = _block_decays(slope, c * block, block, seq_len)
        scores = _dot(q, k, trans_b=True) * mask
        o = _dot(scores.astype(in_dtype), v)
        o += q_dec[:, None] * _dot(q, kv.astype(in_dtype))
        o_ref[rows, :] = o.astype(o_ref.dtype)
        k_scaled = (k.astype(jnp.float32) * k_dec[:, None]).astype(in_dtype)
        return state_dec * kv + _dot(k_scaled, v, trans_a=True)

    kv = lax.fori_loop(0, q_ref.shape[0] // block, body, s0_ref[...])
    state_ref[...] = kv


def _dq_kernel(slopes_ref, k_ref, v_ref, do_ref, s0_ref, dq_ref, *, block, seq_len):
    """dQ for one d-tile: dQ = ((dO V^T) * M) K + lambda^(i+1) dO KV^T, KV swept forward."""
    slope = slopes_ref[0]
    in_dtype = k_ref.dtype

    def body(c, kv):
        rows = pl.ds(c * block, block)
        k, v, do = k_ref[rows, :], v_ref[rows, :], do_ref[rows, :]
        q_dec, k_dec, mask, state_dec = _block_decays(slope, c * block, block, seq_len)
        dscores = _dot(do, v, trans_b=True) * mask
        dq = _dot(dscores.astype(in_dtype), k)
        dq += q_dec[:, None] * _dot(do, kv.astype(in_dtype), trans_b=True)
        dq_ref[rows, :] = dq.astype(dq_ref.dtype)
        k_scaled = (k.astype(jnp.float32) * k_dec[:, None]).astype(in_dtype)
        return state_dec * kv + _dot(k_scaled, v, trans_a=True)

    lax.fori_loop(0, k_ref.shape[0] // block, body, s0_ref[...])


def _dkdv_kernel(
    slopes_ref, q_ref, k_ref, v_ref, do_ref, dstate_ref, dk_ref, dv_ref, ds0_ref, *, block, seq_len
):
    """dK (partial over this e-tile) and dV for one e-tile, dKV swept backward."""
    slope = slopes_ref[0]
    in_dtype = q_ref.dtype
    num_blocks = q_ref.shape[0] // block

    def body(step, dkv):
        c = num_blocks - 1 - step
        rows = pl.ds(c * block, block)
        q, k, v, do = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], do_ref[rows, :]
        q_dec, k_dec, mask, state_dec = _block_decays(slope, c * block, block, seq_len)
        scores = _dot(q, k, trans_b=True) * mask  # [query, key]
        dscores = _dot(do, v, trans_b=True) * mask
        k_scaled = (k.astype(jnp.float32) * k_dec[:, None]).astype(in_dtype)
        dkv_in = dkv.astype(in_dtype)
        dv = _dot(scores.astype(in_dtype), do, trans_a=True) + _dot(k_scaled, dkv_in)
        dk = _dot(dscores.astype(in_dtype), q, trans_a=True)
        dk += k_dec[:, None] * _dot(v, dkv_in, trans_b=True)
        dk_ref[rows, :] = dk.astype(dk_ref.dtype)
        dv_ref[rows, :] = dv.astype(dv_ref.dtype)
        q_scaled = (q.astype(jnp.float32) * q_dec[:, None]).astype(in_dtype)
        return state_dec * dkv + _dot(q_scaled, do, trans_a=True)

    ds0_ref[...] = lax.fori_loop(0, num_blocks, body, dstate_ref[...])


def _compiler_params(width: int):
    return plgpu.CompilerParams(num_warps=4 if width <= 64 else 8, num_stages=2)


def _seq_spec(cols: int, tiled: bool):
    """All rows of one (batch, head); columns either whole or the program's tile."""
    if tiled:
        return pl.BlockSpec((None, None, cols), lambda g, t: (g, 0, t))
    return pl.BlockSpec((None, None, cols), lambda g, t: (g, 0, 0))


def _forward(q, k, v, slopes, s0, block, seq_len, interpret):
    groups, rows, d = q.shape
    e = v.shape[-1]
    te = min(e, TILE)
    return pallas_call(
        functools.partial(_forward_kernel, block=block, seq_len=seq_len),
        grid=(groups, e // te),
        in_specs=[
            pl.BlockSpec((1,), lambda g, t: (g,)),
            pl.BlockSpec((None, rows, d), lambda g, t: (g, 0, 0)),
            pl.BlockSpec((None, rows, d), lambda g, t: (g, 0, 0)),
            pl.BlockSpec((None, rows, te), lambda g, t: (g, 0, t)),
            pl.BlockSpec((None, d, te), lambda g, t: (g, 0, t)),
        ],
        out_specs=[
            pl.BlockSpec((None, rows, te), lambda g, t: (g, 0, t)),
            pl.BlockSpec((None, d, te), lambda g, t: (g, 0, t)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((groups, rows, e), q.dtype),
            jax.ShapeDtypeStruct((groups, d, e), jnp.float32),
        ],
        compiler_params=_compiler_params(max(d, te)),
        interpret=interpret,
        name="lightning_forward",
    )(slopes, q, k, v, s0)


def _backward(q, k, v, slopes, s0, do, dstate, block, seq_len, interpret):
    groups, rows, d = q.shape
    e = v.shape[-1]
    td, te = min(d, TILE), min(e, TILE)
    dq = pallas_call(
        functools.partial(_dq_kernel, block=block, seq_len=seq_len),
        grid=(groups, d // td),
        in_specs=[
            pl.BlockSpec((1,), lambda g, t: (g,)),
            pl.BlockSpec((None, rows, td), lambda g, t: (g, 0, t)),
            pl.BlockSpec((None, rows, e), lambda g, t: (g, 0, 0)),
            pl.BlockSpec((None, rows, e), lambda g, t: (g, 0, 0)),
            pl.BlockSpec((None, td, e), lambda g, t: (g, t, 0)),
        ],
        out_specs=pl.BlockSpec((None, rows, td), lambda g, t: (g, 0, t)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(max(td, e)),
        interpret=interpret,
        name="lightning_dq",
    )(slopes, k, v, do, s0)
    e_tiles = e // te
    dk_partial, dv, ds0 = pallas_call(
        functools.partial(_dkdv_kernel, block=block, seq_len=seq_len),
        grid=(groups, e_tiles),
        in_specs=[
            pl.BlockSpec((1,), lambda g, t: (g,)),
            pl.BlockSpec((None, rows, d), lambda g, t: (g, 0, 0)),
            pl.BlockSpec((None, rows, d), lambda g, t: (g, 0, 0)),
            pl.BlockSpec((None, rows, te), lambda g, t: (g, 0, t)),
            pl.BlockSpec((None, rows, te), lambda g, t: (g, 0, t)),
            pl.BlockSpec((None, d, te), lambda g, t: (g, 0, t)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, rows, d), lambda g, t: (t, g, 0, 0)),
            pl.BlockSpec((None, rows, te), lambda g, t: (g, 0, t)),
            pl.BlockSpec((None, d, te), lambda g, t: (g, 0, t)),
        ],
        out_shape=[
            # dK in float32 when e is tiled: the tiles' partial sums are added here.
            jax.ShapeDtypeStruct(
                (e_tiles, groups, rows, d), k.dtype if e_tiles == 1 else jnp.float32
            ),
            jax.ShapeDtypeStruct(v.shape, v.dtype),
            jax.ShapeDtypeStruct(s0.shape, jnp.float32),
        ],
        compiler_params=_compiler_params(max(d, te)),
        interpret=interpret,
        name="lightning_dkdv",
    )(slopes, q, k, v, do, dstate)
    dk = dk_partial[0] if e_tiles == 1 else jnp.sum(dk_partial, axis=0).astype(k.dtype)
    return dq, dk, dv, ds0


_lightning = kernel_op(_forward, _backward)


def _padded_dim(x: int) -> int:
    """A power of two >= 16: Triton tensors have power-of-two shapes (zero padding is exact)."""
    return max(MIN_DIM, next_power_of_2(x))


@functools.partial(jax.jit, static_argnames=("block_size", "interpret"))
def lightning_attention_triton(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slopes: jax.Array,
    initial_state: jax.Array,
    *,
    block_size: int | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Pallas/Triton Lightning Attention-2 on checked inputs; returns (o, final_state).

    Args:
      q, k: `[B, H, T, D]`; v: `[B, H, T, E]` (float32, bfloat16 or float16).
      slopes: float32 `[H]`.
      initial_state: `[B, H, D, E]`, used in float32.
      block_size: rows per block, a power of two >= 16 (default 64; smaller
        when T is short).
      interpret: run the kernels in the Pallas interpreter (any backend).

    Returns:
      o `[B, H, T, E]` in q's dtype and the final state `[B, H, D, E]` float32.
    """
    batch, heads, n, d = q.shape
    e = v.shape[-1]
    block = block_size or min(DEFAULT_BLOCK, max(MIN_DIM, next_power_of_2(n)))
    if block < MIN_DIM or block & (block - 1):
        raise ValueError(
            f"block_size must be a power of two >= {MIN_DIM} for the Triton kernel, got {block}"
        )
    dtype = q.dtype
    k, v = k.astype(dtype), v.astype(dtype)
    padded = flatten_and_pad(
        q, k, v, slopes, initial_state, round_up(n, block), _padded_dim(d), _padded_dim(e)
    )
    o, state = _lightning(*padded, block, n, interpret)
    return unpad(o, state, batch, heads, n, d, e)
