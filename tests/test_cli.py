"""experiments/train_lm.py as a user runs it: flag mistakes, the run directory, --help.

Each case runs the CLI in a subprocess (from a scratch folder, with this checkout's code
first on PYTHONPATH) and checks the exit status and the one line it prints. Flag mistakes
are rejected before the model is built, so a case takes a few seconds (the imports).
JAX_PLATFORMS=cpu keeps any installed GPU/TPU plugin from logging its own start-up
failure into the output this checks; the CPU device count is the 8 that conftest forces.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lm_train

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "train_lm.py"
# The smallest model and corpus that train (8 devices: the batch divides by 8).
TINY_FLAGS = [
    "--num_layers=1",
    "--embed_dim=32",
    "--num_heads=2",
    "--seq_len=32",
    "--batch_size=8",
    "--log_every=1",
    "--eval_every=2",
    "--checkpoint_every=2",
]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_usage_error(result: subprocess.CompletedProcess, *names: str) -> str:
    """Exit status 2, one line on stderr naming every one of names, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("train_lm.py: error: "), lines[0]
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert "wrote" not in result.stdout
    return lines[0]


@pytest.fixture()
def text_file(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 400)
    return path


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--steps=-1"], "--steps"),
        (["--steps=0"], "--steps"),
        (["--batch_size=0"], "--batch_size"),
        (["--seq_len=0"], "--seq_len"),
        (["--num_heads=5"], "--num_heads"),  # the demo's width is 128
        (["--impl=foo"], "--impl"),
        (["--data=/nonexistent/corpus"], "--data"),
        (["--seq_parallel=16"], "--seq_parallel"),  # 8 devices
        (["--steps=abc"], "--steps"),
        (["--resume", "--overwrite"], "--overwrite"),
        (["--batching=packed"], "--batching"),
        (["--pack", "--batching=pad"], "--pack"),
    ],
)
def test_flag_mistake_is_one_line_and_status_2(tmp_path, args, flag):
    assert_usage_error(run_cli(*args, cwd=tmp_path), flag)
    assert not (tmp_path / "runs").exists()  # refused before the workdir is made


def test_empty_data_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_usage_error(run_cli(f"--data={empty}", cwd=tmp_path), "--data")


def test_resume_with_nothing_to_resume(tmp_path):
    line = assert_usage_error(run_cli("--resume", cwd=tmp_path), "--resume")
    assert "no checkpoint" in line


def test_used_workdir_is_refused(tmp_path):
    workdir = tmp_path / "runs" / "train_demo"  # the default workdir
    workdir.mkdir(parents=True)
    (workdir / "metrics.jsonl").write_text('{"step": 1}\n')
    assert_usage_error(run_cli(cwd=tmp_path), "--workdir", "--resume", "--overwrite")
    assert (workdir / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_rerun_refused_resume_checked_overwrite_clears(tmp_path, text_file):
    """A real (tiny) run, then the second-run mistakes, then --overwrite."""
    workdir = tmp_path / "w"
    base = [*TINY_FLAGS, f"--data={text_file}", f"--workdir={workdir}"]
    first = run_cli(*base, "--steps=4", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert lm_train.checkpoint_steps(workdir) == [2, 4]

    again = run_cli(*base, "--steps=4", "--seed=1", cwd=tmp_path)
    assert_usage_error(again, "--resume", "--overwrite")
    line = assert_usage_error(
        run_cli(*base, "--steps=6", "--resume", "--seed=1", "--learning_rate=0.1", cwd=tmp_path),
        "--resume",
    )
    assert "learning_rate 0.003 -> 0.1" in line and "seed 0 -> 1" in line, line
    assert lm_train.checkpoint_steps(workdir) == [2, 4]  # refused runs touch nothing

    fresh = run_cli(*base, "--steps=2", "--overwrite", cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert lm_train.checkpoint_steps(workdir) == [2]  # the first run's step 4 is gone
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").open()]
    assert steps == [1, 2]
    assert json.loads((workdir / "config.json").read_text())["steps"] == 2


def test_pack_trains_end_to_end(tmp_path):
    """--pack on a folder of short files (documents); a resume may not change the batching."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(200):  # 6 of them held out (by the hash of the name): 322 bytes
        (docs / f"doc{i:03d}.txt").write_bytes(b"the lazy dog. " * (1 + i % 7))
    workdir = tmp_path / "w"
    base = [*TINY_FLAGS, f"--data={docs}", f"--workdir={workdir}"]
    result = run_cli(*base, "--pack", "--steps=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--batching=pack: 194 documents" in result.stdout
    assert json.loads((workdir / "config.json").read_text())["batching"] == "pack"
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == [1, 2] and "pad_fraction" in records[1]
    line = assert_usage_error(
        run_cli(*base, "--batching=pad", "--steps=4", "--resume", cwd=tmp_path), "--resume"
    )
    assert "batching 'pack' -> 'pad'" in line, line


def test_help_lists_every_preset(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    lines = result.stdout.splitlines()
    for name, fields in lm_train.PRESETS.items():
        line = next(line for line in lines if line.strip().startswith(f"{name}:"))
        for key, value in fields.items():
            assert f"{key}={value}" in line, (key, line)


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)


def test_default_workdir_is_git_ignored_and_the_demo_copy_is_tracked():
    assert lm_train.TrainConfig().workdir == lm_train.default_workdir("demo")
    for preset in lm_train.PRESETS:
        for compare in (False, True):
            workdir = lm_train.default_workdir(preset, compare)
            for name in ("metrics.jsonl", "loss.png", "config.json", "checkpoints/4/x"):
                path = f"{workdir}/{name}"
                assert _git("check-ignore", "-q", path).returncode == 0, path
    # The documented demo figures (docs/getting-started.md): a committed copy that a default
    # run does not write to.
    for name in ("metrics.jsonl", "loss.png", "config.json"):
        tracked = _git("ls-files", "--error-unmatch", f"results/train_demo/{name}")
        assert tracked.returncode == 0, tracked.stderr
