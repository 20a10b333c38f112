"""Training only the adapters: gradients, optimizer masking, frozen leaves untouched."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from jlora.tree import flatten
from tests.conftest import ALL_PROJ, TOKENS, build
from tests.test_apply import intermediate_shapes

TARGET = jax.nn.one_hot(jnp.array([1, 3]), 5)


def loss_fn(model, config):
    def loss(params):
        return optax.softmax_cross_entropy(jlora.apply(model, params, config, TOKENS), TARGET).mean()

    return loss


def recommended_step(model, config, tx):
    """The documented step: differentiate `adapters` only, the frozen base closed over."""
    loss = loss_fn(model, config)

    @jax.jit
    def step(adapters, base, opt_state):
        grads = jax.grad(lambda adapters: loss(jlora.join(adapters, base)))(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state

    return step


def assert_trained(before, after, config):
    """Every frozen leaf bit-identical, every trainable leaf moved."""
    after = flatten(after)
    for keys, leaf in flatten(before).items():
        if jlora.tree.is_trainable(keys, config):
            assert not np.array_equal(after[keys], leaf), f"{keys} did not train"
        else:
            np.testing.assert_array_equal(after[keys], leaf, err_msg=f"{keys} changed")


def test_recommended_step_differentiates_adapters_only(transformer):
    model, base, specs, config = transformer
    params = jlora.init(base, config, jax.random.key(1), specs=specs)
    adapters, frozen = jlora.split(params, config)
    loss = loss_fn(model, config)
    grads = jax.grad(lambda a: loss(jlora.join(a, frozen)))(adapters)
    assert jax.tree.structure(grads) == jax.tree.structure(adapters)
    # no frozen gradient is computed: nothing shaped like the embedding (11, 8) or the
    # classifier kernel (8, 5) is built; differentiating the whole tree builds both.
    frozen_shapes = {(11, 8), (8, 5)}
    adapter_only = jax.make_jaxpr(jax.grad(lambda a: loss(jlora.join(a, frozen))))(adapters).jaxpr
    assert not intermediate_shapes(adapter_only) & frozen_shapes
    assert intermediate_shapes(jax.make_jaxpr(jax.grad(loss))(params).jaxpr) >= frozen_shapes


def test_recommended_step_trains_adapters_and_keeps_the_base(transformer):
    model, base, specs, _ = transformer
    config = jlora.LoraConfig(r=2, target_modules=ALL_PROJ, modules_to_save=["classifier"])
    params = jlora.init(base, config, jax.random.key(1), specs=specs)
    tx = jlora.optimizer(optax.adamw(1e-2, weight_decay=0.1), config)
    adapters, frozen = jlora.split(params, config)
    step, opt_state = recommended_step(model, config, tx), tx.init(adapters)
    for _ in range(3):  # B moves on step 1; A once B is non-zero
        adapters, opt_state = step(adapters, frozen, opt_state)
    assert_trained(params, jlora.join(adapters, frozen), config)
    assert "classifier" in adapters  # modules_to_save train fully


def test_optimizer_on_the_full_tree_freezes_everything_else(transformer):
    model, base, specs, config = transformer
    params = jlora.init(base, config, jax.random.key(1), specs=specs)
    tx = jlora.optimizer(optax.adamw(1e-2, weight_decay=0.1), config)  # decay must not touch frozen leaves
    opt_state = tx.init(params)
    loss = loss_fn(model, config)

    @jax.jit
    def step(params, opt_state):
        updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    trained = params
    for _ in range(3):
        trained, opt_state = step(trained, opt_state)
    assert_trained(params, trained, config)
    # frozen leaves carry no optimizer state: Adam's moments are adapter-sized
    moments = sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim > 0)
    adapter_size = sum(x.size for x in jax.tree.leaves(jlora.split(params, config)[0]))
    assert moments == 2 * adapter_size


def test_unselected_stacked_layers_stay_exact_no_ops():
    model, base, specs, _ = build(scan=True)
    config = jlora.LoraConfig(r=2, target_modules=ALL_PROJ, layers=[2])
    params = jlora.init(base, config, jax.random.key(1), specs=specs)
    tx = jlora.optimizer(optax.adamw(1e-2, weight_decay=0.1), config)
    adapters, frozen = jlora.split(params, config)
    step, opt_state = recommended_step(model, config, tx), tx.init(adapters)
    for _ in range(3):
        adapters, opt_state = step(adapters, frozen, opt_state)
    for keys, leaf in flatten(adapters).items():
        assert not leaf[:2].any(), f"{keys}: layers 0-1 must stay zero"  # A = B = 0 is a fixed point
        assert leaf[2].any()
    merged = flatten(jlora.merge(jlora.join(adapters, frozen), config))
    for keys, kernel in flatten(base).items():
        if keys[-1] == "kernel" and keys[0] == "layers":
            np.testing.assert_array_equal(merged[keys][:2], kernel[:2])


def test_labels_and_mask():
    params = {
        "fc": {"kernel": jnp.zeros((4, 4)), "lora_a": jnp.zeros((4, 1)), "lora_b": jnp.zeros((1, 4))},
        "head": {"kernel": jnp.zeros((4, 2)), "bias": jnp.zeros(2)},
    }
    config = jlora.LoraConfig(r=1, target_modules=["fc"], modules_to_save=["head"])
    assert jlora.labels(params, config) == {
        "fc": {"kernel": "frozen", "lora_a": "trainable", "lora_b": "trainable"},
        "head": {"kernel": "trainable", "bias": "trainable"},
    }
    assert jlora.trainable_mask(params, config)["fc"] == {"kernel": False, "lora_a": True, "lora_b": True}
