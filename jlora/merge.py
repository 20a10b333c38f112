"""Merged LoRA: fold ``s · A · B`` into the kernels for zero-latency inference, and back."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jlora.config import LoraConfig
from jlora.quantize import dequantize_tree
from jlora.spec import adapter_spec
from jlora.tree import LORA_A, LORA_B, PyTree, adapted_modules, flatten, join, path_str, unflatten


def delta(kernel_shape, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``s · A · B`` in float32, shaped like the kernel ``(*stack, *in, *out)``."""
    spec = adapter_spec(kernel_shape, a.shape, b.shape)
    stack = tuple(kernel_shape[: spec.stack])
    a2 = a.astype(jnp.float32).reshape((*stack, -1, a.shape[-1]))
    b2 = b.astype(jnp.float32).reshape((*stack, b.shape[spec.stack], -1))
    return (scale * jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST)).reshape(kernel_shape)


def _fold(params: PyTree, config: LoraConfig, sign: float) -> dict:
    """The flat tree with every adapted kernel replaced by ``W + sign · s · A · B``."""
    flat = flatten(params)
    for keys, leaves in adapted_modules(params).items():
        kernel, a = leaves["kernel"], leaves[LORA_A]
        d = delta(kernel.shape, a, leaves[LORA_B], config.scale(path_str(keys), a.shape[-1]))
        flat[(*keys, "kernel")] = (kernel.astype(jnp.float32) + sign * d).astype(kernel.dtype)
    return flat


def merge(params: PyTree, config: LoraConfig) -> dict:
    """A plain tree (no LoRA leaves) with ``W + s · A · B``, computed in float32 and cast
    once to W's dtype; the unmodified model consumes it at the base model's speed.
    Quantized kernels are dequantized first (to their original dtype): the result holds none."""
    folded = _fold(dequantize_tree(params), config, 1.0)
    return unflatten({k: v for k, v in folded.items() if k[-1] not in (LORA_A, LORA_B)})


def unmerge(merged: PyTree, adapters: PyTree, config: LoraConfig) -> dict:
    """Undo `merge`: ``W = merged - s · A · B`` (exact up to rounding of W's dtype), with
    the LoRA factors of `adapters` joined back in (`modules_to_save` stay as merged)."""
    factors = unflatten({k: v for k, v in flatten(adapters).items() if k[-1] in (LORA_A, LORA_B)})
    return unflatten(_fold(join(factors, merged), config, -1.0))
