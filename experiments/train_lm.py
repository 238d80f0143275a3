r"""Train a TransNormerLLM-style byte-level LM with Lightning Attention (or softmax).

Real text with no download: by default the Python standard library's source
files, split by file into train and held-out parts; --data takes any text file
or folder. Everything a run writes goes to --workdir (default runs/train_<preset>,
git-ignored): metrics.jsonl, config.json, orbax checkpoints, loss.png.

  python experiments/train_lm.py                          # demo preset -> runs/train_demo
  python experiments/train_lm.py --preset=small --workdir=runs/small
  python experiments/train_lm.py --resume --steps=1000    # continue the demo run to step 1000
  python experiments/train_lm.py --overwrite              # delete the demo run, start over
  python experiments/train_lm.py --compare=lightning,softmax,hybrid   # same data and budget
  python experiments/train_lm.py --mixer=hybrid --softmax_every=4 --num_layers=8   # 2 softmax
  python experiments/train_lm.py --pack      # whole files packed in rows, with segment ids
  python experiments/train_lm.py --batching=pad   # one file (piece) per row, padded

A workdir that already holds a run is refused unless --resume (continue it from
its latest checkpoint, or from step 0 if it has none yet; the saved config.json
must match the flags except steps, log_every, eval_every, checkpoint_every, impl
and seq_parallel) or --overwrite (delete the run's files there: checkpoints/,
metrics.jsonl, config.json, loss.png; with --compare also compare.png,
compare.json and the sub-runs). --resume on a finished run (a checkpoint at
--steps) says so and changes nothing. A flag mistake exits with status 2 and one
line naming the flag, before any training; every flag is checked before the
workdir is.

Ctrl-C (SIGINT) or SIGTERM during training saves a checkpoint at the current
step, writes loss.png, prints the command that resumes the run and exits with
status 130 (SIGINT) or 143 (SIGTERM); the resumed run's metrics equal an
uninterrupted run's. A second Ctrl-C stops at once.

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

import dataclasses
import json
import os
import shlex
import sys
from pathlib import Path

import jax
import numpy as np
from absl import flags, logging

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lm_data  # noqa: E402
import lm_train  # noqa: E402
from lightning_jax import cli  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum(
    "preset", "demo", sorted(lm_train.PRESETS), "Size preset (what each sets: see the top)."
)
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
flags.DEFINE_enum(
    "batching",
    None,
    list(lm_data.BATCHINGS),
    "Rows of a batch: stream = random windows of the joined files (default); pack = whole "
    "documents (files) end to end with segment ids; pad = one document (piece) per row, padded.",
)
flags.DEFINE_bool("pack", False, "Short for --batching=pack.")
flags.DEFINE_integer("seed", None, "Seed of the init and of the batches.")
flags.DEFINE_integer("log_every", None, "Steps between log lines.")
flags.DEFINE_integer("eval_every", None, "Steps between held-out evaluations.")
flags.DEFINE_integer("checkpoint_every", None, "Steps between checkpoints.")
flags.DEFINE_string("data", None, "Text file or folder (default: the Python stdlib sources).")
flags.DEFINE_integer("max_corpus_bytes", None, "Read at most this many corpus bytes.")
flags.DEFINE_string(
    "workdir", None, "Where the run writes everything (default: runs/train_<preset>[_compare])."
)
flags.DEFINE_bool(
    "resume", False, "Continue the run in --workdir from its latest checkpoint (none: step 0)."
)
flags.DEFINE_bool("overwrite", False, "Delete the run in --workdir first, then start afresh.")
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

# What --compare writes beside its sub-runs.
COMPARE_FILES = ("compare.png", "compare.json")
_OVERRIDES = (
    "mixer steps seq_len batch_size num_layers embed_dim num_heads learning_rate warmup_steps "
    "softmax_every dtype impl seq_parallel batching seed log_every eval_every checkpoint_every "
    "data max_corpus_bytes workdir"
).split()


def describe_presets() -> str:
    """What each preset sets, and the defaults of the fields no preset sets (for --help)."""
    defaults = lm_train.TrainConfig()
    lines = ["", "Presets (a flag overrides the field it names):"]
    for name in sorted(lm_train.PRESETS):
        fields = " ".join(f"{k}={v}" for k, v in lm_train.PRESETS[name].items())
        lines.append(f"  {name}: {fields}")
    preset_fields = set().union(*lm_train.PRESETS.values())
    rest = " ".join(
        f"{k}={getattr(defaults, k)}"
        for k in _OVERRIDES
        if k not in preset_fields and k not in ("workdir", "data", "max_corpus_bytes")
    )
    lines.append(f"  every preset: {rest}")
    return "\n".join(lines) + "\n"


__doc__ += describe_presets()


def init_distributed() -> None:
    """jax.distributed.initialize from the flags, before anything touches a device.

    Raises:
      lm_train.ConfigError: a distributed flag out of range (one line naming it).
    """
    given = {
        name: getattr(FLAGS, name)
        for name in ("coordinator_address", "num_processes", "process_id")
        if getattr(FLAGS, name) is not None
    }
    if not (given or FLAGS.distributed or FLAGS.heartbeat_timeout_seconds is not None):
        return
    if FLAGS.heartbeat_timeout_seconds is not None:
        if FLAGS.heartbeat_timeout_seconds < 1:
            raise lm_train.ConfigError(
                f"--heartbeat_timeout_seconds must be >= 1, got {FLAGS.heartbeat_timeout_seconds}"
            )
        given["heartbeat_timeout_seconds"] = FLAGS.heartbeat_timeout_seconds
    if FLAGS.num_processes is not None and FLAGS.num_processes < 1:
        raise lm_train.ConfigError(f"--num_processes must be >= 1, got {FLAGS.num_processes}")
    if FLAGS.process_id is not None and FLAGS.num_processes is not None:
        if not 0 <= FLAGS.process_id < FLAGS.num_processes:
            raise lm_train.ConfigError(
                f"--process_id must be in [0, --num_processes={FLAGS.num_processes}), "
                f"got {FLAGS.process_id}"
            )
    jax.distributed.initialize(**given)


def config_from_flags() -> lm_train.TrainConfig:
    overrides = {name: getattr(FLAGS, name) for name in _OVERRIDES}
    overrides.update(resume=FLAGS.resume, overwrite=FLAGS.overwrite)
    if FLAGS.pack:
        if FLAGS.batching not in (None, "pack"):
            raise lm_train.ConfigError(
                f"--pack means --batching=pack, which contradicts --batching={FLAGS.batching}"
            )
        overrides["batching"] = "pack"
    if overrides["workdir"] is None:
        overrides["workdir"] = lm_train.default_workdir(FLAGS.preset, bool(FLAGS.compare))
    return lm_train.config_from_preset(FLAGS.preset, **overrides)


def compare_configs(cfg: lm_train.TrainConfig) -> list[lm_train.TrainConfig]:
    """One run per mixer of --compare, each in a sub-folder of cfg.workdir."""
    return [
        dataclasses.replace(cfg, mixer=mixer, workdir=str(Path(cfg.workdir) / mixer))
        for mixer in FLAGS.compare
    ]


def validate_flags(cfg: lm_train.TrainConfig) -> tuple[list[lm_train.TrainConfig], lm_data.Corpus]:
    """Every check of the flags, before any training; returns the runs and their corpus.

    The flags first (fields, then the device count, then the corpus), the workdir
    last: a flag mistake is reported as itself, never as the state of the workdir.

    Raises:
      lm_train.ConfigError: a one-line message naming the flag.
    """
    bad = [m for m in FLAGS.compare if m not in lm_train.MIXERS]
    if bad or len(set(FLAGS.compare)) != len(FLAGS.compare):
        raise lm_train.ConfigError(
            f"--compare takes distinct mixers from {lm_train.MIXERS}, got {FLAGS.compare}"
        )
    if FLAGS.softmax_every is not None and "hybrid" not in (FLAGS.compare or [cfg.mixer]):
        raise lm_train.ConfigError("--softmax_every applies to the hybrid mixer only")
    if FLAGS.compare and cfg.seq_parallel > 1 and set(FLAGS.compare) != {"lightning"}:
        raise lm_train.ConfigError(
            f"--compare={','.join(FLAGS.compare)} includes softmax layers, which have no "
            "sequence parallelism; drop --seq_parallel"
        )
    runs = compare_configs(cfg) if FLAGS.compare else [cfg]
    for run in runs:
        lm_train.validate_config(run)
    # The device count initialises a backend: after the cheap checks. Every process's
    # devices: the mesh spans them all.
    lm_train.validate_config(cfg, num_devices=len(jax.devices()))
    try:
        corpus = lm_data.load_corpus(cfg.data, max_bytes=cfg.max_corpus_bytes)
    except ValueError as err:
        if cfg.max_corpus_bytes is not None:  # the cut, not the data, may be at fault
            raise lm_train.ConfigError(
                f"--max_corpus_bytes={cfg.max_corpus_bytes}: {err}"
            ) from None
        raise lm_train.ConfigError(f"--data: {err}") from None
    lm_train.validate_corpus(cfg, corpus)

    if FLAGS.compare and not FLAGS.resume and not FLAGS.overwrite:
        present = lm_train.run_files(cfg.workdir) + [
            name for name in COMPARE_FILES if (Path(cfg.workdir) / name).exists()
        ]
        if present:
            raise lm_train.ConfigError(
                f"--workdir={cfg.workdir} already holds a run ({', '.join(present)}): pass "
                "--resume to continue it or --overwrite to delete it and start over"
            )
    for run in runs:
        lm_train.check_workdir(run)
    for run in runs:  # last: a refused run leaves no folder behind
        try:
            os.makedirs(run.workdir, exist_ok=True)
        except OSError as err:
            raise lm_train.ConfigError(
                f"--workdir={cfg.workdir}: cannot create {run.workdir} ({err.strerror})"
            ) from None
        if not os.access(run.workdir, os.W_OK):
            raise lm_train.ConfigError(f"--workdir={cfg.workdir}: {run.workdir} is not writable")
    return runs, corpus


def resume_command(argv: list[str]) -> str:
    """The command line that resumes this run: argv with --resume, without --overwrite."""
    drop = {"--overwrite", "--nooverwrite", "--resume", "--noresume"}
    args = [
        a for a in argv[1:] if a not in drop and not a.startswith(("--overwrite=", "--resume="))
    ]
    return shlex.join(["python", argv[0], *args, "--resume"])


def train_one(cfg: lm_train.TrainConfig, corpus: lm_data.Corpus) -> dict:
    """lm_train.train; on a signal, the one line that says how to resume, and exit 128 + signal."""
    try:
        return lm_train.train(cfg, corpus)
    except lm_train.Interrupted as stop:
        if jax.process_index() == 0:
            print(
                f"interrupted at step {stop.step}/{cfg.steps}: saved a checkpoint and "
                f"{cfg.workdir}/loss.png; resume with: {resume_command(sys.argv)}",
                file=sys.stderr,
                flush=True,
            )
        sys.exit(128 + stop.signum)


def main(argv):
    del argv  # cli.run refuses positional arguments
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    try:
        cfg = config_from_flags()
        init_distributed()  # before validate_flags counts the devices
        runs, corpus = validate_flags(cfg)
    except lm_train.ConfigError as err:
        cli.usage_error(str(err))
    lead = jax.process_index() == 0
    if FLAGS.resume and all(lm_train.run_finished(run) for run in runs):
        if lead:
            steps = lm_train.checkpoint_steps(runs[0].workdir)[-1]
            print(
                f"{cfg.workdir}: the run is finished (checkpoint at step {steps} = --steps); "
                "nothing to do (pass a larger --steps to train further)"
            )
        return
    if FLAGS.compare and FLAGS.overwrite:
        for name in COMPARE_FILES:
            (Path(cfg.workdir) / name).unlink(missing_ok=True)
        lm_train.clear_run(cfg.workdir)
    if not FLAGS.compare:
        train_one(cfg, corpus)
        if lead:
            print(f"wrote {cfg.workdir}/metrics.jsonl and {cfg.workdir}/loss.png")
        return
    runs = {run.mixer: train_one(run, corpus)["records"] for run in runs}
    if not lead:  # process 0 plots and reports
        return
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


def run_main(argv):
    """main, with a Ctrl-C before training (imports, corpus, model) one line, exit 130."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("interrupted before training started; nothing was saved", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli.run(run_main)
