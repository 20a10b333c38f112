"""The Hugging Face PEFT adapter format, both ways: ``adapter_config.json`` +
``adapter_model.safetensors``, as peft, vLLM and TGI load it.

Keys are ``base_model.model.<module>.lora_A.weight`` with shape (r, in) and
``….lora_B.weight`` with shape (out, r) (PyTorch's (out, in) layout), with DoRA (``use_dora``)
``….lora_magnitude_vector`` of shape (out,); `modules_to_save` parameters are stored under
their own names. A jlora kernel ``(*stack, *in, *out)`` has
``lora_a (*stack, *in, r)`` and ``lora_b (*stack, r, *out)``: the export flattens the
input and output axes, transposes, and writes one module per stacked layer.

`module_names` maps a jlora module path (and, for a stacked kernel, the layer index) to
the Hugging Face module name; `jlora.models.hf_module_name` does it for jlora's models.
Only safetensors and JSON are read or written.

What a tree cannot hold is refused by name, never approximated: per-layer ranks or alphas
in a scanned stack (one per stacked module: load the model unscanned), and on a tied model
(no ``lm_head``, the output reuses the embedding) an embedding or head that peft saved
apart (peft applies a saved embedding to the input only unless ``ensure_weight_tying``).
"""

from __future__ import annotations

import json
import math
import pathlib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from jlora.config import LoraConfig
from jlora.merge import weight_norm
from jlora.spec import adapter_spec
from jlora.staging import staged
from jlora.tree import (
    ADAPTER_LEAVES,
    LORA_A,
    LORA_B,
    LORA_MAGNITUDE,
    PyTree,
    adapted_modules,
    flatten,
    is_trainable,
    path_str,
    unflatten,
)

PREFIX = "base_model.model."
MAGNITUDE = "lora_magnitude_vector"  # peft's name of DoRA's magnitude, (out,), beside lora_A / lora_B
ModuleNames = Callable[[tuple, int | None], str]
Location = tuple[tuple, int | None]  # (jlora keys, layer index in a scanned stack or None)
# Hugging Face names of an output projection and of the input embedding that a model without the
# former uses in its place (tie_word_embeddings)
TIED = {"lm_head.weight": "model.embed_tokens.weight"}


def _is_int(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(name, str) and name for name in value)


def _is_regex(value: Any) -> bool:
    try:
        re.compile(value)
    except (re.error, TypeError):
        return False
    return isinstance(value, str)


def _pattern_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, dict) and all(_is_regex(k) and check(v) for k, v in value.items())


def _or_null(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


def _is_a(kind: type) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, kind)


# adapter_config.json: field -> (what it must be, check). A table rather than jsonschema: no extra
# dependency for a flat object of ~20 fields, and each failure is one line naming the file, the
# field and what it must be. Fields in neither this table nor DEFAULTS are refused unless empty.
SCHEMA: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "peft_type": ('"LORA"', lambda value: value == "LORA"),
    "r": ("an integer >= 1", lambda value: _is_int(value, 1)),
    "lora_alpha": ("a number > 0", lambda value: _is_number(value) and value > 0),
    "lora_dropout": ("a number in [0, 1)", _or_null(lambda value: _is_number(value) and 0 <= value < 1)),
    "target_modules": (
        "a list of module names or a regular expression",
        _or_null(lambda v: _is_names(v) or _is_regex(v)),
    ),
    "use_rslora": ("true or false", _or_null(_is_a(bool))),
    "modules_to_save": ("a list of module names", _or_null(_is_names)),
    "layers_to_transform": (
        "a layer index or a list of them",
        _or_null(lambda v: _is_int(v) or (isinstance(v, list) and all(_is_int(i) for i in v))),
    ),
    "layers_pattern": ("a regular expression or a list of names", _or_null(lambda v: _is_regex(v) or _is_names(v))),
    "rank_pattern": ("an object {regex: integer >= 1}", _or_null(_pattern_of(lambda v: _is_int(v, 1)))),
    "alpha_pattern": ("an object {regex: number > 0}", _or_null(_pattern_of(lambda v: _is_number(v) and v > 0))),
    "init_lora_weights": ("true, false or an initialisation's name", _is_a(bool | str)),
    "use_dora": ("true or false", _or_null(_is_a(bool))),
    "ensure_weight_tying": ("true or false", _or_null(_is_a(bool))),
    "inference_mode": ("true or false", _or_null(_is_a(bool))),
    "task_type": ("a string", _or_null(_is_a(str))),
    "base_model_name_or_path": ("a string", _or_null(_is_a(str))),
    "revision": ("a string", _or_null(_is_a(str))),
    "peft_version": ("a string", _or_null(_is_a(str))),
    "auto_mapping": ("an object", _or_null(_is_a(dict))),
    "megatron_core": ("a string", _or_null(_is_a(str))),  # read only with megatron_config, which is refused
    "qalora_group_size": ("an integer", _or_null(_is_int)),  # read only with use_qalora, which is refused
}
# init_lora_weights values whose saved adapters apply to the unchanged base (PiSSA, OLoRA,
# LoftQ, … rewrite the base weights)
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
# fields the importer accepts at their default (or empty) only
DEFAULTS = {
    "bias": "none",
    "fan_in_fan_out": False,
    "exclude_modules": None,
    "use_qalora": False,
    "lora_bias": False,
    "target_parameters": None,
    "trainable_token_indices": None,
    "layer_replication": None,
    "megatron_config": None,
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "alora_invocation_tokens": None,
    "arrow_config": None,
}


