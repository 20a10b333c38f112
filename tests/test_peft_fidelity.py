"""PEFT fidelity against peft itself: drawn peft configs imported into jlora (and jlora-made
adapters exported to peft) give the same logits within 1e-4 in float32, or a refusal that
names the field. Plus the cases that were silently wrong: per-layer patterns on scanned
stacks, `modules_to_save` of a tied embedding, malformed adapter_config.json files."""

import json
import re
import warnings

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
hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = np.array([[5, 9, 2, 7, 11, 3], [4, 4, 8, 1, 6, 2]])
BERT_IDS = np.array([[2, 7, 9, 4, 0, 0], [3, 5, 8, 1, 6, 2]])
ATOL = 1e-4  # float32 on both sides


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Tiny transformers checkpoints: Llama untied and tied, a BERT classifier."""
    root = tmp_path_factory.mktemp("bases")
    return {
        "untied": tiny_task.hf_llama(root / "untied", vocab_size=23),
        "tied": tiny_task.hf_llama(root / "tied", vocab_size=23, tie_word_embeddings=True),
        "bert": tiny_task.hf_bert_classifier(root / "bert"),
    }


_loaded: dict = {}


def jlora_base(path, scan: bool):
    """`jlora.models.load`, once per base and layout."""
    key = (str(path), scan)
    if key not in _loaded:
        head = {"head": "classifier"} if "bert" in str(path) else {}
        _loaded[key] = jlora.models.load(path, scan=scan, tokenizer=False, **head)
    return _loaded[key]


def hf_model(path):
    cls = transformers.BertForSequenceClassification if "bert" in str(path) else transformers.LlamaForCausalLM
    return cls.from_pretrained(path)


def hf_logits(model, bert: bool) -> np.ndarray:
    ids = BERT_IDS if bert else IDS
    kwargs = {"attention_mask": torch.tensor((ids > 0).astype(int))} if bert else {}
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor(ids), **kwargs).logits.numpy()


def jlora_logits(pretrained, params, config, bert: bool) -> np.ndarray:
    if bert:
        mask = jnp.asarray((BERT_IDS > 0).astype(np.int32))
        return np.asarray(jlora.apply(pretrained.model, params, config, jnp.asarray(BERT_IDS), mask))
    return np.asarray(jlora.apply(pretrained.model, params, config, jnp.asarray(IDS)))


def save_peft(base, lora: "peft.LoraConfig", out, seed: int = 0):
    """A peft model on `base` with random nonzero A, B and saved-module weights, saved to `out`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's tied-weights and modules_to_save notices
        model = peft.get_peft_model(hf_model(base), lora)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(out)
    return model


def peft_loaded_logits(base, adapter, bert: bool) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf_logits(peft.PeftModel.from_pretrained(hf_model(base), adapter), bert)


def lora_settings(model) -> dict[str, tuple[int, float]]:
    """peft's own (r, alpha) of every adapted module, by module name."""
    return {
        name.removeprefix("base_model.model."): (m.r["default"], m.lora_alpha["default"])
        for name, m in model.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer) and "default" in m.r
    }


def per_layer_differences(settings: dict[str, tuple[int, float]]) -> set[str]:
    """The fields (rank_pattern / alpha_pattern) whose values differ between layers of one module."""
    by_module: dict[str, set] = {}
    for name, value in settings.items():
        by_module.setdefault(re.sub(r"\.\d+\.", ".*.", name), set()).add(value)
    fields = set()
    for values in by_module.values():
        fields |= {"rank_pattern"} if len({r for r, _ in values}) > 1 else set()
        fields |= {"alpha_pattern"} if len({a for _, a in values}) > 1 else set()
    return fields


def tied_conflict(adapter) -> bool:
    """A tied model's embedding and lm_head saved apart (peft without ensure_weight_tying)."""
    from safetensors.numpy import load_file

    tensors = load_file(adapter / "adapter_model.safetensors")
    embed, head = (tensors.get(f"base_model.model.{n}.weight") for n in ("model.embed_tokens", "lm_head"))
    return (embed is not None or head is not None) and (embed is None or head is None or not np.array_equal(embed, head))


