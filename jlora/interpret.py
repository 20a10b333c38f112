"""LoRA on any JAX function ``fn(params, *args)``, by interpreting its jaxpr.

`fn` is traced once with `jax.make_jaxpr` (the parameter tree is an ordinary pytree input,
so each weight leaf is one input variable of the jaxpr) and evaluated again, equation by
equation, with each adapted weight carried as a `LoraValue`: the weight as the program
has transformed it so far, plus its two factors transformed the same way. Structural
operations (dtype converts, transposes, clean reshapes, squeezes, slices, `lax.scan`
slices of a stacked leaf, `jit`, `jax.checkpoint`, `cond`, `while`) move the factors along
with the weight, and a contraction (``dot_general``, which einsums lower to, or
``ragged_dot``) of a weight with an activation x adds ``s · (x·A)·B``, computed factored:
the weight-sized ΔW is never built. Any other use of an adapted weight (a gather from an
embedding, a convolution, arithmetic on it, a `custom_vjp` / `custom_jvp` function or a
`shard_map` it enters) receives ``W + s·B·A`` built at that use, so no result is silently
wrong; ``fallback="error"`` makes such a use an error naming the primitive instead. A weight
that a `jit`, `checkpoint` or `scan` body passes out unchanged (NNX bodies return their
state) leaves with its factors, merged only if something uses it.

`per_example` (``jlora.multi.lora``) evaluates with a stack of adapters, example e of every
activation (its axis 0) taking adapter ``ids[e]``: the factors carry a leading adapter axis
that the structural rules map over (`LoraValue.map`), and a contraction gathers each
example's A and B. A use that would need one merged weight is refused there.

Layouts are learned from the computation (`lora_specs`): each axis of a weight is an
input axis ``i`` (contracted with the activation, A's), an output axis ``o`` (B's), or a
stacked axis ``s`` (sliced by `lax.scan` or an index, or a batch axis of the contraction:
each index has its own adapters). Axes may interleave, e.g. the ``NDH`` kernel of
``einsum('BTD,NDH->BTNH')`` is ``"oio"``. The adapters of a weight of shape ``W`` are
``A: (*W[s], *W[i], r)`` and ``B: (*W[s], r, *W[o])``, each group in the weight's order.

Naming rule (`jlora.tree.adapter_names`): adapters live beside their weight in the same dict; a
weight named ``kernel`` laid out ``(*stack, *in, *out)`` has siblings ``lora_a`` / ``lora_b``
(jlora's rule for Linen and NNX layers, which `jlora.merge`, `jlora.peft` and sharding read
from the shapes), any other weight ``n`` (or a kernel whose axes interleave) has ``n_lora_a`` /
``n_lora_b``, whose layout only the function knows (those readers refuse it). Config targets match
the weight's module path (``layers/q_proj`` for ``layers/q_proj/kernel``) or its own
path (``mlp/gating_einsum``); ranks and alphas are looked up with the path that matched.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import ClosedJaxpr, Jaxpr, JaxprEqn, Literal, Var

from jlora.apply import _factored
from jlora.config import ALL_LINEAR, LoraConfig
from jlora.transform import _init_a
from jlora.tree import LORA_MAGNITUDE, Keys, PyTree, adapter_names, flatten, is_adapter, path_str, unflatten

Roles = str  # one of "s", "i", "o" per weight axis


# -- naming ----------------------------------------------------------------------------


def config_path(keys: Keys, config: LoraConfig) -> str | None:
    """The path `config` targets for the weight at `keys`: its module's, else its own; None if neither."""
    for path in (path_str(keys[:-1]), path_str(keys)):
        if path and config.targets(path):
            return path
    return None


