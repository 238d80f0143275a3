"""The chunked XLA path: the shared suite plus checks of its tiling and memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import test_util

from lightning_jax import reference
from lightning_jax.xla import lightning_attention_xla
from op_test_base import (
    F32_TOL,
    LightningOpTestBase,
    assert_close,
    loss_and_grads,
    make_inputs,
    make_slopes,
)


class TestXla(LightningOpTestBase):
    impl = "xla"


@pytest.mark.parametrize(
    "seq, block, chunk",
    [(300, 16, 64), (256, 16, 64), (257, 16, 64), (199, 8, 24), (130, 64, 64), (40, 64, 1024)],
)
def test_many_chunks_and_tails(seq, block, chunk):
    """Several scan steps, a tail chunk, a partial last block: forward, state and grads."""
    slopes = make_slopes("strong", 3)
    q, k, v, s0, do, ds = make_inputs(10, 2, 3, seq, 12, 20)

    def fn(q, k, v, s0):
        return lightning_attention_xla(q, k, v, slopes, s0, block_size=block, chunk_size=chunk)

    def ref(q, k, v, s0):
        return reference.naive_attention(q, k, v, slopes, initial_state=s0, return_final_state=True)

    for got, want in zip(jax.jit(fn)(q, k, v, s0), ref(q, k, v, s0)):
        assert_close(got, want, F32_TOL, "forward")
    got = jax.jit(lambda *a: loss_and_grads(fn, *a))(q, k, v, s0, do, ds)
    want = loss_and_grads(ref, q, k, v, s0, do, ds)
    for name, a, b in zip(("dq", "dk", "dv", "ds0"), got, want):
        assert_close(a, b, F32_TOL, name)


def test_check_grads_float64():
    """Numerical vs. analytic gradients (Algorithm 2) in float64, x64 on in this test only."""
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.PRNGKey(11), 4)
        b, h, n, d, e = 1, 2, 45, 5, 3
        q = jax.random.normal(keys[0], (b, h, n, d), jnp.float64)
        k = jax.random.normal(keys[1], (b, h, n, d), jnp.float64)
        v = jax.random.normal(keys[2], (b, h, n, e), jnp.float64)
        s0 = jax.random.normal(keys[3], (b, h, d, e), jnp.float64)
        slopes = jnp.array([0.4, 0.05], jnp.float32)

        def fn(q, k, v, s0):
            o, state = lightning_attention_xla(q, k, v, slopes, s0, block_size=8, chunk_size=16)
            assert o.dtype == jnp.float64 and state.dtype == jnp.float64
            return o, state

        test_util.check_grads(fn, (q, k, v, s0), order=1, modes=("rev",), atol=1e-7, rtol=1e-7)


def _temp_bytes(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("with_grad", [False, True], ids=["fwd", "fwd+bwd"])
def test_memory_is_linear_in_seq(with_grad):
    """Temp memory grows at most linearly with seq (no [seq, seq] array, nothing quadratic)."""
    slopes = make_slopes("alibi", 2)

    def fn(q, k, v):
        o = lightning_attention_xla(q, k, v, slopes, jnp.zeros((1, 2, 32, 32)))[0]
        return o

    if with_grad:
        fn = jax.grad(lambda q, k, v, f=fn: jnp.sum(f(q, k, v)), argnums=(0, 1, 2))
    temps = {}
    for n in (4096, 16384):
        x = jax.ShapeDtypeStruct((1, 2, n, 32), jnp.float32)
        temps[n] = _temp_bytes(fn, x, x, x)
    # Per token at 16K no more than at 4K (plus slack); far below one [seq, seq] matrix.
    assert temps[16384] / 16384 <= 1.05 * temps[4096] / 4096, temps
    assert temps[16384] < 16384 * 16384 * 4 / 64, temps


def test_reference_formulas_agree():
    """The two references (quadratic formula, per-token recurrence) agree, grads too."""
    slopes = make_slopes("strong", 3)
    q, k, v, s0, do, ds = make_inputs(12, 2, 3, 77, 10, 6)

    def naive(q, k, v, s0):
        return reference.naive_attention(q, k, v, slopes, initial_state=s0, return_final_state=True)

    def recurrent(q, k, v, s0):
        return reference.recurrent_attention(
            q, k, v, slopes, initial_state=s0, return_final_state=True
        )

    for a, b in zip(naive(q, k, v, s0), recurrent(q, k, v, s0)):
        assert_close(a, b, F32_TOL, "forward")
    for a, b in zip(
        loss_and_grads(naive, q, k, v, s0, do, ds), loss_and_grads(recurrent, q, k, v, s0, do, ds)
    ):
        assert_close(a, b, F32_TOL, "grads")


def test_reference_matches_float64_numpy():
    """The quadratic reference against an independent float64 numpy loop."""
    b, h, n, d, e = 1, 2, 9, 3, 4
    q, k, v, s0, _, _ = make_inputs(13, b, h, n, d, e)
    slopes = np.array([0.7, 0.0])
    o, state = reference.naive_attention(
        q, k, v, jnp.asarray(slopes, jnp.float32), initial_state=s0, return_final_state=True
    )
    qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
    kv = np.asarray(s0, np.float64).copy()
    o_np = np.zeros((b, h, n, e))
    for t in range(n):
        kv = np.exp(-slopes)[None, :, None, None] * kv + kn[:, :, t, :, None] * vn[:, :, t, None, :]
        o_np[:, :, t] = np.einsum("bhd,bhde->bhe", qn[:, :, t], kv)
    np.testing.assert_allclose(np.asarray(o), o_np, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(state), kv, rtol=1e-5, atol=1e-5)
