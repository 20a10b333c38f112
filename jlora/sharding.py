"""Sharding: device meshes from a spec, logical-axis rules, and adapter shardings derived
from their kernels'.

One mesh, three axes: ``data`` (batch only), ``fsdp`` (batch and the parameters' ``embed``
axis) and ``tensor`` (heads, MLP width, vocabulary). A mesh axis of size 1 costs nothing,
so the same rules give data parallel (``data=8``), FSDP (``fsdp=8``), tensor parallel
(``tensor=8``) and any mix (``data=2,fsdp=2,tensor=2``). A dimension whose size the mesh
axes do not divide is replicated instead.

Adapters follow their kernel: for a kernel ``(*stack, *in, *out)`` sharded
``P(*s, *i, *o)``, ``lora_a (*stack, *in, r)`` gets ``P(*s, *i, None)`` and
``lora_b (*stack, r, *out)`` gets ``P(*s, None, *o)``: the rank axis is replicated, and
x·A·B needs no more communication than x·W. A quantized kernel's arrays split as its
kernel would (`jlora.quantize.partition_specs`), and its adapters follow the kernel's spec.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jlora import interpret, quantize
from jlora.spec import adapter_spec
from jlora.tree import LORA_A, LORA_MAGNITUDE, PyTree, flatten, is_adapter, path_str, unflatten

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")
# logical axis name -> mesh axes (the models' names: see jlora.models)
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", None),
)


def parse_mesh(spec: str | Mapping[str, int], n_devices: int) -> dict[str, int]:
    """``"data=2,fsdp=2,tensor=2"`` (or a dict) -> axis sizes over all three axes; one size
    may be -1 ("the rest"), absent axes are 1."""
    if isinstance(spec, str):
        sizes = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, _, value = part.partition("=")
            try:
                sizes[name.strip()] = int(value)
            except ValueError:
                raise ValueError(f"mesh spec {spec!r}: {part!r} is not axis=size, e.g. data=2,tensor=4") from None
    else:
        sizes = dict(spec)
    unknown = sorted(set(sizes) - set(AXES))
    if unknown:
        raise ValueError(f"mesh spec {spec!r}: unknown axes {unknown}; the axes are {', '.join(AXES)}")
    rest = [name for name, size in sizes.items() if size == -1]
    if len(rest) > 1 or any(size < 1 and size != -1 for size in sizes.values()):
        raise ValueError(f"mesh spec {spec!r}: sizes must be >= 1, with at most one -1")
    known = math.prod(size for size in sizes.values() if size != -1)
    if rest:
        if n_devices % known:
            raise ValueError(f"mesh spec {spec!r}: {n_devices} devices do not split into {known} × the rest")
        sizes[rest[0]] = n_devices // known
    full = {name: sizes.get(name, 1) for name in AXES}
    if math.prod(full.values()) != n_devices:
        raise ValueError(
            f"mesh spec {spec!r} has {math.prod(full.values())} devices, but there are {n_devices}; "
            "use -1 for one axis to take the rest"
        )
    return full


def make_mesh(spec: str | Mapping[str, int] = "data=-1", devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh of Auto axes over `devices` (default: all of them,
    across every process), laid out by `jax.make_mesh` for the hardware's topology."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec, len(devices))
    return jax.make_mesh(
        tuple(sizes.values()), AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES), devices=devices
    )


def logical_specs(model: nn.Module, *inputs) -> PyTree:
    """The logical `PartitionSpec` of every parameter of a Linen model whose parameters carry
    axis names (`nn.with_logical_partitioning`), by an abstract `init` (no FLOPs)."""
    boxed = jax.eval_shape(lambda *xs: model.init(jax.random.key(0), *xs), *inputs)["params"]
    return nn.get_partition_spec(boxed)


def _resolve(logical: P, shape: Sequence[int], axis_sizes: Mapping[str, int], rules: Sequence[tuple[str, Any]]) -> P:
    """A logical spec -> a mesh spec, replicating a dimension the mesh axes do not divide
    and never using a mesh axis twice."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name, size in zip(tuple(logical) + (None,) * (len(shape) - len(logical)), shape, strict=True):
        axes = table.get(name) if name is not None else None
        axes = tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ()) if a not in used)
        axes = tuple(a for a in axes if axis_sizes[a] > 1)
        if not axes or size % math.prod(axis_sizes[a] for a in axes):
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return P(*out)


def partition_specs(
    params: PyTree, specs: PyTree, axis_sizes: Mapping[str, int], rules: Sequence[tuple[str, Any]] = RULES
) -> PyTree:
    """Mesh `PartitionSpec`s for `params` (arrays or shapes) from their logical `specs` (a
    tree over the same paths, e.g. `logical_specs`; leaves missing from it are replicated),
    for a mesh of `axis_sizes` (``mesh.shape``; no devices needed). A quantized leaf gets a
    spec per array, `jlora.quantize.partition_specs` of its kernel's."""
    flat_specs = flatten(specs) if specs is not None else {}
    out = {}
    for keys, leaf in flatten(params).items():
        spec = _resolve(flat_specs.get(keys, P()), leaf.shape, axis_sizes, rules)
        out[keys] = quantize.partition_specs(leaf, spec, axis_sizes) if quantize.is_quantized(leaf) else spec
    return unflatten(out)


