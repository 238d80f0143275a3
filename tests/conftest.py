"""Test-session setup: 8 host (CPU) devices for the sequence-parallel tests.

XLA reads `--xla_force_host_platform_device_count` when jax initialises its
backends, so the flag is set here, at import time, before any test module
imports jax. An existing XLA_FLAGS value is kept (the flag is appended), and a
device count already given there wins. Only the CPU backend is affected: every
jitted computation still runs on one device unless it is sharded.
"""

from __future__ import annotations

import os

HOST_DEVICES = 8
_FLAG = "--xla_force_host_platform_device_count"

_flags = os.environ.get("XLA_FLAGS", "")
if _FLAG not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} {_FLAG}={HOST_DEVICES}".strip()