def _modules(params: PyTree, config: LoraConfig, module_names: ModuleNames, initial: PyTree | None = None):
    """(HF module name, A, B, scale, DoRA magnitude or None) per adapted module and layer; the
    layers of a stacked kernel that `config.layers` leaves out (A = B = 0) are skipped. With
    `initial` (the tree `init` returned), A and B are converted as `_with_initial` says (a
    magnitude stays: the converted W + ΔW, hence its norm, is the trained one)."""
    starts = adapted_modules(initial) if initial is not None else None
    for keys, leaves in adapted_modules(params).items():
        kernel, a, b = leaves["kernel"], np.asarray(leaves[LORA_A], np.float32), np.asarray(leaves[LORA_B], np.float32)
        spec = adapter_spec(kernel.shape, a.shape, b.shape)
        if spec.stack > 1:
            raise ValueError(f"{path_str(keys)}: {spec.stack} stacked axes; export handles one")
        if (LORA_MAGNITUDE in leaves) != config.use_dora:
            raise ValueError(
                f"export: {path_str(keys)} {'has' if LORA_MAGNITUDE in leaves else 'lacks'} a DoRA magnitude "
                f"({LORA_MAGNITUDE}) but the config has use_dora={config.use_dora}"
            )
        m = np.asarray(leaves[LORA_MAGNITUDE], np.float32) if config.use_dora else None
        scale = config.scale(path_str(keys), a.shape[-1])
        if starts is not None:
            a, b = _with_initial(keys, a, b, spec.stack, starts.get(keys))
        for index in range(kernel.shape[0]) if spec.stack else [None]:
            if index is not None and config.layers is not None and index not in config.layers:
                continue
            layer_a, layer_b, layer_m = (x[index] if spec.stack and x is not None else x for x in (a, b, m))
            yield module_names(keys, index), layer_a, layer_b, scale, layer_m


def _with_initial(keys: tuple, a: np.ndarray, b: np.ndarray, stack: int, start: Mapping | None):
    """``([A | A0], [B; -B0])``, rank 2r: on the original base W = W_res + s·A0·B0, the trained
    ``W_res + s·A·B`` is ``W + s·(A·B - A0·B0)``, what peft's ``save_pretrained(...,
    path_initial_model_for_weight_conversion=...)`` writes for PiSSA / OLoRA (`subtract_mutated_init`)."""
    if start is None or np.shape(start[LORA_A]) != a.shape or np.shape(start[LORA_B]) != b.shape:
        raise ValueError(
            f"export: initial holds no adapter shaped like {path_str(keys)}'s; pass the tree jlora.init returned"
        )
    a0, b0 = np.asarray(start[LORA_A], np.float32), np.asarray(start[LORA_B], np.float32)
    return np.concatenate([a, a0], axis=-1), np.concatenate([b, -b0], axis=stack)


