r"""Associative recall: why hybrids put softmax layers among the lightning ones.

A synthetic multi-query associative recall task, generated on the fly: each
sequence lists N key-value pairs, then asks for every key again (in a random
order), and the model must answer with that key's value. By default
(`--fused`) each pair is one token, so answering is a single lookup:

    p1 p2 ... pN | q1 a1 q2 a2 ... qN aN      (3N tokens; p = (k, v); q = a permutation of k)

`--nofused` spells each pair as two tokens (`k1 v1 ... kN vN | q1 a1 ...`, 4N
tokens), the classic MQAR layout, which needs two attention steps and many
more training steps than fit a small CPU budget.

Keys are N distinct ids of `--num_keys`, values are drawn from `--num_values`
(with repetition), so chance is 1/num_values. A lightning layer carries a
fixed-size state (`[H, d, d]` per sequence), which must hold all N pairs at
once; a softmax layer attends to every earlier token. Each model (lightning,
softmax, hybrid: the last layer softmax) trains for the same number of steps on
sequences with N drawn from `--pairs` (each row padded to the longest, so one
compiled shape; the model is causal, so padding after a row's end does not
change its answers), and is then evaluated per N on the same fresh sequences:
the accuracy on answer tokens against the context length.

  python experiments/recall.py        # 3 models x 600 steps, one after the other
  python experiments/recall.py --steps=3000 --pairs=8,16,32,64,128 --num_keys=128
  # or one process per model, then join their JSONs:
  python experiments/recall.py --mixers=softmax --out=results/recall/softmax.json  # (etc.)
  python experiments/recall.py --merge=results/recall/lightning.json,...

Prints a table and writes `--out` (JSON) and a PNG beside it.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from flax import nnx

from lightning_jax import cli

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lightning_jax.models import TransNormerConfig, TransNormerLM  # noqa: E402

PAD = 0  # token id after a sequence's end; keys start at 1


def tokens_per_pair(fused: bool) -> int:
    """Context tokens per key-value pair: 4 (k v | q a), or 3 when a pair is one token."""
    return 3 if fused else 4


def vocab_size(num_keys: int, num_values: int, fused: bool) -> int:
    """PAD, keys, values, and with `fused` one token per (key, value) pair."""
    return 1 + num_keys + num_values + (num_keys * num_values if fused else 0)


def recall_batch(
    rng: np.random.Generator,
    pairs: np.ndarray,
    num_keys: int,
    num_values: int,
    seq_len: int,
    fused: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One batch of the recall task, row b with `pairs[b]` key-value pairs.

    Token ids: PAD = 0, keys 1..K, values K+1..K+V (K = num_keys, V =
    num_values), and with `fused` the pair (key i, value j) as the one token
    K+V+1 + (i-1)*V + j. Row layout (then PAD):

        fused=False:  k1 v1 ... kN vN  q1 a1 ... qN aN    (4N tokens)
        fused=True:   p1 ... pN        q1 a1 ... qN aN    (3N tokens; p = (k, v) in one token)

    The first layout needs two steps of attention (tie each value to the key
    before it, then find the key); the fused one a single lookup, which a tiny
    model learns in far fewer steps.

    Args:
      rng: numpy generator (the batch is a function of its state).
      pairs: int `[B]` number of pairs N of each row.
      num_keys: size of the key vocabulary (>= max N: keys of a row are distinct).
      num_values: size of the value vocabulary.
      seq_len: length T of the inputs, >= tokens_per_pair * max N - 1.
      fused: one token per key-value pair.

    Returns:
      inputs int32 `[B, T]`, targets int32 `[B, T]` (the next token), and
      answer mask bool `[B, T]`: True where the target is the value asked for.
    """
    batch = len(pairs)
    per_pair = tokens_per_pair(fused)
    if int(pairs.max()) > num_keys:
        raise ValueError(f"pairs (up to {int(pairs.max())}) must not exceed num_keys {num_keys}")
    if per_pair * int(pairs.max()) > seq_len + 1:
        raise ValueError(
            f"{per_pair} * pairs (up to {per_pair * int(pairs.max())}) must be <= seq_len + 1"
        )
    tokens = np.full((batch, seq_len + 1), PAD, np.int32)
    is_answer = np.zeros((batch, seq_len + 1), bool)
    for b, n in enumerate(pairs):
        key_idx = rng.choice(num_keys, size=n, replace=False)
        value_idx = rng.integers(0, num_values, size=n)
        keys, values = key_idx + 1, value_idx + num_keys + 1
        order = rng.permutation(n)
        if fused:
            tokens[b, :n] = num_keys + num_values + 1 + key_idx * num_values + value_idx
            asked = n
        else:
            tokens[b, 0 : 2 * n : 2] = keys
            tokens[b, 1 : 2 * n : 2] = values
            asked = 2 * n
        tokens[b, asked : asked + 2 * n : 2] = keys[order]
        tokens[b, asked + 1 : asked + 2 * n : 2] = values[order]
        is_answer[b, asked + 1 : asked + 2 * n : 2] = True
    return tokens[:, :-1], tokens[:, 1:], is_answer[:, 1:]


