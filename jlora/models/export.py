"""Flax params -> a Hugging Face model directory (config.json, model.safetensors, tokenizer)
that transformers loads: the inverse of `jlora.models.loading`."""

from __future__ import annotations

import math
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jlora
from jlora.models.bert import BertConfig
from jlora.models.llama import ATTENTION_BIAS, GEMMA, LlamaConfig
from jlora.models.loading import ARCHITECTURES, hf_name
from jlora.staging import staged
from jlora.tree import flatten, path_str

HF_CLASSES = {
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
    "gemma2": "Gemma2Config",
    "gemma3_text": "Gemma3TextConfig",
    "phi3": "Phi3Config",
    "bert": "BertConfig",
    "roberta": "RobertaConfig",
    "xlm-roberta": "XLMRobertaConfig",
    "distilbert": "DistilBertConfig",
}


def unstack_layers(params: dict, model: nn.Module) -> dict:
    """Scanned ``{…, layers: stacked}`` -> unrolled ``{…, layers_0: …, layers_1: …}``."""
    unrolled = model.clone(scan=False)
    shapes = nn.meta.unbox(jax.eval_shape(lambda: unrolled.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))))
    out = {}
    for keys in flatten(shapes["params"]):
        stacked_keys, index = [], None
        for key in keys:
            name, _, number = str(key).rpartition("_")
            if index is None and number.isdigit() and name in ("layers", "layer"):
                stacked_keys.append(name)
                index = int(number)
            else:
                stacked_keys.append(key)
        value = flatten(params)[tuple(stacked_keys)]
        out[keys] = value if index is None else value[index]
    return out


def hf_config(config: LlamaConfig | BertConfig, architecture: str):
    """The transformers config object for `config`."""
    import transformers

    common = {"vocab_size": config.vocab_size, "hidden_size": config.hidden_size, "architectures": [architecture]}
    if isinstance(config, BertConfig):
        return getattr(transformers, HF_CLASSES[config.model_type])(
            **common,
            max_position_embeddings=config.max_position_embeddings,
            num_labels=config.num_labels,
            **encoder_fields(config),
        )
    return getattr(transformers, HF_CLASSES[config.model_type])(
        **common,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters=hf_rope(config),
        tie_word_embeddings=config.tie_word_embeddings,
        **family_fields(config),
    )


def encoder_fields(config: BertConfig) -> dict:
    """The transformers config fields of a BERT-family `config` that `BertConfig.from_hf` reads
    back (DistilBERT's under its own names)."""
    if config.model_type == "distilbert":
        return {
            "n_layers": config.num_layers,
            "n_heads": config.num_heads,
            "hidden_dim": config.intermediate_size,
            "dropout": config.hidden_dropout,
            "attention_dropout": config.attention_dropout,
            "seq_classif_dropout": config.classifier_rate,
        }
    fields = {
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.intermediate_size,
        "type_vocab_size": config.type_vocab_size,
        "layer_norm_eps": config.layer_norm_eps,
        "hidden_dropout_prob": config.hidden_dropout,
        "attention_probs_dropout_prob": config.attention_dropout,
        "classifier_dropout": config.classifier_dropout,
    }
    return fields if config.padding_idx is None else {**fields, "pad_token_id": config.padding_idx}


def hf_rope(config: LlamaConfig) -> dict:
    """transformers' ``rope_parameters`` for `config` (for Gemma 3, one per layer type)."""
    rope = {"rope_type": config.rope_type, "rope_theta": config.rope_theta}
    if config.rope_type != "default":
        rope["factor"] = config.rope_factor
    if config.rope_type == "llama3":
        rope |= {
            "low_freq_factor": config.rope_low_freq_factor,
            "high_freq_factor": config.rope_high_freq_factor,
            "original_max_position_embeddings": config.rope_original_max_positions,
        }
    if config.rope_type == "yarn":
        rope |= {
            "original_max_position_embeddings": config.rope_original_max_positions,
            "beta_fast": config.rope_beta_fast,
            "beta_slow": config.rope_beta_slow,
            "truncate": config.rope_truncate,
            "attention_factor": config.rope_attention_factor,
        }
    if config.rope_type == "longrope":
        rope |= {
            "original_max_position_embeddings": config.rope_original_max_positions,
            "short_factor": list(config.rope_short_factor),
            "long_factor": list(config.rope_long_factor),
            "attention_factor": config.rope_attention_factor,
        }
    if config.partial_rotary_factor != 1.0:
        rope["partial_rotary_factor"] = config.partial_rotary_factor
    if config.model_type != "gemma3_text":
        return rope
    local = rope if config.rope_local_theta is None else {"rope_type": "default", "rope_theta": config.rope_local_theta}
    return {"full_attention": rope, "sliding_attention": local}


