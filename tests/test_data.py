"""Data pipelines: the default task, the three encodings, truncation, batching."""

import dataclasses

import datasets
import numpy as np
import pytest

from jlora import data
from tests import tiny_task

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tok():
    return tiny_task.tokenizer()


def test_default_task_is_rotten_tomatoes_with_a_fixed_held_out_split():
    table = data.read(data.DataConfig())
    assert len(table) == 10_568  # 10,605 sentences minus 37 with a mean score of exactly 0
    counts = dict(zip(*np.unique(table["label"], return_counts=True), strict=True))
    assert counts == {"positive": 5_242, "negative": 5_326}
    config = data.DataConfig()
    rows = data.held_out_rows(table, config)  # min(1000, 10%)
    first = table.train_test_split(test_size=rows, seed=config.seed)["test"]["text"]
    again = data.read(config).train_test_split(test_size=rows, seed=config.seed)["test"]["text"]
    assert rows == 1000 and first == again
    assert data.held_out_rows(table.select(range(300)), config) == 30
    with pytest.raises(ValueError, match="not more than --eval-size 300"):
        data.held_out_rows(table.select(range(300)), dataclasses.replace(config, eval_size=300))


def test_completion_rows_are_left_padded_with_the_loss_on_the_completion(tok):
    table = datasets.Dataset.from_list(
        [
            {"text": "good movie", "label": "positive"},
            {"text": "the plot was very dull and the acting was poor", "label": "negative"},
        ]
    )
    split = data.encode(table, tok, data.DataConfig(files=("x",), seq_len=12))
    ids, mask, loss = (split.arrays[k] for k in ("input_ids", "attention_mask", "loss_mask"))
    assert tok.convert_ids_to_tokens(ids[0][mask[0] == 1].tolist()) == [
        "Review",
        ":",
        "good",
        "movie",
        "Sentiment",
        ":",
        "positive",
        "</s>",
    ]
    assert (loss[:, -2:] == 1).all() and loss[:, :-2].sum() == 0
    # the long review loses its beginning, never the template's end or the completion
    assert mask[1].all() and tok.convert_ids_to_tokens(ids[1][-4:].tolist()) == ["Sentiment", ":", "negative", "</s>"]
    assert list(split.labels) == [" negative", " positive"] and split.arrays["choice"].tolist() == [1, 0]
    assert (split.arrays["answer"] == 10).all()


def test_text_task_packs_tokens_into_full_rows(tok):
    table = datasets.Dataset.from_list([{"text": "the movie was good"}, {"text": "the plot"}] * 3)
    split = data.encode(table, tok, data.DataConfig(files=("x",), task="text", seq_len=5))
    assert split.arrays["input_ids"].shape == (4, 5)  # 3 * (5 + 3) = 24 tokens with end-of-text -> 4 rows
    assert split.arrays["loss_mask"].all()


def test_classification_task_gives_label_ids(tok):
    table = datasets.Dataset.from_list(tiny_task.rows(6))
    split = data.encode(table, tok, data.DataConfig(files=("x",), task="classification", seq_len=10))
    assert split.labels == ("negative", "positive")
    assert split.arrays["label"].tolist() == [split.labels.index(r["label"]) for r in tiny_task.rows(6)]


def test_eval_batches_cover_every_row_once_in_few_shapes(tok):
    split = data.encode(datasets.Dataset.from_list(tiny_task.rows(50)), tok, data.DataConfig(files=("x",), seq_len=32))
    batches = list(data.eval_batches(split, 8, multiple=4))
    seen = np.concatenate([b["input_ids"][b["weight"] > 0][:, -8:] for b in batches])
    assert len(seen) == 50 and sum(b["weight"].sum() for b in batches) == 50
    shapes = {b["input_ids"].shape[1] for b in batches}
    assert max(shapes) < 32 and all(s % 4 == 0 for s in shapes)
    for b in batches:  # cropping keeps every real token and the answer position
        assert (b["attention_mask"].sum(1) <= b["input_ids"].shape[1]).all()
        assert (b["loss_mask"][np.arange(8), b["answer"]] == 1).all()


def test_formats_from_suffix_or_flag(tmp_path):
    import json

    rows = tiny_task.rows(5)
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "b.tsv").write_text("text\tlabel\n" + "\n".join(f"{r['text']}\t{r['label']}" for r in rows))
    (tmp_path / "c.data").write_text((tmp_path / "a.jsonl").read_text())
    for name, fmt in (("a.jsonl", None), ("b.tsv", None), ("c.data", "json")):
        table = data.read(data.DataConfig(files=(str(tmp_path / name),), format=fmt))
        assert table["label"] == [r["label"] for r in rows], name
    with pytest.raises(ValueError, match=r"suffixes .* got \['.data'\]; or pass a format"):
        data.read(data.DataConfig(files=(str(tmp_path / "c.data"),)))
    with pytest.raises(ValueError, match="data format must be one of"):
        data.DataConfig(format="xlsx")


def test_chat_example_asks_each_review_and_answers_its_label(tmp_path):
    """The README's chat data: a seeded sample of the default task's rows as conversations,
    detected as chat, the assistant's answer the row's label."""
    from jlora.models.__main__ import main

    rows = {row["text"]: row["label"] for row in data.read(data.DataConfig())}
    assert main(["chat-example", str(tmp_path / "chat.jsonl"), "30"]) == 0
    config = data.DataConfig(files=(str(tmp_path / "chat.jsonl"),))
    table = data.read(config)
    assert len(table) == 30 and data.resolve_task(config, table).task == "chat"
    for row in table:
        user, assistant = row["messages"]
        text = user["content"].removeprefix("Is this movie review positive or negative?\n\n")
        assert assistant == {"role": "assistant", "content": f"{rows[text].capitalize()}."}
    assert main(["chat-example", str(tmp_path / "chat.jsonl")]) == 2  # never over a file
