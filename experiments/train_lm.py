r"""Train a TransNormerLLM-style byte-level LM with Lightning Attention (or softmax).

Real text with no download: by default the Python standard library's source
files, split by file into train and held-out parts; --data takes any text file
or folder. Everything a run writes goes to --workdir: metrics.jsonl, config.json,
orbax checkpoints, loss.png.

  python experiments/train_lm.py                          # demo preset, ~minutes on 2 CPU cores
  python experiments/train_lm.py --preset=small --workdir=results/small
  python experiments/train_lm.py --resume --workdir=results/train_demo   # continue
  python experiments/train_lm.py --compare --workdir=results/compare     # lightning vs softmax

Data-parallel over all local devices (e.g. XLA_FLAGS=--xla_force_host_platform_device_count=4
on a CPU). --seq_parallel=S also splits every sequence over S devices (mesh data x seq =
devices / S x S; lightning mixer only), for sequences longer than one device holds:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    python experiments/train_lm.py --seq_parallel=4 --seq_len=1024 --batch_size=4

Several hosts (JAX's distributed runtime, one process per host, the same command
on each with its own --process_id; the mesh spans every host's devices, --workdir
must be one directory all hosts see):

  python experiments/train_lm.py --coordinator_address=HOST0:1234 --num_processes=N \
    --process_id=I --workdir=/shared/run
  python experiments/train_lm.py --distributed ...   # TPU pod slice / SLURM: detected
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import jax
from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lm_data  # noqa: E402
import lm_train  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "demo", sorted(lm_train.PRESETS), "Size preset.")
flags.DEFINE_enum("mixer", "lightning", ["lightning", "softmax"], "Token mixer.")
flags.DEFINE_bool("compare", False, "Train both mixers on the same data and budget.")
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
flags.DEFINE_bool(
    "distributed",
    False,
    "Call jax.distributed.initialize (implied by the three flags below; alone: the cluster "
    "(TPU pod slice, SLURM, ...) is detected).",
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator.")
flags.DEFINE_integer("num_processes", None, "Processes in the run (one per host).")
flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.")
flags.DEFINE_integer(
    "heartbeat_timeout_seconds",
    None,
    "Seconds without a heartbeat after which the coordinator declares a process dead and the "
    "others stop with an error (jax's default: 100).",
)

_OVERRIDES = (
    "mixer steps seq_len batch_size num_layers embed_dim num_heads learning_rate warmup_steps "
    "dtype impl seq_parallel seed log_every eval_every checkpoint_every data max_corpus_bytes "
    "workdir"
).split()


def init_distributed() -> None:
    """jax.distributed.initialize from the flags, before anything touches a device."""
    given = {
        name: getattr(FLAGS, name)
        for name in ("coordinator_address", "num_processes", "process_id")
        if getattr(FLAGS, name) is not None
    }
    if not (given or FLAGS.distributed or FLAGS.heartbeat_timeout_seconds is not None):
        return
    if FLAGS.heartbeat_timeout_seconds is not None:
        if FLAGS.heartbeat_timeout_seconds < 1:
            raise app.UsageError(
                f"--heartbeat_timeout_seconds must be >= 1, got {FLAGS.heartbeat_timeout_seconds}"
            )
        given["heartbeat_timeout_seconds"] = FLAGS.heartbeat_timeout_seconds
    if FLAGS.num_processes is not None and FLAGS.num_processes < 1:
        raise app.UsageError(f"--num_processes must be >= 1, got {FLAGS.num_processes}")
    if FLAGS.process_id is not None and FLAGS.num_processes is not None:
        if not 0 <= FLAGS.process_id < FLAGS.num_processes:
            raise app.UsageError(
                f"--process_id must be in [0, --num_processes={FLAGS.num_processes}), "
                f"got {FLAGS.process_id}"
            )
    jax.distributed.initialize(**given)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    init_distributed()
    overrides = {name: getattr(FLAGS, name) for name in _OVERRIDES}
    overrides["resume"] = FLAGS.resume
    if overrides["workdir"] is None:
        overrides["workdir"] = f"results/train_{FLAGS.preset}" + (
            "_compare" if FLAGS.compare else ""
        )
    cfg = lm_train.config_from_preset(FLAGS.preset, **overrides)
    if FLAGS.compare and cfg.seq_parallel > 1:
        raise app.UsageError(
            "--compare trains the softmax mixer too, which has no sequence parallelism; "
            "drop --seq_parallel"
        )
    corpus = lm_data.load_corpus(cfg.data, max_bytes=cfg.max_corpus_bytes)
    if not FLAGS.compare:
        lm_train.train(cfg, corpus)
        if jax.process_index() == 0:
            print(f"wrote {cfg.workdir}/metrics.jsonl and {cfg.workdir}/loss.png")
        return
    runs = {}
    for mixer in ("lightning", "softmax"):
        sub = lm_train.TrainConfig(
            **{**vars(cfg), "mixer": mixer, "workdir": str(Path(cfg.workdir) / mixer)}
        )
        runs[mixer] = lm_train.train(sub, corpus)["records"]
    if jax.process_index() != 0:  # process 0 plots and reports
        return
    out = Path(cfg.workdir) / "compare.png"
    lm_train.plot_losses(runs, out, title="lightning vs softmax, same data and budget")
    for mixer, records in runs.items():
        last = [r for r in records if "eval_loss" in r][-1]
        print(f"{mixer:>9}: held-out loss {last['eval_loss']:.4f} ({last['eval_bpb']:.3f} bpb)")
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
