"""A tiny word-level tokenizer, a tiny random Llama checkpoint and a synthetic sentiment
task, all built in-process (nothing is downloaded)."""

from __future__ import annotations

import csv
import pathlib

import numpy as np

POSITIVE = ["good", "great", "fine", "lovely"]
NEGATIVE = ["bad", "awful", "poor", "dull"]
FILLER = ["the", "movie", "was", "plot", "acting", "and", "very", "quite"]
WORDS = ["Review", "Sentiment", ":", "positive", "negative", *POSITIVE, *NEGATIVE, *FILLER]
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # a Llama layer's seven
IDS = np.array([[5, 9, 2, 7, 11, 3], [4, 4, 8, 1, 6, 2]])  # token ids for the peft comparisons (vocab 23)


def tokenizer():
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def rows(n: int, seed: int = 0) -> list[dict]:
    """Reviews of filler words and one sentiment word; the label follows the sentiment word."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        positive = bool(rng.integers(2))
        words = list(rng.choice(FILLER, rng.integers(2, 6)))
        words.insert(int(rng.integers(len(words) + 1)), str(rng.choice(POSITIVE if positive else NEGATIVE)))
        out.append({"text": " ".join(words), "label": "positive" if positive else "negative"})
    return out


def write_csv(path: pathlib.Path, n: int = 240) -> pathlib.Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows(n))
    return path


def hf_llama(path: pathlib.Path, **overrides) -> pathlib.Path:
    """A random Llama saved by transformers (2 layers, GQA 4 -> 2 heads, untied)."""
    import torch
    import transformers

    config = {
        "vocab_size": 53,
        "hidden_size": 16,
        "intermediate_size": 24,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": False,
    }
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**config, **overrides})).save_pretrained(path)
    return path


def hf_bert_classifier(path: pathlib.Path) -> pathlib.Path:
    """A random BERT sequence classifier saved by transformers (2 layers, 3 labels)."""
    import torch
    import transformers

    config = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=20, num_labels=3
    )
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(path)
    return path


def llama_dir(path: pathlib.Path) -> pathlib.Path:
    """`hf_llama` with the tiny tokenizer, wide enough to learn the synthetic task."""
    tok = tokenizer()
    hf_llama(
        path,
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=48,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.15,  # larger than HF's 0.02, so a random 2-layer model carries its input through
    )
    tok.save_pretrained(path)
    return path
