"""Compile every kernel for GPUs and TPUs this machine does not have, and report.

The compilers run without the hardware: libtpu compiles Mosaic TPU kernels for
a TPU topology description, and the CUDA plugin compiles Triton / Mosaic GPU
kernels (ptxas included) for a GPU target description (`gpu_targets/*.txtpb`,
from openxla). Each compile runs in its own subprocess with a timeout (a bad
block size can compile for minutes) and reports: ok or the compiler's error,
compile seconds, `memory_analysis()` of the whole program, and per kernel what
the compiler says about resources:

- GPU: grid, threads and shared memory (XLA's thunk sequence), registers and
  spill bytes (`ptxas -v`), and the tensor-core instructions in its PTX
  (`wgmma` / `mma` counts);
- TPU: the scoped VMEM the kernel uses (XLA's compiled HLO).

`--segments` compiles every kernel with `segment_ids` (int32 [B, T], an argument
of the compiled program like q, k, v: the program does not depend on its values)
instead of without; rows then say `segmented: true`.

Needs the `[aot]` extra (`pip install -e ".[aot]"`). Example:

    python tools/compile_report.py --targets=h200,v5e,v6e --json=/tmp/compile.json
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import flags

from lightning_jax import cli

GPU_TARGET_DIR = Path(__file__).resolve().parent / "gpu_targets"
GPU_TARGETS = {"h100": "h100_sxm.txtpb", "h200": "h200.txtpb"}
TPU_TARGETS = {
    "v4": "v4:1x1x1",
    "v5e": "v5e:1x1",
    "v5p": "v5p:1x1x1",
    "v6e": "v6e:1x1",
    "tpu7x": "tpu7x:1x1x1",
}
# Multi-device targets for the sequence-parallel op: TPU topology names, and
# GPU "<partitions>x<hosts>x<devices per host>".
SP_TARGETS = {"v5e:2x2": ("tpu", "v5e:2x2"), "4xh200": ("gpu", "1x1x4")}
GPU_IMPLS = ("triton", "mosaic_gpu")
# Combinations a kernel refuses before compiling (NotImplementedError), left out.
UNSUPPORTED: dict[tuple[str, str, str], str] = {}
TPU_IMPLS = ("mosaic_tpu",)
MODES = ("fwd", "fwd_bwd")
DEFAULT_SHAPES = "4x32x8192x128x128,4x32x8192x64x64,1x3x1001x100x60,1x3x1001x192x100"

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags (defined only when run as a script, so that the tests
    can import this module beside other scripts that define flags of the same names)."""
    flags.DEFINE_list("targets", ["h200", "v5e", "v6e"], f"Any of {[*GPU_TARGETS, *TPU_TARGETS]}.")
    flags.DEFINE_list("impls", [], "Kernels to compile (default: every kernel of each target).")
    flags.DEFINE_list("dtypes", ["bfloat16", "float32"], "Input dtypes.")
    flags.DEFINE_list("shapes", DEFAULT_SHAPES.split(","), "BxHxTxDxE shapes.")
    flags.DEFINE_list("modes", list(MODES), "fwd (forward) and/or fwd_bwd (forward+backward).")
    flags.DEFINE_list("precisions", ["default"], 'float32 matmul precision: "default", "highest".')
    flags.DEFINE_bool("sp", True, f"Also compile the sequence-parallel op on {list(SP_TARGETS)}.")
    flags.DEFINE_bool(
        "segments", False, "Compile the op with segment_ids (int32 [B, T]) instead of without."
    )
    flags.DEFINE_string("json", None, "Write the rows as a JSON list here.")
    flags.DEFINE_bool("markdown", False, "Also print a markdown table (one line per compile).")
    flags.DEFINE_integer(
        "timeout", 600, "Seconds per compile before it counts as failed.", lower_bound=1
    )
    flags.DEFINE_integer("jobs", 2, "Compiles run at once.", lower_bound=1)
    flags.DEFINE_string("worker", None, "Internal: compile one job given as JSON and print a row.")


