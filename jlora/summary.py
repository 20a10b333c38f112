"""`summary`: how many parameters are trained, in total and per module type."""

from __future__ import annotations

import dataclasses
import math

from jlora.config import LoraConfig
from jlora.tree import PyTree, flatten, is_trainable


@dataclasses.dataclass(frozen=True)
class Summary:
    """Parameter counts; `by_module` maps a module name (``q_proj``) to (trainable, total)."""

    trainable: int
    total: int
    by_module: dict[str, tuple[int, int]]

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        width = max([len(name) for name in self.by_module] + [6])
        rows = [f"{'module':<{width}} {'trainable':>12} {'total':>14} {'%':>8}"]
        for name, (trainable, total) in sorted(self.by_module.items()):
            rows.append(f"{name:<{width}} {trainable:>12,} {total:>14,} {100 * trainable / total:>7.3f}%")
        rows.append(f"{'all':<{width}} {self.trainable:>12,} {self.total:>14,} {self.percent:>7.3f}%")
        return "\n".join(rows)


def summary(params: PyTree, config: LoraConfig) -> Summary:
    """Trainable (adapters and `modules_to_save`) vs all parameters, adapters included,
    as peft's ``print_trainable_parameters`` counts them."""
    trainable = total = 0
    by_module: dict[str, list[int]] = {}
    for keys, leaf in flatten(params).items():
        size = math.prod(leaf.shape)
        is_train = is_trainable(keys, config)
        name = str(keys[-2]) if len(keys) > 1 else str(keys[-1])
        counts = by_module.setdefault(name, [0, 0])
        counts[0] += size * is_train
        counts[1] += size
        trainable += size * is_train
        total += size
    return Summary(trainable, total, {name: tuple(c) for name, c in by_module.items()})
