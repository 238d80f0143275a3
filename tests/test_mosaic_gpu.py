"""Mosaic GPU kernel: the shared suite in Mosaic GPU's interpreter, compiles, dispatch.

- `TestMosaicGpuInterpret`: the shared suite in Mosaic GPU's CPU interpreter
  (jax 0.10.2, `InterpretGPUParams`) with its race detector on; a fixture fails
  any test during which it saw a race. The interpreter is slow (about a minute
  per forward+gradient check on the shared CPU), so the float32 grid and the
  low-precision cases are a subset of the shared ones that still covers seq 1,
  odd seq with a partial last block, d != e, d not a power of two, d = 256,
  three e-tiles, states in and out and every gradient. float32 runs the TF32
  sweep (`mosaic_gpu_f32`), bf16/f16 the 16-bit one.
- Sequence splits (the parallel-over-sequence path) and segment ids against the
  reference, for both sweeps; precision="highest" (the split-TF32 sweep).
- The real compile for H100 and H200 on this CPU machine (deviceless XLA +
  ptxas, in a subprocess): no spills, wgmma in every kernel (TF32 for float32);
  skipped with the reason when the CUDA plugin or ptxas is missing.
- `impl="auto"` with a faked GPU in both validation states.
"""

from __future__ import annotations

import concurrent.futures
import functools
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lightning_jax as lj
from lightning_jax import api, reference
from op_test_base import (
    CASES,
    LightningOpTestBase,
    assert_close,
    assert_rms_close,
    case_id,
    loss_and_grads,
    make_inputs,
    make_slopes,
)
from pallas_kernels import mosaic_gpu, mosaic_gpu_f32

REPO = Path(__file__).resolve().parents[1]
# Tolerances of the tests below that are not cases of the shared suite (sequence
# splits, the device tests): relative to the reference's scale, max error for
# float32, RMS for bf16 (outputs, gradients); the shared suite's cases use the
# derived per-case tolerances (tests/tolerances.json).
F32_TOL = 1e-5
BF16_OUT_TOL = 5e-3
BF16_GRAD_TOL = 1e-2
GPU_TARGETS = REPO / "tools" / "gpu_targets"


@pytest.fixture(autouse=True)
def interpreter_races():
    """Fails a test when the interpreter's race detector saw a data race in any kernel."""
    mosaic_gpu.reset_interpreter()
    with mosaic_gpu.recording_races() as states:
        yield states
    raced = [i for i, state in enumerate(states) if state.races_found]
    assert not raced, f"Mosaic GPU interpreter detected data races in kernel runs {raced}"


def test_race_detector_sees_every_kernel(interpreter_races):
    """The fixture's record covers each kernel run of an op (forward + 3 gradient passes)."""
    q, k, v, s0, do, ds = make_inputs(11, 1, 1, 8, 16, 16)
    fn = lambda q, k, v, s0: lj.lightning_attention(  # noqa: E731
        q, k, v, 0.5, initial_state=s0, return_final_state=True, impl="mosaic_gpu"
    )
    jax.block_until_ready(loss_and_grads(fn, q, k, v, s0, do, ds))
    assert len(interpreter_races) >= 4


# seq 1; odd seq, partial block, d != e, non-power-of-two d and e; an exact block with no
# decay; two blocks, the second of 1 row, d = 16; d = 256; three e-tiles (e = 192).
INTERPRET_CASES = [CASES[0], CASES[1], CASES[2], CASES[3], CASES[7], CASES[8]]
# bf16 / f16: odd seq with a partial block and d != e; a 1-row last block (strong decay).
LOW_PRECISION_INTERPRET_CASES = [CASES[1], CASES[3]]


