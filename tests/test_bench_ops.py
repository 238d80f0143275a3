"""experiments/bench_ops.py on tiny sizes: rows, targets report, plots, matmul ceiling."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import pytest

import bench_ops
from lightning_jax import xla


def test_bench_ops_pieces(tmp_path):
    result = bench_ops.run(["xla", "reference"], 1, 2, 16, jnp.float32, [128, 256], 128, 1, 64)
    bench_ops.add_roofline(result, 0.1, None)
    rows = {(r["impl"], r["seq"]): r for r in result["rows"]}
    assert set(rows) == {("xla", 128), ("xla", 256), ("reference", 128)}
    for r in rows.values():
        assert r["fwd_s"] > 0 and r["fwd_bwd_s"] > 0 and r["fwd_temp_bytes"] >= 0
        assert r["fwd_flops"] == bench_ops.useful_flops(r["seq"], 1, 2, 16, 16)
        assert 0 < r["fwd_roofline"]
    lines = bench_ops.report(result)
    assert any(line.startswith("[xla] time/token 256 vs 128") for line in lines)
    result["config"] = dict(batch=1, heads=2, dim=16, dtype="float32", device="cpu")
    for path in bench_ops.plot(result, str(tmp_path / "ops")):
        assert (tmp_path / path).stat().st_size > 1000
    assert "| xla | 256 |" in bench_ops.markdown(result)


def _forward_dot_operand_shapes(heads: int, seq: int, dim: int, block: int, chunk: int):
    """(lhs, rhs) shapes of every dot_general in the XLA path's lowered forward."""
    q = jnp.ones((1, heads, seq, dim))
    state = jnp.zeros((1, heads, dim, dim))
    slopes = jnp.full((heads,), 0.1)

    def forward(q, k, v):
        return xla.lightning_attention_xla(
            q, k, v, slopes, state, block_size=block, chunk_size=chunk
        )[0]

    text = jax.jit(forward).lower(q, q, q).as_text()
    pairs = re.findall(
        r"stablehlo.dot_general[^\n]*:\s*\(tensor<([^>]*)>,\s*tensor<([^>]*)>\)", text
    )

    def dims(t):
        return tuple(int(x) for x in t.split("x")[:-1])

    return sorted((dims(a), dims(b)) for a, b in pairs)


def test_ceiling_times_the_xla_paths_matmuls():
    # The benchmark must time exactly the matmuls the XLA path issues per chunk.
    expected = bench_ops.chunk_matmul_shapes(groups=2, d=16, e=16, block=8, chunk=32)
    assert _forward_dot_operand_shapes(2, 64, 16, 8, 32) == sorted(expected.values())


def test_chunk_matmuls_and_ceiling_report():
    result = bench_ops.run(["xla"], 1, 2, 16, jnp.float32, [64, 128], 64, 1, 64)
    bench_ops.add_roofline(result, 0.1, None)
    ceiling = bench_ops.chunk_matmuls(1, 2, 16, 8, 32, 2, 1, 64)
    assert [r["name"] for r in ceiling["rows"]] == [
        "scores",
        "intra",
        "increments",
        "prefix",
        "inter",
    ]
    for r in ceiling["rows"]:
        assert r["flops"] == 2.0 * math.prod(r["lhs"]) * r["rhs"][-1]
    total = sum(r["seconds"] for r in ceiling["rows"])
    assert ceiling["us_per_token"] == pytest.approx(total / 32 * 1e6)
    assert ceiling["gflops"] == pytest.approx(
        bench_ops.useful_flops(32, 1, 2, 16, 16) / total / 1e9
    )
    assert ceiling["two_chains_vs_one"] > 0 and ceiling["matmul_gflops"] > 0
    result["xla_chunk_matmuls"] = ceiling
    lines = bench_ops.report(result)
    assert any(
        line.startswith("[xla] its per-chunk matmuls alone (block 8, chunk 32)") for line in lines
    )
