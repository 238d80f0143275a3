"""The design notes live in the repository, and every citation of them resolves."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

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
