"""The public op's entry: layouts in the layers, one check per call, argument forms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

import lightning_jax as lj
from jaxpr_tools import primitives_outside
from lightning_jax import _checks, api, parallel, reference, varlen
from lightning_jax.nn import LightningAttention
from op_test_base import F32_TOL, assert_close, make_inputs


@pytest.fixture
def check_calls(monkeypatch) -> list[str]:
    """Counts calls of `check_inputs` from every module that imports it."""
    calls: list[str] = []
    original = _checks.check_inputs

    def counted(*args, **kwargs):
        calls.append("check_inputs")
        return original(*args, **kwargs)

    for module in (api, parallel, varlen, reference):
        monkeypatch.setattr(module, "check_inputs", counted)
    return calls


def test_layer_sequence_parallel_path_checks_once(check_calls):
    """The layer's sequence-parallel call checks q, k, v once (op -> SP -> op ran it 5x)."""
    mesh = Mesh(np.array(jax.devices()[:2]), ("seq",))
    layer = LightningAttention(
        16, 2, layer_idx=0, num_layers=2, impl="xla", mesh=mesh, seq_axis="seq",
        rngs=nnx.Rngs(0),
    )  # fmt: skip
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 8, 16))
    plain = LightningAttention(16, 2, layer_idx=0, num_layers=2, impl="xla", rngs=nnx.Rngs(0))
    y = layer(x)
    assert check_calls == ["check_inputs"]
    assert_close(y, plain(x), F32_TOL, "sequence-parallel layer vs one device")


def test_op_and_varlen_check_once(check_calls):
    q, k, v, *_ = make_inputs(0, 1, 2, 12, 4, 4)
    lj.lightning_attention(q, k, v, 0.5, impl="xla")
    assert len(check_calls) == 1
    lj.lightning_attention_varlen(q, k, v, 0.5, cu_seqlens=np.array([0, 5, 12]), impl="xla")
    assert len(check_calls) == 2


def test_layer_passes_bthd_to_the_op_without_transposes():
    """No transpose outside the op in the layer's forward and backward: q, k, v go to
    the op as [B, T, H, d] and o comes back so (the op's own chunk-wise moves aside)."""
    layer = LightningAttention(16, 2, layer_idx=0, num_layers=2, impl="xla", rngs=nnx.Rngs(0))
    x = jnp.ones((1, 8, 16))
    graphdef, state = nnx.split(layer)

    def forward_and_grad(state, x):
        def loss(x):
            return jnp.sum(nnx.merge(graphdef, state)(x))

        return jax.value_and_grad(loss)(x)

    jaxpr = jax.make_jaxpr(forward_and_grad)(state, x).jaxpr
    outside = primitives_outside(jaxpr, "lightning_attention_xla")
    assert "dot_general" in outside  # the projections are outside: the walk sees the layer
    assert len(outside) < len(primitives_outside(jaxpr, "no such name"))  # the op was skipped
    assert "transpose" not in outside, "a transpose around the op in the layer"


@pytest.mark.parametrize(
    "slopes",
    [
        [0.5, 0.25],
        (0.5, 0.25),
        np.array([0.5, 0.25]),
        jnp.array([0.5, 0.25], jnp.bfloat16),
        np.float64(0.5),
        jnp.array([1, 2], jnp.int32),
        np.array([1, 2], np.int64),
        2,
    ],
    ids=["list", "tuple", "numpy", "jax-bf16", "numpy-scalar", "jax-int", "numpy-int", "int"],
)
def test_slopes_accept_any_real_array_like(slopes):
    q, k, v, *_ = make_inputs(1, 1, 2, 9, 4, 3)
    as_float32 = jnp.broadcast_to(jnp.asarray(np.asarray(slopes, np.float32)), (2,))
    got = lj.lightning_attention(q, k, v, slopes, impl="xla")
    want = reference.naive_attention(q, k, v, as_float32)
    assert_close(got, want, F32_TOL, "o")


def test_xla_tiles_any_block_size():
    """block_size=7 is a valid tiling of the XLA path (a short last block is exact)."""
    q, k, v, s0, *_ = make_inputs(2, 1, 2, 30, 4, 3)
    got = lj.lightning_attention(
        q, k, v, 0.3, initial_state=s0, return_final_state=True, impl="xla", block_size=7
    )
    want = reference.naive_attention(q, k, v, 0.3, initial_state=s0, return_final_state=True)
    for name, a, b in zip(("o", "state"), got, want):
        assert_close(a, b, F32_TOL, name)


def test_mixed_dtypes_are_refused_before_compute():
    q, k, v, *_ = make_inputs(1, 1, 2, 9, 4, 3)
    with pytest.raises(TypeError, match="got q bfloat16, k float32, v float32"):
        lj.lightning_attention(q.astype(jnp.bfloat16), k, v, impl="xla")
    with pytest.raises(TypeError, match="got q float32, k float32, v bfloat16"):
        lj.lightning_attention_varlen(
            q, k, v.astype(jnp.bfloat16), cu_seqlens=np.array([0, 9]), impl="xla"
        )


@pytest.mark.parametrize("layout", ["bhtd", "bthd"])
def test_sharded_op_in_both_layouts(layout):
    """The sequence-parallel op over a 4-device mesh equals one device, in each layout."""
    mesh = Mesh(np.array(jax.devices()[:4]), ("seq",))
    q, k, v, s0, *_ = make_inputs(3, 1, 2, 16, 4, 3)
    if layout == "bthd":
        q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    kwargs = dict(initial_state=s0, return_final_state=True, impl="xla", layout=layout)
    got = parallel.lightning_attention_sharded(q, k, v, 0.2, mesh=mesh, seq_axis="seq", **kwargs)
    want = lj.lightning_attention(q, k, v, 0.2, **kwargs)
    for name, a, b in zip(("o", "state"), got, want):
        assert_close(a, b, F32_TOL, name)
