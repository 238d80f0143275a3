"""MiniMax-01 in Flax NNX against transformers' torch MiniMaxForCausalLM (tiny random configs).

The checkpoint is written by transformers (`save_pretrained`) and loaded by
`lightning_jax.hf.from_pretrained`; logits, greedy generations and gradients
are compared with the torch model's in float32.
"""

from __future__ import annotations

import copy
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from lightning_jax import generate, hf  # noqa: E402
from lightning_jax.slopes import minimax_slopes  # noqa: E402

VOCAB = 98
# Hybrid layers (lightning first, as in MiniMax-01), 6 heads (not a power of two), 2 key/value
# heads (grouped-query attention), 4 experts with top-2 routing, non-unit residual factors.
TORCH_CONFIG = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=8,
    num_local_experts=4,
    num_experts_per_tok=2,
    layer_types=["linear_attention", "full_attention"],
    block_size=16,
    max_position_embeddings=64,
    initializer_range=0.1,
    linear_attn_alpha_factor=1.5,
    linear_attn_beta_factor=0.75,
    full_attn_alpha_factor=0.9,
    full_attn_beta_factor=1.25,
    mlp_alpha_factor=1.1,
    mlp_beta_factor=0.8,
)


@nnx.jit
def _forward(m, tokens, segment_ids=None):
    return m(tokens, segment_ids=segment_ids)


@nnx.jit
def _decode(m, tokens):
    return m(tokens, decode=True)


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(directory, torch model) of a tiny random MiniMax saved by transformers."""
    torch.manual_seed(0)
    config = transformers.MiniMaxConfig(**TORCH_CONFIG)
    model = transformers.MiniMaxForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("minimax")
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def model(checkpoint):
    return hf.from_pretrained(checkpoint[0], impl="xla")


@pytest.fixture(scope="module")
def model_ref(checkpoint):
    """The model on impl="reference" (the op's O(T^2) formula): faster to compile on CPU."""
    return hf.from_pretrained(checkpoint[0], impl="reference")


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, VOCAB, (2, 21))


@pytest.fixture(scope="module")
def torch_logits(checkpoint, tokens):
    with torch.no_grad():
        return checkpoint[1](torch.tensor(tokens)).logits.numpy()


def test_minimax_slopes_match_transformers():
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

    for heads, layers in ((6, 4), (64, 80)):
        config = transformers.MiniMaxConfig(
            hidden_size=heads * 2, num_attention_heads=heads, num_hidden_layers=layers, block_size=2
        )
        for layer in (0, 1, layers - 1):
            want = MiniMaxLightningAttention(config, layer).get_slope_rate().reshape(-1).numpy()
            got = np.asarray(minimax_slopes(heads, layer, layers))
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)


def test_minimax_slopes_refuse_bad_arguments():
    with pytest.raises(ValueError, match="num_heads"):
        minimax_slopes(0, 0, 2)
    with pytest.raises(ValueError, match="layer_idx must be in"):
        minimax_slopes(4, 2, 2)


def test_logits_match_transformers(model, tokens, torch_logits):
    assert _rel_err(_forward(model, jnp.asarray(tokens)), torch_logits) <= 1e-5


def test_chunked_prefill_equals_full_forward(model, tokens, torch_logits):
    decoder = nnx.clone(model)
    decoder.init_cache(tokens.shape[0])
    # A 10-token prefill, one token, then a 10-token continuation through the caches.
    parts = [
        _decode(decoder, jnp.asarray(tokens[:, a:b])) for a, b in ((0, 10), (10, 11), (11, 21))
    ]
    assert _rel_err(jnp.concatenate(parts, axis=1), torch_logits) <= 1e-5


def test_greedy_generate_matches_transformers(checkpoint, model, tokens):
    prompt = tokens[:, :5]
    with torch.no_grad():
        # use_cache=False: every step is a full forward (transformers' MiniMax cache mis-places
        # the softmax layers' positions when layer 0 is a lightning layer).
        want = checkpoint[1].generate(
            torch.tensor(prompt), max_new_tokens=8, do_sample=False, use_cache=False
        )
    got = generate(model, jnp.asarray(prompt), 8, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(got), want.numpy())


