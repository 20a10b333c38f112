"""Factored LoRA: run an unmodified Linen model with ``y = base(x) + s · dropout(x) · A · B``.

`nn.intercept_methods` wraps every Dense / DenseGeneral / Einsum call whose scope holds
``lora_a`` / ``lora_b``: the layer computes its own output from its kernel, and the
interceptor adds the low-rank branch, contracting x with A first and then with B, so the
kernel-sized ΔW is never built. It works inside `jax.jit` and `nn.scan` (which slices
stacked adapters along with their kernels).

A quantized kernel (`jlora.quantize`, QLoRA) is dequantized where it is used: the
interceptor computes that layer's base output itself, the module's contraction and bias in
its dtype, with or without adapters beside it. A quantized ``nn.Embed`` table likewise: a
lookup dequantizes the rows it takes, ``attend`` (a tied head) contracts with the table.

A DoRA magnitude m beside the adapters (`LoraConfig.use_dora`) rescales the output as peft
does: with ``k = m / ‖W + s·A·B‖`` per output feature (the norm held constant in the
backward pass), ``y + (k - 1)·(y - bias) + k·s·x·A·B``. That norm needs ΔW, built once per
layer and call, as peft builds it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import string
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import opt_einsum
from jax import lax

from jlora import quantize
from jlora.config import LoraConfig
from jlora.merge import weight_norm
from jlora.spec import ADAPTABLE, einsum_axes
from jlora.tree import LORA_A, LORA_B, LORA_MAGNITUDE, PyTree, adapted_modules, path_str


def lora_branch(module: nn.Module, x: jax.Array, a: jax.Array, b: jax.Array, einsum_str: str | None = None):
    """``x · A · B`` for `module`'s contraction of x, in its compute dtype, accumulated in f32."""
    x, a, b = nn.dtypes.promote_dtype(x, a, b, dtype=module.dtype)
    if isinstance(module, nn.Einsum):
        x_sub, k_sub, out_sub, is_in = einsum_axes(einsum_str or module.einsum_str)
        ins = "".join(c for c, i in zip(k_sub, is_in, strict=False) if i)
        outs = "".join(c for c, i in zip(k_sub, is_in, strict=False) if not i)
        rank = next(c for c in "rRzZqQ" if c not in x_sub + k_sub + out_sub)
        mid = "".join(c for c in x_sub if c not in ins) + rank
        h = jnp.einsum(f"{x_sub},{ins}{rank}->{mid}", x, a, preferred_element_type=jnp.float32)
        return jnp.einsum(f"{mid},{rank}{outs}->{out_sub}", h.astype(b.dtype), b, preferred_element_type=jnp.float32)
    return _factored(_axes(module, x.ndim), x, a, b)


def _axes(module: nn.Dense | nn.DenseGeneral, ndim: int) -> tuple[int, ...]:
    """The axes of an `ndim`-D input that a Dense / DenseGeneral contracts, non-negative."""
    axes = (-1,) if isinstance(module, nn.Dense) else module.axis
    return tuple(ax % ndim for ax in (axes if isinstance(axes, tuple | list) else (axes,)))


class Contraction(NamedTuple):
    """A layer's ``einsum(equation, x, W)`` in `dtype` (static: hashable)."""

    equation: str  # "x,kernel->out", every axis lettered (no ellipsis)
    dtype: str
    precision: Any = None
    preferred_element_type: Any = None

    def __call__(self, x: jax.Array, w: jax.Array) -> jax.Array:
        return jnp.einsum(
            self.equation, x, w, precision=self.precision, preferred_element_type=self.preferred_element_type
        )


def _equation(module: nn.Module, x: jax.Array, kernel_shape: tuple[int, ...], einsum_str: str | None) -> str:
    """`module`'s contraction of `x` with its kernel as an einsum with every axis lettered."""
    if isinstance(module, nn.Einsum):
        operands = (einsum_str or module.einsum_str, x, jax.ShapeDtypeStruct(kernel_shape, x.dtype))
        inputs, out, _ = opt_einsum.parser.parse_einsum_input(operands)  # ellipses lettered
        return f"{inputs}->{out}"
    axes = _axes(module, x.ndim)
    x_sub = string.ascii_letters[: x.ndim]
    outs = string.ascii_letters[x.ndim : x.ndim + len(kernel_shape) - len(axes)]
    kept = "".join(c for i, c in enumerate(x_sub) if i not in axes)
    return f"{x_sub},{''.join(x_sub[i] for i in axes)}{outs}->{kept}{outs}"


