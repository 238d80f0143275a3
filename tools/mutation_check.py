r"""Mutation check: plant known bugs in a copy of the project and show the tests catch each.

Copies the repository's files (tracked and untracked, not ignored) to a temporary
folder, runs the selected tests there once unmodified (they must pass, or the
check means nothing), then for each mutation patches one source text, runs the
tests that should catch it, and reports how many failed and the first failure's
message. A mutation whose source text is no longer found is reported as
"stale" (a kernel was rewritten: update its pattern here), never silently skipped.

The mutations: the carried state (forward, dQ sweep) or dKV (dK/dV sweeps) rounded
to the input dtype between blocks, in every kernel (Triton's forward, dQ, dK and dV
kernels; Mosaic TPU's forward, dQ and dK-dV kernels; the Mosaic GPU sweep, in order
and reversed) and the XLA path (between chunks, and between blocks inside a chunk),
the precision bug the suite missed before the derived tolerances; a final state
rounded once; segment ids whose state is not reset, or whose intra-block mask is not
cut, at a run boundary (Triton, Mosaic TPU, XLA, both Mosaic GPU sweeps); Mosaic GPU's
float32 (TF32) sweep with its state not decayed, its next-block prefetch taken from
the wrong block, or precision="highest"'s split products reduced to TF32's one; a
query decay off by one row; a sequence-parallel combine decayed one row too many; the
benchmark's FLOP count back to its d == e-only formula.

Each mutation runs the smallest test selection that honestly catches it: the exact
float32-state probe plus the derived-tolerance cases that carry a state across many
blocks (2048 and 4096 rows) for the roundings (the probe alone for Mosaic GPU, whose
interpreter is slow), the boundary-at-every-offset test for segment ids (Mosaic GPU:
at every offset of its 64-row block, in the dtype of the sweep mutated).
Without --only the results are written to runs/mutation_check.json and .md
(--json=results/mutation_check.json for the committed record).

  python tools/mutation_check.py --nocontrol      # skip the unmodified runs
  python tools/mutation_check.py --nostop_at_first   # count every failing test
  python tools/mutation_check.py --only=triton_fwd_state_rounded,xla_fwd_chunk_state_rounded

Exit status 1 if a mutation is missed or stale, or if the control run fails.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

from absl import flags

from lightning_jax import cli
from machine_info import cpu_name

FLAGS = flags.FLAGS
flags.DEFINE_list("only", None, "Names of the mutations to run (default: all).")
flags.DEFINE_bool("control", True, "First run every selected test subset unmodified.")
flags.DEFINE_bool("keep", False, "Keep the temporary copy (its path is printed).")
flags.DEFINE_bool(
    "stop_at_first", True, "Stop each mutation's run at its first failing test (pytest -x)."
)
flags.DEFINE_string(
    "json",
    None,
    "Write the results here as JSON, and a markdown table beside it (.md). Default: "
    "runs/mutation_check.json when every mutation runs (no --only), else nowhere "
    "(--json=results/mutation_check.json: the committed record).",
)
DEFAULT_JSON = "runs/mutation_check.json"

ROUND = ".astype({dtype}).astype(jnp.float32)"
# The exact probe of the carried state, and the derived-tolerance tests at 2048 (no decay)
# and 4096 (ALiBi) rows.
PRECISION_TESTS = "test_carried_state or (test_low_precision and (n2048 or n4096))"
# The Mosaic GPU interpreter is slow: the exact probe alone.
MOSAIC_GPU_TESTS = "test_carried_state"
# The TF32 sweep: split sequences (several blocks per split, strong decay) in float32.
MOSAIC_GPU_F32_TESTS = "test_sequence_splits_match_reference and f32"
# A length-1 run at every offset of a 64-row kernel block (Mosaic GPU's blocks are 64 rows).
MOSAIC_GPU_SEGMENT_TESTS = "test_segment_boundary_at_offsets_of_a_kernel_block"
# A boundary at every offset inside a 16-row block (the state must reset there, the
# mask must be cut there).
SEGMENT_TESTS = "test_segment_boundary_at_every_offset"


class Mutation(NamedTuple):
    name: str
    path: str  # file in the repository
    old: str  # source text to replace (must occur at least `occurrence` + 1 times)
    new: str
    tests: tuple[str, ...]  # pytest arguments selecting the tests that should catch it
    occurrence: int = 0  # which occurrence of `old` to replace
    # The top-level function that occurrence must lie in (else the mutation is stale: a
    # new copy of `old` earlier in the file moved it elsewhere).
    inside: str | None = None


def _pallas(cls: str, expr: str) -> tuple[str, ...]:
    return ("tests/test_pallas.py", "-k", f"{cls} and ({expr})")


MUTATIONS = [
    # --- the carried state rounded to the input dtype between blocks --------------------
    Mutation(
        "triton_fwd_state_rounded",
        "pallas_kernels/triton.py",
        "return state_dec * kv + dot(k_scaled, v, trans_a=True)",
        "return (state_dec * kv + dot(k_scaled, v, trans_a=True))" + ROUND.format(dtype="in_dtype"),
        _pallas("TestTritonInterpret", PRECISION_TESTS),
        inside="_forward_kernel",  # its unsegmented body (the segmented one is next)
    ),
    Mutation(
        "triton_dq_state_rounded",
        "pallas_kernels/triton.py",
        "return state_dec * kv + dot(k_scaled, v, trans_a=True)",
        "return (state_dec * kv + dot(k_scaled, v, trans_a=True))" + ROUND.format(dtype="in_dtype"),
        _pallas("TestTritonInterpret", PRECISION_TESTS),
        occurrence=2,  # the dQ kernel's state sweep (after the forward's two bodies)
        inside="_dq_kernel",
    ),
    Mutation(
        "triton_dk_dkv_rounded",
        "pallas_kernels/triton.py",
        "return state_dec * dkv + dot(q_scaled, do, trans_a=True)",
        "return (state_dec * dkv + dot(q_scaled, do, trans_a=True))"
        + ROUND.format(dtype="in_dtype"),
        _pallas("TestTritonInterpret", PRECISION_TESTS),
        inside="_dk_kernel",
    ),
    Mutation(
        "triton_dv_dkv_rounded",
        "pallas_kernels/triton.py",
        "return state_dec * dkv + dot(q_scaled, do, trans_a=True)",
        "return (state_dec * dkv + dot(q_scaled, do, trans_a=True))"
        + ROUND.format(dtype="in_dtype"),
        _pallas("TestTritonInterpret", PRECISION_TESTS),
        occurrence=1,  # the dV kernel's own dKV sweep (its unsegmented body)
        inside="_dv_kernel",
    ),
    Mutation(
        "triton_final_state_rounded_once",
        "pallas_kernels/triton.py",
        "state_ref[...] = kv",
        "state_ref[...] = kv" + ROUND.format(dtype="q_ref.dtype"),
        _pallas("TestTritonInterpret", PRECISION_TESTS),
    ),
    Mutation(
        "mosaic_tpu_fwd_state_rounded",
        "pallas_kernels/mosaic_tpu.py",
        "kv_ref[...] = kv * state_dec + _dot(k_scaled, v, precision, _TN)",
        "kv_ref[...] = (kv * state_dec + _dot(k_scaled, v, precision, _TN))"
        + ROUND.format(dtype="in_dtype"),
        _pallas("TestMosaicTpuInterpret", PRECISION_TESTS),
        inside="_forward_kernel",
    ),
    Mutation(
        "mosaic_tpu_dq_state_rounded",
        "pallas_kernels/mosaic_tpu.py",
        "kv_ref[...] = kv * state_dec + _dot(k_scaled, v, precision, _TN)",
        "kv_ref[...] = (kv * state_dec + _dot(k_scaled, v, precision, _TN))"
        + ROUND.format(dtype="in_dtype"),
        _pallas("TestMosaicTpuInterpret", PRECISION_TESTS),
        occurrence=1,  # the dQ kernel's state sweep
        inside="_dq_kernel",
    ),
    Mutation(
        "mosaic_tpu_dkdv_dkv_rounded",
        "pallas_kernels/mosaic_tpu.py",
        "dkv_ref[...] = dkv * state_dec + _dot(q_scaled, do, precision, _TN)",
        "dkv_ref[...] = (dkv * state_dec + _dot(q_scaled, do, precision, _TN))"
        + ROUND.format(dtype="in_dtype"),
        _pallas("TestMosaicTpuInterpret", PRECISION_TESTS),
    ),
    # One sweep kernel serves the forward, dQ (in order) and dK, dV (reversed) passes;
    # the float32 state tile f32_s is what it carries (st_s is its input-dtype copy for
    # the next block's matmul, rounded by design).
    Mutation(
        "mosaic_gpu_fwd_dq_state_rounded",
        "pallas_kernels/mosaic_gpu.py",
        "state = state_dec * f32_s[rs] + update\n",
        "state = state_dec * f32_s[rs] + update\n"
        "                if not reverse:  # planted: the forward and dQ sweeps round the state\n"
        "                    state = state.astype(dtype).astype(jnp.float32)\n",
        ("tests/test_mosaic_gpu.py", "-k", MOSAIC_GPU_TESTS),
    ),
    Mutation(
        "mosaic_gpu_dk_dv_state_rounded",
        "pallas_kernels/mosaic_gpu.py",
        "state = state_dec * f32_s[rs] + update\n",
        "state = state_dec * f32_s[rs] + update\n"
        "                if reverse:  # planted: the dK and dV sweeps round dKV\n"
        "                    state = state.astype(dtype).astype(jnp.float32)\n",
        ("tests/test_mosaic_gpu.py", "-k", MOSAIC_GPU_TESTS),
    ),
    # The TF32 sweep (float32 inputs, mosaic_gpu_f32) carries float32 by construction; its
    # own bugs: the state chunk not decayed between blocks, the prefetch of the next
    # block's first chunk taken from this block (a stale tile in every block after the
    # first), and precision="highest"'s split products reduced to head @ head (TF32).
    Mutation(
        "mosaic_gpu_f32_state_not_decayed",
        "pallas_kernels/mosaic_gpu_f32.py",
        "st_s[:, chunk] = state_dec * st_s[:, chunk] + update",
        "st_s[:, chunk] = st_s[:, chunk] + update",
        ("tests/test_mosaic_gpu.py", "-k", MOSAIC_GPU_F32_TESTS),
    ),
    Mutation(
        "mosaic_gpu_f32_prefetch_wrong_block",
        "pallas_kernels/mosaic_gpu_f32.py",
        "load_chunk(step + 1, 0, 0)",
        "load_chunk(step, 0, 0)",
        ("tests/test_mosaic_gpu.py", "-k", MOSAIC_GPU_F32_TESTS),
    ),
    Mutation(
        "mosaic_gpu_f32_split_rest_terms_dropped",
        "pallas_kernels/mosaic_gpu_f32.py",
        "terms = ((0, 0), (0, 1), (1, 0)) if split else ((0, 0),)",
        "terms = ((0, 0),)",
        ("tests/test_mosaic_gpu.py", "-k", "test_highest_precision_float32_matches_reference"),
    ),
    Mutation(
        "xla_fwd_chunk_state_rounded",
        "lightning_jax/xla.py",
        "o_chunk, kv_next = _chunk_forward(*qkv, kv, cut, plan.precision)",
        "o_chunk, kv_next = _chunk_forward(*qkv, kv, cut, plan.precision)\n"
        "            kv_next = kv_next.astype(q.dtype).astype(dtype)",
        ("tests/test_xla.py", "-k", PRECISION_TESTS),
    ),
    # Inside a chunk the XLA path has no input dtype at hand (it computes in float32):
    # the block-start states are rounded to bfloat16, coarser than either input dtype.
    Mutation(
        "xla_fwd_block_states_rounded_bf16",
        "lightning_jax/xla.py",
        "starts = _block_states(k_t, v, kv, dec, precision)\n    o = o +",
        "starts = _block_states(k_t, v, kv, dec, precision)"
        + ROUND.format(dtype="jnp.bfloat16")
        + "\n    o = o +",
        ("tests/test_xla.py", "-k", PRECISION_TESTS),
    ),
    Mutation(
        "xla_bwd_chunk_dkv_rounded",
        "lightning_jax/xla.py",
        "*chunk, dkv = _chunk_backward(*blocked, kv, dkv, dec, plan.precision)",
        "*chunk, dkv = _chunk_backward(*blocked, kv, dkv, dec, plan.precision)\n"
        "        dkv = dkv.astype(q.dtype).astype(dtype)",
        ("tests/test_xla.py", "-k", PRECISION_TESTS),
    ),
    Mutation(
        "xla_bwd_block_dkv_rounded_bf16",
        "lightning_jax/xla.py",
        "d_increments = _prefix(dec.suffix, grads)",
        "d_increments = _prefix(dec.suffix, grads)" + ROUND.format(dtype="jnp.bfloat16"),
        ("tests/test_xla.py", "-k", PRECISION_TESTS),
    ),
    # --- segment ids ------------------------------------------------------------------
    Mutation(
        "triton_segment_state_not_reset",
        "pallas_kernels/triton.py",
        "jnp.where(end == start, state_dec, 0.0)",
        "state_dec",
        _pallas("TestTritonInterpret", SEGMENT_TESTS),
    ),
    Mutation(
        "triton_segment_mask_not_cut",
        "pallas_kernels/triton.py",
        "jnp.where(counts[:, None] == counts[None, :], mask, 0.0)",
        "mask",
        _pallas("TestTritonInterpret", SEGMENT_TESTS),
    ),
    Mutation(
        "mosaic_tpu_segment_state_not_reset",
        "pallas_kernels/mosaic_tpu.py",
        "jnp.where(end == start, state_dec, 0.0)",
        "state_dec",
        _pallas("TestMosaicTpuInterpret", SEGMENT_TESTS),
    ),
    Mutation(
        "mosaic_gpu_segment_state_not_reset",
        "pallas_kernels/mosaic_gpu.py",
        "state_dec = jnp.where(start == end, state_dec, 0.0)",
        "state_dec = state_dec",
        ("tests/test_mosaic_gpu.py", "-k", f"{MOSAIC_GPU_SEGMENT_TESTS} and bf16"),
    ),
    Mutation(  # one helper cuts the mask for both sweeps
        "mosaic_gpu_segment_mask_not_cut",
        "pallas_kernels/_mosaic_gpu_common.py",
        "return jnp.where(rows == cols, mask, 0.0)",
        "return mask",
        ("tests/test_mosaic_gpu.py", "-k", MOSAIC_GPU_SEGMENT_TESTS),
    ),
    Mutation(
        "mosaic_gpu_f32_segment_state_not_reset",
        "pallas_kernels/mosaic_gpu_f32.py",
        "state_dec = jnp.where(seg_s[1, 0] == seg_s[0, block - 1], state_dec, 0.0)",
        "state_dec = state_dec",
        ("tests/test_mosaic_gpu.py", "-k", f"{MOSAIC_GPU_SEGMENT_TESTS} and f32"),
    ),
    Mutation(
        "xla_segment_state_not_reset",
        "lightning_jax/xla.py",
        "prefix=dec.prefix * reaches,",
        "prefix=dec.prefix,",
        ("tests/test_xla.py", "-k", SEGMENT_TESTS),
    ),
    Mutation(
        "xla_segment_mask_not_cut",
        "lightning_jax/xla.py",
        "mask=dec.mask * (counts[..., :, None] == counts[..., None, :]),",
        "mask=dec.mask,",
        ("tests/test_xla.py", "-k", SEGMENT_TESTS),
    ),
    # --- decays, sequence parallelism, benchmark FLOPs -----------------------------------
    Mutation(
        "triton_query_decay_off_by_one",
        "pallas_kernels/triton.py",
        "q_dec = jnp.exp(-slope * (rows + 1).astype(jnp.float32))",
        "q_dec = jnp.exp(-slope * rows.astype(jnp.float32))",
        _pallas("TestTritonInterpret", "test_forward_and_grads_f32 and strong"),
    ),
    Mutation(
        "sp_combine_decay_one_row_too_many",
        "lightning_jax/parallel.py",
        "x = x + _scale(_decay(slopes, shift * m), received)",
        "x = x + _scale(_decay(slopes, shift * m + 1), received)",
        ("tests/test_parallel.py", "-k", "test_sharded_matches_single_device and P4"),
    ),
    Mutation(
        "bench_flops_d_equals_e_formula",
        "benchmarks/bench_ops.py",
        "per_row = 2 * USEFUL_BLOCK * d + 2 * USEFUL_BLOCK * e + 2 * d * e + 2 * d * e",
        "per_row = 2 * USEFUL_BLOCK * d + 2 * USEFUL_BLOCK * d + 2 * d * e + 2 * d * e",
        ("tests/test_bench_ops.py", "-k", "flops"),
    ),
]


def copy_repository(root: str, dest: str) -> None:
    """The files git sees (tracked, and untracked but not ignored) into dest."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\0")
    for rel in filter(None, listed):
        src = os.path.join(root, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)) or dest, exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))


