"""The PEFT format both ways, checked against peft itself on tiny transformers models."""

import json
import re

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

TARGETS, IDS = tiny_task.PROJECTIONS, tiny_task.IDS


def peft_logits(base_dir, adapter_dir, ids=IDS):
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    model = peft.PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(np.asarray(ids))).logits.numpy()


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
    model = transformers.AutoModelForCausalLM.from_pretrained(llama)
    peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "lora")
    pretrained = jlora.models.load(llama, tokenizer=False)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    for field, value in (("fan_in_fan_out", True), ("bias", "all")):
        (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises(ValueError, match=f"{field}={value!r} is not supported"):
            jlora.peft.load(tmp_path / "lora", pretrained.params, hf_module_name)


def test_bert_classifier_export_with_modules_to_save_loads_in_peft(tmp_path):
    pretrained = jlora.models.load(tiny_task.hf_bert_classifier(tmp_path / "bert"), head="classifier", tokenizer=False)
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


def test_adapter_trained_in_jlora_with_rslora_ranks_and_layers_round_trips_through_peft(tmp_path):
    import datasets

    from jlora import data
    from jlora import train as training

    model_dir = tiny_task.llama_dir(tmp_path / "llama")
    pretrained = jlora.models.load(model_dir, scan=True)
    split = data.encode(
        datasets.Dataset.from_list(tiny_task.rows(64)), pretrained.tokenizer, data.DataConfig(files=("-",), seq_len=16)
    )
    config = jlora.LoraConfig(
        r=4, alpha=8, target_modules=TARGETS, use_rslora=True, layers=[1], rank_pattern={"o_proj": 2}
    )
    params = jlora.init(pretrained.params, config, jax.random.key(0), specs=pretrained.kernel_specs())
    adapters, base = jlora.split(params, config)
    task = training.task_for(pretrained, config, split)
    adapters, _ = training.fit(
        task, adapters, base, split, training.TrainConfig(steps=4, learning_rate=3e-2, warmup_steps=1), progress=False
    )
    params = jlora.join(adapters, base)
    out = jlora.peft.export(
        params, config, tmp_path / "adapter", hf_module_name, base_model_name_or_path=str(model_dir)
    )
    exported = json.loads((out / "adapter_config.json").read_text())
    assert exported["layers_to_transform"] == [1] and exported["use_rslora"]
    assert not any(".layers.0." in key for key in safetensors_keys(out))  # layer 0 has no adapter
    ids = jnp.asarray(split.arrays["input_ids"][:2])
    ours = jlora.apply(pretrained.model, params, config, ids)
    assert not np.allclose(ours, pretrained.model.apply({"params": pretrained.params}, ids), atol=1e-3)
    np.testing.assert_allclose(ours, peft_logits(model_dir, out, ids), atol=1e-4, rtol=0)
    back, imported = jlora.peft.load(out, pretrained.params, hf_module_name)
    assert imported.layers == (1,) and imported.use_rslora
    np.testing.assert_allclose(jlora.apply(pretrained.model, back, imported, ids), ours, atol=1e-5)


def test_peft_adapter_on_selected_layers_imports_with_equal_outputs(llama, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(llama)
    lora = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=TARGETS,
        init_lora_weights=False,
        layers_to_transform=[0],
        alpha_pattern={"gate_proj": 2.0},
    )
    peft.get_peft_model(model, lora).save_pretrained(tmp_path / "adapter")
    for scan in (False, True):
        pretrained = jlora.models.load(llama, scan=scan, tokenizer=False)
        params, config = jlora.peft.load(tmp_path / "adapter", pretrained.params, hf_module_name)
        assert config.layers == (0,)
        ours = jlora.apply(pretrained.model, params, config, jnp.asarray(IDS))
        np.testing.assert_allclose(ours, peft_logits(llama, tmp_path / "adapter"), atol=1e-4, rtol=0)


def safetensors_keys(directory):
    from safetensors import safe_open

    with safe_open(directory / "adapter_model.safetensors", "np") as f:
        return list(f.keys())


@pytest.fixture
def peft_adapter(llama, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(llama)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft.get_peft_model(model, lora).save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def corrupt(adapter, how):
    """Damage a copy of a PEFT directory in one way."""
    from safetensors.numpy import load_file, save_file

    weights, config_file = adapter / "adapter_model.safetensors", adapter / "adapter_config.json"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "rank":
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "r": 8}))
    elif how == "shape":
        tensors = load_file(weights)
        key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
        tensors[key] = np.zeros((4, 15), np.float32)  # the model's q_proj takes 16 inputs
        save_file(tensors, weights)
    elif how == "missing module":
        tensors = load_file(weights)
        tensors = {k.replace("self_attn.q_proj", "self_attn.qq_proj"): v for k, v in tensors.items()}
        save_file(tensors, weights)


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("truncated", "is not a readable safetensors file"),
        ("rank", r"has rank 4 in the tensors but 8 in adapter_config.json"),
        ("shape", r"lora_A \(r, 15\) / lora_B \(16, r\) do not fit its kernel"),
        ("missing module", "which the model does not have"),
    ],
)
def test_corrupt_peft_directories_fail_cleanly_and_import_peft_writes_nothing(
    llama, peft_adapter, tmp_path, capsys, how, message
):
    from jlora import cli

    corrupt(peft_adapter, how)
    pretrained = jlora.models.load(llama, tokenizer=False)
    with pytest.raises(ValueError, match=message):
        jlora.peft.load(peft_adapter, pretrained.params, hf_module_name)
    out = tmp_path / "imported"
    assert cli.main(["import-peft", str(peft_adapter), "--model", str(llama), "--out", str(out)]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no run folder, no staging left behind


def test_import_peft_makes_a_run_folder_that_eval_and_export_use(tmp_path, capsys, monkeypatch):
    from jlora import cli

    model_dir = tiny_task.llama_dir(tmp_path / "llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = peft.get_peft_model(model, lora)
    peft_model.peft_config["default"].base_model_name_or_path = str(model_dir)
    peft_model.save_pretrained(tmp_path / "adapter2")
    csv = tiny_task.write_csv(tmp_path / "reviews.csv", n=64)
    out = tmp_path / "run"
    flags = ["--data", str(csv), "--seq-len", "16", "--eval-size", "16"]
    assert cli.main(["import-peft", str(tmp_path / "adapter2"), "--out", str(out), *flags]) == 0  # model from the file
    run, pretrained, params, _, held_out = cli.load_run(str(out))
    assert run.model == str(model_dir) and run.lora.r == 2
    ids = jnp.asarray(held_out.arrays["input_ids"][:2])
    np.testing.assert_allclose(
        jlora.apply(pretrained.model, params, run.lora, ids),
        peft_logits(model_dir, tmp_path / "adapter2", ids),
        atol=1e-4,
        rtol=0,
    )
    assert cli.main(["eval", "--adapter", str(out), "--quiet"]) == 0
    assert "loss" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli.main(["export-peft", str(out), str(tmp_path / "again")]) == 0
    for key in safetensors_keys(tmp_path / "adapter2"):
        assert key in safetensors_keys(tmp_path / "again")
    monkeypatch.chdir(tmp_path)  # without --out: runs/<the directory's name>
    assert cli.main(["import-peft", str(tmp_path / "adapter2"), *flags]) == 0
    assert json.loads((tmp_path / "runs" / "adapter2" / "run.json").read_text())["lora"]["r"] == 2


BERT_IDS = np.array([[2, 7, 9, 4, 0, 0], [3, 5, 8, 1, 6, 2]])


def bert_logits(model, ids=BERT_IDS):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor((ids > 0).astype(int))).logits.numpy()


def test_peft_made_bert_adapter_with_rslora_and_layers_imports_with_equal_outputs(tmp_path):
    bert_dir = tiny_task.hf_bert_classifier(tmp_path / "bert")
    model = transformers.BertForSequenceClassification.from_pretrained(bert_dir)
    lora = peft.LoraConfig(
        task_type="SEQ_CLS",
        r=4,
        lora_alpha=8,
        target_modules=["query", "value", "dense"],
        init_lora_weights=False,  # random A and B: the adapter changes the logits
        use_rslora=True,
        rank_pattern={"value": 2},
        layers_to_transform=[1],
        modules_to_save=["classifier"],
    )
    peft_model = peft.get_peft_model(model, lora)
    with torch.no_grad():  # a head that differs from the base's, as after training
        peft_model.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    theirs = bert_logits(peft_model.eval())
    pretrained = jlora.models.load(bert_dir, head="classifier", tokenizer=False)
    params, config = jlora.peft.load(tmp_path / "adapter", pretrained.params, hf_module_name)
    assert config.use_rslora and config.layers == (1,) and config.modules_to_save == ("classifier",)
    ids, mask = jnp.asarray(BERT_IDS), jnp.asarray((BERT_IDS > 0).astype(np.int32))
    ours = jlora.apply(pretrained.model, params, config, ids, mask)
    assert not np.allclose(ours, pretrained.model.apply({"params": pretrained.params}, ids, mask), atol=1e-3)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)  # float32 both sides


