"""A TransNormerLLM-style decoder-only language model in Flax NNX.

`TransNormerLM(config, rngs=...)` maps int tokens `[B, T]` to logits
`[B, T, V]`: a token embedding (times sqrt(D), as TransNormerLLM does),
pre-norm blocks `x += mixer(norm(x)); x += SGLU(norm(x))` with `SimpleRMSNorm`,
a final norm and an LM head without bias. Layer l of L mixes tokens with
`LightningAttention` and the slopes `layer_slopes(H, l, L)`; `mixer="softmax"`
swaps in causal softmax attention with rotary embeddings (the baseline).

Hybrids (as MiniMax-01 interleaves one softmax layer after every seven
lightning layers): `softmax_every=k` makes layers k-1, 2k-1, ... softmax and
the rest lightning, or `mixer` takes an explicit per-layer tuple such as
`("lightning", "lightning", "softmax")`. `config.layer_mixers` is the resolved
schedule. A lightning layer keeps its slopes `layer_slopes(H, l, L)` by its
index l in the whole stack, whatever the other layers are.

Decoding: `model.init_cache(batch_size)` gives every lightning layer its
fixed-size float32 state and every softmax layer a KV cache of
`config.max_seq_len`; `model(tokens, decode=True)` then consumes any number of
new tokens per call (prefill a prompt, then one token at a time). In a hybrid,
only the softmax layers' caches grow with `max_seq_len`.

Sequence parallelism: `TransNormerConfig(mesh=..., seq_axis=..., batch_axis=...)`
runs every lightning layer's op sequence-parallel over `seq_axis` (see
`lightning_jax.nn.LightningAttention`); inside `jax.jit`, with the tokens
sharded `P(batch_axis, seq_axis)`, the per-token rest of the model stays
sharded along the sequence too. Softmax layers have no sequence-parallel
path, so a config with `seq_axis` and any softmax layer raises a ValueError.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lightning_jax._checks import check_segment_ids
from lightning_jax.nn import (
    SGLU,
    LightningAttention,
    SimpleRMSNorm,
    SoftmaxAttention,
    check_interpret,
    check_sequence_parallel,
)

MIXERS = ("lightning", "softmax")


def check_positive_field(config: str, name: str, value: Any) -> None:
    """A config field that must be a positive int: a ValueError naming `config.name`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{config}.{name} must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class TransNormerConfig:
    """Hyperparameters of `TransNormerLM`.

    Attributes:
      vocab_size: number of token ids V.
      num_layers: number of blocks L.
      embed_dim: model width D.
      num_heads: heads H of every token mixer.
      head_dim: per-head width d (None: D // H, which must divide evenly).
      mlp_dim: hidden width F of the SGLU (None: 11 * D // 4, the ratio of
        TransNormerLLM-385M, 1024 -> 2816).
      mixer: "lightning" (TransNormerLLM) or "softmax" (causal softmax
        attention with RoPE, the baseline) for every layer; or a sequence of
        `num_layers` such names, one per layer (a hybrid; stored as a tuple).
      softmax_every: k >= 1 makes every k-th layer softmax (layers k-1, 2k-1,
        ...; k <= num_layers) and the rest lightning, as MiniMax-01 does with
        k = 8; needs mixer="lightning". 0 (default): no schedule.
      max_seq_len: length of the softmax KV cache (prompt plus generated
        tokens); the lightning state does not depend on it.
      rope_base: base of the rotary frequencies (softmax mixer).
      impl: implementation of the lightning op (`lightning_jax.available_impls()`).
      block_size: block size of the lightning op (None: its default).
      interpret: Pallas implementations of the lightning op only: run the
        kernel in the Pallas interpreter (None: exactly when the default backend
        is CPU; False: the real kernel, e.g. to lower for a TPU on a CPU host).
      scale_embedding: multiply embeddings by sqrt(D) (TransNormerLLM's default).
      init_std: std of the normal initialiser of every kernel and the
        embedding (TransNormerLLM's `init_std`).
      epsilon: epsilon of every SimpleRMSNorm.
      dtype: compute dtype (None: float32 from float32 params).
      param_dtype: dtype of the parameters.
      mesh: `jax.sharding.Mesh` of `seq_axis` and `batch_axis` (unused without
        `seq_axis`).
      seq_axis: mesh axis (or tuple) the lightning op shards the sequence over
        (None: no sequence parallelism). Lightning layers only: a config with
        any softmax layer refuses it; decoding ignores it.
      batch_axis: mesh axis (or tuple) the batch is sharded over (with `seq_axis`).
    """

    vocab_size: int
    num_layers: int
    embed_dim: int
    num_heads: int
    head_dim: int | None = None
    mlp_dim: int | None = None
    mixer: str | Sequence[str] = "lightning"
    softmax_every: int = 0
    max_seq_len: int = 2048
    rope_base: float = 10000.0
    impl: str = "auto"
    block_size: int | None = None
    interpret: bool | None = None
    scale_embedding: bool = True
    init_std: float = 0.02
    epsilon: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32
    mesh: Any = None
    seq_axis: Any = None
    batch_axis: Any = None

    def __post_init__(self):
        for name in ("vocab_size", "num_layers", "embed_dim", "num_heads", "max_seq_len"):
            check_positive_field("TransNormerConfig", name, getattr(self, name))
        for name in ("head_dim", "mlp_dim"):
            if getattr(self, name) is not None:
                check_positive_field("TransNormerConfig", name, getattr(self, name))
        self._check_schedule()
        if self.head_dim is None and self.embed_dim % self.num_heads:
            raise ValueError(
                f"TransNormerConfig: embed_dim ({self.embed_dim}) must be divisible by num_heads "
                f"({self.num_heads}) when head_dim is not given"
            )
        softmax_layers = self.softmax_layers
        if softmax_layers and self.attn_head_dim % 2:
            raise ValueError(
                f"TransNormerConfig: the softmax mixer's RoPE needs an even head_dim, got "
                f"{self.attn_head_dim}"
            )
        if softmax_layers and self.seq_axis is not None:
            raise ValueError(
                "TransNormerConfig: seq_axis (sequence parallelism) is supported by the "
                f"lightning mixer only, but layers {list(softmax_layers)} are softmax "
                f"(layer_mixers {self.layer_mixers})"
            )
        check_sequence_parallel("TransNormerConfig", self.mesh, self.seq_axis, self.batch_axis)
        check_interpret("TransNormerConfig", self.interpret)

    def _check_schedule(self) -> None:
        """Validates mixer / softmax_every; stores a per-layer mixer list as a tuple."""
        k = self.softmax_every
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"TransNormerConfig.softmax_every must be an int >= 0, got {k!r}")
        if isinstance(self.mixer, str):
            if self.mixer not in MIXERS:
                raise ValueError(
                    f"TransNormerConfig.mixer must be one of {MIXERS} or a per-layer sequence "
                    f"of them, got {self.mixer!r}"
                )
            if k and self.mixer != "lightning":
                raise ValueError(
                    "TransNormerConfig.softmax_every interleaves softmax layers into a lightning "
                    f"stack and needs mixer='lightning', got mixer={self.mixer!r}"
                )
            if k > self.num_layers:
                raise ValueError(
                    f"TransNormerConfig.softmax_every ({k}) exceeds num_layers "
                    f"({self.num_layers}): no layer would be softmax"
                )
            return
        if not isinstance(self.mixer, Sequence):
            raise ValueError(
                f"TransNormerConfig.mixer must be one of {MIXERS} or a per-layer sequence of "
                f"them, got {self.mixer!r}"
            )
        mixers = tuple(self.mixer)
        bad = [(i, m) for i, m in enumerate(mixers) if not isinstance(m, str) or m not in MIXERS]
        if bad:
            raise ValueError(
                f"TransNormerConfig.mixer: every per-layer entry must be one of {MIXERS}, got "
                + ", ".join(f"{m!r} at layer {i}" for i, m in bad)
            )
        if len(mixers) != self.num_layers:
            raise ValueError(
                f"TransNormerConfig.mixer lists {len(mixers)} layer mixers, but num_layers is "
                f"{self.num_layers}"
            )
        if k:
            raise ValueError(
                "TransNormerConfig: pass either a per-layer mixer sequence or softmax_every, "
                f"not both (got softmax_every={k})"
            )
        object.__setattr__(self, "mixer", mixers)  # a tuple keeps the config hashable

    @property
    def layer_mixers(self) -> tuple[str, ...]:
        """The mixer of each of the `num_layers` layers ("lightning" or "softmax")."""
        if not isinstance(self.mixer, str):
            return tuple(self.mixer)
        k = self.softmax_every
        return tuple(
            "softmax" if k and (i + 1) % k == 0 else self.mixer for i in range(self.num_layers)
        )

    @property
    def softmax_layers(self) -> tuple[int, ...]:
        """Indices of the softmax layers (their KV caches grow with `max_seq_len`)."""
        return tuple(i for i, m in enumerate(self.layer_mixers) if m == "softmax")

    @property
    def attn_head_dim(self) -> int:
        """Per-head width d actually used."""
        return self.head_dim if self.head_dim is not None else self.embed_dim // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        """SGLU hidden width F actually used."""
        return self.mlp_dim if self.mlp_dim is not None else 11 * self.embed_dim // 4


