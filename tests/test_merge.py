"""merge / unmerge and split / join."""

import jax
import jax.numpy as jnp
import numpy as np

import jlora
from jlora.tree import flatten
from tests.conftest import TOKENS, perturb


def adapted_params(transformer, **config):
    model, base, specs, default = transformer
    config = jlora.LoraConfig(**{**default.to_dict(), **config})
    return model, base, config, perturb(jlora.init(base, config, jax.random.key(1), specs=specs), jax.random.key(2))


def test_join_of_split_is_the_identity(transformer):
    _, _base, config, params = adapted_params(transformer, modules_to_save=["classifier"])
    adapters, frozen = jlora.split(params, config)
    assert set(flatten(adapters)) | set(flatten(frozen)) == set(flatten(params))
    assert all(k[-1] in ("lora_a", "lora_b") or k[0] == "classifier" for k in flatten(adapters))
    assert "classifier" not in frozen
    joined = jlora.join(adapters, frozen)
    assert jax.tree.structure(joined) == jax.tree.structure(params)
    for x, y in zip(jax.tree.leaves(joined), jax.tree.leaves(params), strict=False):
        assert x is y


def test_merge_is_a_plain_tree_the_model_consumes(transformer):
    model, base, config, params = adapted_params(transformer)
    merged = jlora.merge(params, config)
    assert jax.tree.structure(merged) == jax.tree.structure(base)  # no LoRA leaves left
    np.testing.assert_allclose(
        model.apply({"params": merged}, TOKENS), jlora.apply(model, params, config, TOKENS), rtol=1e-5, atol=1e-5
    )


def test_unmerge_recovers_the_adapted_tree(transformer):
    _, _, config, params = adapted_params(transformer, modules_to_save=["classifier"])
    adapters, _ = jlora.split(params, config)
    restored = jlora.unmerge(jlora.merge(params, config), adapters, config)
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    for keys, leaf in flatten(restored).items():
        # float32 W + d - d: one rounding of |W + d| each way, so a few ulp of |W| + |d|
        np.testing.assert_allclose(leaf, flatten(params)[keys], rtol=0, atol=1e-5)


def test_merge_in_float32_casts_once_to_the_kernel_dtype():
    w = jax.random.normal(jax.random.key(0), (64, 48), jnp.bfloat16)
    config = jlora.LoraConfig(r=4, alpha=4, target_modules=["fc"])
    params = jlora.init({"fc": {"kernel": w}}, config, jax.random.key(1))
    params["fc"]["lora_b"] = 1e-2 * jax.random.normal(jax.random.key(2), (4, 48))
    merged = jlora.merge(params, config)["fc"]["kernel"]
    exact = w.astype(jnp.float32) + params["fc"]["lora_a"] @ params["fc"]["lora_b"]
    assert merged.dtype == jnp.bfloat16
    np.testing.assert_array_equal(merged, exact.astype(jnp.bfloat16))  # rounded once, from float32
    # adding a bf16-rounded delta instead rounds twice and lands off the exact value more often
    twice = w + (params["fc"]["lora_a"] @ params["fc"]["lora_b"]).astype(jnp.bfloat16)
    assert int((twice != merged).sum()) > 0


def test_rslora_scales_merge_by_alpha_over_sqrt_r():
    w = jnp.zeros((16, 16))
    for rslora, scale in ((False, 8 / 4), (True, 8 / 2)):
        config = jlora.LoraConfig(r=4, alpha=8, target_modules=["fc"], use_rslora=rslora)
        params = jlora.init({"fc": {"kernel": w}}, config, jax.random.key(1))
        params["fc"]["lora_b"] = jnp.ones((4, 16))
        delta = jlora.merge(params, config)["fc"]["kernel"]
        np.testing.assert_allclose(delta, scale * params["fc"]["lora_a"] @ params["fc"]["lora_b"], rtol=1e-6)


def test_alpha_pattern_sets_per_module_scale():
    base = {"q": {"kernel": jnp.zeros((8, 8))}, "v": {"kernel": jnp.zeros((8, 8))}}
    config = jlora.LoraConfig(r=2, alpha=2, target_modules=["q", "v"], alpha_pattern={"v": 16})
    params = jlora.init(base, config, jax.random.key(1))
    for name in ("q", "v"):
        params[name]["lora_b"] = jnp.ones((2, 8))
    merged = jlora.merge(params, config)
    for name, scale in (("q", 1.0), ("v", 8.0)):
        np.testing.assert_allclose(
            merged[name]["kernel"], scale * params[name]["lora_a"] @ params[name]["lora_b"], rtol=1e-6
        )