class TestMosaicGpuInterpret(LightningOpTestBase):
    impl = "mosaic_gpu"
    # Always the interpreter, also on a GPU backend: there float32 runs at TF32, outside the
    # shared suite's float32 tolerances (test_device_float32_matches_reference checks it).
    op_kwargs = {"interpret": True}
    checkpoint_ok = False  # the interpreter's ordered io_callbacks cannot be rematerialised

    # In layout "bthd" this kernel's wrapper transposes to "bhtd" whatever the widths, so
    # one shape checks that wrapper (the 128-wide case costs the interpreter ~4x more).
    @pytest.mark.parametrize("shape", [(2, 2, 40, 16, 24)], ids=["padded"])
    def test_bthd_layout_matches_reference(self, shape):
        super().test_bthd_layout_matches_reference(shape)

    @pytest.mark.parametrize("initial_state", ["none", "replicated"])
    def test_inside_shard_map_with_type_checks(self, initial_state):
        # jax 0.10.2's Mosaic GPU interpreter deadlocks when several shard_map devices
        # run kernels at once (its shared-memory clean-up waits on a threading.Barrier
        # sized for one kernel launch: seen hanging in _clean_up_shared_memory), so
        # this cannot run on CPU; the kernel under shard_map is covered only by the
        # 4 x H200 deviceless compile of the sequence-parallel op (tests/test_compile.py).
        pytest.skip("Mosaic GPU interpreter deadlocks under multi-device shard_map (jax 0.10.2)")

    @pytest.mark.parametrize("case", INTERPRET_CASES, ids=case_id)
    def test_forward_and_grads_f32(self, case):
        LightningOpTestBase.test_forward_and_grads_f32(self, case)

    @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
    @pytest.mark.parametrize("case", LOW_PRECISION_INTERPRET_CASES, ids=case_id)
    def test_low_precision(self, case, dtype):
        LightningOpTestBase.test_low_precision(self, case, dtype)


# The two kernels: float32 runs the TF32 sweep (`mosaic_gpu_f32`), bf16 the 16-bit one.
KERNEL_DTYPES = pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])


def _check_against_reference(fn, slopes, q, k, v, s0, do, ds, ids=None):
    """fn(q, k, v, s0) -> (o, state): o, final state and every gradient against the
    reference on q, k, v in float32 (with segment ids `ids`); float32 to F32_TOL (max
    error), bf16 to the RMS tolerances."""

    def ref_fn(q, k, v, s0):
        return reference.naive_attention(
            q, k, v, slopes, initial_state=s0, return_final_state=True, segment_ids=ids
        )

    exact = q.dtype == jnp.float32
    check = assert_close if exact else assert_rms_close
    out_tol, grad_tol = (F32_TOL, F32_TOL) if exact else (BF16_OUT_TOL, BF16_GRAD_TOL)
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    o, state = jax.jit(fn)(q, k, v, s0)
    o_ref, state_ref = ref_fn(*up, s0)
    check(o, o_ref, out_tol, "o")
    check(state, state_ref, out_tol, "final state")
    grads = jax.jit(functools.partial(loss_and_grads, fn))(q, k, v, s0, do, ds)
    ref_grads = loss_and_grads(ref_fn, *up, s0, do, ds)
    for name, g, g_ref in zip(("dq", "dk", "dv", "d_initial_state"), grads, ref_grads):
        check(g, g_ref, grad_tol, name)


@pytest.mark.parametrize(
    "splits, n, dtype",
    [(2, 129, jnp.float32), (8, 200, jnp.float32), (2, 129, jnp.bfloat16)],
    ids=["2-129-f32", "8-200-f32", "2-129-bf16"],
)
def test_sequence_splits_match_reference(splits, n, dtype):
    """Split sequences (state-only pass, combine, outputs): o, state and every gradient.

    129 rows in 2 splits of 2 blocks: the last split holds 1 real row; 8 splits of
    200 rows are capped at 4 (one block each, the last partial: the wrapper's logic,
    whatever the dtype, so float32 only). float32 runs the TF32 sweep, bf16 the 16-bit one.
    """
    b, h, d, e = 1, 2, 60, 24
    slopes = make_slopes("strong", h)
    q, k, v, s0, do, ds = make_inputs(10, b, h, n, d, e, dtype)

    def fn(q, k, v, s0):
        return mosaic_gpu.lightning_attention_mosaic_gpu(
            q, k, v, slopes, s0, interpret=True, seq_splits=splits
        )

    _check_against_reference(fn, slopes, q, k, v, s0, do, ds)