# -- layouts ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """The role of each axis of a weight: ``s`` stacked, ``i`` input (contracted), ``o`` output."""

    roles: Roles

    def axes(self, role: str) -> tuple[int, ...]:
        return tuple(k for k, r in enumerate(self.roles) if r == role)

    def adapter_shapes(self, shape: Sequence[int], r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of ``(A, B)``: ``(*stack, *in, r)`` and ``(*stack, r, *out)``."""
        stack, ins, outs = ([shape[k] for k in self.axes(role)] for role in "sio")
        return (*stack, *ins, r), (*stack, r, *outs)

    def factor_axes(self) -> tuple[list[int], list[int | None]]:
        """The weight axes A holds and those B holds, in their order (r aside in A; None for
        r in B): what sharding maps a weight's `PartitionSpec` through."""
        return _a_axes(self.roles), _b_axes(self.roles)

    def fan_in_out(self, shape: Sequence[int]) -> tuple[int, int]:
        return math.prod(shape[k] for k in self.axes("i")), math.prod(shape[k] for k in self.axes("o"))


def _a_axes(roles: Roles) -> list[int]:
    """The weight axes that A holds, in A's order (its last axis, r, aside)."""
    return [k for k, r in enumerate(roles) if r == "s"] + [k for k, r in enumerate(roles) if r == "i"]


def _b_axes(roles: Roles) -> list[int | None]:
    """The weight axes that B holds, in B's order; None stands for r."""
    return [k for k, r in enumerate(roles) if r == "s"] + [None] + [k for k, r in enumerate(roles) if r == "o"]


def delta(roles: Roles, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``s · B·A`` in float32, laid out like the weight."""
    ns = roles.count("s")
    batch = tuple(range(ns))
    d = lax.dot_general(
        a.astype(jnp.float32),
        b.astype(jnp.float32),
        (((a.ndim - 1,), (ns,)), (batch, batch)),
        precision=lax.Precision.HIGHEST,
    )
    held = _a_axes(roles) + [k for k, r in enumerate(roles) if r == "o"]  # d's axes, as weight axes
    return scale * jnp.transpose(d, [held.index(k) for k in range(len(roles))])


# -- the value an adapted weight takes while the program runs ---------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraValue:
    """An adapted weight as the program has transformed it (`w`), with factors `a`, `b`
    transformed alike: ``w + scale · B·A`` laid out by `roles`."""

    w: jax.Array
    a: jax.Array
    b: jax.Array
    roles: Roles = dataclasses.field(metadata={"static": True})
    scale: float = dataclasses.field(metadata={"static": True})
    leaf: str = dataclasses.field(metadata={"static": True})
    multi: bool = dataclasses.field(default=False, metadata={"static": True})  # factors lead with an adapter axis

    def replace(self, **changes) -> LoraValue:
        return dataclasses.replace(self, **changes)

    def map(self, w: Any, roles: Roles, on_a: Callable, on_b: Callable) -> LoraValue:
        """The value with weight `w` and roles `roles`, its factors passed through `on_a` / `on_b`
        (once per adapter for a stack of adapters)."""
        each = jax.vmap if self.multi else lambda f: f
        return self.replace(w=w, roles=roles, a=each(on_a)(self.a), b=each(on_b)(self.b))


@dataclasses.dataclass
class _Run:
    """One evaluation: its fallback policy, and for a stack of adapters the adapter of each example."""

    fallback: str
    ids: jax.Array | None = None

    def dense(self, x: Any, primitive: str) -> Any:
        """A plain value for `x`: ``W + s·B·A`` if it is a `LoraValue`."""
        if not isinstance(x, LoraValue):
            return x
        if x.multi:
            raise ValueError(
                f"{x.leaf}: its use by `{primitive}` needs the weight itself, but with one adapter per "
                "example there is no single W + s·B·A; per-example adapters work on contractions only"
            )
        if self.fallback == "error":
            raise ValueError(
                f"{x.leaf}: its use by `{primitive}` is not a contraction jlora can factor; "
                "fallback='merge' builds W + s·B·A there instead"
            )
        w = x.w.astype(jnp.float32) + delta(x.roles, x.a, x.b, x.scale)
        return w.astype(x.w.dtype)


# -- evaluation ------------------------------------------------------------------------


def _bind(eqn: JaxprEqn, invals: Sequence[Any]) -> list[Any]:
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
    return list(out) if eqn.primitive.multiple_results else [out]


def _eval(run: _Run, jaxpr: Jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    """Evaluate `jaxpr`, applying the rules below to every equation that reads a `LoraValue`."""
    env: dict[Var, Any] = {}
    read = lambda v: v.val if isinstance(v, Literal) else env[v]
    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if any(isinstance(x, LoraValue) for x in invals):
            outs = _RULES.get(eqn.primitive.name, _merged)(run, eqn, invals)
        else:
            outs = _bind(eqn, invals)
        for v, x in zip(eqn.outvars, outs, strict=True):
            if isinstance(v, Var):
                env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _eval_dense(run: _Run, closed: ClosedJaxpr, args: Sequence[Any], primitive: str) -> list[Any]:
    """`_eval` of a closed jaxpr whose outputs leave as plain values (a loop or branch body)."""
    return [run.dense(x, primitive) for x in _eval(run, closed.jaxpr, closed.consts, args)]


def _merged(run: _Run, eqn: JaxprEqn, invals: Sequence[Any]) -> list[Any]:
    """Any use jlora does not factor: the primitive receives ``W + s·B·A``."""
    return _bind(eqn, [run.dense(x, eqn.primitive.name) for x in invals])


# structural operations: the factors follow the weight


def _convert(run, eqn, invals):
    (x,) = invals
    if not jnp.issubdtype(eqn.params["new_dtype"], jnp.floating):
        return _merged(run, eqn, invals)
    return [x.replace(w=_bind(eqn, [x.w])[0])]


def _same(run, eqn, invals):
    (x,) = invals
    return [x.replace(w=_bind(eqn, [x.w])[0])]


def _transpose(run, eqn, invals):
    (x,) = invals
    perm = eqn.params["permutation"]
    roles = "".join(x.roles[p] for p in perm)
    old_a, old_b = _a_axes(x.roles), _b_axes(x.roles)
    a_perm = [old_a.index(perm[k]) for k in _a_axes(roles)] + [len(old_a)]
    b_perm = [old_b.index(None if k is None else perm[k]) for k in _b_axes(roles)]
    return [x.map(_bind(eqn, [x.w])[0], roles, lambda a: a.transpose(a_perm), lambda b: b.transpose(b_perm))]


def _reshape_groups(old: Sequence[int], new: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Minimal runs of old and new axes of equal sizes (None for shapes with a zero-size axis)."""
    if 0 in old or 0 in new:
        return None
    groups, i, j = [], 0, 0
    while i < len(old) or j < len(new):
        gi, gj, pi, pj = [], [], 1, 1
        if i < len(old):
            gi, pi, i = [i], old[i], i + 1
        if j < len(new):
            gj, pj, j = [j], new[j], j + 1
        while pi != pj:
            if pi < pj:
                gi, pi, i = [*gi, i], pi * old[i], i + 1
            else:
                gj, pj, j = [*gj, j], pj * new[j], j + 1
        groups.append((gi, gj))
    return groups


def _reshape(run, eqn, invals):
    (x,) = invals
    if eqn.params.get("dimensions") is not None:
        return _merged(run, eqn, invals)
    old, new = x.w.shape, tuple(eqn.params["new_sizes"])
    groups = _reshape_groups(old, new)
    if groups is None:
        return _merged(run, eqn, invals)
    roles = [""] * len(new)
    for gi, gj in groups:
        kinds = {x.roles[k] for k in gi if old[k] != 1} or {"o"}  # a new size-1 axis goes to B
        if len(kinds) > 1:  # merges axes of different roles: not a view of the factors
            return _merged(run, eqn, invals)
        for k in gj:
            roles[k] = next(iter(kinds))
    roles = "".join(roles)
    a_shape = [new[k] for k in _a_axes(roles)] + [x.a.shape[-1]]
    b_shape = [x.a.shape[-1] if k is None else new[k] for k in _b_axes(roles)]
    return [x.map(_bind(eqn, [x.w])[0], roles, lambda a: a.reshape(a_shape), lambda b: b.reshape(b_shape))]


def _squeeze(run, eqn, invals):
    (x,) = invals
    dims = {d % x.w.ndim for d in eqn.params["dimensions"]}
    roles = "".join(r for k, r in enumerate(x.roles) if k not in dims)
    a_dims = tuple(p for p, k in enumerate(_a_axes(x.roles)) if k in dims)
    b_dims = tuple(p for p, k in enumerate(_b_axes(x.roles)) if k in dims)
    return [x.map(_bind(eqn, [x.w])[0], roles, lambda a: jnp.squeeze(a, a_dims), lambda b: jnp.squeeze(b, b_dims))]


def _slice(run, eqn, invals):
    (x,) = invals
    starts, limits = eqn.params["start_indices"], eqn.params["limit_indices"]
    strides = eqn.params["strides"] or (1,) * len(starts)

    def cut(factor, axes):
        full = lambda p: (0, factor.shape[p], 1)
        spec = [full(p) if k is None else (starts[k], limits[k], strides[k]) for p, k in enumerate(axes)]
        return lax.slice(factor, *zip(*spec, strict=True))

    on_a, on_b = (functools.partial(cut, axes=axes) for axes in ([*_a_axes(x.roles), None], _b_axes(x.roles)))
    return [x.map(_bind(eqn, [x.w])[0], x.roles, on_a, on_b)]


def _dynamic_slice(run, eqn, invals):
    x, *starts = invals
    if any(isinstance(s, LoraValue) for s in starts):
        return _merged(run, eqn, invals)
    sizes = eqn.params["slice_sizes"]

    def cut(factor, axes):
        index = [0 if k is None else starts[k] for k in axes]
        return lax.dynamic_slice(
            factor, index, [factor.shape[p] if k is None else sizes[k] for p, k in enumerate(axes)]
        )

    on_a, on_b = (functools.partial(cut, axes=axes) for axes in ([*_a_axes(x.roles), None], _b_axes(x.roles)))
    return [x.map(_bind(eqn, [x.w, *starts])[0], x.roles, on_a, on_b)]


# contractions: + s·(x·A)·B


def _dot_general(run, eqn, invals):
    lhs, rhs = invals
    if isinstance(lhs, LoraValue) and isinstance(rhs, LoraValue):
        rhs = run.dense(rhs, "dot_general of two adapted weights")
    side = 0 if isinstance(lhs, LoraValue) else 1
    w, x = (lhs, rhs) if side == 0 else (rhs, lhs)
    (contract, batch) = eqn.params["dimension_numbers"]
    wc, xc, wb, xb = contract[side], contract[1 - side], batch[side], batch[1 - side]
    wanted = ["o"] * len(w.roles)
    for k in wc:
        wanted[k] = "i"
    for k in wb:
        wanted[k] = "s"
    if "".join(wanted) != w.roles:
        return _merged(run, eqn, [lhs, rhs])
    y = _bind(eqn, [w.w, x] if side == 0 else [x, w.w])[0]
    a, b = w.a.astype(x.dtype), w.b.astype(x.dtype)
    if w.multi:
        return [y + _per_example(run.ids, w, x, a, b, side, eqn.params["dimension_numbers"]).astype(y.dtype)]
    pairs = dict(zip(wc, xc, strict=True))
    if side == 1 and not wb:  # x·W: jlora's factored branch, with its own fast backward
        out = _factored(tuple(pairs[k] for k in _a_axes(w.roles)), x, a, b)
        return [y + (w.scale * out).astype(y.dtype)]
    a_pos, b_pos = _a_axes(w.roles), _b_axes(w.roles)
    h = lax.dot_general(
        x,
        a,
        ((xc, [a_pos.index(k) for k in wc]), (xb, [a_pos.index(k) for k in wb])),
        preferred_element_type=jnp.float32,
    )
    nb = len(wb)
    out = lax.dot_general(
        h.astype(b.dtype),
        b,
        (((h.ndim - 1,), (b_pos.index(None),)), (tuple(range(nb)), [b_pos.index(k) for k in wb])),
        preferred_element_type=jnp.float32,
    )  # (batch, x's free axes, W's output axes)
    if side == 0:  # W·x: (batch, W's output axes, x's free axes)
        n_free = out.ndim - nb - w.roles.count("o")
        out = jnp.transpose(out, [*range(nb), *range(nb + n_free, out.ndim), *range(nb, nb + n_free)])
    return [y + (w.scale * out).astype(y.dtype)]


def _per_example(ids: jax.Array, w: LoraValue, x: jax.Array, a: jax.Array, b: jax.Array, side: int, dims) -> jax.Array:
    """The factored term of a contraction where example e (x's axis 0) uses adapter ``ids[e]``
    of the stacks `a`, `b` ``(n, *A)`` / ``(n, *B)`` (no term where ``ids[e] < 0``), laid out
    like the contraction's output."""
    (contract, batch) = dims
    wc, xc, wb, xb = contract[side], contract[1 - side], batch[side], batch[1 - side]
    if x.shape[0] != ids.shape[0] or 0 in (*xc, *xb):
        raise ValueError(
            f"{w.leaf}: per-example adapters need the examples along axis 0 of every activation that meets "
            f"the weight; this contraction's activation has shape {x.shape} (contracting {xc}, batching {xb}) "
            f"and there are {ids.shape[0]} adapter ids"
        )
    a, b = jnp.take(a, jnp.maximum(ids, 0), axis=0), jnp.take(b, jnp.maximum(ids, 0), axis=0)
    a_pos, b_pos = _a_axes(w.roles), _b_axes(w.roles)
    nb = len(wb)
    h = lax.dot_general(  # (example, batch, x's other free axes, r)
        x,
        a,
        ((xc, [1 + a_pos.index(k) for k in wc]), ((0, *xb), (0, *[1 + a_pos.index(k) for k in wb]))),
        preferred_element_type=jnp.float32,
    )
    h = jnp.where((ids >= 0).reshape(-1, *[1] * (h.ndim - 1)), h, 0).astype(b.dtype)
    out = lax.dot_general(  # (example, batch, x's other free axes, W's output axes)
        h,
        b,
        (((h.ndim - 1,), (1 + b_pos.index(None),)), (tuple(range(1 + nb)), (0, *[1 + b_pos.index(k) for k in wb]))),
        preferred_element_type=jnp.float32,
    )
    n_free, n_out = h.ndim - 2 - nb, w.roles.count("o")
    example, batch_axes = [0], list(range(1, 1 + nb))
    free, outs = list(range(1 + nb, 1 + nb + n_free)), list(range(1 + nb + n_free, out.ndim))
    assert len(outs) == n_out
    order = batch_axes + (example + free + outs if side == 1 else outs + example + free)
    return jnp.transpose(out, order)


_RAGGED = lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((1,), (1,)), ((), ())), lhs_ragged_dimensions=(0,), rhs_group_dimensions=(0,)
)


