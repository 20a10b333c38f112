"""Drawn transformers configs of each supported family: jlora's loader reproduces the
PyTorch model (logits within 1e-4 in float32) or refuses, naming the config field, and a
config that loads survives jlora's export (`hf_config`) unchanged. Also the checkpoint
shapes the loader used to get wrong: Qwen2's per-layer windows, BERT pre-training heads.

Qwen3 and Gemma 2 / 3 are drawn apart from Llama, Mistral and Qwen2 (each group gets its
draws): sizes, heads and KV heads, biases, windows and layer patterns, soft-caps, query
scales, Gemma 3's per-layer-type RoPE, tying, and an initializer range large enough that
soft-caps and q/k norms change the logits."""

from __future__ import annotations

import tempfile
import warnings

import hypothesis
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jlora.models  # noqa: E402
from jlora.models.bert import BertConfig  # noqa: E402
from jlora.models.export import hf_config  # noqa: E402
from jlora.models.llama import LAYER_TYPES, LlamaConfig  # noqa: E402
from tests.test_parity import ATOL, batch, save, torch_logits  # noqa: E402

DRAWS = 30  # per family group; `-m slow` draws 10x more
DECODERS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
    "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),  # drawn in tests/test_phi3.py
}
GEMMA = ("gemma2", "gemma3_text")
# the fields a draw may set to a value jlora refuses (see `odd_fields`), by family
ODD = {family: ["hidden_act", "attention_dropout"] for family in DECODERS}
ODD["gemma2"] = [*ODD["gemma2"], "use_bidirectional_attention", "layer_types"]
ODD["gemma3_text"] = [*ODD["gemma2"], "sliding_attention.rope_type"]


def rope_parameters(draw) -> dict:
    kind = draw(st.sampled_from(["default", "linear", "llama3", "yarn", "dynamic"]))
    rope = {"rope_type": kind, "rope_theta": draw(st.sampled_from([10000.0, 500000.0]))}
    if kind in ("linear", "dynamic", "llama3", "yarn"):
        rope["factor"] = draw(st.sampled_from([2.0, 8.0]))
    if kind == "llama3":
        rope |= {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    if kind == "yarn":
        rope["original_max_position_embeddings"] = draw(st.sampled_from([16, 32]))
        rope |= draw(st.sampled_from([{}, {"beta_fast": 16.0, "beta_slow": 2.0}, {"attention_factor": 1.3}]))
    return rope


@st.composite
def decoder_configs(draw, families: tuple[str, ...]) -> tuple[str, dict, str | None]:
    """(family, transformers config kwargs, the field jlora must refuse or None)."""
    family = draw(st.sampled_from(families))
    kv_heads = draw(st.sampled_from([1, 2]))
    layers = draw(st.integers(1, 3))
    kwargs = {
        "vocab_size": 61,
        "hidden_size": draw(st.sampled_from([16, 24])),
        "intermediate_size": draw(st.sampled_from([20, 32])),
        "num_hidden_layers": layers,
        "num_attention_heads": kv_heads * draw(st.sampled_from([1, 2])),
        "num_key_value_heads": kv_heads,
        "head_dim": draw(st.sampled_from([4, 8])),
        "max_position_embeddings": 64,
        "rms_norm_eps": draw(st.sampled_from([1e-6, 1e-5])),
        "tie_word_embeddings": draw(st.booleans()),
        "rope_parameters": rope_parameters(draw),
    }
    if family == "llama":
        kwargs |= {"attention_bias": draw(st.booleans()), "mlp_bias": draw(st.booleans())}
    elif family == "mistral":
        kwargs["sliding_window"] = draw(st.sampled_from([None, 3, 6]))
    elif family in ("qwen2", "qwen3"):
        kwargs |= {
            "use_sliding_window": draw(st.booleans()),
            "sliding_window": draw(st.sampled_from([3, 6])),
            "max_window_layers": draw(st.integers(0, layers)),
        }
    if family in ("qwen3", *GEMMA):
        kwargs |= {"attention_bias": draw(st.booleans()), "initializer_range": draw(st.sampled_from([0.02, 0.3]))}
    if family in GEMMA:
        kwargs |= gemma_fields(draw, family, layers, kwargs.pop("rope_parameters"))
    refused = None if rope_type(kwargs) != "dynamic" else "rope_type"
    kinds = ODD[family]
    odd = draw(st.sampled_from([None] * 3 * len(kinds) + kinds))
    if odd is not None:
        kwargs |= odd_fields(family, odd, kwargs)
        refused = refused or odd
    return family, kwargs, refused


def odd_fields(family: str, odd: str, kwargs: dict) -> dict:
    """Config fields that make jlora refuse, naming `odd`."""
    if odd == "hidden_act":
        return {"hidden_activation" if family in GEMMA else "hidden_act": "gelu"}
    if odd == "attention_dropout":
        return {"attention_dropout": 0.1}
    if odd == "use_bidirectional_attention":
        return {"use_bidirectional_attention": True}
    if odd == "layer_types":  # sliding layers with no window
        return {"layer_types": ["sliding_attention"] * kwargs["num_hidden_layers"], "sliding_window": None}
    sliding = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}  # sliding_attention.rope_type
    return {"rope_parameters": {**kwargs["rope_parameters"], "sliding_attention": sliding}}