def export(
    params: PyTree,
    config: LoraConfig,
    out: str | pathlib.Path,
    module_names: ModuleNames,
    *,
    task_type: str = "CAUSAL_LM",
    base_model_name_or_path: str | None = None,
    initial: PyTree | None = None,
) -> pathlib.Path:
    """Write the adapters (and `modules_to_save`) of `params` as a PEFT directory. Written to
    a temporary folder and renamed: a failure leaves nothing at `out`.

    A base-changing init (PiSSA, OLoRA: `config.changes_base`) trained A and B on a residual
    base; `initial`, the tree `jlora.init` returned (its A0, B0), is then required, and the
    adapter is written as peft's converted plain LoRA for the original base: rank 2r,
    ``init_lora_weights: true``, the same scale per module (see `_with_initial`).

    A saved input embedding that the model also uses as its output projection (a tied model,
    no `lm_head` in `params`) is written in both places with ``ensure_weight_tying``, as peft
    saves it: peft then applies it to the input and the output, as jlora did."""
    from safetensors.numpy import save_file

    out = pathlib.Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new folder")
    _check_initial(config, initial)
    width = 1 if initial is None else 2  # rank multiplier of the conversion
    r_all, alpha_all = width * config.r, config.alpha * (math.sqrt(width) if config.use_rslora else width)
    tensors: dict[str, np.ndarray] = {}
    ranks, alphas = {}, {}
    for name, a, b, scale, m in _modules(params, config, module_names, initial):
        r = a.shape[-1]
        tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, r).T)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b.reshape(r, -1).T)
        if m is not None:
            tensors[f"{PREFIX}{name}.{MAGNITUDE}"] = np.ascontiguousarray(m.reshape(-1))
        ranks[name] = r
        alphas[name] = scale * (math.sqrt(r) if config.use_rslora else r)
    if not tensors:
        raise ValueError("params hold no adapters to export")
    flat = flatten(params)
    saved: dict[str, np.ndarray] = {}  # modules_to_save: full parameters under their own names
    for keys, value in flat.items():
        if keys[-1] not in ADAPTER_LEAVES and is_trainable(keys, config):
            saved.update(_saved_tensors(keys, np.asarray(value, np.float32), module_names))
    tensors.update(saved)
    present = set(_leaf_locations(flat, module_names))
    tied = {o: e for o, e in TIED.items() if o not in present and f"{PREFIX}{e}" in tensors}
    tensors.update({f"{PREFIX}{o}": tensors[f"{PREFIX}{e}"] for o, e in tied.items()})
    adapter_config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r_all,
        "lora_alpha": alpha_all,
        "lora_dropout": config.dropout,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in ranks}),
        "use_rslora": config.use_rslora,
        "rank_pattern": {re_exact(n): r for n, r in ranks.items() if r != r_all},
        "alpha_pattern": {re_exact(n): a for n, a in alphas.items() if not math.isclose(a, alpha_all)},
        # full names: peft wraps every module whose name ends with an entry ("norm": input_layernorm too)
        "modules_to_save": _saved_modules(saved, present) or None,
        "layers_to_transform": list(config.layers) if config.layers is not None else None,
        **({"ensure_weight_tying": True} if tied else {}),
        "use_dora": config.use_dora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    with staged(out) as staging:
        (staging / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
        save_file(tensors, staging / "adapter_model.safetensors", metadata={"format": "pt"})
    return out


def _check_initial(config: LoraConfig, initial: PyTree | None) -> None:
    if config.changes_base and initial is None:
        raise ValueError(
            f"export: init={config.init!r} replaced the adapted kernels by a residual, to which these adapters "
            "belong; pass initial= (the tree jlora.init returned) to write them converted for the original base, "
            "as peft's save_pretrained(..., path_initial_model_for_weight_conversion=...) does"
        )
    if initial is not None and not config.changes_base:
        raise ValueError(f"export: initial= converts base-changing inits (PiSSA, OLoRA); init={config.init!r} is not")


def _saved_modules(saved: Iterable[str], leaves: Iterable[str]) -> list[str]:
    """peft's modules_to_save for the saved tensors: per saved parameter, its outermost module
    whose parameters (among the model's `leaves`) are all saved. peft wraps whole modules: a
    head such as RoBERTa's ``classifier`` (``dense``, ``out_proj``) is one entry, which SEQ_CLS
    adapters also name; its parts listed apart would be wrapped twice."""
    names = {name.removeprefix(PREFIX) for name in saved}
    leaves = list(leaves)
    out = set()
    for name in names:
        parts = name.split(".")[:-1]
        ancestors = (".".join(parts[:i]) for i in range(1, len(parts) + 1))
        whole = (a for a in ancestors if all(n in names for n in leaves if n.startswith(f"{a}.")))
        out.add(next(whole, ".".join(parts)))
    return sorted(out)


def re_exact(name: str) -> str:
    """A peft pattern key that matches module `name` only (peft matches ``(.*\\.)?(key)$``)."""
    return name.replace(".", r"\.")


def _saved_tensors(keys: tuple, value: np.ndarray, module_names: ModuleNames) -> dict[str, np.ndarray]:
    """A `modules_to_save` parameter in PyTorch's layout, one tensor per layer of a scanned
    stack: kernels transposed, embeddings as they are, everything else (biases, norm scales) flat."""
    layers = _layers(keys[:-1], value, module_names)
    if layers is not None:
        return {k: v for i in layers for k, v in _saved_tensors_at(keys, value[i], module_names, i).items()}
    return _saved_tensors_at(keys, value, module_names, None)


def _saved_tensors_at(keys: tuple, value: np.ndarray, module_names: ModuleNames, index: int | None) -> dict:
    if keys[-1] == "kernel":
        if value.ndim != 2:
            raise ValueError(f"{path_str(keys)}: modules_to_save export handles 2-D kernels, got {value.shape}")
        value = value.T
    elif keys[-1] != "embedding":
        value = value.reshape(-1)
    return {f"{PREFIX}{module_names(keys[:-1], index)}.{_leaf_name(keys[-1])}": np.ascontiguousarray(value)}


def _layers(module: tuple, leaf, module_names: ModuleNames) -> range | None:
    """The layer indices of a scanned stack's leaf (its name needs a layer), else None."""
    return range(leaf.shape[0]) if module_names(module, 0) != module_names(module, None) else None


def _locations(leaves: Mapping[tuple, Any], module_names: ModuleNames) -> Iterator[tuple[str, Location]]:
    """(Hugging Face module name, (keys, layer)) of each leaf's module, per layer of a stack."""
    for keys, leaf in leaves.items():
        for index in _layers(keys[:-1], leaf, module_names) or [None]:
            yield module_names(keys[:-1], index), (keys, index)


def _leaf_locations(flat: Mapping[tuple, Any], module_names: ModuleNames) -> dict[str, Location]:
    """``{'model.layers.0.input_layernorm.weight': (keys, 0), …}`` for every non-LoRA leaf."""
    leaves = {k: v for k, v in flat.items() if k[-1] not in ADAPTER_LEAVES}
    return {f"{name}.{_leaf_name(at[0][-1])}": at for name, at in _locations(leaves, module_names)}


def load(directory: str | pathlib.Path, params: PyTree, module_names: ModuleNames) -> tuple[dict, LoraConfig]:
    """Read a PEFT LoRA directory into `params` (a base tree of jlora's layout): returns the
    tree with adapters (and `modules_to_save` values) and the matching `LoraConfig`.

    A DoRA adapter (``use_dora``) brings its magnitudes (`LoraConfig.use_dora`); in a scanned
    stack, layers the file leaves out get A = B = 0 and m = ‖W‖, an exact no-op up to rounding.

    Every field the importer cannot honour (biases, fan_in_fan_out, …), every
    adapter whose module the model lacks, every tensor whose shape disagrees with the
    config or the model, per-layer ranks or alphas in a scanned stack (one per stacked
    module), and a saved embedding that a tied model could not apply as peft does are errors
    naming them. Nothing is written."""
    directory = pathlib.Path(directory)
    config_file = directory / "adapter_config.json"
    peft_config, tensors = read(directory)
    flat = flatten(params)
    kernel_leaves = {keys: leaf for keys, leaf in flat.items() if keys[-1] == "kernel"}
    kernels = {keys[:-1]: leaf for keys, leaf in kernel_leaves.items()}
    by_name = {name: (keys[:-1], index) for name, (keys, index) in _locations(kernel_leaves, module_names)}
    layers = peft_config.get("layers_to_transform")
    layers = [layers] if isinstance(layers, int) else layers
    use_dora = bool(peft_config.get("use_dora"))
    factors: dict[tuple, dict[int | None, tuple[np.ndarray, np.ndarray, np.ndarray | None]]] = {}
    settings: dict[tuple, dict[int | None, tuple[int, float]]] = {}
    used = set()
    for key in sorted(tensors):
        if not key.endswith(".lora_A.weight"):
            continue
        name = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
        b_key = f"{PREFIX}{name}.lora_B.weight"
        if name not in by_name:
            raise ValueError(f"{directory}: adapter for {name!r}, which the model does not have")
        if b_key not in tensors:
            raise ValueError(f"{directory}: {key} has no {b_key}")
        keys, index = by_name[name]
        a, b = tensors[key], tensors[b_key]
        used |= {key, b_key}
        kernel = kernels[keys]
        shape = kernel.shape[1:] if index is not None else kernel.shape
        r = _pattern_value(peft_config.get("rank_pattern"), name, int(peft_config["r"]))
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"{directory}: {name}: lora_A {a.shape} and lora_B {b.shape} are not (r, in) and (out, r)")
        if a.shape[0] != r:
            raise ValueError(
                f"{directory}: {name} has rank {a.shape[0]} in the tensors but {r} in adapter_config.json "
                "(r / rank_pattern): the config does not belong to these weights"
            )
        layer = index if index is not None else _layer_of(name)
        # peft adapts a module named in full in target_modules whatever layers_to_transform says
        if layers is not None and layer not in layers and name not in (peft_config.get("target_modules") or ()):
            raise ValueError(f"{directory}: {name} is outside layers_to_transform={layers}")
        n_in = _inputs(shape, a.shape[1], b.shape[0], name)
        m = None
        if use_dora:
            m = _magnitude_tensor(directory, tensors, name, b.shape[0])
            used.add(f"{PREFIX}{name}.{MAGNITUDE}")
        factors.setdefault(keys, {})[index] = (
            a.T.reshape(*shape[:n_in], r),
            b.T.reshape(r, *shape[n_in:]),
            None if m is None else m.reshape(shape[n_in:]),
        )
        alpha = _pattern_value(peft_config.get("alpha_pattern"), name, float(peft_config["lora_alpha"]))
        settings.setdefault(keys, {})[index] = (r, alpha)
    if not factors:
        raise ValueError(f"{directory}: adapter_model.safetensors holds no lora_A / lora_B tensors")
    ranks, alphas = _one_setting_per_module(settings, config_file, module_names)
    magnitudes = {}
    for keys, per_layer in factors.items():
        if None in per_layer:
            a, b, magnitudes[keys] = per_layer[None]
        else:  # a stacked kernel: layers absent from the file get A = B = 0, an exact no-op
            a0, b0, _ = next(iter(per_layer.values()))
            absent = (np.zeros_like(a0), np.zeros_like(b0), None)
            stacked = [per_layer.get(i, absent) for i in range(kernels[keys].shape[0])]
            a, b = np.stack([x for x, _, _ in stacked]), np.stack([y for _, y, _ in stacked])
            magnitudes[keys] = [m for _, _, m in stacked]
        flat[(*keys, LORA_A)], flat[(*keys, LORA_B)] = a.astype(np.float32), b.astype(np.float32)
    saved_modules = _load_saved(directory, {k: v for k, v in tensors.items() if k not in used}, flat, module_names)
    r = int(peft_config["r"])
    config = LoraConfig(
        r=r,
        alpha=float(peft_config["lora_alpha"]),
        dropout=float(peft_config.get("lora_dropout") or 0.0),
        target_modules=sorted({p.rsplit("/", 1)[-1] for p in ranks}),
        layers=layers,
        use_rslora=bool(peft_config.get("use_rslora")),
        rank_pattern={re.escape(p): v for p, v in ranks.items() if v != r},
        alpha_pattern={re.escape(p): v for p, v in alphas.items() if not math.isclose(v, peft_config["lora_alpha"])},
        modules_to_save=sorted(saved_modules),
        use_dora=use_dora,
    )
    if use_dora:
        for keys, m in magnitudes.items():
            flat[(*keys, LORA_MAGNITUDE)] = _stacked_magnitude(m, flat, keys, config)
    return unflatten(flat), config


