"""Test-session setup: 8 host (CPU) devices for the sequence-parallel tests.

XLA reads `--xla_force_host_platform_device_count` when jax initialises its
backends, so the flag is set here, at import time, before any test module
imports jax. An existing XLA_FLAGS value is kept (the flag is appended), and a
device count already given there wins. Only the CPU backend is affected: every
jitted computation still runs on one device unless it is sharded.
"""

from __future__ import annotations

import os

import pytest

HOST_DEVICES = 8
_FLAG = "--xla_force_host_platform_device_count"

_flags = os.environ.get("XLA_FLAGS", "")
if _FLAG not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} {_FLAG}={HOST_DEVICES}".strip()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small byte corpus (one repeated sentence) for the training tests, 10% held out."""
    import lm_data  # experiments/ is on pytest's path; imported here, after XLA_FLAGS is set

    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 400)
    return lm_data.load_corpus(path, held_out_fraction=0.1)
