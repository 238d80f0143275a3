"""train_lm.py across processes: JAX's distributed runtime, 2 processes x 2 CPU devices.

Each run here is `experiments/train_lm.py` launched as separate OS processes on
this machine, exactly as on N hosts (docs/scaling.md, "Training on several hosts"):

  JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
    python experiments/train_lm.py <TINY_FLAGS> --seq_parallel=2 \\
    --coordinator_address=localhost:PORT --num_processes=2 --process_id=I   # I = 0, 1

The reference is the same command in one process with 4 devices and no
distributed flags: the same model, seed and global batch, so the same losses to
float tolerance (only the order of the cross-device sums differs). CPU
collectives between processes go through gloo, jax 0.10.2's default
(`jax_cpu_collectives_implementation`). Every launch is bounded by a timeout and
killed (with its process group) when a test ends, passed or not.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh

import lm_train

REPO = Path(__file__).resolve().parents[1]
TRAIN_LM = REPO / "experiments" / "train_lm.py"
STEPS = 4
BATCH, SEQ_LEN = 4, 32
TINY_FLAGS = [
    "--num_layers=1",
    "--embed_dim=32",
    "--num_heads=2",
    f"--seq_len={SEQ_LEN}",
    f"--batch_size={BATCH}",
    "--learning_rate=1e-2",
    "--warmup_steps=2",
    "--log_every=1",
    "--seed=3",
]
RUN_FLAGS = [f"--steps={STEPS}", f"--eval_every={STEPS}", "--checkpoint_every=2"]
# The machine may be shared and loaded: generous bounds, far below "hangs forever".
RUN_TIMEOUT_S = 420
HEARTBEAT_TIMEOUT_S = 10  # the coordinator declares a silent process dead after this
EXIT_AFTER_KILL_TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


class Launch:
    """One train_lm.py process, its output in a log file, in its own process group."""

    def __init__(self, args: list[str], devices: int, log: Path):
        env = {
            **os.environ,
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "PYTHONUNBUFFERED": "1",
        }
        self.log = log
        self._log_file = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(TRAIN_LM), *args],
            cwd=REPO,
            env=env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        """The exit code; a process still running after timeout fails the test."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.log.name} still running after {timeout:.0f}s:\n{self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        return self.output()[-chars:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log_file.close()


@pytest.fixture
def launches():
    """Starts processes; kills whatever still runs when the test ends, passed or not."""
    started: list[Launch] = []

    def start(args: list[str], devices: int, log: Path) -> Launch:
        started.append(Launch(args, devices, log))
        return started[-1]

    yield start
    for launch in started:
        launch.kill()


def _start_group(start, args: list[str], workdir: Path, processes: int, name: str):
    """processes x 2-device processes of one run, on a fresh localhost port."""
    distributed = [
        f"--coordinator_address=localhost:{_free_port()}",
        f"--num_processes={processes}",
    ]
    return [
        start(
            [*args, f"--workdir={workdir}", *distributed, f"--process_id={i}"],
            2,
            workdir.parent / f"{name}.p{i}.log",
        )
        for i in range(processes)
    ]


def _wait_ok(launches_: list[Launch]) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    for launch in launches_:
        code = launch.wait(max(deadline - time.monotonic(), 1))
        assert code == 0, f"{launch.log.name} exited with {code}:\n{launch.tail()}"


def _losses(workdir: Path) -> list[tuple[int, float, float | None]]:
    """(step, train loss, held-out loss or None) of every metrics.jsonl record."""
    return [
        (r["step"], r["train_loss"], r.get("eval_loss"))
        for r in lm_train.read_metrics(workdir / "metrics.jsonl")
    ]


def _assert_same_curve(got, want, **tolerance) -> None:
    assert [r[0] for r in got] == [r[0] for r in want]
    np.testing.assert_allclose([r[1] for r in got], [r[1] for r in want], **tolerance)
    evals = [(g[2], w[2]) for g, w in zip(got, want) if w[2] is not None]
    assert evals and all(g is not None for g, _ in evals)
    np.testing.assert_allclose(*zip(*evals), **tolerance)


def _restored_params(workdir: Path, step: int) -> list[np.ndarray]:
    """The checkpoint's parameters, restored whole onto this (test) process's first device."""
    cfg = lm_train.TrainConfig(
        num_layers=1, embed_dim=32, num_heads=2, seq_len=SEQ_LEN, batch_size=BATCH
    )
    trainer = lm_train.Trainer(cfg, Mesh(np.array(jax.devices()[:1]), ("data",)))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, trainer.state)
    with ocp.CheckpointManager(workdir.absolute() / "checkpoints") as manager:
        state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    params = [np.asarray(x) for x in jax.tree.leaves(state["params"])]
    want = [x.shape for x in jax.tree.leaves(abstract["params"])]
    assert [p.shape for p in params] == want and len(params) > 3
    return params


_BLOCK = re.compile(r"process (\d+)/(\d+): .* loads rows (\d+):(\d+), tokens (\d+):(\d+) of every")