@dataclasses.dataclass(frozen=True)
class Job:
    """One compile: a target, a kernel, a mode, a dtype and a shape, with or without segments."""

    target: str  # a key of GPU_TARGETS / TPU_TARGETS / SP_TARGETS
    impl: str
    mode: str
    dtype: str
    shape: tuple[int, int, int, int, int]  # batch, heads, seq, d, e
    precision: str = "default"
    block_size: int | None = None  # None: the kernel's default
    segmented: bool = False  # with segment_ids int32 [batch, seq]

    @property
    def platform(self) -> str:
        if self.target in SP_TARGETS:
            return SP_TARGETS[self.target][0]
        return "gpu" if self.target in GPU_TARGETS else "tpu"

    @property
    def sp(self) -> bool:
        return self.target in SP_TARGETS


def parse_shape(text: str) -> tuple[int, int, int, int, int]:
    parts = tuple(int(x) for x in text.lower().split("x"))
    if len(parts) != 5 or min(parts) < 1:
        raise ValueError(f"a shape is BxHxTxDxE with positive sizes, got {text!r}")
    return parts  # type: ignore[return-value]


def shape_str(shape) -> str:
    return "x".join(str(x) for x in shape)


def impls_for(target: str, requested: list[str], available: tuple[str, ...]) -> list[str]:
    platform = SP_TARGETS[target][0] if target in SP_TARGETS else None
    platform = platform or ("gpu" if target in GPU_TARGETS else "tpu")
    own = GPU_IMPLS if platform == "gpu" else TPU_IMPLS
    return [i for i in own if i in available and (not requested or i in requested)]


def make_jobs(
    targets, impls, dtypes, shapes, modes, precisions, sp, available, segmented: bool = False
) -> list[Job]:
    """Every combination the flags ask for (float32 once per precision), all with segment
    ids when `segmented`."""
    jobs = []
    for target in targets:
        if target not in GPU_TARGETS and target not in TPU_TARGETS:
            raise ValueError(f"--targets: unknown target {target!r}")
        for impl in impls_for(target, impls, available):
            for dtype in dtypes:
                for precision in precisions if dtype == "float32" else ["default"]:
                    if (impl, dtype, precision) in UNSUPPORTED:
                        continue
                    for shape in shapes:
                        jobs += [
                            Job(target, impl, m, dtype, shape, precision, segmented=segmented)
                            for m in modes
                        ]
    if sp:
        shape = (1, 8, 8192, 128, 128)
        for target in SP_TARGETS:
            for impl in impls_for(target, impls, available):
                jobs += [
                    Job(target, impl, m, "bfloat16", shape, segmented=segmented) for m in modes
                ]
    return jobs


# ---------------------------------------------------------------- the worker


