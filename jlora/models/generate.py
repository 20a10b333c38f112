"""Text generation with the KV cache: greedy, or temperature / top-p sampling, optionally
with LoRA adapters applied factored (or pass merged params for zero overhead)."""

from __future__ import annotations

import contextlib
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jlora import multi
from jlora.apply import intercept
from jlora.config import LoraConfig
from jlora.models.layers import init_cache


def sample(logits: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """Next tokens (B,) from logits (B, V): argmax at temperature 0, else a draw from the
    tempered distribution restricted to its top-p nucleus."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        kept = jnp.sum(jnp.cumsum(probs, axis=-1) - probs < top_p, axis=-1)  # >= 1: the top token
        threshold = jnp.take_along_axis(ordered, kept[:, None] - 1, axis=-1)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)


@functools.partial(
    jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_p", "eos_token_id", "pad_token_id", "lora")
)
def generate(
    model: nn.Module,
    params: dict,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    max_new_tokens: int,
    key: jax.Array | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    lora: LoraConfig | None = None,
    adapter_ids: jax.Array | None = None,
) -> jax.Array:
    """Continue each prompt by `max_new_tokens` tokens; returns them, (B, max_new_tokens).

    Prompts may be padded on either side (`attention_mask` 1 on real tokens). After a
    sequence emits `eos_token_id` it emits `pad_token_id`. With `lora`, `params` hold
    adapters and they are applied factored; merged params need no `lora`. With
    `adapter_ids` (B,), `params` hold a `jlora.multi.stack`-ed tree and prompt i is
    continued with adapter ``adapter_ids[i]`` (-1: the base); the ids are data, so any mix
    reuses the compiled program.
    """
    batch, length = input_ids.shape
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    if key is None:
        key = jax.random.key(0)
    cache = init_cache(model, batch, length + max_new_tokens)

    def adapters():
        if adapter_ids is not None:
            return multi.intercept(adapter_ids)
        return intercept(lora) if lora is not None else contextlib.nullcontext()

    def forward(cache, ids, mask, positions):
        with adapters():
            logits, state = model.apply(
                {"params": params, "cache": cache}, ids, mask, positions, decode=True, mutable=["cache"]
            )
        return logits, state["cache"]

    positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
    logits, cache = forward(cache, input_ids, attention_mask, positions)
    last = jnp.argmax(attention_mask * jnp.arange(length), axis=-1)  # each prompt's last real token
    rows = jnp.arange(batch)

    def step(carry, step_key):
        cache, logits, position, done = carry
        token = jnp.where(done, pad_token_id, sample(logits, step_key, temperature, top_p))
        if eos_token_id is not None:
            done = done | (token == eos_token_id)
        logits, cache = forward(cache, token[:, None], jnp.ones((batch, 1), attention_mask.dtype), position[:, None])
        return (cache, logits[:, -1], position + 1, done), token

    carry = (cache, logits[rows, last], positions[rows, last] + 1, jnp.zeros(batch, bool))
    _, tokens = lax.scan(step, carry, jax.random.split(key, max_new_tokens))
    return tokens.T
