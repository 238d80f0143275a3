"""What the `[B, T, H, D]` layout saves around the kernels, from real deviceless compiles.

Compiles the token mixer of `lightning_jax.nn.LightningAttention` between its
projections (the fused qkvu activations `[B, T, 4*H*D]` in, the gated, normed
`[B, T, H*D]` out), forward and backward, for a GPU (Triton kernels) and a TPU
(Mosaic TPU kernels) this machine does not have, in two ways:

- "bhtd": q, k, v reshaped to `[B, T, H, D]`, transposed to `[B, H, T, D]` for
  the op and o transposed back: what a layer must do around an op that takes
  only `[B, H, T, D]`;
- "bthd": q, k, v handed to the op as `[B, T, H, D]` (`layout="bthd"`): what the
  library's layers do.

For each it prints the transposes and copies of floating arrays in the compiled
program (all outside the kernels: a kernel is one custom call), the bytes they
read and write, the HBM bytes XLA's cost analysis reports for the whole program
(where the backend reports one) and the compiled program's temporary memory.
Each compile runs in a subprocess with the compile report's environment
(tools/compile_report.py).

    python tools/layout_report.py                      # h100 and v5e, bf16
    python tools/layout_report.py --json=results/layout_report.json
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from absl import flags

import compile_report
from lightning_jax import cli

FLAGS = flags.FLAGS
IMPLS = {"h100": "triton", "h200": "triton", "v5e": "mosaic_tpu", "v6e": "mosaic_tpu"}
LAYOUTS = ("bhtd", "bthd")


def define_flags() -> None:
    flags.DEFINE_list("targets", ["h100", "v5e"], f"Any of {sorted(IMPLS)}.")
    flags.DEFINE_string("shape", "4x4096x16x128", "BxTxHxD of q, k, v (E = D).")
    flags.DEFINE_string("dtype", "bfloat16", "Activation dtype.")
    flags.DEFINE_string("json", "runs/layout_report.json", "Where to write the rows.")
    flags.DEFINE_string("worker", None, "Internal: compile one (target, layout) given as JSON.")
    flags.register_validator(
        "targets", lambda ts: all(t in IMPLS for t in ts), f"must be some of {sorted(IMPLS)}"
    )
    flags.register_validator(
        "shape",
        lambda s: re.fullmatch(r"\d+x\d+x\d+x\d+", s) is not None,
        "must be BxTxHxD, e.g. 4x4096x16x128",
    )


def compile_mixer(target: str, layout: str, shape: tuple[int, ...], dtype: str) -> dict:
    """Compiles the mixer's forward and backward (in this process); returns its figures."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import lightning_jax as lj
    from lightning_jax.nn import merge_heads, simple_rms_norm, split_qkvu

    batch, seq, heads, dim = shape
    job = compile_report.Job(target, IMPLS[target], "fwd_bwd", dtype, (batch, heads, seq, dim, dim))
    mesh = Mesh(np.array(compile_report._devices(job)[:1]), ("x",))
    slopes = lj.alibi_slopes(heads)

    def mixer(qkvu):
        q, k, v, u = split_qkvu(qkvu, heads, dim)  # [B, T, H, D]
        if layout == "bhtd":
            q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
        o = lj.lightning_attention(
            q, k, v, slopes, impl=IMPLS[target], interpret=False, layout=layout
        )
        if layout == "bhtd":
            o = o.transpose(0, 2, 1, 3)
        return simple_rms_norm(merge_heads(o)) * u

    def forward_and_backward(qkvu, dy):
        y, vjp = jax.vjp(mixer, qkvu)
        return y, vjp(dy)[0]

    sharding = NamedSharding(mesh, P())
    qkvu = jax.ShapeDtypeStruct((batch, seq, 4 * heads * dim), jnp.dtype(dtype), sharding=sharding)
    dy = jax.ShapeDtypeStruct((batch, seq, heads * dim), jnp.dtype(dtype), sharding=sharding)
    compiled = jax.jit(forward_and_backward).lower(qkvu, dy).compile()
    hlo = compiled.as_text()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    moves = re.findall(r"= (bf16|f16|f32)\[([\d,]*)\]\S* (transpose|copy)\(", hlo)
    itemsize = {"bf16": 2, "f16": 2, "f32": 4}
    return {
        "transposes": sum(op == "transpose" for *_, op in moves),
        "copies": sum(op == "copy" for *_, op in moves),
        # Each transpose or copy reads and writes its array once.
        "moved_bytes": sum(
            2 * itemsize[t] * int(np.prod([int(x) for x in dims.split(",") if x]))
            for t, dims, _ in moves
        ),
        # XLA's cost analysis of the whole program (not reported by every backend).
        "hbm_bytes": float(cost["bytes accessed"]) if cost else None,
        "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
    }


def run(target: str, layout: str, shape: tuple[int, ...], dtype: str) -> dict:
    """One compile in a subprocess with the compile report's environment."""
    row = {"target": target, "impl": IMPLS[target], "layout": layout, "dtype": dtype}
    row["shape"] = "x".join(map(str, shape))
    job = compile_report.Job(target, IMPLS[target], "fwd_bwd", dtype, (1, 1, 1, 1, 1))
    spec = json.dumps({"target": target, "layout": layout, "shape": shape, "dtype": dtype})
    with tempfile.TemporaryDirectory(prefix="layout_report_") as dump_dir:
        env = compile_report._worker_env(job, dump_dir)
        env.pop("XLA_FLAGS", None)  # no HLO dumps needed
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), f"--worker={spec}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            cwd=Path(__file__).resolve().parent.parent,
        )
    line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("{")), None)
    if proc.returncode or line is None:
        row["error"] = compile_report._last_error(proc.stderr) or f"exit {proc.returncode}"
        return row
    return row | json.loads(line)


def main(argv) -> None:
    del argv
    shape = tuple(int(x) for x in FLAGS.shape.split("x"))
    if FLAGS.worker:
        spec = json.loads(FLAGS.worker)
        figures = compile_mixer(spec["target"], spec["layout"], tuple(spec["shape"]), spec["dtype"])
        print(json.dumps(figures))
        return
    rows = [run(t, layout, shape, FLAGS.dtype) for t in FLAGS.targets for layout in LAYOUTS]
    print(f"LightningAttention mixer fwd+bwd, [B, T, H, D] = {FLAGS.shape}, {FLAGS.dtype}")
    print(
        f"{'target':8} {'impl':11} {'layout':6} {'transposes':>10} {'copies':>6} "
        f"{'moved MB':>9} {'HBM MB':>9} {'temp MB':>8}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['target']:8} {r['impl']:11} {r['layout']:6} FAILED: {r['error']}")
            continue
        hbm = "n/a" if r["hbm_bytes"] is None else f"{r['hbm_bytes'] / 1e6:.1f}"
        print(
            f"{r['target']:8} {r['impl']:11} {r['layout']:6} {r['transposes']:>10} "
            f"{r['copies']:>6} {r['moved_bytes'] / 1e6:>9.1f} {hbm:>9} "
            f"{r['temp_bytes'] / 1e6:>8.1f}"
        )
    out = Path(FLAGS.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {out}")
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
