"""alibi_slopes / layer_slopes against the official construction (written out here)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import lightning_jax as lj


def official_slopes(n: int) -> list[float]:
    """TransNormerLLM / lightning_attn `_build_slope_tensor.get_slopes`, verbatim logic."""

    def get_slopes_power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        ratio = start
        return [start * ratio**i for i in range(n)]

    if math.log2(n).is_integer():
        return get_slopes_power_of_2(n)
    closest_power_of_2 = 2 ** math.floor(math.log2(n))
    return (
        get_slopes_power_of_2(closest_power_of_2)
        + official_slopes(2 * closest_power_of_2)[0::2][: n - closest_power_of_2]
    )


def test_eight_heads_are_powers_of_one_half():
    np.testing.assert_array_equal(
        np.asarray(lj.alibi_slopes(8)), 0.5 ** np.arange(1, 9, dtype=np.float32)
    )


@pytest.mark.parametrize("heads", [1, 2, 3, 5, 6, 7, 8, 12, 16, 20, 32, 40, 64, 96])
def test_alibi_matches_official(heads):
    got = lj.alibi_slopes(heads)
    assert got.shape == (heads,) and got.dtype == np.float32
    np.testing.assert_allclose(np.asarray(got), official_slopes(heads), rtol=1e-6)


def test_layer_slopes_scale():
    h, layers = 8, 5
    base = np.asarray(lj.alibi_slopes(h))
    for idx in range(layers):
        want = base * (1 - idx / (layers - 1) + 1e-5)
        np.testing.assert_allclose(np.asarray(lj.layer_slopes(h, idx, layers)), want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(lj.layer_slopes(h, 0, 1)), base * (1 + 1e-5), rtol=1e-6)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: lj.alibi_slopes(0), "num_heads must be a positive int"),
        (lambda: lj.alibi_slopes(2.0), "num_heads must be a positive int"),
        (lambda: lj.layer_slopes(8, 4, 4), r"layer_idx must be in \[0, num_layers=4\)"),
        (lambda: lj.layer_slopes(8, -1, 4), "layer_idx must be in"),
        (lambda: lj.layer_slopes(8, 0, 0), "num_layers must be a positive int"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
