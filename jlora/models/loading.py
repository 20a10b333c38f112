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
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jlora
from jlora.models.bert import FAMILIES, BertConfig, BertForSequenceClassification, BertModel
from jlora.models.llama import ACTIVATIONS, GEMMA, ROPE_TYPES, LlamaConfig, LlamaForCausalLM, hf_ropes
from jlora.tree import flatten, path_str, unflatten

Tensors = Mapping[str, Callable[[], Any]]
LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# buffers that checkpoints carry but that are not parameters, and BERT's pre-training heads
# (BertForPreTraining / BertForMaskedLM: the encoder is loaded, its heads dropped)
IGNORED = (r".*\.rotary_emb\.inv_freq", r"(\w+\.)?embeddings\.(position|token_type)_ids", r"cls\..*")
# the other encoder families' pre-training heads, which `load_hf` drops likewise (RobertaForMaskedLM,
# DistilBertForMaskedLM)
ENCODER_HEADS = {
    "roberta": r"lm_head\..*",
    "xlm-roberta": r"lm_head\..*",
    "distilbert": r"vocab_(transform|layer_norm|projector)\..*",
}
ENCODER_PREFIXES = tuple(dict.fromkeys(family.prefix for family in FAMILIES.values()))  # bert, roberta, …
# the transformers classes whose checkpoints jlora reads, by model_type
ARCHITECTURES = {
    "llama": {"LlamaForCausalLM"},
    "mistral": {"MistralForCausalLM"},
    "qwen2": {"Qwen2ForCausalLM"},
    "qwen3": {"Qwen3ForCausalLM"},
    "gemma2": {"Gemma2ForCausalLM"},
    "gemma3_text": {"Gemma3ForCausalLM"},
    "phi3": {"Phi3ForCausalLM"},
    "bert": {"BertModel", "BertForSequenceClassification", "BertForPreTraining", "BertForMaskedLM"},
    "roberta": {"RobertaModel", "RobertaForSequenceClassification", "RobertaForMaskedLM"},
    "xlm-roberta": {"XLMRobertaModel", "XLMRobertaForSequenceClassification", "XLMRobertaForMaskedLM"},
    "distilbert": {"DistilBertModel", "DistilBertForSequenceClassification", "DistilBertForMaskedLM"},
}


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
            value = _convert(tensors, names[keys], keys, shape.shape, specs, source)
            params[keys] = value if isinstance(value, np.ndarray) else value.astype(param_dtype)
    if fresh:
        initialised = flatten(nn.meta.unbox(unrolled.init(jax.random.key(0), ids))["params"])
        params.update({k: v.astype(param_dtype) for k, v in initialised.items() if k not in params})
    params = unflatten(params)
    params = stack_layers(params) if model.scan else params
    # numpy tensors (GGUF, the load cache) are laid out and stacked by numpy, then put on the device
    # and cast: jax's transposes and stacks would compile a program for each shape
    return jax.tree.map(lambda x: jax.device_put(x).astype(param_dtype), params)


def _listing(names: list[str]) -> str:
    return f"tensors {names[:8]}{' …' if len(names) > 8 else ''} ({len(names)} in all)"


