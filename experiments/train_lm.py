r"""Train a TransNormerLLM-style byte-level LM with Lightning Attention (or softmax).

Real text with no download: by default the Python standard library's source
files, split by file into train and held-out parts; --data takes any text file
or folder. Everything a run writes goes to --workdir: metrics.jsonl, config.json,
orbax checkpoints, loss.png.

  python experiments/train_lm.py                          # demo preset, ~minutes on 2 CPU cores
  python experiments/train_lm.py --preset=small --workdir=results/small
  python experiments/train_lm.py --resume --workdir=results/train_demo   # continue
  python experiments/train_lm.py --compare=lightning,softmax,hybrid --workdir=results/compare
  python experiments/train_lm.py --mixer=hybrid --softmax_every=4 --num_layers=8   # 2 softmax

Data-parallel over all local devices (e.g. XLA_FLAGS=--xla_force_host_platform_device_count=4
on a CPU). --seq_parallel=S also splits every sequence over S devices (mesh data x seq =
devices / S x S; lightning mixer only), for sequences longer than one device holds:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    python experiments/train_lm.py --seq_parallel=4 --seq_len=1024 --batch_size=4
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lm_data  # noqa: E402
import lm_train  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "demo", sorted(lm_train.PRESETS), "Size preset.")
flags.DEFINE_enum("mixer", "lightning", list(lm_train.MIXERS), "Token mixer.")
flags.DEFINE_integer(
    "softmax_every", None, "--mixer=hybrid: every k-th layer softmax, the rest lightning (2)."
)
flags.DEFINE_list(
    "compare", [], "Mixers to train on the same data and budget, e.g. lightning,softmax,hybrid."
)
flags.DEFINE_integer("steps", None, "Training steps (overrides the preset).")
flags.DEFINE_integer("seq_len", None, "Sequence length.")
flags.DEFINE_integer("batch_size", None, "Global batch size (divides by the device count).")
flags.DEFINE_integer("num_layers", None, "Layers.")
flags.DEFINE_integer("embed_dim", None, "Model width.")
flags.DEFINE_integer("num_heads", None, "Heads.")
flags.DEFINE_float("learning_rate", None, "Peak learning rate.")
flags.DEFINE_integer("warmup_steps", None, "Linear warmup steps.")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype (params stay f32).")
flags.DEFINE_string("impl", None, "Lightning op implementation (auto, xla, triton, ...).")
flags.DEFINE_integer(
    "seq_parallel", None, "Devices per sequence (mesh: data = devices / S, seq = S); lightning."
)
flags.DEFINE_integer("seed", None, "Seed of the init and of the batches.")
flags.DEFINE_integer("log_every", None, "Steps between log lines.")
flags.DEFINE_integer("eval_every", None, "Steps between held-out evaluations.")
flags.DEFINE_integer("checkpoint_every", None, "Steps between checkpoints.")
flags.DEFINE_string("data", None, "Text file or folder (default: the Python stdlib sources).")
flags.DEFINE_integer("max_corpus_bytes", None, "Read at most this many corpus bytes.")
flags.DEFINE_string("workdir", None, "Where the run writes everything.")
flags.DEFINE_bool("resume", False, "Continue from the latest checkpoint in --workdir.")

_OVERRIDES = (
    "mixer steps seq_len batch_size num_layers embed_dim num_heads learning_rate warmup_steps "
    "softmax_every dtype impl seq_parallel seed log_every eval_every checkpoint_every data "
    "max_corpus_bytes workdir"
).split()


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    overrides = {name: getattr(FLAGS, name) for name in _OVERRIDES}
    overrides["resume"] = FLAGS.resume
    if overrides["workdir"] is None:
        overrides["workdir"] = f"results/train_{FLAGS.preset}" + (
            "_compare" if FLAGS.compare else ""
        )
    cfg = lm_train.config_from_preset(FLAGS.preset, **overrides)
    bad = [m for m in FLAGS.compare if m not in lm_train.MIXERS]
    if bad or len(set(FLAGS.compare)) != len(FLAGS.compare):
        raise app.UsageError(
            f"--compare takes distinct mixers from {lm_train.MIXERS}, got {FLAGS.compare}"
        )
    if FLAGS.softmax_every is not None and "hybrid" not in (FLAGS.compare or [cfg.mixer]):
        raise app.UsageError("--softmax_every applies to the hybrid mixer only")
    if FLAGS.compare and cfg.seq_parallel > 1 and set(FLAGS.compare) != {"lightning"}:
        raise app.UsageError(
            f"--compare={','.join(FLAGS.compare)} includes softmax layers, which have no "
            "sequence parallelism; drop --seq_parallel"
        )
    corpus = lm_data.load_corpus(cfg.data, max_bytes=cfg.max_corpus_bytes)
    if not FLAGS.compare:
        lm_train.train(cfg, corpus)
        print(f"wrote {cfg.workdir}/metrics.jsonl and {cfg.workdir}/loss.png")
        return
    runs = {}
    for mixer in FLAGS.compare:
        sub = lm_train.TrainConfig(
            **{**vars(cfg), "mixer": mixer, "workdir": str(Path(cfg.workdir) / mixer)}
        )
        runs[mixer] = lm_train.train(sub, corpus)["records"]
    out = Path(cfg.workdir) / "compare.png"
    lm_train.plot_losses(runs, out, title=f"{' vs '.join(runs)}, same data and budget")
    summary = {}
    for mixer, records in runs.items():
        last = [r for r in records if "eval_loss" in r][-1]
        speeds = [r["tokens_per_sec"] for r in records if r["tokens_per_sec"]]
        summary[mixer] = dict(
            eval_loss=last["eval_loss"],
            eval_bpb=last["eval_bpb"],
            eval_curve=[(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r],
            median_tokens_per_sec=float(np.median(speeds)) if speeds else None,
        )
        print(
            f"{mixer:>9}: held-out loss {last['eval_loss']:.4f} ({last['eval_bpb']:.3f} bpb), "
            f"median {summary[mixer]['median_tokens_per_sec'] or 0:,.0f} train tokens/s"
        )
    with open(Path(cfg.workdir) / "compare.json", "w") as f:
        json.dump(dict(command="python " + " ".join(sys.argv), runs=summary), f, indent=1)
    print(f"wrote {out} and {Path(cfg.workdir) / 'compare.json'}")


if __name__ == "__main__":
    app.run(main)
