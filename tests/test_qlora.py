"""QLoRA: adapters trained over a quantized frozen base (`jlora.quantize`), dequantized where
each layer uses it; the same outputs and adapter gradients as on the dequantized base, no
dequantized weight kept for the backward pass, and `jlora train --quantize` end to end."""

import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.ad_checkpoint import print_saved_residuals

import jlora
from jlora import cli, quantize, sharding
from jlora import train as training
from jlora.models import LlamaConfig, LlamaForCausalLM
from tests import tiny_task
from tests.conftest import perturb
from tests.tiny_models import MLP

# fan-ins of 64 (blocks within rows) and 96 (down_proj: blocks across rows)
CONFIG = LlamaConfig(
    vocab_size=61, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16
)
IDS = jax.random.randint(jax.random.key(1), (2, 6), 0, CONFIG.vocab_size)
LORA = jlora.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])


@functools.cache
def adapted_llama(scan: bool):
    model = LlamaForCausalLM(CONFIG, scan=scan)
    base = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), IDS)["params"])
    specs = jlora.kernel_specs(model, IDS)
    return model, specs, perturb(jlora.init(base, LORA, jax.random.key(2), specs=specs), jax.random.key(3), scale=0.05)


@functools.cache
def tiny_llama(scan: bool, fmt: str):
    """(model, adapted params with a quantized base, the same dequantized)."""
    model, specs, params = adapted_llama(scan)
    quantized = quantize.quantize_model(params, fmt, specs, LORA)
    return model, quantized, quantize.dequantize_tree(quantized)


def loss(model, adapters, base):
    logits = jlora.apply(model, jlora.join(adapters, base), LORA, IDS)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], IDS[:, 1:]).mean()


@pytest.mark.parametrize(("scan", "fmt"), [(False, "nf4"), (True, "nf4"), (True, "int8")])
def test_quantized_base_gives_the_dequantized_outputs_and_adapter_gradients(scan, fmt):
    model, params, plain = tiny_llama(scan, fmt)
    kernels = {jlora.tree.path_str(k): type(v).__name__ for k, v in jlora.tree.flatten(params).items()}
    assert {kernels[p] for p in kernels if p.endswith("kernel")} == {"NF4" if fmt == "nf4" else "Int8"}
    logits = jax.jit(lambda p: jlora.apply(model, p, LORA, IDS))
    np.testing.assert_allclose(logits(params), logits(plain), atol=1e-5, rtol=0)
    adapters, base = jlora.split(params, LORA)
    grads = jax.jit(jax.grad(lambda a, b: loss(model, a, b)))(adapters, base)
    expected = jax.jit(jax.grad(lambda a, b: loss(model, a, b)))(adapters, jlora.split(plain, LORA)[1])
    assert {k[-1] for k in jlora.tree.flatten(grads)} == {"lora_a", "lora_b"}
    jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5), grads, expected)


@pytest.mark.parametrize("tied", [False, True])
def test_quantized_embedding_tables_give_the_dequantized_outputs_and_losses(tied):
    """With `embeddings=True` the token table is NF4 too: lookups, a tied head (the model's
    own and the chunked loss's `lm_head_of`) and adapter gradients equal the dequantized
    model's."""
    model = LlamaForCausalLM(dataclasses.replace(CONFIG, tie_word_embeddings=tied), scan=True)
    base = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), IDS)["params"])
    specs = jlora.kernel_specs(model, IDS)
    params = perturb(jlora.init(base, LORA, jax.random.key(2), specs=specs), jax.random.key(3), scale=0.05)
    params = quantize.quantize_model(params, "nf4", specs, LORA, embeddings=True)
    table = params["model"]["embed_tokens"]["embedding"]
    assert isinstance(table, quantize.NF4) and table.embedding and ("lm_head" in params) != tied
    plain = quantize.dequantize_tree(params)
    logits = jax.jit(lambda p: jlora.apply(model, p, LORA, IDS))
    np.testing.assert_allclose(logits(params), logits(plain), atol=1e-5, rtol=0)
    adapters, base = jlora.split(params, LORA)
    grads = jax.jit(jax.grad(lambda a, b: loss(model, a, b)))(adapters, base)
    expected = jax.jit(jax.grad(lambda a, b: loss(model, a, b)))(adapters, jlora.split(plain, LORA)[1])
    jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5), grads, expected)
    head, head_params = training.lm_head_of(model, params, LORA)
    assert quantize.is_quantized(jax.tree.leaves(head_params, is_leaf=quantize.is_quantized)[0])
    hidden = jlora.apply(model, params, LORA, IDS, hidden_only=True)[:, :-1]
    chunked = training.chunked_cross_entropy(head, head_params, hidden, IDS[:, 1:], jnp.ones(hidden.shape[:2]), 4)
    assert float(chunked) / IDS[:, 1:].size == pytest.approx(float(loss(model, *jlora.split(plain, LORA))), rel=1e-5)


