"""Shared helpers: tiny models and adapters made non-trivial."""

from __future__ import annotations

import functools
import os
import zlib

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never download

import jax
import jax.numpy as jnp
import pytest

import jlora
from tests.tiny_models import MLP, Transformer

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "mix", "up_proj", "down_proj"]
TOKENS = (jnp.arange(14).reshape(2, 7) * 5) % 11


def perturb(params, key, scale=0.3):
    """Give every lora_b random values, so the adapters change the model's output."""

    def leaf(path, x):
        if path[-1].key != "lora_b":
            return x
        return scale * jax.random.normal(
            jax.random.fold_in(key, zlib.crc32(jax.tree_util.keystr(path).encode())), x.shape, x.dtype
        )

    return jax.tree_util.tree_map_with_path(leaf, params)


@functools.cache
def _transformer(scan: bool, dtype):
    model = Transformer(scan=scan, dtype=dtype)
    return model, model.init(jax.random.key(0), TOKENS)["params"], jlora.kernel_specs(model, TOKENS)


def build(scan: bool, dtype=None, **config):
    """(model, base params, kernel specs, config) for the tiny transformer."""
    config = jlora.LoraConfig(**{"r": 2, "target_modules": ALL_PROJ, **config})
    return *_transformer(scan, dtype), config


@pytest.fixture(params=[False, True], ids=["unrolled", "scanned"])
def transformer(request):
    return build(request.param)


@pytest.fixture
def mlp():
    model = MLP()
    x = jax.random.normal(jax.random.key(3), (5, 6))
    return model, model.init(jax.random.key(0), x)["params"], x
