"""The BERT family in Flax Linen: BERT (and MiniLM …), RoBERTa, XLM-RoBERTa and DistilBERT
encoders, their sequence-classification heads, and mean pooling.

One set of modules serves every family; `BertConfig.family` (from transformers' model_type)
says what differs: RoBERTa's pad-aware positions (`BertConfig.padding_idx`) and
``dense``-tanh-``out_proj`` head, DistilBERT's block names, no token types and ReLU head.
Module names and nesting follow Hugging Face's (``bert/encoder/layer_3/attention/self/query``,
``roberta/encoder/…``, ``distilbert/transformer/layer_3/attention/q_lin``, ``classifier``),
so peft target lists such as ``["query", "value"]`` or ``["q_lin", "v_lin"]`` work unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora.models.layers import attention, dense, norm, run_layers

Dtype = Any


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2  # 0: no token-type embeddings (DistilBERT)
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1  # on the attention probabilities
    classifier_dropout: float | None = None  # in the classification head (None: hidden_dropout)
    num_labels: int = 2
    model_type: str = "bert"  # transformers' name of the family: a key of FAMILIES
    # RoBERTa's: token t's position is padding_idx + the number of non-pad tokens up to t, pads'
    # is padding_idx; None: 0, 1, 2, …
    padding_idx: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    @property
    def classifier_rate(self) -> float:
        return self.hidden_dropout if self.classifier_dropout is None else self.classifier_dropout

    @classmethod
    def from_hf(cls, hf: Any) -> BertConfig:
        """From a transformers BERT, RoBERTa, XLM-RoBERTa or DistilBERT config."""
        if hf.model_type not in FAMILIES:
            raise ValueError(f"model_type {hf.model_type!r} is not a BERT-family encoder ({', '.join(FAMILIES)})")
        distil = hf.model_type == "distilbert"
        act_field = "activation" if distil else "hidden_act"
        if getattr(hf, act_field) != "gelu":
            raise ValueError(f"{act_field} {getattr(hf, act_field)!r} is not supported; jlora's encoders use 'gelu'")
        if getattr(hf, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"position_embedding_type {hf.position_embedding_type!r} is not supported")
        roberta = hf.model_type in ("roberta", "xlm-roberta")
        if roberta and hf.pad_token_id is None:
            raise ValueError("pad_token_id None is not supported; RoBERTa's positions count from pad_token_id + 1")
        # BertConfig field -> transformers' name for it: BERT's / RoBERTa's, DistilBERT's
        names = {
            "hidden_size": ("hidden_size", "dim"),
            "num_layers": ("num_hidden_layers", "n_layers"),
            "num_heads": ("num_attention_heads", "n_heads"),
            "intermediate_size": ("intermediate_size", "hidden_dim"),
            "hidden_dropout": ("hidden_dropout_prob", "dropout"),
            "attention_dropout": ("attention_probs_dropout_prob", "attention_dropout"),
        }
        given = {field: getattr(hf, pair[distil]) for field, pair in names.items()}
        return cls(
            vocab_size=hf.vocab_size,
            max_position_embeddings=hf.max_position_embeddings,
            num_labels=hf.num_labels,
            model_type=hf.model_type,
            **given,
            # DistilBERT: no token types, LayerNorm eps fixed at 1e-12 (BertConfig's default)
            **(
                {"classifier_dropout": hf.seq_classif_dropout, "type_vocab_size": 0}
                if distil
                else {
                    "type_vocab_size": hf.type_vocab_size,
                    "layer_norm_eps": hf.layer_norm_eps,
                    "classifier_dropout": getattr(hf, "classifier_dropout", None),
                    "padding_idx": hf.pad_token_id if roberta else None,
                }
            ),
        )


def layer_norm(config: BertConfig, dtype: Dtype, param_dtype: Dtype, name: str = "LayerNorm") -> nn.LayerNorm:
    return norm(nn.LayerNorm, config.layer_norm_eps, dtype, param_dtype, name)


def output_projection(config: BertConfig, name: str, **kw) -> nn.DenseGeneral:
    """(B, T, heads, head_dim) -> (B, T, hidden): the attention's output projection."""
    return dense(config.hidden_size, ("heads", "head_dim", "embed"), axis=(-2, -1), use_bias=True, name=name, **kw)


class BertSelfAttention(nn.Module):
    """Bidirectional attention over the unpadded keys. `names` are the q, k, v projections'
    (DistilBERT: ``q_lin`` …); with `output` (DistilBERT's ``out_lin``) the output projection
    is applied here too."""

    config: BertConfig
    dtype: Dtype
    param_dtype: Dtype
    names: tuple[str, str, str] = ("query", "key", "value")
    output: str | None = None

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        c, kw = self.config, {"dtype": self.dtype, "param_dtype": self.param_dtype}
        q, k, v = (
            dense((c.num_heads, c.head_dim), ("embed", "heads", "head_dim"), use_bias=True, name=name, **kw)(x)
            for name in self.names
        )
        dropout = functools.partial(nn.Dropout(c.attention_dropout), deterministic=deterministic)
        out = attention(q, k, v, jnp.broadcast_to(mask[:, None, :].astype(bool), (*mask.shape, mask.shape[1])), dropout)
        return out if self.output is None else output_projection(c, self.output, **kw)(out)