def check_import(base, adapter, model, scan: bool, expected_refusal: set[str], bert: bool = False):
    """jlora's import of `adapter` gives peft's logits, or (if `expected_refusal`) a refusal naming one of
    those fields."""
    pretrained = jlora_base(base, scan)
    if expected_refusal:
        with pytest.raises(ValueError, match="|".join(expected_refusal)):
            jlora.peft.load(adapter, pretrained.params, hf_module_name)
        return
    params, config = jlora.peft.load(adapter, pretrained.params, hf_module_name)
    theirs = hf_logits(model, bert)
    np.testing.assert_allclose(jlora_logits(pretrained, params, config, bert), theirs, atol=ATOL, rtol=0)
    np.testing.assert_allclose(peft_loaded_logits(base, adapter, bert), theirs, atol=ATOL, rtol=0)


# -- item 1: per-layer patterns on scanned stacks ---------------------------------------


@pytest.mark.parametrize(
    ("field", "pattern"),
    [
        ("alpha_pattern", {"model.layers.1.self_attn.q_proj": 2.0}),
        ("rank_pattern", {r"layers\.1\.self_attn\.v_proj": 2}),
    ],
)
def test_per_layer_patterns_are_exact_unscanned_and_refused_by_name_scanned(bases, tmp_path, field, pattern):
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **{field: pattern})
    model = save_peft(bases["untied"], lora, tmp_path / "adapter")
    check_import(bases["untied"], tmp_path / "adapter", model, scan=False, expected_refusal=set())
    with pytest.raises(ValueError, match=rf"{field} gives the layers of the scanned stack .* --no-scan"):
        jlora.peft.load(tmp_path / "adapter", jlora_base(bases["untied"], True).params, hf_module_name)


def test_per_layer_values_outside_the_transformed_layers_import_scanned(bases, tmp_path):
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], layers_to_transform=[0], alpha_pattern={"layers.1.*q_proj": 2.0}
    )
    model = save_peft(bases["untied"], lora, tmp_path / "adapter")
    check_import(bases["untied"], tmp_path / "adapter", model, scan=True, expected_refusal=set())


def test_modules_to_save_inside_a_scanned_stack_round_trips(bases, tmp_path):
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["input_layernorm"])
    model = save_peft(bases["untied"], lora, tmp_path / "adapter")
    check_import(bases["untied"], tmp_path / "adapter", model, scan=True, expected_refusal=set())
    pretrained = jlora_base(bases["untied"], True)
    params, config = jlora.peft.load(tmp_path / "adapter", pretrained.params, hf_module_name)
    out = jlora.peft.export(params, config, tmp_path / "again", hf_module_name)
    np.testing.assert_allclose(peft_loaded_logits(bases["untied"], out, False), hf_logits(model, False), atol=ATOL)


# -- item 2: modules_to_save of a tied embedding ----------------------------------------


@pytest.mark.parametrize("saved", [["embed_tokens"], ["lm_head"], ["embed_tokens", "lm_head"]])
def test_tied_embedding_saved_apart_by_peft_is_refused_by_name(bases, tmp_path, saved):
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=saved)
    save_peft(bases["tied"], lora, tmp_path / "adapter")
    with pytest.raises(ValueError, match="modules_to_save: the model ties lm_head.weight to model.embed_tokens"):
        jlora.peft.load(tmp_path / "adapter", jlora_base(bases["tied"], False).params, hf_module_name)


@pytest.mark.parametrize("saved", [["embed_tokens"], ["lm_head"]])
def test_tied_embedding_saved_with_ensure_weight_tying_imports_exactly(bases, tmp_path, saved):
    lora = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=saved, ensure_weight_tying=True
    )
    model = save_peft(bases["tied"], lora, tmp_path / "adapter")
    check_import(bases["tied"], tmp_path / "adapter", model, scan=False, expected_refusal=set())


