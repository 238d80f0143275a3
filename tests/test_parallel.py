"""Sequence parallelism: one sequence split over 2, 3, 4 and 8 (forced CPU) devices.

Every check compares the sequence-parallel op (output, final state, and the
gradients of q, k, v and initial_state under a random cotangent of the output
and of the final state) with the single-device op and the O(n^2) reference.
The devices come from tests/conftest.py (XLA_FLAGS, 8 host devices).
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import lightning_jax as lj
from lightning_jax import reference
from lightning_jax.parallel import lightning_attention_sharded, lightning_attention_sp
from op_test_base import (
    F32_TOL,
    assert_close,
    assert_rms_close,
    loss_and_grads,
    make_inputs,
    make_slopes,
)

X = P(None, None, "x", None)  # q, k, v sharded along seq over mesh axis "x"
# bf16 through the sequence-parallel op: its output is rounded twice (the local op's,
# then after the correction), so it keeps the suite's former bf16 tolerances rather than
# the single-device ones derived in tests/tolerances.json.
SP_BF16_OUT_TOL = 5e-3
SP_BF16_GRAD_TOL = 1e-2


def make_mesh(shape: tuple[int, ...], names: tuple[str, ...]) -> Mesh:
    n = int(np.prod(shape))
    if jax.device_count() < n:
        pytest.skip(f"needs {n} devices, jax sees {jax.device_count()} (see tests/conftest.py)")
    return Mesh(np.array(jax.devices()[:n]).reshape(shape), names)


def single_device(slopes):
    return lambda q, k, v, s0: lj.lightning_attention(
        q, k, v, slopes, initial_state=s0, return_final_state=True
    )


def naive(slopes):
    return lambda q, k, v, s0: reference.naive_attention(
        q, k, v, slopes, initial_state=s0, return_final_state=True
    )


def outputs_and_grads(fn):
    """Jitted (q, k, v, s0, do, ds) -> ((o, state), (dq, dk, dv, d_initial_state))."""
    return jax.jit(lambda *args: (fn(*args[:4]), loss_and_grads(fn, *args)))


def check_against_single_device(fn, slopes, inputs):
    """fn(q, k, v, s0) -> (o, state): forward and gradients vs. one device and the reference."""
    check_against(fn, {"single device": single_device(slopes), "naive": naive(slopes)}, inputs)


def check_against(fn, wants, inputs):
    """fn(q, k, v, s0) -> (o, state): forward and gradients vs. each of wants {name: fn}."""
    (o, state), grads = outputs_and_grads(fn)(*inputs)
    for name, want_fn in wants.items():
        (o_want, state_want), want_grads = outputs_and_grads(want_fn)(*inputs)
        assert_close(o, o_want, F32_TOL, f"o vs {name}")
        assert_close(state, state_want, F32_TOL, f"final state vs {name}")
        for g_name, g, g_want in zip(("dq", "dk", "dv", "d_initial_state"), grads, want_grads):
            assert_close(g, g_want, F32_TOL, f"{g_name} vs {name}")


# (devices, batch, heads, seq, d, e, slopes, combine, block_size)
SP_CASES = [
    (2, 2, 3, 64, 8, 6, "none", "ppermute", None),
    (3, 1, 2, 99, 8, 12, "strong", "ppermute", 8),
    (4, 2, 3, 100, 12, 8, "strong", "all_gather", 8),
    (4, 1, 3, 100, 8, 8, "alibi", "ppermute", 16),
    (8, 1, 2, 8, 8, 8, "strong", "ppermute", None),  # one row per device
    (8, 1, 2, 200, 8, 12, "strong", "ppermute", 8),
    (8, 2, 3, 200, 8, 8, "alibi", "all_gather", 16),
    (2, 1, 2, 600, 8, 8, "strong", "ppermute", None),  # 300 rows per device: chunk scan
]


def sp_case_id(case) -> str:
    n, b, h, t, d, e, s, c, blk = case
    return f"P{n}-b{b}h{h}t{t}d{d}e{e}-{s}-{c}-blk{blk}"


@pytest.mark.parametrize("case", SP_CASES, ids=sp_case_id)
def test_sharded_matches_single_device(case):
    devices, b, h, t, d, e, kind, combine, block = case
    mesh = make_mesh((devices,), ("x",))
    slopes = make_slopes(kind, h)

    def fn(q, k, v, s0):
        return lightning_attention_sharded(
            q, k, v, slopes, mesh=mesh, seq_axis="x", initial_state=s0,
            return_final_state=True, combine=combine, block_size=block,
        )  # fmt: skip

    check_against_single_device(fn, slopes, make_inputs(devices + t, b, h, t, d, e))


@pytest.mark.parametrize("combine", ["ppermute", "all_gather"])
@pytest.mark.parametrize("check_vma", [True, False])
def test_inside_own_shard_map(check_vma, combine):
    """lightning_attention_sp in the user's shard_map, replicated S0 and final state."""
    mesh = make_mesh((4,), ("x",))
    slopes = make_slopes("strong", 3)

    def body(q, k, v, s0):
        return lightning_attention_sp(
            q, k, v, slopes, axis_name="x", initial_state=s0, return_final_state=True,
            combine=combine, block_size=8,
        )  # fmt: skip

    fn = jax.shard_map(
        body, mesh=mesh, in_specs=(X, X, X, P()), out_specs=(X, P()), check_vma=check_vma
    )
    check_against_single_device(fn, slopes, make_inputs(20, 2, 3, 60, 8, 8))


