"""Many adapters over one base: stacked adapter trees, per-example adapters, weighted combinations.

`stack` turns n adapters for the same base into one tree: each ``lora_a`` becomes
``(*stack, n, *in, R)`` and each ``lora_b`` ``(*stack, n, R, *out)``, the adapter axis right
after the layer axes (`nn.scan` still slices layers). R is the largest rank, smaller ranks are
zero-padded (an exact no-op) and each adapter's scale is folded into its B, so the tree needs no
config. `apply` runs the base once for a batch in which example i uses adapter ``ids[i]``
(-1: the base alone): every adapted layer gathers ``A[ids]``, ``B[ids]`` and contracts them
with batch dimensions. The choice of adapter is data, so one compiled program serves any mix.

`lora` does the same for any JAX function through `jlora.interpret` (an NNX model, plain jnp
code): the stacks sit beside their weights under `jlora.tree.adapter_names`' rule.

`combine` makes one adapter of several as peft's ``add_weighted_adapter`` does.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jlora import interpret
from jlora.apply import adding, check_applied
from jlora.config import LoraConfig
from jlora.spec import einsum_axes
from jlora.tree import LORA_A, Keys, PyTree, flatten, join, path_str, unflatten

COMBINATIONS = ("cat", "linear", "svd")
Factor = tuple[int, jax.Array, jax.Array, float]  # the weight's number of stacked axes, A, B, scale


def _factors(params: PyTree, config: LoraConfig) -> dict[tuple[Keys, Keys], Factor]:
    """``{(A's keys, B's keys): (the weight's stacked axes, A, B, scale)}`` for every adapter in
    `params` (which holds the weights), under either naming rule (`jlora.tree.adapter_names`)."""
    if config.modules_to_save:
        raise ValueError(
            f"adapters with modules_to_save {list(config.modules_to_save)} replace whole modules, "
            "which cannot be stacked or combined; use adapters of lora_a / lora_b only"
        )
    if config.use_dora:
        raise ValueError(
            "DoRA adapters (use_dora) rescale their whole layer by a magnitude, which cannot be stacked or "
            "combined per row; merge each one (jlora.merge) or use plain LoRA adapters"
        )
    flat = flatten(params)
    out = {}
    for keys, (a_keys, b_keys) in interpret.adapters_of(params).items():
        a, b = jnp.asarray(flat[a_keys]), jnp.asarray(flat[b_keys])
        stacked = (a.ndim - 1) + (b.ndim - 1) - len(flat[keys].shape)  # A (*s, *in, r), B (*s, r, *out)
        scale = config.scale(interpret.config_path(keys, config) or path_str(keys), a.shape[-1])
        out[a_keys, b_keys] = (stacked, a, b, scale)
    if not out:
        raise ValueError("params hold no adapters (lora_a / lora_b beside their weights)")
    return out


def _pad_rank(stacked: int, a: jax.Array, b: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """A and B with zero rank columns / rows added up to `rank`: the product is unchanged."""
    extra = rank - a.shape[-1]
    pad = lambda x, axis: jnp.pad(x, [(0, extra if i == axis else 0) for i in range(x.ndim)])
    return pad(a, a.ndim - 1), pad(b, stacked)


def _modules(adapters: Sequence[tuple[PyTree, LoraConfig]]) -> dict[tuple[Keys, Keys], list[Factor | None]]:
    """Per adapted weight (of any adapter), by its adapters' keys, each adapter's ``(stacked
    axes, A, B, scale)`` or None, checked to fit one weight."""
    found = [_factors(params, config) for params, config in adapters]
    modules = {}
    for keys in sorted(set().union(*found), key=lambda pair: path_str(pair[0])):
        entries = [f.get(keys) for f in found]
        shapes = {(n, a.shape[:-1], b.shape[:n] + b.shape[n + 1 :]) for n, a, b, _ in filter(None, entries)}
        if len(shapes) > 1:
            raise ValueError(
                f"{path_str(keys[0])}: the adapters disagree on the weight's layout: {sorted(map(str, shapes))}"
            )
        modules[keys] = entries
    return modules


def stack(adapters: Sequence[tuple[PyTree, LoraConfig]]) -> dict:
    """One tree holding `adapters` (each a params tree with adapters and weights, and its
    config) along a new adapter axis, for `apply` / `lora`: ``A (*stack, n, *in, R)`` and
    ``B (*stack, n, R, *out)``, B times its adapter's scale, ranks zero-padded to R.

    A weight that some adapter lacks gets zeros there. Returns the adapters alone (no
    weights); `apply` joins them with the base.
    """
    if not adapters:
        raise ValueError("stack: no adapters")
    flat = {}
    for keys, entries in _modules(adapters).items():
        stacked, a0, b0, _ = next(filter(None, entries))
        rank = max(e[1].shape[-1] for e in entries if e)
        dtype = jnp.result_type(*(x for e in entries if e for x in e[1:3]))
        a_list, b_list = [], []
        for entry in entries:
            _, a, b, scale = entry or (stacked, jnp.zeros_like(a0), jnp.zeros_like(b0), 0.0)
            a, b = _pad_rank(stacked, a.astype(dtype), (scale * b).astype(dtype), rank)
            a_list.append(a)
            b_list.append(b)
        a_keys, b_keys = keys
        flat[a_keys], flat[b_keys] = jnp.stack(a_list, stacked), jnp.stack(b_list, stacked)
    return unflatten(flat)


# -- per-example application ----------------------------------------------------------------


def lora_branch(
    module: nn.Module, x: jax.Array, a: jax.Array, b: jax.Array, ids: jax.Array, einsum_str: str | None = None
) -> jax.Array:
    """``x[i] · A[ids[i]] · B[ids[i]]`` per example i of `module`'s input (0 where ``ids[i] < 0``),
    in its compute dtype, accumulated in f32. `a`, `b` hold every adapter: ``(n, *in, R)``, ``(n, R, *out)``."""
    if x.shape[0] != ids.shape[0]:
        raise ValueError(
            f"{'/'.join(module.path)}: input batch {x.shape[0]} but {ids.shape[0]} adapter ids: jlora.multi needs "
            "every adapted layer to see the examples along axis 0"
        )
    x, a, b = nn.dtypes.promote_dtype(x, a, b, dtype=module.dtype)
    a, b = jnp.take(a, jnp.maximum(ids, 0), axis=0), jnp.take(b, jnp.maximum(ids, 0), axis=0)
    keep = lambda h: jnp.where((ids >= 0).reshape(-1, *[1] * (h.ndim - 1)), h, 0).astype(b.dtype)
    if isinstance(module, nn.Einsum):
        x_sub, k_sub, out_sub, is_in = einsum_axes(einsum_str or module.einsum_str)
        batch = x_sub[:1]
        if not batch.isalpha() or batch in k_sub or batch not in out_sub:
            raise ValueError(
                f"{'/'.join(module.path)}: einsum {x_sub},{k_sub}->{out_sub} needs a batch axis first in x"
            )
        ins = "".join(c for c, i in zip(k_sub, is_in, strict=True) if i)
        outs = "".join(c for c, i in zip(k_sub, is_in, strict=True) if not i)
        rank = next(c for c in "rRzZqQ" if c not in x_sub + k_sub + out_sub)
        mid = "".join(c for c in x_sub if c not in ins) + rank
        h = jnp.einsum(f"{x_sub},{batch}{ins}{rank}->{mid}", x, a, preferred_element_type=jnp.float32)
        return jnp.einsum(f"{mid},{batch}{rank}{outs}->{out_sub}", keep(h), b, preferred_element_type=jnp.float32)
    axes = (-1,) if isinstance(module, nn.Dense) else module.axis
    axes = tuple(ax % x.ndim for ax in (axes if isinstance(axes, tuple | list) else (axes,)))
    if 0 in axes:
        raise ValueError(f"{'/'.join(module.path)}: contracts axis 0, the batch axis jlora.multi selects adapters by")
    h = lax.dot_general(x, a, ((axes, tuple(range(1, a.ndim - 1))), ((0,), (0,))), preferred_element_type=jnp.float32)
    return lax.dot_general(keep(h), b, (((h.ndim - 1,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32)


@contextlib.contextmanager
def intercept(ids: jax.Array) -> Iterator[set[str]]:
    """Within this context, `model.apply` with a `stack`-ed tree joined to the base adds to
    example i the adapter ``ids[i]`` (-1: none). Yields the module paths reached, as
    `jlora.intercept` does. Inference only: no LoRA dropout."""
    ids = jnp.asarray(ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"adapter ids must be a 1-D integer array (one per example), got {ids.dtype} {ids.shape}")
    with adding(lambda module, x, a, b, einsum_str: lora_branch(module, x, a, b, ids, einsum_str)) as applied:
        yield applied


def apply(
    model: nn.Module,
    base: PyTree,
    stacked: PyTree,
    ids: jax.Array,
    *args,
    variables: dict[str, PyTree] | None = None,
    **kwargs,
) -> Any:
    """`model.apply` on `base` where example i uses adapter ``ids[i]`` of `stacked` (-1: the base).

    `ids` is data: under `jax.jit`, one compilation serves every adapter and every mix
    (``jnp.full(batch, k, jnp.int32)`` selects adapter k for the whole batch; keep one dtype,
    as a weakly typed ``jnp.full(batch, k)`` is another signature to `jax.jit`). `kwargs` go to
    `model.apply`. Raises, as `jlora.apply` does, if an adapter was never reached.
    """
    with intercept(ids) as applied:
        out = model.apply({**(variables or {}), "params": join(stacked, base)}, *args, **kwargs)
    check_applied(stacked, applied, kwargs)
    return out


def lora(fn: Callable) -> Callable:
    """Any JAX function ``fn(params, *args)`` (NNX, plain jnp, custom einsums; `jlora.interpret`)
    where example i uses adapter ``ids[i]`` of `stacked` (-1: the base):
    ``wrapped(base, stacked, ids, *args, **kwargs)``, each adapted contraction factored per
    example. The examples are axis 0 of every activation an adapted weight meets (checked)."""
    per_example = interpret.per_example(fn)

    @functools.wraps(fn)
    def wrapped(base: PyTree, stacked: PyTree, ids: jax.Array, *args, **kwargs) -> Any:
        return per_example(join(stacked, base), ids, *args, **kwargs)

    return wrapped


# -- weighted combination ---------------------------------------------------------------------


def _target(a_keys: Keys) -> str:
    """The target name of the weight that the adapter at `a_keys` adapts: its module's, or its own."""
    return str(a_keys[-2]) if a_keys[-1] == LORA_A else a_keys[-1].removesuffix(f"_{LORA_A}")


def _max_rank(config: LoraConfig) -> int:
    """peft's rank for allocating a combined adapter: the largest rank the config can give."""
    return max([config.r, *config.rank_pattern.values()])


def _matrices(stacked: int, a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A ``(*stack, in, r)`` and B ``(*stack, r, out)`` with input and output axes flattened, in f32."""
    stack_shape = a.shape[:stacked]
    return (
        a.reshape(*stack_shape, -1, a.shape[-1]).astype(jnp.float32),
        b.reshape(*stack_shape, b.shape[stacked], -1).astype(jnp.float32),
    )


def _svd(delta: jax.Array, rank: int, clamp: float | None) -> tuple[jax.Array, jax.Array]:
    """peft's re-factoring of ΔW ``(*stack, in, out)``: ``A = V_k``, ``B = S_k·U_kᵀ`` (all singular
    values on B), then optionally both clamped to ±(the `clamp` quantile of their joint entries),
    per layer. Each singular pair's sign is fixed (A's largest entry positive) so that the clamp,
    which sees the signs, depends on ΔW alone and not on the SVD library's choice."""
    u, s, vh = jnp.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.shape[-1])
    a, b = u[..., :k], s[..., :k, None] * vh[..., :k, :]
    signs = jnp.sign(jnp.take_along_axis(a, jnp.argmax(jnp.abs(a), axis=-2, keepdims=True), axis=-2))
    a, b = a * signs, b * jnp.swapaxes(signs, -1, -2)
    if clamp is not None:
        joint = jnp.concatenate([a.reshape(*a.shape[:-2], -1), b.reshape(*b.shape[:-2], -1)], axis=-1)
        hi = jnp.quantile(joint, clamp, axis=-1)[..., None, None]
        a, b = jnp.clip(a, -hi, hi), jnp.clip(b, -hi, hi)
    return a, b