def _magnitude_tensor(directory: pathlib.Path, tensors: Mapping[str, np.ndarray], name: str, fan_out: int):
    """The DoRA magnitude of module `name`, checked to hold one value per output feature."""
    key = f"{PREFIX}{name}.{MAGNITUDE}"
    if key not in tensors:
        raise ValueError(f"{directory}: adapter_config.json has use_dora=true but {name} has no {key}")
    if tensors[key].shape != (fan_out,):
        raise ValueError(f"{directory}: {key} has shape {tensors[key].shape}; {name} has {fan_out} outputs")
    return tensors[key]


def _stacked_magnitude(m: np.ndarray | list, flat: Mapping, keys: tuple, config: LoraConfig) -> np.ndarray:
    """A module's magnitude as the tree holds it: `m`, or for a scanned stack the per-layer list
    with ‖W‖ (`weight_norm` at A = B = 0) for the layers the file leaves out (None)."""
    if not isinstance(m, list):
        return m.astype(np.float32)
    a, b = flat[(*keys, LORA_A)], flat[(*keys, LORA_B)]
    norms = np.asarray(weight_norm(flat[(*keys, "kernel")], a, b, config.scale(path_str(keys), a.shape[-1])))
    return np.stack([norms[i] if layer is None else layer for i, layer in enumerate(m)]).astype(np.float32)