def enclosing_function(text: str, at: int) -> str | None:
    """Name of the last top-level `def` before offset `at` of a Python source, if any."""
    names = re.findall(r"^def (\w+)", text[:at], flags=re.MULTILINE)
    return names[-1] if names else None


def apply(mutation: Mutation, root: str) -> str | None:
    """Patches the copy at root; returns the original text, or None if `old` is not there."""
    path = os.path.join(root, mutation.path)
    with open(path) as f:
        text = f.read()
    starts = [m.start() for m in re.finditer(re.escape(mutation.old), text)]
    if len(starts) <= mutation.occurrence:
        return None
    at = starts[mutation.occurrence]
    if mutation.inside is not None and enclosing_function(text, at) != mutation.inside:
        return None
    with open(path, "w") as f:
        f.write(text[:at] + mutation.new + text[at + len(mutation.old) :])
    return text


def run_tests(root: str, args: tuple[str, ...], stop_at_first: bool = False) -> dict:
    """pytest in the copy: {'passed', 'failed', 'first_failure', 'seconds', 'output'}."""
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    env.pop("PYTHONPATH", None)  # the copy's pyproject puts the copy first on the path
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf"]
        + (["-x"] if stop_at_first else [])
        + list(args),
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    out = proc.stdout + proc.stderr

    def count(word):
        found = re.findall(rf"(\d+) {word}", out.splitlines()[-1] if out else "")
        return int(found[0]) if found else 0

    failures = [line for line in out.splitlines() if line.startswith("FAILED ")]
    return dict(
        passed=count("passed"),
        failed=count("failed") + count("error"),
        returncode=proc.returncode,
        first_failure=failures[0][7:] if failures else "",
        seconds=time.perf_counter() - start,
        output=out,
    )


