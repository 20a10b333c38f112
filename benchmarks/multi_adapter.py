"""Serving several adapters from one base: what `benchmarks.run` times for the mixed batch.

On the SmolLM2-135M architecture (the real preset), LoRA r=8 on all seven projections,
four adapters, 8 prompts × 128 tokens (a forward pass, as in prefill):

  base      one batch of 8 on the base model alone
  mixed     one batch of 8, example i with adapter i % 4 (`jlora.multi.apply`)
  separate  the same 8 as four single-adapter batches of 2 (`jlora.apply`, one compile)
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

import jlora
import jlora.models
from benchmarks.common import BATCH, PRESET, RANK, SEQ, TARGETS
from jlora import multi

N_ADAPTERS = 4


def adapters_for(pretrained, n: int) -> list[tuple[dict, jlora.LoraConfig]]:
    """`n` adapted trees with different, non-zero adapters."""
    config = jlora.LoraConfig(r=RANK, alpha=2 * RANK, target_modules=list(TARGETS))
    out = []
    for i in range(n):
        params = jlora.init(pretrained.params, config, jax.random.key(i), specs=pretrained.kernel_specs())
        adapters, base = jlora.split(params, config)
        adapters = jax.tree.map(lambda x, i=i: x + 0.01 * jax.random.normal(jax.random.key(100 + i), x.shape), adapters)
        out.append((jlora.join(adapters, base), config))
    return out


def candidates() -> dict[str, Callable[[], None]]:
    """The three ways to run the batch, compiled and warmed up."""
    pretrained = jlora.models.load(PRESET, scan=True, tokenizer=False)
    model, base = pretrained.model, pretrained.params
    adapters = adapters_for(pretrained, N_ADAPTERS)
    stacked = multi.stack(adapters)
    tokens = jax.random.randint(jax.random.key(0), (BATCH, SEQ), 1, 1000)
    ids = jnp.arange(BATCH, dtype=jnp.int32) % N_ADAPTERS

    base_forward = jax.jit(lambda p, t: model.apply({"params": p}, t))
    mixed_forward = jax.jit(functools.partial(multi.apply, model))
    single_forward = jax.jit(lambda p, t: jlora.apply(model, p, adapters[0][1], t))
    joined = [params for params, _ in adapters]
    groups = [tokens[ids == k] for k in range(N_ADAPTERS)]
    out = {
        "base": lambda: jax.block_until_ready(base_forward(base, tokens)),
        "mixed": lambda: jax.block_until_ready(mixed_forward(base, stacked, ids, tokens)),
        "separate": lambda: jax.block_until_ready([single_forward(p, g) for p, g in zip(joined, groups, strict=True)]),
    }
    for fn in out.values():
        fn()
    return out
