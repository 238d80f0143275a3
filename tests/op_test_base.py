"""One test suite for every implementation of `lj.lightning_attention`.

Each implementation subclasses `LightningOpTestBase` and sets `impl` (and, if
needed, `op_kwargs`), so a new kernel gets the whole suite by adding one class.
Every check compares against the pure-jnp references in `lightning_jax.reference`:
the numbers of each implementation against the float64 reference, with tolerances
derived by `tools/derive_tolerances.py` (tests/tolerances.json).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lightning_jax as lj
from lightning_jax import reference

# (batch, heads, seq, d, e, slopes, block_size): the awkward shapes of docs/design.md section 6.
CASES = [
    (2, 3, 1, 16, 16, "alibi", None),
    (1, 2, 63, 60, 100, "strong", None),
    (1, 2, 64, 64, 64, "none", None),
    (2, 3, 65, 16, 60, "strong", 16),
    (1, 5, 500, 100, 16, "alibi", None),
    (1, 2, 1023, 64, 128, "strong", 64),
    (1, 1, 300, 192, 32, "zero", 32),
    (1, 2, 130, 256, 64, "one", None),
    (1, 3, 97, 128, 192, "scalar", 16),
]


def case_id(case) -> str:
    b, h, n, d, e, s, blk = case
    return f"b{b}h{h}n{n}d{d}e{e}-{s}-blk{blk}"


def make_slopes(kind: str, heads: int):
    if kind == "none":
        return None
    if kind == "zero":
        return 0.0
    if kind == "scalar":
        return 0.5
    if kind == "one":
        return jnp.ones((heads,), jnp.float32)
    if kind == "alibi":
        return lj.alibi_slopes(heads)
    if kind == "strong":  # strong enough to expose an off-by-one in the block decays
        return jnp.linspace(0.3, 1.0, heads, dtype=jnp.float32)
    raise ValueError(kind)


def make_inputs(seed: int, b: int, h: int, n: int, d: int, e: int, dtype=jnp.float32):
    keys = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(keys[0], (b, h, n, d), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (b, h, n, d), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (b, h, n, e), jnp.float32).astype(dtype)
    s0 = jax.random.normal(keys[3], (b, h, d, e), jnp.float32)
    do = jax.random.normal(keys[4], (b, h, n, e), jnp.float32)
    ds = jax.random.normal(keys[5], (b, h, d, e), jnp.float32)
    return q, k, v, s0, do, ds


def max_rel_err(actual, expected) -> float:
    """max |actual - expected| relative to the expected output's scale."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    scale = max(np.max(np.abs(expected)), 1e-30)
    return float(np.max(np.abs(actual - expected)) / scale)


def rms_ratio(actual, expected) -> float:
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    return float(np.sqrt(np.mean((actual - expected) ** 2)) / np.sqrt(np.mean(expected**2)))


def assert_close(actual, expected, tol: float, what: str):
    assert np.all(np.isfinite(np.asarray(actual, np.float64))), f"{what}: non-finite values"
    err = max_rel_err(actual, expected)
    assert err <= tol, f"{what}: max error {err:.3g} of the output scale > {tol:g}"


def assert_rms_close(actual, expected, tol: float, what: str):
    assert np.all(np.isfinite(np.asarray(actual, np.float64))), f"{what}: non-finite values"
    err = rms_ratio(actual, expected)
    assert err <= tol, f"{what}: RMS error ratio {err:.3g} > {tol:g}"


def loss_and_grads(fn, q, k, v, s0, do, ds):
    """Gradients of <o, do> + <state, ds> w.r.t. q, k, v, initial_state."""

    def loss(q, k, v, s0):
        o, state = fn(q, k, v, s0)
        return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(state * ds)

    return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, s0)


def random_runs(seed: int, batch: int, seq: int, max_len: int = 12) -> np.ndarray:
    """int32 `[batch, seq]` segment ids with random run lengths, many of length 1.

    Ids alternate between a few values that repeat across non-adjacent runs
    (e.g. 7, 0, 7, 3), since only runs of equal ids matter, not the numbers.
    """
    rng = np.random.default_rng(seed)
    ids = np.zeros((batch, seq), np.int32)
    for row in ids:
        t, label = 0, 7
        while t < seq:
            length = 1 if rng.random() < 0.3 else int(rng.integers(2, max_len + 1))
            row[t : t + length] = label
            label = int(rng.choice([x for x in (0, 3, 7) if x != label]))
            t += length
    return ids


def run_starts(ids: np.ndarray) -> list[int]:
    """Positions where a new run starts in a 1-D id row (0 included)."""
    return [0] + [t for t in range(1, len(ids)) if ids[t] != ids[t - 1]]


# Identities and compositions (chain, vmap, ...) compare an implementation with itself
# or with the float32 reference at this tolerance; the numbers of each implementation
# against float64 are held to the derived tolerances below.
F32_TOL = 1e-5

# --- derived tolerances ------------------------------------------------------------------
#
# Each implementation's outputs, final state and gradients are compared with a float64
# reference (`reference.naive_attention`, or `recurrent_attention` beyond
# NAIVE_MAX_SEQ, under x64), one tolerance per impl, input dtype, case and quantity,
# read from tests/tolerances.json. `python tools/derive_tolerances.py` writes
# that file: the worst error it measures for that case (the tests' seed and extra
# seeds), times a documented factor. Per case, because the baselines differ by orders
# of magnitude between cases (a float32 state is exact to 1e-7 without decay, but the
# kernels round decayed keys to bf16 before the state update, 2e-3 with ALiBi slopes):
# one tolerance per dtype would hide a state rounded in the no-decay case. An impl,
# dtype or case missing from the file is an error, not a default.

