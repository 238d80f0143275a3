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
        ("mosaic_tpu", 2048, "at most the grid block"),  # float32: 1024-row grid blocks
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
        with pytest.raises(TypeError, match='q, k, v are float64.*impl="xla"'):
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

        # value_and_grad: the loss keeps the forward kernel live (grad alone lets XLA drop it).
        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(q, k, v, s0)

    for fn, kernels in ((fwd, 1), (fwd_bwd, 1 + BACKWARD_KERNELS[impl])):
        text = jax.jit(fn).trace(x, x, x, s0).lower(lowering_platforms=(platform,)).as_text()
        calls = _custom_calls(text)
        assert calls.count(target) == kernels, calls
        # No XLA fallback: the sweep over the sequence is inside the kernels.
        assert "stablehlo.while" not in text


@pytest.mark.parametrize("impl", sorted(LOWERING))
def test_segmented_lowers_to_the_kernels(impl):
    """With segment_ids the same kernels lower (no XLA fallback), forward and backward."""
    platform, target = LOWERING[impl]
    x = jax.ShapeDtypeStruct((2, 4, 2048, 128), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((2, 2048), jnp.int32)
    slopes = lj.alibi_slopes(4)

    def fwd_bwd(q, k, v, ids):
        def loss(q, k, v):
            o = lj.lightning_attention(q, k, v, slopes, impl=impl, interpret=False, segment_ids=ids)
            return jnp.sum(o.astype(jnp.float32))

        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    text = jax.jit(fwd_bwd).trace(x, x, x, ids).lower(lowering_platforms=(platform,)).as_text()
    assert _custom_calls(text).count(target) == 1 + BACKWARD_KERNELS[impl]
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


# --- the Mosaic TPU kernel's tiling, costs and lowering --------------------------------------


def _mosaic_kernels(shape_q, shape_v, dtype, **op_kwargs) -> dict:
    """name -> pallas_call equation of the Mosaic TPU forward + backward (real kernels)."""
    heads = shape_q[1]
    q = jax.ShapeDtypeStruct(shape_q, dtype)
    v = jax.ShapeDtypeStruct(shape_v, dtype)

    def loss(q, k, v):
        o = lj.lightning_attention(
            q, k, v, lj.alibi_slopes(heads), impl="mosaic_tpu", interpret=False, **op_kwargs
        )
        return jnp.sum(o.astype(jnp.float32))

    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, q, v)
    return {eqn.params["name"]: eqn for eqn in pallas_calls(jaxpr.jaxpr)}


def test_mosaic_cost_estimates_match_a_hand_count():
    """b2 h3 seq 1000 d64 e32 bf16: one grid step of 1024 rows = 8 sub-blocks of 128."""
    kernels = _mosaic_kernels((2, 3, 1000, 64), (2, 3, 1000, 32), jnp.bfloat16)
    assert sorted(kernels) == ["lightning_dkdv", "lightning_dq", "lightning_forward"]
    groups, rows, subs, sub, d, e = 6, 1024, 8, 128, 64, 32
    score_flops = 2 * sub * sub * (d + e)  # two [sub, sub] x [sub, d or e] products
    state_flops = 2 * sub * d * e  # one [sub, d] x [d, e] product
    # exp: per (batch, head) the [sub, sub] mask, the [sub] q and k decays and the state
    # decay of a full sub-block; the last sub-block (1000 = 7 * 128 + 104 rows) its own
    # [sub] k decays and state decay.
    exps = groups * (sub * sub + 2 * sub + 1 + (sub + 1))
    want = {
        "lightning_forward": (
            groups * subs * (score_flops + 2 * state_flops),
            exps,
            groups * (rows * (2 * d + 2 * e) * 2 + 2 * d * e * 4),  # q k v o bf16; s0, state
        ),
        "lightning_dq": (
            groups * subs * (score_flops + 2 * state_flops),
            exps,
            groups * (rows * (2 * d + 2 * e) * 2 + d * e * 4),  # k v dO dq; s0
        ),
        "lightning_dkdv": (
            groups * subs * (2 * score_flops + 3 * state_flops),
            exps,
            groups * (rows * (3 * d + 3 * e) * 2 + 2 * d * e * 4),  # q k v dO dk dv; dstate ds0
        ),
    }
    for name, (flops, transcendentals, bytes_accessed) in want.items():
        cost = kernels[name].params["cost_estimate"]
        assert cost.flops == flops, name
        assert cost.transcendentals == transcendentals, name
        assert cost.bytes_accessed == bytes_accessed, name


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_mosaic_grid_and_transcendentals_at_the_papers_shape(dtype):
    """b4 h32 seq 32768 d=e=128: at most 8192 grid steps and 40 exps per token per kernel,
    the (batch * head) axis leading and "parallel" (both TensorCores of a megacore chip)."""
    b, h, n, d = 4, 32, 32768, 128
    kernels = _mosaic_kernels((b, h, n, d), (b, h, n, d), dtype)
    assert len(kernels) == 3
    for name, eqn in kernels.items():
        grid = eqn.params["grid_mapping"].grid
        assert grid[0] == b * h, name
        assert grid[0] * grid[1] <= 8192, (name, grid)
        assert eqn.params["compiler_params"].dimension_semantics == ("parallel", "arbitrary")
        assert eqn.params["cost_estimate"].transcendentals <= 40 * b * h * n, name


