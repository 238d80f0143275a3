"""The benchmarks on tiny sizes: bench_ops (rows, FLOP and byte counts, report, plots,
matmul ceiling) and bench_sp (bytes communicated, read from the compiled HLO)."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bench_ops
import bench_sp
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


def test_bench_ops_softmax_rows_are_causal_softmax_attention():
    """impl "softmax": jax.nn.dot_product_attention as JAX users call it ([B, T, H, D],
    causal), timed up to softmax_max_seq, counted in FLOPs as causal softmax attention;
    checked against softmax written out in numpy."""
    result = bench_ops.run(
        ["softmax"], 1, 2, 16, jnp.float32, [64, 128], 64, 1, 64, kinds=("fwd",),
        softmax_max_seq=64,
    )  # fmt: skip
    (row,) = result["rows"]
    assert (row["impl"], row["seq"]) == ("softmax", 64) and row["fwd_s"] > 0
    assert row["fwd_flops"] == bench_ops.softmax_flops(64, 1, 2, 16, 16)
    fwd, _ = bench_ops._make_fns("softmax", None)
    q, k, v = np.random.default_rng(0).standard_normal((3, 1, 5, 2, 4)).astype(np.float32)
    scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(4)
    scores = np.where(np.tril(np.ones((5, 5), bool)), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    want = np.einsum("bhts,bshd->bthd", p / p.sum(-1, keepdims=True), v)
    np.testing.assert_allclose(np.asarray(fwd(q, k, v)), want, rtol=1e-5, atol=1e-6)


def test_bench_ops_report_compares_softmax_with_each_lightning_impl():
    def row(impl, seq, seconds):
        fields = dict.fromkeys(
            ("fwd_us_per_token", "fwd_bwd_us_per_token", "fwd_gflops", "fwd_roofline",
             "fwd_bwd_roofline", "fwd_temp_bytes_per_token", "fwd_bwd_temp_bytes_per_token",
             "fresh_output_us_per_token"), 1.0,
        )  # fmt: skip
        return dict(fields, impl=impl, seq=seq, fwd_bwd_s=seconds)

    rows = [row("xla", 1024, 1.0), row("xla", 2048, 2.0), row("softmax", 1024, 3.0)]
    result = dict(matmul_gflops=1.0, peak_tflops=None, peak_gbps=None, rows=rows)
    lines = bench_ops.report(result)
    assert "[xla] fwd+bwd time of softmax / xla by seq: 1024: x3.00; xla faster at seq [1024]" in (
        lines
    )


def test_bench_ops_forward_only_with_segment_ids():
    """--fwd_only --segments=none,one,random: one forward row per (impl, segment mode)."""
    result = bench_ops.run(
        ["xla"], 1, 2, 16, jnp.float32, [256], 128, 1, 64,
        kinds=("fwd",), segments=("none", "one", "random"),
    )  # fmt: skip
    bench_ops.add_roofline(result, 0.1, None)
    rows = {r["impl"]: r for r in result["rows"]}
    assert set(rows) == {"xla", "xla+seg_one", "xla+seg_random"}
    for r in rows.values():
        assert r["fwd_s"] > 0 and "fwd_bwd_s" not in r and r["fwd_roofline"] > 0
    assert bench_ops.segment_ids_for("none", 2, 256) == ()
    (one,) = bench_ops.segment_ids_for("one", 2, 256)
    assert one.shape == (2, 256) and int(one.max()) == 0
    (runs,) = bench_ops.segment_ids_for("random", 2, 4096)
    changes = int((jnp.diff(runs, axis=1) != 0).sum())
    expected = 2 * 4096 / bench_ops.SEGMENT_MEAN_RUN  # run starts in the 2 rows
    assert expected / 2 < changes < 2 * expected
    with pytest.raises(ValueError, match="segments must be among"):
        bench_ops.segment_ids_for("many", 2, 256)


def _forward_dot_operand_shapes(
    heads: int, seq: int, dim: int, block: int, chunk: int, dim_v: int | None = None
):
    """(lhs, rhs) shapes of every dot_general in the XLA path's lowered forward."""
    dim_v = dim if dim_v is None else dim_v
    q = jnp.ones((1, heads, seq, dim))
    v = jnp.ones((1, heads, seq, dim_v))
    state = jnp.zeros((1, heads, dim, dim_v))
    slopes = jnp.full((heads,), 0.1)

    def forward(q, k, v):
        return xla.lightning_attention_xla(
            q, k, v, slopes, state, block_size=block, chunk_size=chunk
        )[0]

    text = jax.jit(forward).lower(q, q, v).as_text()
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


# d = 16, e = 32, seq 128, batch 1, 2 heads. Per row at block 64 (2 FLOPs a multiply-add):
# q K^T 2*64*16 = 2048, scores V 2*64*32 = 4096, q S 2*16*32 = 1024, K^T V 1024: 8192.
HAND_FWD_FLOPS = 8192 * 128 * 2  # 2,097,152
# float32 bytes per row and head: fwd q, k (16 wide) and v, o (32 wide): 96 * 4 = 384;
# fwd+bwd adds do, dv (32) and dq, dk (16): 192 * 4 = 768.
HAND_FWD_BYTES, HAND_FWD_BWD_BYTES = 384 * 128 * 2, 768 * 128 * 2


