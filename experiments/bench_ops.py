r"""Operator benchmark: time and memory per token of every implementation vs. seq.

Forward and forward+backward time per token, useful GFLOP/s (counted as
2*n*(2*64*d + 2*d*e) per head: the work of Lightning Attention-2 at block 64),
the same run's dense-matmul GFLOP/s, and the compiled temp memory per token
(XLA memory analysis). Timings are medians over interleaved repetitions, so
every seq and the matmul see the same machine load.

  python experiments/bench_ops.py                      # CPU default: b1 h8 d=e=64 f32, 1K..64K
  python experiments/bench_ops.py --max_seq=262144     # longer sequences
  python experiments/bench_ops.py --impls=xla --reps=9 --out=results/bench_ops.json

Prints a table and the targets of the core issue, and writes JSON.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags

import lightning_jax as lj

FLAGS = flags.FLAGS
flags.DEFINE_list("impls", ["xla", "reference"], "Implementations to time.")
flags.DEFINE_integer("batch", 1, "Batch size.")
flags.DEFINE_integer("heads", 8, "Heads.")
flags.DEFINE_integer("dim", 64, "d = e (head dim of q/k and of v).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Input dtype.")
flags.DEFINE_integer("min_seq", 1024, "Smallest seq (powers of two up to max_seq).")
flags.DEFINE_integer("max_seq", 65536, "Largest seq.")
flags.DEFINE_integer("reference_max_seq", 4096, "The O(n^2) reference only up to this seq.")
flags.DEFINE_integer("reps", 7, "Interleaved repetitions (median reported).")
flags.DEFINE_integer("matmul_size", 2048, "Square f32 matmul size for the machine's GFLOP/s.")
flags.DEFINE_string("out", "results/bench_ops.json", "JSON output path ('' to skip).")
flags.DEFINE_bool("markdown", False, "Also print the table as markdown.")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where available."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def useful_flops(n: int, batch: int, heads: int, d: int, e: int) -> float:
    """Forward FLOPs of Lightning Attention-2 at block 64: 2*n*(2*64*d + 2*d*e) per head."""
    return 2.0 * n * (2 * 64 * d + 2 * d * e) * batch * heads


def _time_once(fn, args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def _temp_bytes(fn, args) -> int:
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in args]
    analysis = jax.jit(fn).lower(*shapes).compile().memory_analysis()
    return int(analysis.temp_size_in_bytes) if analysis is not None else -1


def _make_fns(impl: str, slopes):
    """Forward (q, k, v) -> o, and forward+backward (q, k, v, do) -> (dq, dk, dv)."""

    def fwd(q, k, v):
        return lj.lightning_attention(q, k, v, slopes, impl=impl)

    def fwd_bwd(q, k, v, do):
        return jax.vjp(fwd, q, k, v)[1](do)

    return jax.jit(fwd), jax.jit(fwd_bwd)


def run(impls, batch, heads, dim, dtype, seqs, reference_max_seq, reps, matmul_size) -> dict:
    """Measures every (impl, seq); returns a dict with rows and the matmul rate."""
    slopes = lj.alibi_slopes(heads)
    a = jnp.ones((matmul_size, matmul_size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    jobs = []  # (impl, seq, kind, fn, args)
    rows = {}
    # What a fresh output array of the op's size costs by itself (page faults of new
    # memory grow with size on CPU): explains drift that is not in the op's compute.
    fresh_output = jax.jit(lambda x: jnp.zeros_like(x))
    for n in seqs:
        x = jnp.ones((batch, heads, n, dim), dtype)
        jax.block_until_ready(fresh_output(x))
        jobs.append(("fresh-output", n, "fwd", fresh_output, (x,)))
    for impl in impls:
        fwd, fwd_bwd = _make_fns(impl, slopes)
        for n in seqs:
            if impl == "reference" and n > reference_max_seq:
                continue
            key = jax.random.PRNGKey(n)
            q, k, v, do = (
                jax.random.normal(kk, (batch, heads, n, dim), jnp.float32).astype(dtype)
                for kk in jax.random.split(key, 4)
            )
            row = dict(impl=impl, seq=n)
            for kind, fn, args in (("fwd", fwd, (q, k, v)), ("fwd_bwd", fwd_bwd, (q, k, v, do))):
                row[f"{kind}_temp_bytes"] = _temp_bytes(fn, args)
                jax.block_until_ready(fn(*args))  # compile
                jobs.append((impl, n, kind, fn, args))
            rows[(impl, n)] = row
    jax.block_until_ready(matmul(a))
    times = {(impl, n, kind): [] for impl, n, kind, _, _ in jobs}
    matmul_rates = []
    for _ in range(reps):
        matmul_rates += [2.0 * matmul_size**3 / _time_once(matmul, (a,)) / 1e9 for _ in range(3)]
        for impl, n, kind, fn, args in jobs:
            # Enough calls per sample that short sequences are not dominated by dispatch.
            calls = max(1, seqs[-1] // n // 8)
            jax.block_until_ready(fn(*args))  # untimed: steady state after the previous job
            start = time.perf_counter()
            for _ in range(calls):
                jax.block_until_ready(fn(*args))
            times[(impl, n, kind)].append((time.perf_counter() - start) / calls)
    alloc = {}
    for (impl, n, kind), ts in times.items():
        t = statistics.median(ts)
        if impl == "fresh-output":
            alloc[n] = t
            continue
        row = rows[(impl, n)]
        row[f"{kind}_s"] = t
        row[f"{kind}_us_per_token"] = t / n * 1e6
        row[f"{kind}_temp_bytes_per_token"] = row[f"{kind}_temp_bytes"] / n
    for row in rows.values():
        row["fresh_output_us_per_token"] = alloc[row["seq"]] / row["seq"] * 1e6
        row["fwd_useful_gflops"] = (
            useful_flops(row["seq"], batch, heads, dim, dim) / row["fwd_s"] / 1e9
        )
    return dict(matmul_gflops=statistics.median(matmul_rates), rows=list(rows.values()))


def report(result: dict, seqs) -> list[str]:
    """Table lines, then the core issue's targets for each impl."""
    mm = result["matmul_gflops"]
    lines = [
        f"dense f32 matmul: {mm:.1f} GFLOP/s (median)",
        "alloc us/tok: time to create one fresh zero array of the output's size (not in the op)",
        f"{'impl':>10} {'seq':>7} {'fwd us/tok':>11} {'f+b us/tok':>11} {'fwd GF/s':>9} "
        f"{'of matmul':>9} {'fwd tmp B/tok':>13} {'f+b tmp B/tok':>13} {'alloc us/tok':>12}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['impl']:>10} {r['seq']:>7} {r['fwd_us_per_token']:>11.3f} "
            f"{r['fwd_bwd_us_per_token']:>11.3f} {r['fwd_useful_gflops']:>9.1f} "
            f"{r['fwd_useful_gflops'] / mm:>9.1%} {r['fwd_temp_bytes_per_token']:>13.0f} "
            f"{r['fwd_bwd_temp_bytes_per_token']:>13.0f} {r['fresh_output_us_per_token']:>12.3f}"
        )
    for impl in dict.fromkeys(r["impl"] for r in result["rows"]):
        by_seq = {r["seq"]: r for r in result["rows"] if r["impl"] == impl}
        lo, hi = min(by_seq), max(by_seq)
        if lo == hi:
            continue
        first, last = by_seq[lo], by_seq[hi]
        fwd_ratio = last["fwd_us_per_token"] / first["fwd_us_per_token"]
        fb_ratio = last["fwd_bwd_us_per_token"] / first["fwd_bwd_us_per_token"]
        frac = last["fwd_useful_gflops"] / mm
        mem = [by_seq[n]["fwd_bwd_temp_bytes_per_token"] for n in sorted(by_seq)]
        lines += [
            f"[{impl}] time/token {hi} vs {lo}: fwd x{fwd_ratio:.3f}, fwd+bwd x{fb_ratio:.3f} "
            f"(target <= 1.15)",
            f"[{impl}] fwd at {hi}: {frac:.1%} of matmul GFLOP/s (target >= 40%)",
            f"[{impl}] fwd+bwd temp bytes/token over seq: "
            + ", ".join(f"{m:.0f}" for m in mem)
            + " (target: flat, not growing)",
        ]
    return lines


