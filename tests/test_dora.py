"""DoRA (`LoraConfig(use_dora=True)`) checked against peft's ``use_dora=True`` on a tiny
transformers Llama: logits both ways through the PEFT format, scanned and unscanned, and the
gradients of A, B and the magnitude; merged and factored outputs on every kernel layout."""

import json

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
from jlora.quantize import dequantize_tree, quantize_model
from jlora.tree import LORA_MAGNITUDE, flatten, unflatten
from tests import tiny_task
from tests.conftest import TOKENS, build, perturb

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS, IDS = tiny_task.PROJECTIONS, tiny_task.IDS


def peft_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor(IDS)).logits.numpy()


def scaled_magnitudes(params, key, spread=0.2):
    """Every DoRA magnitude times a random factor around 1, as after training."""

    def leaf(path, x):
        if path[-1].key != LORA_MAGNITUDE:
            return x
        return x * (1 + spread * jax.random.normal(jax.random.fold_in(key, len(jax.tree_util.keystr(path))), x.shape))

    return jax.tree_util.tree_map_with_path(leaf, params)


def peft_dora(base_dir, **lora):
    """A peft DoRA model with random B and magnitudes away from their initial norms."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    model = peft.get_peft_model(model, peft.LoraConfig(use_dora=True, init_lora_weights=False, **lora))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.randn(param.shape, generator=generator))
    return model


def test_peft_dora_adapter_imports_with_equal_logits_scanned_and_unscanned(llama, tmp_path):
    theirs = peft_dora(
        llama, r=4, lora_alpha=8, target_modules=TARGETS, alpha_pattern={"v_proj": 3.0}, layers_to_transform=[1]
    )
    theirs.save_pretrained(tmp_path / "adapter")
    keys = jlora.peft.read(tmp_path / "adapter")[1]
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector" in keys
    expected = peft_logits(theirs)
    for scan in (False, True):  # scanned: layer 0 gets A = B = 0 and m = ‖W‖, a no-op
        pretrained = jlora.models.load(llama, scan=scan, tokenizer=False)
        params, config = jlora.peft.load(tmp_path / "adapter", pretrained.params, hf_module_name)
        assert config.use_dora
        ours = jlora.apply(pretrained.model, params, config, jnp.asarray(IDS))
        np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0, err_msg=f"scan={scan}")  # float32 both sides


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_jlora_dora_export_loads_in_peft_with_equal_logits(llama, tmp_path, scan):
    pretrained = jlora.models.load(llama, scan=scan, tokenizer=False)
    config = jlora.LoraConfig(r=4, alpha=8, target_modules=TARGETS, rank_pattern={"o_proj": 2}, use_dora=True)
    params = jlora.init(pretrained.params, config, jax.random.key(0), specs=pretrained.kernel_specs())
    params = scaled_magnitudes(perturb(params, jax.random.key(1)), jax.random.key(2))
    out = jlora.peft.export(params, config, tmp_path / "adapter", hf_module_name)
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    ours = jlora.apply(pretrained.model, params, config, jnp.asarray(IDS))
    assert not np.allclose(ours, pretrained.model.apply({"params": pretrained.params}, IDS), atol=1e-3)
    base = transformers.AutoModelForCausalLM.from_pretrained(llama)
    np.testing.assert_allclose(ours, peft_logits(peft.PeftModel.from_pretrained(base, out)), atol=1e-4, rtol=0)
    back, imported = jlora.peft.load(out, pretrained.params, hf_module_name)
    np.testing.assert_allclose(jlora.apply(pretrained.model, back, imported, jnp.asarray(IDS)), ours, atol=1e-5)


def test_gradients_reach_a_b_and_the_magnitude_as_in_peft(llama, tmp_path):
    theirs = peft_dora(llama, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])
    theirs.save_pretrained(tmp_path / "adapter")
    theirs.train()
    theirs(input_ids=torch.tensor(IDS), labels=torch.tensor(IDS)).loss.backward()
    expected = {
        name.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector"): param.grad
        for name, param in theirs.named_parameters()
        if param.requires_grad
    }
    pretrained = jlora.models.load(llama, tokenizer=False)
    params, config = jlora.peft.load(tmp_path / "adapter", pretrained.params, hf_module_name)
    adapters, base = jlora.split(params, config)
    ids = jnp.asarray(IDS)

    def loss(adapters):
        logits = jlora.apply(pretrained.model, jlora.join(adapters, base), config, ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    grads = jax.jit(jax.grad(loss))(adapters)
    assert {keys[-1] for keys in flatten(grads)} == {"lora_a", "lora_b", LORA_MAGNITUDE}
    assert all(np.any(g) for keys, g in flatten(grads).items() if keys[-1] == LORA_MAGNITUDE)
    from safetensors.numpy import load_file

    out = jlora.peft.export(jlora.join(grads, base), config, tmp_path / "grads", hf_module_name)
    ours = load_file(out / "adapter_model.safetensors")  # the gradients in peft's names and layouts
    assert set(ours) == set(expected)
    for key, grad in expected.items():
        np.testing.assert_allclose(ours[key], grad.numpy(), atol=1e-6, rtol=1e-4, err_msg=key)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_init_is_a_no_op_and_merged_equals_factored_on_every_kernel_layout(scan):
    model, base, specs, config = build(scan=scan, use_dora=True)  # DenseGeneral, Einsum, biases
    params = jlora.init(base, config, jax.random.key(0), specs=specs)
    before = model.apply({"params": base}, TOKENS)
    if scan:  # inside the scanned jit XLA may sum ‖W‖² in another order than init did: within rounding
        np.testing.assert_allclose(jlora.apply(model, params, config, TOKENS), before, atol=1e-6, rtol=0)
    else:  # the same ops on the same values: m / ‖W‖ is exactly 1
        np.testing.assert_array_equal(jlora.apply(model, params, config, TOKENS), before)
    params = scaled_magnitudes(perturb(params, jax.random.key(1)), jax.random.key(2))
    factored = jlora.apply(model, params, config, TOKENS)
    assert not np.allclose(factored, before, atol=1e-2)
    merged = jlora.merge(params, config)
    assert not any(keys[-1] == LORA_MAGNITUDE for keys in flatten(merged))
    np.testing.assert_allclose(model.apply({"params": merged}, TOKENS), factored, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"DoRA adapters.*cannot be recovered"):
        jlora.unmerge(merged, jlora.split(params, config)[0], config)


def test_dropout_rescales_the_base_output_of_the_dropped_input_as_peft_does():
    """With LoRA dropout on, peft's DoRA adds ``(k - 1)·W·x' + k·s·x'·A·B`` for the dropped-out x'
    (bias excluded); x' is read back from a plain LoRA with A = B = I on the same rng."""
    dense, x, rate = nn.Dense(4), jax.random.normal(jax.random.key(0), (3, 4)), 0.5
    base = dense.init(jax.random.key(1), x)["params"]
    config = jlora.LoraConfig(r=2, alpha=2, dropout=rate, target_modules=".*", use_dora=True)
    params = scaled_magnitudes(
        perturb(jlora.init(base, config, jax.random.key(2)), jax.random.key(3)), jax.random.key(4)
    )
    rngs = {"dropout": jax.random.key(5)}
    ours = jlora.apply(dense, params, config, x, rngs=rngs, deterministic=False)
    identity = jlora.LoraConfig(r=4, alpha=4, dropout=rate, target_modules=".*")
    eye = {**base, "lora_a": jnp.eye(4), "lora_b": jnp.eye(4)}
    dropped = jlora.apply(dense, eye, identity, x, rngs=rngs, deterministic=False) - dense.apply({"params": base}, x)
    assert 0 < np.count_nonzero(dropped) < dropped.size
    w, a, b, m = (params[k] for k in ("kernel", "lora_a", "lora_b", LORA_MAGNITUDE))
    k = m / jnp.linalg.norm(w + a @ b, axis=0)
    expected = dense.apply({"params": base}, x) + (k - 1) * (dropped @ w) + k * (dropped @ a @ b)
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


