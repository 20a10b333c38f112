"""The tree functions on NNX state: nnx.split -> pure dict -> jlora -> back."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jlora


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(6, 6, rngs=rngs) for _ in range(3)])
        self.head = nnx.Linear(6, 2, rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x = nnx.relu(layer(x))
        return self.head(x)


def test_nnx_state_init_split_join_merge():
    model = Net(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 6))
    base_out = model(x)
    graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)
    config = jlora.LoraConfig(r=2, alpha=4, target_modules=r"layers/\d+", layers=[1, 2], modules_to_save=["head"])
    params = jlora.init(pure, config, jax.random.key(2))
    assert set(params["layers"][1]) == {"kernel", "bias", "lora_a", "lora_b"}
    assert set(params["layers"][0]) == {"kernel", "bias"}  # layer 0 not selected
    adapters, base = jlora.split(params, config)
    assert set(adapters) == {"layers", "head"}
    joined = jlora.join(adapters, base)
    assert jax.tree.structure(joined) == jax.tree.structure(params)
    for layer in (1, 2):
        params["layers"][layer]["lora_b"] = jnp.ones((2, 6)) * 0.1 * layer
    merged = jlora.merge(params, config)
    nnx.replace_by_pure_dict(state, merged)
    out = nnx.merge(graphdef, state)(x)
    # reference: the factored forward written out by hand
    ref = x
    for i in range(3):
        p = params["layers"][i]
        y = ref @ p["kernel"] + p["bias"]
        if "lora_a" in p:
            y = y + config.scale(f"layers/{i}", 2) * (ref @ p["lora_a"]) @ p["lora_b"]
        ref = jax.nn.relu(y)
    ref = ref @ params["head"]["kernel"] + params["head"]["bias"]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert not np.allclose(out, base_out, atol=1e-3)  # the adapters did change the model