class BertOutput(nn.Module):
    """``LayerNorm(residual + dropout(dense(x)))``: BERT's attention/output and output."""

    config: BertConfig
    names: tuple[str, ...]
    axis: int | tuple[int, ...]
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x, residual, deterministic: bool):
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = dense(self.config.hidden_size, self.names, axis=self.axis, use_bias=True, name="dense", **kw)(x)
        h = nn.Dropout(self.config.hidden_dropout)(h, deterministic=deterministic)
        return layer_norm(self.config, **kw)(residual + h)


class BertAttention(nn.Module):
    config: BertConfig
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = BertSelfAttention(self.config, name="self", **kw)(x, mask, deterministic)
        return BertOutput(self.config, ("heads", "head_dim", "embed"), (-2, -1), name="output", **kw)(
            h, x, deterministic
        )


class BertIntermediate(nn.Module):
    config: BertConfig
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x):
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = dense(self.config.intermediate_size, ("embed", "mlp"), use_bias=True, name="dense", **kw)(x)
        return nn.gelu(h, approximate=False)


class BertLayer(nn.Module):
    """BERT's (and RoBERTa's) post-norm block."""

    config: BertConfig
    dtype: Dtype
    param_dtype: Dtype
    scanned: bool = False

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        kw = {"config": self.config, "dtype": self.dtype, "param_dtype": self.param_dtype}
        x = BertAttention(name="attention", **kw)(x, mask, deterministic)
        h = BertIntermediate(name="intermediate", **kw)(x)
        x = BertOutput(names=("mlp", "embed"), axis=-1, name="output", **kw)(h, x, deterministic)
        return (x, None) if self.scanned else x


class DistilBertFFN(nn.Module):
    """``dropout(lin2(gelu(lin1(x))))``."""

    config: BertConfig
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x, deterministic: bool):
        c, kw = self.config, {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = nn.gelu(
            dense(c.intermediate_size, ("embed", "mlp"), use_bias=True, name="lin1", **kw)(x), approximate=False
        )
        h = dense(c.hidden_size, ("mlp", "embed"), use_bias=True, name="lin2", **kw)(h)
        return nn.Dropout(c.hidden_dropout)(h, deterministic=deterministic)


class DistilBertLayer(nn.Module):
    """DistilBERT's block: BERT's computation under DistilBERT's names (``attention/q_lin`` …
    ``attention/out_lin``, ``sa_layer_norm``, ``ffn/lin1``, ``ffn/lin2``, ``output_layer_norm``),
    with no dropout after the attention's output projection, as transformers has it."""

    config: BertConfig
    dtype: Dtype
    param_dtype: Dtype
    scanned: bool = False

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        c, kw = self.config, {"dtype": self.dtype, "param_dtype": self.param_dtype}
        names = ("q_lin", "k_lin", "v_lin")
        h = BertSelfAttention(c, names=names, output="out_lin", name="attention", **kw)(x, mask, deterministic)
        x = layer_norm(c, name="sa_layer_norm", **kw)(x + h)
        x = layer_norm(c, name="output_layer_norm", **kw)(x + DistilBertFFN(c, name="ffn", **kw)(x, deterministic))
        return (x, None) if self.scanned else x


def position_ids(input_ids: jax.Array, padding_idx: int | None) -> jax.Array:
    """0, 1, 2, … (B or 1, T); with RoBERTa's `padding_idx`, transformers'
    ``create_position_ids_from_input_ids``: real tokens count from padding_idx + 1, skipping
    pads, which get padding_idx."""
    if padding_idx is None:
        return jnp.arange(input_ids.shape[1])[None]
    real = (input_ids != padding_idx).astype(jnp.int32)
    return jnp.cumsum(real, axis=1) * real + padding_idx


class BertEmbeddings(nn.Module):
    config: BertConfig
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, input_ids, token_type_ids, deterministic: bool):
        c, kw = self.config, {"dtype": self.dtype, "param_dtype": self.param_dtype}
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed"))
        embed = functools.partial(nn.Embed, features=c.hidden_size, embedding_init=init, **kw)
        x = embed(c.vocab_size, name="word_embeddings")(input_ids)
        x = x + embed(c.max_position_embeddings, name="position_embeddings")(position_ids(input_ids, c.padding_idx))
        if c.type_vocab_size:
            x = x + embed(c.type_vocab_size, name="token_type_embeddings")(token_type_ids)
        return nn.Dropout(c.hidden_dropout)(layer_norm(c, **kw)(x), deterministic=deterministic)


