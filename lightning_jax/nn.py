"""Flax NNX modules: the TransNormerLLM token mixer around `lightning_attention`, and friends.

- `LightningAttention`: the token mixer of TransNormerLLM (NormLinearAttention):
  one fused projection to q, k, v and an output gate u; SiLU on q and k; the
  op with the layer's decay slopes; a `SimpleRMSNorm` over all heads; times u;
  an output projection. With `init_cache` and `decode=True` it keeps the
  fixed-size float32 state `[B, H, d, d]` between calls, so decoding costs O(1)
  time and memory per token. With `mesh` and `seq_axis` it runs the op
  sequence-parallel (`lightning_jax.parallel.lightning_attention_sharded`), for
  sequences longer than one device holds.
- `SimpleRMSNorm`: RMS normalisation without a weight.
- `SGLU`: the simple gated linear unit (no activation) of TransNormerLLM.
- `SoftmaxAttention`: standard causal softmax attention with rotary embeddings
  and a KV cache, the baseline token mixer of `lightning_jax.models`.

Conventions follow `flax.nnx.MultiHeadAttention`: keyword-only `rngs`,
`dtype` (the compute dtype; None infers it from inputs and params) and
`param_dtype`, initialisers as arguments, `init_cache` with `nnx.Cache`
variables.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.typing import Dtype, Initializer, PrecisionLike
from jax import lax
from jax.sharding import Mesh

from lightning_jax._checks import segment_counts
from lightning_jax.api import lightning_attention
from lightning_jax.parallel import lightning_attention_sharded
from lightning_jax.slopes import layer_slopes

default_kernel_init = nnx.initializers.lecun_normal()


class DecaySlopes(nnx.Variable):
    """Per-head decay slopes of a `LightningAttention` layer: state, not a parameter.

    They are constants of the operator (no gradient flows to them), so they are
    kept out of `nnx.Param` and hence out of optimisers and `nnx.grad`.
    """


# --- helpers shared with the Linen wrapper ---------------------------------------------------


def resolve_head_dim(in_features: int, num_heads: int, head_dim: int | None) -> int:
    """`head_dim`, or `in_features // num_heads` when it divides evenly."""
    for name, value in (("in_features", in_features), ("num_heads", num_heads)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if head_dim is None:
        if in_features % num_heads:
            raise ValueError(
                f"in_features ({in_features}) must be divisible by num_heads ({num_heads}) "
                "when head_dim is not given"
            )
        return in_features // num_heads
    if isinstance(head_dim, bool) or not isinstance(head_dim, (int, np.integer)) or head_dim < 1:
        raise ValueError(f"head_dim must be None or a positive int, got {head_dim!r}")
    return int(head_dim)


def check_features(x: jax.Array, in_features: int | None, what: str) -> None:
    """x must be a floating `[B, T, in_features]` array."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{what}: input must be an array, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{what}: input must have a floating dtype, got {x.dtype}")
    if x.ndim != 3 or (in_features is not None and x.shape[-1] != in_features):
        want = in_features if in_features is not None else "features"
        raise ValueError(
            f"{what}: input must have shape [batch, seq, {want}], got {tuple(x.shape)}"
        )


def _axis_names(axis) -> tuple:
    return tuple(axis) if isinstance(axis, tuple) else (axis,)


