"""The BERT family (BERT, MiniLM, …) in Flax Linen: an encoder, a sequence-classification
head and mean pooling.

Module names and nesting follow Hugging Face's (``bert/encoder/layer_3/attention/self/query``,
``…/attention/output/dense``, ``…/intermediate/dense``, ``…/output/dense``, ``classifier``),
so peft target lists such as ``["query", "value"]`` work unchanged.
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
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1  # on the attention probabilities
    classifier_dropout: float | None = None  # before the classifier (None: hidden_dropout)
    num_labels: int = 2
    model_type: str = "bert"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, hf: Any) -> BertConfig:
        if hf.hidden_act != "gelu":
            raise ValueError(f"hidden_act {hf.hidden_act!r} is not supported; BERT uses 'gelu'")
        if getattr(hf, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"position_embedding_type {hf.position_embedding_type!r} is not supported")
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            intermediate_size=hf.intermediate_size,
            max_position_embeddings=hf.max_position_embeddings,
            type_vocab_size=hf.type_vocab_size,
            layer_norm_eps=hf.layer_norm_eps,
            hidden_dropout=hf.hidden_dropout_prob,
            attention_dropout=hf.attention_probs_dropout_prob,
            classifier_dropout=getattr(hf, "classifier_dropout", None),
            num_labels=hf.num_labels,
            model_type=hf.model_type,
        )


def layer_norm(config: BertConfig, dtype: Dtype, param_dtype: Dtype, name: str = "LayerNorm") -> nn.LayerNorm:
    return norm(nn.LayerNorm, config.layer_norm_eps, dtype, param_dtype, name)


class BertSelfAttention(nn.Module):
    config: BertConfig
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        c, kw = self.config, {"dtype": self.dtype, "param_dtype": self.param_dtype}
        q, k, v = (
            dense((c.num_heads, c.head_dim), ("embed", "heads", "head_dim"), use_bias=True, name=name, **kw)(x)
            for name in ("query", "key", "value")
        )
        dropout = functools.partial(nn.Dropout(c.attention_dropout), deterministic=deterministic)
        return attention(
            q, k, v, jnp.broadcast_to(mask[:, None, :].astype(bool), (*mask.shape, mask.shape[1])), dropout
        )


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


class BertEmbeddings(nn.Module):
    config: BertConfig
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, input_ids, token_type_ids, deterministic: bool):
        c, kw = self.config, {"dtype": self.dtype, "param_dtype": self.param_dtype}
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed"))
        positions = jnp.arange(input_ids.shape[1])[None]
        x = (
            nn.Embed(c.vocab_size, c.hidden_size, embedding_init=init, name="word_embeddings", **kw)(input_ids)
            + nn.Embed(c.max_position_embeddings, c.hidden_size, embedding_init=init, name="position_embeddings", **kw)(
                positions
            )
            + nn.Embed(c.type_vocab_size, c.hidden_size, embedding_init=init, name="token_type_embeddings", **kw)(
                token_type_ids
            )
        )
        return nn.Dropout(c.hidden_dropout)(layer_norm(c, **kw)(x), deterministic=deterministic)


class BertModel(nn.Module):
    """The encoder (and pooler). Returns ``(hidden (B, T, E), pooled (B, E))``."""

    config: BertConfig
    scan: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False  # recompute each layer in the backward pass (see LlamaForCausalLM)

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic: bool = True):
        c, kw = self.config, {"dtype": self.dtype, "param_dtype": self.param_dtype}
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = BertEmbeddings(c, name="embeddings", **kw)(input_ids, token_type_ids, deterministic)
        x = Encoder(c, self.scan, remat=self.remat, name="encoder", **kw)(x, attention_mask, deterministic)
        return x, BertPooler(c, name="pooler", **kw)(x)


class Encoder(nn.Module):
    config: BertConfig
    scan: bool
    dtype: Dtype
    param_dtype: Dtype
    remat: bool = False

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        kw = {"config": self.config, "dtype": self.dtype, "param_dtype": self.param_dtype}
        return run_layers(
            BertLayer, self.config.num_layers, self.scan, "layer", x, mask, deterministic, remat=self.remat, **kw
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


class BertForSequenceClassification(nn.Module):
    """Encoder + pooler + dropout + ``classifier``; returns float32 logits (B, num_labels)."""

    config: BertConfig
    scan: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False  # recompute each layer in the backward pass (see LlamaForCausalLM)

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic: bool = True):
        c, kw = self.config, {"dtype": self.dtype, "param_dtype": self.param_dtype}
        bert = BertModel(c, self.scan, remat=self.remat, name="bert", **kw)
        _, pooled = bert(input_ids, attention_mask, token_type_ids, deterministic)
        rate = c.hidden_dropout if c.classifier_dropout is None else c.classifier_dropout
        pooled = nn.Dropout(rate)(pooled, deterministic=deterministic)
        return dense(c.num_labels, ("embed", "labels"), use_bias=True, name="classifier", **kw)(pooled).astype(
            jnp.float32
        )


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """The mean of the hidden states of real (unpadded) tokens: sentence-transformers' pooling."""
    mask = attention_mask[..., None].astype(jnp.float32)
    return (hidden.astype(jnp.float32) * mask).sum(1) / jnp.maximum(mask.sum(1), 1e-9)
