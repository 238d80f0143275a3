"""Training of a TransNormerLLM-style byte-level language model (library part).

`train(cfg)` builds the model (`lightning_jax.models.TransNormerLM`), an optax
AdamW with warmup + cosine decay and gradient clipping, and a jitted train step
that is data-parallel over all local devices (a `jax.sharding.Mesh` over a
"data" axis: the batch is sharded, the parameters replicated). With
`seq_parallel=S > 1` the mesh is (data = devices / S, seq = S): the token batch
is sharded over both axes (`P("data", "seq")`), each lightning layer runs its op
sequence-parallel over "seq", so one sequence may be longer than a device holds. It logs to the
terminal and to `metrics.jsonl`, evaluates held-out loss and bits per byte,
saves and resumes orbax checkpoints, and plots the loss curves.

Batches are a pure function of (seed, step), so a resumed run reproduces an
uninterrupted one exactly. `batching` picks how rows are cut from the corpus:
"stream" (the default) samples random windows of the joined files; "pack" lays
whole documents (files) end to end in rows with segment ids, so no token sees
another document (`lm_data.DocumentRows`); "pad" puts (a row-sized piece of) one
document in each row, padded. In "pack" and "pad" the loss is the mean over real
tokens only (pad positions weigh 0) and tokens/s counts real tokens; the held-out
loss is the same stream-window evaluation in every mode. The command-line front
end is `train_lm.py`; its flags are the `TrainConfig` fields of the same names, so the errors of
`validate_config` and `check_workdir` name the flag (`--steps`, `--resume`).

A run directory is never mixed: `train` refuses a workdir that already holds a
run unless `resume` (continue it: the saved config must match, see
`RESUME_MAY_DIFFER`) or `overwrite` (delete what a run writes there, then start
afresh) is set.

Multi-process (one process per host, after `jax.distributed.initialize`): the
mesh spans `jax.devices()`, all processes' devices; each process loads only the
block of every batch its devices hold (`lm_data.sample_batch_shard`) and the
global batch is assembled with `jax.make_array_from_process_local_data`; every
process runs every step and saves/restores its shards of the orbax checkpoints;
process 0 alone prints, writes metrics.jsonl and config.json, and plots.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import lm_data
from lightning_jax.models import TransNormerConfig, TransNormerLM


@dataclasses.dataclass
class TrainConfig:
    """Everything one run depends on. Presets in PRESETS; flags override fields."""

    mixer: str = "lightning"  # "lightning", "softmax" or "hybrid" (see softmax_every)
    softmax_every: int = 2  # mixer="hybrid": every k-th layer softmax, the rest lightning
    num_layers: int = 2
    embed_dim: int = 128
    num_heads: int = 4
    seq_len: int = 256
    batch_size: int = 8
    steps: int = 300
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    dtype: str = "float32"  # compute dtype; parameters stay float32
    impl: str = "auto"
    seq_parallel: int = 1  # devices per sequence (the "seq" mesh axis); lightning mixer only
    batching: str = "stream"  # "stream", "pack" or "pad": see lm_data.BATCHINGS and the top
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 100
    data: str | None = None  # None: the Python standard library sources
    max_corpus_bytes: int | None = None
    workdir: str = "runs/train_demo"  # runs/ is git-ignored
    resume: bool = False  # continue the run in workdir (there must be one)
    overwrite: bool = False  # delete the run in workdir first
    plot: bool = True


MIXERS = ("lightning", "softmax", "hybrid")
# What a resumed run may change: how long it runs (steps: the cosine schedule then decays
# over the new total from the resumed step on), how often it logs, evaluates and saves,
# which implementation of the same op runs and how the batch is laid out over devices, and
# the run-control switches. Everything else (model, optimizer, data, seed, batch shape,
# dtype) must equal the saved run's, or its weights would continue under another config.
RESUME_MAY_DIFFER = frozenset(
    {"steps", "log_every", "eval_every", "checkpoint_every", "impl", "seq_parallel"}
    | {"workdir", "resume", "overwrite", "plot"}
)
# What a run writes into its workdir; `overwrite` deletes exactly these, nothing else.
RUN_FILES = ("checkpoints", "metrics.jsonl", "config.json", "loss.png")


def default_workdir(preset: str = "demo", compare: bool = False) -> str:
    """runs/train_<preset>[_compare]: under runs/, which .gitignore ignores."""
    return f"runs/train_{preset}" + ("_compare" if compare else "")


class ConfigError(ValueError):
    """A field of TrainConfig (a flag of train_lm.py) or the workdir is unusable."""


PRESETS: dict[str, dict[str, Any]] = {
    # Runs on 2 CPU cores in a few minutes: the README's main command.
    "demo": dict(
        num_layers=2,
        embed_dim=128,
        num_heads=4,
        seq_len=256,
        batch_size=16,
        steps=500,
        eval_every=100,
        checkpoint_every=250,
    ),
    "small": dict(
        num_layers=6,
        embed_dim=384,
        num_heads=6,
        seq_len=1024,
        batch_size=16,
        steps=5000,
        learning_rate=1e-3,
        warmup_steps=200,
        eval_every=500,
        checkpoint_every=500,
    ),
    "base": dict(
        num_layers=12,
        embed_dim=768,
        num_heads=12,
        seq_len=2048,
        batch_size=32,
        steps=20000,
        learning_rate=6e-4,
        warmup_steps=1000,
        eval_every=1000,
        checkpoint_every=1000,
    ),
}


def config_from_preset(preset: str, **overrides) -> TrainConfig:
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    fields = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    return TrainConfig(**fields)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def validate_config(cfg: TrainConfig, num_devices: int | None = None) -> None:
    """Checks every field a flag sets before any work; errors name the flag.

    Args:
      cfg: the run's config.
      num_devices: the local device count, for the mesh checks (seq_parallel, batch
        divisibility); None skips them (`Trainer` checks its mesh again).

    Raises:
      ConfigError: the first unusable field, as a one-line message naming `--field`.
    """
    for name in (
        "steps batch_size seq_len num_layers embed_dim num_heads log_every eval_every "
        "eval_batches checkpoint_every seq_parallel"
    ).split():
        value = getattr(cfg, name)
        if not _is_int(value) or value < 1:
            raise ConfigError(f"--{name} must be a positive integer, got {value!r}")
    if cfg.embed_dim % cfg.num_heads:
        raise ConfigError(
            f"--num_heads={cfg.num_heads} must divide --embed_dim={cfg.embed_dim} "
            "(each head gets embed_dim / num_heads features)"
        )
    if not (isinstance(cfg.learning_rate, (int, float)) and 0 < cfg.learning_rate < math.inf):
        raise ConfigError(f"--learning_rate must be positive and finite, got {cfg.learning_rate!r}")
    if not _is_int(cfg.warmup_steps) or cfg.warmup_steps < 0:
        raise ConfigError(f"--warmup_steps must be an integer >= 0, got {cfg.warmup_steps!r}")
    if not _is_int(cfg.seed) or cfg.seed < 0:  # numpy's default_rng takes seeds >= 0
        raise ConfigError(f"--seed must be an integer >= 0, got {cfg.seed!r}")
    if cfg.max_corpus_bytes is not None and (
        not _is_int(cfg.max_corpus_bytes) or cfg.max_corpus_bytes < 1
    ):
        raise ConfigError(
            f"--max_corpus_bytes must be a positive integer, got {cfg.max_corpus_bytes!r}"
        )
    if cfg.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"--dtype must be float32 or bfloat16, got {cfg.dtype!r}")
    if cfg.mixer not in MIXERS:
        raise ConfigError(f"--mixer must be one of {MIXERS}, got {cfg.mixer!r}")
    if cfg.batching not in lm_data.BATCHINGS:
        raise ConfigError(f"--batching must be one of {lm_data.BATCHINGS}, got {cfg.batching!r}")
    if cfg.mixer == "hybrid" and (not _is_int(cfg.softmax_every) or cfg.softmax_every < 1):
        raise ConfigError(f"--softmax_every must be a positive integer, got {cfg.softmax_every!r}")
    if cfg.mixer in ("lightning", "hybrid"):
        from lightning_jax import available_impls

        if cfg.impl not in available_impls():
            raise ConfigError(f"--impl must be one of {available_impls()}, got {cfg.impl!r}")
    if cfg.data is not None:
        if not cfg.data:
            raise ConfigError("--data must name a text file or folder, got ''")
        if not Path(cfg.data).exists():
            raise ConfigError(f"--data={cfg.data} does not exist")
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: continue or start over")
    sp = cfg.seq_parallel
    if sp > 1 and cfg.mixer != "lightning":
        raise ConfigError(f"--seq_parallel={sp} needs --mixer=lightning, got {cfg.mixer}")
    if cfg.seq_len % sp:
        raise ConfigError(f"--seq_len={cfg.seq_len} must divide by --seq_parallel={sp}")
    if num_devices is not None:
        if sp > num_devices:
            raise ConfigError(
                f"--seq_parallel={sp} is larger than the {num_devices} local device(s)"
            )
        if num_devices % sp:
            raise ConfigError(
                f"--seq_parallel={sp} must divide the {num_devices} local devices "
                "(mesh: data = devices / seq_parallel, seq = seq_parallel)"
            )
        if cfg.batch_size % (num_devices // sp):
            raise ConfigError(
                f"--batch_size={cfg.batch_size} must divide by the {num_devices // sp} devices "
                "of the data axis (local devices / seq_parallel)"
            )


def corpus_source(cfg: TrainConfig, corpus: lm_data.Corpus) -> str:
    """The flags the corpus came from, for error messages: --data (and --max_corpus_bytes)."""
    source = f"--data ({corpus.source})"
    if cfg.max_corpus_bytes is not None:
        source += f" read up to --max_corpus_bytes={cfg.max_corpus_bytes}"
    return source


def validate_corpus(cfg: TrainConfig, corpus: lm_data.Corpus) -> None:
    """Checks that the corpus holds one training window and one evaluation batch."""
    if corpus.train.size < cfg.seq_len + 1:
        raise ConfigError(
            f"--seq_len={cfg.seq_len} needs {cfg.seq_len + 1} train bytes; the train part of "
            f"{corpus_source(cfg, corpus)} has {corpus.train.size}"
        )
    eval_bytes = cfg.batch_size * (cfg.seq_len + 1)
    if corpus.held_out.size < eval_bytes:
        raise ConfigError(
            f"one evaluation batch of --batch_size={cfg.batch_size} x (--seq_len + 1) needs "
            f"{eval_bytes} held-out bytes; the held-out part of {corpus_source(cfg, corpus)} "
            f"has {corpus.held_out.size}"
        )
    if cfg.batching != "stream":
        try:
            training_data(cfg, corpus)
        except ValueError as err:
            raise ConfigError(f"--batching={cfg.batching}: {err}") from None


def training_data(cfg: TrainConfig, corpus: lm_data.Corpus) -> np.ndarray | lm_data.DocumentRows:
    """What `Trainer.step` draws batches from: the train bytes ("stream") or document rows."""
    if cfg.batching == "stream":
        return corpus.train
    return lm_data.DocumentRows(
        corpus.train, corpus.train_docs, cfg.seq_len, pack=cfg.batching == "pack"
    )


def run_files(workdir: str | os.PathLike) -> list[str]:
    """The RUN_FILES present in workdir (an empty list: nothing of a run is there)."""
    return [name for name in RUN_FILES if (Path(workdir) / name).exists()]


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
    """Steps of the finished orbax checkpoints in workdir/checkpoints, ascending."""
    root = Path(workdir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def config_differences(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """'field saved -> now' for every field outside RESUME_MAY_DIFFER that differs.

    A field missing from `saved` (written by an older version) counts as its default.
    """
    now = json.loads(json.dumps(dataclasses.asdict(cfg)))
    defaults = json.loads(json.dumps(dataclasses.asdict(TrainConfig())))
    diffs = []
    for name in sorted(set(saved) | set(now)):
        if name in RESUME_MAY_DIFFER:
            continue
        before, after = saved.get(name, defaults.get(name)), now.get(name, "(unknown field)")
        if before != after:
            diffs.append(f"{name} {before!r} -> {after!r}")
    return diffs


def check_workdir(cfg: TrainConfig) -> None:
    """Refuses to mix runs in cfg.workdir; touches nothing (`prepare_workdir` clears).

    Without resume, a workdir holding any of RUN_FILES is refused unless overwrite;
    with resume the latest checkpoint (if any: without one the run starts from
    step 0 there) must be at or below cfg.steps, and a saved config.json must
    equal cfg outside RESUME_MAY_DIFFER.

    Raises:
      ConfigError: a one-line message naming --workdir, --resume or --overwrite.
    """
    workdir = cfg.workdir
    if not cfg.resume:
        present = run_files(workdir)
        if present and not cfg.overwrite:
            raise ConfigError(
                f"--workdir={workdir} already holds a run ({', '.join(present)}): pass "
                "--resume to continue it or --overwrite to delete it and start over"
            )
        return
    steps = checkpoint_steps(workdir)
    if steps and steps[-1] > cfg.steps:
        raise ConfigError(
            f"--steps={cfg.steps} is below the step {steps[-1]} of the checkpoint to resume from"
        )
    config_path = Path(workdir) / "config.json"
    if not config_path.exists():
        if not steps:  # nothing of a run to continue: resume starts it from step 0
            return
        raise ConfigError(
            f"--resume: {config_path} is missing, so the run's config cannot be checked "
            "(pass --overwrite to start over)"
        )
    with open(config_path) as f:
        saved = json.load(f)
    diffs = config_differences(saved, cfg)
    if diffs:
        raise ConfigError(
            f"--resume: the flags differ from the run saved in {workdir}: {'; '.join(diffs)} "
            f"(only {', '.join(sorted(RESUME_MAY_DIFFER - {'workdir', 'resume', 'overwrite'}))} "
            "may change on resume)"
        )


def clear_run(workdir: str | os.PathLike) -> None:
    """Deletes the RUN_FILES in workdir, nothing else (workdir may hold other things)."""
    for name in run_files(workdir):
        path = Path(workdir) / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def prepare_workdir(cfg: TrainConfig) -> None:
    """`check_workdir`, then with overwrite deletes the previous run; creates workdir."""
    check_workdir(cfg)
    if cfg.overwrite and not cfg.resume:
        clear_run(cfg.workdir)
    os.makedirs(cfg.workdir, exist_ok=True)


def model_config(cfg: TrainConfig, mesh: Mesh | None = None) -> TransNormerConfig:
    """The model of cfg; with cfg.seq_parallel > 1, sequence-parallel over mesh's "seq" axis.

    mixer="hybrid" is a lightning stack with every cfg.softmax_every-th layer softmax.
    """
    if cfg.mixer not in MIXERS:
        raise ValueError(f"mixer must be one of {MIXERS}, got {cfg.mixer!r}")
    sp = dict(mesh=mesh, seq_axis="seq", batch_axis="data") if cfg.seq_parallel > 1 else {}
    hybrid = cfg.mixer == "hybrid"
    return TransNormerConfig(
        vocab_size=lm_data.VOCAB_SIZE,
        num_layers=cfg.num_layers,
        embed_dim=cfg.embed_dim,
        num_heads=cfg.num_heads,
        mixer="lightning" if hybrid else cfg.mixer,
        softmax_every=cfg.softmax_every if hybrid else 0,
        max_seq_len=cfg.seq_len,
        impl=cfg.impl,
        dtype=jnp.dtype(cfg.dtype),
        **sp,
    )


def make_mesh(cfg: TrainConfig, devices=None) -> Mesh:
    """("data",) over the devices, or ("data", "seq") with seq = cfg.seq_parallel > 1.

    devices: default `jax.devices()`, every process's devices (the local ones in a
    single-process run), in jax's order: by process, so "seq" groups the devices of
    one host where seq_parallel divides its device count, and spans hosts otherwise.
    """
    devices = np.array(jax.devices() if devices is None else devices)
    sp = cfg.seq_parallel
    if isinstance(sp, bool) or not isinstance(sp, (int, np.integer)) or sp < 1:
        raise ValueError(f"seq_parallel must be a positive int, got {sp!r}")
    if sp == 1:
        return Mesh(devices, ("data",))
    if devices.size % sp:
        raise ValueError(
            f"the {devices.size} devices must divide by seq_parallel {sp} "
            "(mesh: data = devices / seq_parallel, seq = seq_parallel)"
        )
    return Mesh(devices.reshape(devices.size // sp, sp), ("data", "seq"))


def _check_mesh(cfg: TrainConfig, mesh: Mesh) -> None:
    if "data" not in mesh.axis_names:
        raise ValueError(f'the mesh needs a "data" axis, got axes {tuple(mesh.axis_names)}')
    extra = set(mesh.axis_names) - {"data", "seq"}
    if extra:
        raise ValueError(f'mesh axes must be "data" and optionally "seq", got {mesh.axis_names}')
    n_seq = mesh.shape.get("seq", 1)
    if n_seq != cfg.seq_parallel:
        raise ValueError(
            f'seq_parallel {cfg.seq_parallel} must equal the {n_seq} devices of the mesh\'s "seq" '
            "axis"
        )
    if cfg.seq_parallel > 1 and cfg.mixer != "lightning":
        raise ValueError(
            f"seq_parallel {cfg.seq_parallel} needs mixer='lightning' (sequence parallelism "
            f"is implemented for the lightning op), got mixer={cfg.mixer!r}"
        )
    if cfg.seq_len % n_seq:
        raise ValueError(
            f"seq_len {cfg.seq_len} must divide by the {n_seq} devices of the seq axis "
            "(seq_parallel)"
        )


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=min(cfg.warmup_steps, max(cfg.steps - 1, 1)),
        decay_steps=max(cfg.steps, 2),
        end_value=cfg.learning_rate * 0.1,
    )
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=cfg.weight_decay),
    )


class Trainer:
    """The model split into (graphdef, params, constants) and the jitted steps."""

    def __init__(self, cfg: TrainConfig, mesh: Mesh | None = None):
        """mesh: ("data",) or ("data", "seq") with seq = cfg.seq_parallel (None: `make_mesh`)."""
        self.cfg = cfg
        self.mesh = mesh or make_mesh(cfg)
        _check_mesh(cfg, self.mesh)
        n_data = self.mesh.shape["data"]
        if cfg.batch_size % n_data:
            raise ValueError(
                f"batch_size {cfg.batch_size} must divide by the {n_data} devices of the data axis"
            )
        model = TransNormerLM(model_config(cfg, self.mesh), rngs=nnx.Rngs(cfg.seed))
        # Params train; the rest (per-layer slopes, caches) are constants of the step.
        self.graphdef, params, self.constants = nnx.split(model, nnx.Param, ...)
        self.optimizer = make_optimizer(cfg)
        # Tokens [B, T]: the batch over "data", the sequence over "seq" (if any).
        seq = "seq" if "seq" in self.mesh.axis_names else None
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec("data", seq))
        # The block of every [B, T] token batch that this process's devices hold.
        self.local_rows, self.local_tokens = process_local_block(
            self.batch_sharding, (cfg.batch_size, cfg.seq_len)
        )
        replicated = NamedSharding(self.mesh, PartitionSpec())
        state = dict(params=params, opt_state=self.optimizer.init(params))
        # One sharding for the state in and out, so the second step reuses the first's compile.
        self.state = jax.device_put(state, replicated)
        self.train_step = jax.jit(
            self._train_step, donate_argnums=0, out_shardings=(replicated, replicated)
        )
        self.masked_train_step = jax.jit(
            functools.partial(self._train_step, loss_fn=self._masked_loss),
            donate_argnums=0,
            out_shardings=(replicated, replicated),
        )
        self.eval_step = jax.jit(self._loss)

    def _loss(self, params, inputs, targets):
        return self.token_losses(params, inputs, targets).mean()

    def token_losses(self, params, inputs, targets, segment_ids=None):
        """Per-token cross entropy `[B, T]` of int inputs, targets (and segment_ids) `[B, T]`."""
        model = nnx.merge(self.graphdef, params, self.constants)
        logits = model(inputs, segment_ids=segment_ids).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets)

    def _masked_loss(self, params, inputs, targets, segment_ids, weights):
        """Mean cross entropy over the positions of weight 1 (the real tokens) of `[B, T]`."""
        losses = self.token_losses(params, inputs, targets, segment_ids)
        return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)

    def _train_step(self, state, *batch, loss_fn=None):
        loss_fn = loss_fn or self._loss
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], *batch)
        updates, opt_state = self.optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return dict(params=params, opt_state=opt_state), loss

    def _global(self, local: np.ndarray) -> jax.Array:
        """This process's block [rows, tokens] -> the global [B, T] array (all processes)."""
        return jax.make_array_from_process_local_data(
            self.batch_sharding, local, (self.cfg.batch_size, self.cfg.seq_len)
        )

    def batch(self, data: np.ndarray | lm_data.DocumentRows, step: int):
        """Global (inputs, targets) [B, T] of the step; this process loads only its block.

        data: the train bytes (stream windows) or `lm_data.DocumentRows`; from the
        latter (inputs, targets, segment_ids, weights), segment_ids None for
        one-document-per-row padding (the pads trail the document: causality alone
        keeps them out of its outputs, as for a user without segment ids).
        """
        if isinstance(data, lm_data.DocumentRows):
            inputs, targets, segment_ids, weights = data.batch_shard(
                self.cfg.batch_size, self.cfg.seed, step, self.local_rows, self.local_tokens
            )
            return (
                self._global(inputs),
                self._global(targets),
                self._global(segment_ids) if data.pack else None,
                self._global(weights),
            )
        inputs, targets = lm_data.sample_batch_shard(
            data,
            self.cfg.batch_size,
            self.cfg.seq_len,
            self.cfg.seed,
            step,
            self.local_rows,
            self.local_tokens,
        )
        return self._global(inputs), self._global(targets)

    def step(self, data: np.ndarray | lm_data.DocumentRows, step: int) -> float:
        batch = self.batch(data, step)
        train_step = self.train_step if len(batch) == 2 else self.masked_train_step
        self.state, loss = train_step(self.state, *batch)
        return loss

    def evaluate(self, held_out: np.ndarray) -> float:
        block = (self.local_rows, self.local_tokens)
        losses = [
            float(
                self.eval_step(self.state["params"], self._global(x[block]), self._global(y[block]))
            )
            for x, y in lm_data.eval_batches(
                held_out, self.cfg.batch_size, self.cfg.seq_len, self.cfg.eval_batches
            )
        ]
        return float(np.mean(losses))


