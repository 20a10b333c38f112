"""`init`: the parameter-tree transform that adds `lora_a` / `lora_b` (and DoRA's
`lora_magnitude`) beside kernels."""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jlora.config import LoraConfig, suffix_match
from jlora.merge import weight_norm
from jlora.spec import InterleavedKernel, KernelSpec
from jlora.tree import LORA_A, LORA_B, LORA_MAGNITUDE, Keys, PyTree, flatten, path_str, unflatten


def init(
    params: PyTree,
    config: LoraConfig,
    key: jax.Array,
    specs: Mapping[str, KernelSpec | InterleavedKernel] | None = None,
) -> dict:
    """Add adapters beside every targeted kernel; the model's outputs do not change.

    With ``init="lora"`` or ``"gaussian"``, B = 0 and the kernels are untouched. With a
    base-changing init (``"pissa"``, ``"pissa_niter_N"``, ``"olora"``; `LoraConfig.init`)
    A and B come from each kernel, which is replaced by the residual ``W - s·A·B`` (computed
    in float32, cast to W's dtype): keep the returned tree, base included, and pass it as
    `initial` to `jlora.peft.export` to write an adapter for the original base.

    With `use_dora`, each module also gets DoRA's ``lora_magnitude: (*stack, *out)``, the norm
    of ``W + s·A·B`` (W itself at B = 0) over the input axes per output feature, as peft
    initialises it (a quantized W is dequantized for it; init a QLoRA run after quantizing,
    so that m is the norm of the weight the model uses).

    Args:
      params: a Linen ``params`` collection or the pure dict of an NNX state.
      config: what to adapt.
      key: PRNG key for A. Each module's A depends only on this key and its path.
      specs: kernel layouts from `kernel_specs(model, *inputs)`; needed for kernels that
        are not plain 2-D ``(in, out)`` matrices (DenseGeneral, Einsum, scanned layers).

    Returns the tree with ``lora_a: (*stack, *in, r)`` and ``lora_b: (*stack, r, *out)``
    beside each targeted ``kernel: (*stack, *in, *out)`` (the residual, if the init changes it).
    """
    if set(params) == {"params"}:
        raise ValueError("init: got a variables dict; pass its 'params' collection: variables['params']")
    flat = flatten(params)
    if any(keys[-1] in (LORA_A, LORA_B) for keys in flat):
        raise ValueError("init: params already hold LoRA adapters; merge or split them off first")
    kernels = {keys[:-1]: leaf for keys, leaf in flat.items() if keys[-1] == "kernel"}
    _check_modules_to_save(flat, config)
    targets = [keys for keys in kernels if config.targets(path_str(keys))]
    if not targets:
        raise _no_target_error(flat, kernels, config)
    _check_pattern_keys(config, targets)
    for keys in targets:
        path, kernel = path_str(keys), kernels[keys]
        spec = _resolve_spec(path, kernel.shape, specs)
        layers = _selected_layers(path, spec, kernel.shape, config)
        if layers is None:
            continue
        r = config.rank(path)
        fan_in, fan_out = spec.fan_in_out(kernel.shape)
        if r > min(fan_in, fan_out):
            raise ValueError(
                f"init: rank {r} for {path} exceeds min(in, out) = min({fan_in}, {fan_out}); "
                "lower r or use rank_pattern"
            )
        module_key = jax.random.fold_in(key, zlib.crc32(path.encode()))
        if config.changes_base:
            a, b, residual = _from_kernel(path, kernel, spec, r, config.scale(path, r), config, module_key)
        else:
            a_shape, b_shape = spec.adapter_shapes(kernel.shape, r)
            a, b, residual = _init_a(module_key, a_shape, fan_in, r, config), jnp.zeros(b_shape, config.dtype), kernel
        if layers is not True:  # a subset of a stacked layer axis: the rest stay A = B = 0 on their kernel
            a, b = _on_layers(layers, a, 0), _on_layers(layers, b, 0)
            if config.changes_base:
                residual = _on_layers(layers, residual, kernel)
        flat[(*keys, LORA_A)], flat[(*keys, LORA_B)], flat[(*keys, "kernel")] = a, b, residual
        if config.use_dora:
            flat[(*keys, LORA_MAGNITUDE)] = weight_norm(residual, a, b, config.scale(path, r)).astype(config.dtype)
    return unflatten(flat)


def _init_a(key: jax.Array, shape: tuple[int, ...], fan_in: int, r: int, config: LoraConfig) -> jax.Array:
    if config.init == "gaussian":  # peft: normal with std 1/r
        return jax.random.normal(key, shape, config.dtype) / r
    # peft: kaiming_uniform_(a=sqrt(5)) on A (r, in), i.e. U(-1/sqrt(in), 1/sqrt(in))
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, config.dtype, -bound, bound)


def _on_layers(layers: list[int], new: jax.Array, old) -> jax.Array:
    """`new` on the `layers` of the leading stacked axis, `old` on the others."""
    keep = jnp.zeros(new.shape[0], bool).at[jnp.asarray(layers, int)].set(True)
    return jnp.where(keep.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)


def _mm(x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST)