def _convert(
    tensors: Tensors, name: str, keys: tuple, shape: tuple[int, ...], specs: dict, source: str
) -> jax.Array | np.ndarray:
    """Checkpoint tensor `name` in the layout of param `keys`: Linear weights (out, in)
    become kernels (*in, *out); everything else is reshaped (e.g. a q bias to (heads, head_dim)).
    A numpy tensor stays one (see `assemble`)."""
    value = tensors[name]()
    value = value if isinstance(value, np.ndarray) else jnp.asarray(value)
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
    prefix (a BertModel checkpoint loaded into BertForSequenceClassification) or has one
    that the model lacks (a BertForPreTraining checkpoint loaded into BertModel; ``roberta.``,
    ``distilbert.`` likewise)."""
    stripped = name.split(".", 1)[1] if "." in name else name
    prefixed = (f"{prefix}.{name}" for prefix in ENCODER_PREFIXES)
    return next((n for n in (name, stripped, *prefixed) if n in tensors), None)


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
        out[name] = jax.tree.map(_stack, *layers)
    return out


def _stack(*xs):
    """The layers' leaves stacked on the device; numpy ones by numpy, each stack put on the
    device at once, so that one stacked copy at a time lives in host memory."""
    return jax.device_put(np.stack(xs)) if all(isinstance(x, np.ndarray) for x in xs) else jnp.stack(xs)


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

    Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 text and Phi-3 configs give a `LlamaForCausalLM`
    (`LlamaConfig` has their options); BERT, RoBERTa, XLM-RoBERTa and DistilBERT configs give a
    `BertModel`, or with ``head="classifier"`` a `BertForSequenceClassification`, of that family
    (`num_labels` overrides the config's; a classifier the checkpoint lacks starts fresh; the
    family's pre-training heads, and a pooler the classifier lacks, are dropped).
    """
    from transformers import AutoConfig

    directory = pathlib.Path(path)
    if not (directory / "config.json").exists():
        raise FileNotFoundError(f"{directory}: no config.json; expected a Hugging Face model directory")
    hf = AutoConfig.from_pretrained(directory, trust_remote_code=False)
    if num_labels is not None:
        hf.num_labels = num_labels
    if hf.model_type not in ARCHITECTURES:
        raise ValueError(
            f"{directory}: model_type {hf.model_type!r} is not supported; jlora has {', '.join(ARCHITECTURES)}"
        )
    try:
        check_hf_config(hf, head)
        config = BertConfig.from_hf(hf) if hf.model_type in FAMILIES else LlamaConfig.from_hf(hf)
    except ValueError as error:
        raise ValueError(f"{directory}: {error}") from None
    model = build_model(config, head=head, scan=scan, dtype=dtype, param_dtype=param_dtype)
    tensors = safetensors_tensors(directory)
    if isinstance(config, BertConfig):
        tensors = {n: t for n, t in tensors.items() if not any(re.fullmatch(p, n) for p in dropped(config, head))}
    fresh = fresh_modules(config, head, tensors)
    if "pooler" in fresh:
        warnings.warn(f"{directory}: the checkpoint has no pooler (as BertForMaskedLM); it starts fresh", stacklevel=2)
    params = assemble(model, tensors, param_dtype=param_dtype, fresh=fresh, source=str(directory))
    return Pretrained(model, params, config, _hf_tokenizer(directory) if tokenizer else None, str(directory))


def fresh_modules(config: LlamaConfig | BertConfig, head: str | None, tensors: Tensors) -> tuple[str, ...]:
    """The modules the checkpoint lacks that start from their initialisation, as transformers'
    do: a classification head, and BERT's pooler (BertForMaskedLM checkpoints have none)."""
    if not isinstance(config, BertConfig):
        return ()
    heads = config.family.head_modules if head == "classifier" else ()
    classifier = tuple(m for m in heads if not any(n.startswith(f"{m}.") for n in tensors))
    has_pooler = config.family.head == "pooler" if head == "classifier" else config.family.pooler
    pooler = () if not has_pooler or any(".pooler." in f".{n}" for n in tensors) else ("pooler",)
    return classifier + pooler


def dropped(config: BertConfig, head: str | None) -> list[str]:
    """Patterns of the checkpoint tensors that an encoder drops, as transformers does: the
    family's pre-training heads, and a pooler that the classifier lacks (RoBERTa's)."""
    patterns = [ENCODER_HEADS[config.model_type]] if config.model_type in ENCODER_HEADS else []
    if head == "classifier" and config.family.head != "pooler":
        patterns.append(rf"({config.family.prefix}\.)?pooler\..*")
    return patterns


def check_hf_config(hf: Any, head: str | None = None) -> None:
    """Refuse, naming the field, a transformers config whose architecture jlora would not
    reproduce exactly.

    Every field that transformers' Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 text, Phi-3 and BERT
    (RoBERTa, XLM-RoBERTa, DistilBERT) models read is either carried into `LlamaConfig` /
    `BertConfig` (sizes, heads, KV heads, head_dim, biases, norm epsilons, activations, RoPE
    theta and default / linear / llama3 /
    yarn scaling, Mistral's window, Qwen2/3's and Gemma's per-layer windows, Gemma's
    query_pre_attn_scalar, soft-capping and Gemma 3's sliding-layer RoPE, Phi-3's window, partial
    RoPE, LongRoPE and original_max_position_embeddings, tied embeddings,
    BERT's dropouts and initializer range, labels, RoBERTa's pad_token_id (its positions),
    DistilBERT's sizes under their own names), refused here or by `from_hf`, or has no
    effect on the outputs (use_cache, token ids (Gemma's pad_token_id only zeroes that embedding
    row's gradient in torch), pretraining_tp, max_position_embeddings without dynamic RoPE,
    Qwen's max_window_layers once layer_types is derived from it, chunk_size_feed_forward,
    Gemma 3's attn_logit_softcapping (its model never applies it), Phi-3's embd_pdrop (likewise), the attention
    implementation, dtype: jlora's own)."""
    problems = [f"config field {field}={value!r} is not supported: {why}" for field, value, why in _refusals(hf, head)]
    if problems:
        raise ValueError("; ".join(problems))