@pytest.mark.parametrize("check_vma", [True, False], ids=["check_vma", "no_check_vma"])
@pytest.mark.parametrize("impl, combine", [("triton", "ppermute"), ("mosaic_tpu", "all_gather")])
def test_pallas_kernels_inside_the_combine(impl, combine, check_vma):
    """Each Pallas kernel as the per-device op, forward and backward (interpret=None: the
    interpreter, on this CPU backend)."""
    mesh = make_mesh((2,), ("x",))
    slopes = make_slopes("alibi", 2)

    def body(q, k, v, s0):
        return lightning_attention_sp(
            q, k, v, slopes, axis_name="x", initial_state=s0, return_final_state=True,
            impl=impl, combine=combine, block_size=16,
        )  # fmt: skip

    fn = jax.shard_map(
        body, mesh=mesh, in_specs=(X, X, X, P()), out_specs=(X, P()), check_vma=check_vma
    )
    check_against_single_device(fn, slopes, make_inputs(30, 1, 2, 64, 16, 8))


@pytest.mark.parametrize("impl", ["triton", "mosaic_tpu"])
def test_interpret_reaches_the_kernel(impl):
    """interpret=False asks for the compiled kernel, which Pallas refuses to build on CPU."""
    mesh = make_mesh((2,), ("x",))
    q, k, v, *_ = make_inputs(31, 1, 2, 32, 16, 16)
    slopes = make_slopes("alibi", 2)
    cpu_refusal = pytest.raises(ValueError, match="Only interpret mode is supported on CPU")
    with cpu_refusal:
        lightning_attention_sharded(
            q, k, v, slopes, mesh=mesh, seq_axis="x", impl=impl, interpret=False
        )

    def body(q, k, v):
        return lightning_attention_sp(q, k, v, slopes, axis_name="x", impl=impl, interpret=False)

    with cpu_refusal:
        jax.shard_map(body, mesh=mesh, in_specs=(X, X, X), out_specs=X)(q, k, v)


