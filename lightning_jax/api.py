"""The public op: `lightning_attention`, dispatching to one implementation."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import jax
import jax.numpy as jnp

from lightning_jax import reference
from lightning_jax._checks import (
    check_inputs,
    check_segment_ids,
    compute_dtype,
    dims_of,
    layout_hint,
)
from lightning_jax.xla import lightning_attention_xla


def _xla(q, k, v, slopes, initial_state, block_size, interpret, precision, segment_ids, layout):
    del interpret  # plain XLA: runs on every backend
    return lightning_attention_xla(
        q,
        k,
        v,
        slopes,
        initial_state,
        block_size=block_size,
        precision=precision,
        segment_ids=segment_ids,
        layout=layout,
    )


def _reference(
    q, k, v, slopes, initial_state, block_size, interpret, precision, segment_ids, layout
):
    del block_size, interpret, precision  # the reference has no tiling and is always exact
    if layout == "bthd":  # the reference is for checks only: a transpose costs nothing there
        q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    o, state = reference.naive_attention(
        q,
        k,
        v,
        slopes,
        initial_state=initial_state,
        return_final_state=True,
        segment_ids=segment_ids,
    )
    return (jnp.swapaxes(o, 1, 2) if layout == "bthd" else o), state


def _pallas_kernel(backend: str) -> Callable:
    """The Pallas kernel of `pallas_kernels.<backend>` in `_IMPLS`'s calling convention.

    The kernel module is imported at the first call, not with this module: the
    kernels import lightning_jax themselves, and a user of one backend never
    loads the others' Pallas modules.
    """

    def call(q, k, v, slopes, initial_state, block_size, interpret, precision, segment_ids, layout):
        module = importlib.import_module(f"pallas_kernels.{backend}")
        return getattr(module, f"lightning_attention_{backend}")(
            q,
            k,
            v,
            slopes,
            initial_state,
            block_size=block_size,
            interpret=interpret,
            precision=precision,
            segment_ids=segment_ids,
            layout=layout,
        )

    return call


# name -> fn(q, k, v, slopes [H] f32, initial_state [B, H, d, e], block_size, interpret,
#            precision, segment_ids or None, layout) -> (o, final_state), on checked arguments.
_IMPLS: dict[str, Callable] = {
    "xla": _xla,
    "reference": _reference,
    "triton": _pallas_kernel("triton"),
    "mosaic_tpu": _pallas_kernel("mosaic_tpu"),
    "mosaic_gpu": _pallas_kernel("mosaic_gpu"),
}
_PALLAS_IMPLS = ("triton", "mosaic_tpu", "mosaic_gpu")
# Matmul precision for float32 inputs (see `lightning_attention`).
PRECISIONS = ("default", "highest")
# The best implementation per backend; anything else (CPU) takes the XLA path.
_AUTO = {"gpu": "triton", "cuda": "triton", "rocm": "triton", "tpu": "mosaic_tpu"}

# Where tools/gpu_check.sh has passed for impl="mosaic_gpu" on real Hopper-class
# hardware: {"device": ..., "date": ..., "jax": ...}. None: never run on a GPU, so
# impl="auto" keeps "triton" on every GPU and "mosaic_gpu" is opt-in. Fill this in
# (device, date, jax version) only from a gpu_check.sh run that passed.
MOSAIC_GPU_VALIDATED: dict[str, str] | None = None
MOSAIC_GPU_MIN_CAPABILITY = (9, 0)  # Hopper: wgmma and TMA


def _compute_capability() -> tuple[int, int] | None:
    """(major, minor) of the default device when it is an NVIDIA GPU, else None."""
    capability = getattr(jax.devices()[0], "compute_capability", None)
    if not capability:
        return None
    major, minor = (int(x) for x in str(capability).split(".")[:2])
    return major, minor


def _auto_gpu_impl() -> str:
    """mosaic_gpu on sm_90+ once validated on hardware (MOSAIC_GPU_VALIDATED); else triton."""
    if MOSAIC_GPU_VALIDATED is None:
        return "triton"
    capability = _compute_capability()
    if capability is not None and capability >= MOSAIC_GPU_MIN_CAPABILITY:
        return "mosaic_gpu"
    return "triton"


def available_impls() -> tuple[str, ...]:
    """Names accepted by `lightning_attention(..., impl=...)`."""
    return ("auto", *_IMPLS)


def _resolve_impl(impl: str) -> str:
    if impl == "auto":
        name = _AUTO.get(jax.default_backend(), "xla")
        return _auto_gpu_impl() if name == "triton" else name
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {available_impls()}, got {impl!r}")
    return impl


def lightning_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slopes: jax.Array | float | None = None,
    *,
    initial_state: jax.Array | None = None,
    return_final_state: bool = False,
    impl: str = "auto",
    block_size: int | None = None,
    interpret: bool | None = None,
    precision: str = "default",
    segment_ids: jax.Array | None = None,
    layout: str = "bhtd",
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Causal linear attention with a per-head exponential decay (Lightning Attention-2).

    For each (batch, head), with lambda = exp(-slope):

        kv_t = lambda * kv_{t-1} + k_t^T v_t      (kv_0 = initial_state)
        o_t  = q_t kv_t

    i.e. o = ((Q K^T) * D) V + (lambda^(t+1) q_t) S0 with D[i, j] = lambda^(i-j)
    for i >= j, else 0. The diagonal is included; there is no softmax and no
    1/sqrt(d) scale: normalise outside the op.

    Args:
      q: `[B, H, T, D]` queries (`[B, T, H, D]` with layout="bthd"), any
        floating dtype.
      k: keys, the shape and dtype of q.
      v: `[B, H, T, E]` values (`[B, T, H, E]` with layout="bthd"), q's dtype;
        E may differ from D.
      slopes: None (lambda = 1, plain causal linear attention), a scalar for
        every head, or `[H]` (e.g. `alibi_slopes(H)`), all >= 0: any real
        array-like (Python or NumPy number, list, NumPy or JAX array, integer or
        floating), used as float32. Slopes are
        constants of the operator, as in the paper: no gradient flows to them.
        Their values are checked when they exist at the call: Python numbers
        and NumPy arrays always, JAX arrays unless traced (a traced slope, e.g.
        an argument of a jitted function, is not checked).
      initial_state: optional `[B, H, D, E]` state kv_0 (zeros if None), in
        either layout, any floating dtype (used in float32). Differentiable.
      return_final_state: also return the state after the last token.
      impl: "auto" (the best implementation for the default backend: "triton"
        on GPU, "mosaic_tpu" on TPU, "xla" elsewhere), "xla" (chunked pure-jnp
        with the paper's backward), "triton" (Pallas, Triton lowering),
        "mosaic_tpu" (Pallas, Mosaic TPU), "mosaic_gpu" (Pallas, Mosaic GPU:
        Hopper sm_90+ with wgmma and TMA; bf16/f16 on tensor cores in their
        type, float32 at TF32) or "reference" (the O(T^2) masked formula; for checks
        only). "auto" picks "mosaic_gpu" on GPUs of compute capability >= 9.0
        only once `tools/gpu_check.sh` has passed on real Hopper-class
        hardware (recorded in `api.MOSAIC_GPU_VALIDATED`; not yet), so no user
        gets a never-run kernel by default; "triton" stays for older GPUs and
        AMD until JAX removes the Triton backend.
      block_size: rows per block of the tiling (None: the implementation's
        tuned default). Affects speed, not results (beyond rounding).
      interpret: for the Pallas implementations, run the kernel in the Pallas
        interpreter. None: exactly when the default backend is CPU, so every
        kernel runs anywhere; False forces the real kernel (what lowering for
        another platform needs). Ignored by "xla" and "reference".
      precision: the matmul precision for float32 inputs. "default": the
        backend's fast float32 matmul (TF32 tensor cores on NVIDIA GPUs, the
        MXU's default bf16 passes on TPU; exact float32 on CPU). "highest":
        float32-accurate matmuls everywhere (slower on GPU and TPU): exact
        float32 except impl="mosaic_gpu" on the GPU, which splits each operand
        into a TF32 head and rest and sums three TF32 products (about 2^-22
        relative error, against TF32's 2^-11). bfloat16 and
        float16 inputs always multiply in their own type with float32
        accumulation. "reference" is always exact.
      segment_ids: optional integer `[B, T]` ids for packed sequences. Only runs
        of equal ids matter (ids need not be sorted, distinct across runs or
        contiguous numbers): where the id changes (segment_ids[b, t] !=
        segment_ids[b, t-1]) the state is reset to zero, so a token sees only
        the earlier tokens of its own run. `initial_state` feeds the first run
        of each row only; the final state is that of the last run. Padding
        tokens (e.g. id 0) get no special case: a run of them is a segment of
        its own, so they neither see nor disturb the documents around them;
        their outputs are meaningless and should be masked out of a loss. None:
        the whole row is one sequence (the unsegmented code path, same cost).
        Not differentiable (integers). Taken by every implementation.
      layout: "bhtd" (default): q, k, v are `[B, H, T, D]`; "bthd": `[B, T, H, D]`,
        the layout of `jax.nn.dot_product_attention` and of a projection
        `[B, T, H*D]` reshaped, so a layer needs no transpose. The XLA path and
        the Triton and Mosaic TPU kernels read and write that layout in place;
        Mosaic GPU transposes around its kernel (its TMA tiles are per head).
        Results are the same in both layouts (o in the layout of q).

    Dtypes: q, k and v must share one floating dtype (as in
    `jax.nn.dot_product_attention`); mixing them is an error rather than a
    silent cast, since rounding k or v to q's type (or promoting q) changes the
    result or the cost without the caller asking. The kernels multiply in that
    dtype with float32 accumulation; states are float32 (float64 with float64
    inputs on "xla" and "reference").

    Returns:
      o `[B, H, T, E]` (`[B, T, H, E]` with layout="bthd") in q's dtype
      (accumulated in float32); with `return_final_state=True`,
      `(o, final_state)` where final_state `[B, H, D, E]` float32 is kv after
      the last token.

    Raises:
      ValueError: a wrong rank or shape (naming the argument and shapes, and
        the other layout when it would explain them), an unknown `impl`,
        `precision` or `layout`, a non-positive `block_size` or one the chosen
        kernel cannot tile (Triton: a power of two >= 16; Mosaic TPU: a
        multiple of 8; the XLA path tiles any size), negative or non-finite
        slopes (not traced ones: see `slopes`), `segment_ids` not `[B, T]`.
      TypeError: a non-floating dtype, q, k, v of different dtypes, slopes that
        are not real numbers, non-integer `segment_ids`, or float64 inputs to a
        Pallas kernel.
    """
    slopes = check_inputs(q, k, v, slopes, initial_state, layout)
    dims = dims_of(q, v, layout)
    if segment_ids is not None:
        check_segment_ids(
            segment_ids, dims.batch, dims.seq, hint=lambda n: layout_hint(layout, q, n, "seq")
        )
    name = check_options(impl, return_final_state, block_size, interpret, precision, q.dtype)
    return attention(
        q,
        k,
        v,
        slopes,
        initial_state=initial_state,
        return_final_state=return_final_state,
        impl=name,
        block_size=block_size,
        interpret=interpret,
        precision=precision,
        segment_ids=segment_ids,
        layout=layout,
    )


