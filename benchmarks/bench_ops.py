r"""Operator benchmark: time and memory per token of every implementation vs. seq.

For each implementation and seq: forward and forward+backward time per token,
achieved FLOP/s (Lightning Attention counted as 2*n*(64*(d + e) + 2*d*e) per
head, the matmul work at block 64, see `useful_flops`; forward+backward as 3x
that; softmax attention as its causal half, n^2*(d + e) per head forward),
bytes moved (inputs read and outputs written once), the fraction of the
roofline (the larger of FLOPs/peak and bytes/bandwidth, divided by the
measured time), and the compiled temp memory
per token (XLA memory analysis). The same run measures the device's dense
matmul rate. Timings are medians over interleaved repetitions, so every row
sees the same machine load.

  python benchmarks/bench_ops.py                      # CPU: b1 h8 d=e=64 f32, 1K..64K
  python benchmarks/bench_ops.py --max_seq=262144     # longer sequences
  # forward only at 64K, unsegmented and with segment ids (one run per row; random runs):
  python benchmarks/bench_ops.py --impls=xla --min_seq=65536 --fwd_only \
      --segments=none,one,random --noceiling --out=''
  # softmax attention as JAX users call it (jax.nn.dot_product_attention, causal,
  # [B, T, H, D]) beside the lightning impls, at the same shapes (CPU: up to 8K):
  python benchmarks/bench_ops.py --impls=xla,softmax --max_seq=16384
  # GPU, the paper's configuration, with cuDNN flash attention as the softmax anchor:
  python benchmarks/bench_ops.py --batch=4 --heads=32 --dim=128 --dtype=bfloat16 \
      --impls=triton,xla,cudnn --matmul_size=8192
  # TPU, the same configuration (impls default to mosaic_tpu,xla on a TPU backend; the
  # dense bf16 matmul is timed in the same run):
  python benchmarks/bench_ops.py --batch=4 --heads=32 --dim=128 --dtype=bfloat16 \
      --min_seq=2048 --max_seq=65536 --matmul_size=8192 --noceiling

Prints a table and the design targets, and writes JSON.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from absl import flags
from jax import lax

import lightning_jax as lj
from lightning_jax import cli, xla

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
)
from machine_info import cpu_name  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("impls", None, "Implementations to time (default: by backend).")
flags.DEFINE_integer("batch", 1, "Batch size.", lower_bound=1)
flags.DEFINE_integer("heads", 8, "Heads.", lower_bound=1)
flags.DEFINE_integer(
    "dim", 64, "d, the head dim of q and k (and of v unless --dim_v).", lower_bound=1
)
flags.DEFINE_integer("dim_v", None, "e, the head dim of v (default: --dim).", lower_bound=1)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Input dtype.")
flags.DEFINE_integer("min_seq", 1024, "Smallest seq (powers of two up to max_seq).", lower_bound=1)
flags.DEFINE_integer("max_seq", 65536, "Largest seq.", lower_bound=1)
flags.DEFINE_integer(
    "reference_max_seq", 4096, "The O(n^2) reference only up to this seq.", lower_bound=0
)
flags.DEFINE_integer(
    "softmax_max_seq",
    8192,
    "impl softmax (XLA's jax.nn.dot_product_attention, O(n^2) memory off GPU) only up to "
    "this seq; cudnn has no limit.",
    lower_bound=0,
)
flags.DEFINE_integer("reps", 7, "Interleaved repetitions (median reported).", lower_bound=1)
flags.DEFINE_integer(
    "matmul_size", 2048, "Square matmul size for the device's FLOP/s.", lower_bound=1
)
flags.DEFINE_float(
    "peak_tflops", None, "Peak TFLOP/s for the roofline (default: table/measured).", lower_bound=0
)
flags.DEFINE_float(
    "peak_gbps", None, "Peak memory GB/s for the roofline (default: table).", lower_bound=0
)
flags.DEFINE_string("out", "runs/bench_ops.json", "JSON output path ('' to skip).")
flags.DEFINE_bool(
    "fwd_only", False, "Time the forward only (prints a short table; no markdown or plots)."
)
flags.DEFINE_list(
    "segments",
    ["none"],
    "Segment ids to time each impl with: none (segment_ids=None), one (every row one run: "
    "all zeros), random (runs of random lengths, mean SEGMENT_MEAN_RUN tokens). Rows of the "
    "segmented runs are labelled impl+seg_<mode>.",
)
flags.DEFINE_bool("markdown", False, "Also print the table as markdown.")
flags.DEFINE_bool("plot", True, "Write PNGs of time and memory against seq beside the JSON.")
flags.DEFINE_bool(
    "ceiling", True, "Also time the XLA path's per-chunk matmuls alone (its ceiling)."
)
flags.DEFINE_integer(
    "ceiling_steps", 200, "Scan steps per timed call of the ceiling.", lower_bound=1
)
flags.DEFINE_integer(
    "ceiling_block", xla.DEFAULT_BLOCK, "Block of the ceiling's matmuls.", lower_bound=1
)
flags.DEFINE_integer(
    "ceiling_chunk", xla.DEFAULT_CHUNK, "Chunk of the ceiling's matmuls.", lower_bound=1
)

DEFAULT_IMPLS = {
    "cpu": ["xla", "reference", "softmax"],
    "gpu": ["triton", "xla", "cudnn"],
    "tpu": ["mosaic_tpu", "xla"],
}
# Dense bf16 TFLOP/s and HBM GB/s of the accelerators this project targets (vendor figures).
# Per JAX device (device_kind substring, first match wins: "lite" before the plain name);
# v4 and v5p devices are megacore chips (both TensorCores).
DEVICE_PEAKS = {
    "H100": (989.0, 3350.0),
    "H200": (989.0, 4800.0),
    "TPU v4": (275.0, 1228.0),
    "TPU v5 lite": (197.0, 819.0),
    "TPU v5": (459.0, 2765.0),
    "TPU v6 lite": (918.0, 1640.0),
}


USEFUL_BLOCK = 64  # the block of the FLOP count (the Triton kernel's default)
# Softmax attention as JAX users call it, `jax.nn.dot_product_attention(q, k, v,
# is_causal=True)` on [batch, seq, heads, d]: "softmax" lets JAX pick the implementation
# (XLA's, or cuDNN's where it applies), "cudnn" asks for cuDNN's fused flash attention.
SOFTMAX_IMPLS = {"softmax": None, "cudnn": "cudnn"}


def useful_flops(n: int, batch: int, heads: int, d: int, e: int) -> float:
    """Forward matmul FLOPs of Lightning Attention-2 at block 64: 2*n*(64*(d+e) + 2*d*e) per head.

    Per row, a multiply-add being 2 FLOPs: the intra-block scores q K^T (64 keys of
    width d: 2*64*d) and scores V (64 rows of width e: 2*64*e), the inter-block
    product q S (2*d*e) and the row's share of the state update K^T V (2*d*e).
    """
    per_row = 2 * USEFUL_BLOCK * d + 2 * USEFUL_BLOCK * e + 2 * d * e + 2 * d * e
    return float(n * per_row * batch * heads)


def softmax_flops(n: int, batch: int, heads: int, d: int, e: int) -> float:
    """Forward FLOPs of causal softmax attention: half of 2*n^2*d (Q K^T) + 2*n^2*e (P V)."""
    return float(n * n * (d + e) * batch * heads)


def moved_bytes(n: int, batch: int, heads: int, d: int, e: int, itemsize: int, kind: str) -> float:
    """Inputs read and outputs written once: fwd q, k (width d), v, o (width e);
    fwd+bwd adds do, dv (e) and dq, dk (d)."""
    width = 2 * d + 2 * e if kind == "fwd" else 4 * d + 4 * e
    return float(width * n * batch * heads * itemsize)


def _time_once(fn, args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def _temp_bytes(fn, args) -> int:
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in args]
    analysis = jax.jit(fn).lower(*shapes).compile().memory_analysis()
    return int(analysis.temp_size_in_bytes) if analysis is not None else -1


SEGMENT_MODES = ("none", "one", "random")
SEGMENT_MEAN_RUN = 256  # --segments=random: tokens per run on average (short documents)


def segment_ids_for(mode: str, batch: int, n: int, seed: int = 0) -> tuple[jax.Array, ...]:
    """() for mode "none", else (segment_ids int32 `[batch, n]`,) of the mode (SEGMENT_MODES)."""
    if mode == "none":
        return ()
    if mode == "one":
        return (jnp.zeros((batch, n), jnp.int32),)
    if mode == "random":  # a new run after each token with probability 1 / SEGMENT_MEAN_RUN
        starts = jax.random.bernoulli(jax.random.PRNGKey(seed), 1 / SEGMENT_MEAN_RUN, (batch, n))
        return (jnp.cumsum(starts, axis=1, dtype=jnp.int32),)
    raise ValueError(f"segments must be among {SEGMENT_MODES}, got {mode!r}")


def _make_fns(impl: str, slopes):
    """Forward (q, k, v[, segment_ids]) -> o and forward+backward (q, k, v, do[, segment_ids])."""
    if impl in SOFTMAX_IMPLS:  # softmax anchor: [batch, seq, heads, d] layout, causal
        implementation = SOFTMAX_IMPLS[impl]

        def fwd(q, k, v):
            return jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation=implementation
            )

    else:

        def fwd(q, k, v, *segment_ids):
            kwargs = dict(segment_ids=segment_ids[0]) if segment_ids else {}
            return lj.lightning_attention(q, k, v, slopes, impl=impl, **kwargs)

    def fwd_bwd(q, k, v, do, *segment_ids):
        return jax.vjp(lambda q, k, v: fwd(q, k, v, *segment_ids), q, k, v)[1](do)

    return jax.jit(fwd), jax.jit(fwd_bwd)


def run(
    impls,
    batch,
    heads,
    dim,
    dtype,
    seqs,
    reference_max_seq,
    reps,
    matmul_size,
    dim_v=None,
    kinds=("fwd", "fwd_bwd"),
    segments=("none",),
    softmax_max_seq=None,
) -> dict:
    """Measures every (impl, seq); returns the rows and the matmul rate.

    dim is d (q, k), dim_v is e (v, o; None: d). kinds: which of "fwd", "fwd_bwd"
    to time. segments: SEGMENT_MODES to time each impl with (softmax, cudnn: "none"
    only); a segmented row's impl is labelled impl+seg_<mode>. impl "softmax" runs up to
    softmax_max_seq (None: every seq).
    """
    dim_v = dim if dim_v is None else dim_v
    slopes = lj.alibi_slopes(heads)
    matmul_dtype = jnp.float32 if jax.default_backend() == "cpu" else dtype
    a = jnp.ones((matmul_size, matmul_size), matmul_dtype)
    matmul = jax.jit(lambda x: x @ x)
    jobs = []  # (impl, seq, kind, fn, args)
    rows = {}
    # What a fresh output array of the op's size costs by itself (page faults of new
    # memory grow with size on CPU): explains drift that is not in the op's compute.
    fresh_output = jax.jit(lambda x: jnp.zeros_like(x))
    for n in seqs:
        x = jnp.ones((batch, heads, n, dim_v), dtype)
        jax.block_until_ready(fresh_output(x))
        jobs.append(("fresh-output", n, "fwd", fresh_output, (x,)))
    for impl, mode in [(i, m) for i in impls for m in segments]:
        if impl in SOFTMAX_IMPLS and mode != "none":
            continue
        fwd, fwd_bwd = _make_fns(impl, slopes)
        label = impl if mode == "none" else f"{impl}+seg_{mode}"
        for n in seqs:
            if impl == "reference" and n > reference_max_seq:
                continue
            if impl == "softmax" and softmax_max_seq is not None and n > softmax_max_seq:
                continue
            q, k, v, do = (
                jax.random.normal(
                    kk,
                    (batch, n, heads, width) if impl in SOFTMAX_IMPLS else (batch, heads, n, width),
                    jnp.float32,
                ).astype(dtype)
                for kk, width in zip(
                    jax.random.split(jax.random.PRNGKey(n), 4), (dim, dim) + (dim_v,) * 2
                )
            )
            seg = segment_ids_for(mode, batch, n)
            row = dict(impl=label, seq=n)
            for kind, fn, args in (("fwd", fwd, (q, k, v)), ("fwd_bwd", fwd_bwd, (q, k, v, do))):
                if kind not in kinds:
                    continue
                row[f"{kind}_temp_bytes"] = _temp_bytes(fn, args + seg)
                jax.block_until_ready(fn(*args, *seg))  # compile
                jobs.append((label, n, kind, fn, args + seg))
            rows[(label, n)] = row
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
    itemsize = jnp.dtype(dtype).itemsize
    for row in rows.values():
        n = row["seq"]
        row["fresh_output_us_per_token"] = alloc[n] / n * 1e6
        if row["impl"] in SOFTMAX_IMPLS:
            flops = softmax_flops(n, batch, heads, dim, dim_v)
        else:
            flops = useful_flops(n, batch, heads, dim, dim_v)
        row["fwd_flops"], row["fwd_bwd_flops"] = flops, 3 * flops
        for kind in kinds:
            row[f"{kind}_bytes"] = moved_bytes(n, batch, heads, dim, dim_v, itemsize, kind)
            row[f"{kind}_gflops"] = row[f"{kind}_flops"] / row[f"{kind}_s"] / 1e9
            row[f"{kind}_gbps"] = row[f"{kind}_bytes"] / row[f"{kind}_s"] / 1e9
    return dict(matmul_gflops=statistics.median(matmul_rates), rows=list(rows.values()))


def chunk_matmul_shapes(groups: int, d: int, e: int, block: int, chunk: int) -> dict:
    """(lhs, rhs) shapes of the matmuls the XLA path issues per chunk (G = batch*heads)."""
    nb = chunk // block
    return {
        "scores": ((groups, nb, block, d), (groups, nb, d, block)),  # q . keys^T
        "intra": ((groups, nb, block, block), (groups, nb, block, e)),  # masked scores . v
        "increments": ((groups, nb, d, block), (groups, nb, block, e)),  # keys^T . decayed v
        "prefix": ((groups, nb + 1, nb), (groups, nb, d * e)),  # block-start states
        "inter": ((groups, nb, block, d), (groups, nb, d, e)),  # q . block-start states
    }


def _matmul_scan(rhs: jax.Array, steps: int, with_matmul: bool, chains: int = 1):
    """A scan whose step multiplies each of `chains` carried lhs by rhs, then perturbs them."""

    def step(xs, _):
        ys = [jnp.matmul(x, rhs, precision=lax.Precision.HIGHEST) if with_matmul else x for x in xs]
        return tuple(x + 1e-9 * y[..., :1, :1] for x, y in zip(xs, ys)), None

    return jax.jit(
        lambda x: lax.scan(step, (x,) + (x + 1.0,) * (chains - 1), None, length=steps)[0]
    )


def chunk_matmuls(batch, heads, dim, block, chunk, steps, reps, matmul_size) -> dict:
    """Seconds per call of each per-chunk matmul of the XLA path, and their sum per token.

    Each matmul runs inside a `lax.scan` of `steps` steps (dispatch amortised as in the
    op) on an operand that changes every step; the same scan without the matmul is
    timed too and subtracted. The sum bounds the op's time per token from below: the
    useful FLOP/s it implies is the op's ceiling on this backend. The dense matmul
    rate is measured again, interleaved, for the ratio; so is one scan step holding two
    independent chains of the "inter" matmul against one (about x1 if XLA ran
    independent matmuls on separate cores, x2 if one after the other).
    """
    shapes = chunk_matmul_shapes(batch * heads, dim, dim, block, chunk)
    jobs = {}
    for name, (lhs_shape, rhs_shape) in shapes.items():
        lhs = jnp.full(lhs_shape, 0.01, jnp.float32)
        rhs = jnp.full(rhs_shape, 0.01, jnp.float32)
        jobs[name] = (_matmul_scan(rhs, steps, True), _matmul_scan(rhs, steps, False), lhs)
        jax.block_until_ready((jobs[name][0](lhs), jobs[name][1](lhs)))
    # Can XLA:CPU overlap independent matmuls? Two independent chains of the largest one.
    inter_lhs = jobs["inter"][2]
    two_chains = _matmul_scan(jnp.full(shapes["inter"][1], 0.01, jnp.float32), steps, True, 2)
    jax.block_until_ready(two_chains(inter_lhs))
    square = jnp.ones((matmul_size, matmul_size), jnp.float32)
    dense = jax.jit(lambda x: x @ x)
    jax.block_until_ready(dense(square))
    samples = {name: ([], []) for name in jobs}
    rates, two_chain_steps = [], []
    for _ in range(reps):
        rates += [2.0 * matmul_size**3 / _time_once(dense, (square,)) / 1e9 for _ in range(3)]
        two_chain_steps.append(_time_once(two_chains, (inter_lhs,)) / steps)
        for name, (fn, base, lhs) in jobs.items():
            samples[name][0].append(_time_once(fn, (lhs,)) / steps)
            samples[name][1].append(_time_once(base, (lhs,)) / steps)
    rows = []
    for name, (lhs_shape, rhs_shape) in shapes.items():
        net = statistics.median(samples[name][0]) - statistics.median(samples[name][1])
        flops = 2.0 * math.prod(lhs_shape) * rhs_shape[-1]
        rows.append(
            dict(name=name, lhs=list(lhs_shape), rhs=list(rhs_shape), seconds=net, flops=flops)
        )
    total = sum(r["seconds"] for r in rows)
    return dict(
        block=block,
        chunk=chunk,
        rows=rows,
        us_per_token=total / chunk * 1e6,
        gflops=useful_flops(chunk, batch, heads, dim, dim) / total / 1e9,
        matmul_gflops=statistics.median(rates),
        two_chains_vs_one=statistics.median(two_chain_steps)
        / statistics.median(samples["inter"][0]),
    )


def add_roofline(result: dict, peak_tflops: float | None, peak_gbps: float | None) -> None:
    """Fraction of the roofline per row: max(FLOPs/peak, bytes/bandwidth) / time."""
    result["peak_tflops"], result["peak_gbps"] = peak_tflops, peak_gbps
    for row in result["rows"]:
        for kind in ("fwd", "fwd_bwd"):
            if f"{kind}_s" not in row:  # not timed (--fwd_only)
                continue
            bounds = []
            if peak_tflops:
                bounds.append(row[f"{kind}_flops"] / (peak_tflops * 1e12))
            if peak_gbps:
                bounds.append(row[f"{kind}_bytes"] / (peak_gbps * 1e9))
            row[f"{kind}_roofline"] = max(bounds) / row[f"{kind}_s"] if bounds else None


def _by_impl(result: dict) -> dict:
    out = {}
    for r in result["rows"]:
        out.setdefault(r["impl"], {})[r["seq"]] = r
    return out


def report(result: dict) -> list[str]:
    """Table lines, then the design targets."""
    mm = result["matmul_gflops"]
    lines = [
        f"dense matmul: {mm:.1f} GFLOP/s (median); roofline peaks: "
        f"{result['peak_tflops']} TFLOP/s, {result['peak_gbps']} GB/s",
        "alloc us/tok: time to create one fresh zero array of the output's size (not in the op)",
        f"{'impl':>10} {'seq':>7} {'fwd us/tok':>11} {'f+b us/tok':>11} {'fwd GF/s':>9} "
        f"{'of matmul':>9} {'fwd roof':>8} {'f+b roof':>8} {'fwd tmp B/tok':>13} "
        f"{'f+b tmp B/tok':>13} {'alloc us/tok':>12}",
    ]

    def pct(x):
        return "-" if x is None else f"{x:.1%}"

    for r in result["rows"]:
        lines.append(
            f"{r['impl']:>10} {r['seq']:>7} {r['fwd_us_per_token']:>11.3f} "
            f"{r['fwd_bwd_us_per_token']:>11.3f} {r['fwd_gflops']:>9.1f} "
            f"{r['fwd_gflops'] / mm:>9.1%} {pct(r['fwd_roofline']):>8} "
            f"{pct(r['fwd_bwd_roofline']):>8} {r['fwd_temp_bytes_per_token']:>13.0f} "
            f"{r['fwd_bwd_temp_bytes_per_token']:>13.0f} {r['fresh_output_us_per_token']:>12.3f}"
        )
    by_impl = _by_impl(result)
    for impl, by_seq in by_impl.items():
        if impl == "reference" or impl in SOFTMAX_IMPLS or len(by_seq) < 2:
            continue
        lo, hi = min(by_seq), max(by_seq)
        first, last = by_seq[lo], by_seq[hi]
        mem = [by_seq[n]["fwd_bwd_temp_bytes_per_token"] for n in sorted(by_seq)]
        lines += [
            f"[{impl}] time/token {hi} vs {lo}: "
            f"fwd x{last['fwd_us_per_token'] / first['fwd_us_per_token']:.3f}, "
            f"fwd+bwd x{last['fwd_bwd_us_per_token'] / first['fwd_bwd_us_per_token']:.3f} "
            "(targets: CPU <= 1.15 from 1K; GPU <= 1.10 from 2K)",
            f"[{impl}] fwd at {hi}: {last['fwd_gflops'] / mm:.1%} of the matmul rate "
            "(CPU target >= 40%)",
            f"[{impl}] fwd+bwd temp bytes/token over seq: "
            + ", ".join(f"{m:.0f}" for m in mem)
            + " (target: flat, not growing)",
        ]
        for softmax in [name for name in SOFTMAX_IMPLS if name in by_impl]:
            both = [n for n in sorted(by_seq) if n in by_impl[softmax]]
            wins = [n for n in both if by_seq[n]["fwd_bwd_s"] < by_impl[softmax][n]["fwd_bwd_s"]]
            ratios = ", ".join(
                f"{n}: x{by_impl[softmax][n]['fwd_bwd_s'] / by_seq[n]['fwd_bwd_s']:.2f}"
                for n in both
            )
            lines.append(
                f"[{impl}] fwd+bwd time of {softmax} / {impl} by seq: {ratios}; "
                f"{impl} faster at seq {wins}"
            )
        ceiling = result.get("xla_chunk_matmuls")
        if impl == "xla" and ceiling:
            mm_c = ceiling["matmul_gflops"]
            matmul_us = ceiling["us_per_token"]
            with_output = (
                ceiling["gflops"] * matmul_us / (matmul_us + last["fresh_output_us_per_token"])
            )
            lines.append(
                f"[xla] its per-chunk matmuls alone (block {ceiling['block']}, chunk "
                f"{ceiling['chunk']}): {ceiling['us_per_token']:.3f} us/token = "
                f"{ceiling['gflops'] / mm_c:.1%} of the dense matmul timed alongside "
                f"({mm_c:.1f} GFLOP/s); with a fresh output of seq {hi} as well: "
                f"{with_output / mm_c:.1%} (the op's ceiling if nothing else took time); "
                f"two independent chains of the inter matmul in one scan take "
                f"x{ceiling['two_chains_vs_one']:.2f} the time of one (x1.0 would mean a 2nd core)"
            )
        big = [r["fwd_bwd_roofline"] for n, r in by_seq.items() if n >= 8192]
        if big and big[0] is not None:
            lines.append(
                f"[{impl}] fwd+bwd roofline fraction at seq >= 8K: min {min(big):.1%} "
                "(GPU target >= 50%)"
            )
    return lines


def markdown(result: dict) -> str:
    """The table as markdown, for the benchmarks page (docs/benchmarks.md)."""
    mm = result["matmul_gflops"]
    lines = [
        "| impl | seq | fwd us/token | fwd+bwd us/token | fwd GFLOP/s | of matmul "
        "| fwd temp B/token | fwd+bwd temp B/token | alloc us/token |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['impl']} | {r['seq']} | {r['fwd_us_per_token']:.2f} "
            f"| {r['fwd_bwd_us_per_token']:.2f} | {r['fwd_gflops']:.1f} "
            f"| {r['fwd_gflops'] / mm:.1%} | {r['fwd_temp_bytes_per_token']:.0f} "
            f"| {r['fwd_bwd_temp_bytes_per_token']:.0f} | {r['fresh_output_us_per_token']:.2f} |"
        )
    lines.append(f"\nDense matmul in the same run: {mm:.1f} GFLOP/s.")
    return "\n".join(lines)


def plot(result: dict, path_prefix: str) -> list[str]:
    """The paper's Figure 3 analogue: time and temp memory per token against seq, per impl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    dims = f"d={cfg['dim']} e={cfg.get('dim_v', cfg['dim'])}"
    title = f"b{cfg['batch']} h{cfg['heads']} {dims} {cfg['dtype']}, {cfg['device']}"
    paths = []
    panels = (
        ("time", "us per token", "us_per_token"),
        ("memory", "temp bytes per token", "temp_bytes_per_token"),
    )
    for name, ylabel, suffix in panels:
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
        for i, (impl, by_seq) in enumerate(_by_impl(result).items()):
            seqs = sorted(by_seq)
            for kind, label, style in (("fwd", "fwd", "o-"), ("fwd_bwd", "fwd+bwd", "s--")):
                values = [by_seq[n][f"{kind}_{suffix}"] for n in seqs]
                ax.plot(seqs, values, style, color=f"C{i}", label=f"{impl} {label}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{name} per token: {title}", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = f"{path_prefix}_{name}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def _peaks(matmul_gflops: float) -> tuple[float | None, float | None]:
    if FLAGS.peak_tflops or FLAGS.peak_gbps:
        return FLAGS.peak_tflops, FLAGS.peak_gbps
    kind = str(jax.devices()[0].device_kind)
    for name, peaks in DEVICE_PEAKS.items():
        if name in kind:
            return peaks
    return matmul_gflops / 1e3, None  # CPU: the measured matmul rate, no bandwidth figure


def main(argv):
    del argv
    bad = [m for m in FLAGS.segments if m not in SEGMENT_MODES]
    if bad or not FLAGS.segments:
        raise cli.UsageError(f"--segments takes modes from {SEGMENT_MODES}, got {FLAGS.segments}")
    seqs = []
    n = FLAGS.min_seq
    while n <= FLAGS.max_seq:
        seqs.append(n)
        n *= 2
    backend = jax.default_backend()
    impls = FLAGS.impls or DEFAULT_IMPLS.get(backend, ["xla"])
    result = run(
        impls,
        FLAGS.batch,
        FLAGS.heads,
        FLAGS.dim,
        jnp.dtype(FLAGS.dtype),
        seqs,
        FLAGS.reference_max_seq,
        FLAGS.reps,
        FLAGS.matmul_size,
        FLAGS.dim_v,
        kinds=("fwd",) if FLAGS.fwd_only else ("fwd", "fwd_bwd"),
        segments=FLAGS.segments,
        softmax_max_seq=FLAGS.softmax_max_seq,
    )
    if FLAGS.ceiling and "xla" in impls:
        result["xla_chunk_matmuls"] = chunk_matmuls(
            FLAGS.batch,
            FLAGS.heads,
            FLAGS.dim,
            FLAGS.ceiling_block,
            FLAGS.ceiling_chunk,
            FLAGS.ceiling_steps,
            FLAGS.reps,
            FLAGS.matmul_size,
        )
    add_roofline(result, *_peaks(result["matmul_gflops"]))
    result["config"] = dict(
        batch=FLAGS.batch,
        heads=FLAGS.heads,
        dim=FLAGS.dim,
        dim_v=FLAGS.dim if FLAGS.dim_v is None else FLAGS.dim_v,
        dtype=FLAGS.dtype,
        reps=FLAGS.reps,
        backend=backend,
        device=str(jax.devices()[0].device_kind),
        cpu_count=os.cpu_count(),
        machine=cpu_name(),
        jax=jax.__version__,
        python=sys.version.split()[0],
        date=time.strftime("%Y-%m-%d"),
        command="python " + " ".join(sys.argv),
        lightning_jax=os.path.dirname(lj.__file__),
        segments=FLAGS.segments,
        fwd_only=FLAGS.fwd_only,
    )
    if FLAGS.fwd_only:
        print(f"{'impl':>16} {'seq':>7} {'fwd s':>9} {'fwd us/tok':>11} {'fwd GF/s':>9}")
        for r in result["rows"]:
            print(
                f"{r['impl']:>16} {r['seq']:>7} {r['fwd_s']:>9.4f} {r['fwd_us_per_token']:>11.3f} "
                f"{r['fwd_gflops']:>9.1f}"
            )
    else:
        print("\n".join(report(result)))
    if FLAGS.markdown and not FLAGS.fwd_only:
        print(markdown(result))
    if FLAGS.out:
        os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {FLAGS.out}")
        if FLAGS.plot and not FLAGS.fwd_only:
            print("wrote " + ", ".join(plot(result, os.path.splitext(FLAGS.out)[0])))


if __name__ == "__main__":
    cli.run(main)
