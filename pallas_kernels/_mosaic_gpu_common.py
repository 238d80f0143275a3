"""Helpers the Mosaic GPU kernels share (`mosaic_gpu`'s 16-bit sweep and
`mosaic_gpu_f32`'s TF32 sweep): tile constants, shared-memory tiles, register layouts,
decay masks, segment cuts and the CPU interpreter's entry points.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu

TILE = 64  # columns of Z (and of the state) per program
SWIZZLE_BYTES = 128
SMEM_BUDGET = 200 * 1024  # of Hopper's 227 KB per block, leaving room for alignment
SEGMENT_ROWS = 2  # rows of the segment table per block: run counts, and the counts before


def _interpreter():
    """Mosaic GPU's CPU interpreter (private in jax 0.10.2): (InterpretGPUParams, its module).

    Every use of the private API goes through here.

    Raises:
      ImportError: naming the modules, when jax moved or removed them.
    """
    try:
        from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError as err:  # pragma: no cover - depends on the installed jax
        raise ImportError(
            "impl='mosaic_gpu' with interpret=True needs Mosaic GPU's interpreter "
            "(jax._src.pallas.mosaic_gpu.interpret.params.InterpretGPUParams and "
            "jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call, private modules of "
            f"jax 0.10.2); this jax ({jax.__version__}) does not have them"
        ) from err
    return InterpretGPUParams, interpret_pallas_call


def interpret_params():
    """`InterpretGPUParams` with the race detector on."""
    params_cls, _ = _interpreter()
    return params_cls(detect_races=True)


@contextlib.contextmanager
def recording_races():
    """Collects the race-detection state of every kernel the interpreter runs meanwhile.

    The interpreter keeps only the latest kernel's state (it starts a new one per
    kernel), so checking `get_races()` after an op with several kernels would miss
    races in all but the last. Yields a list that fills with those states; a
    state's `races_found` is True when its kernel raced.
    """
    _, module = _interpreter()
    callbacks = module.gpu_callbacks
    base = callbacks.RaceDetectionState
    states = []

    class Recorded(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            states.append(self)

    callbacks.RaceDetectionState = Recorded
    try:
        yield states
    finally:
        callbacks.RaceDetectionState = base


def reset_interpreter() -> None:
    """Clears the interpreter's state (and its race record); needed after a kernel raised."""
    _, module = _interpreter()
    module.reset_gpu_interpret_mode_state()


def smem_tile(shape, dtype):
    """A shared-memory tile in the tiled, 128-byte-swizzled layout wgmma and TMA expect."""
    elems = SWIZZLE_BYTES // jnp.dtype(dtype).itemsize
    transforms = (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(SWIZZLE_BYTES))
    return plgpu.SMEM(shape, dtype, transforms=transforms)


# Register layouts of a [block] vector that broadcasts along dim 0 (one value per row of a
# WGMMA tile) or dim 1 (one per column).
ROW_LAYOUTS = {0: plgpu.Layout.WGMMA.reduce(1), 1: plgpu.Layout.WGMMA.reduce(0)}


def layout_iota(shape, dim: int, *, interpret: bool, layout=plgpu.Layout.WGMMA):
    """An int32 iota in registers, in `layout` (WGMMA's) when compiled."""
    x = lax.broadcasted_iota(jnp.int32, shape, dim)
    # The compiler needs the register layout of an iota; the interpreter has no
    # layout_cast rule (jax 0.10.2), and needs none.
    return x if interpret else plgpu.layout_cast(x, layout)


def run_counts(ref, dim: int, shape=None, *, interpret: bool):
    """A [block] row of run counts (or other values) in shared memory, broadcast along
    `dim` of `shape`: dim 0 gives each row its own value, dim 1 each column its own
    (shape None: the [block] vector, laid out to broadcast so)."""
    # The compiler needs the register layout of the row (WGMMA's rows or columns, so
    # that it broadcasts into WGMMA tiles); the interpreter needs none.
    counts = ref[...] if interpret else plgpu.load(ref, (), layout=ROW_LAYOUTS[dim])
    return counts if shape is None else lax.broadcast_in_dim(counts, shape, [dim])


def decay_mask(slope, block: int, reverse: bool, *, interpret: bool):
    """[block, block] float32: M[i, j] = lambda^(i-j) for i >= j, else 0 (reverse: M^T)."""
    r = layout_iota((block, block), 0, interpret=interpret)
    q = layout_iota((block, block), 1, interpret=interpret)
    gap = (q - r) if reverse else (r - q)
    return jnp.where(gap >= 0, jnp.exp(-slope * jnp.maximum(gap, 0).astype(jnp.float32)), 0.0)


def cut_at_runs(mask, counts_ref, *, interpret: bool):
    """`mask` [block, block] with pairs of rows from different runs (unequal run counts,
    `counts_ref` a [block] row in shared memory) zeroed: rows interact only within a run."""
    rows, cols = (run_counts(counts_ref, dim, mask.shape, interpret=interpret) for dim in (0, 1))
    return jnp.where(rows == cols, mask, 0.0)


def transpose(x: jax.Array) -> jax.Array:
    """[G, a, b] -> [G, b, a]."""
    return jnp.swapaxes(x, 1, 2)
