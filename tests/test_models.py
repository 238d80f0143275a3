"""TransNormerLM and `generate`: decoding against the full forward pass, training, counts, errors.

References are independent of the decoding path: the full (non-cached)
forward pass for decoding, teacher-forced argmax for greedy generation, a
parameter formula written here for the counts.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lightning_jax as lj
from lightning_jax.generation import _generate
from lightning_jax.models import TransNormerConfig, TransNormerLM, count_params
from lightning_jax.nn import LightningAttention, SoftmaxAttention
from op_test_base import assert_close, assert_rms_close

VOCAB = 128
CFG = TransNormerConfig(vocab_size=VOCAB, num_layers=2, embed_dim=32, num_heads=4, impl="xla")
SOFTMAX_CFG = dataclasses.replace(CFG, mixer="softmax", max_seq_len=96)
DECODE_STEPS = 20
PROMPTS = (1, 7, 64, 130)


def tokens(seed: int, batch: int, seq: int) -> jax.Array:
    return jax.random.randint(jax.random.PRNGKey(seed), (batch, seq), 0, VOCAB, jnp.int32)


@nnx.jit
def forward(model, toks):
    return model(toks)


@nnx.jit
def decode(model, toks):
    return model(toks, decode=True)


@functools.cache
def model_and_full(config: TransNormerConfig, seq: int):
    """A model, a batch of tokens [2, seq] and the full forward pass on them (computed once)."""
    model = TransNormerLM(config, rngs=nnx.Rngs(0))
    toks = tokens(1, 2, seq)
    return model, toks, forward(model, toks)


def decoded_logits(model, toks, prompt_len: int, steps: int) -> jax.Array:
    """Prefill prompt_len tokens in one call, then decode `steps` tokens one at a time."""
    model.init_cache(toks.shape[0])
    outs = [decode(model, toks[:, :prompt_len])]
    for i in range(prompt_len, prompt_len + steps):
        outs.append(decode(model, toks[:, i : i + 1]))
    return jnp.concatenate(outs, axis=1)


# --- decoding == full forward ----------------------------------------------------------------


@pytest.mark.parametrize("prompt_len", PROMPTS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_lightning_decode_matches_full_forward(dtype, prompt_len):
    config = dataclasses.replace(CFG, dtype=dtype)
    model, toks, full = model_and_full(config, max(PROMPTS) + DECODE_STEPS)
    n = prompt_len + DECODE_STEPS
    got = decoded_logits(model, toks, prompt_len, DECODE_STEPS)
    assert got.shape == (2, n, VOCAB) and got.dtype == dtype
    if dtype == jnp.float32:
        assert_close(got, full[:, :n], 1e-5, f"decoded logits, prompt {prompt_len}")
    else:
        assert_rms_close(got, full[:, :n], 1e-2, f"decoded logits, prompt {prompt_len}")
    # The lightning cache is one fixed-size float32 state per layer, whatever was decoded.
    for layer in model.layers:
        assert layer.token_mixer.state.shape == (2, 4, 8, 8)
        assert layer.token_mixer.state.dtype == jnp.float32


@pytest.mark.parametrize("prompt_len", (1, 7, 64))
def test_softmax_decode_matches_full_forward(prompt_len):
    model, toks, full = model_and_full(SOFTMAX_CFG, 64 + DECODE_STEPS)
    n = prompt_len + DECODE_STEPS
    got = decoded_logits(model, toks, prompt_len, DECODE_STEPS)
    assert_close(got, full[:, :n], 1e-5, f"softmax decoded logits, prompt {prompt_len}")
    # Causality of the full pass itself: a prefix alone gives the same logits.
    assert_close(forward(model, toks[:, :n]), full[:, :n], 1e-5, "prefix forward")


def test_softmax_cache_overflow_and_errors():
    model = TransNormerLM(dataclasses.replace(SOFTMAX_CFG, max_seq_len=8), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="init_cache"):
        model(tokens(0, 1, 3), decode=True)
    model.init_cache(1)
    model(tokens(0, 1, 6), decode=True)
    with pytest.raises(ValueError, match="exceed the cache length 8"):
        model(tokens(0, 1, 3), decode=True)
    with pytest.raises(ValueError, match=r"batch size 1.*batch size 2"):
        model(tokens(0, 2, 1), decode=True)


def test_lightning_model_decode_errors():
    model = TransNormerLM(CFG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="init_cache"):
        model(tokens(0, 2, 3), decode=True)
    model.init_cache(3)
    with pytest.raises(ValueError, match=r"batch size 3.*batch size 2"):
        model(tokens(0, 2, 3), decode=True)


# --- training ----------------------------------------------------------------------------


@pytest.mark.parametrize("config", [CFG, SOFTMAX_CFG], ids=["lightning", "softmax"])
def test_jit_grad_and_training_reduces_loss(config):
    model = TransNormerLM(config, rngs=nnx.Rngs(0))
    batch = tokens(3, 4, 33)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    def loss_fn(model):
        logits = model(inputs).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    @nnx.jit
    def train_step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss, grads

    losses = []
    for _ in range(6):
        loss, grads = train_step(model, optimizer)
        losses.append(float(loss))
    leaves = jax.tree.leaves(nnx.to_pure_dict(grads))
    assert len(leaves) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    for g in leaves:
        assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g))) > 0
    assert np.isfinite(losses).all()
    assert losses[0] == pytest.approx(np.log(VOCAB), rel=0.05)  # near-uniform at init
    assert losses[-1] < losses[0] - 0.1, losses


# --- parameter counts ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"mixer": "softmax"},
        {"head_dim": 12, "mlp_dim": 50, "num_layers": 3},
        {"head_dim": 6, "mlp_dim": 40, "num_heads": 3, "mixer": "softmax"},
    ],
    ids=["lightning", "softmax", "lightning-explicit-dims", "softmax-explicit-dims"],
)
def test_parameter_count_matches_config(overrides):
    config = dataclasses.replace(CFG, **overrides)
    V, L, D, H = config.vocab_size, config.num_layers, config.embed_dim, config.num_heads
    d = overrides.get("head_dim", D // H)
    F = overrides.get("mlp_dim", 11 * D // 4)
    n_proj = 4 if config.mixer == "lightning" else 3  # qkvu vs qkv
    want = V * D + L * (D * n_proj * H * d + H * d * D + 3 * D * F) + D * V
    model = TransNormerLM(config, rngs=nnx.Rngs(0))
    got = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert got == want
    assert count_params(config) == want


# --- state handling ------------------------------------------------------------------------


def test_model_split_merge_round_trip_and_layer_slopes():
    model, toks, full = model_and_full(CFG, max(PROMPTS) + DECODE_STEPS)
    graphdef, state = nnx.split(model)
    merged = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, toks)
    np.testing.assert_array_equal(np.asarray(merged), np.asarray(full))
    for idx, layer in enumerate(model.layers):
        mixer = layer.token_mixer
        assert isinstance(mixer, LightningAttention)
        scale = 1 - idx / (CFG.num_layers - 1) + 1e-5
        np.testing.assert_allclose(
            np.asarray(mixer.slopes[...]), np.asarray(lj.alibi_slopes(4)) * scale, rtol=1e-6
        )


# --- bad input -----------------------------------------------------------------------------


def test_bad_tokens_and_config():
    model = TransNormerLM(CFG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\[0, vocab_size=128\).*from 0 to 128"):
        model(jnp.array([[0, 5, VOCAB]]))
    with pytest.raises(ValueError, match=r"from -1 to 5"):
        model(jnp.array([[-1, 5]]))
    with pytest.raises(TypeError, match="integer"):
        model(jnp.zeros((1, 4), jnp.float32))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        model(jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="mixer"):
        dataclasses.replace(CFG, mixer="mamba")
    with pytest.raises(ValueError, match=r"embed_dim \(30\).*num_heads \(4\)"):
        dataclasses.replace(CFG, embed_dim=30)
    with pytest.raises(ValueError, match="even head_dim"):
        dataclasses.replace(CFG, mixer="softmax", head_dim=7)
    with pytest.raises(ValueError, match="num_layers"):
        dataclasses.replace(CFG, num_layers=0)


# --- generate ------------------------------------------------------------------------------


def greedy_reference(model, prompt, new: int) -> np.ndarray:
    """Teacher-forced argmax with the full forward pass on a fixed-length buffer (causal)."""
    batch, prompt_len = prompt.shape
    buf = jnp.zeros((batch, prompt_len + new), jnp.int32).at[:, :prompt_len].set(prompt)
    for t in range(prompt_len, prompt_len + new):
        logits = forward(model, buf)
        buf = buf.at[:, t].set(jnp.argmax(logits[:, t - 1], axis=-1))
    return np.asarray(buf)


@pytest.mark.parametrize("config", [CFG, SOFTMAX_CFG], ids=["lightning", "softmax"])
def test_generate_greedy_equals_stepwise_argmax(config):
    model = TransNormerLM(config, rngs=nnx.Rngs(1))
    prompt = tokens(5, 2, 9)
    out = lj.generate(model, prompt, 12, temperature=0.0)
    assert out.shape == (2, 21) and out.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out[:, :9]), np.asarray(prompt))
    np.testing.assert_array_equal(np.asarray(out), greedy_reference(model, prompt, 12))
    # The caller's model keeps no cache.
    assert all(layer.token_mixer.state is None for layer in model.layers if config == CFG)


def test_generate_sampling_and_top_k():
    model = TransNormerLM(dataclasses.replace(CFG, init_std=0.2), rngs=nnx.Rngs(2))
    prompt = tokens(6, 3, 5)
    key = jax.random.PRNGKey(7)
    k = 3
    out = lj.generate(model, prompt, 16, temperature=1.0, top_k=k, rng=key)
    assert out.shape == (3, 21)
    # Every sampled token is among the k most likely under the full forward pass.
    logits = forward(model, out)[:, 4:-1]  # predicts positions 5..20
    rank = jnp.sum(logits > jnp.take_along_axis(logits, out[:, 5:, None], axis=-1), axis=-1)
    assert int(jnp.max(rank)) < k
    assert len(np.unique(np.asarray(out[:, 5:]))) > 1
    # Same key, same samples; top_k=1 is greedy.
    again = lj.generate(model, prompt, 16, temperature=1.0, top_k=k, rng=key)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(out))
    top1 = lj.generate(model, prompt, 16, temperature=1.0, top_k=1, rng=key)
    greedy = lj.generate(model, prompt, 16, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(top1), np.asarray(greedy))
    # Without top_k, with a high temperature, samples leave the top 3 somewhere.
    hot = lj.generate(model, prompt, 16, temperature=5.0, rng=key)
    logits = forward(model, hot)[:, 4:-1]
    rank = jnp.sum(logits > jnp.take_along_axis(logits, hot[:, 5:, None], axis=-1), axis=-1)
    assert int(jnp.max(rank)) >= k


class _OwnModel(nnx.Module):
    """A user's model from the library's layers, nested in a list, no init_cache of its own."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, 32, rngs=rngs)
        self.blocks = nnx.List(
            [
                LightningAttention(32, num_heads=2, impl="xla", rngs=rngs),
                SoftmaxAttention(32, num_heads=2, rngs=rngs),
            ]
        )
        self.head = nnx.Linear(32, VOCAB, rngs=rngs)

    def __call__(self, toks, decode: bool = False):
        x = self.embed(toks)
        for block in self.blocks:
            x = x + block(x, decode=decode)
        return self.head(x)


