"""Flax Linen wrapper of the TransNormerLLM token mixer, for Linen codebases.

`LightningAttention` here computes exactly what `lightning_jax.nn.LightningAttention`
computes, with the same arguments (in the same order: `in_features, num_heads`
positional, the rest by keyword), the same features (`segment_ids`, decoding,
sequence parallelism over a mesh) and the same parameter tree (`{"qkvu_proj":
{"kernel"}, "out_proj": {"kernel"}}`), so weights copy over in either
direction. The slopes are constants computed from (num_heads, layer_idx,
num_layers), not variables. Decoding keeps the float32 state in the "cache"
collection, as Linen's `MultiHeadDotProductAttention` does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lightning_jax.api import lightning_attention
from lightning_jax.nn import (
    check_features,
    check_interpret,
    check_sequence_parallel,
    merge_heads,
    resolve_head_dim,
    simple_rms_norm,
    split_qkvu,
)
from lightning_jax.parallel import lightning_attention_sharded
from lightning_jax.slopes import layer_slopes


class LightningAttention(nn.Module):
    """TransNormerLLM token mixer (see `lightning_jax.nn.LightningAttention`), Linen form.

    The attributes are the NNX layer's arguments, in its order: `in_features`
    and `num_heads` may be positional (`LightningAttention(64, 4)` as
    `nn.LightningAttention(64, 4, rngs=...)`), the others are best passed by
    keyword. Linen infers the input width, so `in_features` may be left None.

    Attributes:
      in_features: input width D (None: taken from the input; else checked against it).
      num_heads: number of heads H (required).
      head_dim: per-head width d (None: D // H for inputs of width D).
      layer_idx: index of this layer in the stack, for the slopes.
      num_layers: number of layers in the stack, for the slopes.
      impl: implementation of the op (`lightning_jax.available_impls()`).
      block_size: block size of the op's tiling (None: its default).
      interpret: Pallas implementations only: run the kernel in the Pallas
        interpreter (None: exactly when the default backend is CPU).
      epsilon: epsilon of the output norm.
      dtype: compute dtype (None: inferred from inputs and params).
      param_dtype: dtype of the kernels.
      precision: matmul precision of the projections.
      kernel_init: initialiser of the qkvu projection.
      out_kernel_init: initialiser of the output projection (None: kernel_init).
      mesh: a `jax.sharding.Mesh` to run the op sequence-parallel over (with
        `seq_axis`; see `lightning_jax.parallel.lightning_attention_sharded`).
      seq_axis: the mesh axis (or axes) the sequence is split over.
      batch_axis: the mesh axis (or axes) the batch is split over (None: replicated).
    """

    in_features: int | None = None
    num_heads: int | None = None
    head_dim: int | None = None
    layer_idx: int = 0
    num_layers: int = 1
    impl: str = "auto"
    block_size: int | None = None
    interpret: bool | None = None
    epsilon: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Callable = nn.initializers.lecun_normal()
    out_kernel_init: Callable | None = None
    mesh: Any = None
    seq_axis: Any = None
    batch_axis: Any = None

    @nn.compact
    def __call__(
        self, x: jax.Array, *, decode: bool = False, segment_ids: jax.Array | None = None
    ) -> jax.Array:
        """Mixes tokens causally.

        Args:
          x: `[B, T, D]` inputs.
          decode: continue from the state in the "cache" collection and store
            the new one (apply with `mutable=["cache"]`). The first call with
            decode=True (normally `init`) creates a zero state and leaves it
            unchanged, as Linen's attention does.
          segment_ids: optional int `[B, T]` ids of packed documents: a token
            mixes only with earlier tokens of its own run of equal ids (the
            state resets where the id changes; see `lightning_attention`). With
            `decode`, the cached state feeds the first run and the last run's
            state is stored.

        Returns:
          `[B, T, D]` in the compute dtype.
        """
        what = "linen.LightningAttention"
        if isinstance(self.num_heads, bool) or not isinstance(self.num_heads, int):
            raise TypeError(f"{what}: num_heads (required) must be an int, got {self.num_heads!r}")
        check_features(x, self.in_features, what)
        check_sequence_parallel(what, self.mesh, self.seq_axis, self.batch_axis)
        check_interpret(what, self.interpret)
        in_features = x.shape[-1]
        head_dim = resolve_head_dim(in_features, self.num_heads, self.head_dim)
        hidden = self.num_heads * head_dim
        dense = dict(
            use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision
        )
        qkvu = nn.Dense(4 * hidden, kernel_init=self.kernel_init, name="qkvu_proj", **dense)(x)
        q, k, v, u = split_qkvu(qkvu, self.num_heads, head_dim)
        slopes = layer_slopes(self.num_heads, self.layer_idx, self.num_layers)
        op_kwargs = dict(
            impl=self.impl, block_size=self.block_size, interpret=self.interpret, layout="bthd"
        )
        if segment_ids is not None:
            op_kwargs["segment_ids"] = segment_ids
        if decode:
            initialized = self.has_variable("cache", "state")
            shape = (x.shape[0], self.num_heads, head_dim, head_dim)
            state = self.variable("cache", "state", jnp.zeros, shape, jnp.float32)
            if initialized and state.value.shape != shape:
                raise ValueError(
                    f"linen.LightningAttention: the cache was made for batch size "
                    f"{state.value.shape[0]}, but the input has batch size {x.shape[0]}"
                )
            o, new_state = lightning_attention(
                q, k, v, slopes, initial_state=state.value, return_final_state=True, **op_kwargs
            )
            if initialized:
                state.value = new_state
        elif self.seq_axis is not None:
            o = lightning_attention_sharded(
                q,
                k,
                v,
                slopes,
                mesh=self.mesh,
                seq_axis=self.seq_axis,
                batch_axis=self.batch_axis,
                **op_kwargs,
            )
        else:
            o = lightning_attention(q, k, v, slopes, **op_kwargs)
        y = simple_rms_norm(merge_heads(o), self.epsilon) * u
        out_init = self.out_kernel_init or self.kernel_init
        return nn.Dense(in_features, kernel_init=out_init, name="out_proj", **dense)(y)
