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

TARGETS, IDS = tiny_task.PROJECTIONS, tiny_task.IDS
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


def jlora_base(path, scan: bool, dtype=jnp.float32):
    """`jlora.models.load`, once per base, layout and compute dtype."""
    key = (str(path), scan, jnp.dtype(dtype).name)
    if key not in _loaded:
        head = {"head": "classifier"} if "bert" in str(path) else {}
        _loaded[key] = jlora.models.load(path, scan=scan, tokenizer=False, dtype=dtype, **head)
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
    generator = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # peft's notices on tied weights and saved embedding layers
        model = peft.get_peft_model(hf_model(base), lora)
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
        model.save_pretrained(out)
    return model


def peft_loaded_logits(base, adapter, bert: bool) -> np.ndarray:
    return hf_logits(peft_reloaded(base, adapter), bert)


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
    return (embed is not None or head is not None) and (
        embed is None or head is None or not np.array_equal(embed, head)
    )


def peft_reloaded(base, adapter):
    """`PeftModel.from_pretrained` on `base`: what the saved files mean to peft (peft saves
    adapter_config.json with sorted keys, so overlapping pattern keys may resolve otherwise
    than when the adapter was made)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(hf_model(base), adapter)


def check_import(base, adapter, scan: bool, tied: bool = False, bert: bool = False, dtype=jnp.float32) -> None:
    """jlora's import of `adapter` gives peft's logits, or refuses naming the field: per-layer
    rank / alpha differences in a scanned stack, a tied embedding saved apart, or ranks that
    peft itself cannot load (rank_pattern). In bfloat16 compute (float32 parameters) against
    peft's float32: bf16's 8-bit mantissa through two layers, a few percent of the logits' scale."""
    pretrained = jlora_base(base, scan, dtype)
    try:
        model = peft_reloaded(base, adapter)
    except RuntimeError:  # peft's own size mismatch: the file's ranks contradict its rank_pattern
        refusal = {"rank_pattern"}
    else:
        refusal = per_layer_differences(lora_settings(model)) if scan else set()
        refusal |= {"modules_to_save"} if tied and tied_conflict(adapter) else set()
    if refusal:
        with pytest.raises(ValueError, match="|".join(refusal)):
            jlora.peft.load(adapter, pretrained.params, hf_module_name)
        return
    params, config = jlora.peft.load(adapter, pretrained.params, hf_module_name)
    ours, theirs = jlora_logits(pretrained, params, config, bert), hf_logits(model, bert)
    atol = ATOL if dtype == jnp.float32 else 0.05 * np.abs(theirs).max()
    np.testing.assert_allclose(ours, theirs, atol=atol, rtol=0)


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
    save_peft(bases["untied"], lora, tmp_path / "adapter")
    check_import(bases["untied"], tmp_path / "adapter", scan=False)
    with pytest.raises(ValueError, match=rf"{field} gives the layers of the scanned stack .* --no-scan"):
        jlora.peft.load(tmp_path / "adapter", jlora_base(bases["untied"], True).params, hf_module_name)


def test_per_layer_values_outside_the_transformed_layers_import_scanned(bases, tmp_path):
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], layers_to_transform=[0], alpha_pattern={"layers.1.*q_proj": 2.0}
    )
    save_peft(bases["untied"], lora, tmp_path / "adapter")
    check_import(bases["untied"], tmp_path / "adapter", scan=True)


def test_modules_to_save_inside_a_scanned_stack_round_trips(bases, tmp_path):
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["input_layernorm"])
    model = save_peft(bases["untied"], lora, tmp_path / "adapter")
    check_import(bases["untied"], tmp_path / "adapter", scan=True)
    pretrained = jlora_base(bases["untied"], True)
    params, config = jlora.peft.load(tmp_path / "adapter", pretrained.params, hf_module_name)
    out = jlora.peft.export(params, config, tmp_path / "again", hf_module_name)
    np.testing.assert_allclose(peft_loaded_logits(bases["untied"], out, False), hf_logits(model, False), atol=ATOL)


# -- item 2: modules_to_save of a tied embedding ----------------------------------------


@pytest.mark.parametrize("saved", [["embed_tokens"], ["lm_head"], ["embed_tokens", "lm_head"]])
def test_tied_embedding_saved_apart_by_peft_is_refused_by_name(bases, tmp_path, saved):
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=saved)
    save_peft(bases["tied"], lora, tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"modules_to_save: the model ties lm_head\.weight to model\.embed_tokens"):
        jlora.peft.load(tmp_path / "adapter", jlora_base(bases["tied"], False).params, hf_module_name)