def _ragged_dot(run, eqn, invals):
    """``ragged_dot(x, W[g, in, out])``: per-group factors ``A[g, in, r]``, ``B[g, r, out]``."""
    x, w, group_sizes = invals
    params = eqn.params
    canonical = params["ragged_dot_dimension_numbers"] == _RAGGED and params["group_offset"] is None
    if isinstance(x, LoraValue) or isinstance(group_sizes, LoraValue) or not canonical or w.roles != "sio":
        return _merged(run, eqn, invals)
    if w.multi:
        raise ValueError(f"{w.leaf}: per-example adapters on a ragged_dot (grouped experts) are not supported")
    y = _bind(eqn, [x, w.w, group_sizes])[0]
    a, b = w.a.astype(x.dtype), w.b.astype(x.dtype)
    h = lax.ragged_dot(x, a, group_sizes, preferred_element_type=jnp.float32)
    out = lax.ragged_dot(h.astype(b.dtype), b, group_sizes, preferred_element_type=jnp.float32)
    return [y + (w.scale * out).astype(y.dtype)]


# control flow and calls: re-expressed with the public APIs over interpreted bodies


def _jit(run, eqn, invals):
    closed = eqn.params["jaxpr"]  # kept a jit, so XLA compiles the call as one program, as before
    return jax.jit(lambda *args: _eval(run, closed.jaxpr, closed.consts, args), inline=eqn.params["inline"])(*invals)