def _on_output(v: jax.Array, letters: str, equation: str) -> jax.Array:
    """`v`, whose axes are the kernel's output axes `letters` of `equation`, broadcastable
    against the output of `equation` (an Einsum may order its output axes otherwise)."""
    out_sub = equation.split("->")[1]
    order = "".join(c for c in out_sub if c in letters)
    v = jnp.einsum(f"{letters}->{order}", v)
    return jnp.reshape(v, [v.shape[order.index(c)] if c in letters else 1 for c in out_sub])


def _bias(module: nn.Module, equation: str, dtype) -> jax.Array | None:
    """`module`'s bias in `dtype`, broadcastable against its output (None without one)."""
    bias = module.get_variable("params", "bias")
    if bias is None:
        return None
    k_sub, out_sub = equation.split(",")[1].split("->")
    return _on_output(jnp.asarray(bias, dtype), "".join(c for c in out_sub if c in k_sub), equation)


def _contract(module: nn.Module, x: jax.Array, kernel, einsum_str: str | None) -> tuple[jax.Array, str]:
    """``(x·W, equation)``: the Dense / DenseGeneral / Einsum `module`'s contraction of `x` with
    `kernel` (a quantized one dequantized for it), bias left out, in the dtype the module
    computes in."""
    if quantize.is_quantized(kernel):
        kernel = quantize.unstacked(kernel)  # as nn.scan sliced it
    bias = module.get_variable("params", "bias")
    dtype = module.dtype or jnp.result_type(*(t.dtype for t in (x, bias) if t is not None), kernel.dtype)
    x = jnp.asarray(x, dtype)
    equation = _equation(module, x, kernel.shape, einsum_str)
    contraction = Contraction(
        equation, jnp.dtype(dtype).name, module.precision, getattr(module, "preferred_element_type", None)
    )
    if quantize.is_quantized(kernel):
        return _frozen(contraction, x, kernel), equation
    return contraction(x, jnp.asarray(kernel, dtype)), equation


def quantized_base(module: nn.Module, x: jax.Array, kernel: quantize.Quantized, einsum_str: str | None = None):
    """What the Dense / DenseGeneral / Einsum `module` computes from `x` with its quantized
    `kernel`: the same contraction plus its bias, in the dtype the module computes in."""
    y, equation = _contract(module, x, kernel, einsum_str)
    bias = _bias(module, equation, y.dtype)
    return y if bias is None else y + bias


def quantized_embed(module: nn.Embed, method: str, table: quantize.Quantized, x: jax.Array) -> jax.Array:
    """What ``nn.Embed.__call__`` (`method`) or ``attend`` computes from `x` with its quantized
    `table`, in the module's dtype (the table's where it has none, as Linen promotes it)."""
    if method == "__call__":
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError("Input type must be an integer or unsigned integer.")
        return quantize.take(table, x, module.dtype)
    dtype = module.dtype or jnp.result_type(x.dtype, table.dtype)
    letters = string.ascii_letters[: x.ndim - 1]
    return _frozen(Contraction(f"{letters}y,zy->{letters}z", jnp.dtype(dtype).name), jnp.asarray(x, dtype), table)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _frozen(contraction: Contraction, x: jax.Array, kernel: quantize.Quantized) -> jax.Array:
    """`contraction` of `x` with the quantized `kernel`, dequantized for it.

    Its backward pass keeps the quantized kernel alone (no x: the frozen kernel gets no
    gradient) and dequantizes it again for x's gradient, as QLoRA does, so no dequantized
    copy of any weight lives from the forward pass to the backward one."""
    return contraction(x, quantize.dequantize(kernel, contraction.dtype))


def _frozen_fwd(contraction, x, kernel):
    return _frozen(contraction, x, kernel), kernel


def _frozen_bwd(contraction, kernel, g):
    x_sub, rest = contraction.equation.split(",")
    k_sub, out_sub = rest.split("->")
    w = quantize.dequantize(kernel, contraction.dtype)
    dx = jnp.einsum(f"{out_sub},{k_sub}->{x_sub}", g.astype(contraction.dtype), w, precision=contraction.precision)
    return dx, None


