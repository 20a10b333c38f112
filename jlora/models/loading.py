"""Checkpoints -> Flax params: Hugging Face directories (safetensors) and GGUF files.

Both readers produce the same thing: ``{hf tensor name: loader}``, each loader giving one
tensor in PyTorch's layout on demand, so tensors stream one at a time. `assemble` then
walks the parameters the model expects, maps each to its checkpoint name (the Flax path
with '/' -> '.', ``layers_3`` -> ``layers.3``, kernel/scale/embedding -> weight),
converts the layout (Linear weights (out, in) -> kernels (*in, *out)), and checks that
nothing is missing, left over or mis-shaped. Only safetensors and GGUF are read: nothing
is unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jlora
from jlora.models.bert import BertConfig, BertForSequenceClassification, BertModel
from jlora.models.llama import LlamaConfig, LlamaForCausalLM
from jlora.tree import flatten, path_str, unflatten

Tensors = Mapping[str, Callable[[], Any]]
LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# buffers that checkpoints carry but that are not parameters
IGNORED = (r".*\.rotary_emb\.inv_freq", r"(bert\.)?embeddings\.position_ids")


@dataclasses.dataclass
class Pretrained:
    """A model with its weights: what `load` returns."""

    model: nn.Module
    params: dict
    config: LlamaConfig | BertConfig
    tokenizer: Any | None
    source: str

    def kernel_specs(self) -> dict:
        """Kernel layouts for ``jlora.init(..., specs=)`` (an abstract trace; no FLOPs)."""
        return jlora.kernel_specs(self.model, jax.ShapeDtypeStruct((1, 2), jnp.int32))


def hf_name(keys: tuple) -> str:
    """``('model', 'layers_3', 'mlp', 'up_proj', 'kernel') -> 'model.layers.3.mlp.up_proj.weight'``."""
    *modules, leaf = (str(k) for k in keys)
    modules = [
        re.sub(r"^(\w+?)_(\d+)$", r"\1.\2", m) if re.match(r"^(layers?|h|blocks?)_\d+$", m) else m for m in modules
    ]
    return ".".join([*modules, LEAF_NAMES[leaf]])


def hf_module_name(keys: tuple, layer: int | None = None) -> str:
    """The Hugging Face module name of a jlora module path (for `jlora.peft`): for a scanned
    stack (``model/layers/self_attn/q_proj``), `layer` is put in (``model.layers.3.…``)."""
    name = hf_name((*keys, "bias")).removesuffix(".bias")
    if layer is None:
        return name
    return re.sub(r"(^|\.)(layers?)\.(?!\d)", rf"\g<1>\g<2>.{layer}.", name, count=1)


def build_model(config: LlamaConfig | BertConfig, *, head: str | None, scan: bool, dtype, param_dtype) -> nn.Module:
    kw = {"scan": scan, "dtype": dtype, "param_dtype": param_dtype}
    if isinstance(config, LlamaConfig):
        return LlamaForCausalLM(config, **kw)
    return (BertForSequenceClassification if head == "classifier" else BertModel)(config, **kw)


def assemble(
    model: nn.Module,
    tensors: Tensors,
    *,
    param_dtype=jnp.float32,
    fresh: Iterable[str] = (),
    source: str = "checkpoint",
) -> dict:
    """The model's params from checkpoint tensors (see the module docstring).

    `fresh` names modules that the checkpoint lacks and that start from the model's own
    initialisation (a new classification head). Raises, before returning anything, on
    missing, unknown or mis-shaped tensors, naming them.
    """
    unrolled = model.clone(scan=False)
    ids = jnp.zeros((1, 2), jnp.int32)
    expected = flatten(nn.meta.unbox(jax.eval_shape(lambda: unrolled.init(jax.random.key(0), ids)))["params"])
    specs = jlora.kernel_specs(unrolled, ids)
    fresh = tuple(fresh)
    names = {keys: _find(hf_name(keys), tensors) for keys in expected}
    missing = [hf_name(k) for k, name in names.items() if name is None and not any(str(m) in fresh for m in k)]
    if missing:
        raise ValueError(f"{source}: missing {_listing(missing)}")
    tied = getattr(model.config, "tie_word_embeddings", False)
    ignored = (*IGNORED, "lm_head.weight") if tied else IGNORED
    used = set(names.values())
    unknown = [n for n in tensors if n not in used and not any(re.fullmatch(p, n) for p in ignored)]
    if unknown:
        raise ValueError(f"{source}: unknown {_listing(unknown)}; is this a checkpoint for {type(model).__name__}?")
    params = {}
    for keys, shape in expected.items():
        if names[keys] is not None:
            params[keys] = _convert(tensors, names[keys], keys, shape.shape, specs, source).astype(param_dtype)
    if fresh:
        initialised = flatten(nn.meta.unbox(unrolled.init(jax.random.key(0), ids))["params"])
        params.update({k: v.astype(param_dtype) for k, v in initialised.items() if k not in params})
    params = unflatten(params)
    return stack_layers(params) if model.scan else params


def _listing(names: list[str]) -> str:
    return f"tensors {names[:8]}{' …' if len(names) > 8 else ''} ({len(names)} in all)"


def _convert(tensors: Tensors, name: str, keys: tuple, shape: tuple[int, ...], specs: dict, source: str) -> jax.Array:
    """Checkpoint tensor `name` in the layout of param `keys`: Linear weights (out, in)
    become kernels (*in, *out); everything else is reshaped (e.g. a q bias to (heads, head_dim))."""
    value = jnp.asarray(tensors[name]())
    size = math.prod(shape)
    if keys[-1] == "kernel":
        n_in = math.prod(shape[: specs[path_str(keys[:-1])].n_in])
        if value.shape != (size // n_in, n_in):
            raise ValueError(
                f"{source}: tensor {name} has shape {tuple(value.shape)}, but {path_str(keys)} needs "
                f"(out, in) = {(size // n_in, n_in)} for its kernel {shape}"
            )
        value = value.T
    elif value.size != size:
        raise ValueError(f"{source}: tensor {name} has shape {tuple(value.shape)}, but {path_str(keys)} needs {shape}")
    return value.reshape(shape)


def _find(name: str, tensors: Tensors) -> str | None:
    """The checkpoint's name for `name`, also when the checkpoint lacks the task wrapper's
    prefix (a BertModel checkpoint loaded into BertForSequenceClassification)."""
    if name in tensors:
        return name
    stripped = name.split(".", 1)[1] if "." in name else name
    return stripped if stripped in tensors else None


def stack_layers(params: dict) -> dict:
    """Unrolled ``{…, layers_0: p0, layers_1: p1, …}`` -> scanned ``{…, layers: stack(p)}``."""
    out = {}
    numbered: dict[str, list] = {}
    for key, value in params.items():
        match = re.fullmatch(r"(layers?)_(\d+)", str(key))
        if match and isinstance(value, dict):
            numbered.setdefault(match.group(1), []).append((int(match.group(2)), value))
        else:
            out[key] = stack_layers(value) if isinstance(value, dict) else value
    for name, layers in numbered.items():
        layers = [value for _, value in sorted(layers, key=lambda item: item[0])]
        out[name] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return out


# -- Hugging Face directories ----------------------------------------------------------------


def safetensors_tensors(directory: pathlib.Path) -> Tensors:
    """``{name: loader}`` over ``model.safetensors`` or the shards an index names."""
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
    elif (directory / "model.safetensors").exists():
        with safe_open(directory / "model.safetensors", framework="flax") as f:
            weight_map = dict.fromkeys(f.keys(), "model.safetensors")
    else:
        raise FileNotFoundError(
            f"{directory}: no model.safetensors or model.safetensors.index.json "
            "(jlora reads safetensors only, never pickles)"
        )

    def loader(name: str, file: str):
        def load():
            with safe_open(directory / file, framework="flax") as f:
                return f.get_tensor(name)

        return load

    return {name: loader(name, file) for name, file in weight_map.items()}


def load_hf(
    path: str | pathlib.Path,
    *,
    head: str | None = None,
    num_labels: int | None = None,
    scan: bool = False,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    tokenizer: bool = True,
) -> Pretrained:
    """A Hugging Face model directory (config.json + safetensors) -> `Pretrained`.

    Llama, Mistral and Qwen2 configs give a `LlamaForCausalLM`; BERT configs give a
    `BertModel`, or with ``head="classifier"`` a `BertForSequenceClassification`
    (`num_labels` overrides the config's; a classifier the checkpoint lacks starts fresh).
    """
    from transformers import AutoConfig

    directory = pathlib.Path(path)
    if not (directory / "config.json").exists():
        raise FileNotFoundError(f"{directory}: no config.json; expected a Hugging Face model directory")
    hf = AutoConfig.from_pretrained(directory, trust_remote_code=False)
    if num_labels is not None:
        hf.num_labels = num_labels
    if hf.model_type in ("llama", "mistral", "qwen2"):
        config = LlamaConfig.from_hf(hf)
    elif hf.model_type == "bert":
        config = BertConfig.from_hf(hf)
    else:
        raise ValueError(
            f"{directory}: model_type {hf.model_type!r} is not supported; jlora has llama, mistral, qwen2, bert"
        )
    model = build_model(config, head=head, scan=scan, dtype=dtype, param_dtype=param_dtype)
    tensors = safetensors_tensors(directory)
    fresh = ("classifier",) if head == "classifier" and not any("classifier" in n for n in tensors) else ()
    params = assemble(model, tensors, param_dtype=param_dtype, fresh=fresh, source=str(directory))
    return Pretrained(model, params, config, _hf_tokenizer(directory) if tokenizer else None, str(directory))


def _hf_tokenizer(directory: pathlib.Path):
    from transformers import AutoTokenizer

    if not any((directory / f).exists() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        return None
    return AutoTokenizer.from_pretrained(directory, trust_remote_code=False)


# -- GGUF ------------------------------------------------------------------------------------

GGUF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def gguf_config(reader) -> LlamaConfig:
    """A `LlamaConfig` from a GGUF file's metadata."""
    fields = {
        name: field.contents() for name, field in reader.fields.items() if not name.startswith("tokenizer.ggml.token")
    }
    arch = fields["general.architecture"]
    if arch not in ("llama", "qwen2", "mistral"):
        raise ValueError(f"GGUF architecture {arch!r} is not supported; jlora reads llama, qwen2 and mistral")
    get = lambda key, default=None: fields.get(f"{arch}.{key}", default)
    heads = get("attention.head_count")
    hidden = get("embedding_length")
    names = {t.name for t in reader.tensors}
    return LlamaConfig(
        vocab_size=get("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data),
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_layers=get("block_count"),
        num_heads=heads,
        num_kv_heads=get("attention.head_count_kv", heads),
        head_dim=get("attention.key_length") or hidden // heads,
        rms_norm_eps=get("attention.layer_norm_rms_epsilon"),
        rope_theta=get("rope.freq_base", 10000.0),
        tie_word_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        o_bias="blk.0.attn_output.bias" in names,
        model_type=arch,
    )


def gguf_tensors(reader, config: LlamaConfig) -> Tensors:
    """``{hf name: loader}`` over a GGUF file: dequantized to float32, with llama.cpp's
    q/k row permutation undone (its converter interleaves the two RoPE halves)."""
    import gguf

    def hf(name: str) -> str:
        match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name) or re.fullmatch(r"(\w+)\.(weight|bias)", name)
        if match is None or match.groups()[-2] not in GGUF_NAMES:
            return name  # reported as unknown by `assemble`
        *layer, kind, leaf = match.groups()
        prefix = f"model.layers.{layer[0]}." if layer else ""
        return f"{prefix}{GGUF_NAMES[kind]}.{leaf}"

    def loader(tensor):
        def load():
            value = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
            kind = tensor.name.split(".")[-2]
            if kind in ("attn_q", "attn_k") and config.model_type == "llama":
                heads = config.num_heads if kind == "attn_q" else config.num_kv_heads
                out, rest = value.shape[0], value.shape[1:]
                value = value.reshape(heads, out // heads // 2, 2, *rest).swapaxes(1, 2).reshape(out, *rest)
            return value

        return load

    return {hf(t.name): loader(t) for t in reader.tensors}


def load_gguf(
    path: str | pathlib.Path, *, scan: bool = False, dtype=jnp.float32, param_dtype=jnp.float32, tokenizer: bool = True
) -> Pretrained:
    """A GGUF file -> `Pretrained`, with the tokenizer (and chat template) its metadata holds."""
    import gguf

    path = pathlib.Path(path)
    reader = gguf.GGUFReader(str(path))
    config = gguf_config(reader)
    model = build_model(config, head=None, scan=scan, dtype=dtype, param_dtype=param_dtype)
    params = assemble(model, gguf_tensors(reader, config), param_dtype=param_dtype, source=str(path))
    return Pretrained(model, params, config, gguf_tokenizer(reader) if tokenizer else None, str(path))


def gguf_tokenizer(reader):
    """The tokenizer (and chat template) a GGUF file's metadata describes.

    transformers' own ``from_pretrained(gguf_file=...)`` reads the file with torch; here
    the `gguf` package reads the metadata and transformers' converter builds the fast
    tokenizer from it, so no torch is needed."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    metadata = {name: field.contents() for name, field in reader.fields.items() if name.startswith("tokenizer.")}
    grouped = {
        group: {new: metadata[f"tokenizer.{old}"] for old, new in renames.items() if f"tokenizer.{old}" in metadata}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    settings, config = grouped["tokenizer"], grouped["tokenizer_config"]
    for name in ("bos", "eos", "unk", "pad"):
        token_id = settings.get(f"{name}_token_id")
        config[f"{name}_token"] = settings["tokens"][token_id] if token_id is not None else None
    backend, _ = convert_gguf_tokenizer(reader.fields["general.architecture"].contents(), settings)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **config)