def _remat(run, eqn, invals):
    body = lambda *args: _eval(run, eqn.params["jaxpr"], (), args)  # a weight passed through leaves as it came
    return jax.checkpoint(body, prevent_cse=eqn.params["prevent_cse"], policy=eqn.params["policy"])(*invals)


def _scan(run, eqn, invals):
    p = eqn.params
    nc, nk = p["num_consts"], p["num_carry"]
    consts, carry = invals[:nc], [run.dense(x, "scan carry") for x in invals[nc : nc + nk]]
    xs = [x if not isinstance(x, LoraValue) or x.roles[0] == "s" else run.dense(x, "scan") for x in invals[nc + nk :]]
    # a stack of adapters scans along its layers, the axis after the adapter axis
    layers_first = lambda x: x.replace(a=jnp.moveaxis(x.a, 0, 1), b=jnp.moveaxis(x.b, 0, 1))
    xs = [layers_first(x) if isinstance(x, LoraValue) and x.multi else x for x in xs]

    def step(x):  # a scanned stacked weight: each step sees one slice of it and of its factors
        return x.replace(roles=x.roles[1:]) if isinstance(x, LoraValue) else x

    def body(c, x):
        outs = _eval(run, p["jaxpr"].jaxpr, p["jaxpr"].consts, [*consts, *c, *map(step, x)])
        return [run.dense(y, "scan carry") for y in outs[:nk]], outs[nk:]

    def stacked(y):  # a weight the body passes out (NNX scans return their state) leaves stacked again
        if not isinstance(y, LoraValue):
            return y
        back = (lambda f: jnp.moveaxis(f, 1, 0)) if y.multi else (lambda f: f)
        return y.replace(roles="s" + y.roles, a=back(y.a), b=back(y.b))

    carry, ys = lax.scan(body, carry, xs, length=p["length"], reverse=p["reverse"], unroll=p["unroll"])
    return [*carry, *map(stacked, ys)]