def test_interpret_through_the_layer_and_the_config():
    """The Flax layers and TransNormerConfig pass `interpret` on to the (sharded) op."""
    from flax import nnx

    from lightning_jax import linen as lj_linen
    from lightning_jax.models import TransNormerConfig, TransNormerLM
    from lightning_jax.nn import LightningAttention

    mesh = make_mesh((2,), ("x",))
    x = jax.random.normal(jax.random.PRNGKey(32), (1, 32, 32))
    cpu_refusal = pytest.raises(ValueError, match="Only interpret mode is supported on CPU")
    sp = dict(mesh=mesh, seq_axis="x")
    for kwargs in ({}, sp):
        with cpu_refusal:
            LightningAttention(32, 2, impl="triton", interpret=False, rngs=nnx.Rngs(0), **kwargs)(x)
    with cpu_refusal:
        lj_linen.LightningAttention(num_heads=2, impl="mosaic_tpu", interpret=False).init(
            jax.random.PRNGKey(0), x
        )
    config = TransNormerConfig(
        vocab_size=16, num_layers=1, embed_dim=32, num_heads=2, impl="triton", interpret=False
    )
    with cpu_refusal:
        TransNormerLM(config, rngs=nnx.Rngs(0))(jnp.zeros((1, 8), jnp.int32))
    for make in (
        lambda: LightningAttention(32, 2, interpret="yes", rngs=nnx.Rngs(0)),
        lambda: TransNormerConfig(
            vocab_size=16, num_layers=1, embed_dim=32, num_heads=2, interpret=1
        ),
        lambda: lj_linen.LightningAttention(num_heads=2, interpret="no").init(
            jax.random.PRNGKey(0), x
        ),
    ):
        with pytest.raises(TypeError, match="interpret must be None or a bool"):
            make()


def test_inside_own_shard_map_output_only():
    """check_vma=True, no initial state, the final state unused: gradients of q, k, v."""
    mesh = make_mesh((8,), ("x",))
    slopes = make_slopes("alibi", 2)
    q, k, v, _, do, _ = make_inputs(29, 1, 2, 64, 8, 8)
    sp = jax.shard_map(
        lambda q, k, v: lightning_attention_sp(q, k, v, slopes, axis_name="x"),
        mesh=mesh,
        in_specs=(X, X, X),
        out_specs=X,
    )
    ref = functools.partial(reference.naive_attention, slopes=slopes)

    def grads(fn):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * do), (0, 1, 2)))(q, k, v)

    assert_close(jax.jit(sp)(q, k, v), ref(q, k, v), F32_TOL, "o")
    for name, a, b in zip("qkv", grads(sp), grads(ref)):
        assert_close(a, b, F32_TOL, f"d{name}")


@pytest.mark.parametrize("combine", ["ppermute", "all_gather"])
def test_batch_axis_and_tuple_seq_axis(combine):
    """Batch over one mesh axis, seq over a tuple of two: 2 x (2 x 2) devices."""
    mesh = make_mesh((2, 2, 2), ("data", "s1", "s2"))
    slopes = make_slopes("alibi", 3)

    def fn(q, k, v, s0):
        return lightning_attention_sharded(
            q, k, v, slopes, mesh=mesh, seq_axis=("s1", "s2"), batch_axis="data",
            initial_state=s0, return_final_state=True, combine=combine,
        )  # fmt: skip

    inputs = make_inputs(21, 2, 3, 40, 8, 8)
    check_against_single_device(fn, slopes, inputs)
    o = jax.jit(fn)(*inputs[:4])[0]
    assert o.sharding.is_equivalent_to(NamedSharding(mesh, P("data", None, ("s1", "s2"))), 4)


def test_eager_without_jit():
    mesh = make_mesh((4,), ("x",))
    slopes = make_slopes("strong", 2)
    q, k, v, s0, *_ = make_inputs(22, 1, 2, 32, 8, 8)
    o, state = lightning_attention_sharded(
        q, k, v, slopes, mesh=mesh, seq_axis="x", initial_state=s0, return_final_state=True
    )
    o_want, state_want = naive(slopes)(q, k, v, s0)
    assert_close(o, o_want, F32_TOL, "o")
    assert_close(state, state_want, F32_TOL, "final state")


