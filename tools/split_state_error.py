r"""The error budget of Mosaic GPU's split states at seq 64K: float32 (stored) vs bfloat16.

When batch x heads leaves SMs idle, `pallas_kernels.mosaic_gpu` splits the sequence
(`choose_tiling`) and hands each split the state entering it, combined by XLA and
stored in float32 (the forward's KV and the dQ pass's KV^T from the start, the dV and
dK passes' dKV from the end). Storing those states in bfloat16 would halve their bytes;
this measures what each storage dtype costs in accuracy, beside the error bf16
inputs and outputs carry anyway.

An emulation, not the kernels: the split algorithm run by the XLA path in float64
(`impl="xla"` under x64) on bf16-rounded inputs. The exact state at every split
boundary (float64) is rounded to the storage dtype, each split is run from it, and
the concatenated outputs are compared with those from the exact states, as RMS and
max error relative to the output's RMS and max. The forward pass's output only (the
backward's dKV states are the same kind of sum, walked from the other end). The
reference row: the float64 output itself rounded to bf16 (the op's output dtype).

  python tools/split_state_error.py            # b1 h8 d = e = 128, seq 65536
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import lightning_jax as lj
from lightning_jax import cli
from pallas_kernels import mosaic_gpu

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags (defined only when run as a script: the tests import this
    module beside other scripts that define flags of the same names)."""
    flags.DEFINE_integer("batch", 1, "Batch.", lower_bound=1)
    flags.DEFINE_integer("heads", 8, "Heads (ALiBi slopes).", lower_bound=1)
    flags.DEFINE_integer("seq", 65536, "Sequence length.", lower_bound=1)
    flags.DEFINE_integer("dim", 128, "d = e.", lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Input seed.", lower_bound=0)
    flags.DEFINE_string("out", "runs/split_state_error.json", "JSON file (empty: none).")


def relative_errors(actual: np.ndarray, expected: np.ndarray) -> dict[str, float]:
    """RMS and max |error|, relative to the expected values' RMS and max |value|."""
    err = actual - expected
    return {
        "rms": float(np.sqrt(np.mean(err**2)) / np.sqrt(np.mean(expected**2))),
        "max": float(np.max(np.abs(err)) / np.max(np.abs(expected))),
    }


def main(argv):
    del argv
    jax.config.update("jax_enable_x64", True)
    b, h, n, d = FLAGS.batch, FLAGS.heads, FLAGS.seq, FLAGS.dim
    tiling = mosaic_gpu.choose_tiling(b * h, d, n)
    split_rows = tiling.block * tiling.split_blocks
    keys = jax.random.split(jax.random.PRNGKey(FLAGS.seed), 3)
    # The kernel's inputs: bf16 numbers (q, k scaled as a model's would be), computed in f64.
    q, k, v = (
        (jax.random.normal(key, (b, h, n, d), jnp.float32) / (d**0.25 if i < 2 else 1.0))
        .astype(jnp.bfloat16)
        .astype(jnp.float64)
        for i, key in enumerate(keys)
    )
    slopes = lj.alibi_slopes(h).astype(jnp.float64)
    run = jax.jit(
        lambda q, k, v, s0: lj.lightning_attention(
            q, k, v, slopes, initial_state=s0, return_final_state=True, impl="xla"
        )
    )
    start = time.perf_counter()
    # The exact state entering every split, in float64 numpy (the op returns its final
    # state in float32): S <- lambda^L S + sum_j lambda^(L-1-j) k_j^T v_j over a split.
    lam = np.exp(-np.asarray(slopes))[None, :, None, None]
    k64, v64 = np.asarray(k), np.asarray(v)
    state, entering = np.zeros((b, h, d, d)), []
    for s in range(tiling.splits):
        rows = slice(s * split_rows, min(n, (s + 1) * split_rows))
        entering.append(state)
        length = rows.stop - rows.start
        weights = lam ** np.arange(length - 1, -1, -1)[None, None, :, None]
        update = np.einsum("bhtd,bhte->bhde", k64[:, :, rows] * weights, v64[:, :, rows])
        state = lam**length * state + update

    def split_outputs(states) -> np.ndarray:
        outs = []
        for s in range(tiling.splits):
            rows = slice(s * split_rows, min(n, (s + 1) * split_rows))
            outs.append(run(q[:, :, rows], k[:, :, rows], v[:, :, rows], states[s])[0])
        return np.asarray(jnp.concatenate(outs, axis=2))

    exact = split_outputs([jnp.asarray(x) for x in entering])
    # The emulation itself: split from the exact states = the unsplit float64 op.
    unsplit = np.asarray(run(q, k, v, jnp.zeros((b, h, d, d), jnp.float64))[0])
    check = relative_errors(exact, unsplit)
    assert check["max"] < 1e-9, check
    rows_out = [
        {"storage": "output rounded to bf16 (the op's own output dtype)"}
        | relative_errors(np.asarray(jnp.asarray(exact).astype(jnp.bfloat16), np.float64), exact)
    ]
    for dtype in (jnp.float32, jnp.bfloat16):
        out = split_outputs([jnp.asarray(x).astype(dtype).astype(jnp.float64) for x in entering])
        rows_out.append(
            {"storage": f"split states in {jnp.dtype(dtype).name}"} | relative_errors(out, exact)
        )
    seconds = time.perf_counter() - start
    print(
        f"b{b} h{h} seq {n} d = e = {d}, ALiBi slopes, bf16 inputs; {tiling.splits} splits of "
        f"{split_rows} rows (choose_tiling); float64 XLA path ({seconds:.0f} s); split from "
        f"the exact states vs unsplit: max {check['max']:.1e}"
    )
    print("| storage | RMS error / RMS | max error / max |")
    print("|---|---|---|")
    for row in rows_out:
        print(f"| {row['storage']} | {row['rms']:.2e} | {row['max']:.2e} |")
    if FLAGS.out:
        record = {
            "shape": {"batch": b, "heads": h, "seq": n, "d": d, "e": d},
            "splits": tiling.splits,
            "split_rows": split_rows,
            "jax": jax.__version__,
            "date": time.strftime("%Y-%m-%d"),
            "split_vs_unsplit_float64": check,
            "rows": rows_out,
        }
        Path(FLAGS.out).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