def test_init_caches_and_generate_on_a_users_model():
    model = _OwnModel(nnx.Rngs(3))
    with pytest.raises(ValueError, match="max_length"):
        lj.generation.init_caches(model, 2)
    assert lj.generation.init_caches(model, 2, max_length=16) == 2
    assert model.blocks[0].state.shape == (2, 2, 16, 16)
    assert model.blocks[1].cached_key.shape == (2, 16, 2, 16)
    with pytest.raises(ValueError, match="no cache-bearing layer"):
        lj.generation.init_caches(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), 2)
    # No rng: greedy decoding.
    prompt = tokens(4, 2, 5)
    out = lj.generate(_OwnModel(nnx.Rngs(3)), prompt, 4)
    np.testing.assert_array_equal(np.asarray(out), greedy_reference(model, prompt, 4))


def test_generate_memory_does_not_grow_with_new_tokens():
    model = TransNormerLM(CFG, rngs=nnx.Rngs(0))
    model.init_cache(2)
    graphdef, cache, rest = nnx.split(model, nnx.Cache, ...)
    prompt = tokens(0, 2, 8)

    def temp_bytes(new: int) -> int:
        compiled = _generate.lower(
            graphdef,
            cache,
            rest,
            prompt,
            jax.random.PRNGKey(0),
            jnp.float32(1.0),
            max_new_tokens=new,
            greedy=True,
            top_k=None,
        ).compile()
        stats = compiled.memory_analysis()
        return stats.temp_size_in_bytes + stats.output_size_in_bytes

    small, large = temp_bytes(8), temp_bytes(2048)
    # Only the int32 output buffer [2, 8 + N] may grow (plus allocator slack).
    assert large - small <= 2 * (2048 - 8) * 4 + 4096, (small, large)