def _wheel_ptxas_dir() -> str | None:
    """bin/ of the nvidia-cuda-nvcc-cu12 wheel (the [aot] extra's ptxas), if installed."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia.cuda_nvcc")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "bin")
    return path if os.path.exists(os.path.join(path, "ptxas")) else None


def _worker_env(job: Job, dump_dir: str) -> dict[str, str]:
    env = dict(os.environ)
    # This checkout's kernels, whatever copy of the package is installed: the worker's
    # sys.path starts at tools/, not at the checkout's root.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    env["JAX_PLATFORMS"] = "cpu"  # the compilers run without their devices
    env["XLA_FLAGS"] = f"--xla_dump_to={dump_dir}"
    if job.platform == "tpu":
        env["TPU_SKIP_MDS_QUERY"] = "1"  # no cloud metadata server here
        env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"  # compiles run in parallel
    else:
        env["TF_CPP_MIN_LOG_LEVEL"] = "0"
        env["TF_CPP_VMODULE"] = "subprocess_compilation=3"  # ptxas -v output
        # Mosaic GPU compiles its kernels itself: ptxas -v and the PTX go to stdout.
        env["MOSAIC_GPU_DUMP_PTXAS"] = "1"
        env["MOSAIC_GPU_DUMP_PTX"] = "1"
        # Mosaic GPU looks for ptxas on PATH first (XLA looks beside the CUDA plugin
        # first): put the [aot] extra's ptxas first, so that every kernel is compiled
        # by the same ptxas whatever CUDA toolkit the machine has.
        if ptxas_dir := _wheel_ptxas_dir():
            env["PATH"] = os.pathsep.join([ptxas_dir, env.get("PATH", "")])
    return env


def _devices(job: Job):
    from jax.experimental import topologies

    if job.platform == "tpu":
        if job.sp:  # a multi-chip host: libtpu's default host bounds fit
            name = SP_TARGETS[job.target][1]
            return topologies.get_topology_desc(topology_name=name, platform="tpu").devices
        return topologies.get_topology_desc(
            topology_name=TPU_TARGETS[job.target], platform="tpu", chips_per_host_bounds=[1, 1, 1]
        ).devices
    config = (GPU_TARGET_DIR / GPU_TARGETS["h200" if job.sp else job.target]).read_text()
    topology = SP_TARGETS[job.target][1] if job.sp else "1x1x1"
    return topologies.get_topology_desc(
        platform="cuda", topology=topology, target_config=config
    ).devices


def compile_job(job: Job) -> dict:
    """Compiles one job in this process (the worker); returns its row's own fields."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import lightning_jax as lj
    from lightning_jax.parallel import lightning_attention_sharded

    batch, heads, seq, d, e = job.shape
    dtype = jnp.dtype(job.dtype)
    slopes = lj.alibi_slopes(heads)
    # One device unless sequence-parallel (a v4 chip shows its two cores as devices).
    devices = _devices(job) if job.sp else _devices(job)[:1]
    mesh = Mesh(np.array(devices), ("seq",))
    seq_sharded = NamedSharding(mesh, P(None, None, "seq", None) if job.sp else P())
    ids_sharded = NamedSharding(mesh, P(None, "seq") if job.sp else P())
    replicated = NamedSharding(mesh, P())

    def fwd(q, k, v, s0, segment_ids):
        if job.sp:
            return lightning_attention_sharded(
                q, k, v, slopes, initial_state=s0, return_final_state=True, mesh=mesh,
                seq_axis="seq", impl=job.impl, interpret=False, segment_ids=segment_ids,
            )  # fmt: skip
        return lj.lightning_attention(
            q, k, v, slopes, initial_state=s0, return_final_state=True, impl=job.impl,
            interpret=False, precision=job.precision, block_size=job.block_size,
            segment_ids=segment_ids,
        )  # fmt: skip

    def fwd_bwd(q, k, v, s0, segment_ids):
        def loss(q, k, v, s0):
            o, state = fwd(q, k, v, s0, segment_ids)
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(state)

        return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, s0)

    qk = jax.ShapeDtypeStruct((batch, heads, seq, d), dtype, sharding=seq_sharded)
    v = jax.ShapeDtypeStruct((batch, heads, seq, e), dtype, sharding=seq_sharded)
    s0 = jax.ShapeDtypeStruct((batch, heads, d, e), jnp.float32, sharding=replicated)
    # Segment ids are an argument: the compiled program is the same whatever their runs.
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=ids_sharded)
    fn = fwd if job.mode == "fwd" else fwd_bwd
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(qk, qk, v, s0, ids if job.segmented else None).compile()
    seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    memory = {
        name: int(getattr(stats, f"{name}_size_in_bytes"))
        for name in ("argument", "output", "temp", "generated_code")
        if stats is not None and hasattr(stats, f"{name}_size_in_bytes")
    }
    return {"compile_s": round(seconds, 3), "memory": memory, "hlo": compiled.as_text()}


# ---------------------------------------------------------------- parsing


_PTXAS_FUNCTION = re.compile(r"Function properties for (\S+)")
_PTXAS_SPILLS = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas(log: str) -> dict[str, dict]:
    """`ptxas -v` output -> {kernel: registers, spill bytes, stack, static smem}."""
    out: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        if m := _PTXAS_FUNCTION.search(line):
            current = out.setdefault(m.group(1), {})
        elif current is not None and (m := _PTXAS_SPILLS.search(line)):
            current.update(
                stack_bytes=int(m.group(1)),
                spill_store_bytes=int(m.group(2)),
                spill_load_bytes=int(m.group(3)),
            )
        elif current is not None and (m := _PTXAS_REGISTERS.search(line)):
            current["registers"] = int(m.group(1))
            current["static_smem_bytes"] = int(m.group(2) or 0)
            current = None
    return out


_THUNK = re.compile(
    r"kCustomKernel.*?\]\s+(\S+)\s+grid: \[(\d+), (\d+), (\d+)\]\s+threads: \[(\d+), (\d+), (\d+)\]"
    r"\s+shared_memory: (\d+) bytes"
)


def parse_thunks(text: str) -> dict[str, dict]:
    """XLA's GPU thunk sequence -> {kernel: grid, threads, shared memory}."""
    out = {}
    for m in _THUNK.finditer(text):
        out[m.group(1)] = {
            "grid": [int(m.group(i)) for i in (2, 3, 4)],
            "threads": [int(m.group(i)) for i in (5, 6, 7)],
            "shared_memory_bytes": int(m.group(8)),
        }
    return out