def _boundary_ids(batch: int, n: int, boundaries) -> jax.Array:
    """int32 `[batch, n]` ids whose runs change exactly at `boundaries` (the same every row)."""
    ids = np.zeros((batch, n), np.int32)
    for t in boundaries:
        ids[:, t:] += 1
    return jnp.asarray(ids % 3)  # ids reused across runs: only the changes matter


@KERNEL_DTYPES
def test_sequence_splits_with_segments_match_reference(dtype):
    """Sequence splits with segment ids: `_combine` cuts the state at a split holding a
    run boundary and passes it through one that continues a run, both directions.

    450 rows in 4 splits of 128: split 0 holds a boundary (row 70), split 1 none (it
    passes on the run begun at 70), split 2 one on its first row (256) and a length-1
    run (300), split 3 none (the last, partial). One slope weak enough (lambda^128 =
    e^-1.28) that a state wrongly passed through a split would show.
    """
    b, h, n, d, e = 1, 2, 450, 60, 24
    slopes = jnp.array([0.01, 0.3], jnp.float32)
    q, k, v, s0, do, ds = make_inputs(12, b, h, n, d, e, dtype)
    ids = _boundary_ids(b, n, [70, 256, 300, 301])
    assert mosaic_gpu.choose_tiling(b * h, e, n, 4).splits == 4

    def fn(q, k, v, s0):
        return mosaic_gpu.lightning_attention_mosaic_gpu(
            q, k, v, slopes, s0, interpret=True, seq_splits=4, segment_ids=ids
        )

    _check_against_reference(fn, slopes, q, k, v, s0, do, ds, ids)


@KERNEL_DTYPES
def test_segment_boundary_at_offsets_of_a_kernel_block(dtype):
    """The kernel's blocks are 64 rows whatever block_size says, so the shared suite's
    16-row offsets do not reach all of one: here row r has a length-1 run at 64 + r for
    offsets r at both edges and the middle of the second block (r = 63: the next
    boundary falls on the third block's first row; r = 0: on the second's). One slope
    weak enough (lambda^64 = e^-1.28) that a state carried across a cut would show."""
    offsets = [0, 1, 2, 31, 32, 62, 63]
    b, h, n, d, e = len(offsets), 2, 192, 8, 12
    slopes = jnp.array([0.02, 0.5], jnp.float32)
    q, k, v, s0, do, ds = make_inputs(13, b, h, n, d, e, dtype)
    t = np.arange(n)[None, :]
    at = 64 + np.asarray(offsets)[:, None]
    ids = jnp.asarray(np.where(t == at, 9, 5), jnp.int32)

    def fn(q, k, v, s0):
        return mosaic_gpu.lightning_attention_mosaic_gpu(
            q, k, v, slopes, s0, interpret=True, segment_ids=ids
        )

    _check_against_reference(fn, slopes, q, k, v, s0, do, ds, ids)


