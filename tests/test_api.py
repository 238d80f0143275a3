"""The public op's entry: layouts in the layers, one check per call, argument forms."""

from __future__ import annotations

import functools

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
from op_test_base import F32_TOL, assert_close, make_inputs, random_runs


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


def test_sharded_op_in_bthd_layout():
    """The sequence-parallel op over a 4-device mesh, [B, T, H, D] with packed runs, equals
    the one-device reference ("bhtd" is tests/test_parallel.py's)."""
    mesh = Mesh(np.array(jax.devices()[:4]), ("seq",))
    q, k, v, s0, *_ = make_inputs(3, 1, 2, 16, 4, 3)
    ids = jnp.asarray(random_runs(3, 1, 16, max_len=6))
    t = functools.partial(jnp.swapaxes, axis1=1, axis2=2)
    kwargs = dict(initial_state=s0, return_final_state=True, segment_ids=ids)
    o, state = parallel.lightning_attention_sharded(
        t(q), t(k), t(v), 0.2, mesh=mesh, seq_axis="seq", impl="xla", layout="bthd", **kwargs
    )
    want = reference.naive_attention(q, k, v, 0.2, **kwargs)
    for name, a, b in zip(("o", "state"), (t(o), state), want):
        assert_close(a, b, F32_TOL, name)


def test_varlen_in_bthd_layout():
    """Packed sequences with their own states, [1, total, H, D], equal the "bhtd" call."""
    q, k, v, *_ = make_inputs(4, 1, 2, 20, 4, 3)
    states = jax.random.normal(jax.random.PRNGKey(5), (3, 2, 4, 3))
    cu = np.array([0, 6, 7, 20])
    t = functools.partial(jnp.swapaxes, axis1=1, axis2=2)
    kwargs = dict(cu_seqlens=cu, initial_states=states, return_final_states=True, impl="xla")
    o, finals = lj.lightning_attention_varlen(t(q), t(k), t(v), 0.3, layout="bthd", **kwargs)
    want_o, want_finals = lj.lightning_attention_varlen(q, k, v, 0.3, **kwargs)
    assert o.shape == (1, 20, 2, 3)
    assert_close(t(o), want_o, F32_TOL, "o")
    assert_close(finals, want_finals, F32_TOL, "final states")
