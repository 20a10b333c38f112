"""Sharded training on 8 simulated CPU devices: meshes, derived shardings, equal results."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jlora
from jlora import sharding
from jlora import train as training
from jlora.data import Split
from jlora.models import LlamaConfig, LlamaForCausalLM
from jlora.tree import flatten, path_str

pytestmark = [
    pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (conftest sets them)"),
    pytest.mark.usefixtures("fresh_compiles"),
]

CONFIG = LlamaConfig(
    vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQ = 12


def test_mesh_specs():
    assert sharding.parse_mesh("data=2,fsdp=2,tensor=2", 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert sharding.parse_mesh("tensor=2,data=-1", 8) == {"data": 4, "fsdp": 1, "tensor": 2}
    assert sharding.parse_mesh({"fsdp": 8}, 8) == {"data": 1, "fsdp": 8, "tensor": 1}
    with pytest.raises(ValueError, match="has 4 devices, but there are 8"):
        sharding.parse_mesh("data=4", 8)
    with pytest.raises(ValueError, match=r"unknown axes \['model'\]"):
        sharding.parse_mesh("model=8", 8)
    with pytest.raises(ValueError, match="do not split into 3"):
        sharding.parse_mesh("data=3,tensor=-1", 8)
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.devices.size == 8
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def setup(scan: bool):
    model = LlamaForCausalLM(CONFIG, scan=scan)
    ids = jax.random.randint(jax.random.key(0), (16, SEQ), 1, CONFIG.vocab_size)
    base = jax.tree.map(np.asarray, nn_unbox(model.init(jax.random.key(1), ids[:1])["params"]))
    lora = jlora.LoraConfig(r=4, alpha=8, target_modules=TARGETS, dropout=0.1)
    specs = jlora.kernel_specs(model, jax.ShapeDtypeStruct((1, 2), jnp.int32))
    params = jlora.init(base, lora, jax.random.key(2), specs=specs)
    mask = np.ones((16, SEQ), np.int32)
    mask[:3, :4] = 0  # some left padding
    split = Split({"input_ids": np.asarray(ids), "attention_mask": mask, "loss_mask": mask})
    return model, lora, params, split


def nn_unbox(tree):
    import flax.linen as nn

    return nn.meta.unbox(tree)


STEPS = 3


def train(scan, mesh=None, checkpoints=None, steps=STEPS):
    """Fit the tiny Llama for `steps` steps (2 micro-batches of 8, dropout on)."""
    model, lora, params, split = setup(scan)
    adapters, base = jlora.split(params, lora)
    task = training.Task(model, lora, "causal", tail=SEQ)
    config = training.TrainConfig(
        steps=steps, batch_size=8, grad_accum=2, learning_rate=1e-2, warmup_steps=1, checkpoint_every=STEPS
    )
    return training.fit(task, adapters, base, split, config, progress=False, mesh=mesh, checkpoints=checkpoints)


@pytest.fixture(scope="module", params=[False, True], ids=["unrolled", "scanned"])
def single(request):
    adapters, history = train(request.param)
    return request.param, jax.tree.map(np.asarray, adapters), [h["loss"] for h in history]


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 2, 4)], ids=["data8", "2x2x2", "fsdp2-tensor4"])
def test_sharded_steps_equal_the_single_device_steps(single, shape):
    scan, expected, losses = single
    mesh = sharding.make_mesh(dict(zip(sharding.AXES, shape, strict=True)))
    adapters, history = train(scan, mesh)
    # float32; the sharded step sums gradients and losses in another order: ~1e-7 relative per step
    np.testing.assert_allclose([h["loss"] for h in history], losses, rtol=1e-5, atol=1e-6)
    for name, leaf in flatten(adapters).items():
        np.testing.assert_allclose(np.asarray(leaf), flatten(expected)[name], atol=1e-5, err_msg=path_str(name))
        assert leaf.sharding.mesh == mesh


def test_adapter_and_optimizer_shardings_follow_their_kernels():
    model, lora, params, _ = setup(scan=True)
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    tx = training.make_optimizer(training.TrainConfig(), lora)
    placement = training.Placement.derive(mesh, model, params, lora, tx)
    base, adapters = flatten(placement.base), flatten(placement.adapters)
    # q_proj: kernel (layers, embed, heads, head_dim); lora_a (layers, embed, r); lora_b (layers, r, heads, head_dim)
    q = ("model", "layers", "self_attn", "q_proj")
    assert base[(*q, "kernel")].spec == P(None, "fsdp", "tensor", None)
    assert adapters[(*q, "lora_a")].spec == P(None, "fsdp", None)
    assert adapters[(*q, "lora_b")].spec == P(None, None, "tensor", None)
    o = ("model", "layers", "self_attn", "o_proj")  # (layers, heads, head_dim, embed): two input axes
    assert adapters[(*o, "lora_a")].spec == P(None, "tensor", None, None)
    assert adapters[(*o, "lora_b")].spec == P(None, None, "fsdp")
    assert base[("lm_head", "kernel")].spec == P("fsdp", "tensor")  # (embed, vocab)
    flat = flatten(params)
    for keys, got in adapters.items():  # A = kernel's leading axes + replicated rank; B = stack + rank + trailing
        kernel = tuple(base[(*keys[:-1], "kernel")].spec) + (None,) * 4
        k_ndim = flat[(*keys[:-1], "kernel")].ndim
        a_ndim, b_ndim = flat[(*keys[:-1], "lora_a")].ndim, flat[(*keys[:-1], "lora_b")].ndim
        spec = tuple(got.spec) + (None,) * 4
        if keys[-1] == "lora_a":
            assert spec[: a_ndim - 1] == kernel[: a_ndim - 1] and spec[a_ndim - 1] is None, path_str(keys)
        else:
            stack = a_ndim + b_ndim - 2 - k_ndim
            n_out = b_ndim - 1 - stack
            assert spec[:stack] == kernel[:stack] and spec[stack] is None, path_str(keys)
            assert spec[stack + 1 : b_ndim] == kernel[k_ndim - n_out : k_ndim], path_str(keys)
    # Adam's moments take their adapter's sharding; counts are replicated
    state = jax.tree.leaves(placement.opt_state, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
    moment_specs = [s.spec for s in state if s.spec != P()]
    assert len(moment_specs) == 2 * len(adapters)
    assert sorted(map(str, moment_specs)) == sorted(map(str, [s.spec for s in adapters.values()] * 2))


def test_sharded_steps_never_move_the_base():
    model, lora, params, split = setup(scan=True)
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    config = training.TrainConfig(steps=3, batch_size=8)
    tx = training.make_optimizer(config, lora)
    placement = training.Placement.derive(mesh, model, params, lora, tx)
    adapters, base = jlora.split(params, lora)
    adapters, base = jax.device_put(adapters, placement.adapters), jax.device_put(base, placement.base)
    opt_state = jax.jit(tx.init, out_shardings=placement.opt_state)(adapters)
    step = training.make_train_step(training.Task(model, lora, "causal", tail=SEQ), tx, jax.random.key(0), placement)
    pointers = [b.data.unsafe_buffer_pointer() for leaf in jax.tree.leaves(base) for b in leaf.addressable_shards]
    batches = [
        sharding.shard_batch(training.shape_batch(split.take(np.arange(8) + 8 * (i % 2)), 1), mesh, 8, batch_axis=1)
        for i in range(3)
    ]
    numbers = [jax.device_put(jnp.int32(i), jax.sharding.NamedSharding(mesh, P())) for i in range(3)]
    step(adapters, opt_state, base, batches[0], numbers[0])  # compile outside the guard (it may move constants)
    adapters = jax.device_put(jlora.split(params, lora)[0], placement.adapters)
    opt_state = jax.jit(tx.init, out_shardings=placement.opt_state)(adapters)
    with jax.transfer_guard("disallow"):  # no host<->device or device<->device copy of anything
        for batch, number in zip(batches, numbers, strict=True):
            adapters, opt_state, _ = step(adapters, opt_state, base, batch, number)
    after = [b.data.unsafe_buffer_pointer() for leaf in jax.tree.leaves(base) for b in leaf.addressable_shards]
    assert after == pointers  # the same device buffers: the base was neither copied nor donated


def test_interleaved_weights_under_interpret_shard_by_their_learned_roles():
    """A gemma-style 'NDH' weight (roles 'oio'): A (D, r) takes D's mesh axis, B (r, N, H) N's
    and H's; a sharded jit of the factored function equals the unsharded one (f32, 1e-5)."""
    from jlora import interpret

    def fn(p, x):  # x: (B, T, D); w: (N, D, H) heads-first, as gemma's q_einsum
        return jnp.einsum("BTNH,NHD->BTD", jnp.tanh(jnp.einsum("BTD,NDH->BTNH", x, p["attn"]["w"])), p["out"])

    k = jax.random.split(jax.random.key(0), 3)
    params = {"attn": {"w": jax.random.normal(k[0], (4, 8, 6)) / 3}, "out": jax.random.normal(k[1], (4, 6, 8)) / 5}
    x = jax.random.normal(k[2], (4, 3, 8))
    config = jlora.LoraConfig(r=2, target_modules=["attn", "out"])
    layouts = interpret.lora_specs(fn, params, x, targets=config)
    assert layouts["attn/w"].roles == "oio" and layouts["out"].roles == "iio"
    adapted = interpret.init(params, layouts, config, jax.random.key(1))
    adapted = jax.tree.map(lambda v: v + 0.1, adapted)  # B != 0
    base_specs = {"attn": {"w": P("tensor", "fsdp", None)}, "out": P("tensor", None, "fsdp")}
    specs = flatten(sharding.adapter_specs(adapted, base_specs, layouts))
    assert specs[("attn", "w_lora_a")] == P("fsdp", None) and specs[("attn", "w_lora_b")] == P(None, "tensor", None)
    assert specs[("out_lora_a",)] == P("tensor", None, None) and specs[("out_lora_b",)] == P(None, "fsdp")
    with pytest.raises(ValueError, match="pass layouts=lora_specs"):
        sharding.adapter_specs(adapted, base_specs)
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    shardings = jax.tree.map(
        lambda s: jax.sharding.NamedSharding(mesh, s),
        sharding.adapter_specs(adapted, base_specs, layouts),
        is_leaf=lambda s: isinstance(s, P),
    )
    forward = interpret.lora(fn, config)
    placed = jax.device_put(adapted, shardings)
    np.testing.assert_allclose(jax.jit(forward)(placed, x), forward(adapted, x), rtol=1e-5, atol=1e-5)