def ptx_tensor_cores(text: str) -> dict[str, dict]:
    """PTX -> {entry function: count of wgmma and mma instructions in its body}."""
    out = {}
    parts = re.split(r"\.entry\s+(\w+)", text)
    for name, body in zip(parts[1::2], parts[2::2]):
        out[name] = {
            "wgmma": len(re.findall(r"\bwgmma\.mma_async", body)),
            "mma": len(re.findall(r"\bmma\.sync", body)),
        }
    return out


_TPU_CALL = re.compile(r'custom_call_target="tpu_custom_call".*')


def parse_tpu_vmem(hlo: str) -> dict[str, dict]:
    """Compiled TPU HLO -> {kernel: scoped VMEM bytes it uses}."""
    out = {}
    for line in hlo.splitlines():
        if 'custom_call_target="tpu_custom_call"' not in line:
            continue
        name = re.search(r'op_name="[^"]*?/(\w+)/pallas_call"', line)
        used = re.search(r'"used_scoped_memory_configs":\[([^\]]*)\]', line)
        sizes = re.findall(r'"size":"(\d+)"', used.group(1)) if used else []
        key = name.group(1) if name else f"kernel_{len(out)}"
        out[key] = {"vmem_bytes": sum(int(s) for s in sizes) if used else None}
    return out


def count_layout_ops(hlo: str, floating_only: bool = False) -> dict[str, int]:
    """pad, slice and copy instructions in a compiled program: data moved around the kernels.

    floating_only: only those with a floating-point result (q, k, v, o, states and their
    gradients), not the integer tables that segment ids are turned into.
    """
    result = r"(?:bf16|f16|f32|f64)\[\S+" if floating_only else r"\S+"
    return {op: len(re.findall(rf"= {result} {op}\(", hlo)) for op in ("pad", "slice", "copy")}


def gpu_kernels(log: str, dump_dir: str, names: set[str]) -> list[dict]:
    """Per-kernel figures of a GPU compile (its output in `log`), for the kernels in `names`."""
    ptxas = parse_ptxas(log)
    thunks, cores = {}, ptx_tensor_cores(log)
    for path in glob.glob(os.path.join(dump_dir, "*thunk_sequence.txt")):
        thunks.update(parse_thunks(Path(path).read_text(errors="replace")))
    for path in glob.glob(os.path.join(dump_dir, "*.ptx")):
        cores.update(ptx_tensor_cores(Path(path).read_text(errors="replace")))
    kernels = []
    for name in sorted(n for n in set(ptxas) | set(thunks) if _is_ours(n, names)):
        row = {"name": name}
        row.update(thunks.get(name, {}))
        row.update(ptxas.get(name, {}))
        row.update(cores.get(name, {}))
        kernels.append(row)
    return kernels


def _is_ours(name: str, names: set[str]) -> bool:
    return any(name == n or name.startswith(n) for n in names)


# ---------------------------------------------------------------- the driver


def run_job(job: Job, timeout: float) -> dict:
    """Compiles `job` in a subprocess; returns its row."""
    row = {
        "target": job.target,
        "impl": job.impl,
        "mode": job.mode,
        "dtype": job.dtype,
        "precision": job.precision,
        "shape": shape_str(job.shape),
        "block_size": job.block_size,
        "sp": job.sp,
        "segmented": job.segmented,
        "ok": False,
        "error": None,
        "compile_s": None,
        "memory": {},
        "layout_ops": {},
        "kernels": [],
    }
    with tempfile.TemporaryDirectory(prefix="compile_report_") as dump_dir:
        spec = json.dumps(dataclasses.asdict(job))
        cmd = [sys.executable, os.path.abspath(__file__), f"--worker={spec}"]
        try:
            proc = subprocess.run(
                cmd,
                env=_worker_env(job, dump_dir),
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=Path(__file__).resolve().parent.parent,
            )
        except subprocess.TimeoutExpired:
            row["error"] = f"timed out after {timeout:.0f} s"
            return row
        result_line = next(
            (x for x in reversed(proc.stdout.splitlines()) if x.startswith("{")), None
        )
        if proc.returncode != 0 or result_line is None:
            row["error"] = _last_error(proc.stderr) or f"exit code {proc.returncode}"
            return row
        result = json.loads(result_line)
        row.update(ok=True, compile_s=result["compile_s"], memory=result["memory"])
        row["layout_ops"] = count_layout_ops(result["hlo"])
        if job.segmented:  # the boundary-count tables are built with pads and slices
            row["float_layout_ops"] = count_layout_ops(result["hlo"], floating_only=True)
        names = {"lightning"}
        if job.platform == "gpu":
            row["kernels"] = gpu_kernels(proc.stderr + proc.stdout, dump_dir, names)
            ptxas = re.search(r"Using (\S+ptxas) with version (\S+)", proc.stderr)
            row["ptxas"] = f"{ptxas.group(1)} {ptxas.group(2)}" if ptxas else None
        else:
            vmem = parse_tpu_vmem(result["hlo"])
            row["kernels"] = [{"name": n, **v} for n, v in sorted(vmem.items())]
    return row


