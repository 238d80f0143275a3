r"""Why 2 softmax layers failed the recall task: initialisation ablations.

Trains the same 2-layer softmax model on the fused-pair recall task of
`recall.py` once per variant, all else equal, and prints the accuracy per N:

  baseline    init std 0.02 (TransNormerLLM's), embedding scaled by sqrt(D)
  default     init std 1/sqrt(embed_dim), recall.py's default
  qk_x5       std 0.02, the query and key kernels of every softmax layer x5
  vo_x5       std 0.02, the value and output kernels of every softmax layer x5
  no_embed_scale   std 0.02, the embedding not scaled by sqrt(D)
  lr_1e-3     std 0.02, peak learning rate 1e-3 instead of 5e-3

  python experiments/recall_init.py                      # -> runs/recall_init.json
  python experiments/recall_init.py --variants=baseline,vo_x5 --steps=300
  python experiments/recall_init.py --init_only   # the RMS ratios below, no training

Also prints, at init, the RMS of each model's first token-mixer output over
the RMS of the (scaled) embedding it is added to; `--init_only` prints only
that, for a softmax and a lightning first layer at init std 0.02 and at the
default.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from lightning_jax import cli

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import recall  # noqa: E402

from lightning_jax.models import TransNormerLM  # noqa: E402

VARIANTS = ("baseline", "default", "qk_x5", "vo_x5", "no_embed_scale", "lr_1e-3")

flags.DEFINE_list("variants", list(VARIANTS), f"Variants to train, of {VARIANTS}.")
flags.DEFINE_list("pairs", ["2", "4", "8"], "Key-value pairs per sequence (N).")
flags.DEFINE_integer("steps", 300, "Training steps per variant.")
flags.DEFINE_integer("embed_dim", 64, "Model width.")
flags.DEFINE_integer("num_heads", 4, "Heads.")
flags.DEFINE_integer("seed", 0, "Seed of the init and the data.")
flags.DEFINE_string("out", "runs/recall_init.json", "JSON path.")
flags.DEFINE_bool("init_only", False, "Print the mixer/embedding RMS ratios at init; no training.")


def _scale_softmax_kernels(model: TransNormerLM, qkv: tuple[float, float, float], out: float):
    """Multiplies every softmax layer's q, k, v kernel columns and output kernel in place."""
    for layer in model.layers:
        mixer = layer.token_mixer
        if not hasattr(mixer, "qkv_proj"):
            continue
        kernel = mixer.qkv_proj.kernel
        hidden = kernel.shape[1] // 3  # columns: [q | k | v], each H*d
        factor = jnp.repeat(jnp.asarray(qkv, kernel.dtype), hidden)
        kernel[...] = kernel[...] * factor
        mixer.out_proj.kernel[...] = mixer.out_proj.kernel[...] * out


def variant_setup(name: str, embed_dim: int) -> tuple[dict, dict, callable]:
    """(config overrides, train_and_evaluate overrides, in-place change after init)."""
    base = dict(init_std=0.02)
    if name == "default":
        return dict(init_std=embed_dim**-0.5), {}, None
    if name == "qk_x5":
        return base, {}, lambda m: _scale_softmax_kernels(m, (5.0, 5.0, 1.0), 1.0)
    if name == "vo_x5":
        return base, {}, lambda m: _scale_softmax_kernels(m, (1.0, 1.0, 5.0), 5.0)
    if name == "no_embed_scale":
        return dict(base, scale_embedding=False), {}, None
    if name == "lr_1e-3":
        return base, dict(learning_rate=1e-3), None
    return base, {}, None


def run_variant(name: str, pairs: list[int], steps: int, embed_dim: int, heads: int, seed: int):
    config_changes, train_changes, after_init = variant_setup(name, embed_dim)
    original_config, original_model = recall.model_config, recall.TransNormerLM

    def model_config(*args, **kwargs):
        return dataclasses.replace(original_config(*args, **kwargs), **config_changes)

    def make_model(config, *, rngs):
        model = original_model(config, rngs=rngs)
        if after_init is not None:
            after_init(model)
        return model

    recall.model_config, recall.TransNormerLM = model_config, make_model
    try:
        ratio = _mixer_to_embedding_rms(pairs, embed_dim, heads, seed, make_model, model_config)
        kwargs = dict(
            pairs=pairs, steps=steps, batch_size=32, learning_rate=5e-3, num_keys=32,
            num_values=8, num_layers=2, embed_dim=embed_dim, num_heads=heads,
            eval_sequences=256, seed=seed, fused=True, log=False,
        )  # fmt: skip
        result = recall.train_and_evaluate("softmax", **{**kwargs, **train_changes})
    finally:
        recall.model_config, recall.TransNormerLM = original_config, original_model
    result["variant"], result["mixer_to_embedding_rms"] = name, ratio
    return result


def _mixer_to_embedding_rms(
    pairs, embed_dim, heads, seed, make_model, model_config, mixer: str = "softmax"
) -> float:
    """RMS of layer 0's token-mixer output over the RMS of the embedding, at init."""
    seq_len = 3 * max(pairs)
    vocab = recall.vocab_size(32, 8, True)
    config = model_config(mixer, vocab, seq_len, 2, embed_dim, heads)
    model = make_model(config, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    tokens, _, _ = recall.recall_batch(rng, np.full(16, max(pairs)), 32, 8, seq_len, True)
    x = model.embed(jnp.asarray(tokens))
    if config.scale_embedding:
        x = x * np.sqrt(embed_dim)
    layer = model.layers[0]
    mixed = layer.token_mixer(layer.token_norm(x))
    return float(jnp.sqrt(jnp.mean(mixed**2)) / jnp.sqrt(jnp.mean(x**2)))


def main(argv):
    del argv
    f = flags.FLAGS
    bad = [v for v in f.variants if v not in VARIANTS]
    if bad:
        raise cli.UsageError(f"--variants must be of {VARIANTS}, got {bad}")
    pairs = [int(p) for p in f.pairs]
    if f.init_only:
        print("| first layer | init std | mixer/embedding RMS at init |")
        print("| --- | ---: | ---: |")
        for mixer in ("softmax", "lightning"):
            for std in (0.02, f.embed_dim**-0.5):

                def config(*args, std=std, **kwargs):
                    return dataclasses.replace(recall.model_config(*args, **kwargs), init_std=std)

                ratio = _mixer_to_embedding_rms(
                    pairs, f.embed_dim, f.num_heads, f.seed, TransNormerLM, config, mixer
                )
                print(f"| {mixer} | {std:.3f} | {ratio:.3f} |")
        return
    rows = []
    print("| variant | mixer/embedding RMS at init | " + " | ".join(f"N={n}" for n in pairs) + " |")
    print("| --- | ---: | " + " | ".join("---:" for _ in pairs) + " |")
    for name in f.variants:
        r = run_variant(name, pairs, f.steps, f.embed_dim, f.num_heads, f.seed)
        rows.append(r)
        accs = " | ".join(f"{r['accuracy_by_pairs'][n]:.3f}" for n in pairs)
        print(f"| {name} | {r['mixer_to_embedding_rms']:.3f} | {accs} |", flush=True)
    os.makedirs(os.path.dirname(f.out) or ".", exist_ok=True)
    with open(f.out, "w") as fh:
        json.dump(
            dict(results=rows, command="python " + " ".join(sys.argv),
                 date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())),
            fh, indent=1,
        )  # fmt: skip
    print(f"wrote {f.out}")


if __name__ == "__main__":
    cli.run(main)
