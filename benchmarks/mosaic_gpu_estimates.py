r"""Arithmetic estimates for the Mosaic GPU kernels: HBM bytes, FLOPs, programs, time.

No GPU has run these kernels yet; this script derives, from the kernels' own
tiling (pallas_kernels/mosaic_gpu.py: blocks of 64 rows, 64-column tiles of Z,
the sequence splits `choose_tiling` picks), per pass and per token x head:
the bytes each program reads and writes in HBM, the tensor-core FLOPs, and the
time they imply at an H200's 4.8 TB/s and 989 dense bf16 TFLOP/s (each kernel
bounded by the larger of the two, the kernels summed). The memory roofline of
the op is what any implementation must move: q, k, v read and o written
(forward); plus do read and dq, dk, dv written (backward). What the estimate
leaves out: latency (each program walks its blocks in order, one TMA load and
four dependent wgmma groups per block, without prefetching), launch gaps, and
the XLA-side combine of split states (counted in bytes, small).

`--dtype=float32` estimates the TF32 sweep (mosaic_gpu_f32: 4-byte operands, Y and
Y^T both read, XLA's transposes of Y and Z counted, TF32 at half the bf16 peak) and
`--dtype=float32_highest` its split form (every operand as head and rest, three
TF32 products each, XLA's splits counted), against the float32 roofline.

  python benchmarks/mosaic_gpu_estimates.py            # prints a markdown table
  python benchmarks/mosaic_gpu_estimates.py --dtype=float32
"""

from __future__ import annotations

import math
from typing import NamedTuple

from absl import flags

from lightning_jax import cli
from pallas_kernels import mosaic_gpu as mg

FLAGS = flags.FLAGS
flags.DEFINE_float("hbm_tbps", 4.8, "HBM bandwidth, TB/s (H200).", lower_bound=0)
flags.DEFINE_float(
    "peak_tflops", 989.0, "Dense bf16 tensor-core peak, TFLOP/s (H200).", lower_bound=0
)
flags.DEFINE_integer(
    "sms", mg.DEFAULT_NUM_SMS, "Streaming multiprocessors (H200: 132).", lower_bound=1
)

flags.DEFINE_enum(
    "dtype",
    "bfloat16",
    ["bfloat16", "float32", "float32_highest"],
    "Input dtype: bf16 (the 16-bit sweep), float32 (the TF32 sweep of mosaic_gpu_f32), "
    'float32_highest (its split-TF32 form, precision="highest").',
)


class Kind(NamedTuple):
    """How one input dtype runs: bytes per element, copies of each operand the kernel
    reads (split: TF32 head and rest), tensor-core passes per product, the peak of
    those passes relative to --peak_tflops (TF32: half of bf16's), and whether XLA
    hands the kernel Y^T and Z^T (the float32 sweeps)."""

    item: int
    parts: int
    passes: int
    peak_scale: float
    transposed: bool


KINDS = {
    "bfloat16": Kind(2, 1, 1, 1.0, False),
    "float32": Kind(4, 1, 1, 0.5, True),
    "float32_highest": Kind(4, 2, 3, 0.5, True),
}


def _pass(width: int, z_cols: int, state_only: bool, kind: Kind) -> tuple[float, float]:
    """(bytes, FLOPs) per token x head of one sweep with state rows `width`, Z `z_cols`."""
    tiles = z_cols // mg.TILE
    block = mg.DEFAULT_BLOCK
    operand = kind.item * kind.parts  # bytes per element the kernel reads
    y_bytes = width * operand * tiles  # Y (float32: Y^T) re-read by every Z tile
    z_bytes = z_cols * operand
    update = 2 * width * mg.TILE * tiles * kind.passes  # state += Yt (decay * Z)
    if state_only:
        return y_bytes + z_bytes, update
    x_bytes = width * operand * tiles
    if kind.transposed:  # the TF32 sweep reads Y and Y^T; XLA makes Y^T, Z^T (split: X, Y too)
        x_bytes += width * operand * tiles
        made = 3 * width + z_cols if kind.parts > 1 else width + z_cols
        x_bytes += made * kind.item * (1 + kind.parts)  # read once, written in parts
    out_bytes = z_cols * kind.item
    scores = 2 * block * width * tiles  # X Yt, per row
    intra = 2 * block * mg.TILE * tiles  # masked scores @ Z
    inter = 2 * width * mg.TILE * tiles  # X @ state
    flops = (scores + intra + inter) * kind.passes + update
    return x_bytes + y_bytes + z_bytes + out_bytes, flops