def _loaded_blocks(launches_: list[Launch]) -> dict[int, tuple[slice, slice]]:
    blocks = {}
    for launch in launches_:
        (match,) = _BLOCK.findall(launch.output())
        pid, _, r0, r1, t0, t1 = map(int, match)
        blocks[pid] = (slice(r0, r1), slice(t0, t1))
    return blocks


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 400)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus_file):
    """The single-process run (4 devices, data 2 x seq 2), started now, awaited on use.

    Returns a function giving its workdir once it has finished.
    """
    workdir = tmp_path_factory.mktemp("reference") / "single"
    args = [*TINY_FLAGS, *RUN_FLAGS, f"--data={corpus_file}", "--seq_parallel=2"]
    single = Launch([*args, f"--workdir={workdir}"], 4, workdir.parent / "single.log")

    def finished() -> Path:
        _wait_ok([single])  # returns at once once it has exited (with 0)
        return workdir

    yield finished
    single.kill()


def test_two_processes_train_like_one_and_resume_exactly(
    tmp_path, corpus_file, reference, launches
):
    args = [*TINY_FLAGS, *RUN_FLAGS, f"--data={corpus_file}", "--seq_parallel=2"]
    pair = _start_group(launches, args, tmp_path / "pair", 2, "pair")
    _wait_ok(pair)
    single = reference()

    # The mesh (data 2 x seq 2) spans both processes; each loaded its own rows.
    assert "mesh {'data': 2, 'seq': 2}" in pair[0].output()
    blocks = _loaded_blocks(pair)
    assert blocks == {0: (slice(0, 2), slice(0, SEQ_LEN)), 1: (slice(2, 4), slice(0, SEQ_LEN))}
    assert not re.search(r"step +\d+/", pair[1].output()), "only process 0 logs"

    # Same seed and global batch: the loss curve of one process on 4 devices.
    want = _losses(single)
    assert [r[0] for r in want] == list(range(1, STEPS + 1))
    _assert_same_curve(_losses(tmp_path / "pair"), want, rtol=2e-5)

    # One checkpoint directory holds the whole model, equal to the reference's.
    for got, want in zip(
        _restored_params(tmp_path / "pair", STEPS),
        _restored_params(single, STEPS),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)

    # Resume from step 2 (drop the step-4 checkpoint and the later log lines).
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "pair", resumed)
    shutil.rmtree(resumed / "checkpoints" / str(STEPS))
    records = lm_train.read_metrics(resumed / "metrics.jsonl")
    (resumed / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records if r["step"] <= 2)
    )
    _wait_ok(_start_group(launches, [*args, "--resume"], resumed, 2, "resumed"))
    # The resumed 2-process run continues exactly: the same losses and parameters, bit for bit.
    assert _losses(resumed) == _losses(tmp_path / "pair")
    for got, want in zip(
        _restored_params(resumed, STEPS), _restored_params(tmp_path / "pair", STEPS), strict=True
    ):
        np.testing.assert_array_equal(got, want)


def test_a_killed_process_stops_the_other_with_an_error(tmp_path, corpus_file, reference, launches):
    """Sequence parallel over both processes (seq = 4); process 1 dies mid-run."""
    args = [
        *TINY_FLAGS,
        "--steps=100000",  # runs until killed
        "--eval_every=100000",
        "--checkpoint_every=100000",
        f"--data={corpus_file}",
        "--seq_parallel=4",
        f"--heartbeat_timeout_seconds={HEARTBEAT_TIMEOUT_S}",
    ]
    pair = _start_group(launches, args, tmp_path / "run", 2, "run")
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while len(lm_train.read_metrics(metrics)) < 3:
        for launch in pair:
            assert launch.proc.poll() is None, f"{launch.log.name} ended:\n{launch.tail()}"
        assert time.monotonic() < deadline, f"no 3 steps in {RUN_TIMEOUT_S}s:\n{pair[0].tail()}"
        time.sleep(0.5)
    # Each process holds half of every sequence: the op's state crosses processes.
    assert "mesh {'data': 1, 'seq': 4}" in pair[0].output()
    assert _loaded_blocks(pair) == {
        0: (slice(0, BATCH), slice(0, SEQ_LEN // 2)),
        1: (slice(0, BATCH), slice(SEQ_LEN // 2, SEQ_LEN)),
    }
    # Steps 1-3 see the same learning rates as the 4-step reference (warmup, then the
    # peak), so the same losses: the state exchange across processes is the op's.
    got = [r["train_loss"] for r in lm_train.read_metrics(metrics)[:3]]
    want = [r["train_loss"] for r in lm_train.read_metrics(reference() / "metrics.jsonl")[:3]]
    np.testing.assert_allclose(got, want, rtol=2e-5)

    pair[1].kill()
    killed_at = time.monotonic()
    code = pair[0].wait(EXIT_AFTER_KILL_TIMEOUT_S)
    assert code != 0
    output = pair[0].output()
    assert "The following tasks are unhealthy (stopped sending heartbeats)" in output, output[
        -3000:
    ]
    # Bounded by the heartbeat timeout (plus a loaded machine's slack), not a hang.
    assert time.monotonic() - killed_at < EXIT_AFTER_KILL_TIMEOUT_S