@pytest.mark.parametrize("segmented", [False, True], ids=["plain", "segmented"])
def test_highest_precision_float32_matches_reference(segmented):
    """precision="highest" with float32: the split-TF32 sweep (each product as three TF32
    products of the operands' heads and rests) against the reference to F32_TOL.

    The interpreter multiplies exactly, so this checks the split and its layouts (one
    chunk buffer, Z^T reloaded over its decayed copy, the output staged in P's head,
    inter summed in shared memory): without the rest terms TF32's error (~1e-3) would
    fail it. d = 256 (plain), and sequence splits with segment ids (segmented).
    """
    if segmented:  # 2 splits of 128 rows, each holding a boundary (one a length-1 run)
        b, h, n, d, e, splits = 1, 2, 200, 60, 24, 2
        ids = _boundary_ids(b, n, [70, 130, 131])
        slopes = jnp.array([0.01, 0.3], jnp.float32)
    else:  # two blocks, the second of one row
        b, h, n, d, e, splits, ids = 1, 2, 65, 256, 64, None, None
        slopes = make_slopes("strong", h)
    q, k, v, s0, do, ds = make_inputs(14, b, h, n, d, e)

    def fn(q, k, v, s0):
        return mosaic_gpu.lightning_attention_mosaic_gpu(
            q, k, v, slopes, s0, interpret=True, precision="highest", seq_splits=splits,
            segment_ids=ids,
        )  # fmt: skip

    _check_against_reference(fn, slopes, q, k, v, s0, do, ds, ids)


def test_tf32_split_is_exact_and_three_products_are_float32_accurate():
    """`tf32_split`: the head is a TF32 number (low 13 bits zero), head + rest is x
    exactly, and the three products the split sweep sums (the rest rounded to TF32 by
    the tensor cores, here by truncation) give a @ b to ~2^-20, where head @ head alone
    (what TF32 gives) is off by ~2^-11."""
    keys = jax.random.split(jax.random.PRNGKey(15), 3)
    scale = jnp.exp2(jax.random.randint(keys[2], (64, 1), -60, 60).astype(jnp.float32))
    a = jax.random.normal(keys[0], (64, 64), jnp.float32) * scale
    b = jax.random.normal(keys[1], (64, 64), jnp.float32)
    a_head, a_rest = mosaic_gpu_f32.tf32_split(a)
    b_head, b_rest = mosaic_gpu_f32.tf32_split(b)
    assert not np.any(np.asarray(a_head).view(np.int32) & 0x1FFF)
    np.testing.assert_array_equal(
        np.asarray(a_head, np.float64) + np.asarray(a_rest, np.float64), np.asarray(a, np.float64)
    )
    f64 = functools.partial(np.asarray, dtype=np.float64)
    tf32 = lambda x: f64(mosaic_gpu_f32.tf32_split(x)[0])  # noqa: E731
    exact = f64(a) @ f64(b)
    three = f64(a_head) @ f64(b_head) + f64(a_head) @ tf32(b_rest) + tf32(a_rest) @ f64(b_head)
    one = f64(a_head) @ f64(b_head)
    row_scale = np.abs(f64(a)) @ np.abs(f64(b))  # per-element error bound's scale
    assert np.max(np.abs(three - exact) / row_scale) < 2.0**-20
    assert np.max(np.abs(one - exact) / row_scale) > 2.0**-12


def test_choose_tiling_fills_the_gpu():
    """Small batch x heads split the sequence to >= 2 programs per SM; large ones do not."""
    sms = mosaic_gpu.DEFAULT_NUM_SMS
    small = mosaic_gpu.choose_tiling(groups=8, e=128, n=32768)  # b1 h8
    assert small.splits > 1 and 8 * 2 * small.splits >= 2 * sms
    assert small.splits * small.split_blocks * small.block >= 32768
    assert (small.splits - 1) * small.split_blocks * small.block < 32768  # no empty split
    assert mosaic_gpu.choose_tiling(groups=128, e=128, n=32768).splits == 1  # b4 h32
    assert mosaic_gpu.choose_tiling(groups=8, e=128, n=256).splits == 1  # too short to split
    assert mosaic_gpu.choose_tiling(groups=1, e=64, n=130, splits=50).splits == 3  # capped