def test_backward_keeps_the_quantized_kernel_not_a_dequantized_one(capsys):
    """x's gradient through a quantized layer needs W: the backward pass dequantizes again."""
    model, x = MLP(hidden=64, out=48), jnp.ones((5, 32))
    config = jlora.LoraConfig(r=2, target_modules=["fc1"])  # fc2's input gradient is needed for fc1's adapters
    params = quantize.quantize(jlora.init(model.init(jax.random.key(0), x)["params"], config, jax.random.key(1)))
    for tree in (params, quantize.dequantize_tree(params)):
        adapters, base = jlora.split(tree, config)
        print_saved_residuals(lambda a, base=base: jlora.apply(model, jlora.join(a, base), config, x).sum(), adapters)
    quantized, plain = capsys.readouterr().out.split("f32[] from a literal")[1:]
    assert "f32[64,48]" in plain and "f32[64,48]" not in quantized and "u8[48,32]" in quantized


def test_placement_shards_quantized_kernels_as_their_kernels():
    model, params, plain = tiny_llama(True, "nf4")
    mesh = sharding.make_mesh("fsdp=2,tensor=2", jax.devices()[:4])
    tx = training.make_optimizer(training.TrainConfig(), LORA)
    placement, expected = (training.Placement.derive(mesh, model, p, LORA, tx) for p in (params, plain))
    assert placement.adapters == expected.adapters
    kernel = ("model", "layers", "self_attn", "q_proj", "kernel")
    codes = jlora.tree.flatten(placement.base)[kernel].codes
    kernel_spec = jlora.tree.flatten(expected.base)[kernel].spec
    assert codes.spec == quantize.partition_specs(jlora.tree.flatten(params)[kernel], kernel_spec, mesh.shape).codes
    base = jax.device_put(jlora.split(params, LORA)[1], placement.base)
    assert jlora.tree.flatten(base)[kernel].codes.sharding == codes


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("qlora")
    model, csv = tiny_task.llama_dir(root / "model"), tiny_task.write_csv(root / "reviews.csv")
    fast = ["--seq-len", "16", "--eval-size", "40", "--batch-size", "8", "--rank", "4", "--quiet"]
    args = ["train", "--model", str(model), "--data", str(csv), *fast, "--steps", "30", "--lr", "1e-2"]
    quantized = ["--quantize", "nf4", "--quantize-embeddings"]
    assert cli.main([*args, "--targets", "q_proj", "v_proj", *quantized, "--out", str(root / "run")]) == 0
    return root / "run"


def test_train_quantize_records_it_and_learns(qlora_run, capsys):
    settings = json.loads((qlora_run / "run.json").read_text())["train"]
    assert settings["quantize"] == "nf4" and settings["quantize_embeddings"]
    results = json.loads((qlora_run / "results.json").read_text())
    assert results["loss_after"] < results["loss_before"] / 2
    losses = [json.loads(line)["loss"] for line in (qlora_run / "metrics.jsonl").read_text().splitlines()]
    assert np.mean(losses[-5:]) < np.mean(losses[1:6]) / 2
    assert cli.main(["eval", "--adapter", str(qlora_run), "--quiet"]) == 0  # over the base quantized the same way
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["loss"] == pytest.approx(results["loss_after"])


def test_merge_of_a_quantized_run_is_the_dequantized_base_merged(qlora_run, tmp_path):
    import jlora.models

    run, _, params, _, _ = cli.load_run(str(qlora_run))
    flat = jlora.tree.flatten(params)
    assert quantize.is_quantized(flat[("model", "layers", "mlp", "up_proj", "kernel")])
    assert flat[("model", "embed_tokens", "embedding")].embedding
    assert cli.main(["merge", "--adapter", str(qlora_run), "--out", str(tmp_path / "merged")]) == 0
    merged = jlora.models.load(str(tmp_path / "merged"), scan=run.scan).params
    expected = jlora.merge(quantize.dequantize_tree(params), run.lora)
    jax.tree.map(lambda m, e: np.testing.assert_allclose(m, e, rtol=1e-6, atol=1e-6), merged, expected)
    assert jax.tree.structure(jlora.merge(params, run.lora)) == jax.tree.structure(expected)
