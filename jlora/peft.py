"""The Hugging Face PEFT adapter format, both ways: ``adapter_config.json`` +
``adapter_model.safetensors``, as peft, vLLM and TGI load it.

Keys are ``base_model.model.<module>.lora_A.weight`` with shape (r, in) and
``….lora_B.weight`` with shape (out, r) (PyTorch's (out, in) layout); `modules_to_save`
parameters are stored under their own names. A jlora kernel ``(*stack, *in, *out)`` has
``lora_a (*stack, *in, r)`` and ``lora_b (*stack, r, *out)``: the export flattens the
input and output axes, transposes, and writes one module per stacked layer.

`module_names` maps a jlora module path (and, for a stacked kernel, the layer index) to
the Hugging Face module name; `jlora.models.hf_module_name` does it for jlora's models.
Only safetensors and JSON are read or written.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping

import numpy as np

from jlora.config import LoraConfig
from jlora.spec import adapter_spec
from jlora.tree import LORA_A, LORA_B, PyTree, adapted_modules, flatten, is_trainable, path_str, unflatten

PREFIX = "base_model.model."
ModuleNames = Callable[[tuple, int | None], str]
# adapter_config fields the importer understands; any other set to a non-default value is refused
SUPPORTED = {
    "peft_type",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "use_rslora",
    "use_dora",
    "bias",
    "fan_in_fan_out",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "task_type",
    "base_model_name_or_path",
    "init_lora_weights",
    "inference_mode",
    "revision",
    "auto_mapping",
    "peft_version",
    "megatron_core",  # read only with megatron_config, which is refused
    "qalora_group_size",  # read only with use_qalora, which is refused
}
# init_lora_weights values whose saved adapters apply to the unchanged base (PiSSA, OLoRA,
# LoftQ, … rewrite the base weights)
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
DEFAULTS = {
    "use_dora": False,
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


def _modules(params: PyTree, config: LoraConfig, module_names: ModuleNames):
    """(HF module name, A, B, jlora path) per adapted module and layer; the layers of a
    stacked kernel that `config.layers` leaves out (A = B = 0) are skipped."""
    for keys, leaves in adapted_modules(params).items():
        kernel, a, b = leaves["kernel"], np.asarray(leaves[LORA_A], np.float32), np.asarray(leaves[LORA_B], np.float32)
        spec = adapter_spec(kernel.shape, a.shape, b.shape)
        if spec.stack > 1:
            raise ValueError(f"{path_str(keys)}: {spec.stack} stacked axes; export handles one")
        for index in range(kernel.shape[0]) if spec.stack else [None]:
            if index is not None and config.layers is not None and index not in config.layers:
                continue
            layer_a, layer_b = (a[index], b[index]) if spec.stack else (a, b)
            yield module_names(keys, index), layer_a, layer_b, path_str(keys)


def export(
    params: PyTree,
    config: LoraConfig,
    out: str | pathlib.Path,
    module_names: ModuleNames,
    *,
    task_type: str = "CAUSAL_LM",
    base_model_name_or_path: str | None = None,
) -> pathlib.Path:
    """Write the adapters (and `modules_to_save`) of `params` as a PEFT directory. Written to
    a temporary folder and renamed: a failure leaves nothing at `out`."""
    from safetensors.numpy import save_file

    out = pathlib.Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new folder")
    tensors: dict[str, np.ndarray] = {}
    ranks, alphas = {}, {}
    for name, a, b, path in _modules(params, config, module_names):
        r = a.shape[-1]
        tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, r).T)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b.reshape(r, -1).T)
        ranks[name] = r
        alphas[name] = config.scale(path, r) * (math.sqrt(r) if config.use_rslora else r)
    if not tensors:
        raise ValueError("params hold no adapters to export")
    saved = {k: v for k, v in flatten(params).items() if k[-1] not in (LORA_A, LORA_B) and is_trainable(k, config)}
    for keys, value in saved.items():  # modules_to_save: full parameters under their own names
        tensors.update(_saved_tensors(keys, np.asarray(value, np.float32), module_names))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in ranks}),
        "use_rslora": config.use_rslora,
        "rank_pattern": {re_exact(n): r for n, r in ranks.items() if r != config.r},
        "alpha_pattern": {re_exact(n): a for n, a in alphas.items() if not math.isclose(a, config.alpha)},
        "modules_to_save": sorted({module_names(k[:-1], None).rsplit(".", 1)[-1] for k in saved}) or None,
        "layers_to_transform": list(config.layers) if config.layers is not None else None,
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (staging / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
        save_file(tensors, staging / "adapter_model.safetensors", metadata={"format": "pt"})
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def re_exact(name: str) -> str:
    """A peft pattern key that matches module `name` only (peft matches ``(.*\\.)?key$``)."""
    return name.replace(".", r"\.")


def _saved_tensors(keys: tuple, value: np.ndarray, module_names: ModuleNames) -> dict[str, np.ndarray]:
    """A `modules_to_save` parameter in PyTorch's layout: kernels transposed, embeddings as
    they are, everything else (biases, norm scales) flat."""
    if keys[-1] == "kernel":
        if value.ndim != 2:
            raise ValueError(f"{path_str(keys)}: modules_to_save export handles 2-D kernels, got {value.shape}")
        value = value.T
    elif keys[-1] != "embedding":
        value = value.reshape(-1)
    return {f"{PREFIX}{module_names(keys[:-1], None)}.{_leaf_name(keys[-1])}": np.ascontiguousarray(value)}


def load(directory: str | pathlib.Path, params: PyTree, module_names: ModuleNames) -> tuple[dict, LoraConfig]:
    """Read a PEFT LoRA directory into `params` (a base tree of jlora's layout): returns the
    tree with adapters (and `modules_to_save` values) and the matching `LoraConfig`.

    Every field the importer cannot honour (DoRA, biases, fan_in_fan_out, …), every
    adapter whose module the model lacks, and every tensor whose shape disagrees with the
    config or the model is an error naming it. Nothing is written."""
    directory = pathlib.Path(directory)
    peft_config, tensors = read(directory)
    flat = flatten(params)
    kernels = {keys[:-1]: leaf for keys, leaf in flat.items() if keys[-1] == "kernel"}
    by_name: dict[str, tuple[tuple, int | None]] = {}
    for keys, kernel in kernels.items():
        stacked = module_names(keys, 0) != module_names(keys, None)  # the name needs a layer: a scanned stack
        for index in range(kernel.shape[0]) if stacked else [None]:
            by_name[module_names(keys, index)] = (keys, index)
    layers = peft_config.get("layers_to_transform")
    layers = [layers] if isinstance(layers, int) else layers
    factors: dict[tuple, dict[int | None, tuple[np.ndarray, np.ndarray]]] = {}
    ranks, alphas = {}, {}
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
        if layers is not None and layer not in layers:
            raise ValueError(f"{directory}: {name} is outside layers_to_transform={layers}")
        n_in = _inputs(shape, a.shape[1], b.shape[0], name)
        factors.setdefault(keys, {})[index] = (a.T.reshape(*shape[:n_in], r), b.T.reshape(r, *shape[n_in:]))
        ranks[path_str(keys)] = r
        alpha = float(peft_config["lora_alpha"])
        alphas[path_str(keys)] = _pattern_value(peft_config.get("alpha_pattern"), name, alpha)
    if not factors:
        raise ValueError(f"{directory}: adapter_model.safetensors holds no lora_A / lora_B tensors")
    for keys, per_layer in factors.items():
        if None in per_layer:
            a, b = per_layer[None]
        else:  # a stacked kernel: layers absent from the file get A = B = 0, an exact no-op
            a0, b0 = next(iter(per_layer.values()))
            stacked = [per_layer.get(i, (np.zeros_like(a0), np.zeros_like(b0))) for i in range(kernels[keys].shape[0])]
            a, b = np.stack([x for x, _ in stacked]), np.stack([y for _, y in stacked])
        flat[(*keys, LORA_A)], flat[(*keys, LORA_B)] = a.astype(np.float32), b.astype(np.float32)
    leaves = {(module_names(k[:-1], None), _leaf_name(k[-1])): k for k in flat if k[-1] not in (LORA_A, LORA_B)}
    saved_modules = set()
    for key, value in tensors.items():  # modules_to_save: full parameters under their own names
        if key in used:
            continue
        target = leaves.get(tuple(key.removeprefix(PREFIX).rsplit(".", 1)))
        if target is None:
            raise ValueError(f"{directory}: tensor {key!r} matches nothing in the model")
        value = value.T if target[-1] == "kernel" else value
        if value.size != flat[target].size or (target[-1] == "kernel" and value.shape != flat[target].shape):
            raise ValueError(
                f"{directory}: {key} has shape {value.shape}; the model's {path_str(target)} is {flat[target].shape}"
            )
        flat[target] = value.reshape(flat[target].shape).astype(np.float32)
        saved_modules.add(str(target[-2]))
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
    )
    return unflatten(flat), config


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
    if peft_config.get("peft_type") != "LORA":
        raise ValueError(f"{directory}: peft_type {peft_config.get('peft_type')!r} is not LORA")
    for field in ("r", "lora_alpha"):
        if field not in peft_config:
            raise ValueError(f"{config_file} has no {field!r}")
    for field, default in DEFAULTS.items():
        if field in peft_config and peft_config[field] not in (default, None, {}, [], False):
            raise ValueError(f"{directory}: adapter_config field {field}={peft_config[field]!r} is not supported")
    if peft_config.get("init_lora_weights", True) not in PLAIN_INITS:
        raise ValueError(
            f"{directory}: init_lora_weights={peft_config['init_lora_weights']!r} changes the base weights; "
            "convert the adapter to a plain LoRA with peft (save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...)) first"
        )
    unknown = sorted(k for k, v in peft_config.items() if k not in SUPPORTED and k not in DEFAULTS and v)
    if unknown:
        raise ValueError(f"{directory}: adapter_config fields {unknown} are not supported")
    try:
        tensors = load_file(weights_file)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights_file} is not a readable safetensors file (truncated or corrupt?): {err}") from None
    return peft_config, tensors


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
    """peft's rank_pattern / alpha_pattern lookup: a key matches names ending in it."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?{key}$", name):
            return type(default)(value)
    return default


def _layer_of(name: str) -> int | None:
    """The layer index in a Hugging Face module name (``model.layers.3.self_attn.q_proj``)."""
    found = re.findall(r"\.(?:layers|layer|h|blocks?)\.(\d+)\.", f".{name}.")
    return int(found[-1]) if found else None
