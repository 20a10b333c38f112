"""RoBERTa, XLM-RoBERTa and DistilBERT against transformers: drawn tiny configs load with
transformers' hidden states and classifier logits (float32, within 1e-4) on padded batches,
left padding included (RoBERTa's positions skip pads), or are refused naming the field; a
config that loads exports unchanged; peft LoRA adapters on their HF module names import with
peft's logits (and export back); `save_hf` writes directories transformers reloads."""

from __future__ import annotations

import tempfile
import warnings

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jlora  # noqa: E402
import jlora.models  # noqa: E402
import jlora.peft  # noqa: E402
from jlora.models import hf_module_name  # noqa: E402
from jlora.models.bert import BertConfig, BertModel, position_ids  # noqa: E402
from jlora.models.export import hf_config, save_hf  # noqa: E402
from tests.test_model_configs import DRAWS, assert_refused, drawn, more  # noqa: E402
from tests.test_parity import ATOL, batch, save  # noqa: E402

VOCAB = 61
ROBERTA = [  # (config class, model class)
    ("RobertaConfig", "RobertaModel"),
    ("RobertaConfig", "RobertaForSequenceClassification"),
    ("RobertaConfig", "RobertaForMaskedLM"),
    ("XLMRobertaConfig", "XLMRobertaModel"),
    ("XLMRobertaConfig", "XLMRobertaForSequenceClassification"),
]
DISTILBERT = [
    transformers.DistilBertModel,
    transformers.DistilBertForSequenceClassification,
    transformers.DistilBertForMaskedLM,
]


@st.composite
def roberta_configs(draw) -> tuple[type, type, dict, str | None]:
    """(config class, model class, config kwargs, the field jlora must refuse or None)."""
    config_cls, model_cls = (getattr(transformers, name) for name in draw(st.sampled_from(ROBERTA)))
    heads = draw(st.sampled_from([2, 4]))
    kwargs = {
        "vocab_size": VOCAB,
        "hidden_size": heads * draw(st.sampled_from([4, 8])),
        "num_hidden_layers": draw(st.integers(1, 2)),
        "num_attention_heads": heads,
        "intermediate_size": draw(st.sampled_from([20, 32])),
        "max_position_embeddings": 24,  # positions reach pad_token_id + 9
        "type_vocab_size": draw(st.sampled_from([1, 2])),
        "layer_norm_eps": draw(st.sampled_from([1e-12, 1e-5])),
        "num_labels": draw(st.sampled_from([2, 3])),
        "classifier_dropout": draw(st.sampled_from([None, 0.2])),
        "pad_token_id": draw(st.sampled_from([1, 0, 5])),
    }
    odd = draw(st.sampled_from([None] * 6 + ["hidden_act", "is_decoder", "pad_token_id"]))
    kwargs |= {None: {}, "hidden_act": {"hidden_act": "relu"}, "is_decoder": {"is_decoder": True}}.get(
        odd, {"pad_token_id": None}
    )
    return config_cls, model_cls, kwargs, odd


@st.composite
def distilbert_configs(draw) -> tuple[type, type, dict, str | None]:
    heads = draw(st.sampled_from([2, 4]))
    kwargs = {
        "vocab_size": VOCAB,
        "dim": heads * draw(st.sampled_from([4, 8])),
        "n_layers": draw(st.integers(1, 2)),
        "n_heads": heads,
        "hidden_dim": draw(st.sampled_from([20, 32])),
        "max_position_embeddings": 24,
        "seq_classif_dropout": draw(st.sampled_from([0.2, 0.0])),
        "num_labels": draw(st.sampled_from([2, 3])),
    }
    odd = draw(st.sampled_from([None] * 6 + ["activation", "sinusoidal_pos_embds"]))
    kwargs |= {None: {}, "activation": {"activation": "relu"}}.get(odd, {"sinusoidal_pos_embds": True})
    return transformers.DistilBertConfig, draw(st.sampled_from(DISTILBERT)), kwargs, odd


def padded(pad: int, padding_side: str) -> tuple[np.ndarray, np.ndarray]:
    """`batch`'s ids and mask with pads of id `pad` and no pad id among the real tokens."""
    ids, mask = batch(VOCAB, padding_side)
    ids = np.where(ids == pad, (pad + 1) % VOCAB, ids)
    return np.where(mask.astype(bool), ids, pad), mask


