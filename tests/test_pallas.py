"""Pallas kernels: the shared suite in interpret mode, and lowering for GPU and TPU.

Interpret mode (the default on a CPU backend) runs the kernels anywhere. The
lowering tests build the real kernels (interpret=False) for platforms "cuda" and
"tpu" on this machine, which runs the Pallas -> Triton / Mosaic lowering and
its checks (block shapes, the TPU (8, 128) rule) without the hardware.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

import lightning_jax as lj
from jaxpr_tools import pallas_calls
from op_test_base import LightningOpTestBase


class TestTritonInterpret(LightningOpTestBase):
    impl = "triton"


class TestMosaicTpuInterpret(LightningOpTestBase):
    impl = "mosaic_tpu"
    checkpoint_ok = False  # the TPU interpreter's io_callbacks cannot be rematerialised


@pytest.mark.parametrize(
    "impl, block_size, match",
    [
        ("triton", 24, "power of two >= 16"),
        ("triton", 8, "power of two >= 16"),
        ("mosaic_tpu", 12, "multiple of 8"),
    ],
)
def test_kernel_block_size_rules(impl, block_size, match):
    x = jnp.zeros((1, 2, 40, 16))
    with pytest.raises(ValueError, match=match):
        lj.lightning_attention(x, x, x, impl=impl, block_size=block_size)


@pytest.mark.parametrize("impl", ["triton", "mosaic_tpu"])
def test_float64_is_refused(impl):
    with jax.enable_x64(True):
        x = jnp.zeros((1, 2, 8, 16), jnp.float64)
        with pytest.raises(TypeError, match='q is float64.*impl="xla"'):
            lj.lightning_attention(x, x, x, impl=impl)


def test_interpret_must_be_bool_or_none():
    x = jnp.zeros((1, 2, 8, 16))
    with pytest.raises(TypeError, match="interpret must be None or a bool"):
        lj.lightning_attention(x, x, x, impl="triton", interpret="yes")


# The kernels' platform and custom call, and how many kernels the backward has.
LOWERING = {
    "triton": ("cuda", "__gpu$xla.gpu.triton"),
    "mosaic_tpu": ("tpu", "tpu_custom_call"),
}
BACKWARD_KERNELS = {"triton": 3, "mosaic_tpu": 2}


def _custom_calls(text: str) -> list[str]:
    return re.findall(r'call_target_name = "([^"]+)"', text) + re.findall(
        r"stablehlo\.custom_call @([\w$.]+)\(", text
    )


@pytest.mark.parametrize("impl", sorted(LOWERING))
def test_lowers_to_the_kernels(impl):
    """Batch 2, 8 heads, seq 8192, d = e = 128, bf16: forward and forward+backward."""
    platform, target = LOWERING[impl]
    x = jax.ShapeDtypeStruct((2, 8, 8192, 128), jnp.bfloat16)
    s0 = jax.ShapeDtypeStruct((2, 8, 128, 128), jnp.float32)
    slopes = lj.alibi_slopes(8)

    def fwd(q, k, v, s0):
        return lj.lightning_attention(
            q, k, v, slopes, initial_state=s0, return_final_state=True, impl=impl, interpret=False
        )

    def fwd_bwd(q, k, v, s0):
        def loss(q, k, v, s0):
            o, state = fwd(q, k, v, s0)
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(state)

        return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, s0)

    for fn, kernels in ((fwd, 1), (fwd_bwd, 1 + BACKWARD_KERNELS[impl])):
        text = jax.jit(fn).trace(x, x, x, s0).lower(lowering_platforms=(platform,)).as_text()
        calls = _custom_calls(text)
        assert calls.count(target) == kernels, calls
        # No XLA fallback: the sweep over the sequence is inside the kernels.
        assert "stablehlo.while" not in text


@pytest.mark.parametrize("impl", sorted(LOWERING))
@pytest.mark.parametrize("d, e", [(192, 100), (60, 256), (16, 16)])
def test_awkward_dims_lower(impl, d, e):
    """Head dims that are not tile-sized lower too (the wrapper pads them)."""
    platform, target = LOWERING[impl]
    q = jax.ShapeDtypeStruct((1, 3, 1000, d), jnp.bfloat16)
    v = jax.ShapeDtypeStruct((1, 3, 1000, e), jnp.bfloat16)
    slopes = lj.alibi_slopes(3)

    def fwd_bwd(q, k, v):
        def loss(q, k, v):
            o = lj.lightning_attention(q, k, v, slopes, impl=impl, interpret=False)
            return jnp.sum(o.astype(jnp.float32))

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    text = jax.jit(fwd_bwd).trace(q, q, v).lower(lowering_platforms=(platform,)).as_text()
    assert _custom_calls(text).count(target) == 1 + BACKWARD_KERNELS[impl]


def test_auto_picks_the_backend_kernel(monkeypatch):
    """impl="auto": triton on GPU, mosaic_tpu on TPU, the XLA path on CPU."""
    from lightning_jax import api

    for backend, want in (("gpu", "triton"), ("tpu", "mosaic_tpu"), ("cpu", "xla")):
        monkeypatch.setattr(api.jax, "default_backend", lambda b=backend: b)
        assert api._resolve_impl("auto") == want


def test_triton_cost_estimates():
    """Every Triton pallas_call declares its cost; forward figures checked by hand.

    b1 h2 seq 128 d = e = 64 bf16, block 64: per row the forward does
    64*d (scores) + 64*e (intra) + 2*d*e (inter, state update) multiply-adds;
    it reads q, k, v and writes o (bf16), reads s0 and writes the state (f32);
    per block it takes the exp of 64 q decays, 64 k decays, the 64 x 64 mask and
    the state decay.
    """
    b, h, n, d, e, block = 1, 2, 128, 64, 64, 64
    x = jax.ShapeDtypeStruct((b, h, n, d), jnp.bfloat16)

    def loss(q, k, v):
        o = lj.lightning_attention(q, k, v, impl="triton", interpret=False, block_size=block)
        return jnp.sum(o.astype(jnp.float32))

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(x, x, x)
    calls = {eqn.params["name"]: eqn.params["cost_estimate"] for eqn in pallas_calls(jaxpr.jaxpr)}
    assert set(calls) == {"lightning_forward", "lightning_dq", "lightning_dk", "lightning_dv"}
    fwd = calls["lightning_forward"]
    rows = b * h * n
    assert fwd.flops == 2 * rows * (block * d + block * e + 2 * d * e)
    assert fwd.transcendentals == b * h * (n // block) * (2 * block + block * block + 1)
    assert fwd.bytes_accessed == b * h * (n * (2 * d + 2 * e) * 2 + 2 * d * e * 4)
    for name, cost in calls.items():
        assert cost.flops > 0 and cost.bytes_accessed > 0 and cost.transcendentals > 0, name