def test_prefetch_buffers_fit_shared_memory():
    """Two buffers (prefetch) at d = e <= 128 in bf16; one where two would not fit."""
    slots = functools.partial(mosaic_gpu._buffer_slots, 64, dtype=jnp.bfloat16)
    assert slots(128, 128, state_only=False) == 2
    assert slots(64, 64, state_only=False) == 2
    assert slots(256, 256, state_only=False) == 1
    assert slots(192, 192, state_only=False) == 1
    assert slots(256, 256, state_only=True) == 2  # no X, scores or output tiles
    # The TF32 sweep walks the width in chunks: two chunk buffers fit at every width.
    for width in (64, 128, 192, 256):
        assert mosaic_gpu_f32.chunk_slots(64, width, state_only=False, segmented=True) == 2
    assert mosaic_gpu_f32.smem_bytes(64, 256, 2, False, True) <= mosaic_gpu.SMEM_BUDGET


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(precision="fast"), ValueError, "precision must be one of"),
        (dict(block_size=128, interpret=True), ValueError, "block_size must be <= 64"),
        (dict(seq_splits=0), ValueError, "seq_splits must be None or >= 1"),
    ],
)
def test_kernel_argument_errors(kwargs, error, match):
    x = jnp.zeros((1, 2, 40, 16))
    s0 = jnp.zeros((1, 2, 16, 16))
    with pytest.raises(error, match=match):
        mosaic_gpu.lightning_attention_mosaic_gpu(x, x, x, jnp.zeros(2), s0, **kwargs)


def test_dims_above_256_are_refused():
    q = jnp.zeros((1, 1, 8, 320))
    v = jnp.zeros((1, 1, 8, 16))
    with pytest.raises(ValueError, match="d and e up to 256"):
        lj.lightning_attention(q, q, v, impl="mosaic_gpu")


def test_float64_is_refused():
    with jax.enable_x64(True):
        x = jnp.zeros((1, 2, 8, 16), jnp.float64)
        with pytest.raises(TypeError, match='q, k, v are float64.*impl="xla"'):
            lj.lightning_attention(x, x, x, impl="mosaic_gpu")


def test_seq_of_2_pow_24_is_refused():
    """Sequence lengths reach the kernel as float32; checked on shapes alone (no arrays)."""
    q = jax.ShapeDtypeStruct((1, 1, 1 << 24, 16), jnp.bfloat16)
    s0 = jax.ShapeDtypeStruct((1, 1, 16, 16), jnp.float32)
    with pytest.raises(ValueError, match="seq < 16777216"):
        jax.eval_shape(
            lambda q, s0: mosaic_gpu.lightning_attention_mosaic_gpu(q, q, q, jnp.zeros(1), s0),
            q,
            s0,
        )


def test_auto_dispatch_with_a_faked_gpu(monkeypatch):
    """auto: triton until gpu_check.sh has passed (MOSAIC_GPU_VALIDATED); then mosaic_gpu
    on compute capability >= 9.0 only."""

    def fake_gpu(capability):
        device = types.SimpleNamespace(platform="gpu", compute_capability=capability)
        monkeypatch.setattr(api.jax, "default_backend", lambda: "gpu")
        monkeypatch.setattr(api.jax, "devices", lambda *a: [device])

    monkeypatch.setattr(api, "MOSAIC_GPU_VALIDATED", None)
    for capability in ("8.0", "9.0", "10.0"):
        fake_gpu(capability)
        assert api._resolve_impl("auto") == "triton", capability
    monkeypatch.setattr(
        api, "MOSAIC_GPU_VALIDATED", {"device": "NVIDIA H100", "date": "x", "jax": "x"}
    )
    for capability, want in (("8.0", "triton"), ("8.9", "triton"), ("9.0", "mosaic_gpu")):
        fake_gpu(capability)
        assert api._resolve_impl("auto") == want, capability
    fake_gpu("10.0")
    assert api._resolve_impl("auto") == "mosaic_gpu"


def test_auto_stays_triton_until_validated_on_hardware():
    """Nobody gets the never-run kernel by default: the record is empty until a GPU run."""
    assert api.MOSAIC_GPU_VALIDATED is None