def encoder_of(reference):
    """transformers' encoder inside `reference` (``.roberta``, ``.distilbert``) or itself."""
    return getattr(reference, reference.base_model_prefix, reference)


def check_encoder(case) -> None:
    (config_cls, model_cls, kwargs, refused), scan, padding_side, head = case
    head = "classifier" if model_cls.__name__.endswith("ForSequenceClassification") else head
    with tempfile.TemporaryDirectory() as directory:
        reference = save(directory, config_cls, model_cls, kwargs)
        hypothesis.event(f"{model_cls.__name__}: {refused or 'loaded'}")
        if refused:
            return assert_refused(directory, refused, scan=scan, head=head)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a fresh pooler (a MaskedLM checkpoint has none)
            pretrained = jlora.models.load(directory, scan=scan, tokenizer=False, head=head)
        config = pretrained.config
        ids, mask = padded(config.padding_idx or 0, padding_side)
        types = (np.arange(9)[None] >= 4).astype(int).repeat(3, 0) % kwargs.get("type_vocab_size", 1)
        inputs = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
        if config.type_vocab_size:
            inputs["token_type_ids"] = torch.tensor(types)
        with torch.no_grad():
            expected = encoder_of(reference)(**inputs)
            if model_cls.__name__.endswith("ForSequenceClassification"):
                logits = reference(**inputs).logits.numpy()
                ours = pretrained.model.apply({"params": pretrained.params}, ids, mask, types)
                np.testing.assert_allclose(np.asarray(ours), logits, atol=ATOL, rtol=0)
        prefix = config.family.prefix
        params = pretrained.params[prefix] if head else pretrained.params
        encoder = BertModel(config, scan=scan, with_pooler="pooler" in params)
        hidden, pooled = encoder.apply({"params": params}, ids, mask, types)
        valid = mask.astype(bool)
        np.testing.assert_allclose(np.asarray(hidden)[valid], expected.last_hidden_state.numpy()[valid], atol=ATOL)
        if pooled is not None and model_cls.__name__.endswith("Model"):  # a pooler from the checkpoint
            np.testing.assert_allclose(np.asarray(pooled), expected.pooler_output.numpy(), atol=ATOL, rtol=0)
        assert BertConfig.from_hf(hf_config(config, model_cls.__name__)) == config


def draws(configs):
    return st.tuples(
        configs(), st.booleans(), st.sampled_from(["right", "left"]), st.sampled_from([None, "classifier"])
    )


CHECKS = {"roberta": draws(roberta_configs), "distilbert": draws(distilbert_configs)}


@pytest.mark.parametrize("name", CHECKS)
def test_drawn_configs_load_exactly_or_are_refused_by_name(name):
    drawn(CHECKS[name], DRAWS)(check_encoder)()


@pytest.mark.slow
@pytest.mark.parametrize("name", CHECKS)
def test_drawn_configs_load_exactly_or_are_refused_by_name_more(request, name):
    drawn(CHECKS[name], more(request))(check_encoder)()


def test_roberta_left_padding_changes_no_real_token():
    """RoBERTa's positions skip pads: a row and its left-padded copy give equal hidden states
    for the real tokens (positions 0, 1, 2 … would shift them)."""
    config = BertConfig(11, 8, 1, 2, 12, type_vocab_size=1, model_type="roberta", padding_idx=1)
    row, padded_row = jnp.array([[0, 5, 6, 2]]), jnp.array([[1, 1, 0, 5, 6, 2]])
    np.testing.assert_array_equal(position_ids(padded_row, 1), [[1, 1, 2, 3, 4, 5]])
    model = BertModel(config)
    params = model.init(jax.random.key(0), row)["params"]
    plain, _ = model.apply({"params": params}, row, row != 1)
    shifted, _ = model.apply({"params": params}, padded_row, padded_row != 1)
    np.testing.assert_allclose(np.asarray(shifted[0, 2:]), np.asarray(plain[0]), atol=1e-6)


# -- peft and save_hf ---------------------------------------------------------------------

