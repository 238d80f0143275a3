"""Every script writes into runs/ (git-ignored) by default: a clone stays clean after any
script's default run; the committed results/ take an explicit output flag.

Reads the scripts' flag definitions (no import, no run): each output flag (`out`, `json`,
`workdir`) and `DEFAULT_JSON` defaults to nothing or to a path under runs/, and so does
tools/gpu_check.sh's output folder.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT_DIRS = ("benchmarks", "tools", "experiments")
OUTPUT_FLAGS = {"out", "json", "workdir"}


def _output_defaults(path: Path) -> list[tuple[str, object]]:
    """(name, default) of every output flag (absl or argparse) and DEFAULT_JSON constant."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "").startswith("DEFINE_"):
            args = node.args
            if len(args) >= 2 and isinstance(args[0], ast.Constant):
                if args[0].value in OUTPUT_FLAGS and isinstance(args[1], ast.Constant):
                    found.append((args[0].value, args[1].value))
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            name = (
                node.args[0].value if node.args and isinstance(node.args[0], ast.Constant) else ""
            )
            for kw in node.keywords:
                if name.lstrip("-") in OUTPUT_FLAGS and kw.arg == "default":
                    found.append((name.lstrip("-"), getattr(kw.value, "value", kw.value)))
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id == "DEFAULT_JSON":
                    found.append((target.id, node.value.value))
    return found


def test_runs_is_git_ignored():
    assert "runs/" in (REPO / ".gitignore").read_text().split()


def test_every_script_writes_under_runs_by_default():
    scripts = [p for d in SCRIPT_DIRS for p in sorted((REPO / d).glob("*.py"))]
    assert len(scripts) >= 15, scripts
    checked = 0
    for script in scripts:
        for name, default in _output_defaults(script):
            checked += 1
            where = f"{script.relative_to(REPO)} {name}={default!r}"
            assert default in (None, "") or str(default).startswith("runs/"), where
    assert checked >= 10  # the flags are still found (bench_ops, bench_sp, mutation_check...)
    shell = (REPO / "tools" / "gpu_check.sh").read_text()
    out = re.search(r"^OUT=\$\{GPU_CHECK_OUT:-([^}]+)\}", shell, flags=re.MULTILINE)
    assert out is not None and out.group(1).startswith("runs/"), out
