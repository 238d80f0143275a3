r"""Joins `train_lm.py --compare` runs of several seeds: held-out loss, mean and min-max.

Each input is the `compare.json` a `--compare` run writes (one seed, the same
flags otherwise). Prints a table per mixer (final held-out loss and bits per
byte: mean, sample std and min-max over seeds) and writes `--out` (JSON) and a
PNG beside it (held-out loss against step, mean with min-max bars).

  for s in 0 1 2; do python experiments/train_lm.py --compare=lightning,softmax,hybrid \
    --steps=150 --batch_size=8 --seq_len=128 --eval_every=50 --seed=$s \
    --workdir=runs/compare_seed$s; done
  python experiments/compare_seeds.py \
    --runs=runs/compare_seed0,runs/compare_seed1,runs/compare_seed2
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import flags

from lightning_jax import cli


def define_flags() -> None:
    """The command line's flags (defined only when run as a script, so that the tests can
    import this module beside other scripts that define flags of the same names)."""
    flags.DEFINE_list("runs", [], "Folders (or compare.json paths) of one --compare run per seed.")
    flags.DEFINE_string(
        "out", "runs/compare_seeds/compare_seeds.json", "JSON path (PNG beside it)."
    )


def load_runs(paths: list[str]) -> list[dict]:
    """The compare.json of each path (a folder holding one, or the file itself)."""
    runs = []
    for path in paths:
        file = os.path.join(path, "compare.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise cli.UsageError(f"--runs: no compare.json at {path}")
        with open(file) as fh:
            runs.append(json.load(fh))
    mixers = [sorted(r["runs"]) for r in runs]
    if any(m != mixers[0] for m in mixers):
        raise cli.UsageError(f"--runs: the runs compare different mixers: {mixers}")
    return runs


def summarize(runs: list[dict]) -> dict[str, dict]:
    """Per mixer: final eval loss and bpb (mean, std, min, max over runs), and the mean curve."""
    summary = {}
    for mixer in runs[0]["runs"]:
        per_run = [r["runs"][mixer] for r in runs]
        stats = {}
        for key in ("eval_loss", "eval_bpb"):
            values = np.array([p[key] for p in per_run])
            stats[key] = dict(
                mean=float(values.mean()),
                std=float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                min=float(values.min()),
                max=float(values.max()),
                values=values.tolist(),
            )
        steps = [s for s, _ in per_run[0]["eval_curve"]]
        curves = np.array([[loss for _, loss in p["eval_curve"]] for p in per_run])
        stats["curve"] = dict(
            step=steps,
            mean=curves.mean(0).tolist(),
            min=curves.min(0).tolist(),
            max=curves.max(0).tolist(),
        )
        stats["median_tokens_per_sec"] = float(
            np.median([p["median_tokens_per_sec"] for p in per_run])
        )
        summary[mixer] = stats
    return summary


def plot(summary: dict[str, dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for i, (mixer, s) in enumerate(summary.items()):
        c = s["curve"]
        mean = np.array(c["mean"])
        err = [mean - np.array(c["min"]), np.array(c["max"]) - mean]
        steps = np.array(c["step"]) + (i - 1) * 1.5  # small offsets keep the bars apart
        ax.errorbar(steps, mean, yerr=err, fmt="o-", capsize=3, label=mixer)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss (nats per byte)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv):
    del argv
    f = flags.FLAGS
    if not f.runs:
        raise cli.UsageError("--runs must name at least one --compare run")
    runs = load_runs(f.runs)
    summary = summarize(runs)
    n = len(runs)
    print(f"held-out loss after the last step, {n} seeds: mean +- std (min-max)")
    print("| model | loss | bits per byte | train tokens/s (median) |")
    print("| --- | ---: | ---: | ---: |")
    for mixer, s in summary.items():
        loss, bpb = s["eval_loss"], s["eval_bpb"]
        print(
            f"| {mixer} | {loss['mean']:.3f} +- {loss['std']:.3f} ({loss['min']:.3f}-"
            f"{loss['max']:.3f}) | {bpb['mean']:.3f} +- {bpb['std']:.3f} | "
            f"{s['median_tokens_per_sec']:,.0f} |"
        )
    os.makedirs(os.path.dirname(f.out) or ".", exist_ok=True)
    with open(f.out, "w") as fh:
        json.dump(
            dict(summary=summary, runs=f.runs, commands=[r["command"] for r in runs],
                 command="python " + " ".join(sys.argv)),
            fh, indent=1,
        )  # fmt: skip
    png = os.path.splitext(f.out)[0] + ".png"
    plot(summary, png, f"held-out loss, {n} seeds (mean, bars: min-max)")
    print(f"wrote {f.out} and {png}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
