r"""Derive the test suite's per-implementation tolerances from measured errors.

For every implementation and input dtype, runs the cases of the shared test suite
(tests/op_test_base.py: `CASES` in float32, `LOW_PRECISION_CASES` in bfloat16 and
float16, with the tests' seed and `--extra_seeds` more) and measures the error of
the output, the final state and the gradients dq, dk, dv, d initial_state against
the float64 reference (`reference.naive_attention` under x64; the per-token
recurrence beyond 1024 rows), with the suite's own code (`case_errors`). Errors
are relative to the reference's scale: max |error| / max |reference| in float32,
RMS(error) / RMS(reference) in bfloat16 and float16.

Each tolerance is --factor (default 4) times the worst error measured for that
(impl, dtype, case, quantity) over the seeds, first raised to float32's resolution 2^-23
(the reference returns its final state in float32), rounded up to two
significant digits. The factor leaves room for other seeds and XLA versions; it
is small enough that a state rounded to bf16/f16 between blocks (errors 10-1000x
the baseline, see `tools/mutation_check.py`) fails.

  python tools/derive_tolerances.py      # all impls, ~10 min on 2 CPU cores
  python tools/derive_tolerances.py --impls=triton --dtypes=bfloat16

Prints a table and writes runs/tolerances.json: the tests' table (tests/tolerances.json,
or --out's file where it exists) with the impls and dtypes of this run replaced.
--out=tests/tolerances.json updates the table the tests read. Pallas kernels run in the
interpreter on CPU.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from absl import flags

from lightning_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_list(
    "impls", ["xla", "triton", "mosaic_tpu", "mosaic_gpu"], "Implementations to measure."
)
flags.DEFINE_list("dtypes", ["float32", "bfloat16", "float16"], "Input dtypes.")
flags.DEFINE_integer("extra_seeds", 1, "Seeds measured besides the tests' own seed.", lower_bound=0)
flags.DEFINE_float("factor", 4.0, "Tolerance = factor x the worst measured error.", lower_bound=0)
flags.DEFINE_string(
    "out",
    "runs/tolerances.json",
    "JSON to write ('' to skip); --out=tests/tolerances.json updates the tests' table.",
)
COMMITTED = "tests/tolerances.json"  # the table the tests read: the base that --out extends

FLOOR = 2.0**-23  # float32 resolution: below it, the float32 reference state's own rounding
SEED_STEP = 100  # extra seed i is the tests' seed + SEED_STEP * i


def round_up(x: float, digits: int = 2) -> float:
    """x rounded up to `digits` significant digits."""
    if x <= 0:
        return 0.0
    scale = 10.0 ** (math.floor(math.log10(x)) - digits + 1)
    return math.ceil(x / scale - 1e-9) * scale


def tolerance(worst: float, factor: float) -> float:
    """The documented rule: factor x max(worst, FLOOR), rounded up to two digits."""
    return float(f"{round_up(factor * max(worst, FLOOR)):.2g}")


def measure(impl: str, dtype_name: str, extra_seeds: int) -> dict:
    """Errors per case and quantity over the tests' seed and the extra seeds.

    Returns {case_id: {quantity: [error per seed]}}.
    """
    import jax.numpy as jnp

    import op_test_base as base

    suite = type("Suite", (base.LightningOpTestBase,), {"impl": impl})()
    dtype = jnp.dtype(dtype_name)
    if dtype == jnp.float32:
        cases, seed0 = base.CASES, base.F32_SEED
    else:
        cases, seed0 = base.LOW_PRECISION_CASES, base.LOW_PRECISION_SEED
    if impl == "mosaic_gpu":  # its slow interpreter runs a subset: the cases its tests use
        import test_mosaic_gpu

        float32 = dtype == jnp.float32
        cases = (
            test_mosaic_gpu.INTERPRET_CASES
            if float32
            else test_mosaic_gpu.LOW_PRECISION_INTERPRET_CASES
        )
        suite = test_mosaic_gpu.TestMosaicGpuInterpret()
    seeds = [seed0] + [seed0 + SEED_STEP * (i + 1) for i in range(extra_seeds)]
    errors = {}
    for case in cases:
        per_seed = [base.case_errors(suite.stateful, case, dtype, seed) for seed in seeds]
        errors[base.case_id(case)] = {name: [e[name] for e in per_seed] for name in base.QUANTITIES}
    return errors


def main(argv):
    del argv
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "tests"))
    import jax

    import op_test_base as base

    path = FLAGS.out
    table = {}
    base_path = path if path and os.path.exists(path) else os.path.join(root, COMMITTED)
    if os.path.exists(base_path):
        with open(base_path) as f:
            table = json.load(f)
    tolerances = table.get("tolerances", {})
    measured = table.get("measured", {})
    names = base.QUANTITIES
    print("worst measured error / tolerance (= factor x max(worst, floor), 2 digits up); "
          "float32: max-abs metric, bf16/f16: RMS metric")  # fmt: skip
    print(f"{'impl':>10} {'dtype':>8} {'case':>34} " + " ".join(f"{n:>17}" for n in names))
    for impl in FLAGS.impls:
        for dtype_name in FLAGS.dtypes:
            start = time.perf_counter()
            errors = measure(impl, dtype_name, FLAGS.extra_seeds)
            tolerances.setdefault(impl, {})[dtype_name] = {
                case: {n: tolerance(max(errs[n]), FLAGS.factor) for n in names}
                for case, errs in errors.items()
            }
            measured.setdefault(impl, {})[dtype_name] = errors
            for case, errs in errors.items():
                tols = tolerances[impl][dtype_name][case]
                cells = " ".join(f"{max(errs[n]):>8.2g}/{tols[n]:<8.2g}" for n in names)
                print(f"{impl:>10} {dtype_name:>8} {case:>34} {cells}")
            print(f"  ({impl} {dtype_name}: {time.perf_counter() - start:.0f} s)", flush=True)
    table.update(
        about=(
            "Tolerances of tests/op_test_base.py per impl, input dtype, case and quantity: "
            "factor x the worst error measured against the float64 reference over the "
            "tests' seed and the extra seeds (raised to the floor first), rounded up to two "
            "significant digits. Written by tools/derive_tolerances.py; rerun it when "
            "a kernel changes. measured: the errors, one per seed."
        ),
        factor=FLAGS.factor,
        floor=FLOOR,
        metric=dict(
            float32="max |error| / max |reference|", low_precision="RMS(error) / RMS(reference)"
        ),
        seeds=dict(
            float32=base.F32_SEED,
            low_precision=base.LOW_PRECISION_SEED,
            extra_seeds=FLAGS.extra_seeds,
            extra_seed_step=SEED_STEP,
        ),  # fmt: skip
        command="python " + " ".join(sys.argv),
        date=time.strftime("%Y-%m-%d"),
        jax=jax.__version__,
        backend=jax.default_backend(),
        tolerances=tolerances,
        measured=measured,
    )
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
            f.write("\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    cli.run(main)