def _dot_precisions(eqn) -> set:
    return {
        sub.params["precision"]
        for sub in eqn.params["jaxpr"].eqns
        for sub in ([sub] + [e for p in sub.params.values() if hasattr(p, "eqns") for e in p.eqns])
        if sub.primitive.name == "dot_general"
    }


def test_mosaic_precision_argument():
    """float32: the MXU's default precision unless precision="highest"."""
    from pallas_kernels.mosaic_tpu import lightning_attention_mosaic_tpu

    def kernel_precisions(precision):
        x = jax.ShapeDtypeStruct((1, 2, 256, 64), jnp.float32)
        s0 = jax.ShapeDtypeStruct((1, 2, 64, 64), jnp.float32)
        slopes = jax.ShapeDtypeStruct((2,), jnp.float32)

        def fwd(q, k, v, slopes, s0):
            return lightning_attention_mosaic_tpu(q, k, v, slopes, s0, precision=precision)

        jaxpr = jax.make_jaxpr(fwd)(x, x, x, slopes, s0)
        (eqn,) = pallas_calls(jaxpr.jaxpr)
        return _dot_precisions(eqn)

    def as_pair(p):
        return (p, p)

    assert kernel_precisions("default") <= {None, as_pair(jax.lax.Precision.DEFAULT)}
    assert kernel_precisions("highest") == {as_pair(jax.lax.Precision.HIGHEST)}
    x = jnp.zeros((1, 2, 16, 8))
    with pytest.raises(ValueError, match="precision must be one of"):
        lightning_attention_mosaic_tpu(
            x, x, x, jnp.zeros(2), jnp.zeros((1, 2, 8, 8)), precision="x"
        )


@pytest.mark.parametrize("d, n, padded", [(64, 2048, False), (128, 4096, False), (64, 1001, True)])
def test_mosaic_no_pad_or_slice_around_the_kernels(d, n, padded):
    """d = e = 64 or 128 at a sequence the grid block divides: the kernels read q, k, v and
    write o, dq, dk, dv in place (no pad or slice in the lowered TPU program, forward and
    backward). A ragged sequence is padded at the end, which this check does see."""
    x = jax.ShapeDtypeStruct((2, 4, n, d), jnp.bfloat16)
    slopes = lj.alibi_slopes(4)

    def fwd_bwd(q, k, v):
        def loss(q, k, v):
            o = lj.lightning_attention(q, k, v, slopes, impl="mosaic_tpu", interpret=False)
            return jnp.sum(o.astype(jnp.float32))

        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    text = jax.jit(fwd_bwd).trace(x, x, x).lower(lowering_platforms=("tpu",)).as_text()
    assert _custom_calls(text).count("tpu_custom_call") == 3
    found = {op for op in ("stablehlo.pad", "stablehlo.slice") if op in text}
    assert found == ({"stablehlo.pad", "stablehlo.slice"} if padded else set()), found


@pytest.mark.parametrize(
    "n, dtype, block_rows, padded_n",
    [
        (32768, jnp.bfloat16, 2048, 32768),
        (32768, jnp.float32, 1024, 32768),
        (1000, jnp.bfloat16, 1024, 1024),  # one step, cut to the sequence
        (2049, jnp.bfloat16, 1152, 2304),  # two steps of 9 sub-blocks, not 2 x 2048
        (5, jnp.float32, 128, 128),
    ],
)
def test_mosaic_block_choice(n, dtype, block_rows, padded_n):
    from pallas_kernels.mosaic_tpu import BlockSizes, choose_block_sizes

    assert choose_block_sizes(n, dtype) == (BlockSizes(block_rows, 128), padded_n)