def process_local_block(sharding: NamedSharding, shape: tuple[int, int]) -> tuple[slice, slice]:
    """(rows, tokens): the block of a [B, T] array that this process's devices hold.

    The union of the process's shards must be one rectangle (it is for meshes
    built from `jax.devices()` in order); a process holding scattered pieces
    would need a gather of its own, so that raises.
    """
    shards = {  # distinct (start, stop) per dimension; replicas hold the same one
        tuple(part.indices(size)[:2] for part, size in zip(index, shape))
        for index in sharding.addressable_devices_indices_map(shape).values()
    }
    block = [slice(min(d[0] for d in dims), max(d[1] for d in dims)) for dims in zip(*shards)]
    volume = math.prod(part.stop - part.start for part in block)
    if sum(math.prod(stop - start for start, stop in shard) for shard in shards) != volume:
        raise ValueError(
            f"the devices of process {jax.process_index()} hold scattered pieces of the "
            f"{list(shape)} batch, not one block; order the mesh's devices by process"
        )
    return block[0], block[1]


def _checkpoint_manager(workdir: str):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        Path(workdir).absolute() / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
    )


def _save(manager, step: int, state) -> None:
    import orbax.checkpoint as ocp

    manager.save(step, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()


def _restore(manager, state):
    import orbax.checkpoint as ocp

    step = manager.latest_step()
    if step is None:  # no checkpoint yet: the run starts from step 0
        return 0, state
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    return step, manager.restore(step, args=ocp.args.StandardRestore(abstract))


class LoadedRun(NamedTuple):
    """A trained run restored by `load_run`."""

    model: TransNormerLM  # the run's model with the checkpoint's parameters
    config: TrainConfig  # the run's config.json (seq_parallel 1: one device)
    step: int  # the training step of the restored checkpoint


def load_run(workdir: str | os.PathLike, step: int | None = None) -> LoadedRun:
    """Restores a `train_lm.py` run: its config and the parameters of a checkpoint.

    Rebuilds the run's `TransNormerLM` from `workdir/config.json` on the default
    device (a sequence-parallel run comes back as the plain model: the weights
    are the same) and loads the parameters of the latest checkpoint in
    `workdir/checkpoints` (or of `step`). The model decodes with
    `lightning_jax.generate`; inputs are byte ids `[B, T]` (`lm_data.VOCAB_SIZE`
    = 256), outputs logits `[B, T, 256]`.

    Args:
      workdir: the --workdir of a `train_lm.py` run (one run, not a --compare folder).
      step: the checkpoint's step (None: the latest).

    Returns:
      `LoadedRun(model, config, step)`.

    Raises:
      ValueError: workdir holds no run (no config.json), no checkpoint, or no
        checkpoint at `step`.
    """
    import orbax.checkpoint as ocp

    workdir = Path(workdir)
    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{workdir} holds no train_lm.py run (no config.json)")
    saved = json.loads(config_path.read_text())
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    fields = {k: v for k, v in saved.items() if k in known}
    cfg = TrainConfig(**{**fields, "seq_parallel": 1, "resume": False, "overwrite": False})
    steps = checkpoint_steps(workdir)
    if not steps:
        raise ValueError(f"{workdir} holds no checkpoint yet (in {workdir / 'checkpoints'})")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"{workdir} holds no checkpoint at step {step}; it has steps {steps}")
    model = TransNormerLM(model_config(cfg), rngs=nnx.Rngs(cfg.seed))
    graphdef, params, constants = nnx.split(model, nnx.Param, ...)
    state = dict(params=params, opt_state=make_optimizer(cfg).init(params))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    options = ocp.CheckpointManagerOptions(create=False)  # reads only
    with ocp.CheckpointManager(workdir.absolute() / "checkpoints", options=options) as manager:
        restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    return LoadedRun(nnx.merge(graphdef, restored["params"], constants), cfg, step)


