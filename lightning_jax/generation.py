"""Autoregressive sampling with a constant-size decoding state.

`generate` prefills the prompt with the chunked op, then runs a jitted
`lax.fori_loop` of single-token steps. For the lightning model the carried
cache is one `[B, H, d, d]` float32 state per layer and the output buffer
`[B, prompt_len + max_new_tokens]` is allocated once, so memory does not grow
with the number of generated tokens. A hybrid model (`TransNormerConfig` with
`softmax_every` or a per-layer mixer list) carries each layer's own cache: the
lightning layers' fixed states and the softmax layers' KV caches of
`max_seq_len` positions, which bound prompt plus generated tokens.
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
    temperature: float = 1.0,
    top_k: int | None = None,
    rng: jax.Array | None = None,
) -> jax.Array:
    """Samples `max_new_tokens` tokens after a prompt.

    Works on a clone of `model` (the caller's model and its caches are left as
    they are): initialises the clone's cache for the prompt's batch, prefills
    the prompt in one call, then decodes one token per step in a jitted
    `lax.fori_loop`. Compiled once per (model structure, shapes, max_new_tokens,
    greedy, top_k).

    Args:
      model: a model with `init_cache(batch_size)` and
        `__call__(tokens, decode=True) -> logits [B, T, V]`, e.g. `TransNormerLM`.
      prompt_tokens: int `[B, P]` prompt, P >= 1.
      max_new_tokens: number of tokens N >= 0 to generate.
      temperature: softmax temperature >= 0; 0 is greedy (argmax) decoding.
      top_k: sample only among the k most likely tokens (None: all).
      rng: PRNG key for sampling; required when temperature > 0.

    Returns:
      int32 `[B, P + N]`: the prompt followed by the generated tokens.

    Raises:
      ValueError: bad arguments, a missing rng when sampling, or more tokens
        than the KV cache of a model with softmax layers holds.
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
    greedy = temperature == 0
    if rng is None:
        if not greedy:
            raise ValueError("rng is required for sampling (temperature > 0); pass a PRNG key")
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
    model.init_cache(batch)
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
