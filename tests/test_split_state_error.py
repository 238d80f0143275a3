"""tools/split_state_error.py: the split-state storage emulation, at a small shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import split_state_error

REPO = Path(__file__).resolve().parents[1]


def test_relative_errors():
    expected = np.array([3.0, -4.0])
    errors = split_state_error.relative_errors(expected + np.array([0.5, 0.0]), expected)
    assert errors["max"] == 0.5 / 4.0
    assert np.isclose(errors["rms"], np.sqrt(0.125) / np.sqrt(12.5))


def test_small_run_writes_its_rows(tmp_path):
    """b1 h2 seq 2048 d 16: 8 splits (choose_tiling); the emulation splits exactly (its
    own check), float32 storage adds float32 rounding, bf16 storage bf16's."""
    out = tmp_path / "split.json"
    subprocess.run(
        [sys.executable, "tools/split_state_error.py", "--seq=2048", "--heads=2",
         "--dim=16", f"--out={out}"],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu"),
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    record = json.loads(out.read_text())
    assert record["splits"] > 1 and record["split_vs_unsplit_float64"]["max"] < 1e-9
    rows = {row["storage"].split(" (")[0]: row for row in record["rows"]}
    f32, bf16 = rows["split states in float32"], rows["split states in bfloat16"]
    assert 0 < f32["max"] < 1e-6 < 1e-4 < bf16["max"] < 1e-1