def _refusals(hf: Any, head: str | None) -> list[tuple[str, Any, str]]:
    """(field, value, what jlora supports) for each field of `hf` that jlora cannot honour."""
    out = []
    architectures = set(getattr(hf, "architectures", None) or ())
    if not architectures <= ARCHITECTURES[hf.model_type]:
        out.append(("architectures", sorted(architectures), f"jlora reads {sorted(ARCHITECTURES[hf.model_type])}"))
    if getattr(hf, "quantization_config", None):
        out.append(("quantization_config", hf.quantization_config, "jlora reads unquantized checkpoints"))
    if hf.model_type in FAMILIES:
        return out + _encoder_refusals(hf, head)
    act_field = "hidden_activation" if hf.model_type in GEMMA else "hidden_act"
    if getattr(hf, act_field) not in ACTIVATIONS:
        out.append((act_field, getattr(hf, act_field), f"jlora's decoders have {list(ACTIVATIONS)}"))
    if getattr(hf, "use_bidirectional_attention", False):
        out.append(("use_bidirectional_attention", True, "jlora's decoders are causal"))
    if getattr(hf, "attention_dropout", 0.0):
        out.append(("attention_dropout", hf.attention_dropout, "jlora's decoders have no attention dropout (use 0)"))
    if getattr(hf, "resid_pdrop", 0.0):  # Phi-3's, on the attention and MLP outputs
        out.append(("resid_pdrop", hf.resid_pdrop, "jlora's decoders have no residual dropout (use 0)"))
    layer_types = getattr(hf, "layer_types", None) or ()
    windowed = hf.model_type in ("qwen2", "qwen3", *GEMMA)
    if windowed and "sliding_attention" in layer_types and hf.sliding_window is None:
        out.append(("layer_types", list(layer_types), "sliding layers need a sliding_window (and use_sliding_window)"))
    rope = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    if hf.model_type != "gemma3_text" and any(isinstance(value, dict) for value in rope.values()):
        return [*out, ("rope_parameters", rope, "one RoPE for every layer (Gemma 3: one per layer type)")]
    rope, local = hf_ropes(hf)
    phi3 = hf.model_type == "phi3"  # only Phi-3 has partial RoPE and LongRoPE here (its tests draw them)
    types = ROPE_TYPES if phi3 else tuple(t for t in ROPE_TYPES if t != "longrope")
    out += _rope_refusals("rope_parameters", rope, types, partial=phi3)
    if local is not None:  # Gemma 3's sliding layers
        out += _rope_refusals("rope_parameters.sliding_attention", local, ("default",))
    return out


def _encoder_refusals(hf: Any, head: str | None) -> list[tuple[str, Any, str]]:
    """`_refusals` of a BERT, RoBERTa, XLM-RoBERTa or DistilBERT config (`BertConfig.from_hf`
    refuses activations other than exact GELU, and RoBERTa without a pad_token_id)."""
    out = []
    if getattr(hf, "is_decoder", False):
        out.append(("is_decoder", True, "jlora's BERT is a bidirectional encoder"))
    if getattr(hf, "add_cross_attention", False):
        out.append(("add_cross_attention", True, "jlora's BERT has no cross-attention"))
    problem = getattr(hf, "problem_type", None)
    if head == "classifier" and problem not in (None, "single_label_classification"):
        out.append(("problem_type", problem, "jlora trains classifiers with softmax cross-entropy"))
    if getattr(hf, "sinusoidal_pos_embds", False):
        out.append(("sinusoidal_pos_embds", True, "jlora's DistilBERT reads learned position embeddings"))
    return out


def _rope_refusals(field: str, rope: dict, types: tuple[str, ...], partial: bool = False) -> list[tuple[str, Any, str]]:
    """The refusals of one RoPE's parameters (named under `field`), of which jlora has `types`
    (and, with `partial`, a partial_rotary_factor)."""
    out = []
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in types:
        out.append((f"{field}.rope_type", rope_type, f"jlora's RoPE types here are {list(types)}"))
    if not partial and rope.get("partial_rotary_factor", 1.0) != 1.0:
        out.append((f"{field}.partial_rotary_factor", rope["partial_rotary_factor"], "RoPE over all head_dim"))
    return out


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


# the architecture keys of GGUF metadata (``llama.block_count`` …) that `gguf_config` honours;
# any other is refused by name
GGUF_KEYS = {
    "context_length",  # no effect without dynamic RoPE
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "vocab_size",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.key_length",
    "attention.value_length",
    "attention.layer_norm_rms_epsilon",
    "rope.freq_base",
    "rope.dimension_count",
    "rope.scaling.type",
    "rope.scaling.factor",
}


