"""Phi-3 (`Phi3ForCausalLM`): jlora's decoder with its fused ``qkv_proj`` and ``gate_up_proj``,
partial RoPE and LongRoPE reproduces transformers' logits (1e-4 in float32) on drawn configs or
refuses the field it cannot honour; configs export back unchanged; peft adapters on the fused
projections import with peft's logits; `save_hf` writes the fused tensors transformers reloads."""

from __future__ import annotations

import copy
import warnings

import jax
import numpy as np
import pytest
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jlora  # noqa: E402
import jlora.models  # noqa: E402
import jlora.peft  # noqa: E402
from jlora.models.export import save_hf  # noqa: E402
from tests.conftest import perturb  # noqa: E402
from tests.test_model_configs import DRAWS, assert_refused, check_decoder, drawn, more  # noqa: E402
from tests.test_parity import ATOL, batch, save, torch_logits  # noqa: E402

# the fields a draw may set to a value jlora refuses
ODD = {"hidden_act": "gelu", "attention_dropout": 0.1, "resid_pdrop": 0.1}
FUSED = ["qkv_proj", "gate_up_proj", "o_proj", "down_proj"]
# GQA, untied embeddings, a window, RoPE over 6 of 8 head dims with LongRoPE's long factors
# (original length 4 < the test batch's 9 positions)
PHI3 = {
    "vocab_size": 61,
    "hidden_size": 32,
    "intermediate_size": 40,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "original_max_position_embeddings": 4,
    "sliding_window": 6,
    "pad_token_id": None,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "rope_parameters": {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.75,
        "short_factor": [1.0, 1.5, 2.0],
        "long_factor": [2.0, 4.0, 8.0],
    },
}


def phi3_kwargs(**overrides) -> dict:
    """`PHI3` with `overrides` (a copy: transformers' config writes into the RoPE dict)."""
    return copy.deepcopy({**PHI3, **overrides})


@st.composite
def phi3_configs(draw) -> tuple[str, dict, str | None]:
    """(family, transformers config kwargs, the field jlora must refuse or None): sizes, heads and
    KV heads, head_dim (Phi-3 configs derive it; transformers' LongRoPE checks need that), partial
    RoPE (odd rotary dims too), default or LongRoPE with short or long factors, windows, tying."""
    kv_heads = draw(st.sampled_from([1, 2]))
    heads = kv_heads * draw(st.sampled_from([1, 2]))
    hidden = draw(st.sampled_from([16, 24]))
    longrope = draw(st.booleans())
    head_dim = hidden // heads if longrope else draw(st.sampled_from([hidden // heads, 4, 8]))
    partial = draw(st.sampled_from([1.0, 0.5, 0.75]))
    rotary = int(head_dim * partial)
    rope = {
        "rope_type": "default",
        "rope_theta": draw(st.sampled_from([10000.0, 500.0])),
        "partial_rotary_factor": partial,
    }
    kwargs = {
        "vocab_size": 61,
        "hidden_size": hidden,
        "intermediate_size": draw(st.sampled_from([20, 32])),
        "num_hidden_layers": draw(st.integers(1, 3)),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 64,
        "rms_norm_eps": draw(st.sampled_from([1e-6, 1e-5])),
        "tie_word_embeddings": draw(st.booleans()),
        "sliding_window": draw(st.sampled_from([None, 3, 6])),
        "hidden_act": draw(st.sampled_from(["silu", "gelu_pytorch_tanh"])),
        "embd_pdrop": draw(st.sampled_from([0.0, 0.1])),  # transformers' Phi-3 never applies it
        "pad_token_id": None,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "rope_parameters": rope,
    }
    if head_dim != hidden // heads:
        kwargs["head_dim"] = head_dim
    if longrope and rotary % 2 == 0:  # transformers' factor lists fit even rotary dims only
        factors = st.lists(st.sampled_from([1.0, 1.25, 4.0]), min_size=rotary // 2, max_size=rotary // 2)
        rope |= {"rope_type": "longrope", "short_factor": draw(factors), "long_factor": draw(factors)}
        rope |= draw(st.sampled_from([{}, {"factor": 2.0}, {"attention_factor": 1.3}]))
        # the test batch has 9 positions: long factors below 9, short ones from 9 on
        kwargs["original_max_position_embeddings"] = draw(st.sampled_from([4, 8, 9, 16]))
    odd = draw(st.sampled_from([None] * 9 + list(ODD)))
    if odd is not None:
        kwargs[odd] = ODD[odd]
    return "phi3", kwargs, odd


PHI3_DRAWS = st.tuples(phi3_configs(), st.booleans(), st.sampled_from(["right", "left"]))


@pytest.mark.filterwarnings("ignore")  # transformers' notes on LongRoPE's factor, token ids
def test_drawn_phi3_configs_load_exactly_or_are_refused_by_name():
    drawn(PHI3_DRAWS, DRAWS)(check_decoder)()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_drawn_phi3_configs_load_exactly_or_are_refused_by_name_more(request):
    drawn(PHI3_DRAWS, more(request))(check_decoder)()


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("field", list(ODD))
def test_phi3_fields_jlora_cannot_honour_are_refused_by_name(tmp_path, field):
    save(tmp_path, transformers.Phi3Config, transformers.Phi3ForCausalLM, phi3_kwargs(**{field: ODD[field]}))
    assert_refused(tmp_path, field)


@pytest.mark.filterwarnings("ignore")
def test_the_projections_stay_fused_under_hugging_face_names(tmp_path):
    save(tmp_path, transformers.Phi3Config, transformers.Phi3ForCausalLM, phi3_kwargs())
    layer = jlora.models.load(tmp_path, tokenizer=False).params["model"]["layers_0"]
    assert set(layer["self_attn"]) == {"qkv_proj", "o_proj"}
    assert set(layer["mlp"]) == {"gate_up_proj", "down_proj"}
    assert layer["self_attn"]["qkv_proj"]["kernel"].shape == (32, 4 + 2 * 2, 8)  # q, k, v heads
    assert layer["mlp"]["gate_up_proj"]["kernel"].shape == (32, 2, 40)  # gate, up


@pytest.mark.filterwarnings("ignore")
def test_peft_adapter_on_the_fused_projections_imports_with_peft_logits_and_exports_back(tmp_path):
    peft = pytest.importorskip("peft")
    save(tmp_path / "base", transformers.Phi3Config, transformers.Phi3ForCausalLM, phi3_kwargs())
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=FUSED, init_lora_weights=False)
    base = transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "base")
    peft.get_peft_model(base, lora).save_pretrained(tmp_path / "adapter")
    model = transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "base")
    reference = peft.PeftModel.from_pretrained(model, tmp_path / "adapter").eval()
    ids, mask = batch(61, "left")
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    expected = torch_logits(reference, ids, mask, positions)
    pretrained = jlora.models.load(tmp_path / "base", scan=True, tokenizer=False)
    params, config = jlora.peft.load(tmp_path / "adapter", pretrained.params, jlora.models.hf_module_name)
    assert set(config.target_modules) == set(FUSED)
    ours = np.asarray(jlora.apply(pretrained.model, params, config, ids, mask, positions))
    plain = np.asarray(pretrained.model.apply({"params": pretrained.params}, ids, mask, positions))
    valid = mask.astype(bool)
    assert not np.allclose(ours[valid], plain[valid], atol=1e-3)  # the adapter changes the outputs
    np.testing.assert_allclose(ours[valid], expected[valid], atol=ATOL, rtol=0)
    out = jlora.peft.export(params, config, tmp_path / "again", jlora.models.hf_module_name)
    model = transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "base")
    again = peft.PeftModel.from_pretrained(model, out).eval()
    np.testing.assert_allclose(torch_logits(again, ids, mask, positions)[valid], expected[valid], atol=ATOL, rtol=0)


