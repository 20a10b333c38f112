"""jlora's Flax models for real checkpoints, their loaders and generation.

pretrained = jlora.models.load("smollm2-135m-instruct")     # or a directory / .gguf file
tokens = jlora.models.generate(pretrained.model, pretrained.params, ids, max_new_tokens=32)
"""

from __future__ import annotations

import os
import pathlib

# transformers serves jlora's models configs and tokenizers only: its "PyTorch was not found"
# advice (printed when it is first imported without torch) is not the user's to act on
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from jlora.models.bert import BertConfig, BertForSequenceClassification, BertModel, mean_pool
from jlora.models.generate import generate, sample
from jlora.models.layers import init_cache
from jlora.models.llama import LlamaConfig, LlamaForCausalLM
from jlora.models.loading import Pretrained, assemble, hf_module_name, load_gguf, load_hf
from jlora.models.presets import PRESETS, locate

__all__ = [
    "PRESETS",
    "BertConfig",
    "BertForSequenceClassification",
    "BertModel",
    "LlamaConfig",
    "LlamaForCausalLM",
    "Pretrained",
    "assemble",
    "generate",
    "hf_module_name",
    "init_cache",
    "load",
    "load_gguf",
    "load_hf",
    "locate",
    "mean_pool",
    "sample",
]


def load(name_or_path: str | pathlib.Path, **kwargs) -> Pretrained:
    """A preset name (see `PRESETS`), a Hugging Face model directory or a ``.gguf`` file.

    Keyword arguments go to `load_hf` / `load_gguf` (``scan``, ``dtype``, ``head`` …)."""
    name = str(name_or_path)
    path = locate(name) if name in PRESETS else pathlib.Path(name)
    if not path.exists():
        raise FileNotFoundError(f"{name}: neither a preset ({', '.join(PRESETS)}) nor an existing path")
    pretrained = load_gguf(path, **kwargs) if path.suffix == ".gguf" else load_hf(path, **kwargs)
    if name in PRESETS:
        pretrained.source = name
    return pretrained