def _while(run, eqn, invals):
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cond_consts, body_consts = invals[:nc], invals[nc : nc + nb]
    carry = [run.dense(x, "while carry") for x in invals[nc + nb :]]
    cond = lambda c: _eval_dense(run, p["cond_jaxpr"], [*cond_consts, *c], "while")[0]
    body = lambda c: _eval_dense(run, p["body_jaxpr"], [*body_consts, *c], "while")
    return lax.while_loop(cond, body, carry)


def _cond(run, eqn, invals):
    index, *ops = invals
    branches = [
        functools.partial(lambda br, *args: _eval_dense(run, br, args, "cond"), br) for br in eqn.params["branches"]
    ]
    return lax.switch(index, branches, *ops)


_RULES: dict[str, Callable[[_Run, JaxprEqn, Sequence[Any]], list[Any]]] = {
    "convert_element_type": _convert,
    "copy": _same,
    "copy_p": _same,
    "transpose": _transpose,
    "reshape": _reshape,
    "squeeze": _squeeze,
    "slice": _slice,
    "dynamic_slice": _dynamic_slice,
    "dot_general": _dot_general,
    "ragged_dot_general": _ragged_dot,
    "jit": _jit,
    "pjit": _jit,
    "remat2": _remat,
    "checkpoint": _remat,
    "scan": _scan,
    "while": _while,
    "cond": _cond,
}


# -- learning layouts ------------------------------------------------------------------

View = tuple[int, tuple[frozenset[int], ...]]  # (target index, the target axes each axis stands for)


@dataclasses.dataclass
class _Uses:
    """What the walk learns: the roles seen per target axis, the targets some contraction uses,
    and the targets some equation reads."""

    roles: dict[int, dict[int, set[str]]] = dataclasses.field(default_factory=dict)
    contracted: set[int] = dataclasses.field(default_factory=set)
    read: set[int] = dataclasses.field(default_factory=set)

    def propose(self, view: View, roles: Sequence[str], contraction: bool = True) -> None:
        target, axes = view
        merged, split = any(len(a) > 1 for a in axes), len({k for a in axes for k in a}) < sum(map(len, axes))
        if merged and split:  # reshaped through a flattening: its axes say nothing of the target's
            return
        if contraction:
            self.contracted.add(target)
        for leaf_axes, role in zip(axes, roles, strict=True):
            for k in leaf_axes:
                self.roles.setdefault(target, {}).setdefault(k, set()).add(role)


def _sub_jaxprs(eqn: JaxprEqn) -> list[Jaxpr]:
    """The inner jaxprs of a call-like equation (jit, checkpoint, custom_jvp/vjp, shard_map, ...)."""
    return [
        v.jaxpr if isinstance(v, ClosedJaxpr) else v for v in eqn.params.values() if isinstance(v, ClosedJaxpr | Jaxpr)
    ]


