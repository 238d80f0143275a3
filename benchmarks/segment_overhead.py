r"""Is the op's time with segment_ids=None unchanged by the segment-id code? A/B at 64K.

Runs `bench_ops.py` (this checkout's script) alternately on this checkout's
`lightning_jax` (A) and on another tree's (B: e.g. the commit before segment ids,
checked out in a temporary worktree), A B B A A B ... (which goes first alternates,
so a load that drifts within a pair favours neither), each a fresh process timing
the same op (default: the XLA path's forward at b1 h8 d=e=64 f32, seq 65536), so
both see the same machine load over the same window. Reports the ratio A/B of
each pair's median times, their median and spread, and writes JSON.

  git worktree add /tmp/preseg 17b833f    # main before the segment-id merge
  python benchmarks/segment_overhead.py --baseline=/tmp/preseg --pairs=6
  git worktree remove /tmp/preseg
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import flags

from lightning_jax import cli

HERE = Path(__file__).resolve().parent
flags.DEFINE_string("baseline", None, "Root of the tree whose lightning_jax is B.", required=True)
flags.DEFINE_integer("pairs", 6, "A/B pairs (each: two fresh bench_ops processes).", lower_bound=1)
flags.DEFINE_integer("seq", 65536, "Sequence length.", lower_bound=1)
flags.DEFINE_integer(
    "reps", 5, "bench_ops --reps per process (its median is the sample).", lower_bound=1
)
flags.DEFINE_string("impl", "xla", "Implementation.")
flags.DEFINE_string("out", "runs/segment_overhead.json", "JSON output path.")
FLAGS = flags.FLAGS


def bench(tree: Path, out: Path) -> float:
    """Median forward seconds of one fresh bench_ops process on tree's lightning_jax."""
    env = {**os.environ, "PYTHONPATH": str(tree), "JAX_PLATFORMS": "cpu"}
    command = [
        sys.executable,
        str(HERE / "bench_ops.py"),
        f"--impls={FLAGS.impl}",
        f"--min_seq={FLAGS.seq}",
        f"--max_seq={FLAGS.seq}",
        f"--reps={FLAGS.reps}",
        "--fwd_only",
        "--noceiling",
        "--matmul_size=256",  # the dense-rate probe: small, it is not what is compared
        f"--out={out}",
    ]
    subprocess.run(command, env=env, check=True, capture_output=True)
    result = json.loads(out.read_text())
    assert result["config"]["lightning_jax"] == str(tree / "lightning_jax"), result["config"]
    return result["rows"][0]["fwd_s"]


def main(argv):
    del argv
    trees = dict(a=HERE.parent, b=Path(FLAGS.baseline).resolve())
    times = dict(a=[], b=[])
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(FLAGS.pairs):
            for name in ("a", "b") if i % 2 == 0 else ("b", "a"):
                times[name].append(bench(trees[name], Path(tmp) / f"{name}{i}.json"))
            print(f"pair {i}: A {times['a'][-1]:.4f}s B {times['b'][-1]:.4f}s", flush=True)
    ratios = [a / b for a, b in zip(times["a"], times["b"])]
    summary = dict(
        command="python " + " ".join(sys.argv),
        date=time.strftime("%Y-%m-%d"),
        a=str(trees["a"]),
        b=str(trees["b"]),
        seq=FLAGS.seq,
        impl=FLAGS.impl,
        fwd_seconds=times,
        ratios_a_over_b=ratios,
        median_ratio=statistics.median(ratios),
        ratio_range=[min(ratios), max(ratios)],
        median_a_over_median_b=statistics.median(times["a"]) / statistics.median(times["b"]),
    )
    print(
        f"A/B forward time at {FLAGS.seq}: median ratio {summary['median_ratio']:.3f} "
        f"(pairs {min(ratios):.3f}..{max(ratios):.3f})"
    )
    Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
    Path(FLAGS.out).write_text(json.dumps(summary, indent=1))
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    cli.run(main)
