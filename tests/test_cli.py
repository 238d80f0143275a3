"""experiments/train_lm.py as a user runs it: flag mistakes, the run directory, --help,
Ctrl-C; and the one-line flag errors of the other scripts.

Each case runs the CLI in a subprocess (from a scratch folder, with this checkout's code
first on PYTHONPATH) and checks the exit status and the one line it prints. Flag mistakes
are rejected before the model is built, so a case takes a few seconds (the imports).
JAX_PLATFORMS=cpu keeps any installed GPU/TPU plugin from logging its own start-up
failure into the output this checks; the CPU device count is the 8 that conftest forces.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import lm_train

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "train_lm.py"
GENERATE = REPO / "experiments" / "generate.py"
BENCH_SP = REPO / "benchmarks" / "bench_sp.py"
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


# A child process that imports a script (not as __main__) and runs its flag parsing and
# main once per argv, as `lightning_jax.cli.run` does: many flag mistakes for one start of
# jax. Prints one JSON list of {"code", "stdout", "stderr"}.
CASES_CHILD = """
import contextlib, importlib.util, io, json, sys
from absl import app, flags
from lightning_jax import cli
script, cases = sys.argv[1], json.loads(sys.argv[2])
spec = importlib.util.spec_from_file_location("script_under_test", script)
module = importlib.util.module_from_spec(spec)
sys.path.insert(0, str(__import__("pathlib").Path(script).parent))
spec.loader.exec_module(module)
getattr(module, "define_flags", lambda: None)()  # scripts that define flags only as scripts
results = []
for argv in cases:
    flags.FLAGS.unparse_flags()
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            sys.argv = [script, *argv]
            rest = cli.parse_flags(sys.argv)
            try:
                module.main(rest)
            except (cli.UsageError, app.UsageError) as e:
                cli.usage_error(str(e))
        except SystemExit as e:
            code = e.code
    results.append(dict(code=code, stdout=out.getvalue(), stderr=err.getvalue()))
print(json.dumps(results))
"""


def run_cases(script: Path, cases: list[list[str]], cwd: Path) -> list[dict]:
    """Each argv of cases through the script's flag parsing and main, in one child process."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", CASES_CHILD, str(script), json.dumps(cases)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_case_error(case: dict, *names: str, script: str = "train_lm.py") -> str:
    """Status 2, one line on stderr naming every one of names, no traceback."""
    lines = case["stderr"].strip().splitlines()
    assert case["code"] == 2, case
    assert len(lines) == 1, case["stderr"]
    assert lines[0].startswith(f"{script}: error: "), lines[0]
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert "wrote" not in case["stdout"]
    return lines[0]


FLAG_MISTAKES = [
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
    (["stray"], "unexpected arguments"),
    (["--workdir=/proc/forbidden"], "--workdir=/proc/forbidden"),
]


def test_flag_mistakes_are_one_line_and_status_2(tmp_path):
    """Every mistake is reported as itself, before the workdir: also where the default
    workdir already holds a run, which would otherwise be the first complaint."""
    empty_folder, empty_file = tmp_path / "empty", tmp_path / "empty.txt"
    empty_folder.mkdir()
    empty_file.write_bytes(b"")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    used = tmp_path / "used"  # its default workdir holds a run
    (used / "runs" / "train_demo").mkdir(parents=True)
    (used / "runs" / "train_demo" / "metrics.jsonl").write_text('{"step": 1}\n')
    in_fresh = [args for args, _ in FLAG_MISTAKES] + [[f"--data={empty_folder}"]]
    results = run_cases(SCRIPT, in_fresh, cwd=fresh)
    for (_, flag), case in zip(FLAG_MISTAKES + [([], "--data")], results, strict=True):
        assert_case_error(case, flag)
    assert not (fresh / "runs").exists()  # refused before the workdir is made

    in_used = [
        ["--max_corpus_bytes=1000"],  # the stdlib's first files: too few held-out bytes
        ["--seq_parallel=16"],
        [f"--data={empty_file}"],
        ["--batch_size=3"],  # 8 devices
        [],  # no mistake but the used workdir
    ]
    results = run_cases(SCRIPT, in_used, cwd=used)
    flags = ["--max_corpus_bytes=1000", "--seq_parallel=16", "--data", "--batch_size=3"]
    for flag, case in zip(flags, results, strict=False):
        line = assert_case_error(case, flag)
        assert "already holds a run" not in line, line
    assert_case_error(results[-1], "--workdir", "--resume", "--overwrite")
    assert (used / "runs" / "train_demo" / "metrics.jsonl").read_text() == '{"step": 1}\n'


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