def check_options(impl, return_final_state, block_size, interpret, precision, dtype) -> str:
    """Checks the op's options for inputs of `dtype`; returns the implementation's name
    ("auto" resolved). float64 runs on "xla" and "reference" only."""
    if not isinstance(return_final_state, bool):
        raise TypeError(f"return_final_state must be a bool, got {return_final_state!r}")
    if block_size is not None and (
        isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1
    ):
        raise ValueError(f"block_size must be None or a positive int, got {block_size!r}")
    if interpret is not None and not isinstance(interpret, bool):
        raise TypeError(f"interpret must be None or a bool, got {interpret!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    name = _resolve_impl(impl)
    if name in _PALLAS_IMPLS and dtype == jnp.float64:
        raise TypeError(
            "q, k, v are float64; the Pallas kernels take float32, bfloat16 or float16 "
            '(use impl="xla" for float64)'
        )
    return name


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slopes: jax.Array,
    *,
    initial_state: jax.Array | None,
    return_final_state: bool,
    impl: str,
    block_size: int | None,
    interpret: bool | None,
    precision: str,
    segment_ids: jax.Array | None,
    layout: str,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """`lightning_attention` on arguments its public entries have checked.

    The one internal entry shared by `lightning_attention`, the varlen op and the
    sequence-parallel op, so each call checks its arguments once. slopes: float32
    `[H]`; impl: a resolved name (not "auto").
    """
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    dtype = compute_dtype(q, k, v)
    dims = dims_of(q, v, layout)
    if initial_state is None:
        s0 = jnp.zeros_like(q, shape=(dims.batch, dims.heads, dims.d, dims.e), dtype=dtype)
    else:
        s0 = initial_state.astype(dtype)
    o, state = _IMPLS[impl](
        q, k, v, slopes, s0, block_size, interpret, precision, segment_ids, layout
    )
    state = state.astype(jnp.float32)
    return (o, state) if return_final_state else o