@pytest.mark.parametrize("batch, heads", [(4, 32), (1, 8)])
def test_lowers_for_cuda(batch, heads):
    """Cross-lowering for platform "cuda": one kernel forward and three backward, plus one
    state-only pass each way when the sequence is split (b1 h8)."""
    x = jax.ShapeDtypeStruct((batch, heads, 4096, 128), jnp.bfloat16)
    slopes = lj.alibi_slopes(heads)
    split = mosaic_gpu.choose_tiling(batch * heads, 128, 4096).splits > 1
    assert split == (batch * heads < 64)

    def fwd(q, k, v):
        return lj.lightning_attention(q, k, v, slopes, impl="mosaic_gpu", interpret=False)

    def fwd_bwd(q, k, v):
        loss = lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32))  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    for fn, kernels in ((fwd, 1 + split), (fwd_bwd, 4 + 3 * split)):
        # Kernel launches in the program (identical kernels share one lowered function).
        assert str(jax.make_jaxpr(fn)(x, x, x)).count("mpmd_map[") == kernels
        text = jax.jit(fn).trace(x, x, x).lower(lowering_platforms=("cuda",)).as_text()
        assert "mosaic_gpu_v2" in text
        # The walk over the sequence is inside the kernels; XLA loops only over splits.
        assert ("stablehlo.while" in text) == split


def _hopper_gpu_missing() -> str | None:
    """None on a GPU backend of compute capability >= 9.0, else why the device tests skip."""
    if jax.default_backend() != "gpu":
        return f"needs an NVIDIA GPU (backend is {jax.default_backend()})"
    capability = api._compute_capability()
    if capability is None or capability < api.MOSAIC_GPU_MIN_CAPABILITY:
        return f"needs compute capability >= 9.0, got {capability}"
    return None


@pytest.mark.skipif(_hopper_gpu_missing() is not None, reason=str(_hopper_gpu_missing()))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize(
    "case, splits",
    [
        ((2, 3, 1, 16, 16, "alibi", None), None),
        ((1, 2, 63, 60, 100, "strong", None), None),
        ((1, 5, 500, 100, 16, "alibi", None), None),
        ((1, 2, 1023, 64, 128, "strong", None), None),
        ((1, 2, 130, 256, 64, "one", None), None),
        ((1, 3, 97, 128, 192, "scalar", None), None),
        ((1, 2, 4000, 128, 128, "strong", None), 7),
        ((4, 8, 2048, 128, 128, "alibi", None), None),
    ],
    ids=lambda x: case_id(x) if isinstance(x, tuple) else f"splits{x}",
)
def test_device_matches_reference(case, splits, dtype):
    """On a real Hopper GPU: o, state and every gradient against the float32 reference."""
    _check_on_device(case, splits, dtype)


@pytest.mark.skipif(_hopper_gpu_missing() is not None, reason=str(_hopper_gpu_missing()))
@pytest.mark.parametrize(
    "case, splits",
    [
        ((1, 2, 63, 60, 100, "strong", None), None),
        ((1, 2, 130, 256, 64, "one", None), None),
        ((1, 2, 4000, 128, 128, "strong", None), 7),
        ((4, 8, 2048, 128, 128, "alibi", None), None),
    ],
    ids=lambda x: case_id(x) if isinstance(x, tuple) else f"splits{x}",
)
def test_device_float32_matches_reference(case, splits):
    """On a real Hopper GPU, float32 on the TF32 kernels (`mosaic_gpu_f32`): TF32 keeps
    f16's 10-bit mantissa, so the f16 RMS tolerances apply."""
    _check_on_device(case, splits, jnp.float32)