_frozen.defvjp(_frozen_fwd, _frozen_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _factored(axes: tuple[int, ...], x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """``(x · A) · B`` contracting `axes` of x with A's leading axes, accumulated in float32.

    Its own backward pass computes A's gradient as ``(g_h^T x)^T``: the large x is then
    contracted over its token axes as a matmul's right operand, which XLA:CPU's GEMMs take
    as it lies, where autodiff's ``x^T g_h`` would transpose a copy of x first (for an MLP's
    down projection, a strided pass over the (tokens, 4·embed) activations every layer)."""
    return _factored_fwd(axes, x, a, b)[0]


def _factored_fwd(axes, x, a, b):
    h = lax.dot_general(x, a, ((axes, tuple(range(len(axes)))), ((), ())), preferred_element_type=jnp.float32)
    out = lax.dot_general(h.astype(b.dtype), b, (((h.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return out, (x, a, b, h.astype(b.dtype))


def _factored_bwd(axes, residuals, g):
    # in float32, as autodiff of the forward does (and XLA:CPU has no bf16 x bf16 -> f32 dot
    # for every shape these take)
    x, a, b, h = residuals
    dtypes = x.dtype, a.dtype, b.dtype
    x, a, b, h, g = (t.astype(jnp.float32) for t in (x, a, b, h, g))
    tokens = tuple(i for i in range(x.ndim) if i not in axes)  # x's free axes, in order: h's leading axes
    token_axes = tuple(range(len(tokens)))
    n_out = b.ndim - 1
    g_axes = tuple(range(g.ndim - n_out, g.ndim))
    g_h = lax.dot_general(g, b, ((g_axes, tuple(range(1, b.ndim))), ((), ())))
    db = lax.dot_general(h, g, ((token_axes, token_axes), ((), ())))
    # (r, *x's contracted axes in increasing order) -> A's layout (*axes in A's order, r)
    da_t = lax.dot_general(g_h, x, ((token_axes, tokens), ((), ())))
    order = sorted(range(len(axes)), key=lambda i: axes[i])  # A's axis i is x's axis axes[i]
    da = jnp.transpose(da_t, (*(1 + order.index(i) for i in range(len(axes))), 0))
    dx = lax.dot_general(g_h, a, (((g_h.ndim - 1,), (a.ndim - 1,)), ((), ())))
    # dx comes out (*tokens, *A's input axes); put the input axes back where x has them
    positions = list(tokens) + list(axes)
    dx = jnp.transpose(dx, [positions.index(i) for i in range(x.ndim)])
    return tuple(t.astype(dtype) for t, dtype in zip((dx, da, db), dtypes, strict=True))


_factored.defvjp(_factored_fwd, _factored_bwd)


def _dropout(module: nn.Module, x: jax.Array, rate: float) -> jax.Array:
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


Branch = Callable[[nn.Module, jax.Array, jax.Array, jax.Array, str | None], jax.Array]
Scale = Callable[[nn.Module, int], float]  # the s of `module`'s adapter of rank r


def _dora(
    module: nn.Module, x: jax.Array, y: jax.Array, lora_out: jax.Array, scale: float, einsum_str, dropped: bool
) -> jax.Array:
    """peft's DoRA output (`DoraLinearLayer.forward`): with ``k = m / ‖W + s·A·B‖`` per output
    feature, a constant of the backward pass (Liu et al. 2024, section 4.3), ``y + (k - 1)·base
    + k·lora_out``, `lora_out` being ``s·x·A·B`` and `base` the layer's output without its bias:
    ``y - bias``, or, where LoRA dropout is on (`dropped`), the contraction of the dropped-out
    `x` with W, as peft computes it."""
    kernel, a, b = (module.get_variable("params", name) for name in ("kernel", LORA_A, LORA_B))
    if quantize.is_quantized(kernel):
        kernel = quantize.unstacked(kernel)  # as nn.scan sliced it
    k = module.get_variable("params", LORA_MAGNITUDE).astype(jnp.float32)
    k = k / lax.stop_gradient(weight_norm(kernel, a, b, scale))
    if dropped:
        base, equation = _contract(module, x, kernel, einsum_str)
    else:
        equation = _equation(module, x, kernel.shape, einsum_str)
        bias = _bias(module, equation, y.dtype)
        base = y if bias is None else y - bias
    k = _on_output(k, equation.split(",")[1].split("->")[0][a.ndim - 1 :], equation)
    return y + ((k - 1) * base + k * lora_out).astype(y.dtype)


@contextlib.contextmanager
def adding(branch: Branch, *, dropout: float = 0.0, scale: Scale | None = None) -> Iterator[set[str]]:
    """Within this context, every Dense / DenseGeneral / Einsum call whose scope holds
    adapters returns ``y + branch(module, dropout(x), lora_a, lora_b, einsum_str)``, `y`
    computed by `quantized_base` where the kernel is quantized (and an ``nn.Embed`` with a
    quantized table by `quantized_embed`), and `dropout` the rate of
    LoRA dropout (from the ``'dropout'`` rng). Where a DoRA magnitude sits beside the
    adapters, the sum is peft's DoRA output instead (`_dora`), whose norm needs `scale`.
    Yields the set of module paths reached, filled as the model runs."""
    applied: set[str] = set()

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        table = module.get_variable("params", "embedding") if isinstance(module, nn.Embed) else None
        if quantize.is_quantized(table):
            if context.method_name == "setup":  # it checks the table's shape against its initializer's
                return None
            if context.method_name in ("__call__", "attend"):
                return quantized_embed(module, context.method_name, table, (*args, *kwargs.values())[0])
        if context.method_name != "__call__" or not isinstance(module, ADAPTABLE):
            return next_fun(*args, **kwargs)
        kernel, adapted = module.get_variable("params", "kernel"), module.has_variable("params", LORA_A)
        if not (adapted or quantize.is_quantized(kernel)):
            return next_fun(*args, **kwargs)
        x = args[0] if args else kwargs["inputs"]
        einsum_str = args[1] if len(args) > 1 else kwargs.get("einsum_str")
        if quantize.is_quantized(kernel):
            y = quantized_base(module, x, kernel, einsum_str)
        else:
            y = next_fun(*args, **kwargs)
        if not adapted:
            return y
        a, b = module.get_variable("params", LORA_A), module.get_variable("params", LORA_B)
        path = "/".join(module.path)
        applied.add(path)
        x_lora = _dropout(module, x, dropout) if dropout > 0 else x
        lora_out = branch(module, x_lora, a, b, einsum_str)
        if not module.has_variable("params", LORA_MAGNITUDE):
            return y + lora_out.astype(y.dtype)
        if scale is None:
            raise ValueError(f"{path}: a DoRA magnitude ({LORA_MAGNITUDE}), which this interceptor does not apply")
        return _dora(module, x_lora, y, lora_out, scale(module, a.shape[-1]), einsum_str, dropout > 0)

    with nn.intercept_methods(interceptor):
        yield applied


def check_applied(params: PyTree, applied: set[str], kwargs: dict) -> None:
    """Raise if an adapter in `params` was never reached by a call of the model's ``__call__``."""
    missed = sorted({path_str(keys) for keys in adapted_modules(params)} - applied)
    if missed and "method" not in kwargs:
        raise ValueError(
            f"apply: adapters on {missed} were never applied: jlora intercepts "
            "nn.Dense / nn.DenseGeneral / nn.Einsum calls, and these modules are not one or were not called"
        )


@contextlib.contextmanager
def intercept(config: LoraConfig, *, deterministic: bool = True) -> Iterator[set[str]]:
    """Within this context, `model.apply` computes adapted layers factored.

    Yields the set of module paths whose adapters were applied, filled as the model runs;
    use it with your own ``model.apply`` calls, or call `apply`, which checks it.
    """

    def scale(module: nn.Module, r: int) -> float:
        return config.scale("/".join(module.path), r)

    def branch(module, x, a, b, einsum_str):
        return scale(module, a.shape[-1]) * lora_branch(module, x, a, b, einsum_str)

    with adding(branch, dropout=0.0 if deterministic else config.dropout, scale=scale) as applied:
        yield applied


def apply(
    model: nn.Module,
    params: PyTree,
    config: LoraConfig,
    *args,
    rngs: dict[str, jax.Array] | None = None,
    deterministic: bool = True,
    variables: dict[str, PyTree] | None = None,
    **kwargs,
) -> Any:
    """`model.apply` with the adapters in `params` applied factored.

    Args:
      model: an unmodified Linen module.
      params: its ``params`` collection with adapters (from `init`, or `join`).
      config: the config the adapters were made with (for scales and dropout).
      rngs: PRNG keys; LoRA dropout draws from ``rngs['dropout']``.
      deterministic: False turns LoRA dropout on. It is also passed to the model when its
        method takes a ``deterministic`` argument, so one flag drives all dropout.
      variables: other collections (e.g. ``batch_stats``).
      kwargs: passed to `model.apply` (``method``, ``mutable``, the model's own arguments).

    Raises if, in a call of the model's ``__call__``, an adapter in `params` was never
    reached (its module is not a Dense, DenseGeneral or Einsum, or the model did not call
    it), instead of silently ignoring it.
    """
    if not deterministic and config.dropout > 0 and "dropout" not in (rngs or {}):
        raise ValueError("apply: LoRA dropout is on (deterministic=False) but rngs has no 'dropout' key")
    method = kwargs.get("method") or model.__call__
    if isinstance(method, str):
        method = getattr(model, method)
    if "deterministic" in inspect.signature(method).parameters:
        kwargs["deterministic"] = deterministic
    with intercept(config, deterministic=deterministic) as applied:
        out = model.apply({**(variables or {}), "params": params}, *args, rngs=rngs, **kwargs)
    check_applied(params, applied, kwargs)
    return out