def _last_error(stderr: str) -> str | None:
    lines = [x for x in stderr.splitlines() if x.strip() and not x.startswith("WARNING: ")]
    errors = [x for x in lines if "Error" in x or "error" in x]
    return (errors or lines or [None])[-1]


def run_jobs(jobs: list[Job], timeout: float, parallel: int) -> list[dict]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        return list(pool.map(lambda j: run_job(j, timeout), jobs))


def spill_bytes(kernel: dict) -> int:
    return kernel.get("spill_store_bytes", 0) + kernel.get("spill_load_bytes", 0)


def _any_segmented(rows: list[dict]) -> bool:
    """Whether the tables need a segmented column (none in a report without segments)."""
    return any(r.get("segmented") for r in rows)


def format_table(rows: list[dict]) -> str:
    seg = _any_segmented(rows)
    header = (
        f"{'target':>8} {'impl':>10} {'mode':>7} {'dtype':>8} {'prec':>7} {'shape':>20} "
        + (f"{'seg':>3} " if seg else "")
        + f"{'ok':>3} {'s':>6} {'pad/slc/cpy':>11} {'kernel':>18} {'grid':>14} {'thr':>4} "
        f"{'smem':>7} {'regs':>4} {'spill':>6} {'wgmma':>5} {'mma':>5} {'vmem KiB':>8}"
    )
    lines = [header]
    for r in rows:
        lead = (
            f"{r['target']:>8} {r['impl']:>10} {r['mode']:>7} {r['dtype']:>8} "
            f"{r['precision']:>7} {r['shape']:>20} "
            + (f"{'yes' if r.get('segmented') else 'no':>3} " if seg else "")
            + f"{'yes' if r['ok'] else 'NO':>3} {(r['compile_s'] or 0):6.1f}"
        )
        ops = r.get("layout_ops") or {}
        lead += f" {'/'.join(str(ops.get(o, '-')) for o in ('pad', 'slice', 'copy')):>11}"
        if not r["ok"]:
            lines.append(f"{lead}  {r['error']}")
            continue
        for i, k in enumerate(r["kernels"] or [{}]):
            grid = "x".join(map(str, k.get("grid", []))) or "-"
            vmem = k.get("vmem_bytes")
            lines.append(
                f"{lead if i == 0 else ' ' * len(lead)} {k.get('name', '-'):>18} {grid:>14} "
                f"{k.get('threads', [0])[0] or '-':>4} {k.get('shared_memory_bytes', '-'):>7} "
                f"{k.get('registers', '-'):>4} {spill_bytes(k) if 'registers' in k else '-':>6} "
                f"{k.get('wgmma', '-'):>5} {k.get('mma', '-'):>5} "
                f"{'-' if vmem is None else f'{vmem / 1024:.0f}':>8}"
            )
    return "\n".join(lines)


def _kernel_summary(kernel: dict) -> str:
    name = kernel.get("name", "?").removeprefix("lightning_")
    if kernel.get("vmem_bytes") is not None:
        return f"{name} {kernel['vmem_bytes'] / 2**20:.2f} MiB"
    if "registers" not in kernel:
        return name
    parts = [f"{kernel['registers']} regs", f"{spill_bytes(kernel)} B spill"]
    if "shared_memory_bytes" in kernel:
        parts.append(f"{kernel['shared_memory_bytes'] // 1024} KiB smem")
    parts.append(f"{kernel.get('wgmma', 0)} wgmma" if kernel.get("wgmma") else "no wgmma")
    return f"{name} " + ", ".join(parts)