def test_bert_adapter_trained_in_jlora_loads_in_peft_with_equal_outputs(tmp_path):
    from jlora import train as training
    from jlora.data import Split

    bert_dir = tiny_task.hf_bert_classifier(tmp_path / "bert")
    pretrained = jlora.models.load(bert_dir, head="classifier", tokenizer=False)
    config = jlora.LoraConfig(
        r=4, alpha=8, target_modules=["query", "key", "value", "dense"], modules_to_save=["classifier"]
    )
    ids, mask = jnp.asarray(BERT_IDS), jnp.asarray((BERT_IDS > 0).astype(np.int32))
    before = pretrained.model.apply({"params": pretrained.params}, ids, mask)
    params = jlora.init(pretrained.params, config, jax.random.key(0), specs=pretrained.kernel_specs())
    adapters, base = jlora.split(params, config)  # the head's arrays are donated to the step from here on
    rng = np.random.default_rng(0)
    rows = rng.integers(1, 40, (32, 6))
    split = Split({"input_ids": rows, "attention_mask": np.ones_like(rows), "label": rows[:, 0] % 3})
    task = training.Task(pretrained.model, config, "classifier")
    train_config = training.TrainConfig(steps=5, batch_size=8, learning_rate=5e-2, warmup_steps=1)
    adapters, _ = training.fit(task, adapters, base, split, train_config, progress=False)
    params = jlora.join(adapters, base)
    out = jlora.peft.export(params, config, tmp_path / "adapter", hf_module_name, task_type="SEQ_CLS")
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    ours = jlora.apply(pretrained.model, params, config, ids, mask)
    assert not np.allclose(ours, before, atol=1e-3)
    base_model = transformers.BertForSequenceClassification.from_pretrained(bert_dir)
    theirs = bert_logits(peft.PeftModel.from_pretrained(base_model, out).eval())
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def peft_adapted(model, task_type=None) -> set[str]:
    """The modules peft's ``target_modules="all-linear"`` gives adapters on `model`."""
    lora = peft.LoraConfig(r=2, target_modules="all-linear", task_type=task_type)
    wrapped = peft.get_peft_model(model, lora)
    names = {n.removesuffix(".lora_A.default.weight") for n, _ in wrapped.named_parameters() if "lora_A" in n}
    return {re.sub(r"^base_model\.model\.", "", n) for n in names}


