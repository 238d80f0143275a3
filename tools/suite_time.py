r"""The share of a suite's time spent in selected tests, from a pytest junit XML file.

How much a set of tests adds to the suite's time (say, on 2 cores: a budget such as
"at most 20% more"): the time of the selected tests over the time of everything else
in the same run:

    growth = added / (total - added)

Run the whole suite once with a junit file, then this script on it:

  PYTEST_ADDOPTS="--junitxml=/tmp/suite.xml" python -m pytest
  python tools/suite_time.py /tmp/suite.xml              # the precision tests
  python tools/suite_time.py /tmp/suite.xml --tests='tests/test_xla.py::*'
  python tools/suite_time.py /tmp/a.xml /tmp/b.xml   # partial runs, pooled

--tests takes fnmatch patterns (`*`, `?`, `[` quoted as `[[]`) matched against
node ids built from the junit record, `tests/test_pallas.py::TestTritonInterpret::
test_low_precision[b1h2n2048d16e16-none-blkNone-bf16]`. The default is PRECISION_TESTS:
the precision and carried-state tests (added together in commit 17b833f), including
the parametrized cases of the shared base class (`tests/op_test_base.py`), which every
implementation's class runs. A test's time is its junit `time` (setup, call
and teardown); module-level fixtures and collection are in the total only.
"""

from __future__ import annotations

import fnmatch
import json
import xml.etree.ElementTree as ET
from typing import NamedTuple

from absl import flags

from lightning_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_list(
    "tests",
    None,
    "fnmatch patterns of node ids to count as added (default: PRECISION_TESTS).",
)
flags.DEFINE_integer("top", 10, "List this many of the slowest added tests.", lower_bound=1)
flags.DEFINE_string("json", None, "Also write the figures here as JSON.")

# The precision tests (added in merge 17b833f): the long low-precision cases and the
# float32-state probe of the shared base class (every implementation), the shard_map
# type-check test moved into the base class (new for the Pallas classes; test_xla's
# own copy existed before, so TestXla's is not counted), the FLOP and collective-byte
# tests of the benchmarks, and the Pallas kernels inside sequence parallelism.
PRECISION_TESTS = (
    "*::test_low_precision[[]*n2048*",
    "*::test_low_precision[[]*n4096*",
    "*::test_carried_state_is_float32[[]*",
    "tests/test_pallas.py::*::test_inside_shard_map_with_type_checks[[]*",
    "tests/test_mosaic_gpu.py::*::test_inside_shard_map_with_type_checks[[]*",
    "tests/test_bench_ops.py::test_flops_and_bytes_for_d_not_e",
    "tests/test_bench_ops.py::test_useful_flops_are_the_xla_paths_matmuls_at_block_64",
    "tests/test_bench_ops.py::test_bench_sp_counts_collective_bytes",
    "tests/test_bench_ops.py::test_collective_bytes_parses_hlo",
    "tests/test_parallel.py::test_pallas_kernels_inside_the_combine[[]*",
    "tests/test_parallel.py::test_interpret_reaches_the_kernel[[]*",
    "tests/test_parallel.py::test_interpret_through_the_layer_and_the_config",
)


class Case(NamedTuple):
    node_id: str
    seconds: float
    outcome: str  # passed, failed, error, skipped


def node_id(classname: str, name: str) -> str:
    """pytest's node id from a junit testcase's classname and name.

    classname is dotted: `tests.test_pallas.TestTritonInterpret` or `tests.test_parallel`;
    the last part that starts with "test_" (or is "conftest") is the module, the parts
    after it are classes.
    """
    parts = classname.split(".")
    module_end = max(
        (i for i, part in enumerate(parts) if part.startswith("test_") or part == "conftest"),
        default=len(parts) - 1,
    )
    module = "/".join(parts[: module_end + 1]) + ".py"
    return "::".join([module, *parts[module_end + 1 :], name])


def read_junit(path: str) -> list[Case]:
    """Every testcase of a junit XML file (pytest's, any number of suites)."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                outcome = "failed" if tag == "failure" else tag
        cases.append(
            Case(
                node_id(case.get("classname", ""), case.get("name", "")),
                float(case.get("time", 0.0)),
                outcome,
            )
        )
    return cases


def suite_share(cases: list[Case], patterns: tuple[str, ...]) -> dict:
    """Totals, the selected tests' time and their growth over the rest of the suite.

    Raises:
      ValueError: if `cases` is empty or no pattern matches any case (a mistyped
        pattern would otherwise report 0% growth).
    """
    if not cases:
        raise ValueError("cases: the junit file holds no testcase")
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(c.node_id, p) for c in cases)]
    if len(unmatched) == len(patterns):
        raise ValueError(f"patterns: none matches a test in the junit file: {list(patterns)}")
    added = [c for c in cases if any(fnmatch.fnmatchcase(c.node_id, p) for p in patterns)]
    total = sum(c.seconds for c in cases)
    added_s = sum(c.seconds for c in added)
    rest = total - added_s
    return dict(
        tests=len(cases),
        total_s=round(total, 2),
        added_tests=len(added),
        added_s=round(added_s, 2),
        rest_s=round(rest, 2),
        growth=added_s / rest if rest > 0 else float("inf"),
        failed_or_error=sum(c.outcome in ("failed", "error") for c in cases),
        unmatched_patterns=unmatched,
        slowest_added=[
            (c.node_id, round(c.seconds, 2))
            for c in sorted(added, key=lambda c: c.seconds, reverse=True)
        ],
    )


def main(argv):
    if len(argv) < 2:
        raise cli.UsageError("usage: suite_time.py JUNIT_XML [JUNIT_XML ...] [--tests=PATTERN,...]")
    patterns = tuple(FLAGS.tests) if FLAGS.tests else PRECISION_TESTS
    paths = argv[1:]
    share = suite_share([case for path in paths for case in read_junit(path)], patterns)
    print(f"{' + '.join(paths)}: {share['tests']} tests, {share['total_s']:.1f} s in all")
    print(f"selected: {share['added_tests']} tests, {share['added_s']:.1f} s")
    print(f"rest: {share['rest_s']:.1f} s; growth = selected / rest = {share['growth']:.1%}")
    if share["failed_or_error"]:
        print(f"note: {share['failed_or_error']} tests failed or errored in this run")
    for pattern in share["unmatched_patterns"]:
        print(f"note: pattern {pattern!r} matches no test in this file")
    print(f"slowest {FLAGS.top} selected:")
    for nid, seconds in share["slowest_added"][: FLAGS.top]:
        print(f"  {seconds:8.2f} s  {nid}")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(dict(junit=paths, patterns=list(patterns), **share), f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    cli.run(main, positional=True)