def param_shardings(params: PyTree, specs: PyTree, mesh: Mesh, rules: Sequence[tuple[str, Any]] = RULES) -> PyTree:
    """`NamedSharding`s on `mesh` for `params`, as `partition_specs` says."""
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec),
        partition_specs(params, specs, dict(mesh.shape), rules),
        is_leaf=_is_spec,
    )


def adapter_specs(params: PyTree, specs: PyTree, layouts: Mapping[str, Any] | None = None) -> PyTree:
    """`PartitionSpec`s for every leaf of an adapted tree `params`: each adapter takes its
    weight's, as the module docstring says (N-D and stacked kernels too), DoRA's
    `lora_magnitude` its output axes'; every other leaf keeps its own from `specs` (a tree
    over the base parameters' paths). A kernel's layout is read from the shapes; a weight
    under `jlora.interpret`'s naming rule (``w_lora_a``) needs its own from `layouts`
    (``jlora.interpret.lora_specs``: ``{weight path: LeafSpec}``). Kernels are read
    unquantized: for a quantized tree, pass the shapes it stands for
    (``jax.eval_shape(jlora.quantize.dequantize_tree, params)``) and their specs."""
    flat, given = flatten(params), flatten(specs)
    out = {}
    for keys in flat:
        if not is_adapter(keys[-1]):
            if keys not in given:
                raise ValueError(f"adapter_specs: no PartitionSpec for {path_str(keys)}")
            out[keys] = given[keys]
    for weight, (a_keys, b_keys) in interpret.adapters_of(params).items():
        shape, path = flat[weight].shape, path_str(weight)
        if a_keys[-1] == LORA_A:
            layout = adapter_spec(shape, flat[a_keys].shape, flat[b_keys].shape)
            roles = "s" * layout.stack + "i" * layout.n_in + "o" * layout.n_out
        elif layouts is not None and path in layouts:
            roles = getattr(layouts[path], "roles", layouts[path])
        else:
            raise ValueError(f"adapter_specs: {path}'s layout is known only from its function; pass layouts=lora_specs")
        spec = tuple(given[weight]) + (None,) * len(shape)
        a_axes, b_axes = interpret.LeafSpec(roles).factor_axes()
        out[a_keys] = P(*(spec[k] for k in a_axes), None)
        out[b_keys] = P(*(None if k is None else spec[k] for k in b_axes))
        magnitude = (*weight[:-1], LORA_MAGNITUDE)
        if magnitude in flat:  # DoRA's: one per output feature
            out[magnitude] = P(*(spec[k] for k, role in enumerate(roles) if role != "i"))
    return unflatten(out)


def adapter_shardings(params: PyTree, shardings: PyTree) -> PyTree:
    """`adapter_specs` over `NamedSharding`s (of the base parameters) on one mesh."""
    leaves = jax.tree.leaves(shardings)
    mesh = leaves[0].mesh
    specs = jax.tree.map(lambda s: s.spec, shardings)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), adapter_specs(params, specs), is_leaf=_is_spec)


def _is_spec(x) -> bool:
    return isinstance(x, P)


def opt_state_shardings(tx: optax.GradientTransformation, adapters: PyTree, shardings: PyTree, mesh: Mesh) -> PyTree:
    """Shardings of `tx.init(adapters)`: state that mirrors the adapters (Adam's moments)
    takes their shardings, everything else (step counts) is replicated."""
    state = jax.eval_shape(tx.init, adapters)
    replicated = NamedSharding(mesh, P())
    return optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        state,
        shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
    """Arrays split over the data axes (``data`` and ``fsdp``) along `batch_axis`."""
    spec = [None] * ndim
    spec[batch_axis] = tuple(a for a in BATCH if mesh.shape[a] > 1) or None
    return NamedSharding(mesh, P(*spec))


def local_rows(mesh: Mesh, shape: Sequence[int], batch_axis: int = 0) -> np.ndarray:
    """Indices along `batch_axis` of the rows this process's devices hold in a batch of
    global `shape`: what a multi-host data loader reads, and nothing more."""
    sharding = batch_sharding(mesh, len(shape), batch_axis)
    rows = set()
    for index in sharding.addressable_devices_indices_map(tuple(shape)).values():
        rows.update(range(*index[batch_axis].indices(shape[batch_axis])))
    return np.array(sorted(rows))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, global_size: int, batch_axis: int = 0) -> dict:
    """This process's rows of a batch (`local_rows`; all of them on one host) -> global
    arrays of `global_size` rows, split over the data axes."""
    out = {}
    for name, array in batch.items():
        shape = list(array.shape)
        shape[batch_axis] = global_size
        sharding = batch_sharding(mesh, array.ndim, batch_axis)
        out[name] = jax.make_array_from_process_local_data(sharding, array, tuple(shape))
    return out