def test_explicit_mesh_inside_jit():
    """A mesh with Explicit axes (jax.make_mesh's default) and unsharded inputs."""
    if jax.device_count() < 4:
        pytest.skip("needs 4 devices")
    mesh = jax.make_mesh((4,), ("x",))
    slopes = make_slopes("alibi", 2)

    def fn(q, k, v, s0):
        return lightning_attention_sharded(
            q, k, v, slopes, mesh=mesh, seq_axis="x", initial_state=s0, return_final_state=True
        )

    check_against_single_device(fn, slopes, make_inputs(23, 1, 2, 48, 8, 8))


def test_defaults_output_only_no_initial_state():
    mesh = make_mesh((4,), ("x",))
    q, k, v, _, do, _ = make_inputs(24, 1, 2, 40, 8, 8)
    slopes = make_slopes("strong", 2)
    sp = functools.partial(lightning_attention_sharded, slopes=slopes, mesh=mesh, seq_axis="x")
    o = jax.jit(sp)(q, k, v)
    assert isinstance(o, jax.Array) and o.shape == (1, 2, 40, 8)
    assert_close(o, reference.naive_attention(q, k, v, slopes), F32_TOL, "o")

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * do)

    single = loss(lambda q, k, v: lj.lightning_attention(q, k, v, slopes))
    got = jax.jit(jax.grad(loss(sp), argnums=(0, 1, 2)))(q, k, v)
    for name, a, b in zip("qkv", got, jax.grad(single, argnums=(0, 1, 2))(q, k, v)):
        assert_close(a, b, F32_TOL, f"d{name}")


def test_one_device_is_the_single_device_op():
    mesh = make_mesh((1,), ("x",))
    slopes = make_slopes("alibi", 2)

    def fn(q, k, v, s0):
        return lightning_attention_sharded(
            q, k, v, slopes, mesh=mesh, seq_axis="x", initial_state=s0, return_final_state=True
        )

    check_against_single_device(fn, slopes, make_inputs(25, 1, 2, 30, 8, 8))


def test_low_precision_bf16():
    mesh = make_mesh((4,), ("x",))
    slopes = make_slopes("strong", 2)
    q, k, v, s0, do, ds = make_inputs(26, 1, 2, 64, 16, 16, jnp.bfloat16)

    def fn(q, k, v, s0):
        return lightning_attention_sharded(
            q, k, v, slopes, mesh=mesh, seq_axis="x", initial_state=s0, return_final_state=True
        )

    o, state = jax.jit(fn)(q, k, v, s0)
    assert o.dtype == jnp.bfloat16 and state.dtype == jnp.float32
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    (o_ref, state_ref), ref_grads = outputs_and_grads(naive(slopes))(*up, s0, do, ds)
    assert_rms_close(o, o_ref, SP_BF16_OUT_TOL, "o")
    assert_rms_close(state, state_ref, SP_BF16_OUT_TOL, "final state")
    grads = jax.jit(functools.partial(loss_and_grads, fn))(q, k, v, s0, do, ds)
    for name, g, g_ref, x in zip(("dq", "dk", "dv", "ds0"), grads, ref_grads, (q, k, v, s0)):
        assert g.dtype == x.dtype, name
        assert_rms_close(g, g_ref, SP_BF16_GRAD_TOL, name)


def test_slopes_are_constants():
    mesh = make_mesh((2,), ("x",))
    q, k, v, *_ = make_inputs(27, 1, 2, 20, 8, 8)
    g = jax.grad(
        lambda s: jnp.sum(lightning_attention_sharded(q, k, v, s, mesh=mesh, seq_axis="x"))
    )(jnp.array([0.1, 0.2]))
    np.testing.assert_array_equal(np.asarray(g), np.zeros(2))


