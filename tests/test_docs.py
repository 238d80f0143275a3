"""The documentation: the design notes and their citations, every Python example of the
README and of docs/ run as written, and the site built with warnings as errors."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DESIGN = REPO / "docs" / "design.md"
OLD_NAME = "DESIGN" + ".md"  # the notes' former name, outside the repository


def _tracked_text_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "*.py", "*.md", "*.toml", "*.cfg", "*.txt"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [REPO / name for name in listed if (REPO / name).is_file()]


def test_design_notes_are_in_the_repo_and_cited_by_section():
    headings = set(re.findall(r"^## (\d+)\. ", DESIGN.read_text(), flags=re.MULTILINE))
    assert {"1", "2", "3", "4", "5", "6", "7"} <= headings, headings
    files = _tracked_text_files()
    assert any(f.name == "op_test_base.py" for f in files)  # the listing works
    citations = 0
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert OLD_NAME not in text, f"{path} still cites {OLD_NAME}; cite docs/design.md"
        for section in re.findall(r"docs/design\.md section (\d+)", text):
            assert section in headings, (path, section)
            citations += 1
    assert citations >= 5
    assert "](docs/design.md)" in (REPO / "README.md").read_text()


def _python_blocks() -> list[tuple[str, int, str]]:
    """(file, index, code) of every ```python block of README.md and docs/*.md."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    blocks = []
    for page in pages:
        found = re.findall(r"^```python\n(.*?)^```", page.read_text(), re.MULTILINE | re.DOTALL)
        blocks += [(page.relative_to(REPO).as_posix(), i, code) for i, code in enumerate(found)]
    return blocks


BLOCKS = _python_blocks()


def test_the_pages_have_examples():
    pages = {page for page, _, _ in BLOCKS}
    assert {"README.md", "docs/op.md", "docs/packed.md", "docs/layers.md"} <= pages, pages


@pytest.mark.parametrize("page, index, code", BLOCKS, ids=[f"{p}:{i}" for p, i, _ in BLOCKS])
def test_python_example_runs_as_written(page, index, code):
    """Each block on its own, in a fresh namespace (what a reader pasting it gets)."""
    exec(compile(code, f"{page} (python block {index})", "exec"), {"__name__": "__main__"})


def test_site_builds_with_warnings_as_errors(tmp_path):
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip('mkdocs is not installed: pip install -e ".[docs]"')
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for page in ("index.html", "op/index.html", "api/lightning_jax/index.html"):
        assert (tmp_path / page).is_file(), page
    api = (tmp_path / "api" / "lightning_jax" / "index.html").read_text()
    assert "lightning_jax.lightning_attention" in api and "[B, H, T, D]" in api