def model_config(
    mixer: str, vocab_size: int, seq_len: int, num_layers: int, embed_dim: int, num_heads: int
) -> TransNormerConfig:
    """lightning / softmax / hybrid (every num_layers-th layer softmax: the last one only)."""
    hybrid = mixer == "hybrid"
    return TransNormerConfig(
        vocab_size=vocab_size,
        num_layers=num_layers,
        embed_dim=embed_dim,
        num_heads=num_heads,
        mixer="lightning" if hybrid else mixer,
        softmax_every=num_layers if hybrid else 0,
        max_seq_len=seq_len,
    )


def masked_loss_and_accuracy(model, inputs, targets, mask):
    """Cross-entropy and accuracy over the answer positions only."""
    logits = model(inputs).astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    weight = mask.astype(jnp.float32)
    total = jnp.maximum(weight.sum(), 1.0)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return (losses * weight).sum() / total, (correct * weight).sum() / total


def train_and_evaluate(
    mixer: str,
    *,
    pairs: list[int],
    steps: int,
    batch_size: int,
    learning_rate: float,
    num_keys: int,
    num_values: int,
    num_layers: int,
    embed_dim: int,
    num_heads: int,
    eval_sequences: int,
    seed: int,
    fused: bool = False,
) -> dict:
    """Trains one model on N drawn uniformly from `pairs`; accuracy per N on fresh sequences."""
    per_pair = tokens_per_pair(fused)
    seq_len = per_pair * max(pairs)
    vocab = vocab_size(num_keys, num_values, fused)
    config = model_config(mixer, vocab, seq_len, num_layers, embed_dim, num_heads)
    model = TransNormerLM(config, rngs=nnx.Rngs(seed))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, min(100, steps // 10 + 1), max(steps, 2), learning_rate * 0.1
    )
    optimizer = nnx.Optimizer(
        model, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule)), wrt=nnx.Param
    )

    @nnx.jit
    def train_step(model, optimizer, inputs, targets, mask):
        def loss_fn(model):
            return masked_loss_and_accuracy(model, inputs, targets, mask)

        (loss, acc), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return loss, acc

    eval_step = nnx.jit(masked_loss_and_accuracy)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    curve = []
    for step in range(steps):
        row_pairs = rng.choice(pairs, size=batch_size)
        batch = recall_batch(rng, row_pairs, num_keys, num_values, seq_len, fused)
        loss, acc = train_step(model, optimizer, *batch)
        if (step + 1) % max(steps // 10, 1) == 0:
            curve.append(dict(step=step + 1, loss=float(loss), accuracy=float(acc)))
            print(f"[{mixer}] step {step + 1}/{steps} loss {float(loss):.3f} acc {float(acc):.3f}")
    train_s = time.perf_counter() - start
    eval_rng = np.random.default_rng(seed + 1)  # the same held-out sequences for every model
    accuracy = {}
    for n in pairs:
        accs = []
        for _ in range(max(eval_sequences // batch_size, 1)):
            row_pairs = np.full(batch_size, n)
            batch = recall_batch(eval_rng, row_pairs, num_keys, num_values, seq_len, fused)
            accs.append(float(eval_step(model, *batch)[1]))
        accuracy[per_pair * n] = float(np.mean(accs))
    return dict(
        mixer=mixer,
        layer_mixers=list(config.layer_mixers),
        accuracy_by_context=accuracy,
        train_curve=curve,
        train_seconds=train_s,
    )


def plot_recall(results: list[dict], chance: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for r in results:
        contexts = sorted(r["accuracy_by_context"])
        ax.plot(contexts, [r["accuracy_by_context"][c] for c in contexts], "o-", label=r["mixer"])
    ax.axhline(chance, color="gray", ls=":", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("recall accuracy (answer tokens)")
    ax.set_title("associative recall at equal training steps")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _define_flags():
    flags.DEFINE_list("mixers", ["lightning", "softmax", "hybrid"], "Models to train.")
    cli.choice_list("mixers", ("lightning", "softmax", "hybrid"))
    flags.DEFINE_list("pairs", ["2", "4", "8", "16", "32"], "Key-value pairs per sequence (N).")
    cli.int_list("pairs")
    flags.DEFINE_integer("steps", 600, "Training steps per model.", lower_bound=1)
    flags.DEFINE_integer("batch_size", 32, "Sequences per step.", lower_bound=1)
    flags.DEFINE_float(
        "learning_rate", 5e-3, "Peak learning rate (AdamW, warmup + cosine).", lower_bound=0
    )
    flags.DEFINE_integer("num_keys", 32, "Key vocabulary.", lower_bound=1)
    flags.DEFINE_integer(
        "num_values", 8, "Value vocabulary (chance = 1 / num_values).", lower_bound=1
    )
    flags.DEFINE_integer("num_layers", 2, "Layers (hybrid: the last one softmax).", lower_bound=1)
    flags.DEFINE_integer("embed_dim", 64, "Model width.", lower_bound=1)
    flags.DEFINE_integer("num_heads", 4, "Heads.", lower_bound=1)
    flags.DEFINE_integer(
        "eval_sequences", 512, "Held-out sequences per context length.", lower_bound=1
    )
    flags.DEFINE_integer("seed", 0, "Seed of the init and the data.", lower_bound=0)
    flags.DEFINE_bool("fused", True, "One token per key-value pair (3N tokens), else 4N.")
    flags.DEFINE_string("out", "runs/recall/recall.json", "JSON path (PNG beside it).")
    flags.DEFINE_list("merge", [], "Join these JSONs of one-mixer runs into --out; no training.")


_FLAG_NAMES = (
    "mixers pairs steps batch_size learning_rate num_keys num_values num_layers embed_dim "
    "num_heads eval_sequences seed fused"
).split()


def merge(paths: list[str], out: str) -> None:
    """Joins runs of one config, one mixer each (e.g. run as parallel processes), into `out`."""
    runs = []
    for path in paths:
        with open(path) as fh:
            runs.append(json.load(fh))
    configs = [{k: v for k, v in r["config"].items() if k != "mixers"} for r in runs]
    if any(c != configs[0] for c in configs):
        raise cli.UsageError(f"--merge: the runs {paths} differ in more than --mixers")
    merged = dict(runs[0])
    merged["results"] = [res for r in runs for res in r["results"]]
    merged["config"] = {**runs[0]["config"], "mixers": [m["mixer"] for m in merged["results"]]}
    merged["command"] = [r["command"] for r in runs]
    report(merged, out)


def report(result: dict, out: str) -> None:
    """Prints the accuracy table; writes the JSON and the PNG beside it."""
    results = result["results"]
    contexts = sorted(int(c) for c in results[0]["accuracy_by_context"])
    steps, chance = result["config"]["steps"], result["chance"]
    print(f"\nrecall accuracy after {steps} steps (chance {chance:.3f}):")
    print("| model | " + " | ".join(f"{c} tokens" for c in contexts) + " | train s |")
    print("| --- | " + " | ".join("---:" for _ in contexts) + " | ---: |")
    for r in results:
        by_context = {int(c): a for c, a in r["accuracy_by_context"].items()}
        r["accuracy_by_context"] = by_context
        accs = " | ".join(f"{by_context[c]:.3f}" for c in contexts)
        print(f"| {r['mixer']} | {accs} | {r['train_seconds']:.0f} |")
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as fh:
            json.dump(result, fh, indent=1)
        png = os.path.splitext(out)[0] + ".png"
        plot_recall(results, result["chance"], png)
        print(f"wrote {out} and {png}")


def main(argv):
    del argv
    f = flags.FLAGS
    if f.merge:
        merge(f.merge, f.out)
        return
    pairs = [int(p) for p in f.pairs]
    if not pairs or min(pairs) < 1:
        raise cli.UsageError(f"--pairs must be positive ints, got {f.pairs}")
    if max(pairs) > f.num_keys:
        raise cli.UsageError(f"--pairs (up to {max(pairs)}) must not exceed --num_keys")
    bad = [m for m in f.mixers if m not in ("lightning", "softmax", "hybrid")]
    if bad:
        raise cli.UsageError(f"--mixers must be lightning, softmax or hybrid, got {bad}")
    results = []
    for mixer in f.mixers:
        results.append(
            train_and_evaluate(
                mixer,
                pairs=pairs,
                steps=f.steps,
                batch_size=f.batch_size,
                learning_rate=f.learning_rate,
                num_keys=f.num_keys,
                num_values=f.num_values,
                num_layers=f.num_layers,
                embed_dim=f.embed_dim,
                num_heads=f.num_heads,
                eval_sequences=f.eval_sequences,
                seed=f.seed,
                fused=f.fused,
            )
        )
    result = dict(
        results=results,
        chance=1 / f.num_values,
        config={name: f[name].value for name in _FLAG_NAMES},
        device=str(jax.devices()[0].device_kind),
        jax=jax.__version__,
        date=time.strftime("%Y-%m-%d"),
        command="python " + " ".join(sys.argv),
    )
    report(result, f.out)


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