def _check_on_device(case, splits, dtype):
    """The kernel compiled for the GPU: o, state and every gradient against the reference."""
    b, h, n, d, e, kind, _ = case
    slopes = make_slopes(kind, h)
    slopes_h = jnp.broadcast_to(jnp.asarray(0.0 if slopes is None else slopes), (h,))
    q, k, v, s0, do, ds = make_inputs(12, b, h, n, d, e, dtype)

    def fn(q, k, v, s0):
        return mosaic_gpu.lightning_attention_mosaic_gpu(
            q, k, v, slopes_h.astype(jnp.float32), s0, seq_splits=splits
        )

    o, state = jax.jit(fn)(q, k, v, s0)
    grads = jax.jit(functools.partial(loss_and_grads, fn))(q, k, v, s0, do, ds)
    up = [x.astype(jnp.float32) for x in (q, k, v)]

    def ref_fn(q, k, v, s0):
        return reference.naive_attention(q, k, v, slopes, initial_state=s0, return_final_state=True)

    o_ref, state_ref = ref_fn(*up, s0)
    assert_rms_close(o, o_ref, BF16_OUT_TOL, "o")
    assert_rms_close(state, state_ref, BF16_OUT_TOL, "final state")
    ref_grads = loss_and_grads(ref_fn, *up, s0, do, ds)
    for name, g, g_ref in zip(("dq", "dk", "dv", "ds0"), grads, ref_grads):
        assert_rms_close(g, g_ref, BF16_GRAD_TOL, name)