def _walk(jaxpr: Jaxpr, views: Sequence[View | None], found: _Uses) -> None:
    """Record, per target axis, the roles its uses in contractions and scans give it."""
    env: dict[Var, View] = {v: view for v, view in zip(jaxpr.invars, views, strict=True) if view is not None}
    for eqn in jaxpr.eqns:
        ins = [env.get(v) if isinstance(v, Var) else None for v in eqn.invars]
        if all(view is None for view in ins):
            continue
        found.read |= {view[0] for view in ins if view is not None}
        name, p, out = eqn.primitive.name, eqn.params, eqn.outvars[0]
        first = ins[0]
        if name in ("convert_element_type", "copy", "copy_p", "slice", "dynamic_slice", "sharding_constraint"):
            if first is not None:
                env[out] = first
        elif name == "transpose":
            env[out] = (first[0], tuple(first[1][k] for k in p["permutation"]))
        elif name == "squeeze":
            dims = {d % len(first[1]) for d in p["dimensions"]}
            env[out] = (first[0], tuple(a for k, a in enumerate(first[1]) if k not in dims))
        elif name == "reshape" and p.get("dimensions") is None:
            axes: list[frozenset[int]] = [frozenset()] * len(p["new_sizes"])
            for gi, gj in _reshape_groups(eqn.invars[0].aval.shape, p["new_sizes"]) or []:
                for k in gj:
                    axes[k] = frozenset().union(*(first[1][i] for i in gi))
            env[out] = (first[0], tuple(axes))
        elif name == "broadcast_in_dim":
            axes = [frozenset()] * len(p["shape"])
            for k, d in enumerate(p["broadcast_dimensions"]):
                axes[d] = first[1][k]
            env[out] = (first[0], tuple(axes))
        elif name == "dot_general":
            (contract, batch) = p["dimension_numbers"]
            for side, view in enumerate(ins):
                if view is not None:
                    roles = ["o"] * len(view[1])
                    for k in contract[side]:
                        roles[k] = "i"
                    for k in batch[side]:
                        roles[k] = "s"
                    found.propose(view, roles)
        elif name == "ragged_dot_general":
            dims = p["ragged_dot_dimension_numbers"]
            view = ins[1]
            if view is not None:
                roles = ["o"] * len(view[1])
                for k in dims.dot_dimension_numbers[0][1]:
                    roles[k] = "i"
                for k in (*dims.dot_dimension_numbers[1][1], *dims.rhs_group_dimensions):
                    roles[k] = "s"
                found.propose(view, roles)
        elif name == "scan":
            n_xs = len(ins) - p["num_consts"] - p["num_carry"]
            inner = list(ins[: len(ins) - n_xs])
            for view in ins[len(ins) - n_xs :]:
                if view is not None:
                    found.propose((view[0], view[1][:1]), "s", contraction=False)
                inner.append(None if view is None else (view[0], view[1][1:]))
            _walk(p["jaxpr"].jaxpr, inner, found)
        elif name == "while":
            nc, nb = p["cond_nconsts"], p["body_nconsts"]
            _walk(p["cond_jaxpr"].jaxpr, ins[:nc] + ins[nc + nb :], found)
            _walk(p["body_jaxpr"].jaxpr, ins[nc:], found)
        elif name == "cond":
            for branch in p["branches"]:
                _walk(branch.jaxpr, ins[1:], found)
        else:  # jit, checkpoint, custom_jvp/vjp, shard_map, ...: one inner jaxpr over the same inputs
            for inner in _sub_jaxprs(eqn):
                if len(inner.invars) == len(ins):
                    _walk(inner, ins, found)


def _learn(
    jaxpr: Jaxpr, invars: Mapping[int, str], shapes: Mapping[int, tuple[int, ...]]
) -> tuple[dict[int, LeafSpec], set[int]]:
    """The layout of each input `invars` names (index -> path) that a contraction in `jaxpr`
    uses, and the inputs of `invars` that `jaxpr` reads at all."""
    found = _Uses()
    views = [
        (j, tuple(frozenset({k}) for k in range(len(shapes[j])))) if j in invars else None
        for j in range(len(jaxpr.invars))
    ]
    _walk(jaxpr, views, found)
    specs = {}
    for j in found.contracted & set(invars):
        roles = ""
        for k in range(len(shapes[j])):
            kinds = found.roles[j].get(k, {"s"})  # an axis no contraction sees was indexed away: stacked
            if len(kinds) > 1:
                raise ValueError(f"{invars[j]}: axis {k} is used as {' and '.join(sorted(kinds))} by different uses")
            roles += kinds.pop()
        if "i" not in roles or "o" not in roles:
            raise ValueError(
                f"{invars[j]}: its contractions give axis roles {roles!r}; LoRA needs input and output axes"
            )
        specs[j] = LeafSpec(roles)
    return specs, found.read | {j for j in invars if jaxpr.invars[j] in jaxpr.outvars}


def _never_contracted(paths: Sequence[str]) -> ValueError:
    return ValueError(
        f"{', '.join(paths)}: targeted, but the function never contracts it (no dot_general / einsum / matmul / "
        "ragged_dot uses it), so its input and output axes are unknown; exclude it from the targets"
    )


# -- tracing ---------------------------------------------------------------------------


def _is_dynamic(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic)


