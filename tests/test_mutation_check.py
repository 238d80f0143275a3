"""tools/mutation_check.py's mutations still target the code they were written for.

Runs no mutation (that is the script's job, 15+ minutes): checks, in this tree, that
each mutation's source text occurs at its `occurrence` and, where it names one, inside
its function; a new copy of a pattern earlier in a file once moved a mutation into a
kernel its tests do not run, and it was reported missed instead of stale.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# In a subprocess: the script defines absl flags on import, some of the same names as
# other scripts the tests import.
_WHERE = """
import json, pathlib, sys
import mutation_check as m
rows = []
for x in m.MUTATIONS:
    text = (pathlib.Path("..") / x.path).read_text()
    starts, at = [], text.find(x.old)
    while at >= 0:
        starts.append(at)
        at = text.find(x.old, at + 1)
    where = m.enclosing_function(text, starts[x.occurrence]) if len(starts) > x.occurrence else None
    rows.append({"name": x.name, "copies": len(starts), "occurrence": x.occurrence,
                 "inside": x.inside, "where": where})
sample = "def a():\\n    x = 1\\n\\n\\ndef b():\\n    def inner():\\n        y = 2\\n"
probe = [m.enclosing_function(sample, sample.index(s)) for s in ("x = 1", "y = 2")]
probe.append(m.enclosing_function(sample, 0))
print(json.dumps({"rows": rows, "probe": probe}))
"""


def _where() -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _WHERE],
        cwd=REPO / "tools",
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_every_mutation_applies_where_it_was_written_for():
    found = _where()
    # enclosing_function: the last top-level def before the offset (not a nested one).
    assert found["probe"] == ["a", "b", None]
    rows = found["rows"]
    assert len(rows) >= 20
    for row in rows:
        assert row["copies"] > row["occurrence"], f"{row['name']}: pattern gone (stale)"
        if row["inside"] is not None:
            assert row["where"] == row["inside"], row
        else:  # one copy only: a second copy would make the target ambiguous
            assert row["copies"] == 1, f"{row['name']}: {row['copies']} copies; name `inside`"