def write_results(path: str, control: list[dict], rows: list[dict], seconds: float) -> None:
    """The run as JSON at `path` and as a markdown table next to it (same name, .md)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    record = dict(
        command=" ".join(
            ["python tools/mutation_check.py"]
            + [a for a in sys.argv[1:] if not a.startswith("--json")]
        ),
        date=time.strftime("%Y-%m-%d", time.gmtime()),
        machine=cpu_name(),
        cpus=os.cpu_count(),
        python=platform.python_version(),
        jax=_jax_version(),
        stop_at_first=FLAGS.stop_at_first,
        seconds=round(seconds, 1),
        control=control,
        mutations=rows,
    )
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    lines = [
        "| mutation | file | result | caught by (first failing test) | tests run | s |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        caught_by = row["first_failure"].split(" - ")[0] or "-"
        lines.append(
            f"| `{row['name']}` | {row['path']} | {row['result']} | `{caught_by}` | "
            f"{row['ran']} | {row['seconds']:.0f} |"
        )
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def _jax_version() -> str:
    try:
        from importlib.metadata import version

        return version("jax")
    except Exception:  # noqa: BLE001 - only a label in the record
        return "unknown"


def main(argv):
    del argv
    began = time.perf_counter()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    selected = [m for m in MUTATIONS if not FLAGS.only or m.name in FLAGS.only]
    unknown = set(FLAGS.only or ()) - {m.name for m in MUTATIONS}
    if unknown:
        raise SystemExit(f"--only names unknown mutations {sorted(unknown)}")
    work = tempfile.mkdtemp(prefix="lightning_mutation_")
    copy_repository(root, work)
    print(f"copy of the project: {work}")
    ok = True
    control, rows = [], []
    if FLAGS.control:
        for args in dict.fromkeys(m.tests for m in selected):
            result = run_tests(work, args)
            status = "pass" if result["returncode"] == 0 and result["passed"] else "FAIL"
            ok &= status == "pass"
            control.append(
                dict(
                    tests=" ".join(args),
                    result=status,
                    passed=result["passed"],
                    failed=result["failed"],
                    seconds=round(result["seconds"], 1),
                )
            )
            print(f"control {' '.join(args)}: {status} ({result['passed']} passed, "
                  f"{result['failed']} failed, {result['seconds']:.0f} s)", flush=True)  # fmt: skip
            if status != "pass":
                print(result["output"][-3000:])
    print(f"{'mutation':>36} {'result':>7} {'failed':>6} {'ran':>3} {'s':>5}  first failure")
    for mutation in selected:
        row = dict(name=mutation.name, path=mutation.path, tests=" ".join(mutation.tests))
        original = apply(mutation, work)
        if original is None:
            ok = False
            rows.append(dict(row, result="STALE", failed=0, ran=0, seconds=0.0, first_failure=""))
            print(f"{mutation.name:>36} {'STALE':>7}  (text not found in {mutation.path})")
            continue
        try:
            result = run_tests(work, mutation.tests, FLAGS.stop_at_first)
        finally:
            with open(os.path.join(work, mutation.path), "w") as f:
                f.write(original)
        caught = result["failed"] > 0
        ok &= caught
        total = result["failed"] + result["passed"]
        rows.append(
            dict(
                row,
                result="caught" if caught else "MISSED",
                failed=result["failed"],
                ran=total,
                seconds=round(result["seconds"], 1),
                first_failure=result["first_failure"],
            )
        )
        print(
            f"{mutation.name:>36} {'caught' if caught else 'MISSED':>7} {result['failed']:>6} "
            f"{total:>3} {result['seconds']:>5.0f}  {result['first_failure'][:160]}",
            flush=True,
        )
    if not FLAGS.keep:
        shutil.rmtree(work, ignore_errors=True)
    json_path = FLAGS.json
    if json_path is None and not FLAGS.only:
        json_path = os.path.join(root, DEFAULT_JSON)
    if json_path:
        write_results(json_path, control, rows, time.perf_counter() - began)
        print(f"wrote {json_path} and its .md table")
    print("every mutation caught" if ok else "NOT every mutation caught (or control failed)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    cli.run(main)
