"""Tiny Linen models covering every kernel kind jlora adapts."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class Attention(nn.Module):
    """q/k/v as DenseGeneral (embed -> heads, head_dim), o as (heads, head_dim) -> embed,
    plus an Einsum projection, so one block holds every layout."""

    heads: int = 2
    head_dim: int = 3
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        dense = lambda name: nn.DenseGeneral((self.heads, self.head_dim), dtype=self.dtype, name=name)
        q, k, v = dense("q_proj")(x), dense("k_proj")(x), dense("v_proj")(x)
        logits = jnp.einsum("btnh,bsnh->bnts", q, k) / jnp.sqrt(self.head_dim)
        h = jnp.einsum("bnts,bsnh->btnh", nn.softmax(logits), v)
        out = nn.DenseGeneral(x.shape[-1], axis=(-2, -1), dtype=self.dtype, name="o_proj")(h)
        return nn.Einsum((x.shape[-1], x.shape[-1]), "btd,de->bte", dtype=self.dtype, name="mix")(out)


class Block(nn.Module):
    mlp: int = 12
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        x = x + Attention(dtype=self.dtype, name="attn")(nn.LayerNorm(dtype=self.dtype)(x))
        h = nn.gelu(nn.Dense(self.mlp, dtype=self.dtype, name="up_proj")(x))
        return x + nn.Dense(x.shape[-1], dtype=self.dtype, name="down_proj")(h)


class ScanBlock(nn.Module):
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x, _):
        return Block(dtype=self.dtype, name="block")(x), None


class Transformer(nn.Module):
    """Embedding, `n_layers` blocks (unrolled as layers_i, or scanned as one stacked
    `layers`), a classifier head."""

    n_layers: int = 3
    scan: bool = False
    vocab: int = 11
    embed: int = 8
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.embed, name="embed_tokens")(tokens)
        if self.scan:
            stack = nn.scan(
                ScanBlock,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                length=self.n_layers,
            )
            x, _ = stack(dtype=self.dtype, name="layers")(x, None)
        else:
            for i in range(self.n_layers):
                x = Block(dtype=self.dtype, name=f"layers_{i}")(x)
        return nn.Dense(5, dtype=self.dtype, name="classifier")(x.mean(axis=1))


class MLP(nn.Module):
    """Two plain Dense layers: 2-D kernels only."""

    hidden: int = 16
    out: int = 4

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.out, name="fc2")(nn.relu(nn.Dense(self.hidden, name="fc1")(x)))