QUANTITIES = ("o", "state", "dq", "dk", "dv", "ds0")
TOLERANCES_PATH = Path(__file__).with_name("tolerances.json")
NAIVE_MAX_SEQ = 1024  # longer references use the per-token recurrence (O(seq) memory)
LOW_PRECISION = (jnp.bfloat16, jnp.float16)
F32_SEED, LOW_PRECISION_SEED = 0, 1  # the seeds the tests use; the derivation adds others

# Low-precision cases, all with a random initial state. The last two carry information
# across many blocks (no decay; ALiBi slopes, whose weakest head keeps e^-0.25 of the
# state per 64-row block): a state rounded to the input dtype between blocks shows there.
LOW_PRECISION_CASES = [
    CASES[3],
    CASES[5],
    (1, 2, 2048, 16, 16, "none", None),
    (1, 2, 4096, 16, 32, "alibi", None),
]


def error_metric(dtype) -> str:
    """ "max": max |error| / max |reference| (float32); "rms": RMS ratio (bf16, f16)."""
    return "max" if jnp.dtype(dtype) == jnp.float32 else "rms"


def relative_error(actual, expected, metric: str) -> float:
    return max_rel_err(actual, expected) if metric == "max" else rms_ratio(actual, expected)


@functools.cache
def float64_reference(case: tuple, dtype_name: str, seed: int) -> dict[str, np.ndarray]:
    """Outputs, final state and gradients of the float64 reference on `make_inputs(seed)`.

    The reference sees the inputs as the implementation does: q, k, v rounded to
    the dtype, and the output cotangent too (the cotangent of a low-precision output
    is low precision). Cached: every implementation's test class reuses it.
    """
    b, h, n, d, e, kind, _ = case
    dtype = jnp.dtype(dtype_name)
    q, k, v, s0, do, ds = make_inputs(seed, b, h, n, d, e, dtype)
    do = do.astype(dtype)
    ref = reference.naive_attention if n <= NAIVE_MAX_SEQ else reference.recurrent_attention
    with jax.enable_x64(True):
        slopes = make_slopes(kind, h)
        x64 = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, s0, do, ds)]

        def fn(q, k, v, s0):
            return ref(q, k, v, slopes, initial_state=s0, return_final_state=True)

        o, state = jax.jit(fn)(*x64[:4])
        grads = jax.jit(functools.partial(loss_and_grads, fn))(*x64)
        values = (o, state, *grads)
        return {name: np.asarray(x, np.float64) for name, x in zip(QUANTITIES, values)}


def run_case(op_stateful, case: tuple, dtype, seed: int) -> dict[str, jax.Array]:
    """An implementation's outputs, final state and gradients on `make_inputs(seed)`.

    op_stateful(slopes, block_size) -> (q, k, v, s0) -> (o, state).
    """
    b, h, n, d, e, kind, block = case
    q, k, v, s0, do, ds = make_inputs(seed, b, h, n, d, e, dtype)
    fn = op_stateful(make_slopes(kind, h), block)
    o, state = jax.jit(fn)(q, k, v, s0)
    grads = jax.jit(functools.partial(loss_and_grads, fn))(q, k, v, s0, do, ds)
    return dict(zip(QUANTITIES, (o, state, *grads)))


def case_errors(op_stateful, case: tuple, dtype, seed: int) -> dict[str, float]:
    """Error of every quantity against the float64 reference, in `error_metric(dtype)`."""
    got = run_case(op_stateful, case, dtype, seed)
    want = float64_reference(case, jnp.dtype(dtype).name, seed)
    metric = error_metric(dtype)
    return {name: relative_error(got[name], want[name], metric) for name in QUANTITIES}


@functools.lru_cache(maxsize=1)
def _tolerance_file() -> dict:
    if not TOLERANCES_PATH.exists():
        raise FileNotFoundError(
            f"{TOLERANCES_PATH} is missing: run python tools/derive_tolerances.py "
            "--out=tests/tolerances.json"
        )
    return json.loads(TOLERANCES_PATH.read_text())


def tolerances(impl: str, dtype, case: tuple) -> dict[str, float]:
    """The derived tolerance of each quantity for `impl`, input `dtype` and `case`.

    Raises KeyError (naming the command that derives it) if the file has none.
    """
    name = jnp.dtype(dtype).name
    table = _tolerance_file()["tolerances"]
    found = table.get(impl, {}).get(name, {}).get(case_id(case))
    if found is None:
        raise KeyError(
            f"no derived tolerances for impl={impl!r}, dtype={name}, case {case_id(case)} in "
            f"{TOLERANCES_PATH}: derive them with python tools/derive_tolerances.py "
            f"--impls={impl} --dtypes={name} --out=tests/tolerances.json"
        )
    return found