def check_sequence_parallel(what: str, mesh: Any, seq_axis: Any, batch_axis: Any) -> None:
    """Checks the optional (mesh, seq_axis, batch_axis) of a sequence-parallel layer.

    seq_axis None: sequence parallelism is off; batch_axis must then be None too
    (mesh is unused). seq_axis set: mesh must be a `jax.sharding.Mesh` holding
    seq_axis (and batch_axis), the two sharing no axis.
    """
    if seq_axis is None:
        if batch_axis is not None:
            raise ValueError(
                f"{what}: batch_axis ({batch_axis!r}) is only used with seq_axis; pass "
                "seq_axis (and mesh) for sequence parallelism, or neither"
            )
        return
    if mesh is None:
        raise ValueError(
            f"{what}: seq_axis={seq_axis!r} needs mesh, the jax.sharding.Mesh holding that axis"
        )
    if not isinstance(mesh, Mesh):
        raise TypeError(f"{what}: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    for name, axis in (("seq_axis", seq_axis), ("batch_axis", batch_axis)):
        if axis is None:
            continue
        names = _axis_names(axis)
        if not names or any(a not in mesh.axis_names for a in names):
            raise ValueError(
                f"{what}: {name} must name axes of the mesh {tuple(mesh.axis_names)}, got {axis!r}"
            )
    if batch_axis is not None and set(_axis_names(seq_axis)) & set(_axis_names(batch_axis)):
        raise ValueError(
            f"{what}: seq_axis {seq_axis!r} and batch_axis {batch_axis!r} must not share mesh axes"
        )


def check_interpret(what: str, interpret: Any) -> None:
    """interpret must be None or a bool (the op's `interpret`); raises TypeError naming `what`."""
    if interpret is not None and not isinstance(interpret, bool):
        raise TypeError(f"{what}: interpret must be None or a bool, got {interpret!r}")


def simple_rms_norm(x: jax.Array, epsilon: float = 1e-6, dtype: Dtype | None = None) -> jax.Array:
    """x * rsqrt(mean(x^2) + eps) over the last axis, computed in float32.

    The formula of TransNormerLLM's released model code (`SimpleRMSNorm`,
    norm.py); the result is cast to `dtype` (default: x's dtype).
    """
    out_dtype = x.dtype if dtype is None else dtype
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    out = x32 * lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + epsilon)
    return out.astype(out_dtype)


def split_qkvu(qkvu: jax.Array, num_heads: int, head_dim: int):
    """`[B, T, 4*H*d]` -> q, k (SiLU applied), v `[B, T, H, d]` and the gate u `[B, T, H*d]`.

    The fused projection's columns are [q | k | v | u], each head-major
    (`(h d)`), as in TransNormerLLM's `qkvu_proj(x).chunk(4, -1)`. The heads
    stay in the projection's `[B, T, H, d]` layout (a free reshape): the op
    takes it as layout="bthd", so no transpose surrounds the kernel.
    """
    batch, seq, _ = qkvu.shape
    q, k, v, u = jnp.split(qkvu, 4, axis=-1)

    def heads(t):
        return t.reshape(batch, seq, num_heads, head_dim)

    return heads(jax.nn.silu(q)), heads(jax.nn.silu(k)), heads(v), u


def merge_heads(o: jax.Array) -> jax.Array:
    """`[B, T, H, d]` -> `[B, T, H*d]` (a free reshape)."""
    batch, seq, heads, dim = o.shape
    return o.reshape(batch, seq, heads * dim)


# --- modules -------------------------------------------------------------------------------


class SimpleRMSNorm(nnx.Module):
    """RMS normalisation with no weight: x * rsqrt(mean(x^2) + eps) over the last axis.

    Computed in float32 and cast back to `dtype` (default: the input's dtype).

    Args:
      num_features: size of the normalised (last) axis; checked on call.
      epsilon: added to the mean square.
      dtype: output dtype (None: the input's).
    """

    def __init__(self, num_features: int, *, epsilon: float = 1e-6, dtype: Dtype | None = None):
        self.num_features = num_features
        self.epsilon = epsilon
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """x `[..., num_features]` -> the same shape."""
        if x.shape[-1] != self.num_features:
            raise ValueError(
                f"SimpleRMSNorm: last axis must be num_features={self.num_features}, "
                f"got shape {tuple(x.shape)}"
            )
        return simple_rms_norm(x, self.epsilon, self.dtype)