def sample_text(
    model: TransNormerLM,
    prompt: str,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
) -> str:
    """Continues `prompt` with a byte-level model (`load_run`'s): greedy at temperature 0.

    The prompt's UTF-8 bytes are the tokens `[1, P]`; the generated bytes are
    decoded as UTF-8 (an invalid sequence, as a small model may emit, becomes U+FFFD).

    Returns:
      The prompt followed by the generated text.

    Raises:
      ValueError: an empty prompt, or a bad max_new_tokens, temperature or top_k.
    """
    from lightning_jax.generation import generate

    data = prompt.encode("utf-8")
    if not data:
        raise ValueError("prompt must hold at least one character")
    sampling = temperature != 0
    out = generate(
        model,
        jnp.asarray(np.frombuffer(data, np.uint8)[None], jnp.int32),
        max_new_tokens,
        temperature=temperature,
        top_k=top_k if sampling else None,
        rng=jax.random.key(seed) if sampling else None,
    )
    return bytes(np.asarray(out[0], np.uint8)).decode("utf-8", errors="replace")


def _sync(name: str) -> None:
    """A barrier across processes (nothing to wait for in a single-process run)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"lm_train: {name}")


class Interrupted(Exception):  # noqa: N818 (not an error: a requested stop)
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint at `step`.

    Attributes:
      step: the step of the saved checkpoint (a resumed run continues from it).
      signum: the signal that stopped the run.
      workdir: the run's directory.
    """

    def __init__(self, step: int, signum: int, workdir: str):
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}")
        self.step, self.signum, self.workdir = step, signum, workdir