def gemma_fields(draw, family: str, layers: int, rope: dict) -> dict:
    """Gemma's own fields: window and layer pattern (drawn layer_types, or Gemma 3's
    sliding_window_pattern, or the default), query scale, soft-caps, Gemma 3's RoPE per layer type."""
    fields = {
        "sliding_window": draw(st.sampled_from([3, 6])),
        "query_pre_attn_scalar": draw(st.sampled_from([8, 5])),
        "attn_logit_softcapping": draw(st.sampled_from([None, 2.0, 50.0])),
        "final_logit_softcapping": draw(st.sampled_from([None, 3.0, 30.0])),
        "rope_parameters": rope,
    }
    pattern = draw(st.sampled_from(["default", "layer_types", "sliding_window_pattern"]))
    if pattern == "layer_types":
        fields["layer_types"] = draw(st.lists(st.sampled_from(LAYER_TYPES), min_size=layers, max_size=layers))
    elif pattern == "sliding_window_pattern" and family == "gemma3_text":
        fields["sliding_window_pattern"] = draw(st.integers(1, 3))
    if family == "gemma3_text":
        local = {"rope_type": "default", "rope_theta": draw(st.sampled_from([10000.0, 100.0]))}
        fields["rope_parameters"] = {"full_attention": rope, "sliding_attention": local}
    return fields


def rope_type(kwargs: dict) -> str:
    rope = kwargs["rope_parameters"]
    return rope.get("full_attention", rope)["rope_type"]


def assert_refused(directory, field: str, **kwargs) -> None:
    with pytest.raises(ValueError, match=field):
        jlora.models.load(directory, tokenizer=False, **kwargs)


def drawn(strategy, examples: int):
    """Run a check over `examples` draws of `strategy`, the same ones on every run (CI never
    meets a new draw by chance)."""
    config = settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    return lambda check: config(given(strategy)(check))


def more(request) -> int:
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("draws 10x more: run with -m slow")
    return 10 * DRAWS


def decoder_draws(*families: str):
    return st.tuples(decoder_configs(families), st.booleans(), st.sampled_from(["right", "left"]))


def check_decoder(case) -> None:
    (family, kwargs, refused), scan, padding_side = case
    config_cls, model_cls = DECODERS[family]
    with tempfile.TemporaryDirectory() as directory:
        reference = save(directory, config_cls, model_cls, kwargs)
        hypothesis.event(f"{family}: {refused or 'loaded'}")
        if refused:
            return assert_refused(directory, refused, scan=scan)
        pretrained = jlora.models.load(directory, scan=scan, tokenizer=False)
        ids, mask = batch(kwargs["vocab_size"], padding_side)
        positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
        expected = torch_logits(reference, ids, mask, positions)
        ours = np.asarray(pretrained.model.apply({"params": pretrained.params}, ids, mask, positions))
        valid = mask.astype(bool)
        np.testing.assert_allclose(ours[valid], expected[valid], atol=ATOL, rtol=0)
        exported = hf_config(pretrained.config, model_cls.__name__)
        assert LlamaConfig.from_hf(exported) == pretrained.config


BERT_CLASSES = [
    transformers.BertModel,
    transformers.BertForSequenceClassification,
    transformers.BertForPreTraining,
    transformers.BertForMaskedLM,
]


@st.composite
def bert_configs(draw) -> tuple[type, dict, str | None]:
    heads = draw(st.sampled_from([2, 4]))
    kwargs = {
        "vocab_size": 61,
        "hidden_size": heads * draw(st.sampled_from([4, 8])),
        "num_hidden_layers": draw(st.integers(1, 2)),
        "num_attention_heads": heads,
        "intermediate_size": draw(st.sampled_from([20, 32])),
        "max_position_embeddings": 32,
        "type_vocab_size": draw(st.sampled_from([1, 2])),
        "layer_norm_eps": draw(st.sampled_from([1e-12, 1e-5])),
        "num_labels": draw(st.sampled_from([2, 3])),
        "classifier_dropout": draw(st.sampled_from([None, 0.2])),
    }
    odd = draw(st.sampled_from([None] * 6 + ["hidden_act", "is_decoder"]))
    if odd is not None:
        kwargs |= {"hidden_act": "relu"} if odd == "hidden_act" else {"is_decoder": True}
    return draw(st.sampled_from(BERT_CLASSES)), kwargs, odd


BERT_DRAWS = st.tuples(bert_configs(), st.booleans())


