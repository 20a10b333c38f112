"""jlora's models against transformers' PyTorch models: tiny random configs, saved with
`save_pretrained`, loaded by jlora's own loader; logits agree in float32."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

import jlora.models  # noqa: E402

# float32 on both sides; 1e-4 leaves room for differently ordered sums over ~100 terms.
ATOL = 1e-4

LLAMA = {
    "vocab_size": 97,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "head_dim": 8,
    "max_position_embeddings": 64,
}
CASES = {
    # GQA (4 query heads over 2 KV heads), untied embeddings, llama3 RoPE scaling
    "llama": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        {
            **LLAMA,
            "num_key_value_heads": 2,
            "tie_word_embeddings": False,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        },
    ),
    # q/k/v bias, tied embeddings
    "qwen2": (
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        {**LLAMA, "num_key_value_heads": 1, "tie_word_embeddings": True},
    ),
    # a sliding window shorter than the sequence
    "mistral-window": (
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        {**LLAMA, "num_key_value_heads": 2, "sliding_window": 4},
    ),
    # linear RoPE scaling
    "mistral": (
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        {
            **LLAMA,
            "num_key_value_heads": 2,
            "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        },
    ),
    # per-head q/k norms, head_dim 16 != hidden / heads, a window on the layers after the first;
    # initializer_range 0.3 makes attention scores large enough that the norms matter
    "qwen3": (
        transformers.Qwen3Config,
        transformers.Qwen3ForCausalLM,
        {
            **LLAMA,
            "head_dim": 16,
            "num_key_value_heads": 2,
            "use_sliding_window": True,
            "sliding_window": 4,
            "max_window_layers": 1,
            "initializer_range": 0.3,
        },
    ),
    # (1 + weight) norms before and after attention and MLP, scaled embeddings, GeGLU, alternating
    # sliding / global layers, a query scale of 12 (not head_dim), attention and final soft-capping
    # that bite (initializer_range 0.3: scores and logits of several units), tied embeddings
    "gemma2": (
        transformers.Gemma2Config,
        transformers.Gemma2ForCausalLM,
        {
            **LLAMA,
            "num_key_value_heads": 2,
            "sliding_window": 4,
            "query_pre_attn_scalar": 12,
            "attn_logit_softcapping": 3.0,
            "final_logit_softcapping": 5.0,
            "initializer_range": 0.3,
        },
    ),
    # q/k norms, every other layer sliding with its own RoPE base, linear scaling on the global
    # layers' RoPE, untied embeddings
    "gemma3": (
        transformers.Gemma3TextConfig,
        transformers.Gemma3ForCausalLM,
        {
            **LLAMA,
            "num_key_value_heads": 1,
            "sliding_window": 4,
            "sliding_window_pattern": 2,
            "tie_word_embeddings": False,
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        },
    ),
}


def save(tmp_path, config_cls, model_cls, kwargs):
    torch.manual_seed(0)
    reference = model_cls(config_cls(**kwargs)).eval()
    with torch.no_grad():  # random biases and norms, so that loading them is tested
        for name, param in reference.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                param.add_(0.1 * torch.randn_like(param))
    reference.save_pretrained(tmp_path)
    return reference


def batch(vocab: int, padding_side: str):
    ids = np.random.default_rng(0).integers(1, vocab, (3, 9))
    mask = np.ones_like(ids)
    for row, pad in ((1, 3), (2, 5)):
        if padding_side == "left":
            mask[row, :pad] = 0
        else:
            mask[row, -pad:] = 0
    return ids, mask


def torch_logits(reference, ids, mask, positions):
    with torch.no_grad():
        out = reference(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
        )
    return out.logits.numpy()


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("family", list(CASES))
def test_causal_lm_matches_transformers(tmp_path, family, padding_side):
    config_cls, model_cls, kwargs = CASES[family]
    reference = save(tmp_path, config_cls, model_cls, kwargs)
    ids, mask = batch(kwargs["vocab_size"], padding_side)
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    expected = torch_logits(reference, ids, mask, positions)
    valid = mask.astype(bool)  # padded positions' outputs are unspecified on both sides
    logits = {}
    for scan in (False, True):
        pretrained = jlora.models.load(tmp_path, scan=scan, tokenizer=False)
        logits[scan] = np.asarray(pretrained.model.apply({"params": pretrained.params}, ids, mask, positions))
        np.testing.assert_allclose(logits[scan][valid], expected[valid], atol=ATOL, rtol=0)
    # the same sums in another order: float32 rounding, relative to the logits' scale
    tolerance = 1e-6 * max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(logits[True][valid], logits[False][valid], atol=tolerance, rtol=0)


def test_bert_classifier_matches_transformers(tmp_path):
    config = transformers.BertConfig(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
        num_labels=3,
    )
    reference = save(tmp_path, lambda **k: config, transformers.BertForSequenceClassification, {})
    ids, mask = batch(97, "right")
    types = (np.arange(9)[None] >= 4).astype(int).repeat(3, 0)
    with torch.no_grad():
        expected = reference(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types)
        ).logits.numpy()
        hidden = reference.bert(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)
        ).last_hidden_state.numpy()
    outputs = {}
    for scan in (False, True):
        pretrained = jlora.models.load(tmp_path, head="classifier", scan=scan, tokenizer=False)
        outputs[scan] = pretrained.model.apply({"params": pretrained.params}, ids, mask, types)
        np.testing.assert_allclose(outputs[scan], expected, atol=ATOL, rtol=0)
        encoder = jlora.models.BertModel(pretrained.config, scan=scan)
        ours, _ = encoder.apply({"params": pretrained.params["bert"]}, ids, mask)
        valid = mask.astype(bool)
        np.testing.assert_allclose(np.asarray(ours)[valid], hidden[valid], atol=ATOL, rtol=0)
    np.testing.assert_allclose(outputs[False], outputs[True], atol=1e-6, rtol=0)


def test_parameters_carry_logical_axis_names():
    import flax.linen as nn
    import jax

    config = jlora.models.LlamaConfig(
        vocab_size=11, hidden_size=8, intermediate_size=12, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4
    )
    for scan, prefix in ((False, ()), (True, ("layers",))):
        model = jlora.models.LlamaForCausalLM(config, scan=scan)
        boxed = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32)))
        specs = nn.get_partition_spec(boxed)["params"]
        layer = specs["model"]["layers" if scan else "layers_0"]
        assert tuple(layer["self_attn"]["q_proj"]["kernel"]) == (*prefix, "embed", "heads", "head_dim")
        assert tuple(layer["self_attn"]["k_proj"]["kernel"]) == (*prefix, "embed", "kv_heads", "head_dim")
        assert tuple(layer["self_attn"]["o_proj"]["kernel"]) == (*prefix, "heads", "head_dim", "embed")
        assert tuple(layer["mlp"]["down_proj"]["kernel"]) == (*prefix, "mlp", "embed")
        assert tuple(specs["model"]["embed_tokens"]["embedding"]) == ("vocab", "embed")
        assert tuple(specs["lm_head"]["kernel"]) == ("embed", "vocab")


def test_bfloat16_compute_stays_close_to_float32(tmp_path):
    config_cls, model_cls, kwargs = CASES["llama"]
    save(tmp_path, config_cls, model_cls, kwargs)
    ids, mask = batch(kwargs["vocab_size"], "right")
    f32 = jlora.models.load(tmp_path, tokenizer=False)
    bf16 = jlora.models.load(tmp_path, dtype=jnp.bfloat16, tokenizer=False)
    assert bf16.params["lm_head"]["kernel"].dtype == jnp.float32  # parameters stay float32
    a = np.asarray(f32.model.apply({"params": f32.params}, ids, mask))
    b = np.asarray(bf16.model.apply({"params": bf16.params}, ids, mask))
    assert b.dtype == np.float32
    # bf16 activations (8-bit mantissa) through 3 layers: a few percent of the logit scale
    np.testing.assert_allclose(b[mask.astype(bool)], a[mask.astype(bool)], atol=0.05 * np.abs(a).max())


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_peft_adapter_on_the_new_families_imports_with_equal_outputs(tmp_path, family):
    """A peft LoRA adapter made on transformers' Qwen3 / Gemma 3 (its q_proj … down_proj names)
    imports into jlora's model with peft's logits."""
    peft = pytest.importorskip("peft")
    import jlora.peft

    config_cls, model_cls, kwargs = CASES[family]
    save(tmp_path / "base", config_cls, model_cls, kwargs)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    base = model_cls.from_pretrained(tmp_path / "base")
    peft.get_peft_model(base, lora).save_pretrained(tmp_path / "adapter")
    reference = peft.PeftModel.from_pretrained(model_cls.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    ids, mask = batch(kwargs["vocab_size"], "left")
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    expected = torch_logits(reference.eval(), ids, mask, positions)
    pretrained = jlora.models.load(tmp_path / "base", tokenizer=False)
    params, config = jlora.peft.load(tmp_path / "adapter", pretrained.params, jlora.models.hf_module_name)
    ours = np.asarray(jlora.apply(pretrained.model, params, config, ids, mask, positions))
    valid = mask.astype(bool)
    plain = np.asarray(pretrained.model.apply({"params": pretrained.params}, ids, mask, positions))
    assert not np.allclose(ours[valid], plain[valid], atol=1e-3)  # the adapter changes the outputs
    np.testing.assert_allclose(ours[valid], expected[valid], atol=ATOL, rtol=0)
