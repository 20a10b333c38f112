"""Optimizers that update the adapters and leave everything else exactly as it was.

Two ways to train:

* Recommended: differentiate the adapters only, with the frozen base closed over, so no
  frozen gradient is ever computed (the README quickstart runs this)::

      adapters, base = jlora.split(params, config)
      loss_fn = lambda adapters: loss(jlora.join(adapters, base))
      grads = jax.grad(loss_fn)(adapters)          # a tree of adapter gradients only
      updates, opt_state = tx.update(grads, opt_state, adapters)

* Drop-in: keep differentiating the whole tree and let `optimizer(tx, config)` zero the
  frozen updates (`optax.multi_transform` + `optax.set_to_zero`). Frozen leaves stay
  bit-identical, but their gradients are still computed by `jax.grad`.

LoRA+ (`loraplus`) composes with either: B learns `ratio` times faster than A.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jlora.config import LoraConfig
from jlora.tree import LORA_B, LORA_MAGNITUDE, PyTree, labels


def optimizer(tx: optax.GradientTransformation, config: LoraConfig) -> optax.GradientTransformation:
    """`tx` on trainable leaves, `optax.set_to_zero()` on the rest, for a full params tree
    or an adapters-only one. Frozen leaves get no optimizer state."""
    return optax.multi_transform(
        {"trainable": tx, "frozen": optax.set_to_zero()}, lambda params: labels(params, config)
    )


def _leaf_name(path) -> str:
    return jax.tree_util.keystr(path[-1:], simple=True)


def _module(path) -> str:
    return jax.tree_util.keystr(path[:-1], simple=True, separator="/")


def loraplus_b(tree: PyTree) -> PyTree:
    """True on the leaves LoRA+ trains at the higher rate, as peft's `create_loraplus_optimizer`
    groups them: every ``lora_b`` and every 1-D trainable parameter (a `modules_to_save` bias or
    norm scale); A and the other parameters keep the base rate."""
    fast = lambda path, x: _leaf_name(path) in (LORA_B, LORA_MAGNITUDE) or jnp.ndim(x) == 1
    return jax.tree_util.tree_map_with_path(fast, tree)


def loraplus(tx: optax.GradientTransformation, ratio: float = 16.0) -> optax.GradientTransformation:
    """LoRA+ (Hayou et al. 2024): `tx` with the updates of B (`loraplus_b`) multiplied by `ratio`,
    i.e. B trained at learning rate ``ratio × lr``, as peft's ``create_loraplus_optimizer(model,
    optimizer_cls, lr=lr, loraplus_lr_ratio=ratio)``.

    Scaling `tx`'s final update is exactly a per-group learning rate for any `tx` whose update is
    proportional to its learning rate (SGD, momentum, Adam, AdamW and its decoupled decay, Lion,
    schedules, clipping before them); not for learning-rate-free ones (Prodigy, D-Adaptation).
    Use it inside `optimizer` or on an adapters-only tree. To match peft's weight decay,
    ``loraplus_weight_decay=wd`` (0 by default, whatever the optimizer's own ``weight_decay``),
    give ``optax.adamw(lr, weight_decay=wd, mask=decay_mask)``. peft's third group, LoRA on
    embedding layers (``loraplus_lr_embedding``), does not arise: jlora adapts kernels only."""
    if not ratio > 0:
        raise ValueError(f"loraplus: ratio must be > 0, got {ratio}")
    return optax.chain(tx, optax.masked(optax.scale(ratio), loraplus_b))


def decay_mask(tree: PyTree) -> PyTree:
    """False where peft's LoRA+ applies no weight decay: biases and the parameters of layer norms
    (a module holding ``scale`` and ``bias``, Flax's `nn.LayerNorm`, torch's `nn.LayerNorm`).
    RMSNorm scales are decayed, as transformers' `get_parameter_names(model, [nn.LayerNorm])` does."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    names: dict[str, set[str]] = {}
    for path, _ in leaves:
        names.setdefault(_module(path), set()).add(_leaf_name(path))
    layer_norms = {module for module, leaf_names in names.items() if {"scale", "bias"} <= leaf_names}
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _leaf_name(path) != "bias" and _module(path) not in layer_norms, tree
    )