def test_generate_errors():
    model = TransNormerLM(CFG, rngs=nnx.Rngs(0))
    prompt = tokens(0, 1, 4)
    with pytest.raises(ValueError, match="temperature=0.5 samples, which needs rng"):
        lj.generate(model, prompt, 3, temperature=0.5)
    with pytest.raises(ValueError, match="top_k samples, which needs rng"):
        lj.generate(model, prompt, 3, top_k=2)
    with pytest.raises(ValueError, match="temperature"):
        lj.generate(model, prompt, 3, temperature=-1.0, rng=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="top_k"):
        lj.generate(model, prompt, 3, top_k=0, rng=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="top_k"):
        lj.generate(model, prompt, 3, top_k=VOCAB + 1, rng=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="max_new_tokens"):
        lj.generate(model, prompt, -1, temperature=0.0)
    with pytest.raises(TypeError, match="integer"):
        lj.generate(model, prompt.astype(jnp.float32), 3, temperature=0.0)
    with pytest.raises(ValueError, match="vocab_size"):
        lj.generate(model, prompt + VOCAB, 3, temperature=0.0)
    softmax = TransNormerLM(dataclasses.replace(SOFTMAX_CFG, max_seq_len=10), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="cache length 10"):
        lj.generate(softmax, prompt, 7, temperature=0.0)
    np.testing.assert_array_equal(
        np.asarray(lj.generate(model, prompt, 0, temperature=0.0)), np.asarray(prompt)
    )


