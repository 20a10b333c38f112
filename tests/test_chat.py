"""Chat data: the assistant's tokens, exactly as a {% generation %} template (TRL's
assistant-only loss) marks them, and `jlora train --data chat.jsonl` end to end."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jlora import chat, cli, data
from tests import tiny_task

transformers = pytest.importorskip("transformers")

# ChatML as SmolLM2 and Qwen write it; the second marks the assistant's part for transformers
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_GENERATION = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n{% generation %}"
    "{{ m['content'] }}<|im_end|>{% endgeneration %}\n{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2's real byte-level BPE tokenizer, read from the preset's GGUF file."""
    gguf = pytest.importorskip("gguf")
    from jlora.models.loading import gguf_tokenizer
    from jlora.models.presets import locate

    try:
        return gguf_tokenizer(gguf.GGUFReader(locate("smollm2-135m-instruct")))
    except FileNotFoundError:
        pytest.skip("the smollm2 preset is not installed (python -m jlora.models install-presets)")


words = st.lists(st.sampled_from(["the", "movie", "was", "great", " ", "\n", "?", "ok", "Paris", "é"]), max_size=8)
turn = st.builds(lambda w: "".join(w).strip() or "ok", words)


@st.composite
def conversations(draw):
    messages = [{"role": "system", "content": draw(turn)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": draw(turn)})
        if draw(st.booleans()):
            messages.append({"role": "tool", "content": draw(turn)})
        messages.append({"role": "assistant", "content": draw(turn)})
    return messages


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=conversations())
def test_rendered_mask_equals_the_generation_blocks_mask(smollm2_tokenizer, messages):
    """The mask jlora derives for any template equals the one transformers reads from
    {% generation %} blocks (what TRL's assistant_only_loss trains), on a real BPE."""
    smollm2_tokenizer.chat_template = CHATML_GENERATION
    ids, mask = chat.rendered_mask(smollm2_tokenizer, messages)
    assert (ids, mask) == chat.template_mask(smollm2_tokenizer, messages)
    assert sum(mask) > 0


def test_the_mask_covers_each_assistant_turn_and_its_end_marker(smollm2_tokenizer):
    smollm2_tokenizer.chat_template = CHATML
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]
    ids, mask = chat.encode(smollm2_tokenizer, messages)
    trained = smollm2_tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert trained == "Paris.<|im_end|>Rome.<|im_end|>"
    prompt, completion = messages[:3], messages[3:]  # the conversational prompt-completion form
    ids2, mask2 = chat.encode(smollm2_tokenizer, *chat.conversation({"prompt": prompt, "completion": completion}, ""))
    assert ids2 == ids
    assert smollm2_tokenizer.decode([t for t, m in zip(ids2, mask2, strict=True) if m]) == "Rome.<|im_end|>"


def test_bad_conversations_are_refused_by_name():
    with pytest.raises(ValueError, match="row 3: message 1 has role 'bot'"):
        chat.conversation({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}, "row 3")
    with pytest.raises(ValueError, match="no assistant turn to train on"):
        chat.conversation({"messages": [{"role": "user", "content": "hi"}]}, "row 0")


def chat_model_dir(path):
    """A tiny Llama whose tokenizer has ChatML's markers and template."""
    tok = tiny_task.tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.add_tokens(["user", "assistant", "system"])
    tok.chat_template = CHATML
    tiny_task.hf_llama(
        path, vocab_size=len(tok), hidden_size=32, intermediate_size=48, pad_token_id=0, initializer_range=0.15
    )
    tok.save_pretrained(path)
    return path


def test_train_detects_chat_data_and_trains_on_the_assistant_turns(tmp_path):
    model = chat_model_dir(tmp_path / "model")
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Review : {r['text']}"},
                {"role": "assistant", "content": r["label"]},
            ]
        }
        for r in tiny_task.rows(120)
    ]
    (tmp_path / "chat.jsonl").write_text("\n".join(map(json.dumps, rows)))
    out = tmp_path / "run"
    args = ["train", "--model", str(model), "--data", str(tmp_path / "chat.jsonl"), "--seq-len", "24"]
    args += ["--eval-size", "20", "--rank", "4", "--steps", "30", "--lr", "1e-2", "--quiet", "--out", str(out)]
    assert cli.main(args) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["data"]["task"] == "chat"
    results = json.loads((out / "results.json").read_text())
    assert results["loss_after"] < 0.5 * results["loss_before"]  # it learns to answer positive / negative
    config = data.DataConfig(files=(str(tmp_path / "chat.jsonl"),), seq_len=24, eval_size=20)
    tok = transformers.AutoTokenizer.from_pretrained(model)
    train, _ = data.prepare(config, tok)
    trained = {tok.decode([t]) for t in train.arrays["input_ids"][train.arrays["loss_mask"] == 1]}
    assert trained == {"positive", "negative", "<|im_end|>"}
