"""What precision="default" costs in accuracy for float32 inputs, emulated on CPU.

On NVIDIA GPUs "default" multiplies float32 on TF32 tensor cores: each operand
is rounded to a 10-bit mantissa, products are accumulated in float32. A CPU
has no TF32, so this script emulates it in the XLA path: it rounds both
operands of every input matmul to TF32 (round to nearest even) and leaves the
float32 state arithmetic exact, as the kernels do. It prints the error of the
output, the final state and the gradients against the float64 reference for
"highest" (exact float32), emulated TF32 and bfloat16 inputs, over a few shapes
and slopes. These are emulation figures, not GPU measurements.

    python tools/tf32_error.py
"""

from __future__ import annotations

import contextlib
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import lightning_jax as lj
from lightning_jax import cli, xla

FLAGS = flags.FLAGS
flags.DEFINE_string("json", None, "Also write the rows as JSON here.")
flags.DEFINE_integer("seq", 2048, "Sequence length.", lower_bound=1)

CASES = [("none", 64), ("alibi", 64), ("alibi", 128)]  # slopes, d = e


def round_to_tf32(x: jax.Array) -> jax.Array:
    """float32 -> the nearest TF32 value (10 explicit mantissa bits), kept as float32."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    # Round to nearest even at bit 13, then clear the 13 low mantissa bits.
    bias = jnp.uint32(0xFFF) + ((bits >> 13) & 1)
    return jax.lax.bitcast_convert_type((bits + bias) & jnp.uint32(0xFFFFE000), jnp.float32)


@contextlib.contextmanager
def emulated_tf32():
    """Makes the XLA path's input matmuls at "default" precision round like TF32."""
    exact = xla._einsum

    def tf32_einsum(spec, a, b, precision):
        if precision == jax.lax.Precision.DEFAULT and a.dtype == jnp.float32:
            a, b = round_to_tf32(a), round_to_tf32(b)
        return exact(spec, a, b, jax.lax.Precision.HIGHEST)

    xla._einsum = tf32_einsum
    try:
        yield
    finally:
        xla._einsum = exact


def _errors(q, k, v, s0, do, ds, slopes, dtype, precision):
    """Max error relative to each reference tensor's max, for o, state and the grads."""

    def run(q, k, v, s0, impl):
        return lj.lightning_attention(
            q, k, v, slopes, initial_state=s0, return_final_state=True, impl=impl,
            precision=precision,
        )  # fmt: skip

    def loss(q, k, v, s0, impl):
        o, state = run(q, k, v, s0, impl)
        return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(state * ds)

    cast = [x.astype(dtype) for x in (q, k, v)]
    with jax.enable_x64(True):
        ref_in = [jnp.asarray(np.asarray(x, np.float64)) for x in (*cast, s0)]
        o_ref, st_ref = run(*ref_in, "reference")
        do64, ds64 = (jnp.asarray(np.asarray(x, np.float64)) for x in (do, ds))

        def loss_ref(q, k, v, s0):
            o, state = run(q, k, v, s0, "reference")
            return jnp.sum(o * do64) + jnp.sum(state * ds64)

        g_ref = jax.grad(loss_ref, argnums=(0, 1, 2, 3))(*ref_in)
        refs = [np.asarray(x) for x in (o_ref, st_ref, *g_ref)]
    o, state = jax.jit(functools.partial(run, impl="xla"))(*cast, s0)
    grads = jax.jit(jax.grad(functools.partial(loss, impl="xla"), argnums=(0, 1, 2, 3)))(*cast, s0)
    out = {}
    for name, got, want in zip(("o", "state", "dq", "dk", "dv", "ds0"), (o, state, *grads), refs):
        err = np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want))
        out[name] = float(err)
    return out


def main(argv):
    del argv
    rows = []
    for slope_kind, dim in CASES:
        keys = jax.random.split(jax.random.PRNGKey(0), 6)
        shape = (1, 4, FLAGS.seq, dim)
        q, k, v, do = (jax.random.normal(kk, shape) for kk in keys[:4])
        s0 = jax.random.normal(keys[4], (1, 4, dim, dim))
        ds = jax.random.normal(keys[5], (1, 4, dim, dim))
        slopes = lj.alibi_slopes(4) if slope_kind == "alibi" else None
        for label, dtype, precision, ctx in (
            ("float32 highest", jnp.float32, "highest", contextlib.nullcontext()),
            ("float32 default (TF32, emulated)", jnp.float32, "default", emulated_tf32()),
            ("bfloat16", jnp.bfloat16, "default", contextlib.nullcontext()),
        ):
            with ctx:
                errs = _errors(q, k, v, s0, do, ds, slopes, dtype, precision)
            rows.append({"slopes": slope_kind, "d": dim, "seq": FLAGS.seq, "inputs": label, **errs})
    names = ("o", "state", "dq", "dk", "dv", "ds0")
    print(f"{'slopes':>6} {'d':>4} {'inputs':>33} " + " ".join(f"{n:>9}" for n in names))
    for r in rows:
        print(
            f"{r['slopes']:>6} {r['d']:>4} {r['inputs']:>33} "
            + " ".join(f"{r[n]:9.1e}" for n in names)
        )
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    cli.run(main)