def _t(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def _orthonormal(x: jax.Array) -> jax.Array:
    return jnp.linalg.qr(x)[0]


def _svd_lowrank(w: jax.Array, r: int, niter: int, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(u, s, vh)`` with ``w ≈ u·diag(s)·vh`` of rank `r` by randomized SVD with `niter` subspace
    iterations: torch.svd_lowrank(q=r) (Halko et al. 2009, Algorithm 5.1), which peft's
    ``pissa_niter_N`` uses, batched over leading axes. Draws its own Gaussian, so it equals
    torch's up to how far the iterations converge, not bit for bit."""
    wide = w.shape[-2] < w.shape[-1]
    x = _t(w) if wide else w  # work on the tall one, as torch does
    q = _orthonormal(_mm(x, jax.random.normal(key, (*x.shape[:-2], x.shape[-1], r), x.dtype)))
    for _ in range(niter):
        q = _orthonormal(_mm(x, _orthonormal(_mm(_t(x), q))))
    u, s, vh = jnp.linalg.svd(_mm(_t(q), x), full_matrices=False)
    u = _mm(q, u)
    return (_t(vh), s, _t(u)) if wide else (u, s, vh)


def _from_kernel(
    path: str, kernel, spec: KernelSpec, r: int, scale: float, config: LoraConfig, key: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(A, B, W - s·A·B)`` from the kernel W itself, as peft's ``pissa_init`` / ``olora_init``
    (in peft's (out, in) terms: PiSSA A = sqrt(S_r / s)·Vh_r, B = U_r·sqrt(S_r / s), so that
    s·B·A is W's best rank-r part; OLoRA W = Q·R, A = R[:r], B = Q[:, :r]), per stacked layer."""
    if not isinstance(kernel, jax.Array | np.ndarray):
        raise ValueError(
            f"init: init={config.init!r} decomposes the kernel {path}, which is {type(kernel).__name__}: "
            "initialise from the float base, then quantize the residual (as peft advises for PiSSA)"
        )
    stack = kernel.shape[: spec.stack]
    w = jnp.asarray(kernel, jnp.float32).reshape(*stack, *spec.fan_in_out(kernel.shape))  # jlora's (in, out)
    if config.init == "olora":
        q, upper = jnp.linalg.qr(_t(w))  # peft's (out, in) weight
        a, b = _t(upper[..., :r, :]), _t(q[..., :r])
    else:
        if config.init == "pissa":
            u, s, vh = jnp.linalg.svd(w, full_matrices=False)
        else:
            u, s, vh = _svd_lowrank(w, r, int(config.init.removeprefix("pissa_niter_")), key)
        root = jnp.sqrt(s[..., :r] / scale)
        a, b = u[..., :r] * root[..., None, :], root[..., :, None] * vh[..., :r, :]
    a_shape, b_shape = spec.adapter_shapes(kernel.shape, r)
    a, b = a.astype(config.dtype), b.astype(config.dtype)
    residual = w - scale * _mm(a.astype(jnp.float32), b.astype(jnp.float32))
    return a.reshape(a_shape), b.reshape(b_shape), residual.reshape(kernel.shape).astype(kernel.dtype)


def _resolve_spec(path: str, shape: tuple[int, ...], specs) -> KernelSpec:
    spec = (specs or {}).get(path)
    if isinstance(spec, InterleavedKernel):
        raise spec.error()
    if spec is None:
        if len(shape) != 2:
            hint = (
                "specs were given but do not cover it"
                if specs
                else "pass specs=jlora.kernel_specs(model, *example_inputs)"
            )
            raise ValueError(
                f"init: kernel {path} has shape {shape}; only a 2-D kernel is evidently (in, out). "
                f"Its input/output/stacked axes must be learned from the model: {hint}"
            )
        return KernelSpec(0, 1, 1)
    if spec.ndim != len(shape):
        raise ValueError(f"init: spec {spec} for {path} does not fit its kernel of shape {shape}")
    return spec


def _selected_layers(path: str, spec: KernelSpec, shape, config: LoraConfig):
    """True (all of it), None (skip the module), or the selected indices of a stacked axis."""
    if config.layers is None:
        return True
    index = config.layer_index(path)
    if index is not None:
        return True if index in config.layers else None
    if spec.stack == 0:
        return None  # outside numbered layers: peft's layers_to_transform skips it too
    if spec.stack > 1:
        raise ValueError(f"init: {path} has {spec.stack} stacked axes; `layers` can select along one only")
    chosen = [i for i in config.layers if i < shape[0]]
    if len(chosen) != len(config.layers):
        raise ValueError(f"init: layers {config.layers} out of range for {path}, which stacks {shape[0]} layers")
    return chosen


def _check_modules_to_save(flat: Mapping[Keys, object], config: LoraConfig) -> None:
    modules = {path_str(keys[:i]) for keys in flat for i in range(1, len(keys))}
    if config.modules_to_save and not any(config.saves(m) for m in modules):
        raise ValueError(f"init: modules_to_save {list(config.modules_to_save)} match no module")


def _no_target_error(flat: Mapping[Keys, object], kernels, config: LoraConfig) -> ValueError:
    listing = "\n  ".join(path_str(keys) for keys in kernels) or "(none)"
    message = f"init: target_modules {config.target_modules!r} match no kernel."
    modules = sorted({path_str(keys[:i]) for keys in flat for i in range(1, len(keys))})
    kernel_less = [m for m in modules if config.targets(m)]
    if kernel_less:
        message += (
            f" They match {kernel_less}, which hold no `kernel` (embeddings and norms are not LoRA "
            "targets): train those fully with modules_to_save."
        )
    return ValueError(f"{message} Kernels:\n  {listing}")


def _check_pattern_keys(config: LoraConfig, targets: list[Keys]) -> None:
    paths = [path_str(keys) for keys in targets]
    for field in ("rank_pattern", "alpha_pattern"):
        for key in getattr(config, field):
            if not any(suffix_match(key, path) for path in paths):
                raise ValueError(f"init: {field} key {key!r} matches none of the adapted modules {paths}")
