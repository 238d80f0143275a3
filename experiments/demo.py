"""Quick demonstration of lightning-jax on whatever device JAX sees (CPU included).

Runs the op, checks it against the O(n^2) reference, shows the state carry that
chunked prefill and decoding rely on, takes a gradient, and times the chunked
XLA path against the quadratic reference at a few sequence lengths.

  python experiments/demo.py
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import lightning_jax as lj
from lightning_jax import cli


def _median_time(fn, *args, reps: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv: list[str]) -> None:
    del argv  # no flags: cli.run refuses any, and answers --help
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
    batch, heads, seq, d = 2, 8, 1000, 64
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(kk, (batch, heads, seq, d)) / d**0.5 for kk in keys)
    slopes = lj.alibi_slopes(heads)  # head h decays by exp(-slopes[h]) per token

    o, state = lj.lightning_attention(q, k, v, slopes, return_final_state=True)
    o_ref, state_ref = lj.reference.naive_attention(q, k, v, slopes, return_final_state=True)
    err = float(jnp.max(jnp.abs(o - o_ref)) / jnp.max(jnp.abs(o_ref)))
    print(f"o {o.shape} {o.dtype}, final state {state.shape}; max error vs reference {err:.1e}")
    assert err < 1e-5 and float(jnp.max(jnp.abs(state - state_ref))) < 1e-4

    # The state carries a sequence across calls: prefill 600 tokens, then continue.
    o1, mid = lj.lightning_attention(
        q[:, :, :600], k[:, :, :600], v[:, :, :600], slopes, return_final_state=True
    )
    o2 = lj.lightning_attention(
        q[:, :, 600:], k[:, :, 600:], v[:, :, 600:], slopes, initial_state=mid
    )
    carry_err = float(jnp.max(jnp.abs(jnp.concatenate([o1, o2], axis=2) - o)))
    print(f"two calls with the state carried == one call: max difference {carry_err:.1e}")
    assert carry_err < 1e-5

    grads = jax.grad(
        lambda q, k, v: jnp.sum(lj.lightning_attention(q, k, v, slopes) ** 2), (0, 1, 2)
    )(q, k, v)
    print("grad norms dq, dk, dv:", [round(float(jnp.linalg.norm(g)), 3) for g in grads])

    print("\ntime per token, batch 1, 8 heads, d = e = 64, float32 (median of 5):")
    print(f"{'seq':>7} {'xla us/tok':>11} {'reference us/tok':>17}")
    for n in (1024, 4096, 16384):
        x = jax.random.normal(keys[0], (1, 8, n, 64))
        xla = jax.jit(lambda x: lj.lightning_attention(x, x, x, slopes, impl="xla"))
        ref = jax.jit(lambda x: lj.lightning_attention(x, x, x, slopes, impl="reference"))
        t_xla = _median_time(xla, x) / n * 1e6
        t_ref = _median_time(ref, x) / n * 1e6 if n <= 4096 else float("nan")
        print(f"{n:>7} {t_xla:>11.2f} {t_ref:>17.2f}")
    print("(the reference is O(n^2): skipped above 4096)")


if __name__ == "__main__":
    cli.run(main)
