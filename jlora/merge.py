"""Merged LoRA: fold ``s · A · B`` into the kernels for zero-latency inference, and back.

With DoRA (`LoraConfig.use_dora`) the merged kernel is peft's ``m / ‖W + s·A·B‖ · (W + s·A·B)``."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jlora.config import LoraConfig
from jlora.quantize import dequantize, dequantize_tree, is_quantized
from jlora.spec import KernelSpec, adapter_spec
from jlora.tree import (
    ADAPTER_LEAVES,
    LORA_A,
    LORA_B,
    LORA_MAGNITUDE,
    PyTree,
    adapted_modules,
    flatten,
    join,
    path_str,
    unflatten,
)


def delta(kernel_shape, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``s · A · B`` in float32, shaped like the kernel ``(*stack, *in, *out)``."""
    spec = adapter_spec(kernel_shape, a.shape, b.shape)
    stack = tuple(kernel_shape[: spec.stack])
    a2 = a.astype(jnp.float32).reshape((*stack, -1, a.shape[-1]))
    b2 = b.astype(jnp.float32).reshape((*stack, b.shape[spec.stack], -1))
    return (scale * jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST)).reshape(kernel_shape)


def _column_norm(w: jax.Array, spec: KernelSpec) -> jax.Array:
    """The L2 norm of `w` over its input axes: one per output feature, ``(*stack, *out)``."""
    return jnp.sqrt(jnp.sum(jnp.square(w), axis=spec.in_axes))


def weight_norm(kernel, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """DoRA's ``‖W + s·A·B‖`` in float32, ``(*stack, *out)``: per output feature, the norm over
    the input axes (peft's ``get_weight_norm``, over dim 1 of torch's (out, in) weight). A
    quantized W is dequantized for it. Builds the kernel-sized ΔW, as peft does."""
    w = dequantize(kernel, jnp.float32) if is_quantized(kernel) else jnp.asarray(kernel, jnp.float32)
    return _column_norm(w + delta(kernel.shape, a, b, scale), adapter_spec(kernel.shape, a.shape, b.shape))


def _fold(params: PyTree, config: LoraConfig, sign: float) -> dict:
    """The flat tree with every adapted kernel replaced by ``W + sign · s · A · B``, rescaled
    per output feature to ``m / ‖W + s·A·B‖ · (W + s·A·B)`` where a DoRA magnitude m is given."""
    flat = flatten(params)
    for keys, leaves in adapted_modules(params).items():
        kernel, a, b = leaves["kernel"], leaves[LORA_A], leaves[LORA_B]
        w = kernel.astype(jnp.float32) + sign * delta(kernel.shape, a, b, config.scale(path_str(keys), a.shape[-1]))
        if LORA_MAGNITUDE in leaves:
            spec = adapter_spec(kernel.shape, a.shape, b.shape)
            w = w * jnp.expand_dims(leaves[LORA_MAGNITUDE].astype(jnp.float32) / _column_norm(w, spec), spec.in_axes)
        flat[(*keys, "kernel")] = w.astype(kernel.dtype)
    return flat


def merge(params: PyTree, config: LoraConfig) -> dict:
    """A plain tree (no LoRA leaves) with ``W + s · A · B`` (DoRA: ``m / ‖W + s·A·B‖ · (W + s·A·B)``),
    computed in float32 and cast once to W's dtype; the unmodified model consumes it at the
    base model's speed. Quantized kernels are dequantized first (to their original dtype):
    the result holds none."""
    folded = _fold(dequantize_tree(params), config, 1.0)
    return unflatten({k: v for k, v in folded.items() if k[-1] not in ADAPTER_LEAVES})


def unmerge(merged: PyTree, adapters: PyTree, config: LoraConfig) -> dict:
    """Undo `merge`: ``W = merged - s · A · B`` (exact up to rounding of W's dtype), with
    the LoRA factors of `adapters` joined back in (`modules_to_save` stay as merged).

    DoRA adapters are refused: their merge keeps each output feature's direction and
    magnitude m but not ``‖W + s·A·B‖``, without which W is lost (peft's unmerge reads it from
    a cache that its own merge filled)."""
    flat = flatten(adapters)
    dora = [path_str(k[:-1]) for k in flat if k[-1] == LORA_MAGNITUDE]
    if dora:
        raise ValueError(
            f"unmerge: {dora[:3]} are DoRA adapters, whose merge m / ‖W + s·A·B‖ · (W + s·A·B) does not keep "
            "‖W + s·A·B‖, so W cannot be recovered; keep the unmerged tree (jlora.split / jlora.join)"
        )
    factors = unflatten({k: v for k, v in flat.items() if k[-1] in (LORA_A, LORA_B)})
    return unflatten(_fold(join(factors, merged), config, -1.0))