def gguf_config(reader) -> LlamaConfig:
    """A `LlamaConfig` from a GGUF file's metadata; metadata it cannot honour (unknown
    architecture keys, partial or non-linear RoPE scaling, per-layer head counts, value
    heads of another size than keys) is refused by name."""
    fields = {
        name: field.contents() for name, field in reader.fields.items() if not name.startswith("tokenizer.ggml.token")
    }
    arch = fields["general.architecture"]
    if arch not in ("llama", "qwen2", "mistral"):
        raise ValueError(f"GGUF architecture {arch!r} is not supported; jlora reads llama, qwen2 and mistral")
    get = lambda key, default=None: fields.get(f"{arch}.{key}", default)
    unknown = sorted(name for name in fields if name.startswith(f"{arch}.") and name[len(arch) + 1 :] not in GGUF_KEYS)
    if unknown:
        raise ValueError(f"GGUF metadata {unknown} is not supported; jlora reads {sorted(GGUF_KEYS)}")
    heads = get("attention.head_count")
    hidden = get("embedding_length")
    head_dim = get("attention.key_length") or hidden // heads
    kv_heads, scaling = get("attention.head_count_kv", heads), get("rope.scaling.type", "none")
    checks = (
        ("attention.head_count_kv", kv_heads, isinstance(kv_heads, int), "one KV head count for every layer"),
        ("attention.value_length", get("attention.value_length", head_dim), None, f"value heads of {head_dim}"),
        ("rope.dimension_count", get("rope.dimension_count", head_dim), None, f"RoPE over all {head_dim} dims"),
        ("rope.scaling.type", scaling, scaling in ("none", "linear"), "RoPE scaling 'none' or 'linear'"),
    )
    for key, value, ok, supported in checks:
        if not (value == head_dim if ok is None else ok):
            raise ValueError(f"GGUF metadata {arch}.{key}={value!r} is not supported; jlora supports {supported}")
    names = {t.name for t in reader.tensors}
    return LlamaConfig(
        vocab_size=get("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data),
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_layers=get("block_count"),
        num_heads=heads,
        num_kv_heads=get("attention.head_count_kv", heads),
        head_dim=head_dim,
        rms_norm_eps=get("attention.layer_norm_rms_epsilon"),
        rope_theta=get("rope.freq_base", 10000.0),
        rope_type="linear" if scaling == "linear" else "default",
        rope_factor=get("rope.scaling.factor", 1.0) if scaling == "linear" else 1.0,
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
    path: str | pathlib.Path,
    *,
    scan: bool = False,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    tokenizer: bool = True,
    cache: bool = True,
) -> Pretrained:
    """A GGUF file -> `Pretrained`, with the tokenizer (and chat template) its metadata holds.

    With `cache` (and unless ``JLORA_CACHE_DIR=off``), what reading the file gives is kept in
    the load cache (`jlora.models.cache`) and later loads of the unchanged file read that."""
    path = pathlib.Path(path)
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (it starts with {magic!r}, a GGUF file with b'GGUF')")
    config, tensors, tok = read_gguf(path, tokenizer=tokenizer, cache=cache)
    model = build_model(config, head=None, scan=scan, dtype=dtype, param_dtype=param_dtype)
    params = assemble(model, tensors, param_dtype=param_dtype, source=str(path))
    return Pretrained(model, params, config, tok, str(path))


def read_gguf(path: pathlib.Path, *, tokenizer: bool = True, cache: bool = True) -> tuple[LlamaConfig, Tensors, Any]:
    """(config, tensors, tokenizer or None) of a GGUF file: from its load cache entry when there
    is a whole one, else read with gguf-py (`gguf_config`, `gguf_tensors`, `gguf_tokenizer`) and
    stored in a new entry, whose memory-mapped tensors are then handed on."""
    from jlora.models import cache as load_cache

    entry = load_cache.entry(path) if cache else None
    if entry is not None and (cached := load_cache.read(entry, tokenizer=tokenizer)) is not None:
        return cached
    import gguf  # only here: a cached load needs no gguf-py

    reader = gguf.GGUFReader(str(path))
    config = gguf_config(reader)
    tensors = gguf_tensors(reader, config)
    tok = gguf_tokenizer(reader) if tokenizer else None
    if entry is not None and load_cache.entry(path) == entry:  # the file did not change while read
        arrays = {name: load() for name, load in tensors.items()}
        if load_cache.write(entry, config, arrays, tok) and (cached := load_cache.read(entry, tokenizer=False)):
            return config, cached[1], tok
        tensors = {name: (lambda value=value: value) for name, value in arrays.items()}
    return config, tensors, tok


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
