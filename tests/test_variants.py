"""LoRA variants checked against peft itself on tiny transformers Llamas: LoRA+ (peft's
`create_loraplus_optimizer`), PiSSA and OLoRA initialisation (peft's `pissa_init` /
`olora_init`) and their conversion to a plain LoRA for the original base (peft's
``save_pretrained(path_initial_model_for_weight_conversion=...)``)."""

import json
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
import jlora.models
import jlora.peft
from jlora.models import hf_module_name
from jlora.optim import decay_mask
from jlora.spec import adapter_spec
from jlora.tree import LORA_A, LORA_B, adapted_modules, path_str
from tests import tiny_task

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS, IDS = tiny_task.PROJECTIONS, tiny_task.IDS


@pytest.fixture(scope="module")
def gapped_llama(tmp_path_factory):
    """The tiny Llama with every projection's singular values past the second shrunk 1000×, so
    randomized SVD of rank 2 converges to the exact one within float32 in a few iterations."""
    path = tmp_path_factory.mktemp("gapped")
    model = transformers.LlamaForCausalLM.from_pretrained(tiny_task.hf_llama(path, vocab_size=23))
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in TARGETS:
                u, s, vh = torch.linalg.svd(module.weight, full_matrices=False)
                module.weight.copy_(u @ torch.diag(torch.cat([s[:2], s[2:] * 1e-3])) @ vh)
    model.save_pretrained(path)
    return path


def peft_model(base_dir, **lora):
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    return peft.get_peft_model(model, peft.LoraConfig(**lora))


def logits_of(model, ids=IDS) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor(ids)).logits.numpy()


