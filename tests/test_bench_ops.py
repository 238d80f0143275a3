"""experiments/bench_ops.py on tiny sizes: rows, targets report, plots."""

from __future__ import annotations

import jax.numpy as jnp

import bench_ops


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
