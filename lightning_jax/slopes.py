"""Per-head decay slopes: the official ALiBi-style construction and its per-layer scaling."""

from __future__ import annotations

import math

import jax
import numpy as np


def _power_of_two_slopes(n: int) -> list[float]:
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]


def _slopes_list(n: int) -> list[float]:
    if n & (n - 1) == 0:
        return _power_of_two_slopes(n)
    p = 2 ** math.floor(math.log2(n))
    return _power_of_two_slopes(p) + _slopes_list(2 * p)[0::2][: n - p]


def _check_layer(num_heads: int, layer_idx: int, num_layers: int) -> None:
    """The arguments of a per-layer slope function: ValueErrors naming them."""
    _check_positive_int("num_heads", num_heads)
    _check_positive_int("num_layers", num_layers)
    if isinstance(layer_idx, bool) or not isinstance(layer_idx, (int, np.integer)):
        raise ValueError(f"layer_idx must be an int, got {layer_idx!r}")
    if not 0 <= layer_idx < num_layers:
        raise ValueError(f"layer_idx must be in [0, num_layers={num_layers}), got {layer_idx}")


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def alibi_slopes(num_heads: int) -> jax.Array:
    """Decay slopes of TransNormerLLM / Lightning Attention (`_build_slope_tensor`).

    For a power of two h the slopes are start^(i+1), i = 0..h-1, with
    start = 2^(-8/h) (h = 8 gives 1/2, 1/4, ..., 1/256). For other h: the slopes
    of the largest power of two p below h, then every other slope of the 2p list,
    the first h - p of them.

    Args:
      num_heads: number of heads h >= 1.

    Returns:
      float32 array of shape `[h]`; head i decays by exp(-slope[i]) per token.
    """
    _check_positive_int("num_heads", num_heads)
    return jax.numpy.asarray(np.asarray(_slopes_list(int(num_heads)), np.float32))


def layer_slopes(num_heads: int, layer_idx: int, num_layers: int) -> jax.Array:
    """Slopes of layer `layer_idx` of `num_layers` in TransNormerLLM.

    `alibi_slopes(num_heads) * (1 - layer_idx / (num_layers - 1) + 1e-5)`: the
    first layer decays most, the last has almost no decay. A single-layer model
    uses the first layer's factor (1 + 1e-5).

    Returns:
      float32 array of shape `[num_heads]`.
    """
    _check_layer(num_heads, layer_idx, num_layers)
    ratio = layer_idx / (num_layers - 1) if num_layers > 1 else 0.0
    factor = np.float32(1.0 - ratio + 1e-5)
    return jax.numpy.asarray(np.asarray(_slopes_list(int(num_heads)), np.float32) * factor)


def minimax_slopes(num_heads: int, layer_idx: int, num_layers: int) -> jax.Array:
    """Slopes of layer `layer_idx` of `num_layers` in MiniMax-01 (`get_slope_rate`).

    `base^(i+1) * (1 - layer_idx / (num_layers - 1 + 1e-5) + 1e-5)` for heads
    i = 0..h-1 with `base = 2^(-8/h)` for every h (no power-of-two special case,
    unlike `alibi_slopes`), computed in float32 as the released model code does.
    A single-layer model has factor `1 + 1e-5` (layer 0).

    Returns:
      float32 array of shape `[num_heads]`.
    """
    _check_layer(num_heads, layer_idx, num_layers)
    base = np.float32(1.0 / (2.0 ** (8.0 / num_heads)))
    rate = base ** np.arange(1, num_heads + 1, dtype=np.float32)
    factor = np.float32(1.0 - layer_idx / (num_layers - 1 + 1e-5) + 1e-5)
    return jax.numpy.asarray((rate * factor).astype(np.float32))
