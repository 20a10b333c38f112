"""Paths over parameter trees, and the split of a tree into trainable and frozen parts.

Works on the nested dicts that Linen's `init` returns and on the pure dicts of NNX state
(`nnx.to_pure_dict`), whose layer lists have integer keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from flax.core.meta import AxisMetadata

from jlora.config import LoraConfig

LORA_A, LORA_B = "lora_a", "lora_b"
LORA_MAGNITUDE = "lora_magnitude"  # DoRA's trainable magnitude m beside A and B (`LoraConfig.use_dora`)
ADAPTER_LEAVES = (LORA_A, LORA_B, LORA_MAGNITUDE)
Keys = tuple[Any, ...]
PyTree = Any


class Leaf:
    """Base of pytree nodes that jlora's tree functions keep whole, as one leaf (a quantized
    kernel, `jlora.quantize`): its arrays stand for one parameter together."""


def is_leaf(x: Any) -> bool:
    return isinstance(x, Leaf)


def path_str(keys: Keys) -> str:
    """``('layers', 0, 'q_proj') -> 'layers/0/q_proj'``."""
    return "/".join(str(k) for k in keys)


def _key(entry) -> Any:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return entry


def _check_unboxed(tree: PyTree) -> None:
    if any(_is_box(leaf) for leaf in jax.tree.leaves(tree, is_leaf=_is_box)):
        raise ValueError(
            "params hold nn.Partitioned (logical axis) boxes; pass nn.meta.unbox(params) and keep the "
            "partition specs (nn.get_partition_spec) separately"
        )


def _is_box(x) -> bool:
    return isinstance(x, AxisMetadata)


def flatten(tree: PyTree) -> dict[Keys, Any]:
    """``{(k1, k2, ...): leaf}`` for every leaf of a nested mapping (a `Leaf` node is one)."""
    _check_unboxed(tree)
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return {tuple(_key(e) for e in path): leaf for path, leaf in leaves}


def unflatten(flat: Mapping[Keys, Any]) -> dict:
    """The inverse of `flatten`, as plain nested dicts."""
    out: dict = {}
    for keys, leaf in flat.items():
        node = out
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = leaf
    return out


def adapter_names(name: str, kernel_layout: bool = True) -> tuple[str, str]:
    """The sibling names of a weight's adapters: ``kernel -> (lora_a, lora_b)`` for a kernel laid
    out ``(*stack, *in, *out)`` (Linen and NNX layers), which `merge`, `peft` and sharding read
    from the shapes; any other weight ``w``, or a kernel whose axes interleave
    (``kernel_layout=False``), ``-> (w_lora_a, w_lora_b)``, whose layout only the function
    that uses it knows (`jlora.interpret`)."""
    if not isinstance(name, str):
        raise ValueError(f"a LoRA target must be a dict entry with a string key, not a leaf at index {name!r}")
    return (LORA_A, LORA_B) if name == "kernel" and kernel_layout else (f"{name}_{LORA_A}", f"{name}_{LORA_B}")


def is_adapter(name: Any) -> bool:
    """Whether a leaf named `name` is a LoRA factor under `adapter_names`' rule, or a DoRA magnitude."""
    return isinstance(name, str) and (name in ADAPTER_LEAVES or name.endswith((f"_{LORA_A}", f"_{LORA_B}")))


def is_trainable(keys: Keys, config: LoraConfig) -> bool:
    """A LoRA factor or DoRA magnitude, or any parameter inside a `modules_to_save` module."""
    return is_adapter(keys[-1]) or any(config.saves(path_str(keys[:i])) for i in range(1, len(keys)))


def split(params: PyTree, config: LoraConfig) -> tuple[dict, dict]:
    """``(adapters, base)``: the trainable leaves and the frozen rest, as two nested dicts
    with the tree's own paths. Optimizers, gradients and checkpoints use `adapters` alone."""
    adapters, base = {}, {}
    for keys, leaf in flatten(params).items():
        (adapters if is_trainable(keys, config) else base)[keys] = leaf
    return unflatten(adapters), unflatten(base)


def join(adapters: PyTree, base: PyTree) -> dict:
    """The inverse of `split`: one tree holding both."""
    flat = flatten(base)
    overlap = flat.keys() & flatten(adapters).keys()
    if overlap:
        raise ValueError(f"join: adapters and base both hold {sorted(map(path_str, overlap))[:5]}")
    flat.update(flatten(adapters))
    return unflatten(flat)


def labels(params: PyTree, config: LoraConfig) -> PyTree:
    """A tree like `params` of ``"trainable"`` / ``"frozen"``, for `optax.multi_transform`."""
    _check_unboxed(params)
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "trainable" if is_trainable(tuple(map(_key, path)), config) else "frozen",
        params,
        is_leaf=is_leaf,
    )


def trainable_mask(params: PyTree, config: LoraConfig) -> PyTree:
    """A tree like `params` of booleans, True on trainable leaves (for `optax.masked`)."""
    return jax.tree_util.tree_map(lambda label: label == "trainable", labels(params, config))


def adapted_modules(params: PyTree) -> dict[Keys, dict[str, Any]]:
    """``{module keys: {'kernel': W, 'lora_a': A, 'lora_b': B}}`` for every adapted module
    (and ``'lora_magnitude': m`` where DoRA put one)."""
    modules: dict[Keys, dict[str, Any]] = {}
    for keys, leaf in flatten(params).items():
        if is_adapter(keys[-1]) and keys[-1] not in ADAPTER_LEAVES:
            raise ValueError(
                f"{path_str(keys)}: an adapter of a weight whose layout only the function using it knows "
                "(jlora.interpret's naming rule); merge it with jlora.interpret.merge(params, specs, config) "
                "and apply it with jlora.interpret.lora"
            )
        if keys[-1] in ("kernel", *ADAPTER_LEAVES):
            modules.setdefault(keys[:-1], {})[keys[-1]] = leaf
    return {keys: leaves for keys, leaves in modules.items() if LORA_A in leaves}