def _collectives(fn, *args) -> list[tuple[str, str]]:
    """(op, result shape) of every collective in the compiled HLO."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    ops = "all-gather|all-reduce|collective-permute|reduce-scatter|all-to-all"
    pattern = rf"=\s*(\S.*?)\s({ops})(?:-start)?\("
    return sorted((op, re.sub(r"\{[^}]*\}", "", shape)) for shape, op in re.findall(pattern, text))


@pytest.mark.parametrize("combine", ["ppermute", "all_gather"])
def test_communication_is_constant_in_seq(combine):
    """The same collectives on states only, whatever the sequence length."""
    mesh = make_mesh((4,), ("x",))
    slopes = make_slopes("alibi", 2)

    def fwd_bwd(q, k, v, s0, do, ds):
        def fn(q, k, v, s0):
            return lightning_attention_sharded(
                q, k, v, slopes, mesh=mesh, seq_axis="x", initial_state=s0,
                return_final_state=True, combine=combine,
            )  # fmt: skip

        return jax.vjp(fn, q, k, v, s0)[1]((do, ds))

    found = {t: _collectives(fwd_bwd, *make_inputs(28, 1, 2, t, 16, 8)) for t in (64, 1024)}
    assert found[64] == found[1024], found
    assert found[64] and all(
        "[1,2,16,8]" in shape or "[4,1,2,16,8]" in shape for _, shape in found[64]
    ), found[64]


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(q=jnp.zeros((1, 2, 10, 8))), ValueError, r"seq \(= 10.*seq_axis 'x' \(= 4\)"),
        (dict(batch=3, batch_axis="b"), ValueError, r"batch \(= 3.*batch_axis 'b' \(= 2\)"),
        (dict(seq_axis="y"), ValueError, r"seq_axis must name axes of the mesh \('b', 'x'\)"),
        (dict(batch_axis="z"), ValueError, "batch_axis must name axes of the mesh"),
        (dict(batch_axis="x"), ValueError, "must not share mesh axes"),
        (dict(mesh="x"), TypeError, "mesh must be a jax.sharding.Mesh"),
        (dict(q=jnp.zeros((2, 16, 8))), ValueError, "q must have rank 4"),
        (dict(v=jnp.zeros((1, 2, 12, 8))), ValueError, "v must match q"),
        (dict(initial_state=jnp.zeros((1, 2, 8, 7))), ValueError, "initial_state must have shape"),
        (dict(slopes=jnp.array([0.1, -0.2])), ValueError, "slopes must be finite and >= 0"),
        (dict(combine="ring"), ValueError, r"combine must be one of \('ppermute', 'all_gather'\)"),
        (dict(impl="flash"), ValueError, r"impl must be one of \('auto'"),
        (dict(block_size=0), ValueError, "block_size must be None or a positive int"),
        (dict(return_final_state=1), TypeError, "return_final_state must be a bool"),
        (dict(interpret="yes"), TypeError, "interpret must be None or a bool"),
    ],
)
def test_sharded_bad_input(change, error, match):
    mesh = make_mesh((2, 4), ("b", "x"))
    batch = change.pop("batch", 1)
    args = dict(
        q=jnp.zeros((batch, 2, 16, 8)),
        k=jnp.zeros((batch, 2, 16, 8)),
        v=jnp.zeros((batch, 2, 16, 8)),
        mesh=mesh,
        seq_axis="x",
    )
    args.update(change)
    if "q" in change and change["q"].ndim == 4:
        args["k"] = args["v"] = change["q"]
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(error, match=match):
        lightning_attention_sharded(q, k, v, **args)


def test_sp_outside_shard_map():
    x = jnp.zeros((1, 2, 16, 8))
    with pytest.raises(ValueError, match="axis_name 'x' is not a bound mesh axis"):
        lightning_attention_sp(x, x, x, axis_name="x")
    with pytest.raises(ValueError, match="axis_name is required"):
        lightning_attention_sp(x, x, x, axis_name=None)


def test_sp_bad_input_inside_shard_map():
    mesh = make_mesh((2,), ("x",))
    x = jnp.zeros((1, 2, 16, 8))

    def run(body, in_specs=(X, X, X)):
        return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=X)(x, x, x)

    with pytest.raises(ValueError, match="axis_name 'y' is not a bound mesh axis"):
        run(lambda q, k, v: lightning_attention_sp(q, k, v, axis_name="y"))
    with pytest.raises(ValueError, match="initial_state must be the same on every device"):
        run(
            lambda q, k, v: lightning_attention_sp(
                q, k, v, axis_name="x", initial_state=jnp.zeros((1, 2, 8, 8)) + q[:, :, :8]
            )
        )
    with pytest.raises(ValueError, match=r"initial_state must have shape"):
        run(
            lambda q, k, v: lightning_attention_sp(
                q, k, v, axis_name="x", initial_state=q[:, :, :3]
            )
        )
    with pytest.raises(ValueError, match="v must match q"):
        run(lambda q, k, v: lightning_attention_sp(q, k, v[:, :, :3], axis_name="x"))


@pytest.mark.parametrize("check_vma", [True, False])
def test_segment_ids_across_devices(check_vma):
    """Packed runs over 4 devices of 15 rows: a run crossing device boundaries (carries
    its state), runs starting exactly at a device edge and inside one (receive none),
    length-1 runs, a shard with no boundary inside. Forward and gradients vs the reference."""
    mesh = make_mesh((4,), ("x",))
    slopes = make_slopes("strong", 2)
    # Rows 0-3 | 4 | 5-14, 15-33 (crosses two edges) | 34-44 | 45 (device 3 start) | 46-59.
    lengths, labels = [4, 1, 10, 19, 11, 1, 14], [1, 2, 1, 3, 3, 5, 3]
    ids_row = np.repeat(labels, lengths).astype(np.int32)
    ids = jnp.asarray(np.stack([ids_row, np.roll(ids_row, 7)]))  # batch 2, different packings

    def body(q, k, v, s0, ids):
        return lightning_attention_sp(
            q, k, v, slopes, axis_name="x", initial_state=s0, return_final_state=True,
            block_size=8, segment_ids=ids,
        )  # fmt: skip

    sharded = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(X, X, X, P(), P(None, "x")),
        out_specs=(X, P()),
        check_vma=check_vma,
    )

    def fn(q, k, v, s0):
        return sharded(q, k, v, s0, ids)

    def ref(q, k, v, s0):
        return reference.naive_attention(
            q, k, v, slopes, initial_state=s0, return_final_state=True, segment_ids=ids
        )

    inputs = make_inputs(40, 2, 2, 60, 8, 8)
    check_against(fn, {"naive": ref}, inputs)


def test_sharded_segment_ids_with_batch_axis():
    """lightning_attention_sharded with segment ids, batch over 2 devices, seq over 4."""
    mesh = make_mesh((2, 4), ("b", "x"))
    slopes = make_slopes("alibi", 2)
    ids = jnp.asarray(np.stack([np.repeat([0, 1, 0], [9, 30, 25]), np.repeat([2, 5], [16, 48])]))

    def fn(q, k, v, s0):
        return lightning_attention_sharded(
            q, k, v, slopes, mesh=mesh, seq_axis="x", batch_axis="b", initial_state=s0,
            return_final_state=True, block_size=8, segment_ids=ids,
        )  # fmt: skip

    def ref(q, k, v, s0):
        return reference.naive_attention(
            q, k, v, slopes, initial_state=s0, return_final_state=True, segment_ids=ids
        )

    inputs = make_inputs(41, 2, 2, 64, 8, 8)
    check_against(fn, {"naive": ref}, inputs)
    with pytest.raises(NotImplementedError, match="combine=.ppermute"):
        lightning_attention_sharded(
            *inputs[:3], slopes, mesh=mesh, seq_axis="x", combine="all_gather", segment_ids=ids
        )