def markdown_table(rows: list[dict]) -> str:
    """One line per compile: GPU registers / spills / shared memory / wgmma, TPU VMEM."""
    seg = _any_segmented(rows)
    lines = [
        "| target | impl | mode | dtype | shape | " + ("segmented | " if seg else "")
        + "ok | s | per kernel |",
        "| --- | --- | --- | --- | --- | " + ("--- | " if seg else "") + "--- | ---: | --- |",
    ]  # fmt: skip
    for r in rows:
        prec = "" if r["dtype"] != "float32" else f" ({r['precision']})"
        kernels = "; ".join(_kernel_summary(k) for k in r["kernels"]) or (r["error"] or "")
        lines.append(
            f"| {r['target']} | {r['impl']} | {r['mode']} | {r['dtype']}{prec} | {r['shape']} | "
            + (f"{'yes' if r.get('segmented') else 'no'} | " if seg else "")
            + f"{'yes' if r['ok'] else 'NO'} | {r['compile_s'] or 0:.1f} | {kernels} |"
        )
    return "\n".join(lines)


def markdown_summary(rows: list[dict]) -> str:
    """One line per target, impl, dtype and mode over all shapes: the worst figures."""
    seg = _any_segmented(rows)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["target"], r["impl"], r["dtype"], r["precision"], r["mode"], r.get("segmented"))
        groups.setdefault(key, []).append(r)
    lines = [
        "| target | impl | dtype | mode | " + ("segmented | " if seg else "")
        + "compiled | max regs | max spill B | max smem KiB | min wgmma | max VMEM MiB |",
        "| --- | --- | --- | --- | " + ("--- | " if seg else "")
        + "---: | ---: | ---: | ---: | ---: | ---: |",
    ]  # fmt: skip
    for (target, impl, dtype, precision, mode, segmented), rs in groups.items():
        kernels = [k for r in rs for k in r["kernels"]]
        gpu = [k for k in kernels if "registers" in k]
        tpu = [k["vmem_bytes"] for k in kernels if k.get("vmem_bytes") is not None]
        smem = [k["shared_memory_bytes"] for k in gpu if "shared_memory_bytes" in k]

        def fmt(values, f=str):
            return f(max(values)) if values else "-"

        lines.append(
            f"| {target} | {impl} | {dtype}{'' if dtype != 'float32' else f' ({precision})'} "
            f"| {mode} | "
            + (f"{'yes' if segmented else 'no'} | " if seg else "")
            + f"{sum(r['ok'] for r in rs)}/{len(rs)} "
            f"| {fmt([k['registers'] for k in gpu])} | {fmt([spill_bytes(k) for k in gpu])} "
            f"| {fmt(smem, lambda x: str(x // 1024))} "
            f"| {min(k.get('wgmma', 0) for k in gpu) if gpu else '-'} "
            f"| {fmt(tpu, lambda x: f'{x / 2**20:.1f}')} |"
        )
    return "\n".join(lines)


def main(argv):
    del argv
    if FLAGS.worker:
        spec = json.loads(FLAGS.worker)
        job = Job(**{**spec, "shape": tuple(spec["shape"])})
        print(json.dumps(compile_job(job)))
        return
    import lightning_jax as lj

    jobs = make_jobs(
        FLAGS.targets,
        FLAGS.impls,
        FLAGS.dtypes,
        [parse_shape(s) for s in FLAGS.shapes],
        FLAGS.modes,
        FLAGS.precisions,
        FLAGS.sp,
        lj.available_impls(),
        segmented=FLAGS.segments,
    )
    for (impl, dtype, precision), why in UNSUPPORTED.items():
        asked = dtype in FLAGS.dtypes and precision in FLAGS.precisions
        if asked and (not FLAGS.impls or impl in FLAGS.impls):
            print(f"not compiled: {impl} with {dtype} inputs at precision={precision} ({why})")
    print(f"{len(jobs)} compiles, {FLAGS.jobs} at a time", flush=True)
    rows = run_jobs(jobs, FLAGS.timeout, FLAGS.jobs)
    print(format_table(rows))
    if FLAGS.markdown:
        print(markdown_table(rows))
        print(markdown_summary(rows))
    failed = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)} of {len(rows)} compiled")
    if FLAGS.json:
        Path(FLAGS.json).write_text(json.dumps(rows, indent=1))
        print(f"wrote {FLAGS.json}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