class LightningOpTestBase:
    """Subclasses set `impl` and optionally `op_kwargs` passed to the op."""

    impl: ClassVar[str] = ""
    op_kwargs: ClassVar[dict[str, Any]] = {}
    # False where the op cannot sit under jax.checkpoint in this test's mode (the
    # Pallas TPU interpreter simulates memory with io_callbacks, which remat refuses).
    checkpoint_ok: ClassVar[bool] = True
    # False for an implementation that refuses `segment_ids` (NotImplementedError, tested
    # by test_segment_ids_refused_until_supported); its segment tests are skipped.
    supports_segment_ids: ClassVar[bool] = True

    def op(self, q, k, v, slopes=None, **kwargs):
        return lj.lightning_attention(q, k, v, slopes, impl=self.impl, **self.op_kwargs, **kwargs)

    def stateful(self, slopes, block_size=None):
        """(q, k, v, s0) -> (o, state) with this implementation."""
        return lambda q, k, v, s0: self.op(
            q, k, v, slopes, initial_state=s0, return_final_state=True, block_size=block_size
        )

    # --- forward and gradients against both references -----------------------------------

    def check_against_float64(self, case: tuple, dtype, seed: int) -> None:
        """Output, final state and gradients vs. the float64 reference, derived tolerances."""
        tols = tolerances(self.impl, dtype, case)
        got = run_case(self.stateful, case, dtype, seed)
        want = float64_reference(case, jnp.dtype(dtype).name, seed)
        b, h, n, d, e, *_ = case
        shapes = dict(o=(b, h, n, e), state=(b, h, d, e), dq=(b, h, n, d), dk=(b, h, n, d))
        shapes.update(dv=(b, h, n, e), ds0=(b, h, d, e))
        dtypes = dict(o=dtype, state=jnp.float32, dq=dtype, dk=dtype, dv=dtype, ds0=jnp.float32)
        metric = error_metric(dtype)
        for name in QUANTITIES:
            x = got[name]
            assert x.shape == shapes[name] and x.dtype == dtypes[name], (name, x.shape, x.dtype)
            assert np.all(np.isfinite(np.asarray(x, np.float64))), f"{name}: non-finite values"
            err = relative_error(x, want[name], metric)
            assert err <= tols[name], (
                f"{name}: {metric} error {err:.3g} vs float64 > derived tolerance "
                f"{tols[name]:.3g} ({self.impl}, {jnp.dtype(dtype).name}; {TOLERANCES_PATH.name})"
            )

    @pytest.mark.parametrize("case", CASES, ids=case_id)
    def test_forward_and_grads_f32(self, case):
        self.check_against_float64(case, jnp.float32, F32_SEED)

    @pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bf16", "f16"])
    @pytest.mark.parametrize("case", LOW_PRECISION_CASES, ids=case_id)
    def test_low_precision(self, case, dtype):
        self.check_against_float64(case, dtype, LOW_PRECISION_SEED)

    @pytest.mark.parametrize(
        "shape", [(2, 2, 40, 16, 24), (1, 2, 32, 128, 128)], ids=["padded", "aligned"]
    )
    def test_bthd_layout_matches_reference(self, shape):
        """layout="bthd": output, state and gradients equal the reference's (bhtd).

        "padded": widths and length that the kernels pad (or transpose); "aligned":
        power-of-two widths of 128 lanes and a whole number of blocks, which the
        Triton and Mosaic TPU kernels address in place. With packed runs.
        """
        b, h, n, d, e = shape
        q, k, v, s0, do, ds = make_inputs(3, b, h, n, d, e)
        slopes = lj.alibi_slopes(h)
        ids = jnp.asarray(random_runs(3, b, n, max_len=20))
        if not self.supports_segment_ids:
            ids = None

        def ours(q, k, v, s0):
            t = functools.partial(jnp.swapaxes, axis1=1, axis2=2)
            o, state = self.op(
                t(q), t(k), t(v), slopes, initial_state=s0, return_final_state=True,
                segment_ids=ids, layout="bthd",
            )  # fmt: skip
            assert o.shape == (b, n, h, e), o.shape
            return t(o), state

        def ref(q, k, v, s0):
            return reference.naive_attention(
                q, k, v, slopes, initial_state=s0, return_final_state=True, segment_ids=ids
            )

        for name, got, want in zip(("o", "state"), jax.jit(ours)(q, k, v, s0), ref(q, k, v, s0)):
            assert_close(got, want, F32_TOL, name)
        grads = jax.jit(functools.partial(loss_and_grads, ours))(q, k, v, s0, do, ds)
        for name, got, want in zip(QUANTITIES[2:], grads, loss_and_grads(ref, q, k, v, s0, do, ds)):
            assert_close(got, want, F32_TOL, name)

    @pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bf16", "f16"])
    def test_carried_state_is_float32(self, dtype):
        """The state (forward, dQ sweep) and dKV (backward sweep) carried between blocks
        are float32: exact values that a state rounded to the input dtype loses.

        Only column/row 0 is non-zero, no decay, 1024 rows. Forward: rows 0 and 1 add
        1 and delta = 2^-12 to the state, row 512 adds -1, so from row 512 on the state
        is exactly delta; rounded to bf16 or f16 between blocks, 1 + delta became 1 and
        the state 0. Rows >= 768 lie in blocks (or XLA chunks, 256 rows) that start
        after row 512's, where the kernels' own rounding of the block-start state for
        the matmul is exact (delta is a bf16 and f16 number): o and dq there must be
        exactly delta, and so must the final state. Backward: the mirror image (q rows
        n-1, n-2, n-513 with do = e_0), so dK, dV on rows < 256 and d initial_state
        are exactly delta.
        """
        b, h, n, d, e, delta = 1, 1, 1024, 16, 16, 2.0**-12
        col0 = functools.partial(jnp.zeros, (b, h, n, d), jnp.float32)

        def rows(values: dict) -> jax.Array:  # [1, 1, n, 16] with x[..., t, 0] = values[t]
            x = col0()
            for t, value in values.items():
                x = x.at[..., t, 0].set(value)
            return x

        def fn(q, k, v, s0):
            return self.op(q, k, v, None, initial_state=s0, return_final_state=True)

        grads = jax.jit(functools.partial(loss_and_grads, fn))
        zeros_state = jnp.zeros((b, h, d, e), jnp.float32)
        ones = col0().at[..., 0].set(1.0)
        # Forward and the dQ sweep.
        q, k = ones.astype(dtype), rows({0: 1.0, 1: 1.0, 512: 1.0}).astype(dtype)
        v = rows({0: 1.0, 1: delta, 512: -1.0}).astype(dtype)
        o, state = jax.jit(fn)(q, k, v, zeros_state)
        dq = grads(q, k, v, zeros_state, ones, zeros_state)[0]
        exact = np.zeros((b, h, n - 768, e))
        exact[..., 0] = delta
        np.testing.assert_array_equal(np.asarray(o[..., 768:, :], np.float64), exact, "o")
        np.testing.assert_array_equal(np.asarray(dq[..., 768:, :], np.float64), exact, "dq")
        assert state.dtype == jnp.float32 and float(state[0, 0, 0, 0]) == delta, state[0, 0, 0]
        # The dK, dV sweep, from the end: q^T do adds 1, delta, then -1 at row n-513.
        q = rows({n - 1: 1.0, n - 2: delta, n - 513: -1.0}).astype(dtype)
        k = v = ones.astype(dtype)
        _, dk, dv, ds0 = grads(q, k, v, zeros_state, ones, zeros_state)
        exact = np.zeros((b, h, 256, d))
        exact[..., 0] = delta
        np.testing.assert_array_equal(np.asarray(dk[..., :256, :], np.float64), exact, "dk")
        np.testing.assert_array_equal(np.asarray(dv[..., :256, :], np.float64), exact, "dv")
        assert float(ds0[0, 0, 0, 0]) == delta, ds0[0, 0, 0]

    # --- identities -------------------------------------------------------------------------

    @pytest.mark.parametrize("split", [1, 37, 100])
    def test_chain_identity(self, split):
        """[x1; x2] in one call == x1, then x2 from x1's final state."""
        b, h, n, d, e = 1, 3, 160, 24, 40
        slopes = make_slopes("strong", h)
        q, k, v, s0, _, _ = make_inputs(2, b, h, n, d, e)
        fn = jax.jit(self.stateful(slopes, 32))
        o, state = fn(q, k, v, s0)
        o1, mid = fn(q[:, :, :split], k[:, :, :split], v[:, :, :split], s0)
        o2, end = fn(q[:, :, split:], k[:, :, split:], v[:, :, split:], mid)
        assert_close(jnp.concatenate([o1, o2], axis=2), o, F32_TOL, "chained o")
        assert_close(end, state, F32_TOL, "chained final state")

    def test_seq_one_is_one_recurrence_step(self):
        b, h, d, e = 2, 3, 8, 12
        slopes = make_slopes("alibi", h)
        q, k, v, s0, _, _ = make_inputs(3, b, h, 1, d, e)
        o, state = self.op(q, k, v, slopes, initial_state=s0, return_final_state=True)
        lam = jnp.exp(-slopes)[None, :, None, None]
        expected_state = lam * s0 + k[:, :, 0, :, None] * v[:, :, 0, None, :]
        expected_o = jnp.einsum("bhd,bhde->bhe", q[:, :, 0], expected_state, precision="highest")
        assert_close(state, expected_state, F32_TOL, "state")
        assert_close(o[:, :, 0], expected_o, F32_TOL, "o")

    def test_deterministic(self):
        q, k, v, s0, do, ds = make_inputs(4, 1, 2, 200, 32, 32)
        fn = self.stateful(make_slopes("alibi", 2))
        grad_fn = jax.jit(functools.partial(loss_and_grads, fn))
        first = (jax.jit(fn)(q, k, v, s0), grad_fn(q, k, v, s0, do, ds))
        second = (jax.jit(fn)(q, k, v, s0), grad_fn(q, k, v, s0, do, ds))
        for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    def test_defaults_return_only_output(self):
        q, k, v, *_ = make_inputs(5, 1, 2, 20, 8, 8)
        o = self.op(q, k, v)
        assert isinstance(o, jax.Array) and o.shape == (1, 2, 20, 8)
        assert_close(o, reference.naive_attention(q, k, v), F32_TOL, "o without state")

    # --- packed sequences (segment_ids) ------------------------------------------------------

    def _require_segments(self):
        if not self.supports_segment_ids:
            pytest.skip(f"impl={self.impl!r} does not take segment_ids yet (refusal tested)")

    def _check_segments(self, q, k, v, s0, do, ds, slopes, ids, block_size):
        """Forward, final state and all gradients with `ids` vs the reference's."""
        fn = self.stateful_segments(slopes, ids, block_size)

        def ref_fn(q, k, v, s0):
            return reference.naive_attention(
                q, k, v, slopes, initial_state=s0, return_final_state=True, segment_ids=ids
            )

        o, state = jax.jit(fn)(q, k, v, s0)
        o_ref, state_ref = ref_fn(q, k, v, s0)
        o_rec, state_rec = reference.recurrent_attention(
            q, k, v, slopes, initial_state=s0, return_final_state=True, segment_ids=ids
        )
        for name, got, want in (
            ("o vs naive", o, o_ref),
            ("final state vs naive", state, state_ref),
            ("o vs recurrent", o, o_rec),
            ("final state vs recurrent", state, state_rec),
        ):
            assert_close(got, want, F32_TOL, name)
        grads = jax.jit(functools.partial(loss_and_grads, fn))(q, k, v, s0, do, ds)
        ref_grads = loss_and_grads(ref_fn, q, k, v, s0, do, ds)
        for name, g, g_ref in zip(("dq", "dk", "dv", "d_initial_state"), grads, ref_grads):
            assert_close(g, g_ref, F32_TOL, name)

    def stateful_segments(self, slopes, ids, block_size=None):
        """(q, k, v, s0) -> (o, state) with `segment_ids=ids`."""
        return lambda q, k, v, s0: self.op(
            q,
            k,
            v,
            slopes,
            initial_state=s0,
            return_final_state=True,
            block_size=block_size,
            segment_ids=ids,
        )

    def test_segment_ids_refused_until_supported(self):
        q, k, v, *_ = make_inputs(20, 1, 2, 12, 8, 8)
        ids = jnp.zeros((1, 12), jnp.int32)
        if self.supports_segment_ids:
            self.op(q, k, v, segment_ids=ids)
        else:
            with pytest.raises(NotImplementedError, match=f"segment_ids .*impl={self.impl!r}"):
                self.op(q, k, v, segment_ids=ids)

    @pytest.mark.parametrize(
        "b, h, n, d, e, kind, block",
        [(2, 2, 83, 16, 24, "strong", 16), (1, 3, 150, 8, 8, "alibi", 32)],
    )
    def test_segments_random_runs(self, b, h, n, d, e, kind, block):
        """Random run lengths (many of length 1), ids reused across runs: vs the references."""
        self._require_segments()
        slopes = make_slopes(kind, h)
        q, k, v, s0, do, ds = make_inputs(21, b, h, n, d, e)
        ids = jnp.asarray(random_runs(21, b, n))
        self._check_segments(q, k, v, s0, do, ds, slopes, ids, block)

    def test_segment_boundary_at_every_offset(self):
        """Row r of 16: runs [0, 16+r), [16+r] (length 1), (16+r, 48) with 16-row blocks.

        So every offset 0..15 within a block holds a boundary in some row, and the
        length-1 run puts two boundaries in one block (or the second on the next
        block's edge, r = 15).
        """
        self._require_segments()
        block, n = 16, 48
        q, k, v, s0, do, ds = make_inputs(22, block, 2, n, 8, 12)
        t = np.arange(n)[None, :]
        at = block + np.arange(block)[:, None]
        ids = jnp.asarray(np.where(t < at, 5, np.where(t == at, 9, 5)), jnp.int32)
        self._check_segments(q, k, v, s0, do, ds, make_slopes("strong", 2), ids, block)

    def test_segments_equal_separate_runs(self):
        """Packed == each run separately (the reference without segment ids): outputs,
        the final state and every gradient; the first run starts from s0, the others
        from zero."""
        self._require_segments()
        h, n, d, e = 2, 70, 8, 12
        slopes = make_slopes("strong", h)
        q, k, v, s0, do, ds = make_inputs(23, 1, h, n, d, e)
        ids_np = random_runs(23, 1, n)
        starts = run_starts(ids_np[0]) + [n]
        fn = self.stateful_segments(slopes, jnp.asarray(ids_np), 16)

        def separate(q, k, v, s0):
            outs, state = [], s0
            for i, (lo, hi) in enumerate(zip(starts[:-1], starts[1:])):
                state_in = s0 if i == 0 else jnp.zeros_like(s0)
                o, state = reference.naive_attention(
                    q[:, :, lo:hi],
                    k[:, :, lo:hi],
                    v[:, :, lo:hi],
                    slopes,
                    initial_state=state_in,
                    return_final_state=True,
                )
                outs.append(o)
            return jnp.concatenate(outs, axis=2), state

        for name, got, want in zip(
            ("o", "final state"), jax.jit(fn)(q, k, v, s0), separate(q, k, v, s0)
        ):
            assert_close(got, want, F32_TOL, name)
        grads = jax.jit(functools.partial(loss_and_grads, fn))(q, k, v, s0, do, ds)
        want = loss_and_grads(separate, q, k, v, s0, do, ds)
        for name, g, g_ref in zip(("dq", "dk", "dv", "d_initial_state"), grads, want):
            assert_close(g, g_ref, F32_TOL, name)

    def test_segments_chain_identity(self):
        """Packed [x1; x2] in one call == x1, then x2 from x1's final state, when the
        split falls inside a run (a run that starts at the split would instead start
        from zero: the caller passes a zero state there)."""
        self._require_segments()
        b, h, n, d, e = 2, 2, 90, 8, 8
        slopes = make_slopes("strong", h)
        q, k, v, s0, _, _ = make_inputs(24, b, h, n, d, e)
        ids = random_runs(24, b, n)
        split = next(t for t in range(40, n) if (ids[:, t] == ids[:, t - 1]).all())
        ids = jnp.asarray(ids)
        o, state = jax.jit(self.stateful_segments(slopes, ids, 16))(q, k, v, s0)
        first = self.stateful_segments(slopes, ids[:, :split], 16)
        second = self.stateful_segments(slopes, ids[:, split:], 16)
        o1, mid = first(q[:, :, :split], k[:, :, :split], v[:, :, :split], s0)
        o2, end = second(q[:, :, split:], k[:, :, split:], v[:, :, split:], mid)
        assert_close(jnp.concatenate([o1, o2], axis=2), o, F32_TOL, "chained o")
        assert_close(end, state, F32_TOL, "chained final state")

    def test_one_segment_equals_no_segments(self):
        """All ids equal (any value) == segment_ids=None."""
        self._require_segments()
        q, k, v, s0, _, _ = make_inputs(25, 1, 2, 40, 8, 8)
        slopes = make_slopes("alibi", 2)
        ids = jnp.full((1, 40), 3, jnp.int32)
        for got, want in zip(
            self.stateful_segments(slopes, ids, 16)(q, k, v, s0),
            self.stateful(slopes, 16)(q, k, v, s0),
        ):
            assert_close(got, want, F32_TOL, "one segment")

    def varlen(self, q, k, v, slopes=None, **kwargs):
        return lj.lightning_attention_varlen(
            q, k, v, slopes, impl=self.impl, **self.op_kwargs, **kwargs
        )

    def test_varlen_equals_separate_sequences(self):
        """Packed prefill of 4 sequences (one of length 1), each from its own state ==
        each sequence alone with the reference: outputs, final states, all gradients."""
        self._require_segments()
        h, d, e = 2, 8, 12
        lengths = [1, 17, 30, 9]
        cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        total, n = int(cu[-1]), len(lengths)
        slopes = make_slopes("strong", h)
        q, k, v, _, do, _ = make_inputs(26, 1, h, total, d, e)
        keys = jax.random.split(jax.random.PRNGKey(27), 2)
        states0 = jax.random.normal(keys[0], (n, h, d, e))
        d_states = jax.random.normal(keys[1], (n, h, d, e))

        def packed(q, k, v, states0):
            return self.varlen(
                q,
                k,
                v,
                slopes,
                cu_seqlens=cu,
                initial_states=states0,
                return_final_states=True,
                block_size=16,
            )

        def separate(q, k, v, states0):
            outs, finals = [], []
            for i in range(n):
                rows = slice(int(cu[i]), int(cu[i + 1]))
                o, state = reference.naive_attention(
                    q[:, :, rows],
                    k[:, :, rows],
                    v[:, :, rows],
                    slopes,
                    initial_state=states0[i][None],
                    return_final_state=True,
                )
                outs.append(o)
                finals.append(state[0])
            return jnp.concatenate(outs, axis=2), jnp.stack(finals)

        got, want = jax.jit(packed)(q, k, v, states0), separate(q, k, v, states0)
        assert got[1].shape == (n, h, d, e) and got[1].dtype == jnp.float32
        for name, a, b in zip(("o", "final states"), got, want):
            assert_close(a, b, F32_TOL, name)
        grads = jax.jit(functools.partial(loss_and_grads, packed))(q, k, v, states0, do, d_states)
        ref_grads = loss_and_grads(separate, q, k, v, states0, do, d_states)
        for name, g, g_ref in zip(("dq", "dk", "dv", "d_initial_states"), grads, ref_grads):
            assert_close(g, g_ref, F32_TOL, name)
        # Without states: plain outputs, equal to the zero-state run.
        o = self.varlen(q, k, v, slopes, cu_seqlens=cu, block_size=16)
        assert_close(o, separate(q, k, v, jnp.zeros_like(states0))[0], F32_TOL, "o, no states")

    @pytest.mark.parametrize(
        "change, error, match",
        [
            (dict(cu_seqlens=np.array([0, 5, 5, 20])), ValueError, "strictly increasing"),
            (dict(cu_seqlens=np.array([0, 12, 8, 20])), ValueError, "strictly increasing"),
            (dict(cu_seqlens=np.array([2, 8, 20])), ValueError, "cu_seqlens must start at 0"),
            (dict(cu_seqlens=np.array([0, 8, 19])), ValueError, "cu_seqlens must end at total"),
            (dict(cu_seqlens=np.array([0, 8, 21])), ValueError, "cu_seqlens must end at total"),
            (dict(cu_seqlens=np.array([0])), ValueError, r"cu_seqlens must have shape \[n \+ 1\]"),
            (dict(cu_seqlens=np.array([[0, 20]])), ValueError, "cu_seqlens must have shape"),
            (dict(cu_seqlens=np.array([0.0, 20.0])), TypeError, "cu_seqlens must have an integer"),
            (
                dict(initial_states=jnp.zeros((3, 2, 8, 8))),
                ValueError,
                r"initial_states must have shape \[n, heads, d, e\]",
            ),
            (dict(initial_states=jnp.zeros((2, 2, 8, 4))), ValueError, "initial_states must have"),
            (dict(batch=2), ValueError, r"packed with batch 1 \(\[1, heads, total, dim\]"),
            (dict(return_final_states=1), TypeError, "return_final_states must be a bool"),
        ],
    )
    def test_varlen_bad_input(self, change, error, match):
        change = dict(change)
        batch = change.pop("batch", 1)
        x = jnp.zeros((batch, 2, 20, 8))
        args = dict(cu_seqlens=np.array([0, 8, 20], np.int32))
        args.update(change)
        with pytest.raises(error, match=match):
            self.varlen(x, x, x, **args)

    def test_varlen_traced_cu_seqlens_is_refused(self):
        x = jnp.zeros((1, 2, 20, 8))
        with pytest.raises(TypeError, match="cu_seqlens must be concrete"):
            jax.jit(lambda cu: self.varlen(x, x, x, cu_seqlens=cu))(jnp.array([0, 8, 20]))

    # --- composition -------------------------------------------------------------------------

    def test_vmap(self):
        q, k, v, s0, _, _ = make_inputs(6, 1, 2, 50, 8, 8)
        xs = [jnp.stack([x, 2 * x, -x]) for x in (q, k, v, s0)]
        slopes = make_slopes("strong", 2)
        batched = jax.vmap(self.stateful(slopes))(*xs)
        for i in range(3):
            single = self.stateful(slopes)(*(x[i] for x in xs))
            for a, b in zip(batched, single):
                assert_close(a[i], b, F32_TOL, f"vmap item {i}")

    def test_checkpoint_and_scan_over_layers(self):
        """grad through lax.scan over layers of jax.checkpoint(op) == the reference's."""
        remat = jax.checkpoint if self.checkpoint_ok else (lambda f: f)
        b, h, n, d, layers = 1, 2, 70, 16, 3
        q, k, v, *_ = make_inputs(7, b, h, n, d, d)
        w = jax.random.normal(jax.random.PRNGKey(8), (layers, d, d)) / np.sqrt(d)
        slopes = make_slopes("alibi", h)

        def model(attn):
            def run(w, x):
                def layer(x, w_l):
                    y = attn(jnp.tanh(x @ w_l), jnp.tanh(x), x, slopes)
                    return x + y / n, None

                return jnp.sum(jnp.tanh(jax.lax.scan(remat(layer), x, w)[0]))

            return jax.jit(jax.grad(run, argnums=(0, 1)))

        got = model(self.op)(w, q)
        want = model(reference.naive_attention)(w, q)
        for a, b in zip(got, want):
            assert_close(a, b, 1e-4, "grad through scan(checkpoint(layer))")

    @pytest.mark.parametrize("initial_state", ["none", "replicated"])
    def test_inside_shard_map_with_type_checks(self, initial_state):
        """Data-parallel under jax.shard_map(check_vma=True): forward and grads.

        The batch is sharded over two devices; a replicated initial state is typed as
        the same on both, so its gradient must come back summed over them.
        """
        from jax.sharding import Mesh, PartitionSpec

        mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
        slopes = make_slopes("alibi", 2)
        q, k, v, s0, do, ds = make_inputs(14, 2, 2, 520, 16, 16)  # XLA path: 2 chunks + tail
        s0 = s0[:1]  # [1, H, d, e]: one state for both batch rows
        with_s0 = initial_state == "replicated"

        def op(q, k, v, s0):
            local = jnp.broadcast_to(s0, (q.shape[0], *s0.shape[1:])) if with_s0 else None
            return self.op(q, k, v, slopes, initial_state=local, return_final_state=True)

        def ref(q, k, v, s0):
            full = jnp.broadcast_to(s0, (q.shape[0], *s0.shape[1:])) if with_s0 else None
            return reference.naive_attention(
                q, k, v, slopes, initial_state=full, return_final_state=True
            )

        data = PartitionSpec("data")
        in_specs = (data, data, data, PartitionSpec())
        sharded = jax.shard_map(op, mesh=mesh, in_specs=in_specs, out_specs=data, check_vma=True)
        for got, want in zip(jax.jit(sharded)(q, k, v, s0), ref(q, k, v, s0), strict=True):
            assert_close(got, want, F32_TOL, "forward")
        got = jax.jit(lambda *a: loss_and_grads(sharded, *a))(q, k, v, s0, do, ds)
        want = loss_and_grads(ref, q, k, v, s0, do, ds)
        for name, a, b in zip(("dq", "dk", "dv", "ds0"), got, want, strict=True):
            if name != "ds0" or with_s0:
                assert_close(a, b, F32_TOL, name)

    def test_slopes_are_constants(self):
        """Slopes get no gradient (as in the paper); documented in the docstring."""
        q, k, v, *_ = make_inputs(9, 1, 2, 20, 8, 8)
        g = jax.grad(lambda s: jnp.sum(self.op(q, k, v, s)))(jnp.array([0.1, 0.2]))
        np.testing.assert_array_equal(np.asarray(g), np.zeros(2))

    # --- bad input ---------------------------------------------------------------------------

    @pytest.mark.parametrize(
        "change, error, match",
        [
            (dict(q=jnp.zeros((2, 10, 8))), ValueError, "q must have rank 4"),
            (dict(v=jnp.zeros((1, 2, 10))), ValueError, "v must have rank 4"),
            (dict(k=jnp.zeros((1, 2, 10, 9))), ValueError, "q and k must have the same shape"),
            (dict(k=jnp.zeros((1, 3, 10, 8))), ValueError, "q and k must have the same shape"),
            (dict(v=jnp.zeros((1, 2, 11, 8))), ValueError, "v must match q"),
            (dict(v=jnp.zeros((2, 2, 10, 8))), ValueError, "v must match q"),
            (
                dict(
                    q=jnp.zeros((1, 2, 0, 8)), k=jnp.zeros((1, 2, 0, 8)), v=jnp.zeros((1, 2, 0, 8))
                ),
                ValueError,
                "non-empty",
            ),
            (
                dict(q=jnp.zeros((1, 2, 10, 8), jnp.int32)),
                TypeError,
                "q must have a floating dtype",
            ),
            (
                dict(v=jnp.zeros((1, 2, 10, 8), jnp.bool_)),
                TypeError,
                "v must have a floating dtype",
            ),
            (
                dict(slopes=jnp.zeros((3,))),
                ValueError,
                r"slopes must be None, a scalar or shape \[heads\]",
            ),
            (dict(slopes=jnp.zeros((1, 2))), ValueError, "slopes must be None"),
            (dict(slopes=jnp.array([True, False])), TypeError, "slopes must be real numbers"),
            (dict(slopes=True), TypeError, "slopes must be None, a number"),
            (dict(slopes="0.5"), TypeError, "slopes must be None, a number, a sequence"),
            (
                dict(k=jnp.zeros((1, 2, 10, 8), jnp.bfloat16)),
                TypeError,
                "q, k and v must have the same dtype; got q float32, k bfloat16, v float32",
            ),
            (dict(layout="bsd"), ValueError, r"layout must be one of \('bhtd', 'bthd'\)"),
            (
                # [B, T, H, D] passed with the default layout: the hint names the other one.
                dict(
                    q=jnp.zeros((1, 10, 2, 8)),
                    k=jnp.zeros((1, 10, 2, 8)),
                    v=jnp.zeros((1, 10, 2, 8)),
                    slopes=jnp.ones(2),
                ),
                ValueError,
                r"got shape \(2,\); q \(1, 10, 2, 8\) has 2 heads in layout='bthd'.*"
                r"pass layout='bthd'",
            ),  # fmt: skip
            (
                dict(
                    q=jnp.zeros((1, 10, 2, 8)),
                    k=jnp.zeros((1, 10, 2, 8)),
                    v=jnp.zeros((1, 10, 2, 8)),
                    initial_state=jnp.zeros((1, 2, 8, 8)),
                ),
                ValueError,
                "initial_state must have shape.*pass layout='bthd'",
            ),  # fmt: skip
            (
                dict(layout="bthd", segment_ids=jnp.zeros((1, 10), jnp.int32)),
                ValueError,
                "segment_ids must have shape.*has 10 seq in layout='bhtd'.*pass layout='bhtd'",
            ),
            (dict(slopes=jnp.array([0.1, -0.2])), ValueError, "slopes must be finite and >= 0"),
            (dict(slopes=-1.0), ValueError, "slopes must be finite and >= 0"),
            (dict(slopes=float("nan")), ValueError, "slopes must be finite and >= 0"),
            (
                dict(initial_state=jnp.zeros((1, 2, 8, 7))),
                ValueError,
                "initial_state must have shape",
            ),
            (dict(initial_state=jnp.zeros((2, 8, 8))), ValueError, "initial_state must have shape"),
            (
                dict(initial_state=jnp.zeros((1, 2, 8, 8), jnp.int32)),
                TypeError,
                "initial_state must have a floating",
            ),
            (dict(block_size=0), ValueError, "block_size must be None or a positive int"),
            (dict(block_size=-16), ValueError, "block_size must be None or a positive int"),
            (dict(block_size=16.0), ValueError, "block_size must be None or a positive int"),
            (dict(impl="flash"), ValueError, r"impl must be one of \('auto'"),
            (dict(return_final_state="yes"), TypeError, "return_final_state must be a bool"),
            (
                dict(segment_ids=jnp.zeros((1, 11), jnp.int32)),
                ValueError,
                r"segment_ids must have shape \[batch, seq\]",
            ),
            (
                dict(segment_ids=jnp.zeros((2, 10), jnp.int32)),
                ValueError,
                r"segment_ids must have shape \[batch, seq\]",
            ),
            (
                dict(segment_ids=jnp.zeros((1, 2, 10), jnp.int32)),
                ValueError,
                r"segment_ids must have shape \[batch, seq\]",
            ),
            (
                dict(segment_ids=jnp.zeros((1, 10), jnp.float32)),
                TypeError,
                "segment_ids must have an integer dtype",
            ),
            (dict(segment_ids=[[0] * 10]), TypeError, "segment_ids must be an integer"),
        ],
    )
    def test_bad_input(self, change, error, match):
        args = dict(
            q=jnp.zeros((1, 2, 10, 8)), k=jnp.zeros((1, 2, 10, 8)), v=jnp.zeros((1, 2, 10, 8))
        )
        args.update(change)
        if "impl" not in change:
            args["impl"] = self.impl
            args.update(self.op_kwargs)
        q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
        slopes = args.pop("slopes", None)
        with pytest.raises(error, match=match):
            lj.lightning_attention(q, k, v, slopes, **args)
