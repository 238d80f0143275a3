"""lightning-jax: Lightning Attention-2 (causal linear attention with decay) in JAX."""

import importlib

from lightning_jax import reference
from lightning_jax.api import available_impls, lightning_attention
from lightning_jax.slopes import alibi_slopes, layer_slopes, minimax_slopes
from lightning_jax.varlen import lightning_attention_varlen

__version__ = "0.1.0"

# Flax-based parts load on first use, so `import lightning_jax` stays light.
_LAZY_SUBMODULES = ("generation", "hf", "linen", "minimax", "models", "nn")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"lightning_jax.{name}")
    if name == "generate":
        from lightning_jax.generation import generate

        return generate
    raise AttributeError(f"module 'lightning_jax' has no attribute {name!r}")


__all__ = [
    "alibi_slopes",
    "available_impls",
    "generate",
    "layer_slopes",
    "lightning_attention",
    "lightning_attention_varlen",
    "minimax_slopes",
    "reference",
]