_COMPILE_SCRIPT = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import lightning_jax as lj

    target_file, b, h, n, d, e, dtype, splits, segmented, precision = sys.argv[1:11]
    b, h, n, d, e = map(int, (b, h, n, d, e))
    topo = topologies.get_topology_desc(
        platform="cuda", topology="1x1x1", target_config=open(target_file).read()
    )
    sh = NamedSharding(Mesh(np.array(topo.devices[:1]), ("x",)), P())
    q = jax.ShapeDtypeStruct((b, h, n, d), jnp.dtype(dtype), sharding=sh)
    v = jax.ShapeDtypeStruct((b, h, n, e), jnp.dtype(dtype), sharding=sh)
    slopes = lj.alibi_slopes(h)
    from pallas_kernels.mosaic_gpu import lightning_attention_mosaic_gpu

    ids = jax.ShapeDtypeStruct((b, n), jnp.int32, sharding=sh) if segmented == "1" else None

    def loss(q, k, v, segment_ids):
        s0 = jnp.zeros((b, h, d, e), jnp.float32)
        o, state = lightning_attention_mosaic_gpu(
            q, k, v, slopes, s0, seq_splits=None if splits == "auto" else int(splits),
            segment_ids=segment_ids, precision=precision,
        )
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(state)

    jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, q, v, ids).compile()
    print("COMPILED")
    """
)


def _cuda_compile_available() -> str | None:
    """None when deviceless CUDA compiles can run here, else the reason."""
    if importlib.util.find_spec("jax_cuda12_plugin") is None:
        return "jax-cuda12-plugin is not installed (the [aot] extra)"
    if not GPU_TARGETS.is_dir():
        return f"no GPU target configs in {GPU_TARGETS}"
    return None


_BF16_COMPILES = [
    ("h200", 2, 4, 2048, 64, 64, "1", False),
    ("h200", 2, 4, 2048, 128, 128, "1", False),
    ("h100_sxm", 2, 4, 2048, 128, 128, "1", False),
    ("h200", 1, 2, 1024, 256, 256, "1", False),
    ("h200", 1, 3, 1000, 192, 100, "auto", False),  # awkward: odd seq, d != e, not 2^k
    ("h200", 1, 8, 8192, 128, 128, "auto", False),  # b1 h8: split over the sequence
    # Segment ids: the segmented kernels (run counts by TMA, decays cut in registers).
    ("h200", 2, 4, 2048, 64, 64, "1", True),
    ("h200", 2, 4, 2048, 128, 128, "1", True),
    ("h200", 1, 2, 1024, 256, 256, "1", True),
    ("h200", 1, 3, 1000, 192, 100, "auto", True),  # with splits and their state-only pass
]
# float32 (the TF32 kernels of mosaic_gpu_f32), beside tests/test_compile.py's H200 rows
# (d = e = 64 and 128, 100 x 60, plain): H100, d = 256 on both, and 192 x 100 with splits
# and segment ids; precision="highest" (the split-TF32 kernels, every operand tile twice)
# at the widest on both and the awkward shape with splits and segments.
_F32_COMPILES = [
    ("h100_sxm", 2, 4, 2048, 128, 128, "1", False),
    ("h200", 1, 2, 1024, 256, 256, "1", False),
    ("h100_sxm", 1, 2, 1024, 256, 256, "1", False),
    ("h200", 1, 3, 1000, 192, 100, "auto", True),
]
_F32_HIGHEST_COMPILES = [
    ("h200", 1, 2, 1024, 256, 256, "1", False),
    ("h100_sxm", 1, 2, 1024, 256, 256, "1", False),
    ("h200", 1, 3, 1000, 192, 100, "auto", True),
]


_COMPILE_PARAMS = ("target", "b", "h", "n", "d", "e", "splits", "segmented", "dtype", "precision")
_COMPILE_ROWS = (
    [(*row, "bfloat16", "default") for row in _BF16_COMPILES]
    + [(*row, "float32", "default") for row in _F32_COMPILES]
    + [(*row, "float32", "highest") for row in _F32_HIGHEST_COMPILES]
)


def _compile(row) -> tuple[int, str]:
    """One deviceless compile in a subprocess: (exit code, stdout + stderr)."""
    target, b, h, n, d, e, splits, segmented, dtype, precision = row
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        MOSAIC_GPU_DUMP_PTX="1",
        MOSAIC_GPU_DUMP_PTXAS="1",
        PYTHONPATH=str(REPO),
    )
    target_file = GPU_TARGETS / f"{target}.txtpb"
    args = [target_file, b, h, n, d, e, dtype, splits, int(segmented), precision]
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=REPO,
    )
    return result.returncode, result.stdout + result.stderr


@pytest.fixture(scope="module")
def compile_logs(request) -> dict:
    """The compiles of the selected test_compiles_for_hopper_without_spills cases, two at
    a time (each compiler runs on one core)."""
    rows = [
        tuple(item.callspec.params[name] for name in _COMPILE_PARAMS)
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_compiles_for_hopper_without_spills"
    ]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(rows, pool.map(_compile, rows)))


@pytest.mark.compile
@pytest.mark.skipif(_cuda_compile_available() is not None, reason=str(_cuda_compile_available()))
@pytest.mark.parametrize(
    ", ".join(_COMPILE_PARAMS),
    _COMPILE_ROWS,
    ids=lambda x: {True: "segmented", False: "plain"}.get(x) if isinstance(x, bool) else None,
)
def test_compiles_for_hopper_without_spills(
    target, b, h, n, d, e, splits, segmented, dtype, precision, compile_logs
):
    """Forward + backward, the real deviceless compile (Mosaic GPU, ptxas -v): bf16 on the
    16-bit kernels, float32 on the TF32 ones (`mosaic_gpu_f32`)."""
    returncode, log = compile_logs[target, b, h, n, d, e, splits, segmented, dtype, precision]
    assert returncode == 0 and "COMPILED" in log, log[-3000:]
    kernels = re.findall(r"Function properties for (\w+)", log)
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill stores", log)]
    assert kernels and len(spills) == len(kernels), log[-3000:]
    assert not any(spills), dict(zip(kernels, spills))
    # Every kernel's PTX (one per compiled kernel) has tensor-core instructions.
    ptx_modules = log.split("Generated by LLVM NVPTX Back-End")[1:]
    wgmma = {"bfloat16": ".f32.bf16.bf16", "float32": ".f32.tf32.tf32"}[dtype]
    assert ptx_modules and all("wgmma.mma_async.sync.aligned.m64" in m for m in ptx_modules)
    assert all(wgmma in m for m in ptx_modules), f"no {wgmma} wgmma"
    # precision="highest" compiles the split-TF32 kernels, and only those.
    split = ["_split" in name for name in kernels]
    assert all(split) if precision == "highest" else not any(split), kernels