def test_quantized_base_norm_uses_the_dequantized_kernel():
    model, base, specs, config = build(scan=True, use_dora=True)
    quantized = quantize_model(base, "int8", specs, config)
    adapters, frozen = jlora.split(jlora.init(quantized, config, jax.random.key(0), specs=specs), config)
    before = model.apply({"params": dequantize_tree(quantized)}, TOKENS)
    np.testing.assert_allclose(jlora.apply(model, jlora.join(adapters, frozen), config, TOKENS), before, atol=1e-6)
    params = jlora.join(scaled_magnitudes(perturb(adapters, jax.random.key(1)), jax.random.key(2)), frozen)
    dequantized = dequantize_tree(params)
    factored = jlora.apply(model, params, config, TOKENS)
    np.testing.assert_allclose(factored, jlora.apply(model, dequantized, config, TOKENS), atol=1e-5, rtol=0)
    np.testing.assert_allclose(model.apply({"params": jlora.merge(params, config)}, TOKENS), factored, atol=1e-5)


def test_paths_that_cannot_apply_dora_refuse_it_and_the_rest_place_and_train_the_magnitude():
    """Stacking adapters per row (`jlora.multi`) and the function transform (`jlora.interpret`)
    would drop the magnitude: both refuse DoRA by name. Sharding gives the magnitude its
    kernel's output spec, LoRA+ trains it fast (as peft groups it), quantize never touches it."""
    from jax.sharding import PartitionSpec as P

    from jlora import interpret, multi, sharding
    from jlora.optim import loraplus_b

    _, base, specs, config = build(scan=True, use_dora=True)
    params = jlora.init(base, config, jax.random.key(0), specs=specs)
    with pytest.raises(ValueError, match="DoRA"):
        multi.stack([(params, config)])
    with pytest.raises(ValueError, match="DoRA"):
        interpret.lora(lambda p, x: x @ p["w"], config)
    flat = flatten(params)
    kernel_specs = {k: P("layers", *(None,) * (v.ndim - 1)) for k, v in flat.items() if k[-1] == "kernel"}
    placed = flatten(sharding.adapter_specs(params, unflatten({k: kernel_specs.get(k, P()) for k in flat})))
    magnitudes = [k for k in flat if k[-1] == LORA_MAGNITUDE]
    assert magnitudes and all(placed[k] == P("layers", *(None,) * (flat[k].ndim - 1)) for k in magnitudes)
    fast = flatten(loraplus_b(jlora.split(params, config)[0]))
    assert all(fast[k] for k in magnitudes)
    quantized = flatten(quantize_model(params, "int8", specs, config))
    assert all(quantized[k] is flat[k] for k in magnitudes)
