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


# The kernels' custom calls, and how many the forward / forward+backward must contain.
LOWERING = {
    "triton": ("cuda", "__gpu$xla.gpu.triton"),
    "mosaic_tpu": ("tpu", "tpu_custom_call"),
}


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

    for fn, kernels in ((fwd, 1), (fwd_bwd, 3)):
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
    assert _custom_calls(text).count(target) == 3


def test_auto_picks_the_backend_kernel(monkeypatch):
    """impl="auto": triton on GPU, mosaic_tpu on TPU, the XLA path on CPU."""
    from lightning_jax import api

    for backend, want in (("gpu", "triton"), ("tpu", "mosaic_tpu"), ("cpu", "xla")):
        monkeypatch.setattr(api.jax, "default_backend", lambda b=backend: b)
        assert api._resolve_impl("auto") == want
