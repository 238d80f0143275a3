r"""Associative recall: where a fixed-size state runs out, and what softmax layers buy back.

Multi-query associative recall (MQAR, as in the Zoology study, Arora et al.
2023), generated on the fly: each sequence lists N key-value pairs, then asks
for every key again (in a random order), and the model must answer with that
key's value:

    k1 v1 k2 v2 ... kN vN | q1 a1 q2 a2 ... qN aN      (4N tokens; q = a permutation of k)

`--fused` spells each pair as one token instead (`p1 ... pN | q1 a1 ...`,
3N tokens, p = (k, v)), which a model answers with a single lookup rather
than the two steps (tie each value to the key before it, then find the key)
of the layout above.

Keys are N distinct ids of `--num_keys`, values are drawn from `--num_values`
(with repetition), so chance is 1/num_values. A lightning layer carries a
fixed-size state (`[H, d, d]` per sequence, d = head dim), which must hold all
N pairs at once; a softmax layer attends to every earlier token. Each model
(lightning, softmax, hybrid: the last layer softmax) trains for the same
number of steps on sequences with N drawn from `--pairs` (each row padded to
the longest, so one compiled shape; the model is causal, so padding after a
row's end does not change its answers), and is then evaluated per N on the
same fresh sequences: the accuracy on answer tokens.

Initialisation: every kernel and the embedding are drawn with std
`--init_std` (default 1/sqrt(embed_dim)). TransNormerLLM's 0.02 is sized for
widths near 1,000; at width 64, with the embedding scaled by sqrt(D), a
softmax layer's output starts about 16x smaller than the embedding in the
residual stream, and 2 softmax layers stayed at 0.29-0.33 accuracy on the
fused task after 1,500 steps (chance 0.125). A lightning layer normalises its
attention output, so it starts 2.4x larger and learned the task.
`experiments/recall_init.py` runs the ablations.

Optimisation: the defaults (batch 256, peak learning rate 2e-3) are what let
2 softmax layers learn the MQAR layout's two-step circuit on a CPU budget.
With batch 32 or 64 and 5e-3 (enough for the fused layout) they stayed near
0.7 / 0.45 / 0.25 accuracy at N = 2 / 4 / 8 for up to 5,000 steps; with batch
256 at 2e-3, 1.00 at every N in 5 of 6 runs of 800 steps (docs/recall.md).

  python experiments/recall.py        # 3 models x 1 seed, one after the other -> runs/recall/
  python experiments/recall.py --seeds=0,1,2 --head_dims=8,16
  python experiments/recall.py --fused --batch_size=32 --learning_rate=5e-3 --steps=300
  # or one process per model, then join their JSONs:
  python experiments/recall.py --mixers=softmax --out=runs/recall/softmax.json  # (etc.)
  python experiments/recall.py --merge=runs/recall/lightning.json,...

Prints a table (mean and min-max over seeds) and writes `--out` (JSON) and a
PNG beside it (accuracy against N, one panel per head dim, bars: min-max).
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

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "tools"))

import machine_info  # noqa: E402
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
    mixer: str,
    vocab_size: int,
    seq_len: int,
    num_layers: int,
    embed_dim: int,
    num_heads: int,
    head_dim: int | None = None,
    init_std: float | None = None,
) -> TransNormerConfig:
    """lightning / softmax / hybrid (every num_layers-th layer softmax: the last one only).

    init_std None: 1/sqrt(embed_dim) (see the module docstring).
    """
    hybrid = mixer == "hybrid"
    return TransNormerConfig(
        vocab_size=vocab_size,
        num_layers=num_layers,
        embed_dim=embed_dim,
        num_heads=num_heads,
        head_dim=head_dim,
        mixer="lightning" if hybrid else mixer,
        softmax_every=num_layers if hybrid else 0,
        max_seq_len=seq_len,
        init_std=embed_dim**-0.5 if init_std is None else init_std,
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
    head_dim: int | None = None,
    init_std: float | None = None,
    log: bool = True,
) -> dict:
    """Trains one model on N drawn uniformly from `pairs`; accuracy per N on fresh sequences.

    Returns a dict with `accuracy_by_pairs` {N: accuracy}, the model's
    `layer_mixers`, `head_dim`, `state_floats` (floats of one lightning
    layer's state per sequence, H*d*d), `params`, `train_curve` and
    `train_seconds`.
    """
    per_pair = tokens_per_pair(fused)
    seq_len = per_pair * max(pairs)
    vocab = vocab_size(num_keys, num_values, fused)
    config = model_config(
        mixer, vocab, seq_len, num_layers, embed_dim, num_heads, head_dim, init_std
    )
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
    name = f"{mixer} d={config.attn_head_dim} seed={seed}"
    for step in range(steps):
        row_pairs = rng.choice(pairs, size=batch_size)
        batch = recall_batch(rng, row_pairs, num_keys, num_values, seq_len, fused)
        loss, acc = train_step(model, optimizer, *batch)
        if (step + 1) % max(steps // 10, 1) == 0:
            curve.append(dict(step=step + 1, loss=float(loss), accuracy=float(acc)))
            if log:
                print(f"[{name}] step {step + 1}/{steps} loss {float(loss):.3f} "
                      f"acc {float(acc):.3f}", flush=True)  # fmt: skip
    train_s = time.perf_counter() - start
    # The same held-out sequences for every model and seed of one --pairs.
    eval_rng = np.random.default_rng(10_000)
    accuracy = {}
    for n in pairs:
        accs = []
        for _ in range(max(eval_sequences // batch_size, 1)):
            row_pairs = np.full(batch_size, n)
            batch = recall_batch(eval_rng, row_pairs, num_keys, num_values, seq_len, fused)
            accs.append(float(eval_step(model, *batch)[1]))
        accuracy[n] = float(np.mean(accs))
    params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return dict(
        mixer=mixer,
        seed=seed,
        head_dim=config.attn_head_dim,
        layer_mixers=list(config.layer_mixers),
        state_floats=config.num_heads * config.attn_head_dim**2,
        params=params,
        accuracy_by_pairs=accuracy,
        train_curve=curve,
        train_seconds=train_s,
    )


def summarize(results: list[dict]) -> list[dict]:
    """Groups runs by (head_dim, mixer): accuracy per N as mean, min, max over seeds.

    Returns rows sorted by head dim (mixers in first-seen order), each with
    `mixer`, `head_dim`, `seeds`, `values`: {N: [accuracy per seed]}, and
    `mean` / `min` / `max` / `std`: {N: float} (std: sample standard
    deviation, 0 for one seed).
    """
    groups: dict[tuple[int, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["head_dim"], r["mixer"]), []).append(r)
    mixer_order = list(dict.fromkeys(r["mixer"] for r in results))
    rows = []
    for head_dim, mixer in sorted(groups, key=lambda g: (g[0], mixer_order.index(g[1]))):
        runs = groups[(head_dim, mixer)]
        by_pairs = [{int(n): float(a) for n, a in r["accuracy_by_pairs"].items()} for r in runs]
        pairs = sorted({n for b in by_pairs for n in b})
        acc = {n: [b[n] for b in by_pairs] for n in pairs}
        rows.append(
            dict(
                mixer=mixer,
                head_dim=head_dim,
                seeds=[r["seed"] for r in runs],
                values=acc,
                mean={n: float(np.mean(a)) for n, a in acc.items()},
                min={n: float(np.min(a)) for n, a in acc.items()},
                max={n: float(np.max(a)) for n, a in acc.items()},
                std={n: float(np.std(a, ddof=1)) if len(a) > 1 else 0.0 for n, a in acc.items()},
                train_seconds=float(np.median([r["train_seconds"] for r in runs])),
            )
        )
    return rows


def plot_recall(rows: list[dict], chance: float, path: str, title: str = "") -> None:
    """Accuracy against N per mixer, one panel per head dim; markers: mean, bars: min-max,
    small dots: the seeds (a mean of runs that did and did not learn the task hides that)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    head_dims = sorted({r["head_dim"] for r in rows})
    fig, axes = plt.subplots(
        1, len(head_dims), figsize=(4.2 * len(head_dims), 3.8), dpi=100, sharey=True,
        squeeze=False,
    )  # fmt: skip
    for ax, head_dim in zip(axes[0], head_dims):
        for r in (r for r in rows if r["head_dim"] == head_dim):
            pairs = sorted(r["mean"])
            mean = np.array([r["mean"][n] for n in pairs])
            low = mean - np.array([r["min"][n] for n in pairs])
            high = np.array([r["max"][n] for n in pairs]) - mean
            bars = ax.errorbar(pairs, mean, yerr=[low, high], fmt="o-", capsize=3,
                               label=f"{r['mixer']} ({len(r['seeds'])} seeds)")  # fmt: skip
            if len(r["seeds"]) > 1:
                xs = [n for n in pairs for _ in r["values"][n]]
                ys = [a for n in pairs for a in r["values"][n]]
                ax.scatter(xs, ys, s=10, alpha=0.5, color=bars[0].get_color(), zorder=3)
        ax.axhline(chance, color="gray", ls=":", label="chance")
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("key-value pairs N")
        ax.set_title(f"head dim {head_dim}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("recall accuracy (answer tokens)")
    axes[0][-1].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _define_flags():
    flags.DEFINE_list("mixers", ["lightning", "softmax", "hybrid"], "Models to train.")
    cli.choice_list("mixers", ("lightning", "softmax", "hybrid"))
    flags.DEFINE_list("pairs", ["2", "4", "8"], "Key-value pairs per sequence (N).")
    cli.int_list("pairs")
    flags.DEFINE_integer("steps", 800, "Training steps per model.")
    cli.positive_int("steps")
    flags.DEFINE_integer("batch_size", 256, "Sequences per step.")
    cli.positive_int("batch_size")
    flags.DEFINE_float("learning_rate", 2e-3, "Peak learning rate (AdamW, warmup + cosine).")
    flags.DEFINE_integer("num_keys", 16, "Key vocabulary.")
    cli.positive_int("num_keys")
    flags.DEFINE_integer("num_values", 16, "Value vocabulary (chance = 1 / num_values).")
    cli.positive_int("num_values")
    flags.DEFINE_integer("num_layers", 2, "Layers (hybrid: the last one softmax).")
    cli.positive_int("num_layers")
    flags.DEFINE_integer("embed_dim", 64, "Model width.")
    cli.positive_int("embed_dim")
    flags.DEFINE_integer("num_heads", 4, "Heads.")
    cli.positive_int("num_heads")
    flags.DEFINE_list("head_dims", [], "Per-head widths d to sweep (empty: embed_dim / heads).")
    cli.int_list("head_dims", nonempty=False)
    flags.DEFINE_float("init_std", None, "Std of every kernel's init (None: 1/sqrt(embed_dim)).")
    flags.DEFINE_integer("eval_sequences", 512, "Held-out sequences per N.")
    cli.positive_int("eval_sequences")
    flags.DEFINE_list("seeds", ["0"], "Seeds of the init and the training data, one run each.")
    cli.int_list("seeds", minimum=0)
    flags.DEFINE_bool("fused", False, "One token per key-value pair (3N tokens), else 4N.")
    flags.DEFINE_string("out", "runs/recall/recall.json", "JSON path (PNG beside it).")
    flags.DEFINE_list("merge", [], "Join these JSONs of runs of one task into --out; no training.")


_FLAG_NAMES = (
    "mixers pairs steps batch_size learning_rate num_keys num_values num_layers embed_dim "
    "num_heads head_dims init_std eval_sequences seeds fused"
).split()
# What runs joined by --merge may differ in.
_SWEPT = ("mixers", "head_dims", "seeds")


def merge(paths: list[str], out: str) -> None:
    """Joins runs of one task that differ only in mixers, head dims or seeds into `out`."""
    runs = []
    for path in paths:
        with open(path) as fh:
            runs.append(json.load(fh))
    configs = [{k: v for k, v in r["config"].items() if k not in _SWEPT} for r in runs]
    if any(c != configs[0] for c in configs):
        raise cli.UsageError(f"--merge: the runs {paths} differ in more than {', '.join(_SWEPT)}")
    merged = dict(runs[0])
    merged["results"] = [res for r in runs for res in r["results"]]
    config = dict(runs[0]["config"])
    for name in _SWEPT:
        values = [v for r in runs for v in r["config"].get(name, [])]
        config[name] = list(dict.fromkeys(values))
    merged["config"] = config
    merged["command"] = [c for r in runs for c in _as_list(r["command"])]
    merged["train_wall_seconds"] = sum(r.get("train_wall_seconds", 0.0) for r in runs)
    report(merged, out)


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def format_table(rows: list[dict], pairs: list[int]) -> str:
    """Markdown table: one row per (head dim, mixer), cells `mean (min-max)` over seeds."""
    lines = [
        "| head dim | model | seeds | " + " | ".join(f"N={n}" for n in pairs) + " | train s |",
        "| ---: | --- | ---: | " + " | ".join("---:" for _ in pairs) + " | ---: |",
    ]
    for r in rows:
        cells = []
        for n in pairs:
            if len(r["seeds"]) > 1:
                cells.append(f"{r['mean'][n]:.2f} ({r['min'][n]:.2f}-{r['max'][n]:.2f})")
            else:
                cells.append(f"{r['mean'][n]:.2f}")
        lines.append(
            f"| {r['head_dim']} | {r['mixer']} | {len(r['seeds'])} | " + " | ".join(cells)
            + f" | {r['train_seconds']:.0f} |"
        )  # fmt: skip
    return "\n".join(lines)


def report(result: dict, out: str) -> None:
    """Prints the accuracy table; writes the JSON (with the summary) and the PNG beside it."""
    for r in result["results"]:
        r["accuracy_by_pairs"] = {int(n): a for n, a in r["accuracy_by_pairs"].items()}
    rows = summarize(result["results"])
    pairs = sorted({n for r in rows for n in r["mean"]})
    config, chance = result["config"], result["chance"]
    layout = "fused pairs" if config.get("fused") else "MQAR"
    print(
        f"\nrecall accuracy ({layout} layout, {config['steps']} steps, chance {chance:.3f}; "
        "mean (min-max) over seeds):"
    )
    print(format_table(rows, pairs))
    result["summary"] = rows
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as fh:
            json.dump(result, fh, indent=1)
        png = os.path.splitext(out)[0] + ".png"
        title = f"{layout} layout, {config['steps']} steps, {config['num_layers']} layers"
        plot_recall(rows, chance, png, title)
        print(f"wrote {out} and {png}")


def _positive_ints(name: str, values: list[str]) -> list[int]:
    try:
        ints = [int(v) for v in values]
    except ValueError:
        raise cli.UsageError(f"--{name} must be ints, got {values}") from None
    if any(i < 1 for i in ints):
        raise cli.UsageError(f"--{name} must be positive ints, got {values}")
    return ints


def main(argv):
    del argv
    f = flags.FLAGS
    if f.merge:
        merge(f.merge, f.out)
        return
    pairs = _positive_ints("pairs", f.pairs)
    if not pairs:
        raise cli.UsageError("--pairs must name at least one N")
    if max(pairs) > f.num_keys:
        raise cli.UsageError(f"--pairs (up to {max(pairs)}) must not exceed --num_keys")
    head_dims = _positive_ints("head_dims", f.head_dims) or [None]
    if any(d is not None and d % 2 for d in head_dims) and set(f.mixers) != {"lightning"}:
        raise cli.UsageError(f"--head_dims must be even for softmax layers, got {f.head_dims}")
    try:
        seeds = [int(s) for s in f.seeds]
    except ValueError:
        raise cli.UsageError(f"--seeds must be ints, got {f.seeds}") from None
    if not seeds:
        raise cli.UsageError("--seeds must name at least one seed")
    bad = [m for m in f.mixers if m not in ("lightning", "softmax", "hybrid")]
    if bad or not f.mixers:
        raise cli.UsageError(f"--mixers must be lightning, softmax or hybrid, got {f.mixers}")
    if f.init_std is not None and f.init_std <= 0:
        raise cli.UsageError(f"--init_std must be positive, got {f.init_std}")
    results = []
    start = time.perf_counter()
    for head_dim in head_dims:
        for mixer in f.mixers:
            for seed in seeds:
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
                        seed=seed,
                        fused=f.fused,
                        head_dim=head_dim,
                        init_std=f.init_std,
                    )
                )
    result = dict(
        results=results,
        chance=1 / f.num_values,
        config={name: f[name].value for name in _FLAG_NAMES},
        device=str(jax.devices()[0].device_kind),
        cpu=machine_info.cpu_name(),
        jax=jax.__version__,
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        command="python " + " ".join(sys.argv),
        train_wall_seconds=time.perf_counter() - start,
    )
    report(result, f.out)


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
