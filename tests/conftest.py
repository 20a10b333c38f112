"""Shared helpers: tiny models and adapters made non-trivial."""

from __future__ import annotations

import functools
import os
import tempfile
import zlib

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never download
# 8 simulated CPU devices, for sharded checkpoints and steps; unsharded code uses the first
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
).strip()
# one persistent compilation cache for the test processes and the runs they start: the
# same tiny models compile once (entries are keyed by program, flags and devices)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jlora-test-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# the GGUF load cache (jlora.models.cache) of the test processes, never the user's: shared by
# test sessions like the compilation cache (one entry per GGUF file, so it does not grow)
os.environ["JLORA_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), "jlora-test-load-cache")

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
def fresh_compiles():
    """Compile afresh, bypassing the persistent cache. On jaxlib 0.10.2 an XLA:CPU executable
    with cross-device collectives that is loaded back from that cache can deadlock in its
    all-reduce rendezvous (6 of 8 host devices arrive, XLA aborts after 40 s), so the tests
    that run programs over a mesh compile them in-process."""
    from jax.experimental.compilation_cache import compilation_cache

    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    yield
    jax.config.update("jax_enable_compilation_cache", enabled)
    compilation_cache.reset_cache()


@pytest.fixture
def mlp():
    model = MLP()
    x = jax.random.normal(jax.random.key(3), (5, 6))
    return model, model.init(jax.random.key(0), x)["params"], x


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A random Llama checkpoint saved by transformers (`tiny_task.hf_llama`, vocabulary 23)."""
    from tests import tiny_task

    return tiny_task.hf_llama(tmp_path_factory.mktemp("llama"), vocab_size=23)
