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
uninterrupted one exactly. The command-line front end is `train_lm.py`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
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
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 100
    data: str | None = None  # None: the Python standard library sources
    max_corpus_bytes: int | None = None
    workdir: str = "results/train_demo"
    resume: bool = False
    plot: bool = True


MIXERS = ("lightning", "softmax", "hybrid")

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
    """("data",) over the devices, or ("data", "seq") with seq = cfg.seq_parallel > 1."""
    devices = np.array(jax.local_devices() if devices is None else devices)
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
        replicated = NamedSharding(self.mesh, PartitionSpec())
        state = dict(params=params, opt_state=self.optimizer.init(params))
        # One sharding for the state in and out, so the second step reuses the first's compile.
        self.state = jax.device_put(state, replicated)
        self.train_step = jax.jit(
            self._train_step, donate_argnums=0, out_shardings=(replicated, replicated)
        )
        self.eval_step = jax.jit(self._loss)

    def _loss(self, params, inputs, targets):
        model = nnx.merge(self.graphdef, params, self.constants)
        logits = model(inputs).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    def _train_step(self, state, inputs, targets):
        loss, grads = jax.value_and_grad(self._loss)(state["params"], inputs, targets)
        updates, opt_state = self.optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return dict(params=params, opt_state=opt_state), loss

    def batch(self, data: np.ndarray, step: int):
        inputs, targets = lm_data.sample_batch(
            data, self.cfg.batch_size, self.cfg.seq_len, self.cfg.seed, step
        )
        return (
            jax.device_put(inputs, self.batch_sharding),
            jax.device_put(targets, self.batch_sharding),
        )

    def step(self, data: np.ndarray, step: int) -> float:
        self.state, loss = self.train_step(self.state, *self.batch(data, step))
        return loss

    def evaluate(self, held_out: np.ndarray) -> float:
        losses = [
            float(
                self.eval_step(
                    self.state["params"],
                    jax.device_put(x, self.batch_sharding),
                    jax.device_put(y, self.batch_sharding),
                )
            )
            for x, y in lm_data.eval_batches(
                held_out, self.cfg.batch_size, self.cfg.seq_len, self.cfg.eval_batches
            )
        ]
        return float(np.mean(losses))


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
    if step is None:
        return 0, state
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    return step, manager.restore(step, args=ocp.args.StandardRestore(abstract))


def train(cfg: TrainConfig, corpus: lm_data.Corpus | None = None, verbose: bool = True) -> dict:
    """Runs (or resumes) one training run; returns its summary and metric records."""
    os.makedirs(cfg.workdir, exist_ok=True)
    corpus = corpus or lm_data.load_corpus(cfg.data, max_bytes=cfg.max_corpus_bytes)
    trainer = Trainer(cfg)
    manager = _checkpoint_manager(cfg.workdir)
    start = 0
    metrics_path = Path(cfg.workdir) / "metrics.jsonl"
    if cfg.resume:
        start, trainer.state = _restore(manager, trainer.state)
    elif metrics_path.exists():
        metrics_path.unlink()  # a fresh run starts a fresh log
    with open(Path(cfg.workdir) / "config.json", "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=1)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    window_start, window_steps = time.perf_counter(), 0
    if verbose:
        print(
            f"[{cfg.mixer}] {corpus.num_files} files, {corpus.train.size:,} train / "
            f"{corpus.held_out.size:,} held-out bytes from {corpus.source}; "
            f"{len(jax.local_devices())} device(s), mesh {dict(trainer.mesh.shape)}; "
            f"steps {start}..{cfg.steps}"
        )
    for step in range(start, cfg.steps):
        loss = trainer.step(corpus.train, step)
        done = step + 1
        if step == start:  # the first step compiles: keep it out of tokens/s
            jax.block_until_ready(loss)
            window_start = time.perf_counter()
        else:
            window_steps += 1
        record = None
        if done % cfg.log_every == 0 or done == cfg.steps:
            loss = float(loss)  # waits for the step
            elapsed = time.perf_counter() - window_start
            tps = window_steps * tokens_per_step / elapsed if window_steps else None
            record = dict(step=done, train_loss=loss, tokens_per_sec=tps)
            window_start, window_steps = time.perf_counter(), 0
        if done % cfg.eval_every == 0 or done == cfg.steps:
            eval_loss = trainer.evaluate(corpus.held_out)
            record = record or dict(step=done, train_loss=float(loss), tokens_per_sec=None)
            record.update(eval_loss=eval_loss, eval_bpb=eval_loss / math.log(2))
            window_start = time.perf_counter()  # evaluation is not training time
        if record is not None:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if verbose:
                print(_progress_line(cfg, record, done, tokens_per_step), flush=True)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            _save(manager, done, trainer.state)
    manager.close()
    all_records = read_metrics(metrics_path)
    if cfg.plot and all_records:
        plot_losses({cfg.mixer: all_records}, Path(cfg.workdir) / "loss.png")
    return dict(config=dataclasses.asdict(cfg), records=all_records, state=trainer.state)


def _progress_line(cfg: TrainConfig, record: dict, done: int, tokens_per_step: int) -> str:
    tps = record["tokens_per_sec"]
    speed = (
        f"{tps:,.0f} tok/s ETA {(cfg.steps - done) * tokens_per_step / tps:,.0f}s" if tps else ""
    )
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