SMALL = {"vocab_size": VOCAB, "num_labels": 3, "max_position_embeddings": 24}
CLASSIFIERS = {  # (config, model, config kwargs, peft target_modules, the head's modules)
    "roberta": (
        transformers.RobertaConfig,
        transformers.RobertaForSequenceClassification,
        {**SMALL, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 20},
        ["query", "value"],
        ["classifier"],
    ),
    "distilbert": (
        transformers.DistilBertConfig,
        transformers.DistilBertForSequenceClassification,
        {**SMALL, "dim": 16, "n_layers": 2, "n_heads": 2, "hidden_dim": 20},
        ["q_lin", "v_lin"],
        ["pre_classifier", "classifier"],
    ),
}


def classifier_dir(path, family: str):
    config_cls, model_cls, kwargs, *_ = CLASSIFIERS[family]
    save(path, config_cls, model_cls, {**kwargs, "pad_token_id": 1})
    return path


def hf_logits(model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("family", CLASSIFIERS)
def test_peft_adapter_imports_with_peft_logits_and_exports_back(tmp_path, family, scan):
    peft = pytest.importorskip("peft")
    _, model_cls, _, targets, saved = CLASSIFIERS[family]
    base = classifier_dir(tmp_path / "base", family)
    lora = peft.LoraConfig(
        task_type="SEQ_CLS",
        r=4,
        lora_alpha=8,
        target_modules=targets,
        modules_to_save=list(saved),
        init_lora_weights=False,
    )
    generator = torch.Generator().manual_seed(0)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(model_cls.from_pretrained(base), lora)
        for name, param in peft_model.named_parameters():
            if "modules_to_save" in name:  # a head that differs from the base's, as after training
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
        peft_model.save_pretrained(tmp_path / "adapter")
    ids, mask = padded(1, "right")
    theirs = hf_logits(peft_model, ids, mask)
    pretrained = jlora.models.load(base, head="classifier", scan=scan, tokenizer=False)
    params, config = jlora.peft.load(tmp_path / "adapter", pretrained.params, hf_module_name)
    assert set(config.target_modules) == set(targets)
    assert {path.split("/")[0] for path in config.modules_to_save} == set(saved)
    ours = np.asarray(jlora.apply(pretrained.model, params, config, ids, mask))
    plain = np.asarray(pretrained.model.apply({"params": pretrained.params}, ids, mask))
    assert not np.allclose(ours, plain, atol=1e-3)  # the adapter changes the logits
    np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0)
    out = jlora.peft.export(params, config, tmp_path / "again", hf_module_name, task_type="SEQ_CLS")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = peft.PeftModel.from_pretrained(model_cls.from_pretrained(base), out)
    np.testing.assert_allclose(hf_logits(again, ids, mask), theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", CLASSIFIERS)
def test_save_hf_writes_what_transformers_and_jlora_reload(tmp_path, family):
    base = classifier_dir(tmp_path / "base", family)
    pretrained = jlora.models.load(base, head="classifier", scan=True, tokenizer=False)
    params = jlora.tree.unflatten(
        {k: v * 1.5 if k[-1] == "bias" else v for k, v in jlora.tree.flatten(pretrained.params).items()}
    )
    out = save_hf(pretrained, params, tmp_path / "out")
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    assert type(reloaded).__name__ == CLASSIFIERS[family][1].__name__
    ids, mask = padded(1, "left")
    ours = np.asarray(pretrained.model.apply({"params": params}, ids, mask))
    np.testing.assert_allclose(hf_logits(reloaded, ids, mask), ours, atol=ATOL, rtol=0)
    assert jlora.models.load(out, head="classifier", tokenizer=False).config == pretrained.config


def test_a_roberta_encoder_checkpoint_gets_a_fresh_head_and_drops_its_pooler(tmp_path):
    """A RobertaModel checkpoint (with a pooler) as a classifier: the pooler is dropped, as
    transformers drops it, and the whole ``classifier`` head starts fresh."""
    save(tmp_path, transformers.RobertaConfig, transformers.RobertaModel, CLASSIFIERS["roberta"][2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning about a pooler: the classifier has none
        pretrained = jlora.models.load(tmp_path, head="classifier", tokenizer=False)
    assert "pooler" not in pretrained.params["roberta"]
    assert set(pretrained.params["classifier"]) == {"dense", "out_proj"}
