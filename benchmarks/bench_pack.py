r"""Packed documents vs one document per row, padded: same data, same budget.

Trains the same model twice per seed, alternating (pack, pad, pack, pad, ...) in
one process: `--batching=pack` (whole files of the corpus end to end in rows,
with segment ids) and `--batching=pad` (each row holds one file or a row-sized
piece of one, padded; no segment ids needed). Same steps, same rows x seq_len
per batch, so the same compute per step; the loss and tokens/s count real
tokens only and the held-out loss is the same stream-window evaluation for both
(see experiments/lm_train.py).

  python benchmarks/bench_pack.py                     # demo preset, 300 steps, seeds 0,1
  python benchmarks/bench_pack.py --steps=100 --seeds=0 --max_corpus_bytes=4000000

Writes --out (JSON): per run the median real tokens/s over the log windows, the
pad fraction of its batches and the final held-out loss; per seed the ratio of
packed to padded tokens/s. The training runs follow each other, so on a shared
machine their speeds see different loads; the throughput figure to quote is the
interleaved timing (--timing_steps): one packed and one padded trainer in one
process, their steps alternating (pack, pad, pack, ...), median seconds per step
and the real tokens of those steps.

  python benchmarks/bench_pack.py --notrain_runs --timing_steps=40   # timing only
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
from absl import flags, logging

from lightning_jax import cli

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(_REPO, "experiments"), os.path.join(_REPO, "tools")]

import lm_data  # noqa: E402
import lm_train  # noqa: E402
from machine_info import cpu_name  # noqa: E402

flags.DEFINE_enum("preset", "demo", sorted(lm_train.PRESETS), "Size preset.")
flags.DEFINE_integer("steps", 300, "Training steps of every run.", lower_bound=1)
flags.DEFINE_list("seeds", ["0", "1"], "Seeds (init and batches); each trains pack and pad.")
cli.int_list("seeds", minimum=0)
flags.DEFINE_integer("seq_len", None, "Sequence length (default: the preset's).", lower_bound=1)
flags.DEFINE_integer("batch_size", None, "Rows per batch (default: the preset's).", lower_bound=1)
flags.DEFINE_integer("eval_every", 100, "Steps between held-out evaluations.", lower_bound=1)
flags.DEFINE_string("data", None, "Text file or folder (default: the Python stdlib sources).")
flags.DEFINE_integer(
    "max_corpus_bytes", None, "Read at most this many corpus bytes.", lower_bound=1
)
flags.DEFINE_string("workdir", "runs/bench_pack", "Where the runs write (overwritten).")
flags.DEFINE_bool("train_runs", True, "Train the pack and pad runs of every seed.")
flags.DEFINE_integer(
    "timing_steps", 30, "Interleaved timed steps per mode (0: none).", lower_bound=0
)
flags.DEFINE_string("out", "runs/pack_vs_pad.json", "The JSON summary.")
FLAGS = flags.FLAGS


def summarize(records: list[dict]) -> dict:
    """Median real tokens/s and mean pad fraction over the log windows; final held-out loss."""
    windows = [r for r in records if r["tokens_per_sec"]]
    evals = [r for r in records if "eval_loss" in r]
    return dict(
        median_tokens_per_sec=statistics.median(r["tokens_per_sec"] for r in windows),
        pad_fraction=statistics.fmean(r["pad_fraction"] for r in windows),
        eval_loss=evals[-1]["eval_loss"],
        eval_curve=[(r["step"], r["eval_loss"]) for r in evals],
    )


def interleaved_timing(configs: dict, corpus: lm_data.Corpus, steps: int) -> dict:
    """Steps of one trainer per config, alternating; median s/step and real tokens/s of each.

    configs: {name: TrainConfig}. The first step of each (the compile) is not timed.
    """
    trainers = {name: lm_train.Trainer(cfg) for name, cfg in configs.items()}
    data = {name: lm_train.training_data(cfg, corpus) for name, cfg in configs.items()}
    seconds = {name: [] for name in configs}
    tokens = {name: 0 for name in configs}
    for step in range(steps + 1):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            jax.block_until_ready(trainer.step(data[name], step))
            if step:
                seconds[name].append(time.perf_counter() - start)
                tokens[name] += lm_train.real_tokens(configs[name], data[name], step)
    out = {}
    for name in configs:
        median = statistics.median(seconds[name])
        out[name] = dict(
            median_seconds_per_step=median,
            real_tokens_per_step=tokens[name] / steps,
            real_tokens_per_sec=tokens[name] / steps / median,
        )
    return out


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO
    corpus = lm_data.load_corpus(FLAGS.data, max_bytes=FLAGS.max_corpus_bytes)
    runs, ratios, configs = {}, {}, {}
    for seed in [int(s) for s in FLAGS.seeds]:
        for batching in ("pack", "pad"):
            cfg = lm_train.config_from_preset(
                FLAGS.preset,
                batching=batching,
                seed=seed,
                steps=FLAGS.steps,
                eval_every=FLAGS.eval_every,
                checkpoint_every=FLAGS.steps,
                seq_len=FLAGS.seq_len,
                batch_size=FLAGS.batch_size,
                data=FLAGS.data,
                max_corpus_bytes=FLAGS.max_corpus_bytes,
                workdir=str(Path(FLAGS.workdir) / f"{batching}_seed{seed}"),
                overwrite=True,
                plot=False,
            )
            lm_train.validate_config(cfg, num_devices=len(jax.devices()))
            lm_train.validate_corpus(cfg, corpus)
            configs[batching] = cfg
            if FLAGS.train_runs:
                records = lm_train.train(cfg, corpus)["records"]
                runs[f"{batching}_seed{seed}"] = summarize(records)
        if not FLAGS.train_runs:
            continue
        packed, padded = runs[f"pack_seed{seed}"], runs[f"pad_seed{seed}"]
        ratios[seed] = packed["median_tokens_per_sec"] / padded["median_tokens_per_sec"]
        print(
            f"seed {seed}: real tokens/s packed/padded {ratios[seed]:.3f}; padding "
            f"{padded['pad_fraction']:.2%} (padded) vs {packed['pad_fraction']:.2%} (packed); "
            f"held-out loss packed {packed['eval_loss']:.4f}, padded {padded['eval_loss']:.4f}",
            flush=True,
        )
    timing = None
    if FLAGS.timing_steps:
        timing = interleaved_timing(configs, corpus, FLAGS.timing_steps)
        timing["ratio_packed_over_padded"] = (
            timing["pack"]["real_tokens_per_sec"] / timing["pad"]["real_tokens_per_sec"]
        )
        timing["step_time_ratio_packed_over_padded"] = (
            timing["pack"]["median_seconds_per_step"] / timing["pad"]["median_seconds_per_step"]
        )
        print(
            f"interleaved timing, {FLAGS.timing_steps} steps each: real tokens/s packed/padded "
            f"{timing['ratio_packed_over_padded']:.3f}; seconds per step packed/padded "
            f"{timing['step_time_ratio_packed_over_padded']:.3f}",
            flush=True,
        )
    summary = dict(
        command="python " + " ".join(sys.argv),
        machine=cpu_name(),
        jax=jax.__version__,
        corpus=dict(
            source=corpus.source, train_bytes=int(corpus.train.size), files=corpus.num_files
        ),
        seq_len=cfg.seq_len,
        batch_size=cfg.batch_size,
        steps=FLAGS.steps,
        corpus_pad_fraction={
            mode: lm_train.training_data(c, corpus).pad_fraction for mode, c in configs.items()
        },
        tokens_per_sec_ratio_packed_over_padded=ratios,
        interleaved_timing=timing,
        runs=runs,
    )
    Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    cli.run(main)
