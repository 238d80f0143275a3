"""The MiniMax-01 architecture (MiniMax-Text-01 / MiniMax-M1) in Flax NNX.

`MiniMaxForCausalLM(config, rngs=...)` maps int tokens `[B, T]` to logits
`[B, T, V]` exactly as `transformers`' `MiniMaxForCausalLM` does:

    h = embed(tokens)
    per layer l (type `config.layer_types[l]`):
        n = input_layernorm(h)
        h = n * alpha_attn + mixer(n) * beta_attn         (the residual is the *normed* input)
        n = post_attention_layernorm(h)
        h = n * alpha_mlp + moe(n) * beta_mlp
    logits = lm_head(norm(h))

- "linear_attention" layers (`MiniMaxLightningAttention`): one projection to
  per-head `[q | k | v]` columns, SiLU on q, k and v, `lightning_attention`
  with `minimax_slopes`, an RMSNorm with weight over all heads, times
  `sigmoid(output_gate(x))`, then `out_proj`.
- "full_attention" layers (`MiniMaxAttention`): softmax attention with grouped
  query heads (`num_key_value_heads`), RoPE on the whole head dim
  (rotate-half, base `rope_theta`), scale 1/sqrt(d).
- `MiniMaxSparseMoe`: a softmax router over `num_local_experts`, the top
  `num_experts_per_tok` probabilities renormalised to sum to one, SiLU-gated
  experts `w2(silu(w1 x) * w3 x)`. Every expert is computed for every token
  (dense dispatch: exact, and it shards over experts without communication
  beyond one sum); the cost is `num_local_experts / num_experts_per_tok` times
  that of a routed dispatch.

Decoding: `init_cache(batch_size)` gives every lightning layer its float32
state `[B, H, d, d]` and every softmax layer a KV cache of
`config.max_cache_len` positions; `model(tokens, decode=True)` then consumes any
number of new tokens (a chunked prefill equals the full forward), so
`lightning_jax.generate` works on the model.

Checkpoints: `lightning_jax.hf.from_pretrained` / `save_pretrained` read and
write the Hugging Face layout (`config.json` + safetensors).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype
from jax import lax

from lightning_jax._checks import check_segment_ids, segment_counts
from lightning_jax.api import lightning_attention
from lightning_jax.models import check_positive_field, check_tokens
from lightning_jax.nn import (
    DecaySlopes,
    check_features,
    check_kv_cache,
    check_sequence_parallel,
    rotary_embedding,
    segment_positions,
    simple_rms_norm,
)
from lightning_jax.parallel import lightning_attention_sharded
from lightning_jax.slopes import minimax_slopes

LAYER_TYPES = ("linear_attention", "full_attention")


@dataclasses.dataclass(frozen=True)
class MiniMaxConfig:
    """Hyperparameters of `MiniMaxForCausalLM` (the fields of `transformers.MiniMaxConfig`).

    Attributes:
      vocab_size: number of token ids V.
      hidden_size: model width D.
      intermediate_size: hidden width I of each expert.
      num_hidden_layers: number of layers L.
      num_attention_heads: heads H of every token mixer.
      num_key_value_heads: key/value heads of the softmax layers (divides H).
      head_dim: per-head width d (None: D // H).
      layer_types: per-layer "linear_attention" or "full_attention" (None:
        transformers' default, full attention at even indices).
      num_local_experts: experts E per MoE layer.
      num_experts_per_tok: experts k each token is routed to.
      rms_norm_eps: epsilon of the layer norms (the lightning output norm uses 1e-6,
        as the released code does).
      rope_theta: base of the rotary frequencies.
      linear_attn_alpha_factor, linear_attn_beta_factor, full_attn_alpha_factor,
      full_attn_beta_factor, mlp_alpha_factor, mlp_beta_factor: residual factors
        (residual * alpha + sublayer * beta).
      tie_word_embeddings: the LM head is the transposed token embedding.
      block_size: the checkpoint's block size (kept for saving; the op tiles itself).
      max_position_embeddings: kept for saving.
      bos_token_id, eos_token_id, pad_token_id: kept for saving.
      max_cache_len: positions of each softmax layer's KV cache when decoding.
      impl: implementation of the lightning op (`lightning_jax.available_impls()`).
      dtype: compute dtype (None: inferred from inputs and params).
      param_dtype: dtype of the parameters.
      mesh, seq_axis, batch_axis: run the lightning layers sequence-parallel (see
        `lightning_jax.nn.LightningAttention`); softmax layers run as plain
        (GSPMD-partitioned) attention.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    layer_types: Sequence[str] | None = None
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    linear_attn_alpha_factor: float = 1.0
    linear_attn_beta_factor: float = 1.0
    full_attn_alpha_factor: float = 1.0
    full_attn_beta_factor: float = 1.0
    mlp_alpha_factor: float = 1.0
    mlp_beta_factor: float = 1.0
    tie_word_embeddings: bool = False
    block_size: int = 256
    max_position_embeddings: int = 4096 * 32
    bos_token_id: int | None = 1
    eos_token_id: Any = 2
    pad_token_id: int | None = None
    max_cache_len: int = 2048
    impl: str = "auto"
    dtype: Any = None
    param_dtype: Any = jnp.float32
    mesh: Any = None
    seq_axis: Any = None
    batch_axis: Any = None

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_local_experts",
            "num_experts_per_tok",
            "max_cache_len",
        ):
            check_positive_field("MiniMaxConfig", name, getattr(self, name))
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        check_positive_field("MiniMaxConfig", "num_key_value_heads", self.num_key_value_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"MiniMaxConfig: num_attention_heads ({self.num_attention_heads}) must be a "
                f"multiple of num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"MiniMaxConfig: hidden_size ({self.hidden_size}) must be divisible by "
                    f"num_attention_heads ({self.num_attention_heads}) when head_dim is not given"
                )
        else:
            check_positive_field("MiniMaxConfig", "head_dim", self.head_dim)
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(
                f"MiniMaxConfig: num_experts_per_tok ({self.num_experts_per_tok}) exceeds "
                f"num_local_experts ({self.num_local_experts})"
            )
        types = self.layer_types
        if types is None:
            types = [
                "full_attention" if (i + 1) % 2 else "linear_attention"
                for i in range(self.num_hidden_layers)
            ]
        types = tuple(types)
        bad = [(i, t) for i, t in enumerate(types) if t not in LAYER_TYPES]
        if bad:
            raise ValueError(
                f"MiniMaxConfig.layer_types: every entry must be one of {LAYER_TYPES}, got "
                + ", ".join(f"{t!r} at layer {i}" for i, t in bad)
            )
        if len(types) != self.num_hidden_layers:
            raise ValueError(
                f"MiniMaxConfig.layer_types lists {len(types)} layers, but num_hidden_layers is "
                f"{self.num_hidden_layers}"
            )
        object.__setattr__(self, "layer_types", types)  # a tuple keeps the config hashable
        check_sequence_parallel("MiniMaxConfig", self.mesh, self.seq_axis, self.batch_axis)

    @property
    def attn_head_dim(self) -> int:
        """Per-head width d actually used."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def softmax_layers(self) -> tuple[int, ...]:
        """Indices of the full-attention layers (their KV caches grow with `max_cache_len`)."""
        return tuple(i for i, t in enumerate(self.layer_types) if t == "full_attention")

    def replace(self, **changes: Any) -> MiniMaxConfig:
        """A copy with some fields changed (e.g. `impl`, `dtype`, `mesh`)."""
        return dataclasses.replace(self, **changes)


class RMSNorm(nnx.Module):
    """RMS normalisation with a weight: weight * (x * rsqrt(mean(x^2) + eps)).

    The normalisation runs in float32 and is cast back to x's dtype before the
    weight multiplies it (as `MiniMaxRMSNorm` / T5's layer norm).

    Args:
      num_features: size of the normalised (last) axis.
      epsilon: added to the mean square.
      param_dtype: dtype of the weight (initialised to ones).
    """

    def __init__(self, num_features: int, *, epsilon: float = 1e-6, param_dtype: Dtype):
        self.num_features = num_features
        self.epsilon = epsilon
        self.weight = nnx.Param(jnp.ones((num_features,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x `[..., num_features]` -> the same shape."""
        return self.weight[...] * simple_rms_norm(x, self.epsilon)


def _linear(din: int, dout: int, c: MiniMaxConfig, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        din,
        dout,
        use_bias=False,
        dtype=c.dtype,
        param_dtype=c.param_dtype,
        kernel_init=nnx.initializers.normal(0.02),
        rngs=rngs,
    )


class MiniMaxLightningAttention(nnx.Module):
    """The lightning token mixer of MiniMax-01 on the Lightning Attention op.

    For x `[B, T, D]`:

        q, k, v = split_per_head(silu(x @ W_qkv))    W_qkv: [D, H*3d], per head [q | k | v]
        o = lightning_attention(q, k, v, minimax_slopes(H, l, L))
        y = (RMSNorm(o over all H*d features) * sigmoid(x @ W_gate)) @ W_out

    The slopes are non-trainable `DecaySlopes` state (a checkpoint's
    `slope_rate` buffer is loaded into them). Decoding keeps the float32 state
    `[B, H, d, d]` (`init_cache`, `decode=True`), as `LightningAttention` does.

    Args:
      config: the model's hyperparameters.
      layer_idx: index of this layer in the stack (for the slopes).
      rngs: random streams for initialisation.
    """

    def __init__(self, config: MiniMaxConfig, layer_idx: int, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.num_heads = c.num_attention_heads
        self.head_dim = c.attn_head_dim
        hidden = self.num_heads * self.head_dim
        self.qkv_proj = _linear(c.hidden_size, 3 * hidden, c, rngs)
        self.output_gate = _linear(c.hidden_size, hidden, c, rngs)
        self.out_proj = _linear(hidden, c.hidden_size, c, rngs)
        self.norm = RMSNorm(hidden, epsilon=1e-6, param_dtype=c.param_dtype)
        self.slopes = DecaySlopes(minimax_slopes(self.num_heads, layer_idx, c.num_hidden_layers))
        self.state: nnx.Cache | None = nnx.data(None)

    def init_cache(self, batch_size: int) -> None:
        """Creates (or resets) the decoding state: float32 zeros `[batch_size, H, d, d]`."""
        shape = (batch_size, self.num_heads, self.head_dim, self.head_dim)
        self.state = nnx.Cache(jnp.zeros(shape, jnp.float32))

    def __call__(
        self, x: jax.Array, *, decode: bool = False, segment_ids: jax.Array | None = None
    ) -> jax.Array:
        """x `[B, T, D]` -> `[B, T, D]`; segment_ids `[B, T]` reset the state per run of ids."""
        check_features(x, self.config.hidden_size, "MiniMaxLightningAttention")
        batch, seq, _ = x.shape
        qkv = jax.nn.silu(self.qkv_proj(x)).reshape(batch, seq, self.num_heads, 3 * self.head_dim)
        q, k, v = jnp.split(qkv, 3, axis=-1)  # [B, T, H, d] each
        kwargs: dict[str, Any] = dict(impl=self.config.impl, layout="bthd")
        if segment_ids is not None:
            kwargs["segment_ids"] = segment_ids
        slopes = self.slopes[...]
        if decode:
            if self.state is None:
                raise ValueError(
                    "MiniMaxLightningAttention: decode=True needs a cache; call "
                    "init_cache(batch_size) first"
                )
            if self.state.shape[0] != batch:
                raise ValueError(
                    f"MiniMaxLightningAttention: the cache was made for batch size "
                    f"{self.state.shape[0]}, but the input has batch size {batch}"
                )
            o, state = lightning_attention(
                q, k, v, slopes, initial_state=self.state[...], return_final_state=True, **kwargs
            )
            self.state[...] = state
        elif self.config.seq_axis is not None:
            c = self.config
            o = lightning_attention_sharded(
                q, k, v, slopes, mesh=c.mesh, seq_axis=c.seq_axis, batch_axis=c.batch_axis, **kwargs
            )
        else:
            o = lightning_attention(q, k, v, slopes, **kwargs)
        o = self.norm(o.reshape(batch, seq, self.num_heads * self.head_dim))
        return self.out_proj(jax.nn.sigmoid(self.output_gate(x)) * o)


class MiniMaxAttention(nnx.Module):
    """Causal softmax attention of MiniMax-01: grouped-query heads, RoPE, a KV cache.

    q `[B, T, H, d]`, k and v `[B, T, K, d]` (K = num_key_value_heads, each
    shared by H/K query heads), RoPE (rotate-half, base `rope_theta`) on q and
    k, softmax with scale 1/sqrt(d), then `o_proj`.

    Args:
      config: the model's hyperparameters.
      layer_idx: index of this layer in the stack.
      rngs: random streams for initialisation.
    """

    def __init__(self, config: MiniMaxConfig, layer_idx: int, *, rngs: nnx.Rngs):
        del layer_idx
        c = config
        self.config = c
        self.num_heads = c.num_attention_heads
        self.num_kv_heads = c.num_key_value_heads
        self.head_dim = c.attn_head_dim
        if self.head_dim % 2:
            raise ValueError(
                f"MiniMaxAttention: head_dim must be even for RoPE, got {self.head_dim}"
            )
        self.q_proj = _linear(c.hidden_size, self.num_heads * self.head_dim, c, rngs)
        self.k_proj = _linear(c.hidden_size, self.num_kv_heads * self.head_dim, c, rngs)
        self.v_proj = _linear(c.hidden_size, self.num_kv_heads * self.head_dim, c, rngs)
        self.o_proj = _linear(self.num_heads * self.head_dim, c.hidden_size, c, rngs)
        self.cached_key: nnx.Cache | None = nnx.data(None)
        self.cached_value: nnx.Cache | None = nnx.data(None)
        self.cache_index: nnx.Cache | None = nnx.data(None)

    def init_cache(self, batch_size: int, max_length: int, dtype: Dtype | None = None) -> None:
        """Creates (or resets) the KV cache `[batch_size, max_length, K, d]` and index 0."""
        dtype = dtype or self.config.dtype or self.config.param_dtype
        shape = (batch_size, max_length, self.num_kv_heads, self.head_dim)
        self.cached_key = nnx.Cache(jnp.zeros(shape, dtype))
        self.cached_value = nnx.Cache(jnp.zeros(shape, dtype))
        self.cache_index = nnx.Cache(jnp.array(0, jnp.int32))

    def __call__(
        self, x: jax.Array, *, decode: bool = False, segment_ids: jax.Array | None = None
    ) -> jax.Array:
        """x `[B, T, D]` -> `[B, T, D]`; segment_ids `[B, T]` mask by run, restart positions."""
        check_features(x, self.config.hidden_size, "MiniMaxAttention")
        batch, seq, _ = x.shape
        if segment_ids is not None and decode:
            raise NotImplementedError("MiniMaxAttention: segment_ids with decode=True")
        q = self.q_proj(x).reshape(batch, seq, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(batch, seq, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(batch, seq, self.num_kv_heads, self.head_dim)
        start = self._cache_start(batch, seq) if decode else jnp.array(0, jnp.int32)
        positions = start + jnp.arange(seq, dtype=jnp.int32)
        if segment_ids is not None:
            positions = segment_positions(segment_ids)
        theta = self.config.rope_theta
        q = rotary_embedding(q, positions, theta)
        k = rotary_embedding(k, positions, theta)
        if decode:
            dtype = self.cached_key.dtype
            keys = lax.dynamic_update_slice(self.cached_key[...], k.astype(dtype), (0, start, 0, 0))
            values = lax.dynamic_update_slice(
                self.cached_value[...], v.astype(dtype), (0, start, 0, 0)
            )
            self.cached_key[...] = keys
            self.cached_value[...] = values
            self.cache_index[...] = start + seq
            slots = jnp.arange(keys.shape[1], dtype=jnp.int32)
            mask = (slots[None, :] <= positions[:, None])[None, None]  # [1, 1, T, max_length]
            o = jax.nn.dot_product_attention(
                q, keys.astype(q.dtype), values.astype(q.dtype), mask=mask
            )
        elif segment_ids is not None:
            causal = jnp.tril(jnp.ones((seq, seq), bool))
            run = segment_counts(segment_ids)
            same = run[:, :, None] == run[:, None, :]
            o = jax.nn.dot_product_attention(q, k, v, mask=(causal[None] & same)[:, None])
        else:
            o = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.reshape(batch, seq, self.num_heads * self.head_dim))

    def _cache_start(self, batch: int, seq: int) -> jax.Array:
        check_kv_cache(
            "MiniMaxAttention", self.cached_key, self.cache_index, batch, seq,
            "config.max_cache_len",
        )  # fmt: skip
        return self.cache_index[...]


class MiniMaxSparseMoe(nnx.Module):
    """Top-k mixture of SiLU-gated experts (the MLP of every MiniMax-01 layer).

    Router: p = softmax(x @ W_gate) in float32 over E experts; the top k
    probabilities, divided by their sum, weight the chosen experts. Expert e:
    `(silu(x @ w1[e]) * (x @ w3[e])) @ w2[e]` with w1, w3 `[E, D, I]` and w2
    `[E, I, D]`. All experts run on all tokens (dense dispatch; exact).

    Args:
      config: the model's hyperparameters.
      rngs: random streams for initialisation.
    """

    def __init__(self, config: MiniMaxConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.gate = _linear(c.hidden_size, c.num_local_experts, c, rngs)
        init = nnx.initializers.normal(0.02)
        e, d, i = c.num_local_experts, c.hidden_size, c.intermediate_size
        self.w1 = nnx.Param(init(rngs.params(), (e, d, i), c.param_dtype))
        self.w3 = nnx.Param(init(rngs.params(), (e, d, i), c.param_dtype))
        self.w2 = nnx.Param(init(rngs.params(), (e, i, d), c.param_dtype))

    def router_weights(self, x: jax.Array) -> jax.Array:
        """x `[..., D]` -> float32 `[..., E]`: the renormalised top-k weights, zero elsewhere."""
        probs = jax.nn.softmax(self.gate(x).astype(jnp.float32), axis=-1)
        top, index = lax.top_k(probs, self.config.num_experts_per_tok)
        top = top / jnp.sum(top, axis=-1, keepdims=True)
        onehot = jax.nn.one_hot(index, self.config.num_local_experts, dtype=jnp.float32)
        return jnp.einsum("...k,...ke->...e", top, onehot)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x `[B, T, D]` -> `[B, T, D]`."""
        weights = self.router_weights(x)
        dtype = self.config.dtype or x.dtype
        w1, w2, w3 = (jnp.asarray(w[...], dtype) for w in (self.w1, self.w2, self.w3))
        xc = x.astype(dtype)
        h = jax.nn.silu(jnp.einsum("btd,edi->btei", xc, w1)) * jnp.einsum("btd,edi->btei", xc, w3)
        y = jnp.einsum("btei,eid->bted", h, w2)
        return jnp.einsum("bted,bte->btd", y.astype(jnp.float32), weights).astype(dtype)


class MiniMaxDecoderLayer(nnx.Module):
    """n = norm1(h); h = n*alpha + mixer(n)*beta; n = norm2(h); h = n*alpha' + moe(n)*beta'.

    Args:
      config: the model's hyperparameters.
      layer_idx: index of this layer (picks its type from `config.layer_types`).
      rngs: random streams for initialisation.
    """

    def __init__(self, config: MiniMaxConfig, layer_idx: int, *, rngs: nnx.Rngs):
        c = config
        self.layer_type = c.layer_types[layer_idx]
        norm = dict(epsilon=c.rms_norm_eps, param_dtype=c.param_dtype)
        self.input_layernorm = RMSNorm(c.hidden_size, **norm)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, **norm)
        if self.layer_type == "linear_attention":
            self.self_attn = MiniMaxLightningAttention(c, layer_idx, rngs=rngs)
            self.attn_factors = (c.linear_attn_alpha_factor, c.linear_attn_beta_factor)
        else:
            self.self_attn = MiniMaxAttention(c, layer_idx, rngs=rngs)
            self.attn_factors = (c.full_attn_alpha_factor, c.full_attn_beta_factor)
        self.mlp_factors = (c.mlp_alpha_factor, c.mlp_beta_factor)
        self.block_sparse_moe = MiniMaxSparseMoe(c, rngs=rngs)

    def __call__(
        self, x: jax.Array, *, decode: bool = False, segment_ids: jax.Array | None = None
    ) -> jax.Array:
        """x `[B, T, D]` -> `[B, T, D]`."""
        n = self.input_layernorm(x)
        alpha, beta = self.attn_factors
        h = n * alpha + self.self_attn(n, decode=decode, segment_ids=segment_ids) * beta
        n = self.post_attention_layernorm(h)
        alpha, beta = self.mlp_factors
        return n * alpha + self.block_sparse_moe(n) * beta


class MiniMaxForCausalLM(nnx.Module):
    """Decoder-only MiniMax-01 language model (hybrid lightning / softmax layers, MoE MLPs).

    Args:
      config: hyperparameters (`MiniMaxConfig`).
      rngs: random streams for initialisation.

    Example:
      >>> config = MiniMaxConfig(vocab_size=100, hidden_size=32, intermediate_size=32,
      ...     num_hidden_layers=2, num_attention_heads=4,
      ...     layer_types=("linear_attention", "full_attention"), num_local_experts=4)
      >>> model = MiniMaxForCausalLM(config, rngs=nnx.Rngs(0))
      >>> logits = model(jnp.zeros((2, 10), jnp.int32))  # [2, 10, 100]
    """

    def __init__(self, config: MiniMaxConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, MiniMaxConfig):
            raise TypeError(f"config must be a MiniMaxConfig, got {type(config).__name__}")
        c = config
        self.config = c
        self.embed_tokens = nnx.Embed(
            c.vocab_size,
            c.hidden_size,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            embedding_init=nnx.initializers.normal(0.02),
            rngs=rngs,
        )
        self.layers = nnx.List(
            [MiniMaxDecoderLayer(c, i, rngs=rngs) for i in range(c.num_hidden_layers)]
        )
        self.norm = RMSNorm(c.hidden_size, epsilon=c.rms_norm_eps, param_dtype=c.param_dtype)
        self.lm_head = (
            None if c.tie_word_embeddings else _linear(c.hidden_size, c.vocab_size, c, rngs)
        )

    @property
    def max_decode_length(self) -> int | None:
        """Most tokens one cache can hold: `max_cache_len` with any softmax layer, else None."""
        return self.config.max_cache_len if self.config.softmax_layers else None

    def init_cache(self, batch_size: int) -> None:
        """Creates (or resets) every layer's decoding cache for `batch_size` sequences.

        Lightning layers: a float32 state `[B, H, d, d]`; softmax layers: a KV
        cache `[B, max_cache_len, K, d]` and a position index.
        """
        for layer in self.layers:
            if isinstance(layer.self_attn, MiniMaxLightningAttention):
                layer.self_attn.init_cache(batch_size)
            else:
                layer.self_attn.init_cache(batch_size, self.config.max_cache_len)

    def __call__(
        self,
        tokens: jax.Array | None,
        *,
        decode: bool = False,
        segment_ids: jax.Array | None = None,
        inputs_embeds: jax.Array | None = None,
    ) -> jax.Array:
        """Next-token logits.

        Args:
          tokens: int `[B, T]` ids in [0, vocab_size) (None with `inputs_embeds`).
          decode: continue from the caches (after `init_cache`).
          segment_ids: optional int `[B, T]` ids of packed documents: lightning
            layers reset their state per run, softmax layers mask by run and
            restart rotary positions.
          inputs_embeds: `[B, T, D]` embeddings used instead of `tokens`.

        Returns:
          logits `[B, T, V]` in the compute dtype.
        """
        if inputs_embeds is None:
            check_tokens(tokens, self.config.vocab_size)
            x = self.embed_tokens(tokens)
        else:
            if tokens is not None:
                raise ValueError("pass tokens or inputs_embeds, not both")
            check_features(inputs_embeds, self.config.hidden_size, "MiniMaxForCausalLM")
            x = inputs_embeds
        if segment_ids is not None:
            check_segment_ids(segment_ids, x.shape[0], x.shape[1])
        for layer in self.layers:
            x = layer(x, decode=decode, segment_ids=segment_ids)
        x = self.norm(x)
        if self.lm_head is None:
            return self.embed_tokens.attend(x)
        return self.lm_head(x)