class _StopSignals:
    """While active, SIGINT and SIGTERM set `signum` instead of stopping the process.

    The training loop checks it between steps, saves and stops. A second signal
    gets the previous handlers back (a second Ctrl-C stops at once). Outside the
    main thread (where Python cannot install handlers) nothing is caught.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    @contextlib.contextmanager
    def active(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.getsignal(sig) for sig in self.SIGNALS}
            for sig in self.SIGNALS:
                signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            self._restore()

    def stop_now(self, check_processes: bool) -> bool:
        """Whether to stop; with several processes, whether any process was signalled
        (a collective: every process must call it at the same step)."""
        if jax.process_count() == 1:
            return self.signum is not None
        if not check_processes:
            return False
        flags = multihost_utils.process_allgather(np.int32(self.signum or 0))
        if self.signum is None and np.any(flags):
            self.signum = int(np.max(flags))
        return self.signum is not None


def run_finished(cfg: TrainConfig) -> bool:
    """Whether cfg.workdir holds a checkpoint at step cfg.steps (a resume has nothing to do)."""
    steps = checkpoint_steps(cfg.workdir)
    return bool(steps) and steps[-1] == cfg.steps


def train(cfg: TrainConfig, corpus: lm_data.Corpus | None = None, verbose: bool = True) -> dict:
    """Runs (or resumes) one training run; returns its summary and metric records.

    In a multi-process run every process calls this with the same cfg (after
    `jax.distributed.initialize`); process 0 alone prints, writes the metrics,
    config and plot, and returns the records (the others return none).

    SIGINT or SIGTERM during training (from the main thread) stops the run after
    the current step: a checkpoint at that step is saved, the plot written, and
    `Interrupted` raised; `resume` then continues exactly as if uninterrupted.
    With several processes the processes agree on the stop at the next log step.
    `resume` on a run whose latest checkpoint is at cfg.steps does nothing and
    returns the saved records with `finished=True`.

    Raises:
      ConfigError: an unusable field (`validate_config`, `validate_corpus`) or workdir
        (`check_workdir`), before any training.
      Interrupted: a signal stopped the run (after the checkpoint was saved).
    """
    validate_config(cfg)
    lead = jax.process_index() == 0
    if cfg.resume and run_finished(cfg):
        check_workdir(cfg)
        records = read_metrics(Path(cfg.workdir) / "metrics.jsonl") if lead else []
        return dict(config=dataclasses.asdict(cfg), records=records, state=None, finished=True)
    # Every process checks the workdir before process 0 clears or writes anything in it.
    check_workdir(cfg)
    _sync("workdir checked")
    if lead:
        prepare_workdir(cfg)
    _sync("workdir prepared")
    corpus = corpus or lm_data.load_corpus(cfg.data, max_bytes=cfg.max_corpus_bytes)
    validate_corpus(cfg, corpus)
    trainer = Trainer(cfg)
    manager = _checkpoint_manager(cfg.workdir)
    start = 0
    metrics_path = Path(cfg.workdir) / "metrics.jsonl"
    if cfg.resume:
        start, trainer.state = _restore(manager, trainer.state)
        if lead:  # records logged after the checkpoint (an interrupted run) are redone
            kept = [r for r in read_metrics(metrics_path) if r["step"] <= start]
            with open(metrics_path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
    if lead:
        with open(Path(cfg.workdir) / "config.json", "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)
    data = training_data(cfg, corpus)
    if verbose and jax.process_count() > 1:  # every process: which block it loads
        rows, tokens = trainer.local_rows, trainer.local_tokens
        print(
            f"[{cfg.mixer}] process {jax.process_index()}/{jax.process_count()}: "
            f"{len(jax.local_devices())} local device(s); loads rows {rows.start}:{rows.stop}, "
            f"tokens {tokens.start}:{tokens.stop} of every [{cfg.batch_size}, {cfg.seq_len}] "
            "batch",
            flush=True,
        )
    if verbose and lead:
        print(
            f"[{cfg.mixer}] {corpus.num_files} files, {corpus.train.size:,} train / "
            f"{corpus.held_out.size:,} held-out bytes from {corpus.source}; "
            f"{jax.device_count()} device(s) in {jax.process_count()} process(es), "
            f"mesh {dict(trainer.mesh.shape)}; steps {start}..{cfg.steps}",
            flush=True,
        )
        if cfg.batching != "stream":
            print(
                f"[{cfg.mixer}] --batching={cfg.batching}: {data.num_docs} documents, "
                f"{data.num_pairs:,} predicted bytes in {data.num_rows:,} rows of "
                f"{cfg.seq_len}, {data.pad_fraction:.2%} padding",
                flush=True,
            )
    stop = _StopSignals()
    with stop.active():
        done = _train_loop(cfg, trainer, manager, corpus, data, start, stop, verbose)
    manager.close()
    all_records = read_metrics(metrics_path) if lead else []
    if cfg.plot and all_records:
        plot_losses({cfg.mixer: all_records}, Path(cfg.workdir) / "loss.png")
    if done < cfg.steps:
        raise Interrupted(done, stop.signum, cfg.workdir)
    return dict(
        config=dataclasses.asdict(cfg), records=all_records, state=trainer.state, finished=False
    )


def _train_loop(cfg, trainer, manager, corpus, data, start, stop, verbose) -> int:
    """Steps start..cfg.steps (logging, evaluating, saving); returns the last step done,
    below cfg.steps when a signal stopped it (after saving a checkpoint there)."""
    lead = jax.process_index() == 0
    metrics_path = Path(cfg.workdir) / "metrics.jsonl"
    tokens_per_step = cfg.batch_size * cfg.seq_len
    window_start, window_steps, window_tokens = time.perf_counter(), 0, 0
    done = start
    for step in range(start, cfg.steps):
        loss = trainer.step(data, step)
        done = step + 1
        if step == start:  # the first step compiles: keep it out of tokens/s
            jax.block_until_ready(loss)
            window_start = time.perf_counter()
        else:
            window_steps += 1
            window_tokens += real_tokens(cfg, data, step)
        record = None
        if done % cfg.log_every == 0 or done == cfg.steps:
            loss = float(loss)  # waits for the step
            elapsed = time.perf_counter() - window_start
            tps = window_tokens / elapsed if window_steps else None  # real tokens only
            record = dict(step=done, train_loss=loss, tokens_per_sec=tps)
            if cfg.batching != "stream" and window_steps:
                record["pad_fraction"] = 1.0 - window_tokens / (window_steps * tokens_per_step)
            window_start, window_steps, window_tokens = time.perf_counter(), 0, 0
        if done % cfg.eval_every == 0 or done == cfg.steps:
            eval_loss = trainer.evaluate(corpus.held_out)
            record = record or dict(step=done, train_loss=float(loss), tokens_per_sec=None)
            record.update(eval_loss=eval_loss, eval_bpb=eval_loss / math.log(2))
            window_start = time.perf_counter()  # evaluation is not training time
        if record is not None and lead:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if verbose:
                print(_progress_line(cfg, record, done), flush=True)
        saved = done % cfg.checkpoint_every == 0 or done == cfg.steps
        if saved:
            _save(manager, done, trainer.state)
        if done < cfg.steps and stop.stop_now(check_processes=done % cfg.log_every == 0):
            if not saved:
                _save(manager, done, trainer.state)
            break
    return done


def real_tokens(cfg: TrainConfig, data: np.ndarray | lm_data.DocumentRows, step: int) -> int:
    """The real (non-pad) tokens of the step's global batch; every one in stream mode."""
    if isinstance(data, lm_data.DocumentRows):
        return int(data.real_tokens(data.row_indices(cfg.batch_size, cfg.seed, step)).sum())
    return cfg.batch_size * cfg.seq_len