@pytest.mark.filterwarnings("ignore")
def test_save_hf_writes_the_fused_tensors_that_transformers_and_jlora_reload(tmp_path):
    save(tmp_path / "base", transformers.Phi3Config, transformers.Phi3ForCausalLM, phi3_kwargs())
    pretrained = jlora.models.load(tmp_path / "base", tokenizer=False)
    config = jlora.LoraConfig(r=4, target_modules=FUSED)
    adapted = jlora.init(pretrained.params, config, jax.random.key(0), specs=pretrained.kernel_specs())
    adapted = perturb(adapted, jax.random.key(1))
    ids, mask = batch(61, "right")
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    ours = np.asarray(jlora.apply(pretrained.model, adapted, config, ids, mask, positions))
    out = save_hf(pretrained, jlora.merge(adapted, config), tmp_path / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is transformers.Phi3ForCausalLM
    assert "model.layers.1.self_attn.qkv_proj.weight" in dict(reloaded.named_parameters())
    valid = mask.astype(bool)
    np.testing.assert_allclose(torch_logits(reloaded, ids, mask, positions)[valid], ours[valid], atol=ATOL, rtol=0)
    assert jlora.models.load(out, tokenizer=False).config == pretrained.config


@pytest.mark.filterwarnings("ignore")
def test_longrope_decodes_within_the_original_length_and_refuses_past_it(tmp_path):
    """Up to original_max_position_embeddings tokens, cached greedy generation is transformers'
    (short factors throughout); a longer cache is refused, since transformers then recomputes
    the cache with the long factors."""
    kwargs = phi3_kwargs(original_max_position_embeddings=10, initializer_range=0.3, eos_token_id=None)
    reference = save(tmp_path, transformers.Phi3Config, transformers.Phi3ForCausalLM, kwargs)
    pretrained = jlora.models.load(tmp_path, tokenizer=False)
    model, params = pretrained.model, pretrained.params
    ids = np.random.default_rng(1).integers(1, 61, (2, 6))
    mask = np.array([[1] * 6, [0, 0, 1, 1, 1, 1]])
    tokens = jlora.models.generate(model, params, ids, mask, max_new_tokens=4)  # a cache of 10
    for row, prompt in enumerate(ids):
        prompt = torch.tensor(prompt[mask[row].astype(bool)][None])
        expected = reference.generate(prompt, max_new_tokens=4, do_sample=False)[0, prompt.shape[1] :]
        np.testing.assert_array_equal(np.asarray(tokens[row]), expected.numpy())
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        jlora.models.generate(model, params, ids, mask, max_new_tokens=5)
