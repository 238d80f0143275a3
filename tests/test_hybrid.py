"""Hybrid TransNormerLM (lightning and softmax layers in one stack): the schedule,
decoding against the full forward pass, generation, cache sizes, training,
checkpoints and bad schedules.

References: the full (non-cached) forward pass for decoding, teacher-forced argmax
for greedy generation, shape formulas written here for the cache sizes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import Mesh
from test_models import decoded_logits, forward, greedy_reference, tokens

import lightning_jax as lj
import lm_train
from lightning_jax.models import TransNormerConfig, TransNormerLM, count_params
from lightning_jax.nn import LightningAttention, SoftmaxAttention
from op_test_base import assert_close

VOCAB = 128
BASE = TransNormerConfig(
    vocab_size=VOCAB, num_layers=4, embed_dim=32, num_heads=4, impl="xla", max_seq_len=96
)
EVERY_2 = dataclasses.replace(BASE, softmax_every=2)  # lightning, softmax, lightning, softmax
LISTED = dataclasses.replace(BASE, num_layers=3, mixer=["softmax", "lightning", "lightning"])
DECODE_STEPS = 12


def test_schedule_resolves_per_layer_mixers():
    assert EVERY_2.layer_mixers == ("lightning", "softmax") * 2
    assert EVERY_2.softmax_layers == (1, 3)
    minimax = dataclasses.replace(BASE, num_layers=16, softmax_every=8)
    assert minimax.softmax_layers == (7, 15)  # one softmax layer after every seven lightning
    assert dataclasses.replace(BASE, softmax_every=1).layer_mixers == ("softmax",) * 4
    assert BASE.layer_mixers == ("lightning",) * 4 and BASE.softmax_layers == ()
    # A list is stored as a tuple: the config stays hashable (a static jit value).
    assert LISTED.mixer == ("softmax", "lightning", "lightning")
    hash(LISTED)
    model = TransNormerLM(EVERY_2, rngs=nnx.Rngs(0))
    kinds = [type(layer.token_mixer) for layer in model.layers]
    assert kinds == [LightningAttention, SoftmaxAttention] * 2
    # Lightning layers keep the slopes of their index in the whole stack.
    for idx in (0, 2):
        np.testing.assert_array_equal(
            np.asarray(model.layers[idx].token_mixer.slopes[...]),
            np.asarray(lj.layer_slopes(4, idx, 4)),
        )


@pytest.mark.parametrize("config", [EVERY_2, LISTED], ids=["softmax_every", "listed"])
@pytest.mark.parametrize("prompt_len", (1, 7, 64))
def test_hybrid_decode_matches_full_forward(config, prompt_len):
    model = TransNormerLM(config, rngs=nnx.Rngs(0))
    toks = tokens(1, 2, 64 + DECODE_STEPS)
    full = forward(model, toks)
    n = prompt_len + DECODE_STEPS
    got = decoded_logits(model, toks, prompt_len, DECODE_STEPS)
    assert got.shape == (2, n, VOCAB) and got.dtype == jnp.float32
    assert_close(got, full[:, :n], 1e-5, f"hybrid decoded logits, prompt {prompt_len}")
    # Each layer advanced its own kind of cache.
    for layer, kind in zip(model.layers, config.layer_mixers):
        mixer = layer.token_mixer
        if kind == "lightning":
            assert mixer.state.shape == (2, 4, 8, 8) and mixer.state.dtype == jnp.float32
        else:
            assert int(mixer.cache_index[...]) == n


def _cache_bytes(config: TransNormerConfig, batch: int) -> list[int]:
    model = TransNormerLM(config, rngs=nnx.Rngs(0))
    model.init_cache(batch)
    return [
        sum(x.nbytes for x in jax.tree.leaves(nnx.state(layer, nnx.Cache)))
        for layer in model.layers
    ]


def test_cache_grows_only_in_the_softmax_layers():
    batch, heads, d = 3, 4, 8
    short = _cache_bytes(EVERY_2, batch)
    long = _cache_bytes(dataclasses.replace(EVERY_2, max_seq_len=1000), batch)
    for idx, kind in enumerate(EVERY_2.layer_mixers):
        if kind == "lightning":  # one float32 [B, H, d, d] state, whatever max_seq_len is
            assert short[idx] == long[idx] == batch * heads * d * d * 4
        else:  # float32 keys and values [B, max_seq_len, H, d] and an int32 index
            assert short[idx] == 2 * batch * 96 * heads * d * 4 + 4
            assert long[idx] == 2 * batch * 1000 * heads * d * 4 + 4
    # The whole cache grows with the softmax layers only: 2 of 4 here.
    assert sum(long) - sum(short) == 2 * (2 * batch * (1000 - 96) * heads * d * 4)
    lightning_only = _cache_bytes(dataclasses.replace(BASE, max_seq_len=1000), batch)
    assert lightning_only == _cache_bytes(BASE, batch)


@pytest.mark.parametrize("config", [EVERY_2, LISTED], ids=["softmax_every", "listed"])
def test_generate_greedy_on_hybrids_equals_stepwise_argmax(config):
    model = TransNormerLM(config, rngs=nnx.Rngs(1))
    assert model.max_decode_length == 96  # the softmax layers' KV caches bound decoding
    prompt = tokens(5, 2, 9)
    out = lj.generate(model, prompt, 12, temperature=0.0)
    assert out.shape == (2, 21) and out.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out), greedy_reference(model, prompt, 12))
    with pytest.raises(ValueError, match="cache length 96"):
        lj.generate(model, prompt, 88, temperature=0.0)


def test_hybrid_checkpoint_round_trip(tmp_path):
    model = TransNormerLM(EVERY_2, rngs=nnx.Rngs(0))
    toks = tokens(2, 2, 20)
    want = forward(model, toks)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "model", nnx.state(model))
    checkpointer.wait_until_finished()
    fresh = TransNormerLM(EVERY_2, rngs=nnx.Rngs(1))  # other weights until restored
    assert not np.allclose(np.asarray(forward(fresh, toks)), np.asarray(want))
    abstract = nnx.state(fresh)
    nnx.update(fresh, checkpointer.restore(tmp_path / "model", abstract))
    np.testing.assert_array_equal(np.asarray(forward(fresh, toks)), np.asarray(want))


TINY = dict(
    num_layers=2,
    embed_dim=32,
    num_heads=2,
    seq_len=32,
    batch_size=8,
    learning_rate=1e-2,
    warmup_steps=2,
    log_every=2,
    eval_every=4,
    eval_batches=2,
    checkpoint_every=3,
    plot=False,
)


def test_hybrid_trains_and_resumes_from_its_checkpoint(tmp_path, corpus):
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    cfg = lm_train.TrainConfig(**TINY, mixer="hybrid", softmax_every=2, steps=8)
    trainer = lm_train.Trainer(cfg, mesh)
    model = nnx.merge(trainer.graphdef, trainer.state["params"], trainer.constants)
    assert model.config.layer_mixers == ("lightning", "softmax")
    straight = lm_train.train(dataclasses.replace(cfg, workdir=str(tmp_path / "a")), corpus, False)
    evals = [r["eval_loss"] for r in straight["records"] if "eval_loss" in r]
    assert len(evals) == 2 and evals[-1] < evals[0] - 0.3, evals
    first = dataclasses.replace(cfg, steps=3, workdir=str(tmp_path / "b"))
    lm_train.train(first, corpus, verbose=False)
    resumed = lm_train.train(
        dataclasses.replace(first, steps=8, resume=True), corpus, verbose=False
    )
    for a, b in zip(
        jax.tree.leaves(straight["state"]["params"]),
        jax.tree.leaves(resumed["state"]["params"]),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_schedules():
    with pytest.raises(ValueError, match="softmax_every must be an int >= 0, got -1"):
        dataclasses.replace(BASE, softmax_every=-1)
    with pytest.raises(ValueError, match="softmax_every must be an int >= 0, got True"):
        dataclasses.replace(BASE, softmax_every=True)
    with pytest.raises(ValueError, match="softmax_every must be an int >= 0, got 2.0"):
        dataclasses.replace(BASE, softmax_every=2.0)
    with pytest.raises(ValueError, match=r"softmax_every \(5\) exceeds num_layers \(4\)"):
        dataclasses.replace(BASE, softmax_every=5)
    with pytest.raises(ValueError, match="needs mixer='lightning', got mixer='softmax'"):
        dataclasses.replace(BASE, mixer="softmax", softmax_every=2)
    with pytest.raises(ValueError, match="either a per-layer mixer sequence or softmax_every"):
        dataclasses.replace(LISTED, softmax_every=2)
    with pytest.raises(ValueError, match="lists 3 layer mixers, but num_layers is 4"):
        dataclasses.replace(LISTED, num_layers=4)
    with pytest.raises(ValueError, match=r"'mamba' at layer 1, None at layer 2"):
        dataclasses.replace(BASE, num_layers=3, mixer=("softmax", "mamba", None))
    with pytest.raises(ValueError, match="mixer must be one of"):
        dataclasses.replace(BASE, mixer=3)
    with pytest.raises(ValueError, match="mixer must be one of"):
        dataclasses.replace(BASE, mixer="hybrid")
    with pytest.raises(ValueError, match="even head_dim"):
        dataclasses.replace(EVERY_2, head_dim=7)
    dataclasses.replace(BASE, head_dim=7)  # no softmax layer: an odd head_dim is fine
    with pytest.raises(ValueError, match="mixer must be one of"):
        lm_train.model_config(lm_train.TrainConfig(mixer="mamba"))
    with pytest.raises(ValueError, match=r"softmax_every \(3\) exceeds num_layers \(2\)"):
        lm_train.model_config(lm_train.TrainConfig(mixer="hybrid", softmax_every=3))


def test_sequence_parallel_refuses_softmax_layers():
    mesh = Mesh(np.array(jax.devices()[:4]), ("seq",))
    sp = dict(mesh=mesh, seq_axis="seq")
    with pytest.raises(ValueError, match=r"lightning mixer only, but layers \[1, 3\] are softmax"):
        dataclasses.replace(EVERY_2, **sp)
    with pytest.raises(ValueError, match=r"layers \[0\] are softmax"):
        dataclasses.replace(LISTED, **sp)
    dataclasses.replace(BASE, **sp)  # all lightning: sequence parallel
    with pytest.raises(ValueError, match="needs mixer='lightning'"):
        lm_train.Trainer(lm_train.TrainConfig(**TINY, mixer="hybrid", seq_parallel=4))


def test_hybrid_parameter_count():
    V, D, H, d, F = VOCAB, 32, 4, 8, 11 * 32 // 4
    lightning = D * 4 * H * d + H * d * D + 3 * D * F  # qkvu, out, SGLU
    softmax = D * 3 * H * d + H * d * D + 3 * D * F  # qkv, out, SGLU
    model = TransNormerLM(EVERY_2, rngs=nnx.Rngs(0))
    got = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert got == count_params(EVERY_2) == 2 * V * D + 2 * lightning + 2 * softmax
    assert count_params(LISTED) == 2 * V * D + 2 * lightning + softmax