def family_fields(config: LlamaConfig) -> dict:
    """The family-specific transformers config fields that `LlamaConfig.from_hf` reads back."""
    family, gemma = config.model_type, config.model_type in GEMMA
    extra = {"hidden_activation" if gemma else "hidden_act": config.hidden_act}
    if family in ATTENTION_BIAS:
        extra["attention_bias"] = config.o_bias
    if family == "llama":
        extra["mlp_bias"] = config.mlp_bias
    if family in ("mistral", "phi3"):
        extra["sliding_window"] = config.sliding_window
    if family == "phi3":
        # Phi3Config puts its own original_max_position_embeddings into a longrope's parameters; it
        # keeps no token ids (the tokenizer has them), and its default pad_token_id (32000) would
        # be past a small vocabulary
        extra |= {"original_max_position_embeddings": config.rope_original_max_positions, "pad_token_id": None}
    default_type = "full_attention" if config.sliding_window is None else "sliding_attention"
    layer_types = list(config.layer_types or (default_type,) * config.num_layers)
    if family in ("qwen2", "qwen3") and config.sliding_window is not None:
        extra |= {"use_sliding_window": True, "sliding_window": config.sliding_window, "layer_types": layer_types}
    if gemma:
        extra |= {
            "sliding_window": config.sliding_window,
            "layer_types": layer_types,
            "query_pre_attn_scalar": config.query_pre_attn_scalar,
            "final_logit_softcapping": config.final_logit_softcapping,
        }
    if family == "gemma2":
        extra["attn_logit_softcapping"] = config.attn_logit_softcapping
    return extra


def hf_tensors(model: nn.Module, params: dict) -> dict[str, np.ndarray]:
    """``{hf name: float32 array in PyTorch's layout}`` for every parameter."""
    flat = unstack_layers(params, model) if model.scan else flatten(params)
    specs = jlora.kernel_specs(model.clone(scan=False), jax.ShapeDtypeStruct((1, 2), jnp.int32))
    tensors = {}
    for keys, value in flat.items():
        value = np.asarray(value, np.float32)
        if keys[-1] == "kernel":
            n_in = math.prod(value.shape[: specs[path_str(keys[:-1])].n_in])
            value = value.reshape(n_in, -1).T
        elif keys[-1] != "embedding":
            value = value.reshape(-1)
        tensors[hf_name(keys)] = np.ascontiguousarray(value)
    return tensors


def save_hf(pretrained, params: dict, out: str | pathlib.Path) -> pathlib.Path:
    """Write `params` (plain, e.g. `jlora.merge`d) of `pretrained`'s model as a Hugging Face
    directory. Written to a temporary folder and renamed: a failure leaves nothing at `out`."""
    from safetensors.numpy import save_file

    if any(k[-1] in (jlora.tree.LORA_A, jlora.tree.LORA_B) for k in flatten(params)):
        raise ValueError("params still hold LoRA factors; pass jlora.merge(params, config)")
    architecture = type(pretrained.model).__name__
    if isinstance(pretrained.config, BertConfig):  # BertModel of a RoBERTa config: RobertaModel
        architecture = architecture.replace("Bert", pretrained.config.family.stem, 1)
    else:  # LlamaForCausalLM of a Phi-3 (Mistral, …) config: its family's class, which jlora reloads
        (architecture,) = ARCHITECTURES[pretrained.config.model_type]
    with staged(out) as staging:
        hf_config(pretrained.config, architecture).save_pretrained(staging)
        save_file(hf_tensors(pretrained.model, params), staging / "model.safetensors", metadata={"format": "pt"})
        if pretrained.tokenizer is not None:
            pretrained.tokenizer.save_pretrained(staging)
    return pathlib.Path(out)