def test_flops_and_bytes_for_d_not_e():
    """useful_flops and moved_bytes against hand-computed values for d != e."""
    assert bench_ops.useful_flops(128, 1, 2, 16, 32) == HAND_FWD_FLOPS == 2_097_152
    assert bench_ops.moved_bytes(128, 1, 2, 16, 32, 4, "fwd") == HAND_FWD_BYTES
    assert bench_ops.moved_bytes(128, 1, 2, 16, 32, 4, "fwd_bwd") == HAND_FWD_BWD_BYTES
    # softmax: half of 2*n^2*d (scores) + 2*n^2*e (P V) = n^2 * (d + e) per head.
    assert bench_ops.softmax_flops(128, 1, 2, 16, 32) == 128 * 128 * 48 * 2
    result = bench_ops.run(["xla"], 1, 2, 16, jnp.float32, [128], 128, 1, 64, dim_v=32)
    (row,) = result["rows"]
    assert row["fwd_flops"] == HAND_FWD_FLOPS and row["fwd_bwd_flops"] == 3 * HAND_FWD_FLOPS
    assert row["fwd_bytes"] == HAND_FWD_BYTES and row["fwd_bwd_bytes"] == HAND_FWD_BWD_BYTES
    for kind in ("fwd", "fwd_bwd"):
        assert row[f"{kind}_gflops"] == pytest.approx(row[f"{kind}_flops"] / row[f"{kind}_s"] / 1e9)
        assert row[f"{kind}_gbps"] == pytest.approx(row[f"{kind}_bytes"] / row[f"{kind}_s"] / 1e9)


def test_useful_flops_are_the_xla_paths_matmuls_at_block_64():
    """At block = chunk = 64 the XLA path's forward matmuls are the counted work plus its
    block-start prefix product ([G, 2, 1] x [G, 1, d*e] per chunk), for d != e."""
    d, e, seq, heads = 16, 32, 256, 2
    shapes = _forward_dot_operand_shapes(heads, seq, d, 64, 64, dim_v=e)
    flops = [2.0 * math.prod(lhs) * rhs[-1] for lhs, rhs in shapes]
    prefix = [f for (lhs, rhs), f in zip(shapes, flops) if lhs[-2:] == (2, 1)]
    assert len(prefix) == 1  # one scan step's worth: the chunk loop is a lax.scan
    chunks = seq // 64
    counted = (sum(flops) - sum(prefix)) * chunks  # the scan body holds one chunk's dots
    assert counted == bench_ops.useful_flops(seq, 1, heads, d, e)


def test_bench_sp_counts_collective_bytes():
    """bench_sp's bytes on a 2-device mesh, against the states the combines send."""
    b, h, dim = 1, 2, 8
    state = b * h * dim * dim * 4  # one [B, H, d, e] float32 state: 512 B
    result = bench_sp.run([1, 2], [16], ["ppermute", "all_gather"], b, h, dim, "xla", 1)
    rows = {(r["devices"], r["combine"]): r for r in result["rows"]}
    assert result["state_bytes"] == state
    assert rows[(1, "-")]["fwd_comm_bytes"] == 0
    # ppermute forward: one doubling step, the shift, the final state's all-reduce.
    fwd = rows[(2, "ppermute")]
    assert fwd["fwd_comm_bytes"] == 3 * state and fwd["fwd_collectives"] == 3
    assert fwd["fwd_collective_kinds"] == {"collective-permute": 2, "all-reduce": 1}
    # all_gather forward: the P = 2 local states in one all-gather.
    gather = rows[(2, "all_gather")]
    assert gather["fwd_comm_bytes"] == 2 * state and gather["fwd_collective_kinds"] == {
        "all-gather": 1
    }
    # Forward+backward (the final state unused, so its all-reduce is gone): ppermute sends
    # 2 states forward and 2 back; all_gather gathers 2 each way; both then all-reduce the
    # final state's cotangent and the initial state's gradient (shard_map's sum).
    for r in (fwd, gather):
        assert r["fwd_bwd_comm_bytes"] == 6 * state, r


def test_collective_bytes_parses_hlo():
    text = """
  %p = f32[1,2,8,8]{3,2,1,0} parameter(0)
  %ag = f32[2,1,2,8,8]{4,3,2,1,0} all-gather(f32[1,2,8,8]{3,2,1,0} %p), dimensions={0}
  %cp = bf16[4,3]{1,0} collective-permute(bf16[4,3]{1,0} %x), source_target_pairs={{0,1}}
  ROOT %ar = (f32[2]{0}, f32[3]{0}) all-reduce-start(f32[2]{0} %a, f32[3]{0} %b), to_apply=%sum
"""
    found = bench_sp.collective_bytes(text)
    assert found["count"] == 3
    assert found["kinds"] == {"all-gather": 1, "collective-permute": 1, "all-reduce": 1}
    assert found["result_bytes"] == 2 * 2 * 8 * 8 * 4 + 4 * 3 * 2 + (2 + 3) * 4
    assert found["operand_bytes"] == 2 * 8 * 8 * 4  # %p is defined; %x, %a, %b are not