def test_gradients_match_torch_autograd(checkpoint, model_ref, tokens):
    model = model_ref
    torch_model = checkpoint[1]
    embeds = np.asarray(model.embed_tokens(jnp.asarray(tokens)))
    labels = tokens[:, 1:]

    def jax_loss(m, x):
        logits = m(None, inputs_embeds=x)[:, :-1]
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(labels)[..., None], axis=-1))

    grad_fn = nnx.jit(nnx.value_and_grad(jax_loss, argnums=(0, 1)))
    loss, (grads, grad_x) = grad_fn(model, jnp.asarray(embeds))

    x = torch.tensor(embeds, requires_grad=True)
    torch_model.zero_grad()
    logits = torch_model(inputs_embeds=x).logits[:, :-1]
    want_loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, VOCAB), torch.tensor(labels).reshape(-1)
    )
    want_loss.backward()
    want_loss = want_loss.item()
    assert abs(float(loss) - want_loss) <= 1e-5 * abs(want_loss)
    assert _rel_err(grad_x, x.grad.numpy()) <= 1e-5
    layers = torch_model.model.layers
    pairs = [
        (grads.layers[0].self_attn.qkv_proj.kernel, layers[0].self_attn.qkv_proj.weight.grad.T),
        (grads.layers[0].self_attn.norm.weight, layers[0].self_attn.norm.weight.grad),
        (grads.layers[1].self_attn.k_proj.kernel, layers[1].self_attn.k_proj.weight.grad.T),
        (grads.layers[0].block_sparse_moe.w1[1], layers[0].mlp.experts.gate_up_proj.grad[1, :40].T),
        (grads.layers[0].block_sparse_moe.gate.kernel, layers[0].mlp.gate.weight.grad.T),
    ]
    for got, want in pairs:
        assert _rel_err(got[...], want.numpy()) <= 1e-5


def test_bf16_sharded_checkpoint_loads(checkpoint, tmp_path, tokens, torch_logits):
    torch_model = copy.deepcopy(checkpoint[1]).to(torch.bfloat16)
    torch_model.save_pretrained(tmp_path, max_shard_size="100KB")  # several files + an index
    assert (tmp_path / "model.safetensors.index.json").exists()
    loaded = hf.from_pretrained(tmp_path, impl="reference")
    kernel = loaded.layers[0].self_attn.qkv_proj.kernel[...]
    assert kernel.dtype == jnp.bfloat16
    want = torch_model.model.layers[0].self_attn.qkv_proj.weight
    np.testing.assert_array_equal(
        np.asarray(kernel).view(np.uint16),
        want.T.contiguous().view(torch.int16).numpy().view(np.uint16),
    )
    logits = _forward(loaded, jnp.asarray(tokens))
    assert logits.dtype == jnp.bfloat16
    # bf16 weights and activations (8 mantissa bits) through 2 layers.
    assert _rel_err(logits, torch_logits) <= 0.05


def test_save_pretrained_round_trips_through_transformers(
    checkpoint, model, tmp_path, tokens, torch_logits
):
    hf.save_pretrained(model, tmp_path, max_shard_bytes=100_000)  # several files + an index
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    again = dict(nnx.to_flat_state(nnx.state(hf.from_pretrained(tmp_path), nnx.Param)))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        np.testing.assert_array_equal(again[path][...], var[...])
    reloaded, info = transformers.MiniMaxForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    original = checkpoint[1].state_dict()
    for name, tensor in reloaded.state_dict().items():
        if not name.endswith(("slope_rate", "_decay")):  # buffers: recomputed, so rounded
            torch.testing.assert_close(tensor, original[name], rtol=0, atol=0)
    with torch.no_grad():
        logits = reloaded.eval()(torch.tensor(tokens)).logits.numpy()
    assert _rel_err(logits, torch_logits) <= 1e-6