def estimate(batch: int, heads: int, n: int, d: int, e: int, kind: Kind) -> list[dict]:
    """One row per kernel launch of forward + backward."""
    groups = batch * heads
    tiling = mg.choose_tiling(groups, e, n)
    splits = tiling.splits
    d, e = (mg.round_up(x, mg.DIM_ALIGN) for x in (d, e))
    # Per token x head: states in and out of every program, and the XLA combine (f32).
    state_bytes = lambda a, z: 2 * a * z * 4 * splits / n  # noqa: E731
    combine_bytes = lambda a, z: 3 * a * z * 4 * splits / n if splits > 1 else 0.0  # noqa: E731
    passes = [  # name, width A, Z columns, state only
        ("forward", d, e, False),
        ("dQ", e, d, False),
        ("dV (+ dS0)", d, e, False),
        ("dK", e, d, False),
    ]
    if splits > 1:
        passes[1:1] = [("forward states (backward: recomputed)", d, e, True)]
        passes.insert(0, ("forward states", d, e, True))
        passes.insert(3, ("dQ states", e, d, True))
        passes.insert(5, ("dV states", d, e, True))
    rows = []
    tokens = groups * n
    for name, width, z_cols, state_only in passes:
        if name == "forward states (backward: recomputed)":
            continue
        bytes_, flops = _pass(width, z_cols, state_only, kind)
        bytes_ += state_bytes(width, z_cols) + combine_bytes(width, z_cols)
        programs = groups * splits * (z_cols // mg.TILE)
        t_mem = bytes_ * tokens / (FLAGS.hbm_tbps * 1e12)
        t_flop = flops * tokens / (FLAGS.peak_tflops * kind.peak_scale * 1e12)
        rows.append(
            dict(
                kernel=name,
                programs=programs,
                per_sm=programs / FLAGS.sms,
                blocks_per_program=tiling.split_blocks,
                bytes_per_token=bytes_,
                flops_per_token=flops,
                ms=max(t_mem, t_flop) * 1e3,
                bound="memory" if t_mem >= t_flop else "compute",
            )
        )
    return rows


def roofline_ms(
    batch: int, heads: int, n: int, d: int, e: int, item: int = 2
) -> tuple[float, float]:
    """(forward, forward + backward) memory roofline in ms: the op's own inputs/outputs
    (`item` bytes per element)."""
    tokens = batch * heads * n
    fwd = (2 * d + 2 * e) * item * tokens  # q, k, v read; o written
    bwd = (2 * d + 2 * e) * item * tokens + (2 * d + e) * item * tokens  # q,k,v,do; dq,dk,dv
    bw = FLAGS.hbm_tbps * 1e12
    return fwd / bw * 1e3, (fwd + bwd) / bw * 1e3


def main(argv):
    del argv
    shapes = ((4, 32, 32768, 128, 128), (1, 8, 32768, 128, 128))
    kind = KINDS[FLAGS.dtype]
    print(
        f"Estimates, {FLAGS.dtype}: H200 {FLAGS.hbm_tbps} TB/s, "
        f"{FLAGS.peak_tflops * kind.peak_scale:g} TFLOP/s, {FLAGS.sms} SMs"
    )
    print(
        "\n| shape | kernel | programs (per SM) | blocks / program | HBM B / token "
        "| FLOP / token | ms | bound |"
    )
    print("|---|---|---|---|---|---|---|---|")
    totals = []
    for batch, heads, n, d, e in shapes:
        label = f"b{batch} h{heads}"
        rows = estimate(batch, heads, n, d, e, kind)
        for r in rows:
            print(
                f"| {label} | {r['kernel']} | {r['programs']} ({r['per_sm']:.1f}) | "
                f"{r['blocks_per_program']} | {r['bytes_per_token']:.0f} | "
                f"{r['flops_per_token']:.0f} | {r['ms']:.2f} | {r['bound']} |"
            )
        fwd_roof, total_roof = roofline_ms(batch, heads, n, d, e, kind.item)
        fwd_ms = sum(r["ms"] for r in rows if r["kernel"].startswith("forward"))
        total_ms = sum(r["ms"] for r in rows)
        assert math.isfinite(total_ms)
        totals.append(
            f"| {label} seq {n} d=e={d} | {fwd_ms:.2f} ms | {fwd_roof:.2f} ms | "
            f"{fwd_ms / fwd_roof:.2f}x | {total_ms:.2f} ms | {total_roof:.2f} ms | "
            f"{total_ms / total_roof:.2f}x |"
        )
    print("\n| shape | forward | roofline | ratio | forward + backward | roofline | ratio |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(totals))


if __name__ == "__main__":
    cli.run(main)
