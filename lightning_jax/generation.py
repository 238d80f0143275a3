"""Autoregressive sampling with a constant-size decoding state.

`generate` prefills the prompt with the chunked op, then runs a jitted
`lax.fori_loop` of single-token steps. For the lightning model the carried
cache is one `[B, H, d, d]` float32 state per layer and the output buffer
`[B, prompt_len + max_new_tokens]` is allocated once, so memory does not grow
with the number of generated tokens. A hybrid model (`TransNormerConfig` with
`softmax_every` or a per-layer mixer list) carries each layer's own cache: the
lightning layers' fixed states and the softmax layers' KV caches of
`max_seq_len` positions, which bound prompt plus generated tokens.

`generate` also decodes a model of the user's own, built from the library's
layers: `init_caches` gives every cache-bearing layer inside it
(`lightning_jax.nn.LightningAttention`, `lightning_jax.nn.SoftmaxAttention`) its
cache, wherever it sits in the module tree.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from lightning_jax.models import check_tokens


def init_caches(model: nnx.Module, batch_size: int, max_length: int | None = None) -> int:
    """Initialises the decoding cache of every cache-bearing layer inside an NNX model.

    Walks the whole module tree (a user's own model built from the library's
    layers works as well as `TransNormerLM`) and calls `init_cache` on every
    `lightning_jax.nn.LightningAttention` (a zero `[B, H, d, d]` state) and
    `lightning_jax.nn.SoftmaxAttention` (a KV cache `[B, max_length, H, d]`).
    Existing caches are reset.

    Args:
      model: any NNX module.
      batch_size: batch size B of the tokens that will be decoded.
      max_length: most tokens (prompt plus generated) a softmax layer's KV cache
        holds; required when the model has softmax layers, unused otherwise.

    Returns:
      The number of layers whose cache was initialised.

    Raises:
      ValueError: a bad batch_size or max_length, a softmax layer without
        max_length, or no cache-bearing layer in the model.
    """
    from lightning_jax.nn import LightningAttention, SoftmaxAttention

    for name, value in (("batch_size", batch_size), ("max_length", max_length)):
        if value is None and name == "max_length":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    count = 0
    for _, module in nnx.iter_modules(model):
        if isinstance(module, LightningAttention):
            module.init_cache(int(batch_size))
        elif isinstance(module, SoftmaxAttention):
            if max_length is None:
                raise ValueError(
                    "init_caches: the model has SoftmaxAttention layers, whose KV caches need "
                    "max_length (prompt plus generated tokens)"
                )
            module.init_cache(int(batch_size), int(max_length))
        else:
            continue
        count += 1
    if not count:
        raise ValueError(
            f"init_caches: {type(model).__name__} holds no cache-bearing layer "
            "(lightning_jax.nn.LightningAttention or SoftmaxAttention)"
        )
    return count


def _sample(logits: jax.Array, key: jax.Array, temperature, greedy: bool, top_k: int | None):
    """logits `[B, V]` -> token ids `[B]` int32."""
    logits = logits.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if top_k is not None:
        kth = lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "top_k"))
def _generate(
    graphdef: nnx.GraphDef,
    cache: nnx.State,
    rest: nnx.State,
    prompt: jax.Array,
    rng: jax.Array,
    temperature: jax.Array,
    *,
    max_new_tokens: int,
    greedy: bool,
    top_k: int | None,
) -> jax.Array:
    """Prefill, then a `fori_loop` that carries only the cache, the last token and the buffer."""
    batch, prompt_len = prompt.shape
    out = jnp.zeros((batch, prompt_len + max_new_tokens), jnp.int32)
    out = lax.dynamic_update_slice(out, prompt.astype(jnp.int32), (0, 0))

    def step(cache, tokens, key):
        model = nnx.merge(graphdef, cache, rest)
        logits = model(tokens, decode=True)[:, -1]
        return nnx.state(model, nnx.Cache), _sample(logits, key, temperature, greedy, top_k)

    rng, key = jax.random.split(rng)
    cache, token = step(cache, prompt, key)
    out = out.at[:, prompt_len].set(token)

    def body(i, carry):
        cache, token, out, rng = carry
        rng, key = jax.random.split(rng)
        cache, token = step(cache, token[:, None], key)
        out = lax.dynamic_update_slice(out, token[:, None], (0, prompt_len + i))
        return cache, token, out, rng

    _, _, out, _ = lax.fori_loop(1, max_new_tokens, body, (cache, token, out, rng))
    return out


def generate(
    model: nnx.Module,
    prompt_tokens: jax.Array,
    max_new_tokens: int,
    *,
    temperature: float | None = None,
    top_k: int | None = None,
    rng: jax.Array | None = None,
) -> jax.Array:
    """Generates `max_new_tokens` tokens after a prompt: greedy without `rng`, else sampled.

    Without `rng` (and without temperature or top_k) decoding is greedy
    (argmax), deterministic; pass `rng=jax.random.key(seed)` to sample (at
    temperature 1 unless `temperature` says otherwise).

    Works on a clone of `model` (the caller's model and its caches are left as
    they are): initialises the clone's caches for the prompt's batch (the
    model's own `init_cache(batch_size)` if it has one, else `init_caches`, so
    any NNX model built from the library's layers decodes), prefills
    the prompt in one call, then decodes one token per step in a jitted
    `lax.fori_loop`. Compiled once per (model structure, shapes, max_new_tokens,
    greedy, top_k).

    Args:
      model: an NNX model with `__call__(tokens, decode=True) -> logits [B, T, V]`,
        e.g. `TransNormerLM` or a user's model built from
        `lightning_jax.nn.LightningAttention` / `SoftmaxAttention` layers (whose
        KV caches then hold P + N tokens).
      prompt_tokens: int `[B, P]` prompt, P >= 1.
      max_new_tokens: number of tokens N >= 0 to generate.
      temperature: softmax temperature >= 0; 0 is greedy (argmax) decoding.
        None: 1.0 with `rng`, greedy without.
      top_k: sample only among the k most likely tokens (None: all); needs `rng`.
      rng: PRNG key for sampling; None decodes greedily.

    Returns:
      int32 `[B, P + N]`: the prompt followed by the generated tokens.

    Raises:
      ValueError: bad arguments, a temperature > 0 or top_k without rng, a
        model without cache-bearing layers, or more tokens than the KV cache of
        a model with softmax layers holds.
      TypeError: non-integer prompt tokens.
    """
    config = getattr(model, "config", None)
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is not None:
        check_tokens(prompt_tokens, vocab_size)
    elif not hasattr(prompt_tokens, "ndim") or prompt_tokens.ndim != 2:
        raise ValueError("prompt_tokens must be an integer [batch, seq] array")
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, (int, np.integer))
        or max_new_tokens < 0
    ):
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.number)):
            raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
        if not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be finite and >= 0, got {temperature!r}")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise ValueError(f"top_k must be None or a positive int, got {top_k!r}")
        if vocab_size is not None and top_k > vocab_size:
            raise ValueError(f"top_k ({top_k}) exceeds the vocabulary size ({vocab_size})")
        top_k = int(top_k)
    if rng is None and (
        temperature not in (None, 0) or (top_k is not None and temperature is None)
    ):
        given = f"temperature={temperature!r}" if temperature not in (None, 0) else "top_k"
        raise ValueError(
            f"{given} samples, which needs rng=jax.random.key(seed); without rng, "
            "generate decodes greedily (leave temperature and top_k unset)"
        )
    if temperature is None:
        temperature = 0.0 if rng is None else 1.0
    greedy = temperature == 0
    if rng is None:
        rng = jax.random.key(0)  # unused by greedy decoding
    batch, prompt_len = prompt_tokens.shape
    max_len = getattr(model, "max_decode_length", None)
    if max_len is not None and prompt_len + max_new_tokens > max_len:
        raise ValueError(
            f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceed the model's "
            f"cache length {max_len} (config.max_seq_len)"
        )
    if max_new_tokens == 0:
        return jnp.asarray(prompt_tokens, jnp.int32)

    # A clone owns the cache, so the caller's model keeps no decoding state.
    model = nnx.clone(model)
    if hasattr(model, "init_cache"):
        model.init_cache(batch)
    else:
        init_caches(model, batch, max_length=prompt_len + max_new_tokens)
    graphdef, cache, rest = nnx.split(model, nnx.Cache, ...)
    return _generate(
        graphdef,
        cache,
        rest,
        jnp.asarray(prompt_tokens),
        rng,
        jnp.asarray(temperature if not greedy else 1.0, jnp.float32),
        max_new_tokens=int(max_new_tokens),
        greedy=greedy,
        top_k=top_k,
    )