def jlora_adapted(pretrained, config) -> set[str]:
    params = jlora.init(pretrained.params, config, jax.random.key(0), specs=pretrained.kernel_specs())
    return {hf_module_name(keys[:-1]) for keys in jlora.tree.flatten(params) if keys[-1] == "lora_a"}


def test_all_linear_adapts_the_modules_peft_does(llama, tmp_path):
    """peft's shorthand (from QLoRA): every linear layer but the output head; for a sequence
    classifier also not the classifier, which modules_to_save trains."""
    pretrained = jlora.models.load(llama, tokenizer=False)
    theirs = peft_adapted(transformers.AutoModelForCausalLM.from_pretrained(llama))
    assert len(theirs) == 2 * 7 and not any("lm_head" in n for n in theirs)  # the untied head is left alone
    assert jlora_adapted(pretrained, jlora.LoraConfig(r=2, target_modules="all-linear")) == theirs
    bert_dir = tiny_task.hf_bert_classifier(tmp_path / "bert")
    bert = jlora.models.load(bert_dir, head="classifier", tokenizer=False)
    config = jlora.LoraConfig(r=2, target_modules="all-linear", modules_to_save=["classifier"])
    theirs = peft_adapted(transformers.BertForSequenceClassification.from_pretrained(bert_dir), "SEQ_CLS")
    assert len(theirs) == 2 * 6 + 1 and jlora_adapted(bert, config) == theirs  # the pooler's dense included