@pytest.mark.parametrize("saved", [["embed_tokens"], ["lm_head"]])
def test_tied_embedding_saved_with_ensure_weight_tying_imports_exactly(bases, tmp_path, saved):
    lora = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=saved, ensure_weight_tying=True
    )
    save_peft(bases["tied"], lora, tmp_path / "adapter")
    check_import(bases["tied"], tmp_path / "adapter", scan=False)


def test_untied_embedding_and_head_saved_import_exactly(bases, tmp_path):
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])
    save_peft(bases["untied"], lora, tmp_path / "adapter")
    check_import(bases["untied"], tmp_path / "adapter", scan=True)


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
    save_peft(bases["untied"], lora, tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    assert "base_model.model.lm_head.base_layer.weight" in tensors  # peft's save_embedding_layers="auto"
    check_import(bases["untied"], tmp_path / "adapter", scan=True)
    tensors["base_model.model.lm_head.base_layer.weight"] += 1.0  # a different base
    save_file(tensors, weights)
    with pytest.raises(ValueError, match=r"lm_head.base_layer.weight is peft's copy of the base weight lm_head"):
        jlora.peft.load(tmp_path / "adapter", jlora_base(bases["untied"], True).params, hf_module_name)


# -- acceptance: drawn configurations, both directions ----------------------------------

# rank_pattern / alpha_pattern keys: by module, and by layer (exact names and regexes)
MODULE_KEYS = ["q_proj", "v_proj", "down_proj", "self_attn.o_proj", r"mlp\..*_proj"]
LAYER_KEYS = ["model.layers.1.self_attn.q_proj", r"layers\.0\.mlp\.up_proj", r"layers\.1\..*"]
BERT_KEYS = ["value", "attention.output.dense", "encoder.layer.1.attention.self.query", r"layer\.0\..*"]
SAVED = [None, ["embed_tokens"], ["lm_head"], ["embed_tokens", "lm_head"], ["input_layernorm"], ["norm"]]


def settings(examples: int) -> "hypothesis.settings":
    return hypothesis.settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
    )


@st.composite
def peft_llama_cases(draw):
    """(base, scan, peft LoraConfig) over the space peft allows on the tiny Llama."""
    tie = draw(st.sampled_from(["untied", "tied"]))
    saved = draw(st.sampled_from(SAVED))
    targets = draw(st.lists(st.sampled_from(TARGETS), min_size=1, max_size=4, unique=True))
    if tie == "untied" and "lm_head" not in (saved or []) and draw(st.booleans()):
        targets.append("lm_head")  # peft then also saves lm_head's base weights (base_layer)
    keys = st.sampled_from(MODULE_KEYS + LAYER_KEYS)
    lora = peft.LoraConfig(
        r=draw(st.integers(1, 4)),
        lora_alpha=draw(st.sampled_from([2, 4.0, 8])),
        target_modules=targets,
        layers_to_transform=draw(st.none() | st.lists(st.sampled_from([0, 1]), min_size=1, unique=True)),
        rank_pattern=draw(st.dictionaries(keys, st.integers(1, 4), max_size=2)),
        alpha_pattern=draw(st.dictionaries(keys, st.sampled_from([1.0, 3, 6.0]), max_size=2)),
        use_rslora=draw(st.booleans()),
        modules_to_save=saved,
        ensure_weight_tying=draw(st.booleans()),
    )
    return tie, draw(st.booleans()), lora, draw(st.sampled_from([jnp.float32, jnp.float32, jnp.bfloat16]))


@st.composite
def peft_bert_cases(draw):
    """(scan, peft LoraConfig) for the tiny BERT classifier (peft adds the classifier to modules_to_save)."""
    keys = st.sampled_from(BERT_KEYS)
    lora = peft.LoraConfig(
        task_type="SEQ_CLS",
        r=draw(st.integers(1, 4)),
        lora_alpha=draw(st.sampled_from([2, 4.0, 8])),
        target_modules=draw(st.lists(st.sampled_from(["query", "key", "value", "dense"]), min_size=1, unique=True)),
        layers_to_transform=draw(st.none() | st.lists(st.sampled_from([0, 1]), min_size=1, unique=True)),
        rank_pattern=draw(st.dictionaries(keys, st.integers(1, 4), max_size=2)),
        alpha_pattern=draw(st.dictionaries(keys, st.sampled_from([1.0, 3, 6.0]), max_size=2)),
        use_rslora=draw(st.booleans()),
    )
    return draw(st.booleans()), lora