def _one_setting_per_module(
    settings: Mapping[tuple, Mapping[int | None, tuple[int, float]]],
    config_file: pathlib.Path,
    module_names: ModuleNames,
) -> tuple[dict[str, int], dict[str, float]]:
    """``({path: r}, {path: alpha})``; refuses a scanned stack whose layers differ in rank or
    alpha (`LoraConfig` and the stacked factors hold one per stacked module)."""
    ranks, alphas = {}, {}
    for keys, per_layer in settings.items():
        for field, i in (("rank_pattern", 0), ("alpha_pattern", 1)):
            values = {module_names(keys, layer): v[i] for layer, v in per_layer.items()}
            if len(set(values.values())) > 1:
                raise ValueError(
                    f"{config_file}: {field} gives the layers of the scanned stack {path_str(keys)} different "
                    f"values ({values}); a scanned model holds one per stacked module. Load the model unscanned "
                    "(jlora.models.load(..., scan=False); jlora import-peft --no-scan)"
                )
        ranks[path_str(keys)], alphas[path_str(keys)] = next(iter(per_layer.values()))
    return ranks, alphas


def _load_saved(
    directory: pathlib.Path, tensors: Mapping[str, np.ndarray], flat: dict, module_names: ModuleNames
) -> set[str]:
    """Put the `modules_to_save` tensors (every non-LoRA tensor) into `flat`, a layer of a
    scanned stack at its row; returns the saved modules' paths."""
    at = _leaf_locations(flat, module_names)
    saved = _without_base_copies(directory, {k.removeprefix(PREFIX): v for k, v in tensors.items()}, at, flat)
    saved = _tied(directory, saved, at)
    modules = set()
    for name, value in saved.items():
        if name not in at:
            raise ValueError(f"{directory}: tensor {PREFIX + name!r} matches nothing in the model")
        keys, index = at[name]
        target = np.asarray(flat[keys], np.float32)
        shape = target.shape[1:] if index is not None else target.shape
        value = value.T if keys[-1] == "kernel" else value
        if value.size != math.prod(shape) or (keys[-1] == "kernel" and value.shape != shape):
            raise ValueError(
                f"{directory}: {PREFIX}{name} has shape {value.shape}; the model's {path_str(keys)} is {shape}"
            )
        if index is None:
            target = value.reshape(shape).astype(np.float32)
        else:
            target = target.copy()
            target[index] = value.reshape(shape)
        flat[keys] = target
        modules.add(path_str(keys[:-1]))
    return modules