def test_ctrl_c_saves_and_says_how_to_resume(tmp_path, text_file):
    """SIGINT mid-run: a checkpoint at that step, the plot, one line with the resume command,
    status 130; that command with --steps at the saved step finds nothing to do."""
    workdir = tmp_path / "w"
    args = [*TINY_FLAGS, f"--data={text_file}", f"--workdir={workdir}", "--steps=100000"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stdout:  # one line per step (log_every=1)
            if "step      3/" in line:
                proc.send_signal(signal.SIGINT)
                break
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    step = lm_train.checkpoint_steps(workdir)[-1]
    assert step >= 3 and lines[0].startswith(f"interrupted at step {step}/100000"), lines[0]
    command = lines[0].split("resume with: ")[1]
    assert command.endswith("--resume") and f"--workdir={workdir}" in command, command
    assert (workdir / "loss.png").exists()
    assert lm_train.read_metrics(workdir / "metrics.jsonl")[-1]["step"] == step

    metrics = (workdir / "metrics.jsonl").read_text()
    (workdir / "loss.png").unlink()
    resume = [a for a in shlex.split(command)[2:] if not a.startswith("--steps")]
    (finished,) = run_cases(SCRIPT, [[*resume, f"--steps={step}"]], cwd=tmp_path)
    assert finished["code"] == 0 and "nothing to do" in finished["stdout"], finished
    assert (workdir / "metrics.jsonl").read_text() == metrics
    assert not (workdir / "loss.png").exists()

    # generate.py on the saved run: its flag mistakes are one line each (tests/test_train.py
    # samples from a restored run in-process).
    run = [f"--workdir={workdir}", "--max_new_tokens=4"]
    cases = [
        [*run, f"--step={step + 1}"],
        [*run, "--temperature=-1"],
        [*run, "--top_k=5"],  # top_k without a temperature: greedy has no top k
        [*run, "--prompt="],
        ["--workdir=" + str(tmp_path / "nothing")],
        [*run, "--max_new_tokens=x"],
    ]
    mistakes = run_cases(GENERATE, cases, cwd=tmp_path)
    flags = ["--step", "--temperature", "--top_k", "--prompt", "--workdir", "--max_new_tokens"]
    for flag, case in zip(flags, mistakes, strict=True):
        assert_case_error(case, flag, script="generate.py")


def test_bench_sp_flags():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    help_ = subprocess.run(
        [sys.executable, str(BENCH_SP), "--help"], env=env, capture_output=True, text=True
    )
    assert help_.returncode == 0 and "--devices" in help_.stdout, help_.stderr[-3000:]
    cases = [
        ["--devices=abc"],
        ["--devices=0"],
        ["--seqs=128,x"],
        ["--combines=foo"],
        ["--reps=0"],
        ["stray"],
    ]
    flags = ["--devices", "--devices", "--seqs", "--combines", "--reps", "unexpected arguments"]
    for flag, case in zip(flags, run_cases(BENCH_SP, cases, cwd=REPO), strict=True):
        assert_case_error(case, flag, script="bench_sp.py")


def test_cli_helper_one_line_errors(monkeypatch, capsys):
    """lightning_jax.cli on flags of its own: every mistake one line naming the flag, exit 2."""
    from absl import flags as absl_flags

    from lightning_jax import cli

    fv = absl_flags.FlagValues()
    absl_flags.DEFINE_list("devices", ["1"], "Devices.", flag_values=fv)
    absl_flags.DEFINE_list("modes", ["a"], "Modes.", flag_values=fv)
    absl_flags.DEFINE_integer("reps", 3, "Reps.", flag_values=fv)
    cli.int_list("devices", flag_values=fv)
    cli.choice_list("modes", ("a", "b"), flag_values=fv)
    cli.positive_int("reps", flag_values=fv)
    monkeypatch.setattr(sys, "argv", ["/somewhere/prog.py"])
    mistakes = [
        (["--devices=1,x"], "--devices"),
        (["--devices="], "--devices"),  # empty
        (["--modes=a,c"], "--modes"),
        (["--reps=0"], "--reps"),
        (["--reps=2.5"], "--reps"),
        (["--nope=1"], "nope"),
        (["stray"], "unexpected arguments"),
    ]
    for argv, name in mistakes:
        fv.unparse_flags()
        with pytest.raises(SystemExit) as exit_:
            cli.parse_flags(["prog.py", *argv], flag_values=fv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(lines) == 1, (argv, lines)
        assert lines[0].startswith("prog.py: error: ") and name in lines[0], lines[0]
    fv.unparse_flags()
    rest = cli.parse_flags(["prog.py", "a.xml", "--devices=2,4"], positional=True, flag_values=fv)
    assert rest == ["prog.py", "a.xml"] and fv.devices == ["2", "4"]


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