def _progress_line(cfg: TrainConfig, record: dict, done: int) -> str:
    tps = record["tokens_per_sec"]
    # tps counts real tokens: the ETA divides the real tokens still to come by it.
    real = 1.0 - record.get("pad_fraction", 0.0)
    per_step = cfg.batch_size * cfg.seq_len * real
    speed = f"{tps:,.0f} tok/s ETA {(cfg.steps - done) * per_step / tps:,.0f}s" if tps else ""
    extra = (
        f" | eval loss {record['eval_loss']:.4f}, {record['eval_bpb']:.3f} bpb"
        if "eval_loss" in record
        else ""
    )
    return (
        f"[{cfg.mixer}] step {done:>6}/{cfg.steps} loss {record['train_loss']:.4f} {speed}{extra}"
    )


def read_metrics(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(runs: dict[str, list[dict]], path: str | os.PathLike, title: str = "") -> None:
    """Train (thin) and held-out (markers) loss against step, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for i, (name, records) in enumerate(runs.items()):
        color = f"C{i}"
        steps = [r["step"] for r in records]
        ax.plot(steps, [r["train_loss"] for r in records], color=color, lw=1, label=f"{name} train")
        evals = [r for r in records if "eval_loss" in r]
        if evals:
            ax.plot(
                [r["step"] for r in evals],
                [r["eval_loss"] for r in evals],
                "o--",
                color=color,
                label=f"{name} held-out",
            )
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / byte)")
    ax.set_title(title or "byte-level LM loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
