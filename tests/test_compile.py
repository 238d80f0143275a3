"""Real compiles of every kernel for GPUs and TPUs this machine does not have.

Each compile runs the hardware's own compiler (libtpu's Mosaic compiler; XLA's
GPU compiler with Triton / Mosaic GPU and ptxas) from a target description, in
a subprocess (tools/compile_report.py). A kernel that only lowers can
still be rejected here: VMEM limits, shared memory, register allocation.

Needs the `[aot]` extra; without it these tests are skipped with the reason.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

import compile_report
import lightning_jax as lj

pytestmark = pytest.mark.compile


def _missing_gpu_compiler() -> str | None:
    if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
        return 'the CUDA plugin is not installed (pip install -e ".[aot]")'
    spec = importlib.util.find_spec("nvidia.cuda_nvcc")
    if spec is None or not spec.submodule_search_locations:
        return 'ptxas (nvidia-cuda-nvcc-cu12) is not installed (pip install -e ".[aot]")'
    return None


def _missing_tpu_compiler() -> str | None:
    if importlib.util.find_spec("libtpu") is None:
        return 'libtpu is not installed (pip install -e ".[aot]")'
    return None


SHAPES = [(2, 4, 4096, 128, 128), (2, 4, 4096, 64, 64), (1, 3, 1001, 100, 60)]
TARGETS = ["h200", "v5e", "v6e"]
DTYPES = ["bfloat16", "float32"]


def _jobs() -> list[compile_report.Job]:
    return compile_report.make_jobs(
        TARGETS, [], DTYPES, SHAPES, list(compile_report.MODES), ["default"], True,
        lj.available_impls(),
    )  # fmt: skip


# With segment ids: bf16, d = e = 128 and the awkward shape, every kernel of
# H200 (Triton, Mosaic GPU), v5e and v6e (Mosaic TPU), forward and forward+backward.
SEGMENTED_SHAPES = [SHAPES[0], SHAPES[2]]


def _segmented_jobs() -> list[compile_report.Job]:
    return compile_report.make_jobs(
        TARGETS, [], ["bfloat16"], SEGMENTED_SHAPES, list(compile_report.MODES), ["default"],
        False, lj.available_impls(), segmented=True,
    )  # fmt: skip


JOBS = _jobs() + _segmented_jobs()


def _job_id(job: compile_report.Job) -> str:
    segmented = "-segmented" if job.segmented else ""
    shape = compile_report.shape_str(job.shape)
    return f"{job.target}-{job.impl}-{job.mode}-{job.dtype}-{shape}{segmented}"


@pytest.fixture(scope="module")
def rows() -> dict[compile_report.Job, dict]:
    """Every compile at once (two at a time: the compilers are single-threaded)."""
    runnable = [j for j in JOBS if _skip_reason(j) is None]
    return dict(zip(runnable, compile_report.run_jobs(runnable, timeout=900, parallel=2)))


def _skip_reason(job: compile_report.Job) -> str | None:
    return _missing_gpu_compiler() if job.platform == "gpu" else _missing_tpu_compiler()


@pytest.mark.parametrize("job", JOBS, ids=_job_id)
def test_compiles(job, rows):
    if reason := _skip_reason(job):
        pytest.skip(reason)
    row = rows[job]
    assert row["ok"], row["error"]
    assert row["kernels"], "no kernel of ours in the compiled program"
    if job.platform == "tpu":
        for kernel in row["kernels"]:
            assert kernel["vmem_bytes"] is not None and kernel["vmem_bytes"] > 0, kernel
        if job.shape[2] % 2048 == 0 and not job.sp:
            # Whole grid blocks and d, e as they are: nothing padded or sliced around the kernels
            # (with segment ids: nothing floating-point; the int boundary tables are shifted by
            # a pad and a slice).
            ops = row["float_layout_ops"] if job.segmented else row["layout_ops"]
            assert ops["pad"] == ops["slice"] == 0, ops
        return
    # GPU: ptxas from the pip package, not a system CUDA toolkit.
    assert row["ptxas"] and f"{os.sep}nvidia{os.sep}" in row["ptxas"], row["ptxas"]
    for kernel in row["kernels"]:
        assert kernel.get("registers"), kernel  # ptxas ran on it
        # Tensor cores for bf16 and for float32 at the default (TF32) precision.
        assert kernel.get("wgmma", 0) + kernel.get("mma", 0) > 0, kernel
        # No spills in bf16 anywhere, nor in Mosaic GPU's float32 (TF32) kernels; Triton's
        # float32 kernels spill (docs/kernels.md, compiling for hardware you don't have).
        if job.dtype == "bfloat16" or job.impl == "mosaic_gpu":
            assert compile_report.spill_bytes(kernel) == 0, kernel


def test_highest_precision_float32_has_no_tensor_core_matmul():
    """precision="highest" really changes the GPU kernels (exact float32 FMAs)."""
    if reason := _missing_gpu_compiler():
        pytest.skip(reason)
    job = compile_report.Job("h200", "triton", "fwd", "float32", (1, 2, 512, 64, 64), "highest")
    (row,) = compile_report.run_jobs([job], timeout=900, parallel=1)
    assert row["ok"], row["error"]
    (kernel,) = row["kernels"]
    assert kernel["wgmma"] + kernel["mma"] == 0, kernel


def test_parsers_on_compiler_output():
    """The report's parsers on text in the compilers' formats."""
    ptxas = (
        "ptxas info    : Function properties for lightning_dk\n"
        "    0 bytes stack frame, 52 bytes spill stores, 48 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 1024 bytes smem\n"
    )
    assert compile_report.parse_ptxas(ptxas) == {
        "lightning_dk": {
            "stack_bytes": 0,
            "spill_store_bytes": 52,
            "spill_load_bytes": 48,
            "registers": 255,
            "static_smem_bytes": 1024,
        }
    }
    thunks = (
        "003: kCustomKernel [prev=002 (1) | sink        ] lightning_forward grid: [128, 2, 1] "
        "threads: [256, 1, 1]  shared_memory: 81920 bytes\n"
    )
    assert compile_report.parse_thunks(thunks) == {
        "lightning_forward": {"grid": [128, 2, 1], "threads": [256, 1, 1],
                              "shared_memory_bytes": 81920}
    }  # fmt: skip
    ptx = (
        ".visible .entry lightning_dq(\n wgmma.mma_async.sync.aligned.m64n64k16 ...\n"
        " wgmma.mma_async.sync.aligned.m64n64k16 ...\n}\n"
        ".visible .entry other(\n mma.sync.aligned.m16n8k16 ...\n}\n"
    )
    assert compile_report.ptx_tensor_cores(ptx) == {
        "lightning_dq": {"wgmma": 2, "mma": 0},
        "other": {"wgmma": 0, "mma": 1},
    }
    hlo = (
        '%lightning_forward.1 = (bf16[16]) custom-call(%a), custom_call_target="tpu_custom_call", '
        'metadata={op_name="jit(f)/jit(g)/lightning_forward/pallas_call"}, backend_config='
        '{"used_scoped_memory_configs":[{"memory_space":"1","offset":"0","size":"458752"}]}\n'
    )
    assert compile_report.parse_tpu_vmem(hlo) == {"lightning_forward": {"vmem_bytes": 458752}}
    program = (
        "  %pad.1 = bf16[2,3]{1,0} pad(%a, %b), padding=0_1\n"
        "  %copy.2 = f32[2]{0} copy(%x)\n  %slice.3 = f32[1]{0} slice(%x), slice={[0:1]}\n"
        "  %copy-start = (f32[2]) copy-start(%x)\n"
    )
    assert compile_report.count_layout_ops(program) == {"pad": 1, "slice": 1, "copy": 1}
    segment_tables = "  %pad.4 = s32[2,4096]{1,0} pad(%c, %z), padding=0_0x1_0\n"
    assert compile_report.count_layout_ops(program + segment_tables) == {
        "pad": 2, "slice": 1, "copy": 1
    }  # fmt: skip
    assert compile_report.count_layout_ops(program + segment_tables, floating_only=True) == {
        "pad": 1, "slice": 1, "copy": 1
    }  # fmt: skip


def test_segmented_jobs_and_tables():
    """--segments: every job (the sequence-parallel ones too) segmented; the tables say so,
    and a report without segments prints the tables it printed before (no segmented column)."""
    jobs = compile_report.make_jobs(
        ["h200"],
        ["triton"],
        ["bfloat16"],
        SHAPES[:1],
        ["fwd"],
        ["default"],
        True,
        lj.available_impls(),
        segmented=True,
    )
    assert jobs and all(j.segmented for j in jobs) and any(j.sp for j in jobs)
    row = {
        "target": "h200",
        "impl": "triton",
        "mode": "fwd",
        "dtype": "bfloat16",
        "precision": "default",
        "shape": "2x4x4096x128x128",
        "ok": True,
        "compile_s": 1.0,
        "layout_ops": {},
        "kernels": [{"name": "lightning_forward", "registers": 250}],
    }
    for table in (compile_report.markdown_table, compile_report.markdown_summary):
        assert "segmented" not in table([row])  # a row from before the flag
        assert "segmented" not in table([{**row, "segmented": False}])
        segmented = table([{**row, "segmented": True}])
        assert "| segmented |" in segmented.splitlines()[0]
        assert "| yes |" in segmented.splitlines()[2]
    assert " seg " in compile_report.format_table([{**row, "segmented": True}]).splitlines()[0]
    assert " seg " not in compile_report.format_table([{**row, "segmented": False}])


def test_unknown_target_is_refused():
    with pytest.raises(ValueError, match="--targets: unknown target 'h300'"):
        compile_report.make_jobs(["h300"], [], DTYPES, SHAPES[:1], ["fwd"], ["default"], False,
                                 lj.available_impls())  # fmt: skip