class SGLU(nnx.Module):
    """Simple gated linear unit of TransNormerLLM: l3(l1(x) * l2(x)), no activation, no bias.

    Args:
      in_features: input and output size D.
      hidden_features: hidden size F (l1, l2: D -> F; l3: F -> D).
      dtype: compute dtype (None: inferred from inputs and params).
      param_dtype: dtype of the kernels.
      precision: matmul precision.
      kernel_init: initialiser of the three kernels.
      rngs: random streams for initialisation.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        *,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: PrecisionLike = None,
        kernel_init: Initializer = default_kernel_init,
        rngs: nnx.Rngs,
    ):
        linear = dict(
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
            kernel_init=kernel_init,
            rngs=rngs,
        )
        self.in_features = in_features
        self.hidden_features = hidden_features
        self.l1 = nnx.Linear(in_features, hidden_features, **linear)
        self.l2 = nnx.Linear(in_features, hidden_features, **linear)
        self.l3 = nnx.Linear(hidden_features, in_features, **linear)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x `[..., D]` -> `[..., D]`."""
        return self.l3(self.l1(x) * self.l2(x))


class LightningAttention(nnx.Module):
    """TransNormerLLM token mixer (NormLinearAttention) on the Lightning Attention op.

    For x `[B, T, D]`:

        q, k, v, u = split(x @ W_qkvu)         W_qkvu: [D, 4*H*d], columns [q | k | v | u]
        q, k = silu(q), silu(k)                 (per head: [B, T, H, d], a free reshape)
        o = lightning_attention(q, k, v, slopes, layout="bthd")   per-layer decay,
                                                no softmax, no scale; no transpose
        y = (SimpleRMSNorm(o over all H*d features) * u) @ W_out      W_out: [H*d, D]

    `slopes = layer_slopes(num_heads, layer_idx, num_layers)` are kept as
    non-trainable `DecaySlopes` state.

    Decoding: `init_cache(batch_size)` creates the float32 state `[B, H, d, d]`
    (zeros); `__call__(x, decode=True)` then consumes any number of new tokens,
    continuing from the state and storing the new one (a prompt is prefilled by
    the chunked op; a single token is O(1) work and memory).

    Sequence parallelism: with `seq_axis` (and `mesh`), the op runs as
    `lightning_attention_sharded(..., mesh=mesh, seq_axis=seq_axis,
    batch_axis=batch_axis)`: under `jax.shard_map`, each device of `seq_axis`
    holding a contiguous part of the sequence, with only `[B, H, d, d]` states
    crossing devices. Everything else in the layer is per token, so inside
    `jax.jit` with x sharded over the sequence (e.g. `P(batch_axis, seq_axis)`)
    GSPMD keeps it sharded too. The result equals the layer without `seq_axis`
    (same weights) up to rounding, gradients too. T must be divisible by the
    number of devices on `seq_axis` (B by those on `batch_axis`). `decode=True`
    ignores the mesh and runs the single-device op (decoding goes token by
    token, which cannot be split along the sequence).

    Args:
      in_features: model width D.
      num_heads: number of heads H.
      head_dim: per-head width d (None: D // H, which must divide evenly).
      layer_idx: index of this layer in the stack, for the slopes.
      num_layers: number of layers in the stack, for the slopes.
      impl: implementation of the op (`lightning_jax.available_impls()`).
      block_size: block size of the op's tiling (None: its default).
      interpret: Pallas implementations only: run the kernel in the Pallas
        interpreter (None: exactly when the default backend is CPU), as the op's
        `interpret`; also passed to the sequence-parallel op.
      epsilon: epsilon of the output norm.
      dtype: compute dtype (None: inferred from inputs and params). Params and
        inputs are cast to it for the matmuls; the op accumulates in float32.
      param_dtype: dtype of the kernels.
      precision: matmul precision of the projections.
      kernel_init: initialiser of the qkvu projection.
      out_kernel_init: initialiser of the output projection (None: kernel_init).
      mesh: the `jax.sharding.Mesh` of `seq_axis` and `batch_axis` (unused
        without `seq_axis`).
      seq_axis: mesh axis (or tuple of axes) to shard the sequence over in the
        op; None (default): the single-device op.
      batch_axis: optional mesh axis (or tuple) the batch is sharded over (only
        with `seq_axis`); None: the op's batch is replicated over the mesh.
      rngs: random streams for initialisation.

    Raises:
      ValueError: `seq_axis` without `mesh`, `batch_axis` without `seq_axis`,
        axes not in the mesh or shared by the two.
      TypeError: `mesh` not a `jax.sharding.Mesh`.
    """

    def __init__(
        self,
        in_features: int,
        num_heads: int,
        *,
        head_dim: int | None = None,
        layer_idx: int = 0,
        num_layers: int = 1,
        impl: str = "auto",
        block_size: int | None = None,
        interpret: bool | None = None,
        epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: PrecisionLike = None,
        kernel_init: Initializer = default_kernel_init,
        out_kernel_init: Initializer | None = None,
        mesh: Mesh | None = None,
        seq_axis: Any = None,
        batch_axis: Any = None,
        rngs: nnx.Rngs,
    ):
        self.head_dim = resolve_head_dim(in_features, num_heads, head_dim)
        check_sequence_parallel("LightningAttention", mesh, seq_axis, batch_axis)
        check_interpret("LightningAttention", interpret)
        self.mesh = mesh
        self.seq_axis = seq_axis
        self.batch_axis = batch_axis
        self.in_features = in_features
        self.num_heads = num_heads
        self.layer_idx = layer_idx
        self.num_layers = num_layers
        self.impl = impl
        self.block_size = block_size
        self.interpret = interpret
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        hidden = num_heads * self.head_dim
        self.qkvu_proj = nnx.Linear(
            in_features,
            4 * hidden,
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
            kernel_init=kernel_init,
            rngs=rngs,
        )
        self.out_proj = nnx.Linear(
            hidden,
            in_features,
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
            kernel_init=out_kernel_init or kernel_init,
            rngs=rngs,
        )
        self.slopes = DecaySlopes(layer_slopes(num_heads, layer_idx, num_layers))
        self.state: nnx.Cache | None = nnx.data(None)

    def init_cache(self, batch_size: int, dtype: Dtype = jnp.float32) -> None:
        """Creates (or resets) the decoding state: zeros `[batch_size, H, d, d]`.

        Args:
          batch_size: batch size B of the tokens that will be decoded.
          dtype: dtype of the stored state; float32 (the op's state dtype) keeps
            decoding exact, a narrower dtype rounds the state after every call.
        """
        shape = (batch_size, self.num_heads, self.head_dim, self.head_dim)
        self.state = nnx.Cache(jnp.zeros(shape, dtype))

    def __call__(
        self, x: jax.Array, *, decode: bool = False, segment_ids: jax.Array | None = None
    ) -> jax.Array:
        """Mixes tokens causally.

        Args:
          x: `[B, T, D]` inputs.
          decode: continue from the cached state (after `init_cache`) and store
            the state after the last of these T tokens.
          segment_ids: optional int `[B, T]` ids of packed documents: a token
            mixes only with earlier tokens of its own run of equal ids (the
            state resets where the id changes; see `lightning_attention`). With
            `decode`, the cached state feeds the first run and the last run's
            state is stored.

        Returns:
          `[B, T, D]` in the compute dtype.
        """
        check_features(x, self.in_features, "LightningAttention")
        initial_state = None
        if decode:
            initial_state = self._cached_state(x.shape[0])
        q, k, v, u = split_qkvu(self.qkvu_proj(x), self.num_heads, self.head_dim)
        slopes = self.slopes[...]
        op_kwargs = dict(
            impl=self.impl, block_size=self.block_size, interpret=self.interpret, layout="bthd"
        )
        if segment_ids is not None:
            op_kwargs["segment_ids"] = segment_ids
        if decode:
            o, state = lightning_attention(
                q, k, v, slopes, initial_state=initial_state, return_final_state=True, **op_kwargs
            )
            self.state[...] = state.astype(self.state.dtype)
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
        return self.out_proj(y)

    def _cached_state(self, batch: int) -> jax.Array:
        if self.state is None:
            raise ValueError(
                "LightningAttention: decode=True needs a cache; call init_cache(batch_size) first"
            )
        cached = self.state.shape[0]
        if cached != batch:
            raise ValueError(
                f"LightningAttention: the cache was made for batch size {cached}, but the input "
                f"has batch size {batch}; call init_cache({batch})"
            )
        return self.state[...]


