"""lightning-jax: Lightning Attention-2 (causal linear attention with decay) in JAX."""

from lightning_jax import reference
from lightning_jax.api import available_impls, lightning_attention
from lightning_jax.slopes import alibi_slopes, layer_slopes

__version__ = "0.1.0"

__all__ = [
    "alibi_slopes",
    "available_impls",
    "layer_slopes",
    "lightning_attention",
    "reference",
]