def test_package_import_stays_light_and_exports_lazily():
    code = (
        "import sys, lightning_jax as lj; assert 'flax' not in sys.modules; "
        "assert lj.generate is lj.generation.generate; "
        "assert lj.nn.LightningAttention and lj.models.TransNormerLM; "
        "assert lj.linen.LightningAttention"
    )
    root = str(pathlib.Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=root)


# --- packed documents (segment_ids) ----------------------------------------------------------


@pytest.mark.parametrize("config", [CFG, SOFTMAX_CFG], ids=["lightning", "softmax"])
def test_packed_documents_equal_separate_documents(config):
    """Logits of documents packed in one row with segment ids == each document alone
    (no state, attention or rotary position leaks across documents; ids repeat)."""
    model = TransNormerLM(config, rngs=nnx.Rngs(0))
    lengths, labels = [5, 1, 17, 9], [4, 0, 4, 0]
    ids = jnp.asarray(np.repeat(labels, lengths)[None], jnp.int32)
    toks = tokens(30, 1, sum(lengths))
    packed = nnx.jit(lambda m, t, s: m(t, segment_ids=s))(model, toks, ids)
    bounds = np.cumsum([0, *lengths])
    alone = jnp.concatenate(
        [forward(model, toks[:, lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])], axis=1
    )
    assert_close(packed, alone, 1e-5, "packed logits vs one document at a time")
    # And the ids matter: without them the later documents see the earlier ones.
    assert not np.allclose(np.asarray(forward(model, toks)), np.asarray(alone), atol=1e-3)


def test_segment_ids_bad_input_and_unsupported_modes():
    model = TransNormerLM(CFG, rngs=nnx.Rngs(0))
    toks = tokens(31, 2, 12)
    with pytest.raises(ValueError, match=r"segment_ids must have shape \[batch, seq\]"):
        model(toks, segment_ids=jnp.zeros((2, 11), jnp.int32))
    with pytest.raises(TypeError, match="segment_ids must have an integer dtype"):
        model(toks, segment_ids=jnp.zeros((2, 12), jnp.float32))
    softmax = TransNormerLM(SOFTMAX_CFG, rngs=nnx.Rngs(0))
    softmax.init_cache(2)
    with pytest.raises(NotImplementedError, match="segment_ids with decode=True"):
        softmax(toks, decode=True, segment_ids=jnp.zeros((2, 12), jnp.int32))
