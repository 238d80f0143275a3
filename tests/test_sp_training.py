"""Sequence-parallel training: the NNX layer, the model config and the trainer on a
(data=2, seq=4) mesh equal their single-device counterparts."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import lm_data
import lm_train
from lightning_jax.models import TransNormerConfig, TransNormerLM
from lightning_jax.nn import LightningAttention

TINY = dict(
    num_layers=2,
    embed_dim=32,
    num_heads=2,
    seq_len=32,
    batch_size=4,
    learning_rate=1e-2,
    warmup_steps=1,
    steps=2,
    plot=False,
)


@pytest.fixture(scope="module")
def mesh():
    devices = jax.devices()
    assert len(devices) >= 8, "tests/conftest.py forces 8 host devices"
    return Mesh(np.array(devices[:8]).reshape(2, 4), ("data", "seq"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 400)
    return lm_data.load_corpus(path, held_out_fraction=0.1)


def _loss_and_grads(layer, x, w):
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(params, x):
        y = nnx.merge(graphdef, params, rest)(x)
        return jnp.sum(y * w), y

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)


def test_layer_with_seq_axis_equals_the_layer_without(mesh):
    kw = dict(num_heads=2, layer_idx=1, num_layers=3)
    plain = LightningAttention(32, **kw, rngs=nnx.Rngs(0))
    sharded = LightningAttention(
        32, **kw, mesh=mesh, seq_axis="seq", batch_axis="data", rngs=nnx.Rngs(0)
    )
    x = jax.random.normal(jax.random.key(1), (4, 64, 32))
    w = jax.random.normal(jax.random.key(2), (4, 64, 32))
    (loss_1, y_1), grads_1 = _loss_and_grads(plain, x, w)
    x_sharded = jax.device_put(x, NamedSharding(mesh, P("data", "seq")))
    (loss_p, y_p), grads_p = _loss_and_grads(sharded, x_sharded, w)
    np.testing.assert_allclose(y_p, y_1, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(loss_p, loss_1, rtol=2e-5)
    leaves_1, leaves_p = jax.tree.leaves(grads_1), jax.tree.leaves(grads_p)
    assert len(leaves_1) == 3  # qkvu kernel, out kernel, input
    for a, b in zip(leaves_1, leaves_p, strict=True):
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-5 * float(np.abs(a).max()))
    # The output stays sharded along the sequence, and only [B, H, d, d] states cross
    # devices: no activation is gathered.
    assert y_p.sharding.spec == P("data", "seq")
    graphdef, params, rest = nnx.split(sharded, nnx.Param, ...)
    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p, rest)(x))
    hlo = forward.lower(params, x_sharded).compile().as_text()
    assert "collective-permute" in hlo
    assert "all-gather" not in hlo and "all-to-all" not in hlo


def test_model_config_passes_the_axes_to_the_lightning_layers(mesh):
    config = TransNormerConfig(
        vocab_size=16, num_layers=2, embed_dim=16, num_heads=2, mesh=mesh, seq_axis="seq"
    )
    hash(config)  # stays usable as a static value
    model = TransNormerLM(config, rngs=nnx.Rngs(0))
    mixers = [layer.token_mixer for layer in model.layers]
    assert all(m.mesh is mesh and m.seq_axis == "seq" and m.batch_axis is None for m in mixers)
    # Decoding ignores the mesh: it runs (token by token) on the single-device op.
    plain = TransNormerLM(dataclasses.replace(config, mesh=None, seq_axis=None), rngs=nnx.Rngs(0))
    tokens = jnp.arange(8, dtype=jnp.int32).reshape(2, 4) % 16
    for m in (model, plain):
        m.init_cache(2)
    np.testing.assert_allclose(
        model(tokens, decode=True), plain(tokens, decode=True), rtol=1e-5, atol=1e-5
    )


def _params(state):
    return [np.asarray(x) for x in jax.tree.leaves(state["params"])]


def test_train_steps_on_a_data_seq_mesh_equal_the_single_device_steps(corpus, mesh):
    single = lm_train.Trainer(
        lm_train.TrainConfig(**TINY), Mesh(np.array(jax.devices()[:1]), ("data",))
    )
    # seq_parallel=4 over the 8 devices: the trainer builds the (data=2, seq=4) mesh.
    parallel = lm_train.Trainer(lm_train.TrainConfig(**TINY, seq_parallel=4))
    assert dict(parallel.mesh.shape) == {"data": 2, "seq": 4}
    assert parallel.batch_sharding.spec == P("data", "seq")
    model = nnx.merge(parallel.graphdef, parallel.state["params"], parallel.constants)
    mixer = model.layers[0].token_mixer
    assert (mixer.seq_axis, mixer.batch_axis) == ("seq", "data") and mixer.mesh is parallel.mesh
    for step in range(2):
        loss_1 = float(single.step(corpus.train, step))
        loss_p = float(parallel.step(corpus.train, step))
        assert abs(loss_1 - loss_p) <= 2e-5 * abs(loss_1), (step, loss_1, loss_p)
    for a, b in zip(_params(single.state), _params(parallel.state), strict=True):
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-6)
    # A given mesh with a "seq" axis works the same way.
    given = lm_train.Trainer(lm_train.TrainConfig(**TINY, seq_parallel=4), mesh)
    assert given.mesh is mesh
    eval_loss = given.evaluate(corpus.held_out)
    assert np.isfinite(eval_loss)


def test_bad_sequence_parallel_arguments(mesh):
    with pytest.raises(ValueError, match="needs mesh"):
        LightningAttention(32, 2, seq_axis="seq", rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        LightningAttention(32, 2, mesh="mesh", seq_axis="seq", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="seq_axis must name axes of the mesh"):
        LightningAttention(32, 2, mesh=mesh, seq_axis="model", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="batch_axis .* is only used with seq_axis"):
        LightningAttention(32, 2, mesh=mesh, batch_axis="data", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="must not share"):
        LightningAttention(32, 2, mesh=mesh, seq_axis="seq", batch_axis="seq", rngs=nnx.Rngs(0))
    layer = LightningAttention(32, 2, mesh=mesh, seq_axis="seq", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="must be divisible by the number of devices on seq_axis"):
        layer(jnp.zeros((2, 6, 32)))
    with pytest.raises(ValueError, match="lightning mixer only"):
        TransNormerConfig(
            vocab_size=16, num_layers=1, embed_dim=16, num_heads=2, mixer="softmax",
            mesh=mesh, seq_axis="seq",
        )  # fmt: skip
    with pytest.raises(ValueError, match="needs mesh"):
        TransNormerConfig(vocab_size=16, num_layers=1, embed_dim=16, num_heads=2, seq_axis="seq")
    with pytest.raises(ValueError, match="8 devices must divide by seq_parallel 3"):
        lm_train.Trainer(lm_train.TrainConfig(**TINY, seq_parallel=3))
    with pytest.raises(ValueError, match="seq_len 30 must divide by the 4 devices"):
        lm_train.Trainer(lm_train.TrainConfig(**{**TINY, "seq_len": 30}, seq_parallel=4))
    with pytest.raises(ValueError, match="needs mixer='lightning'"):
        lm_train.Trainer(lm_train.TrainConfig(**TINY, mixer="softmax", seq_parallel=4))
    with pytest.raises(ValueError, match="seq_parallel 1 must equal the 4 devices"):
        lm_train.Trainer(lm_train.TrainConfig(**TINY), mesh)
    with pytest.raises(ValueError, match="seq_parallel must be a positive int"):
        lm_train.Trainer(lm_train.TrainConfig(**TINY, seq_parallel=0))


def test_layer_with_seq_axis_and_segment_ids(mesh):
    """Packed documents under sequence parallelism == the layer on one device."""
    kw = dict(num_heads=2, layer_idx=1, num_layers=3)
    plain = LightningAttention(32, **kw, rngs=nnx.Rngs(0))
    sharded = LightningAttention(
        32, **kw, mesh=mesh, seq_axis="seq", batch_axis="data", rngs=nnx.Rngs(0)
    )
    x = jax.random.normal(jax.random.key(3), (4, 64, 32))
    ids = jnp.asarray(np.repeat([[3, 1, 3, 4]], 4, axis=0).repeat([5, 20, 1, 38], axis=1))
    y_1 = plain(x, segment_ids=ids)
    y_p = sharded(jax.device_put(x, NamedSharding(mesh, P("data", "seq"))), segment_ids=ids)
    np.testing.assert_allclose(y_p, y_1, rtol=2e-5, atol=2e-5)
    # The ids matter: without them the output differs.
    assert not np.allclose(np.asarray(plain(x)), np.asarray(y_1), atol=1e-3)
