"""Kernel axis layouts: which axes of a kernel are stacked layers, inputs and outputs.

A kernel's axes are ``(*stack, *inputs, *outputs)``: `stack` leading axes added by
`nn.scan` (one per scanned level), then the axes contracted with the layer's input,
then the axes of its output. Its adapters are ``lora_a: (*stack, *inputs, r)`` and
``lora_b: (*stack, r, *outputs)``, so once `init` has run, the three shapes determine
the layout (`adapter_spec`), and sharding, merging and export read it from the tree.

Before `init`, a 2-D kernel is evidently ``(in, out)``; for any other kernel the split
is learned by tracing the model abstractly (`kernel_specs`), never guessed.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax

ADAPTABLE = (nn.Dense, nn.DenseGeneral, nn.Einsum)


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """The axis layout of one kernel: `stack` leading axes, then `n_in`, then `n_out`."""

    stack: int
    n_in: int
    n_out: int

    @property
    def ndim(self) -> int:
        return self.stack + self.n_in + self.n_out

    @property
    def stack_axes(self) -> tuple[int, ...]:
        return tuple(range(self.stack))

    @property
    def in_axes(self) -> tuple[int, ...]:
        return tuple(range(self.stack, self.stack + self.n_in))

    @property
    def out_axes(self) -> tuple[int, ...]:
        return tuple(range(self.stack + self.n_in, self.ndim))

    def adapter_shapes(self, kernel_shape: Sequence[int], r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of ``(lora_a, lora_b)`` for a kernel of this layout."""
        shape = tuple(kernel_shape)
        stack, ins, outs = (tuple(shape[i] for i in axes) for axes in (self.stack_axes, self.in_axes, self.out_axes))
        return stack + ins + (r,), (*stack, r, *outs)

    def fan_in_out(self, kernel_shape: Sequence[int]) -> tuple[int, int]:
        """The flattened input and output sizes of one (unstacked) kernel."""
        return (math.prod(kernel_shape[i] for i in self.in_axes), math.prod(kernel_shape[i] for i in self.out_axes))


def adapter_spec(kernel_shape: Sequence[int], a_shape: Sequence[int], b_shape: Sequence[int]) -> KernelSpec:
    """The layout of a kernel, read off the shapes of the kernel and its adapters."""
    stack = len(a_shape) + len(b_shape) - 2 - len(kernel_shape)
    spec = KernelSpec(stack, len(a_shape) - 1 - stack, len(b_shape) - 1 - stack)
    if min(spec.stack, spec.n_in, spec.n_out) < 0 or spec.adapter_shapes(kernel_shape, a_shape[-1]) != (
        tuple(a_shape),
        tuple(b_shape),
    ):
        raise ValueError(
            f"lora_a {tuple(a_shape)} and lora_b {tuple(b_shape)} do not fit a kernel of shape "
            f"{tuple(kernel_shape)}: expected (*stack, *inputs, r) and (*stack, r, *outputs)"
        )
    return spec


# -- learning layouts from a model ------------------------------------------------------


def einsum_axes(einsum_str: str) -> tuple[str, str, str, tuple[bool, ...]]:
    """Split ``"x,kernel->out"``; also say, per kernel axis, whether it is an input axis."""
    match = re.fullmatch(r"\s*([\w.]*)\s*,\s*(\w+)\s*->\s*([\w.]*)\s*", einsum_str)
    if match is None:
        raise ValueError(f"jlora supports two-operand einsums 'x,kernel->out', got {einsum_str!r}")
    x_sub, k_sub, out_sub = match.groups()
    shared = [c for c in k_sub if c in x_sub and c in out_sub]
    if shared:
        raise ValueError(
            f"einsum {einsum_str!r}: kernel axes {shared} are batch axes (in input, kernel and output); "
            "LoRA needs every kernel axis to be either contracted or an output"
        )
    return x_sub, k_sub, out_sub, tuple(c not in out_sub for c in k_sub)


def local_layout(module: nn.Module, kwargs: dict[str, Any] | None = None) -> tuple[bool, ...]:
    """Per axis of `module`'s (unstacked) kernel, whether it is contracted with the input."""
    if isinstance(module, nn.Dense):
        return (True, False)
    if isinstance(module, nn.DenseGeneral):
        if module.batch_dims:
            raise ValueError(f"{'/'.join(module.path)}: DenseGeneral with batch_dims is not supported by jlora")
        n_in = len(module.axis) if isinstance(module.axis, Sequence) else 1
        n_out = len(module.features) if isinstance(module.features, Sequence) else 1
        return (True,) * n_in + (False,) * n_out
    if isinstance(module, nn.Einsum):
        einsum_str = (kwargs or {}).get("einsum_str") or module.einsum_str
        return einsum_axes(einsum_str)[3]
    raise TypeError(f"jlora adapts {', '.join(t.__name__ for t in ADAPTABLE)}, not {type(module).__name__}")


def kernel_specs(
    model: nn.Module, *args, method: str | Callable | None = None, **kwargs
) -> dict[str, KernelSpec | InterleavedKernel]:
    """Learn the layout of every Dense / DenseGeneral / Einsum kernel of a Linen model.

    Runs `model.init` under `jax.eval_shape` (no FLOPs, no memory) with the example
    inputs (arrays or `jax.ShapeDtypeStruct`s), intercepting the layer calls: each
    layer's attributes give the split of its kernel into input and output axes, and the
    initialised tree gives the stacked axes that `nn.scan` adds. Returns
    ``{module path: KernelSpec}`` for `init(..., specs=)`. Kernels whose axes interleave
    inputs and outputs (einsum ``'d,ndh->nh'``) are reported with a layout that `init`
    refuses with an explanation.
    """
    layouts: dict[str, tuple[bool, ...]] = {}

    def record(next_fun, call_args, call_kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, ADAPTABLE):
            layouts["/".join(context.module.path)] = local_layout(context.module, call_kwargs)
        return next_fun(*call_args, **call_kwargs)

    with nn.intercept_methods(record):
        variables = jax.eval_shape(
            lambda *inputs: model.init(jax.random.key(0), *inputs, method=method, **kwargs), *args
        )
    params = nn.meta.unbox(variables["params"])
    specs = {}
    for path, layout in layouts.items():
        kernel = _get(params, [*path.split("/"), "kernel"])
        stack = kernel.ndim - len(layout)
        n_in = sum(layout)
        if list(layout) == sorted(layout, reverse=True):
            specs[path] = KernelSpec(stack, n_in, len(layout) - n_in)
        else:
            specs[path] = InterleavedKernel(path, layout)
    return specs


@dataclasses.dataclass(frozen=True)
class InterleavedKernel:
    """A kernel whose input and output axes interleave; jlora cannot adapt it."""

    path: str
    layout: tuple[bool, ...]

    def error(self) -> ValueError:
        roles = "".join("i" if is_in else "o" for is_in in self.layout)
        return ValueError(
            f"{self.path}: kernel axes are ordered {roles!r} (i = input, o = output); jlora needs all input "
            "axes before all output axes (e.g. einsum 'btd,dnh->btnh', not 'btd,ndh->btnh'). Reorder the kernel."
        )


def _get(tree, keys):
    for key in keys:
        tree = tree[key]
    return tree