def count_params(config: TransNormerConfig) -> int:
    """Number of parameters of `TransNormerLM(config)`.

    V*D (embedding) + V*D (LM head, untied) + the sum over layers of
    (mixer + 3*D*F), where a lightning mixer has D*4*H*d + H*d*D weights (qkvu
    and output projections) and a softmax mixer D*3*H*d + H*d*D. Norms have no
    weights; slopes and caches are not parameters.
    """
    c = config
    hidden = c.num_heads * c.attn_head_dim
    total = 2 * c.vocab_size * c.embed_dim
    for mixer in c.layer_mixers:
        fused = 4 if mixer == "lightning" else 3
        total += c.embed_dim * fused * hidden + hidden * c.embed_dim
        total += 3 * c.embed_dim * c.mlp_hidden_dim
    return total


def check_tokens(tokens: Any, vocab_size: int) -> None:
    """Tokens must be an integer `[B, T]` array; concrete values must lie in [0, vocab_size).

    Raises:
      TypeError: not an array, or not an integer dtype.
      ValueError: a wrong rank, an empty axis, or (outside jit) an id out of range.
    """
    if not hasattr(tokens, "shape") or not hasattr(tokens, "dtype"):
        raise TypeError(f"tokens must be an integer array, got {type(tokens).__name__}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"tokens must have an integer dtype, got {tokens.dtype}")
    if tokens.ndim != 2 or 0 in tokens.shape:
        raise ValueError(f"tokens must have shape [batch, seq] with seq >= 1, got {tokens.shape}")
    if not isinstance(tokens, jax.core.Tracer):
        concrete = np.asarray(tokens)
        low, high = int(concrete.min()), int(concrete.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"token ids must lie in [0, vocab_size={vocab_size}), got ids from {low} to {high}"
            )


class TransNormerBlock(nnx.Module):
    """Pre-norm block: x += mixer(norm(x)); x += SGLU(norm(x)).

    Args:
      config: the model's hyperparameters.
      layer_idx: index of this block (picks its mixer from `config.layer_mixers`
        and sets the lightning slopes).
      rngs: random streams for initialisation.
    """

    def __init__(self, config: TransNormerConfig, layer_idx: int, *, rngs: nnx.Rngs):
        c = config
        init = nnx.initializers.normal(c.init_std)
        common = dict(dtype=c.dtype, param_dtype=c.param_dtype, kernel_init=init, rngs=rngs)
        self.token_norm = SimpleRMSNorm(c.embed_dim, epsilon=c.epsilon)
        if c.layer_mixers[layer_idx] == "lightning":
            self.token_mixer = LightningAttention(
                c.embed_dim,
                c.num_heads,
                head_dim=c.head_dim,
                layer_idx=layer_idx,
                num_layers=c.num_layers,
                impl=c.impl,
                block_size=c.block_size,
                interpret=c.interpret,
                epsilon=c.epsilon,
                mesh=c.mesh,
                seq_axis=c.seq_axis,
                batch_axis=c.batch_axis,
                **common,
            )
        else:
            self.token_mixer = SoftmaxAttention(
                c.embed_dim, c.num_heads, head_dim=c.head_dim, rope_base=c.rope_base, **common
            )
        self.channel_norm = SimpleRMSNorm(c.embed_dim, epsilon=c.epsilon)
        self.channel_mixer = SGLU(c.embed_dim, c.mlp_hidden_dim, **common)

    def __call__(
        self, x: jax.Array, *, decode: bool = False, segment_ids: jax.Array | None = None
    ) -> jax.Array:
        """x `[B, T, D]` -> `[B, T, D]`; segment_ids `[B, T]` as in the token mixer."""
        kwargs = {} if segment_ids is None else {"segment_ids": segment_ids}
        x = x + self.token_mixer(self.token_norm(x), decode=decode, **kwargs)
        return x + self.channel_mixer(self.channel_norm(x))


class TransNormerLM(nnx.Module):
    """Decoder-only language model in the TransNormerLLM layout.

    Args:
      config: hyperparameters (`TransNormerConfig`).
      rngs: random streams for initialisation.

    Example:
      >>> config = TransNormerConfig(vocab_size=256, num_layers=2, embed_dim=64, num_heads=4)
      >>> model = TransNormerLM(config, rngs=nnx.Rngs(0))
      >>> logits = model(jnp.zeros((2, 10), jnp.int32))  # [2, 10, 256]
    """

    def __init__(self, config: TransNormerConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, TransNormerConfig):
            raise TypeError(f"config must be a TransNormerConfig, got {type(config).__name__}")
        c = config
        self.config = config
        init = nnx.initializers.normal(c.init_std)
        self.embed = nnx.Embed(
            c.vocab_size,
            c.embed_dim,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            embedding_init=init,
            rngs=rngs,
        )
        self.layers = nnx.List([TransNormerBlock(c, i, rngs=rngs) for i in range(c.num_layers)])
        self.final_norm = SimpleRMSNorm(c.embed_dim, epsilon=c.epsilon)
        self.lm_head = nnx.Linear(
            c.embed_dim,
            c.vocab_size,
            use_bias=False,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            kernel_init=init,
            rngs=rngs,
        )

    @property
    def max_decode_length(self) -> int | None:
        """Most tokens one cache can hold: `max_seq_len` with any softmax layer, else None."""
        return self.config.max_seq_len if self.config.softmax_layers else None

    def init_cache(self, batch_size: int) -> None:
        """Creates (or resets) every layer's decoding cache for `batch_size` sequences.

        Lightning layers get a float32 state `[B, H, d, d]` (its size does not
        depend on the length decoded); softmax layers a KV cache of
        `config.max_seq_len` positions and a position index. Each layer keeps
        its own kind, so a hybrid's cache grows with `max_seq_len` only in its
        softmax layers.
        """
        for layer in self.layers:
            mixer = layer.token_mixer
            if isinstance(mixer, LightningAttention):
                mixer.init_cache(batch_size)
            else:
                mixer.init_cache(batch_size, self.config.max_seq_len)

    def __call__(
        self, tokens: jax.Array, *, decode: bool = False, segment_ids: jax.Array | None = None
    ) -> jax.Array:
        """Next-token logits.

        Args:
          tokens: int `[B, T]` ids in [0, vocab_size).
          decode: continue from the caches (after `init_cache`): the T tokens
            follow the ones already consumed, and the caches advance past them.
          segment_ids: optional int `[B, T]` ids of packed documents: no token
            sees another run of ids (linear layers reset their state, softmax
            layers mask by run and restart rotary positions per run).

        Returns:
          logits `[B, T, V]` in the compute dtype.
        """
        check_tokens(tokens, self.config.vocab_size)
        if segment_ids is not None:
            check_segment_ids(segment_ids, tokens.shape[0], tokens.shape[1])
        x = self.embed(tokens)
        if self.config.scale_embedding:
            x = x * jnp.asarray(math.sqrt(self.config.embed_dim), x.dtype)
        for layer in self.layers:
            x = layer(x, decode=decode, segment_ids=segment_ids)
        return self.lm_head(self.final_norm(x))
