r"""Sequence-parallel benchmark: communication and time vs. devices and seq.

For P in --devices (forced host CPU devices; the script sets XLA_FLAGS itself
before importing jax) and every seq, runs `lightning_attention_sharded` with the
sequence split over P devices, forward and forward+backward, for each combine
("all_gather", "ppermute"). Reports

- the bytes communicated per device per step, read from the compiled HLO: for
  every collective (all-gather, all-reduce, collective-permute, reduce-scatter,
  all-to-all, and their async -start forms) the size of its result, summed
  (operand sizes are in the JSON too), and the number of collectives;
- the median wall time over --reps interleaved repetitions.

The communicated bytes depend on B, H, D, E and P only: constant in seq.
P = 1 is the single-device op under the same wrapper (its backward keeps one
trivial all-reduce over a 1-device axis: shard_map's sum of the initial state's
gradient). On one CPU the "devices" share the cores, so the times show the
overhead of splitting, not a speed-up; seq 128 is dominated by the combine.

  python benchmarks/bench_sp.py                          # default: ~1-1.5 min on 2 cores
  python benchmarks/bench_sp.py --seqs=4096,65536 --devices=1,8 --reps=7
"""

from __future__ import annotations

import os
import re

from absl import flags

from lightning_jax import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags (defined when run as a script, so the module imports cleanly
    beside other benchmarks that define flags of the same names)."""
    flags.DEFINE_list("devices", ["1", "2", "4", "8"], "Numbers of devices to split seq over.")
    cli.int_list("devices")
    flags.DEFINE_list("seqs", ["128", "2048", "8192", "32768"], "Global sequence lengths.")
    cli.int_list("seqs")
    flags.DEFINE_list("combines", ["ppermute", "all_gather"], "Cross-device state combines.")
    cli.choice_list("combines", ("ppermute", "all_gather"))
    flags.DEFINE_integer("batch", 1, "Batch size.", lower_bound=1)
    flags.DEFINE_integer("heads", 4, "Heads.", lower_bound=1)
    flags.DEFINE_integer("dim", 64, "d = e.", lower_bound=1)
    flags.DEFINE_string("impl", "xla", "Single-device implementation run on each shard.")
    flags.DEFINE_integer("reps", 5, "Interleaved repetitions (median reported).", lower_bound=1)
    flags.DEFINE_string("out", "runs/bench_sp.json", "JSON output path ('' to skip).")


COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "reduce-scatter", "all-to-all")
_ITEMSIZE = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip


def _set_device_count(n: int) -> None:
    """Forces n host devices; must run before jax initialises its backends."""
    flag = "--xla_force_host_platform_device_count"
    current = os.environ.get("XLA_FLAGS", "")
    kept = " ".join(f for f in current.split() if not f.startswith(flag))
    os.environ["XLA_FLAGS"] = f"{kept} {flag}={n}".strip()


def _shapes_bytes(text: str) -> int:
    """Total bytes of the array shapes written in an HLO fragment, e.g. f32[8,64]{1,0}."""
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", text):
        if dtype in _ITEMSIZE:
            size = 1
            for dim in filter(None, dims.split(",")):
                size *= int(dim)
            total += size * _ITEMSIZE[dtype]
    return total


def collective_bytes(hlo_text: str) -> dict:
    """Collectives in compiled HLO text: count, summed result bytes and operand bytes."""
    shapes = {}  # instruction name -> its result shape text
    collectives = []
    define = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")
    for line in hlo_text.splitlines():
        match = define.match(line)
        if not match:
            continue
        name, result, op, rest = match.groups()
        shapes[name] = result
        kind = op.removesuffix("-start")
        if kind in COLLECTIVES:
            depth, end = 1, len(rest)
            for i, ch in enumerate(rest):
                depth += {"(": 1, ")": -1}.get(ch, 0)
                if depth == 0:
                    end = i
                    break
            collectives.append((kind, result, re.findall(r"%([\w.\-]+)", rest[:end])))
    kinds: dict[str, int] = {}
    result_bytes = operand_bytes = 0
    for kind, result, operands in collectives:
        kinds[kind] = kinds.get(kind, 0) + 1
        result_bytes += _shapes_bytes(result)
        operand_bytes += sum(_shapes_bytes(shapes.get(o, "")) for o in operands)
    return dict(
        count=len(collectives), kinds=kinds, result_bytes=result_bytes, operand_bytes=operand_bytes
    )


def run(
    devices: list[int],
    seqs: list[int],
    combines: list[str],
    b: int,
    h: int,
    dim: int,
    impl: str,
    reps: int,
) -> dict:
    """Communication (from the compiled HLO) and median time of every (P, combine, seq)."""
    import statistics
    import time

    import jax
    import numpy as np
    from jax.sharding import Mesh

    import lightning_jax as lj
    from lightning_jax.parallel import lightning_attention_sharded

    if jax.device_count() < max(devices):
        raise SystemExit(f"need {max(devices)} devices, jax sees {jax.device_count()}")
    slopes = lj.alibi_slopes(h)
    jobs, rows = [], []
    for p in devices:
        mesh = Mesh(np.array(jax.devices()[:p]), ("seq",))
        for combine in combines if p > 1 else combines[:1]:

            def fwd(q, k, v, s0, mesh=mesh, combine=combine):
                return lightning_attention_sharded(
                    q, k, v, slopes, mesh=mesh, seq_axis="seq", initial_state=s0,
                    return_final_state=True, impl=impl, combine=combine,
                )  # fmt: skip

            def fwd_bwd(q, k, v, s0, do, ds, fwd=fwd):
                return jax.vjp(fwd, q, k, v, s0)[1]((do, ds))

            for n in seqs:
                if n % p:
                    continue
                keys = jax.random.split(jax.random.PRNGKey(n), 6)
                q, k, v, do = (jax.random.normal(kk, (b, h, n, dim)) for kk in keys[:4])
                s0, ds = (jax.random.normal(kk, (b, h, dim, dim)) for kk in keys[4:])
                row = dict(devices=p, combine=combine if p > 1 else "-", seq=n)
                for kind, fn, args in (
                    ("fwd", fwd, (q, k, v, s0)),
                    ("fwd_bwd", fwd_bwd, (q, k, v, s0, do, ds)),
                ):
                    compiled = jax.jit(fn).lower(*args).compile()
                    comm = collective_bytes(compiled.as_text())
                    row[f"{kind}_collectives"] = comm["count"]
                    row[f"{kind}_collective_kinds"] = comm["kinds"]
                    row[f"{kind}_comm_bytes"] = comm["result_bytes"]
                    row[f"{kind}_comm_operand_bytes"] = comm["operand_bytes"]
                    jax.block_until_ready(compiled(*args))
                    jobs.append((row, kind, compiled, args))
                rows.append(row)
    times = {(id(row), kind): [] for row, kind, _, _ in jobs}
    for _ in range(reps):
        for row, kind, fn, args in jobs:
            # Enough calls per sample that short sequences are not dominated by dispatch.
            calls = max(1, 2048 // row["seq"])
            start = time.perf_counter()
            for _ in range(calls):
                jax.block_until_ready(fn(*args))
            times[(id(row), kind)].append((time.perf_counter() - start) / calls)
    for row, kind, _, _ in jobs:
        row[f"{kind}_ms"] = 1e3 * statistics.median(times[(id(row), kind)])
    state_bytes = b * h * dim * dim * 4
    return dict(
        batch=b, heads=h, dim=dim, impl=impl, reps=reps, state_bytes=state_bytes,
        jax=jax.__version__, backend=jax.default_backend(), rows=rows,
    )  # fmt: skip


def report(result: dict) -> list[str]:
    lines = [
        f"batch {result['batch']}, heads {result['heads']}, d = e = {result['dim']}, "
        f"impl {result['impl']}, f32; one [B, H, d, e] f32 state = {result['state_bytes']} B; "
        f"median of {result['reps']} runs ({result['backend']}, jax {result['jax']})",
        "comm = bytes of collective results per device per call, from the compiled HLO "
        "(ops = number of collectives)",
        f"{'P':>2} {'combine':>10} {'seq':>6} {'fwd comm B':>10} {'ops':>3} "
        f"{'f+b comm B':>10} {'ops':>3} {'fwd ms':>8} {'f+b ms':>8}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['devices']:>2} {r['combine']:>10} {r['seq']:>6} {r['fwd_comm_bytes']:>10} "
            f"{r['fwd_collectives']:>3} {r['fwd_bwd_comm_bytes']:>10} "
            f"{r['fwd_bwd_collectives']:>3} {r['fwd_ms']:>8.2f} {r['fwd_bwd_ms']:>8.2f}"
        )
    groups: dict = {}
    for r in result["rows"]:
        groups.setdefault((r["devices"], r["combine"]), set()).add(
            (r["fwd_comm_bytes"], r["fwd_bwd_comm_bytes"])
        )
    constant = all(len(v) == 1 for v in groups.values())
    lines.append(
        "communication constant in seq for every (P, combine): " + ("yes" if constant else "NO")
    )
    return lines


def main(argv):
    del argv
    import json

    # XLA reads the device count when jax initialises its backends (at the first
    # computation, below): set it from --devices first.
    _set_device_count(max(int(n) for n in FLAGS.devices))

    result = run(
        [int(n) for n in FLAGS.devices],
        [int(n) for n in FLAGS.seqs],
        FLAGS.combines,
        FLAGS.batch,
        FLAGS.heads,
        FLAGS.dim,
        FLAGS.impl,
        FLAGS.reps,
    )
    for line in report(result):
        print(line)
    if FLAGS.out:
        os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