def rotary_embedding(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
    """Rotary position embedding (rotate-half form of GPT-NeoX / Llama).

    Args:
      x: `[B, T, H, d]` with d even.
      positions: `[T]` integer positions of the T rows, or `[B, T]` per row
        (e.g. restarting at every packed document: `segment_positions`).
      base: frequency base; pair i rotates by position * base^(-2i/d).

    Returns:
      `[B, T, H, d]` in x's dtype (angles and products in float32).
    """
    d = x.shape[-1]
    inv_freq = base ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)  # [d/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [(B,) T, d/2]
    cos = jnp.cos(angles)[..., None, :]  # broadcasts over heads (and batch for [T])
    sin = jnp.sin(angles)[..., None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """int32 `[B, T]`: each token's position within its run of equal ids (0 at a run start)."""
    seq = segment_ids.shape[1]
    t = jnp.arange(seq, dtype=jnp.int32)[None, :]
    starts = jnp.concatenate(
        [
            jnp.ones_like(segment_ids[:, :1], dtype=bool),
            segment_ids[:, 1:] != segment_ids[:, :-1],
        ],
        axis=1,
    )
    run_start = lax.cummax(jnp.where(starts, t, 0), axis=1)
    return t - run_start


def check_kv_cache(
    owner: str, cached_key, cache_index, batch: int, seq: int, length_name: str = ""
) -> None:
    """Checks a softmax layer's KV cache for `seq` new tokens of a batch of `batch` rows.

    cached_key: the `[B, max_length, ...]` cache (None before `init_cache`);
    cache_index: how many tokens it holds. length_name: where the cache length
    comes from, for the message (e.g. "config.max_cache_len").
    """
    if cached_key is None:
        raise ValueError(
            f"{owner}: decode=True needs a cache; call init_cache(batch_size, max_length) first"
        )
    cached_batch, max_length = cached_key.shape[:2]
    if cached_batch != batch:
        raise ValueError(
            f"{owner}: the cache was made for batch size {cached_batch}, but the input has "
            f"batch size {batch}"
        )
    index = cache_index[...]
    # Only checkable outside jit; under jit dynamic_update_slice would clamp.
    if not isinstance(index, jax.core.Tracer) and int(index) + seq > max_length:
        where = f" ({length_name})" if length_name else ""
        raise ValueError(
            f"{owner}: {int(index)} cached + {seq} new tokens exceed the cache length "
            f"{max_length}{where}"
        )


class SoftmaxAttention(nnx.Module):
    """Causal softmax attention with rotary embeddings and a KV cache (the baseline mixer).

    For x `[B, T, D]`: q, k, v = split(x @ W_qkv) per head, RoPE on q and k,
    `jax.nn.dot_product_attention(..., is_causal=True)` (scale 1/sqrt(d)),
    then `@ W_out`.

    Decoding: `init_cache(batch_size, max_length)` creates a KV cache
    `[B, max_length, H, d]` and a position index; `__call__(x, decode=True)`
    appends the T new tokens at the index, attends with an explicit mask
    built from positions, and advances the index.

    Args:
      in_features: model width D.
      num_heads: number of heads H.
      head_dim: per-head width d, even (None: D // H).
      rope_base: base of the rotary frequencies.
      dtype: compute dtype (None: inferred from inputs and params).
      param_dtype: dtype of the kernels.
      precision: matmul precision of the projections.
      kernel_init: initialiser of the qkv projection.
      out_kernel_init: initialiser of the output projection (None: kernel_init).
      rngs: random streams for initialisation.
    """

    def __init__(
        self,
        in_features: int,
        num_heads: int,
        *,
        head_dim: int | None = None,
        rope_base: float = 10000.0,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: PrecisionLike = None,
        kernel_init: Initializer = default_kernel_init,
        out_kernel_init: Initializer | None = None,
        rngs: nnx.Rngs,
    ):
        self.head_dim = resolve_head_dim(in_features, num_heads, head_dim)
        if self.head_dim % 2:
            raise ValueError(
                f"SoftmaxAttention: head_dim must be even for RoPE, got {self.head_dim}"
            )
        self.in_features = in_features
        self.num_heads = num_heads
        self.rope_base = rope_base
        self.dtype = dtype
        self.param_dtype = param_dtype
        hidden = num_heads * self.head_dim
        linear: dict[str, Any] = dict(
            use_bias=False, dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs
        )
        self.qkv_proj = nnx.Linear(in_features, 3 * hidden, kernel_init=kernel_init, **linear)
        self.out_proj = nnx.Linear(
            hidden, in_features, kernel_init=out_kernel_init or kernel_init, **linear
        )
        self.cached_key: nnx.Cache | None = nnx.data(None)
        self.cached_value: nnx.Cache | None = nnx.data(None)
        self.cache_index: nnx.Cache | None = nnx.data(None)

    def init_cache(self, batch_size: int, max_length: int, dtype: Dtype | None = None) -> None:
        """Creates (or resets) the KV cache `[batch_size, max_length, H, d]` and index 0.

        Args:
          batch_size: batch size B of the tokens that will be decoded.
          max_length: most tokens the cache holds (prompt plus generated).
          dtype: dtype of the cached keys and values (None: `dtype`, else
            `param_dtype`).
        """
        dtype = dtype or self.dtype or self.param_dtype
        shape = (batch_size, max_length, self.num_heads, self.head_dim)
        self.cached_key = nnx.Cache(jnp.zeros(shape, dtype))
        self.cached_value = nnx.Cache(jnp.zeros(shape, dtype))
        self.cache_index = nnx.Cache(jnp.array(0, jnp.int32))

    def __call__(
        self, x: jax.Array, *, decode: bool = False, segment_ids: jax.Array | None = None
    ) -> jax.Array:
        """Causal self-attention.

        Args:
          x: `[B, T, D]` inputs.
          decode: append to the KV cache (after `init_cache`) and attend to
            everything cached so far.
          segment_ids: optional int `[B, T]` ids of packed documents: a token
            attends only to earlier tokens of its own run of equal ids, and
            rotary positions restart at 0 at every run. Not with `decode`.

        Returns:
          `[B, T, D]` in the compute dtype.
        """
        check_features(x, self.in_features, "SoftmaxAttention")
        batch, seq, _ = x.shape
        if segment_ids is not None and decode:
            raise NotImplementedError("SoftmaxAttention: segment_ids with decode=True")
        if decode:
            self._check_cache(batch, seq)
            start = self.cache_index[...]
        else:
            start = jnp.array(0, jnp.int32)
        qkv = self.qkv_proj(x).reshape(batch, seq, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, H, d]
        positions = start + jnp.arange(seq, dtype=jnp.int32)
        if segment_ids is not None:
            positions = segment_positions(segment_ids)  # [B, T]
        q = rotary_embedding(q, positions, self.rope_base)
        k = rotary_embedding(k, positions, self.rope_base)
        if decode:
            cache_dtype = self.cached_key.dtype
            index = (0, start, 0, 0)
            keys = lax.dynamic_update_slice(self.cached_key[...], k.astype(cache_dtype), index)
            values = lax.dynamic_update_slice(self.cached_value[...], v.astype(cache_dtype), index)
            self.cached_key[...] = keys
            self.cached_value[...] = values
            self.cache_index[...] = start + seq
            # Row t (position start + t) sees cached positions <= its own; the
            # unfilled tail of the cache lies beyond every query's position.
            slots = jnp.arange(keys.shape[1], dtype=jnp.int32)
            mask = slots[None, :] <= positions[:, None]  # [T, max_length]
            o = jax.nn.dot_product_attention(
                q, keys.astype(q.dtype), values.astype(q.dtype), mask=mask[None, None]
            )
        elif segment_ids is not None:
            causal = jnp.tril(jnp.ones((seq, seq), bool))
            run = segment_counts(segment_ids)  # equal counts: the same run of ids
            same = run[:, :, None] == run[:, None, :]  # [B, T, T]
            mask = (causal[None] & same)[:, None]  # [B, 1, T, T]
            o = jax.nn.dot_product_attention(q, k, v, mask=mask)
        else:
            o = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(o.reshape(batch, seq, self.num_heads * self.head_dim))

    def _check_cache(self, batch: int, seq: int) -> None:
        check_kv_cache("SoftmaxAttention", self.cached_key, self.cache_index, batch, seq)