def test_sharded_load_equals_unsharded(checkpoint, model, tokens, torch_logits):
    # Parameters split over "model" by the sharding rule; the lightning layers also run
    # sequence-parallel over "seq" (tokens sharded along the sequence).
    devices = np.array(jax.devices("cpu")[:4]).reshape(2, 2)
    mesh = jax.sharding.Mesh(devices, ("seq", "model"))
    sharded = hf.from_pretrained(
        checkpoint[0], impl="reference", mesh=mesh, axis="model", seq_axis="seq"
    )
    experts = sharded.layers[0].block_sparse_moe.w1[...]
    assert experts.sharding.spec == jax.sharding.PartitionSpec("model", None, None)
    assert experts.addressable_shards[0].data.shape == (2, 48, 40)
    qkv = sharded.layers[0].self_attn.qkv_proj.kernel[...]
    assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, "model")
    head = sharded.lm_head.kernel[...]
    assert head.addressable_shards[0].data.shape == (48, VOCAB // 2)
    flat_sharded = nnx.to_flat_state(nnx.state(sharded, nnx.Param))
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path, var in flat_sharded:
        np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(flat[path][...]))
    seq_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "seq"))
    prefix = jax.device_put(jnp.asarray(tokens[:, :20]), seq_sharding)
    # Causal: the logits of a 20-token prefix are the first 20 of the full sequence's.
    assert _rel_err(_forward(sharded, prefix), torch_logits[:, :20]) <= 1e-5


def _rewrite(src, dst, change_tensors=None, change_config=None):
    from safetensors.numpy import load_file, save_file

    os.makedirs(dst, exist_ok=True)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    if change_tensors:
        change_tensors(tensors)
    if change_config:
        change_config(config)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return dst


def test_bad_checkpoints_name_the_problem(checkpoint, tmp_path):
    src = checkpoint[0]
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"

    def arch(c):
        c["architectures"] = ["LlamaForCausalLM"]

    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        hf.from_pretrained(_rewrite(src, tmp_path / "arch", change_config=arch))

    def missing(t):
        del t[name]

    with pytest.raises(ValueError, match=f"no tensor '{name}'"):
        hf.from_pretrained(_rewrite(src, tmp_path / "missing", missing))

    def extra(t):
        t["model.layers.0.self_attn.bias"] = np.zeros(3, np.float32)

    with pytest.raises(ValueError, match="unexpected tensors.*model.layers.0.self_attn.bias"):
        hf.from_pretrained(_rewrite(src, tmp_path / "extra", extra))

    def shape(t):
        t[name] = t[name][:, :-1]

    with pytest.raises(ValueError, match=f"'{name}' has shape \\(48, 39\\), expected \\(48, 40\\)"):
        hf.from_pretrained(_rewrite(src, tmp_path / "shape", shape))

    def slopes(t):
        t["model.layers.0.self_attn.slope_rate"] = t["model.layers.0.self_attn.slope_rate"] * 2

    with pytest.raises(ValueError, match="model.layers.0.self_attn.slope_rate"):
        hf.from_pretrained(_rewrite(src, tmp_path / "slopes", slopes))

    shutil.rmtree(tmp_path)


def test_packed_segments_equal_separate_documents(model_ref, tokens, torch_logits):
    # Two documents packed in one row: the first 10 tokens of row 0, then the first 11 of
    # row 1. Each sees only itself (lightning state reset, softmax masked by run with positions
    # restarting), so its logits are transformers' for that row's prefix.
    row = jnp.asarray(np.concatenate([tokens[0, :10], tokens[1, :11]])[None])
    packed = _forward(model_ref, row, jnp.asarray([[1] * 10 + [2] * 11]))
    want = np.concatenate([torch_logits[0, :10], torch_logits[1, :11]])[None]
    assert _rel_err(packed, want) <= 1e-5