def import_llama_case(bases, tmp_path, case) -> None:
    tie, scan, lora, dtype = case
    adapter = tmp_path / "adapter"
    save_peft(bases[tie], lora, adapter)
    check_import(bases[tie], adapter, scan, tied=tie == "tied", dtype=dtype)


def import_bert_case(bases, tmp_path, case) -> None:
    scan, lora = case
    save_peft(bases["bert"], lora, tmp_path / "adapter")
    check_import(bases["bert"], tmp_path / "adapter", scan, bert=True)


@st.composite
def jlora_llama_cases(draw):
    """(base, scan, jlora LoraConfig); pattern keys that match adapted modules (jlora refuses
    others), layer-indexed ones only unscanned (a scanned path has no layer)."""
    tie, scan = draw(st.sampled_from(["untied", "tied"])), draw(st.booleans())
    targets = draw(st.lists(st.sampled_from(TARGETS), min_size=1, max_size=4, unique=True))
    layers = draw(st.none() | st.lists(st.sampled_from([0, 1]), min_size=1, unique=True))
    block = lambda t: "self_attn" if t in TARGETS[:4] else "mlp"
    stacks = ["layers"] if scan else [f"layers_{i}" for i in (layers or [0, 1])]
    adapted = [f"model/{stack}/{block(t)}/{t}" for stack in stacks for t in targets]
    keys = ["v_proj", "mlp/down_proj", "self_attn/.*"] + ([] if scan else ["layers_1/self_attn/q_proj", "layers_0/.*"])
    keys = [k for k in keys if any(jlora.config.suffix_match(k, path) for path in adapted)]
    patterns = lambda values: st.dictionaries(st.sampled_from(keys), values, max_size=2) if keys else st.just({})
    saved = [(), ("embed_tokens",), ("input_layernorm",), ("norm",)] + ([("lm_head",)] if tie == "untied" else [])
    config = jlora.LoraConfig(
        r=draw(st.integers(1, 4)),
        alpha=draw(st.sampled_from([2.0, 4.0, 8.0])),
        target_modules=targets,
        layers=layers,
        rank_pattern=draw(patterns(st.integers(1, 4))),
        alpha_pattern=draw(patterns(st.sampled_from([1.0, 3.0]))),
        use_rslora=draw(st.booleans()),
        modules_to_save=draw(st.sampled_from(saved)),
    )
    return tie, scan, config


def export_llama_case(bases, tmp_path, case) -> None:
    tie, scan, config = case
    pretrained = jlora_base(bases[tie], scan)
    params = jlora.init(pretrained.params, config, jax.random.key(0), specs=pretrained.kernel_specs())
    params = perturbed(params, config)
    ours = jlora_logits(pretrained, params, config, False)
    out = jlora.peft.export(params, config, tmp_path / "adapter", hf_module_name)
    np.testing.assert_allclose(peft_loaded_logits(bases[tie], out, False), ours, atol=ATOL, rtol=0)
    back, imported = jlora.peft.load(out, pretrained.params, hf_module_name)
    np.testing.assert_allclose(jlora_logits(pretrained, back, imported, False), ours, atol=1e-5, rtol=0)


CASES = {
    "peft-llama-in": (peft_llama_cases(), import_llama_case, 30),
    "peft-bert-in": (peft_bert_cases(), import_bert_case, 10),
    "jlora-llama-out": (jlora_llama_cases(), export_llama_case, 15),
}


def run_drawn(name: str, bases, tmp_path_factory, scale: int) -> None:
    strategy, check, examples = CASES[name]
    run = hypothesis.given(strategy)(lambda case: check(bases, tmp_path_factory.mktemp("case"), case))
    settings(examples * scale)(run)()


@pytest.mark.parametrize("name", CASES)
def test_drawn_configs_match_peft_or_are_refused_by_name(bases, tmp_path_factory, name):
    run_drawn(name, bases, tmp_path_factory, scale=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_drawn_configs_match_peft_or_are_refused_by_name_more(bases, tmp_path_factory, request, name):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("draws 10x more: run with -m slow")
    run_drawn(name, bases, tmp_path_factory, scale=10)