def test_untied_embedding_and_head_saved_import_exactly(bases, tmp_path):
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])
    model = save_peft(bases["untied"], lora, tmp_path / "adapter")
    check_import(bases["untied"], tmp_path / "adapter", model, scan=True, expected_refusal=set())


@pytest.mark.parametrize("tie", ["tied", "untied"])
def test_jlora_trained_embedding_exports_with_peft_semantics(bases, tmp_path, tie):
    pretrained = jlora_base(bases[tie], False)
    config = jlora.LoraConfig(r=2, alpha=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    specs = pretrained.kernel_specs()
    params = perturbed(jlora.init(pretrained.params, config, jax.random.key(0), specs=specs), config)
    out = jlora.peft.export(params, config, tmp_path / "adapter", hf_module_name)
    ours = jlora_logits(pretrained, params, config, False)
    np.testing.assert_allclose(peft_loaded_logits(bases[tie], out, False), ours, atol=ATOL, rtol=0)
    back, imported = jlora.peft.load(out, pretrained.params, hf_module_name)
    np.testing.assert_allclose(jlora_logits(pretrained, back, imported, False), ours, atol=1e-5, rtol=0)


def perturbed(params, config, seed: int = 0):
    """`params` with random nonzero B and shifted trainable (`modules_to_save`) leaves."""
    key = jax.random.key(seed)

    def shift(path, x):
        keys = tuple(getattr(p, "key", p) for p in path)
        if not jlora.tree.is_trainable(keys, config) or keys[-1] == "lora_a":
            return x
        noise = 0.3 * jax.random.normal(jax.random.fold_in(key, hash(keys) % 2**31), x.shape, x.dtype)
        return x + noise

    return jax.tree_util.tree_map_with_path(shift, params)


# -- item 4: adapter_config.json against a schema ---------------------------------------


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: [c], r"adapter_config.json must hold a JSON object .*not a list"),
        (lambda c: {**c, "r": "four"}, r"adapter_config.json: field 'r' must be an integer >= 1, got 'four'"),
        (lambda c: {**c, "lora_alpha": None}, r"adapter_config.json: field 'lora_alpha' must be a number > 0"),
        (lambda c: {**c, "rank_pattern": {"q_proj": 2.5}}, r"adapter_config.json: field 'rank_pattern' must be"),
        (lambda c: {**c, "target_modules": 3}, r"adapter_config.json: field 'target_modules' must be"),
        (lambda c: {**c, "layers_to_transform": ["0"]}, r"adapter_config.json: field 'layers_to_transform'"),
        (lambda c: {**c, "use_rslora": "yes"}, r"adapter_config.json: field 'use_rslora' must be true or false"),
        (lambda c: {**c, "peft_type": "IA3"}, r"adapter_config.json: field 'peft_type' must be \"LORA\""),
    ],
)
def test_malformed_adapter_configs_name_the_file_and_field(bases, tmp_path, edit, message):
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
    save_peft(bases["untied"], lora, tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config_file.write_text(json.dumps(edit(json.loads(config_file.read_text()))))
    with pytest.raises(ValueError, match=message):
        jlora.peft.load(tmp_path / "adapter", jlora_base(bases["untied"], False).params, hf_module_name)


def test_lm_head_target_with_peft_default_base_layer_save_imports_or_names_the_problem(bases, tmp_path):
    from safetensors.numpy import load_file, save_file

    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"])
    model = save_peft(bases["untied"], lora, tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    assert "base_model.model.lm_head.base_layer.weight" in tensors  # peft's save_embedding_layers="auto"
    check_import(bases["untied"], tmp_path / "adapter", model, scan=True, expected_refusal=set())
    tensors["base_model.model.lm_head.base_layer.weight"] += 1.0  # a different base
    save_file(tensors, weights)
    with pytest.raises(ValueError, match=r"lm_head.base_layer.weight is peft's copy of the base weight lm_head"):
        jlora.peft.load(tmp_path / "adapter", jlora_base(bases["untied"], True).params, hf_module_name)