def combine(
    adapters: Sequence[tuple[PyTree, LoraConfig]],
    weights: Sequence[float],
    combination_type: str = "svd",
    *,
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
) -> tuple[dict, LoraConfig]:
    """One adapter made of several, with peft's ``add_weighted_adapter`` semantics.

    With ``s_i`` adapter i's scale and A, B in peft's (r, in) / (out, r) layout:

    * ``"cat"``: ``A = concat_i(w_i·s_i·A_i)``, ``B = concat_i(B_i)`` along the rank; exactly
      ``ΔW = Σ w_i·s_i·B_i·A_i``, at rank Σ r_i.
    * ``"linear"``: ``A = Σ sign_i·√|w_i·s_i|·A_i``, ``B = Σ √|w_i·s_i|·B_i``, with sign_i the
      sign of ``w_i·s_i``; the ranks must agree. Its product has cross terms ``B_i·A_j``: it is
      not the weighted sum of the adapters (peft calls it a rough approximation).
    * ``"svd"``: ``ΔW = Σ w_i·s_i·B_i·A_i`` re-factored by SVD, ``B = U_k·S_k``, ``A = V_kᵀ``, at
      rank k = `svd_rank` (default: the largest rank), optionally with entries clamped to
      ±(the `svd_clamp` quantile of B's and A's entries, per layer). At full rank it is exact.
      The clamp depends on the singular vectors' signs, which peft leaves to torch's SVD (they
      differ between libraries); jlora fixes them, so clamped results match peft's up to that.

    A module that some adapters lack combines the others. A single adapter is combined
    ``"linear"``, as peft does. The combined adapter has scale 1: ``r = alpha`` = its rank,
    and ``use_rslora=False`` (peft 0.21 copies the first adapter's ``use_rslora``, which
    would scale the result by √r). Returns ``(adapters, config)``; the adapters, zero-padded
    to one rank, join the base with `jlora.join`.
    """
    if combination_type not in COMBINATIONS:
        raise ValueError(f"combination_type must be one of {COMBINATIONS}, got {combination_type!r}")
    if len(weights) != len(adapters) or not adapters:
        raise ValueError(f"combine: {len(adapters)} adapters but {len(weights)} weights")
    configs = [config for _, config in adapters]
    combination_type = "linear" if len(adapters) == 1 else combination_type
    ranks = [_max_rank(config) for config in configs]
    if combination_type == "linear" and len(set(ranks)) > 1:
        raise ValueError(f"combination_type 'linear' needs adapters of one rank, got {ranks}; use 'cat' or 'svd'")
    new_rank = {"cat": sum(ranks), "linear": ranks[0], "svd": svd_rank or max(ranks)}[combination_type]
    modules = _modules(adapters)
    flat = {}
    for keys, entries in modules.items():
        present = [(w, e) for w, e in zip(weights, entries, strict=True) if e]
        stacked, a0, b0, _ = present[0][1]
        factors = [(w, scale, *_matrices(stacked, a, b)) for w, (_, a, b, scale) in present]
        if combination_type == "cat":
            a = jnp.concatenate([w * s * a for w, s, a, _ in factors], axis=-1)
            b = jnp.concatenate([b for *_, b in factors], axis=-2)
        elif combination_type == "linear":
            if len({a.shape[-1] for _, _, a, _ in factors}) > 1:
                raise ValueError(f"{path_str(keys[0])}: combination_type 'linear' needs one rank, the adapters differ")
            a = sum(math.copysign(math.sqrt(abs(w * s)), w * s) * a for w, s, a, _ in factors)
            b = sum(math.sqrt(abs(w * s)) * b for w, s, _, b in factors)
        else:
            a, b = _svd(sum(w * s * a @ b for w, s, a, b in factors), new_rank, svd_clamp)
        dtype = jnp.result_type(*(x for _, e in present for x in e[1:3]))
        a = a.reshape(*a0.shape[:-1], a.shape[-1]).astype(dtype)
        b = b.reshape(*b0.shape[:stacked], b.shape[-2], *b0.shape[stacked + 1 :]).astype(dtype)
        a_keys, b_keys = keys
        flat[a_keys], flat[b_keys] = _pad_rank(stacked, a, b, new_rank)
    layers = None if any(c.layers is None for c in configs) else sorted(set().union(*(c.layers for c in configs)))
    config = LoraConfig(
        r=new_rank,
        alpha=new_rank,
        dropout=configs[0].dropout,
        target_modules=sorted({_target(a_keys) for a_keys, _ in modules}),
        layers=layers,
        dtype=configs[0].dtype,
    )
    return unflatten(flat), config
