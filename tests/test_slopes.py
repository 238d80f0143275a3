"""alibi_slopes / layer_slopes against the official construction (written out here)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
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


def test_slope_values_are_checked_when_they_exist_not_when_traced():
    """docs/op.md's rule: negative slopes raise unless they are tracers at the call."""
    x = jnp.ones((1, 2, 8, 4))
    neg_np = np.array([-0.1, 0.2], np.float32)
    neg_jax = jnp.asarray(neg_np)  # concrete: made outside any transformation
    checked = {
        "numpy, eager": lambda: lj.lightning_attention(x, x, x, neg_np),
        "jax array, eager": lambda: lj.lightning_attention(x, x, x, neg_jax),
        "python scalar under jit": jax.jit(lambda q: lj.lightning_attention(q, q, q, -0.1)),
        "numpy closed over by jit": jax.jit(lambda q: lj.lightning_attention(q, q, q, neg_np)),
        "jax array closed over by jit": jax.jit(lambda q: lj.lightning_attention(q, q, q, neg_jax)),
        "nan slope": lambda: lj.lightning_attention(x, x, x, np.array([np.nan, 0.1])),
    }
    for name, fn in checked.items():
        with pytest.raises(ValueError, match="slopes must be finite and >= 0"):
            fn(x) if "jit" in name else fn()
    # Traced: an argument of a jitted or vmapped function has no value at trace time.
    o = jax.jit(lj.lightning_attention)(x, x, x, neg_np)
    assert o.shape == (1, 2, 8, 4)
    o = jax.vmap(lambda s: lj.lightning_attention(x, x, x, s))(np.stack([neg_np, neg_np]))
    assert o.shape == (2, 1, 2, 8, 4)