class BertModel(nn.Module):
    """The encoder (and pooler). Returns ``(hidden (B, T, E), pooled (B, E))``; pooled is None
    without a pooler (DistilBERT, or ``with_pooler=False``: RoBERTa's classifier has none)."""

    config: BertConfig
    scan: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False  # recompute each layer in the backward pass (see LlamaForCausalLM)
    with_pooler: bool = True  # the family's pooler, if it has one

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic: bool = True):
        c, kw = self.config, {"dtype": self.dtype, "param_dtype": self.param_dtype}
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = BertEmbeddings(c, name="embeddings", **kw)(input_ids, token_type_ids, deterministic)
        x = Encoder(c, self.scan, remat=self.remat, name=c.family.encoder, **kw)(x, attention_mask, deterministic)
        pooled = BertPooler(c, name="pooler", **kw)(x) if self.with_pooler and c.family.pooler else None
        return x, pooled


class Encoder(nn.Module):
    config: BertConfig
    scan: bool
    dtype: Dtype
    param_dtype: Dtype
    remat: bool = False

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        c, kw = self.config, {"config": self.config, "dtype": self.dtype, "param_dtype": self.param_dtype}
        return run_layers(
            c.family.layer, c.num_layers, self.scan, "layer", x, mask, deterministic, remat=self.remat, **kw
        )


class BertPooler(nn.Module):
    """tanh(dense(hidden of the first token)): BERT's sentence representation."""

    config: BertConfig
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x):
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        return jnp.tanh(
            dense(self.config.hidden_size, ("embed", "embed_out"), use_bias=True, name="dense", **kw)(x[:, 0])
        )


class RobertaClassificationHead(nn.Module):
    """RoBERTa's ``classifier``: dropout, ``dense``, tanh, dropout, ``out_proj`` on the first
    token's hidden state (<s>). Returns float32 logits."""

    config: BertConfig
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x, deterministic: bool):
        c, kw = self.config, {"dtype": self.dtype, "param_dtype": self.param_dtype}
        dropout = functools.partial(nn.Dropout(c.classifier_rate), deterministic=deterministic)
        x = jnp.tanh(dense(c.hidden_size, ("embed", "embed_out"), use_bias=True, name="dense", **kw)(dropout(x)))
        return dense(c.num_labels, ("embed", "labels"), use_bias=True, name="out_proj", **kw)(dropout(x)).astype(
            jnp.float32
        )


class BertForSequenceClassification(nn.Module):
    """The encoder and the family's head; returns float32 logits (B, num_labels). BERT:
    dropout(pooler output) -> ``classifier``; RoBERTa: `RobertaClassificationHead`; DistilBERT:
    ``pre_classifier`` + ReLU + dropout -> ``classifier`` on the first token."""

    config: BertConfig
    scan: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False  # recompute each layer in the backward pass (see LlamaForCausalLM)

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic: bool = True):
        c, kw = self.config, {"dtype": self.dtype, "param_dtype": self.param_dtype}
        head = c.family.head
        encoder = BertModel(c, self.scan, remat=self.remat, with_pooler=head == "pooler", name=c.family.prefix, **kw)
        hidden, pooled = encoder(input_ids, attention_mask, token_type_ids, deterministic)
        if head == "dense_tanh":
            return RobertaClassificationHead(c, name="classifier", **kw)(hidden[:, 0], deterministic)
        if head == "pre_classifier":
            pre = dense(c.hidden_size, ("embed", "embed_out"), use_bias=True, name="pre_classifier", **kw)
            pooled = nn.relu(pre(hidden[:, 0]))
        pooled = nn.Dropout(c.classifier_rate)(pooled, deterministic=deterministic)
        return dense(c.num_labels, ("embed", "labels"), use_bias=True, name="classifier", **kw)(pooled).astype(
            jnp.float32
        )


@dataclasses.dataclass(frozen=True)
class Family:
    """What sets an encoder family apart, under transformers' names."""

    prefix: str  # the encoder's name in a task model (transformers' base_model_prefix)
    stem: str  # of transformers' class names: f"{stem}Model", f"{stem}ForSequenceClassification"
    encoder: str  # the layer stack's module name
    layer: type[nn.Module]
    pooler: bool  # the family's base model has BERT's pooler
    head: str  # the classifier: "pooler" (BERT), "dense_tanh" (RoBERTa), "pre_classifier" (DistilBERT)

    @property
    def head_modules(self) -> tuple[str, ...]:
        """The classification head's top-level modules (what starts fresh on an encoder checkpoint)."""
        return ("pre_classifier", "classifier") if self.head == "pre_classifier" else ("classifier",)


# by transformers' model_type; XLM-RoBERTa's modelling code is RoBERTa's under other class names
FAMILIES = {
    "bert": Family("bert", "Bert", "encoder", BertLayer, pooler=True, head="pooler"),
    "roberta": Family("roberta", "Roberta", "encoder", BertLayer, pooler=True, head="dense_tanh"),
    "xlm-roberta": Family("roberta", "XLMRoberta", "encoder", BertLayer, pooler=True, head="dense_tanh"),
    "distilbert": Family(
        "distilbert", "DistilBert", "transformer", DistilBertLayer, pooler=False, head="pre_classifier"
    ),
}


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """The mean of the hidden states of real (unpadded) tokens: sentence-transformers' pooling."""
    mask = attention_mask[..., None].astype(jnp.float32)
    return (hidden.astype(jnp.float32) * mask).sum(1) / jnp.maximum(mask.sum(1), 1e-9)