def _trace(fn: Callable, params: PyTree, args: tuple, kwargs: dict):
    """``(closed jaxpr, output treedef, {leaf keys: input index})`` of ``fn(params, *args, **kwargs)``;
    array leaves are inputs, other leaves (Python numbers, flags) stay static."""
    leaves, treedef = jax.tree.flatten((params, args, kwargs))
    dynamic = [j for j, x in enumerate(leaves) if _is_dynamic(x)]

    def flat_fn(*values):
        full = list(leaves)
        for j, v in zip(dynamic, values, strict=True):
            full[j] = v
        p, a, k = jax.tree.unflatten(treedef, full)
        return fn(p, *a, **k)

    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*(leaves[j] for j in dynamic))
    position = {j: i for i, j in enumerate(dynamic)}
    param_keys = list(flatten(params))  # the same order as the leading leaves of `leaves`
    inputs = {keys: position[j] for j, keys in enumerate(param_keys) if j in position}
    return closed, jax.tree.structure(out_shape), inputs, [leaves[j] for j in dynamic]


def _strip(tree: PyTree) -> PyTree:
    """`tree` without its adapters, containers kept."""
    if isinstance(tree, Mapping):
        return type(tree)({k: _strip(v) for k, v in tree.items() if not is_adapter(k)})
    if isinstance(tree, list | tuple) and not hasattr(tree, "_fields"):
        return type(tree)(_strip(v) for v in tree)
    return tree


def lora_specs(
    fn: Callable, params: PyTree, *args, targets: LoraConfig | Sequence[str] | str, **kwargs
) -> dict[str, LeafSpec]:
    """Learn the layout of every targeted weight from what ``fn(params, *args, **kwargs)`` computes.

    Targets are floating leaves with at least two axes whose module path or own path the
    config (or a `target_modules` list / regex) targets. Returns ``{leaf path: LeafSpec}``.
    Raises, naming it, for a target that no contraction uses.
    """
    config = targets if isinstance(targets, LoraConfig) else LoraConfig(target_modules=targets)
    if config.target_modules == ALL_LINEAR:
        raise ValueError(
            'targets "all-linear" needs modules that own a `kernel` (Linen, NNX); for a plain function '
            "name the weights to adapt (their paths, or one regex)"
        )
    closed, _, inputs, values = _trace(fn, params, args, kwargs)
    chosen = {
        j: path_str(keys)
        for keys, j in inputs.items()
        if config_path(keys, config) and values[j].ndim >= 2 and jnp.issubdtype(values[j].dtype, jnp.floating)
    }
    learned, _ = _learn(closed.jaxpr, chosen, {j: values[j].shape for j in chosen})
    specs = {chosen[j]: spec for j, spec in learned.items()}
    # a leaf targeted by its own path must be contracted; a targeted module, through one of its leaves
    required = {config_path(keys, config) for keys, j in inputs.items() if j in chosen}
    missed = sorted(t for t in required if not any(p == t or p.startswith(f"{t}/") for p in specs))
    if missed:
        raise _never_contracted(missed)
    if not chosen:
        listing = ", ".join(path_str(k) for k in inputs)
        raise ValueError(f"targets {config.target_modules!r} match no weight of at least 2 axes; leaves: {listing}")
    return specs


# -- adapters: create, apply, merge ----------------------------------------------------


def _refuse_dora(config: LoraConfig) -> None:
    if config.use_dora:
        raise ValueError("DoRA (use_dora) is not supported on functions yet; use jlora.apply on a Linen model")


def init(params: PyTree, specs: Mapping[str, LeafSpec], config: LoraConfig, key: jax.Array) -> dict:
    """Add A (peft's initialisation) and B = 0 beside every weight in `specs`: a no-op on the output."""
    _refuse_dora(config)
    flat = flatten(params)
    by_path = {path_str(keys): keys for keys in flat}
    for path, spec in specs.items():
        keys = by_path[path]
        shape, lookup = flat[keys].shape, config_path(keys, config) or path
        r = config.rank(lookup)
        fan_in, fan_out = spec.fan_in_out(shape)
        if r > min(fan_in, fan_out):
            raise ValueError(f"init: rank {r} for {path} exceeds min(in, out) = min({fan_in}, {fan_out})")
        a_shape, b_shape = spec.adapter_shapes(shape, r)
        a_name, b_name = adapter_names(keys[-1], re.fullmatch("s*i+o+", spec.roles) is not None)
        flat[(*keys[:-1], a_name)] = _init_a(
            jax.random.fold_in(key, zlib.crc32(path.encode())), a_shape, fan_in, r, config
        )
        flat[(*keys[:-1], b_name)] = jnp.zeros(b_shape, config.dtype)
    return unflatten(flat)


def adapters_of(params: PyTree) -> dict[Keys, tuple[Keys, Keys]]:
    """``{weight keys: (A's keys, B's keys)}`` for every weight with adapters beside it."""
    flat = flatten(params)
    found, claimed = {}, set()
    for keys in flat:
        if is_adapter(keys[-1]) or not isinstance(keys[-1], str):
            continue
        for names in dict.fromkeys(adapter_names(keys[-1], layout) for layout in (True, False)):
            a_keys, b_keys = ((*keys[:-1], name) for name in names)
            if a_keys in flat or b_keys in flat:
                if a_keys not in flat or b_keys not in flat:
                    raise ValueError(f"{path_str(keys)}: has only one of its adapters {a_keys[-1]} / {b_keys[-1]}")
                if keys in found:
                    raise ValueError(f"{path_str(keys)}: has adapters under two names, {found[keys][0]} and {a_keys}")
                found[keys] = (a_keys, b_keys)
                claimed |= {a_keys, b_keys, (*keys[:-1], LORA_MAGNITUDE)}  # DoRA's, beside a kernel
    orphans = [path_str(k) for k in flat if is_adapter(k[-1]) and k not in claimed]
    if orphans:
        raise ValueError(
            f"adapters {orphans} have no weight beside them (naming rule: jlora.tree.adapter_names); "
            "pass the adapters joined with their base (jlora.join(adapters, base))"
        )
    return found