def markdown(result: dict) -> str:
    """The table as markdown, for the README."""
    mm = result["matmul_gflops"]
    lines = [
        "| impl | seq | fwd us/token | fwd+bwd us/token | fwd GFLOP/s | of matmul "
        "| fwd temp B/token | fwd+bwd temp B/token | alloc us/token |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['impl']} | {r['seq']} | {r['fwd_us_per_token']:.2f} "
            f"| {r['fwd_bwd_us_per_token']:.2f} | {r['fwd_useful_gflops']:.1f} "
            f"| {r['fwd_useful_gflops'] / mm:.1%} | {r['fwd_temp_bytes_per_token']:.0f} "
            f"| {r['fwd_bwd_temp_bytes_per_token']:.0f} | {r['fresh_output_us_per_token']:.2f} |"
        )
    lines.append(f"\nDense float32 matmul in the same run: {mm:.1f} GFLOP/s.")
    return "\n".join(lines)


def main(argv):
    del argv
    seqs = []
    n = FLAGS.min_seq
    while n <= FLAGS.max_seq:
        seqs.append(n)
        n *= 2
    result = run(
        FLAGS.impls,
        FLAGS.batch,
        FLAGS.heads,
        FLAGS.dim,
        jnp.dtype(FLAGS.dtype),
        seqs,
        FLAGS.reference_max_seq,
        FLAGS.reps,
        FLAGS.matmul_size,
    )
    result["config"] = dict(
        batch=FLAGS.batch,
        heads=FLAGS.heads,
        dim=FLAGS.dim,
        dtype=FLAGS.dtype,
        reps=FLAGS.reps,
        backend=jax.default_backend(),
        device=str(jax.devices()[0].device_kind),
        cpu_count=os.cpu_count(),
        machine=cpu_name(),
        jax=jax.__version__,
        python=sys.version.split()[0],
        date=time.strftime("%Y-%m-%d"),
        command="python " + " ".join(sys.argv),
    )
    print("\n".join(report(result, seqs)))
    if FLAGS.markdown:
        print(markdown(result))
    if FLAGS.out:
        os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
