r"""Training throughput vs. sequence length: the analogue of the paper's Table 1.

Tokens per second per device (TGS) of one training step of a fixed
TransNormerLLM-style model at sequence lengths from 1K up, with the tokens per
step held constant (batch = tokens_per_step / seq), for the Lightning model and
the softmax baseline, on the current device. Softmax attention is quadratic in
memory on backends without a fused kernel, so it stops at --softmax_max_seq.

  python benchmarks/bench_tgs.py                      # CPU: 1K..64K, 64K tokens per step
  python benchmarks/bench_tgs.py --max_seq=262144 --tokens_per_step=262144

Prints a table, writes JSON and a PNG (TGS against seq, log-log).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import jax
import numpy as np
from absl import flags

from lightning_jax import cli

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
)

import lm_train  # noqa: E402


def measure_tgs(
    mixer: str,
    seqs: list[int],
    tokens_per_step: int,
    *,
    num_layers: int,
    embed_dim: int,
    num_heads: int,
    reps: int,
    dtype: str = "float32",
    impl: str = "auto",
) -> list[dict]:
    """Median TGS of a jitted train step per seq (compile excluded)."""
    rows = []
    devices = len(jax.local_devices())
    for seq in seqs:
        if tokens_per_step % seq or (tokens_per_step // seq) % devices:
            raise ValueError(
                f"tokens_per_step {tokens_per_step} must be a multiple of seq {seq} times the "
                f"{devices} devices"
            )
        cfg = lm_train.TrainConfig(
            mixer=mixer,
            num_layers=num_layers,
            embed_dim=embed_dim,
            num_heads=num_heads,
            seq_len=seq,
            batch_size=tokens_per_step // seq,
            steps=reps + 1,
            dtype=dtype,
            impl=impl,
            plot=False,
        )
        trainer = lm_train.Trainer(cfg)
        data = np.random.default_rng(seq).integers(0, 256, size=tokens_per_step + seq + 1)
        data = data.astype(np.uint8)
        jax.block_until_ready(trainer.step(data, 0))  # compile
        times = []
        for step in range(1, reps + 1):
            batch = trainer.batch(data, step)
            start = time.perf_counter()
            trainer.state, loss = trainer.train_step(trainer.state, *batch)
            jax.block_until_ready(loss)
            times.append(time.perf_counter() - start)
        t = statistics.median(times)
        rows.append(
            dict(
                mixer=mixer,
                seq=seq,
                batch=cfg.batch_size,
                step_s=t,
                tgs=tokens_per_step / t / devices,
            )
        )
    return rows


def plot_tgs(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for mixer in dict.fromkeys(r["mixer"] for r in rows):
        mine = [r for r in rows if r["mixer"] == mixer]
        ax.plot([r["seq"] for r in mine], [r["tgs"] for r in mine], "o-", label=mixer)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length (tokens per step constant)")
    ax.set_ylabel("training tokens / s / device")
    ax.set_title(f"TGS on {jax.devices()[0].device_kind}")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _define_flags():
    flags.DEFINE_integer("min_seq", 1024, "Smallest seq (powers of two).", lower_bound=1)
    flags.DEFINE_integer("max_seq", 65536, "Largest seq.", lower_bound=1)
    flags.DEFINE_integer(
        "softmax_max_seq", 2048, "Largest seq for the softmax baseline.", lower_bound=0
    )
    flags.DEFINE_integer(
        "tokens_per_step", 65536, "Tokens per training step (constant).", lower_bound=1
    )
    flags.DEFINE_integer("num_layers", 2, "Layers of the fixed model.", lower_bound=1)
    flags.DEFINE_integer("embed_dim", 128, "Width of the fixed model.", lower_bound=1)
    flags.DEFINE_integer("num_heads", 4, "Heads of the fixed model.", lower_bound=1)
    flags.DEFINE_integer("reps", 3, "Timed steps per seq (median).", lower_bound=1)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
    flags.DEFINE_string("impl", "auto", "Lightning op implementation.")
    flags.DEFINE_list("mixers", ["lightning", "softmax"], "Models to measure.")
    cli.choice_list("mixers", ("lightning", "softmax"))
    flags.DEFINE_string("out", "runs/bench_tgs.json", "JSON path (PNG beside it).")


def main(argv):
    del argv
    f = flags.FLAGS
    seqs = [s for s in (2**i for i in range(31)) if f.min_seq <= s <= f.max_seq]
    rows = []
    for mixer in f.mixers:
        mixer_seqs = [s for s in seqs if mixer != "softmax" or s <= f.softmax_max_seq]
        rows += measure_tgs(
            mixer,
            mixer_seqs,
            f.tokens_per_step,
            num_layers=f.num_layers,
            embed_dim=f.embed_dim,
            num_heads=f.num_heads,
            reps=f.reps,
            dtype=f.dtype,
            impl=f.impl,
        )
    print(f"TGS (tokens/s/device), {f.tokens_per_step} tokens per step, {jax.devices()[0]}")
    print(f"{'mixer':>10} {'seq':>7} {'batch':>6} {'step s':>8} {'TGS':>10} {'vs first':>9}")
    for r in rows:
        first = next(x for x in rows if x["mixer"] == r["mixer"])
        print(
            f"{r['mixer']:>10} {r['seq']:>7} {r['batch']:>6} {r['step_s']:>8.3f} "
            f"{r['tgs']:>10.0f} {r['tgs'] / first['tgs']:>9.3f}"
        )
    light = [r for r in rows if r["mixer"] == "lightning"]
    if len(light) > 1:
        ratio = light[-1]["tgs"] / light[0]["tgs"]
        print(
            f"[lightning] TGS at {light[-1]['seq']} / at {light[0]['seq']}: {ratio:.3f} "
            "(CPU target: within 10%)"
        )
    result = dict(
        rows=rows,
        config={name: f[name].value for name in f if name in _FLAG_NAMES},
        device=str(jax.devices()[0].device_kind),
        jax=jax.__version__,
        date=time.strftime("%Y-%m-%d"),
        command="python " + " ".join(sys.argv),
    )
    if f.out:
        os.makedirs(os.path.dirname(f.out) or ".", exist_ok=True)
        with open(f.out, "w") as fh:
            json.dump(result, fh, indent=1)
        png = os.path.splitext(f.out)[0] + ".png"
        plot_tgs(rows, png)
        print(f"wrote {f.out} and {png}")


_FLAG_NAMES = (
    "min_seq max_seq softmax_max_seq tokens_per_step num_layers embed_dim num_heads reps dtype "
    "impl mixers"
).split()

if __name__ == "__main__":
    _define_flags()
    cli.run(main)