def merge(params: PyTree, specs: Mapping[str, LeafSpec], config: LoraConfig) -> dict:
    """A tree without adapters, each adapted weight replaced by ``W + s·B·A`` (float32, cast to W's dtype)."""
    params_flat = flatten(params)
    flat = {k: v for k, v in params_flat.items() if not is_adapter(k[-1])}
    for keys, (a_keys, b_keys) in adapters_of(params).items():
        a, b = params_flat[a_keys], params_flat[b_keys]
        w, path = flat[keys], path_str(keys)
        scale = config.scale(config_path(keys, config) or path, a.shape[-1])
        flat[keys] = (w.astype(jnp.float32) + delta(specs[path].roles, a, b, scale)).astype(w.dtype)
    return unflatten(flat)


def _transformed(fn: Callable, params: PyTree, args: tuple, kwargs: dict, config: LoraConfig | None, run: _Run) -> Any:
    """``fn(params, *args, **kwargs)`` evaluated with the adapters in `params` applied: scaled by
    `config`, or (``config=None``) a `jlora.multi.stack` of adapters, scales folded in, chosen per
    example by ``run.ids``."""
    flat = flatten(params)
    adapters = {keys: (flat[a], flat[b]) for keys, (a, b) in adapters_of(params).items()}
    closed, out_tree, inputs, values = _trace(fn, _strip(params), args, kwargs)
    chosen = {inputs[keys]: path_str(keys) for keys in adapters}
    specs, read = _learn(closed.jaxpr, chosen, {j: values[j].shape for j in chosen})
    unread = sorted(chosen[j] for j in chosen.keys() - read)
    if unread:
        raise ValueError(f"lora: adapters on {unread} were never applied: fn does not read these weights")
    if chosen.keys() - specs.keys():
        raise _never_contracted(sorted(chosen[j] for j in chosen.keys() - specs.keys()))
    for keys, (a, b) in adapters.items():
        j, path = inputs[keys], path_str(keys)
        roles = specs[j].roles
        ns = roles.count("s")
        if config is None:  # (*stack, n, ...) -> (n, *stack, ...): `LoraValue.map` runs per adapter
            a, b = jnp.moveaxis(a, ns, 0), jnp.moveaxis(b, ns, 0)
        expected = specs[j].adapter_shapes(values[j].shape, a.shape[-1])
        if (a.shape[config is None :], b.shape[config is None :]) != expected:
            raise ValueError(f"{path}: adapters {a.shape} / {b.shape} do not fit roles {roles!r}: {expected}")
        scale = 1.0 if config is None else config.scale(config_path(keys, config) or path, a.shape[-1])
        values[j] = LoraValue(values[j], a, b, roles, scale, path, multi=config is None)
    outs = [run.dense(x, "output") for x in _eval(run, closed.jaxpr, closed.consts, values)]
    return jax.tree.unflatten(out_tree, outs)


def lora(fn: Callable, config: LoraConfig, *, fallback: str = "merge") -> Callable:
    """`fn` with the adapters in its parameter tree applied: ``wrapped(params_with_adapters, *args, **kwargs)``.

    Every contraction of an adapted weight with an activation adds ``s·(x·A)·B`` factored;
    other uses see ``W + s·B·A`` (``fallback="merge"``) or raise (``fallback="error"``).
    Works inside `jax.jit` and `jax.grad`. Array leaves of the arguments are traced, other
    leaves are static. Raises if an adapter's weight is never read by `fn`.
    """
    if fallback not in ("merge", "error"):
        raise ValueError(f"lora: fallback must be 'merge' or 'error', got {fallback!r}")
    _refuse_dora(config)

    @functools.wraps(fn)
    def wrapped(params: PyTree, *args, **kwargs):
        return _transformed(fn, params, args, kwargs, config, _Run(fallback))

    return wrapped


def per_example(fn: Callable) -> Callable:
    """`fn` where example e uses adapter ``ids[e]`` of a `jlora.multi.stack` (-1: none):
    ``wrapped(params_with_stacked_adapters, ids, *args, **kwargs)``, every contraction of an
    adapted weight factored per example. The examples are axis 0 of each activation that
    meets an adapted weight (checked); any other use of an adapted weight is refused, as
    there is no single merged weight. `ids` is data: one compilation serves every mix."""

    @functools.wraps(fn)
    def wrapped(params: PyTree, ids: jax.Array, *args, **kwargs):
        ids = jnp.asarray(ids)
        if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"adapter ids must be a 1-D integer array (one per example), got {ids.dtype} {ids.shape}")
        return _transformed(fn, params, args, kwargs, None, _Run("error", ids))

    return wrapped
