"""tools/suite_time.py: node ids from junit records, and the growth figure."""

from __future__ import annotations

import pytest
import suite_time

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="5">
<testcase classname="tests.test_pallas.TestTritonInterpret"
  name="test_low_precision[b1h2n2048d16e16-none-blkNone-bf16]" time="3.0" />
<testcase classname="tests.test_pallas.TestTritonInterpret"
  name="test_low_precision[b2h3n65d16e60-strong-blk16-bf16]" time="1.0" />
<testcase classname="tests.test_xla.TestXla" name="test_carried_state_is_float32[f16]"
  time="2.0"><failure message="x">x</failure></testcase>
<testcase classname="tests.test_bench_ops" name="test_collective_bytes_parses_hlo" time="0.5" />
<testcase classname="tests.test_parallel" name="test_eager_without_jit" time="3.5">
  <skipped message="s" /></testcase>
</testsuite></testsuites>
"""


@pytest.mark.parametrize(
    "classname, name, want",
    [
        (
            "tests.test_pallas.TestTritonInterpret",
            "t[a]",
            "tests/test_pallas.py::TestTritonInterpret::t[a]",
        ),
        ("tests.test_parallel", "t", "tests/test_parallel.py::t"),
        ("tests.sub.test_x.A.B", "t", "tests/sub/test_x.py::A::B::t"),
    ],
)
def test_node_id(classname, name, want):
    assert suite_time.node_id(classname, name) == want


def test_precision_tests_share(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    cases = suite_time.read_junit(str(path))
    assert [c.outcome for c in cases] == ["passed", "passed", "failed", "passed", "skipped"]
    share = suite_time.suite_share(cases, suite_time.PRECISION_TESTS)
    # n2048 (3.0), carried state (2.0), collective bytes (0.5); not the n65 case, not the rest.
    assert share["added_tests"] == 3 and share["added_s"] == pytest.approx(5.5)
    assert share["total_s"] == pytest.approx(10.0)
    assert share["growth"] == pytest.approx(5.5 / 4.5)
    assert share["failed_or_error"] == 1
    assert share["slowest_added"][0][1] == pytest.approx(3.0)


def test_patterns_that_match_nothing_are_refused(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    with pytest.raises(ValueError, match="patterns: none matches"):
        suite_time.suite_share(suite_time.read_junit(str(path)), ("tests/test_nope.py::*",))
    with pytest.raises(ValueError, match="cases: the junit file holds no testcase"):
        suite_time.suite_share([], ("*",))
