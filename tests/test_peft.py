"""The PEFT format both ways, checked against peft itself on tiny transformers models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
import jlora.models
import jlora.peft
from jlora.models import hf_module_name
from tests import tiny_task

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = np.array([[5, 9, 2, 7, 11, 3], [4, 4, 8, 1, 6, 2]])


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_task.hf_llama(tmp_path_factory.mktemp("llama"), vocab_size=23)


def peft_logits(base_dir, adapter_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    model = peft.PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits.numpy()


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_export_loads_in_peft_with_equal_outputs(llama, tmp_path, scan):
    pretrained = jlora.models.load(llama, scan=scan, tokenizer=False)
    config = jlora.LoraConfig(
        r=4, alpha=8, target_modules=TARGETS, rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3.0}
    )
    params = jlora.init(pretrained.params, config, jax.random.key(0), specs=pretrained.kernel_specs())
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.3 * jax.random.normal(jax.random.key(len(str(p))), x.shape) if p[-1].key == "lora_b" else x,
        params,
    )
    out = jlora.peft.export(params, config, tmp_path / "adapter", hf_module_name, base_model_name_or_path=str(llama))
    ours = jlora.apply(pretrained.model, params, config, jnp.asarray(IDS))
    assert not np.allclose(ours, pretrained.model.apply({"params": pretrained.params}, IDS), atol=1e-3)
    np.testing.assert_allclose(ours, peft_logits(llama, out), atol=1e-4, rtol=0)  # float32 both sides


def test_peft_adapters_import_with_equal_outputs(llama, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(llama)
    lora = peft.LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,
        use_rslora=True,
        rank_pattern={"down_proj": 2},
    )
    peft.get_peft_model(model, lora).save_pretrained(tmp_path / "adapter")
    pretrained = jlora.models.load(llama, tokenizer=False)
    params, config = jlora.peft.load(tmp_path / "adapter", pretrained.params, hf_module_name)
    assert config.use_rslora and config.r == 4
    ours = jlora.apply(pretrained.model, params, config, jnp.asarray(IDS))
    np.testing.assert_allclose(ours, peft_logits(llama, tmp_path / "adapter"), atol=1e-4, rtol=0)


def test_unsupported_fields_and_unknown_modules_are_named(llama, tmp_path):
    import json

    model = transformers.AutoModelForCausalLM.from_pretrained(llama)
    peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)).save_pretrained(
        tmp_path / "dora"
    )
    pretrained = jlora.models.load(llama, tokenizer=False)
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        jlora.peft.load(tmp_path / "dora", pretrained.params, hf_module_name)
    config = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False, "bias": "all"}))
    with pytest.raises(ValueError, match="bias='all' is not supported"):
        jlora.peft.load(tmp_path / "dora", pretrained.params, hf_module_name)


def test_bert_classifier_export_with_modules_to_save_loads_in_peft(tmp_path):
    config = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=20, num_labels=3
    )
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "bert")
    pretrained = jlora.models.load(tmp_path / "bert", head="classifier", tokenizer=False)
    lora = jlora.LoraConfig(r=2, alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    params = jlora.init(pretrained.params, lora, jax.random.key(0), specs=pretrained.kernel_specs())
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            x + 0.3 * jax.random.normal(jax.random.key(len(str(p))), x.shape)
            if p[-1].key == "lora_b" or p[0].key == "classifier"
            else x
        ),
        params,
    )
    out = jlora.peft.export(params, lora, tmp_path / "adapter", hf_module_name, task_type="SEQ_CLS")
    ids = np.array([[2, 7, 9, 4, 0, 0], [3, 5, 8, 1, 6, 2]])
    mask = (ids > 0).astype(int)
    ours = jlora.apply(pretrained.model, params, lora, jnp.asarray(ids), jnp.asarray(mask))
    base = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "bert")
    model = peft.PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)  # adapters and the trained head both arrive
    loaded, imported = jlora.peft.load(out, pretrained.params, hf_module_name)
    assert imported.modules_to_save == ("classifier",)
    np.testing.assert_allclose(
        jlora.apply(pretrained.model, loaded, imported, jnp.asarray(ids), jnp.asarray(mask)), ours, atol=1e-5
    )