def _without_base_copies(
    directory: pathlib.Path, saved: Mapping[str, np.ndarray], at: Mapping[str, Location], flat: Mapping
) -> dict[str, np.ndarray]:
    """`saved` less peft's copies of base weights (``lm_head.base_layer.weight``: peft saves them
    for embedding-layer targets, save_embedding_layers="auto"), each checked equal to the model's."""
    out = {}
    for name, value in saved.items():
        if ".base_layer." not in name:
            out[name] = value
            continue
        keys, index = at.get(name.replace(".base_layer.", "."), (None, None))
        if keys is None:
            raise ValueError(f"{directory}: {PREFIX}{name} is peft's copy of a base weight the model does not have")
        model = np.asarray(flat[keys]) if index is None else np.asarray(flat[keys])[index]
        value = value.T if keys[-1] == "kernel" else value
        if value.size != model.size or not np.array_equal(value.reshape(model.shape).astype(model.dtype), model):
            raise ValueError(
                f"{directory}: {PREFIX}{name} is peft's copy of the base weight {path_str(keys)} (saved with "
                "save_embedding_layers for a target such as lm_head) and differs from the model's: the "
                "adapter was made on another base model, or changes its base. Import it over that base"
            )
    return out


def _tied(directory: pathlib.Path, saved: Mapping[str, np.ndarray], at: Mapping[str, Location]) -> dict:
    """`saved` with a tied model's output projection folded into its embedding, refused unless
    peft's semantics hold on the tied model: the embedding saved in both places, equal (peft's
    ``ensure_weight_tying``). Without it peft applies a saved embedding to the input only and a
    saved lm_head to the output only, which one shared matrix cannot do."""
    out = dict(saved)
    for output, embedding in TIED.items():
        if output in at or embedding not in at or not {output, embedding} & saved.keys():
            continue
        if output in saved and embedding in saved and np.array_equal(saved[output], saved[embedding]):
            del out[output]
            continue
        which = " and ".join(f"{n} ({'saved' if n in saved else 'the original'})" for n in (embedding, output))
        raise ValueError(
            f"{directory}: modules_to_save: the model ties {output} to {embedding} (tie_word_embeddings), but "
            f"this adapter gives them different values, {which}: peft keeps them apart, jlora's tied model holds "
            "one matrix for both. Use a base with tie_word_embeddings=False, or save the adapter with "
            "ensure_weight_tying=True"
        )
    return out


