"""The tree functions on NNX state: nnx.split -> pure dict -> jlora -> back."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jlora
import jlora.peft


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


# -- an NNX model trained through jlora.interpret: Orbax checkpoints and PEFT both ways ---------


class MLP(nnx.Module):
    """Layers in an nnx.List, as NNX code keeps them; its torch twin is `torch_mlp`."""

    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(8, 8, rngs=rngs) for _ in range(2)])
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x = jnp.tanh(layer(x))
        return self.head(x)


def torch_mlp(pure: dict):
    """The same model in torch, weights copied: module names ``layers.0``, ``layers.1``, ``head``."""
    torch = pytest.importorskip("torch")

    class Twin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(2)])
            self.head = torch.nn.Linear(8, 3)

        def forward(self, x):
            for layer in self.layers:
                x = torch.tanh(layer(x))
            return self.head(x)

    twin = Twin()
    with torch.no_grad():
        pairs = [(twin.layers[0], pure["layers"][0]), (twin.layers[1], pure["layers"][1]), (twin.head, pure["head"])]
        for module, p in pairs:
            module.weight.copy_(torch.from_numpy(np.asarray(p["kernel"]).T.copy()))
            module.bias.copy_(torch.from_numpy(np.array(p["bias"])))
    return twin.eval()


def module_names(keys: tuple, layer: int | None) -> str:
    return ".".join(map(str, keys))  # ('layers', 0) -> 'layers.0': the torch twin's names


def test_nnx_trained_through_interpret_checkpoints_and_round_trips_peft(tmp_path):
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    from jlora import interpret
    from jlora.checkpoint import Checkpoints, fingerprint

    graphdef, state = nnx.split(MLP(nnx.Rngs(0)))
    pure = nnx.to_pure_dict(state)
    fn = lambda p, x: nnx.merge(graphdef, p)(x)
    x, y = jax.random.normal(jax.random.key(1), (16, 8)), jax.random.normal(jax.random.key(2), (16, 3))
    config = jlora.LoraConfig(r=2, alpha=4, target_modules=r"layers/\d+|head")
    specs = interpret.lora_specs(fn, pure, x, targets=config)
    adapters, base = jlora.split(interpret.init(pure, specs, config, jax.random.key(3)), config)
    forward = interpret.lora(fn, config)
    loss = lambda ad: jnp.mean((forward(jlora.join(ad, base), x) - y) ** 2)
    tx = jlora.optimizer(optax.adam(0.05), config)
    opt_state = tx.init(adapters)
    before = loss(adapters)
    for _ in range(20):
        grads = jax.grad(loss)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        adapters = optax.apply_updates(adapters, updates)
    assert loss(adapters) < 0.9 * before  # it trains

    with Checkpoints(tmp_path / "ckpt", async_save=False) as checkpoints:
        checkpoints.save(20, adapters, opt_state, config=config, base_fingerprint=fingerprint(base))
        restored = checkpoints.restore(jax.tree.map(jnp.zeros_like, adapters), base_fingerprint=fingerprint(base))
    for a, b in zip(jax.tree.leaves(restored.adapters), jax.tree.leaves(adapters), strict=True):
        np.testing.assert_array_equal(a, b)
    assert restored.config == config

    trained = jlora.join(adapters, base)
    jlora.peft.export(trained, config, tmp_path / "peft", module_names, task_type=None)
    twin = peft.PeftModel.from_pretrained(torch_mlp(pure), tmp_path / "peft").eval()
    with torch.no_grad():
        theirs = twin(torch.from_numpy(np.array(x))).numpy()
    np.testing.assert_allclose(forward(trained, x), theirs, atol=1e-5, rtol=1e-5)  # f32, another matmul library

    imported, imported_config = jlora.peft.load(tmp_path / "peft", pure, module_names)
    np.testing.assert_allclose(forward(imported, x), forward(trained, x), atol=1e-6, rtol=1e-6)
    assert imported_config.scale("layers/0", 2) == config.scale("layers/0", 2)
