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
"""

from __future__ import annotations

import optax

from jlora.config import LoraConfig
from jlora.tree import labels


def optimizer(tx: optax.GradientTransformation, config: LoraConfig) -> optax.GradientTransformation:
    """`tx` on trainable leaves, `optax.set_to_zero()` on the rest, for a full params tree
    or an adapters-only one. Frozen leaves get no optimizer state."""
    return optax.multi_transform(
        {"trainable": tx, "frozen": optax.set_to_zero()}, lambda params: labels(params, config)
    )