def per_layer(params, config):
    """(HF module name, kernel (in, out), s·A·B (in, out)) per adapted module and layer."""
    for keys, leaves in adapted_modules(params).items():
        kernel, a, b = (np.asarray(leaves[k], np.float32) for k in ("kernel", LORA_A, LORA_B))
        spec = adapter_spec(kernel.shape, a.shape, b.shape)
        r = a.shape[-1]
        scale = config.scale(path_str(keys), r)
        for index in range(kernel.shape[0]) if spec.stack else [None]:
            k, la, lb = (x[index] for x in (kernel, a, b)) if spec.stack else (kernel, a, b)
            yield (
                hf_module_name(keys, index),
                k.reshape(la.size // r, -1),
                scale * la.reshape(-1, r) @ lb.reshape(r, -1),
            )


@pytest.mark.parametrize(
    ("init", "scan", "base"),
    [("pissa", True, "llama"), ("olora", False, "llama"), ("pissa_niter_4", True, "gapped_llama")],
)
def test_pissa_and_olora_init_equal_peft_and_keep_the_model(request, init, scan, base):
    base_dir = request.getfixturevalue(base)
    theirs = peft_model(
        base_dir, r=2, lora_alpha=4, target_modules=TARGETS, alpha_pattern={"v_proj": 3.0}, init_lora_weights=init
    )
    pretrained = jlora.models.load(base_dir, scan=scan, tokenizer=False)
    config = jlora.LoraConfig(r=2, alpha=4, target_modules=TARGETS, alpha_pattern={"v_proj": 3.0}, init=init)
    params = jlora.init(pretrained.params, config, jax.random.key(0), specs=pretrained.kernel_specs())
    checked = 0
    for name, kernel, delta in per_layer(params, config):
        layer = theirs.base_model.model.get_submodule(name)
        a, b = layer.lora_A["default"].weight.detach().numpy(), layer.lora_B["default"].weight.detach().numpy()
        # B·A and the residual are unique; A and B alone only up to the signs of singular / QR vectors
        np.testing.assert_allclose(delta.T, layer.scaling["default"] * b @ a, atol=1e-5, rtol=0, err_msg=name)
        np.testing.assert_allclose(kernel.T, layer.base_layer.weight.detach().numpy(), atol=1e-5, rtol=0, err_msg=name)
        checked += 1
    assert checked == 2 * len(TARGETS)
    ours = jlora.apply(pretrained.model, params, config, jnp.asarray(IDS))
    np.testing.assert_allclose(ours, pretrained.model.apply({"params": pretrained.params}, IDS), atol=1e-4, rtol=0)


def causal_lm_loss(logits: jax.Array, ids: jax.Array) -> jax.Array:
    """transformers' loss for ``labels=input_ids``: next-token cross-entropy, mean over tokens."""
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def train(pretrained, params, config, tx, steps: int):
    """`steps` full-batch steps of `jlora.optimizer(tx, config)` on the adapters of `params`."""
    tx = jlora.optimizer(tx, config)
    ids = jnp.asarray(IDS)

    @jax.jit
    def step(adapters, base, state):
        loss = lambda adapters: causal_lm_loss(
            jlora.apply(pretrained.model, jlora.join(adapters, base), config, ids), ids
        )
        updates, state = tx.update(jax.grad(loss)(adapters), state, adapters)
        return optax.apply_updates(adapters, updates), state

    adapters, base = jlora.split(params, config)
    state = tx.init(adapters)
    for _ in range(steps):
        adapters, state = step(adapters, base, state)
    return jlora.join(adapters, base)


def test_loraplus_adamw_equals_peft_create_loraplus_optimizer(llama, tmp_path):
    lr, ratio, decay, steps = 1e-3, 4.0, 1.0, 3  # decay large enough to show within the tolerance
    theirs = peft_model(
        llama,
        r=4,
        lora_alpha=8,
        target_modules=TARGETS,
        init_lora_weights=False,  # random A and B: both get gradients from the first step
        modules_to_save=["model.norm", "lm_head"],  # a 1-D parameter (B's group) and a 2-D one (A's)
    )
    theirs.save_pretrained(tmp_path / "initial")
    pretrained = jlora.models.load(llama, tokenizer=False)
    params, config = jlora.peft.load(tmp_path / "initial", pretrained.params, hf_module_name)
    assert set(config.modules_to_save) == {"model/norm", "lm_head"}

    from peft.optimizers import create_loraplus_optimizer

    opt = create_loraplus_optimizer(
        theirs, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio, loraplus_weight_decay=decay
    )
    theirs.train()
    for _ in range(steps):
        opt.zero_grad()
        theirs(input_ids=torch.tensor(IDS), labels=torch.tensor(IDS)).loss.backward()
        opt.step()
    tx = jlora.loraplus(optax.adamw(lr, weight_decay=decay, mask=decay_mask), ratio=ratio)
    trained = train(pretrained, params, config, tx, steps)

    from safetensors.numpy import load_file

    ours = load_file(
        jlora.peft.export(trained, config, tmp_path / "ours", hf_module_name) / "adapter_model.safetensors"
    )
    expected = peft.get_peft_model_state_dict(theirs)
    assert set(ours) == set(expected)
    initial = load_file(tmp_path / "initial" / "adapter_model.safetensors")
    for key, value in expected.items():
        assert not np.allclose(value.numpy(), initial[key], atol=1e-4), f"{key} did not train"
        np.testing.assert_allclose(ours[key], value.detach().numpy(), atol=1e-5, rtol=0, err_msg=key)


def test_loraplus_scales_b_and_one_dimensional_updates_only():
    grads = {"q": {"kernel": jnp.ones((2, 3)), LORA_A: jnp.ones((2, 1)), LORA_B: jnp.ones((1, 3))}, "n": jnp.ones(3)}
    tx = jlora.loraplus(optax.sgd(0.5), ratio=8.0)
    updates, _ = tx.update(grads, tx.init(grads))
    assert jax.tree.map(lambda u: float(u.reshape(-1)[0]), updates) == {
        "q": {"kernel": -0.5, LORA_A: -0.5, LORA_B: -4.0},
        "n": -4.0,
    }
    with pytest.raises(ValueError, match="ratio must be > 0"):
        jlora.loraplus(optax.sgd(0.5), ratio=0)


def test_decay_mask_spares_biases_and_layer_norms_as_peft_does():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.RMSNorm(name="rms")(nn.LayerNorm(name="ln")(nn.Dense(4, name="fc")(x)))

    params = Net().init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    assert decay_mask(params) == {
        "fc": {"kernel": True, "bias": False},
        "ln": {"scale": False, "bias": False},  # torch nn.LayerNorm: no decay
        "rms": {"scale": True},  # transformers decays RMSNorm weights (not an nn.LayerNorm)
    }


@pytest.mark.parametrize(("init", "scan"), [("pissa", True), ("olora", False)])
def test_trained_pissa_and_olora_export_converted_for_the_original_base(llama, tmp_path, init, scan):
    pretrained = jlora.models.load(llama, scan=scan, tokenizer=False)
    config = jlora.LoraConfig(r=2, alpha=4, target_modules=TARGETS, rank_pattern={"o_proj": 1}, init=init)
    initial = jlora.init(pretrained.params, config, jax.random.key(0), specs=pretrained.kernel_specs())
    trained = train(pretrained, initial, config, jlora.loraplus(optax.adamw(1e-2), ratio=4.0), steps=3)
    with pytest.raises(ValueError, match="path_initial_model_for_weight_conversion"):
        jlora.peft.export(trained, config, tmp_path / "unconverted", hf_module_name)
    out = jlora.peft.export(trained, config, tmp_path / "adapter", hf_module_name, initial=initial)
    exported = json.loads((out / "adapter_config.json").read_text())
    assert (exported["r"], exported["lora_alpha"], exported["init_lora_weights"]) == (4, 8, True)
    assert set(exported["rank_pattern"].values()) == {2}
    ours = jlora.apply(pretrained.model, trained, config, jnp.asarray(IDS))  # on the residual base
    assert not np.allclose(ours, pretrained.model.apply({"params": pretrained.params}, IDS), atol=1e-3)
    base = transformers.AutoModelForCausalLM.from_pretrained(llama)  # the original base
    np.testing.assert_allclose(ours, logits_of(peft.PeftModel.from_pretrained(base, out)), atol=1e-4, rtol=0)
    back, imported = jlora.peft.load(out, pretrained.params, hf_module_name)
    np.testing.assert_allclose(jlora.apply(pretrained.model, back, imported, jnp.asarray(IDS)), ours, atol=1e-4)


def test_peft_pissa_adapter_is_refused_and_its_converted_form_imports(llama, tmp_path):
    model = peft_model(llama, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
    model.peft_config["default"].init_lora_weights = True  # peft's recipe: the initial adapter as a plain one
    model.save_pretrained(tmp_path / "initial")
    model.peft_config["default"].init_lora_weights = "pissa"
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # as after training
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(tmp_path / "pissa")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notice on the temporary second adapter
        model.save_pretrained(
            tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial")
        )
    theirs = logits_of(model)  # the residual base with the trained adapter
    pretrained = jlora.models.load(llama, tokenizer=False)
    with pytest.raises(ValueError, match=r"init_lora_weights='pissa' changes the base weights.*path_initial_model"):
        jlora.peft.load(tmp_path / "pissa", pretrained.params, hf_module_name)
    params, config = jlora.peft.load(tmp_path / "converted", pretrained.params, hf_module_name)
    assert config.r == 4
    np.testing.assert_allclose(jlora.apply(pretrained.model, params, config, jnp.asarray(IDS)), theirs, atol=1e-4)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_base_changing_inits_on_every_kernel_layout_and_a_layer_subset_keep_the_model(init):
    from tests.conftest import TOKENS, build

    model, base, specs, config = build(scan=True, init=init, layers=[1])
    params = jlora.init(base, config, jax.random.key(0), specs=specs)
    for keys, leaves in adapted_modules(params).items():
        original = jlora.tree.flatten(base)[(*keys, "kernel")]
        np.testing.assert_array_equal(leaves["kernel"][0], original[0])  # layer 0 has no adapter
        assert not np.any(leaves[LORA_A][0]) and not np.any(leaves[LORA_B][0])
        assert not np.allclose(leaves["kernel"][1], original[1], atol=1e-3), path_str(keys)
    merged = jlora.tree.flatten(jlora.merge(params, config))  # residual + s·A·B is the original kernel
    for keys, leaf in jlora.tree.flatten(base).items():
        np.testing.assert_allclose(merged[keys], leaf, atol=1e-5, rtol=0, err_msg=path_str(keys))
    np.testing.assert_allclose(
        jlora.apply(model, params, config, TOKENS), model.apply({"params": base}, TOKENS), atol=1e-5, rtol=0
    )