def check_bert(case) -> None:
    (model_cls, kwargs, refused), scan = case
    head = "classifier" if model_cls is transformers.BertForSequenceClassification else None
    with tempfile.TemporaryDirectory() as directory:
        reference = save(directory, lambda **k: transformers.BertConfig(**k), model_cls, kwargs)
        hypothesis.event(f"{model_cls.__name__}: {refused or 'loaded'}")
        if refused:
            return assert_refused(directory, refused, scan=scan, head=head)
        pretrained = jlora.models.load(directory, scan=scan, tokenizer=False, head=head)
        ids, mask = batch(kwargs["vocab_size"], "right")
        types = (np.arange(9)[None] >= 4).astype(int).repeat(3, 0) % kwargs["type_vocab_size"]
        inputs = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
        with torch.no_grad():
            if head:
                expected = reference(**inputs, token_type_ids=torch.tensor(types)).logits.numpy()
                ours = pretrained.model.apply({"params": pretrained.params}, ids, mask, types)
                np.testing.assert_allclose(np.asarray(ours), expected, atol=ATOL, rtol=0)
            encoder = reference if model_cls is transformers.BertModel else reference.bert
            hidden = encoder(**inputs).last_hidden_state.numpy()
        params = pretrained.params["bert"] if head else pretrained.params
        ours, _ = jlora.models.BertModel(pretrained.config, scan=scan).apply({"params": params}, ids, mask)
        valid = mask.astype(bool)
        np.testing.assert_allclose(np.asarray(ours)[valid], hidden[valid], atol=ATOL, rtol=0)
        assert BertConfig.from_hf(hf_config(pretrained.config, model_cls.__name__)) == pretrained.config


CHECKS = {
    "decoders": (decoder_draws("llama", "mistral", "qwen2"), check_decoder),
    "qwen3-gemma": (decoder_draws("qwen3", *GEMMA), check_decoder),
    "bert": (BERT_DRAWS, check_bert),
}


@pytest.mark.filterwarnings("ignore")  # transformers' notes on unusual RoPE, a fresh pooler
@pytest.mark.parametrize("name", CHECKS)
def test_drawn_configs_load_exactly_or_are_refused_by_name(name):
    strategy, check = CHECKS[name]
    drawn(strategy, DRAWS)(check)()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", CHECKS)
def test_drawn_configs_load_exactly_or_are_refused_by_name_more(request, name):
    strategy, check = CHECKS[name]
    drawn(strategy, more(request))(check)()


def test_qwen2_windows_only_the_layers_its_layer_types_name(tmp_path):
    """max_window_layers=1 of 3: layer 0 attends to everything, layers 1 and 2 to a window of 3
    (jlora used to put the window on every layer: logits off with no error)."""
    kwargs = {
        "vocab_size": 61,
        "hidden_size": 16,
        "intermediate_size": 20,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "use_sliding_window": True,
        "sliding_window": 3,
        "max_window_layers": 1,
    }
    reference = save(tmp_path, transformers.Qwen2Config, transformers.Qwen2ForCausalLM, kwargs)
    pretrained = jlora.models.load(tmp_path, tokenizer=False)
    assert pretrained.config.layer_types == ("full_attention", "sliding_attention", "sliding_attention")
    ids, mask = batch(61, "right")
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    ours = np.asarray(pretrained.model.apply({"params": pretrained.params}, ids, mask, positions))
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], torch_logits(reference, ids, mask, positions)[valid], atol=ATOL)


@pytest.mark.parametrize("odd", ["use_bidirectional_attention", "layer_types", "sliding_attention.rope_type"])
def test_gemma_fields_jlora_cannot_honour_are_refused_by_name(tmp_path, odd):
    """The Gemma refusals the draws reach only now and then: bidirectional attention, sliding
    layers without a window, a scaled RoPE on Gemma 3's sliding layers."""
    kwargs = {
        "vocab_size": 61,
        "hidden_size": 16,
        "intermediate_size": 20,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 8,
        "sliding_window": 4,
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    }
    kwargs |= odd_fields("gemma3_text", odd, kwargs)
    save(tmp_path, transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, kwargs)
    assert_refused(tmp_path, odd)


def test_bert_pretraining_checkpoint_loads_as_the_encoder(tmp_path):
    """A bert-base-uncased-style checkpoint (`bert.` encoder, `cls.` heads) loads as BertModel."""
    config = transformers.BertConfig(
        vocab_size=61, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20
    )
    reference = save(tmp_path, lambda **k: config, transformers.BertForPreTraining, {})
    pretrained = jlora.models.load(tmp_path, tokenizer=False)
    ids, mask = batch(61, "right")
    with torch.no_grad():
        expected = reference.bert(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    hidden, pooled = pretrained.model.apply({"params": pretrained.params}, ids, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(hidden)[valid], expected.last_hidden_state.numpy()[valid], atol=ATOL)
    np.testing.assert_allclose(np.asarray(pooled), expected.pooler_output.numpy(), atol=ATOL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a pre-training checkpoint has its pooler: nothing starts fresh
        jlora.models.load(tmp_path, tokenizer=False)
