"""Lightning Attention-2 in Pallas on Mosaic TPU.

Grid (batch * heads, blocks) with the block axis last and "arbitrary": the TPU
runs the grid in order, so the float32 state lives in a VMEM scratch buffer
across the blocks of one (batch, head), initialised with
`pl.when(program_id(1) == 0)`. Tiles follow the (8, 128) rule: d and e are
padded to multiples of 128 in the wrapper, blocks are 128 rows by default.

Backward (Algorithm 2), two kernels recomputing the states: dQ sweeps the
blocks forward rebuilding KV; dK, dV sweep them in reverse (the index maps read
block nb-1-c at step c) carrying dKV, whose value at the start is the gradient
of the initial state.

Block conventions (DESIGN.md section 2), block c with L real rows: q row i
decays by lambda^(i+1), key row j by lambda^(L-1-j), the state by lambda^L.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import flatten_and_pad, kernel_op, pallas_call, round_up, unpad

DEFAULT_BLOCK = 128
LANES = 128
SUBLANES = 8

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b
_NN = (((1,), (0,)), ((), ()))  # a @ b


def _dot(a: jax.Array, b: jax.Array, dims=_NN) -> jax.Array:
    """Matmul with float32 accumulation; full float32 precision for float32 operands."""
    if a.dtype != b.dtype:
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _decay(slope, exponent: jax.Array) -> jax.Array:
    return jnp.exp(-slope * exponent.astype(jnp.float32))


def _block_decays(slope, block_idx, block: int, seq_len: int, q_width: int, k_width: int, e: int):
    """Decays of block `block_idx` as 2-D tiles (TPU vectors are 2-D).

    Returns q [B, q_width] (lambda^(i+1) on row i), k [B, k_width]
    (lambda^(L-1-j) on row j), mask [B, B] (lambda^(i-j) for i >= j) and
    state [1, e] (lambda^L), L being the number of real rows of the block.
    """
    length = jnp.clip(seq_len - block_idx * block, 0, block)
    q_dec = _decay(slope, lax.broadcasted_iota(jnp.int32, (block, q_width), 0) + 1)
    k_rows = lax.broadcasted_iota(jnp.int32, (block, k_width), 0)
    k_dec = _decay(slope, jnp.maximum(length - 1 - k_rows, 0))
    row = lax.broadcasted_iota(jnp.int32, (block, block), 0)
    col = lax.broadcasted_iota(jnp.int32, (block, block), 1)
    mask = jnp.where(row >= col, _decay(slope, jnp.maximum(row - col, 0)), 0.0)
    state_dec = _decay(slope, jnp.full((1, e), length, jnp.int32))
    return q_dec, k_dec, mask, state_dec


def _forward_kernel(
    slopes_ref, q_ref, k_ref, v_ref, s0_ref, o_ref, state_ref, kv_ref, *, block, seq_len
):
    g, c = pl.program_id(0), pl.program_id(1)

    @pl.when(c == 0)
    def _():
        kv_ref[...] = s0_ref[...]

    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    in_dtype = q.dtype
    d, e = q.shape[-1], v.shape[-1]
    q_dec, k_dec, mask, state_dec = _block_decays(slopes_ref[g], c, block, seq_len, e, d, e)
    kv = kv_ref[...]
    scores = _dot(q, k, _NT) * mask
    o = _dot(scores.astype(in_dtype), v) + q_dec * _dot(q, kv.astype(in_dtype))
    o_ref[...] = o.astype(o_ref.dtype)
    k_scaled = (k.astype(jnp.float32) * k_dec).astype(in_dtype)
    kv_ref[...] = kv * state_dec + _dot(k_scaled, v, _TN)

    @pl.when(c == pl.num_programs(1) - 1)
    def _():
        state_ref[...] = kv_ref[...]


def _dq_kernel(slopes_ref, k_ref, v_ref, do_ref, s0_ref, dq_ref, kv_ref, *, block, seq_len):
    g, c = pl.program_id(0), pl.program_id(1)

    @pl.when(c == 0)
    def _():
        kv_ref[...] = s0_ref[...]

    k, v, do = k_ref[...], v_ref[...], do_ref[...]
    in_dtype = k.dtype
    d, e = k.shape[-1], v.shape[-1]
    q_dec, k_dec, mask, state_dec = _block_decays(slopes_ref[g], c, block, seq_len, d, d, e)
    kv = kv_ref[...]
    dscores = _dot(do, v, _NT) * mask
    dq = _dot(dscores.astype(in_dtype), k) + q_dec * _dot(do, kv.astype(in_dtype), _NT)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    k_scaled = (k.astype(jnp.float32) * k_dec).astype(in_dtype)
    kv_ref[...] = kv * state_dec + _dot(k_scaled, v, _TN)


def _dkdv_kernel(
    slopes_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    dstate_ref,
    dk_ref,
    dv_ref,
    ds0_ref,
    dkv_ref,
    *,
    block,
    seq_len,
):
    g, step = pl.program_id(0), pl.program_id(1)
    c = pl.num_programs(1) - 1 - step  # the index maps read blocks in reverse

    @pl.when(step == 0)
    def _():
        dkv_ref[...] = dstate_ref[...]

    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    in_dtype = q.dtype
    d, e = q.shape[-1], v.shape[-1]
    q_dec, k_dec, mask, state_dec = _block_decays(slopes_ref[g], c, block, seq_len, d, d, e)
    dkv = dkv_ref[...]
    dkv_in = dkv.astype(in_dtype)
    scores = _dot(q, k, _NT) * mask  # [query, key]
    dscores = _dot(do, v, _NT) * mask
    k_scaled = (k.astype(jnp.float32) * k_dec).astype(in_dtype)
    dv = _dot(scores.astype(in_dtype), do, _TN) + _dot(k_scaled, dkv_in)
    dk = _dot(dscores.astype(in_dtype), q, _TN) + k_dec * _dot(v, dkv_in, _NT)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    q_scaled = (q.astype(jnp.float32) * q_dec).astype(in_dtype)
    dkv_ref[...] = dkv * state_dec + _dot(q_scaled, do, _TN)

    @pl.when(step == pl.num_programs(1) - 1)
    def _():
        ds0_ref[...] = dkv_ref[...]


def _params(interpret):
    # The TPU interpreter (jax 0.10) does not extend dimension_semantics over the grid
    # axis that vmap prepends (Mosaic's lowering does): leave them unset there, which
    # runs every axis in order.
    if interpret:
        return pltpu.CompilerParams()
    return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))


def _specs(block, num_blocks, cols, reverse=False):
    """Block c (or nb-1-c) of one (batch, head): [block, cols]."""
    if reverse:
        return pl.BlockSpec((None, block, cols), lambda g, c: (g, num_blocks - 1 - c, 0))
    return pl.BlockSpec((None, block, cols), lambda g, c: (g, c, 0))


def _state_spec(d, e):
    return pl.BlockSpec((None, d, e), lambda g, c: (g, 0, 0))


_SLOPES_SPEC = pl.BlockSpec(memory_space=pltpu.SMEM)


def _forward(q, k, v, slopes, s0, block, seq_len, interpret):
    groups, rows, d = q.shape
    e = v.shape[-1]
    nb = rows // block
    return pallas_call(
        functools.partial(_forward_kernel, block=block, seq_len=seq_len),
        grid=(groups, nb),
        in_specs=[
            _SLOPES_SPEC,
            _specs(block, nb, d),
            _specs(block, nb, d),
            _specs(block, nb, e),
            _state_spec(d, e),
        ],
        out_specs=[_specs(block, nb, e), _state_spec(d, e)],
        out_shape=[
            jax.ShapeDtypeStruct((groups, rows, e), q.dtype),
            jax.ShapeDtypeStruct((groups, d, e), jnp.float32),
        ],
        scratch_shapes=[pltpu.VMEM((d, e), jnp.float32)],
        compiler_params=_params(interpret),
        interpret=interpret,
        name="lightning_forward",
    )(slopes, q, k, v, s0)


def _backward(q, k, v, slopes, s0, do, dstate, block, seq_len, interpret):
    groups, rows, d = q.shape
    e = v.shape[-1]
    nb = rows // block
    dq = pallas_call(
        functools.partial(_dq_kernel, block=block, seq_len=seq_len),
        grid=(groups, nb),
        in_specs=[
            _SLOPES_SPEC,
            _specs(block, nb, d),
            _specs(block, nb, e),
            _specs(block, nb, e),
            _state_spec(d, e),
        ],
        out_specs=_specs(block, nb, d),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((d, e), jnp.float32)],
        compiler_params=_params(interpret),
        interpret=interpret,
        name="lightning_dq",
    )(slopes, k, v, do, s0)
    dk, dv, ds0 = pallas_call(
        functools.partial(_dkdv_kernel, block=block, seq_len=seq_len),
        grid=(groups, nb),
        in_specs=[
            _SLOPES_SPEC,
            _specs(block, nb, d, reverse=True),
            _specs(block, nb, d, reverse=True),
            _specs(block, nb, e, reverse=True),
            _specs(block, nb, e, reverse=True),
            _state_spec(d, e),
        ],
        out_specs=[
            _specs(block, nb, d, reverse=True),
            _specs(block, nb, e, reverse=True),
            _state_spec(d, e),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(k.shape, k.dtype),
            jax.ShapeDtypeStruct(v.shape, v.dtype),
            jax.ShapeDtypeStruct(s0.shape, jnp.float32),
        ],
        scratch_shapes=[pltpu.VMEM((d, e), jnp.float32)],
        compiler_params=_params(interpret),
        interpret=interpret,
        name="lightning_dkdv",
    )(slopes, q, k, v, do, dstate)
    return dq, dk, dv, ds0


_lightning = kernel_op(_forward, _backward)


@functools.partial(jax.jit, static_argnames=("block_size", "interpret"))
def lightning_attention_mosaic_tpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slopes: jax.Array,
    initial_state: jax.Array,
    *,
    block_size: int | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Pallas/Mosaic TPU Lightning Attention-2 on checked inputs; returns (o, final_state).

    Args:
      q, k: `[B, H, T, D]`; v: `[B, H, T, E]` (float32, bfloat16 or float16).
      slopes: float32 `[H]`.
      initial_state: `[B, H, D, E]`, used in float32.
      block_size: rows per block, a multiple of 8 (default 128).
      interpret: run the kernels in the Pallas TPU interpreter (any backend).

    Returns:
      o `[B, H, T, E]` in q's dtype and the final state `[B, H, D, E]` float32.
    """
    batch, heads, n, d = q.shape
    e = v.shape[-1]
    block = block_size or DEFAULT_BLOCK
    if block % SUBLANES:
        raise ValueError(
            f"block_size must be a multiple of {SUBLANES} for the Mosaic TPU kernel, got {block}"
        )
    dtype = q.dtype
    k, v = k.astype(dtype), v.astype(dtype)
    padded = flatten_and_pad(
        q, k, v, slopes, initial_state, round_up(n, block), round_up(d, LANES), round_up(e, LANES)
    )
    interpret_params = pltpu.InterpretParams() if interpret else False
    o, state = _lightning(*padded, block, n, interpret_params)
    return unpad(o, state, batch, heads, n, d, e)