def read(directory: pathlib.Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(adapter_config, tensors) of a PEFT directory, checked for what jlora can honour."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    config_file, weights_file = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    if not config_file.exists() or not weights_file.exists():
        raise FileNotFoundError(f"{directory}: expected adapter_config.json and adapter_model.safetensors")
    try:
        peft_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON: {err}") from None
    check_config(peft_config, config_file)
    try:
        tensors = load_file(weights_file)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights_file} is not a readable safetensors file (truncated or corrupt?): {err}") from None
    return peft_config, tensors


def check_config(peft_config: Any, config_file: pathlib.Path) -> None:
    """Raise, naming the field and `config_file`, unless `peft_config` is an adapter_config that
    jlora honours: an object, every field as `SCHEMA` says, `DEFAULTS` fields at their default."""
    if not isinstance(peft_config, dict):
        raise ValueError(f'{config_file} must hold a JSON object ({{"r": …}}), not a {type(peft_config).__name__}')
    for field in ("peft_type", "r", "lora_alpha"):
        if field not in peft_config:
            raise ValueError(f"{config_file} has no {field!r}")
    for field, default in DEFAULTS.items():
        if field in peft_config and peft_config[field] not in (default, None, {}, [], False):
            raise ValueError(f"{config_file}: adapter_config field {field}={peft_config[field]!r} is not supported")
    for field, (what, check) in SCHEMA.items():
        if field in peft_config and not check(peft_config[field]):
            raise ValueError(f"{config_file}: field {field!r} must be {what}, got {peft_config[field]!r}")
    if peft_config.get("init_lora_weights", True) not in PLAIN_INITS:
        raise ValueError(
            f"{config_file}: init_lora_weights={peft_config['init_lora_weights']!r} changes the base weights: its "
            "lora_A / lora_B apply to the residual base peft made, not to this model's weights. Convert the adapter "
            "to a plain LoRA with peft (save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...)) first"
        )
    unknown = sorted(k for k, v in peft_config.items() if k not in SCHEMA and k not in DEFAULTS and v)
    if unknown:
        raise ValueError(f"{config_file}: adapter_config fields {unknown} are not supported")


def _leaf_name(leaf) -> str:
    return {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(str(leaf), str(leaf))


def _inputs(shape: tuple[int, ...], fan_in: int, fan_out: int, name: str) -> int:
    """How many leading kernel axes are inputs, from lora_A's in and lora_B's out sizes."""
    for n_in in range(1, len(shape)):
        if math.prod(shape[:n_in]) == fan_in and math.prod(shape[n_in:]) == fan_out:
            return n_in
    raise ValueError(
        f"adapter for {name!r}: lora_A (r, {fan_in}) / lora_B ({fan_out}, r) do not fit its kernel {shape}"
    )


def _pattern_value(pattern: Mapping | None, name: str, default):
    """peft's rank_pattern / alpha_pattern lookup (`peft.utils.other.get_pattern_key`): the first
    key that matches the end of the name, ``(.*\\.)?(key)$``."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return type(default)(value)
    return default


def _layer_of(name: str) -> int | None:
    """The layer index in a Hugging Face module name (``model.layers.3.self_attn.q_proj``)."""
    found = re.findall(r"\.(?:layers|layer|h|blocks?)\.(\d+)\.", f".{name}.")
    return int(found[-1]) if found else None
