"""Data pipelines: local files -> tokenized, fixed-shape numpy batches, seeded and resumable.

Built on `datasets` (csv / tsv / json / jsonl / text / parquet, no hub access). Four tasks:

* ``completion``: a prompt and a completion rendered from column templates
  (``"Review: {text}\\nSentiment:"`` -> ``" {label}"``); the loss covers the completion
  only. Sequences are left-padded so completions end every row; when the completions
  come from a small set (labels), accuracy is the share of rows whose first completion
  token the model ranks above the other choices'.
* ``text``: language modelling on packed text, loss on every token.
* ``classification``: (text, label) rows for encoder models with a classifier head.
* ``chat``: conversations (``messages``, or conversational ``prompt`` / ``completion``)
  rendered with the model's chat template, the loss on the assistant's tokens (`jlora.chat`).

The task ``auto`` (the default) is ``chat`` for JSON rows that are conversations and
``completion`` otherwise.

Completion and chat examples can be packed several to a row (`pack`): segment ids keep
attention and predictions within each example and positions restart at each, so every
example scores as it would alone, with less compute spent on padding.

`Batches` maps a step number to its batch with no hidden state, so a resumed run sees
exactly the data an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import string
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from jlora import chat
from jlora.models.presets import locate

FORMATS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "json", ".txt": "text", ".parquet": "parquet"}
# format -> (datasets builder, its options)
BUILDERS = {
    "csv": ("csv", {}),
    "tsv": ("csv", {"delimiter": "\t"}),
    "json": ("json", {}),
    "text": ("text", {}),
    "parquet": ("parquet", {}),
}
TASKS = ("auto", "completion", "text", "classification", "chat")
PACKABLE = ("completion", "chat")  # one example per row; text rows are packed text already
ROTTEN_TOMATOES = "rotten-tomatoes"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the data is and how to turn it into sequences."""

    files: tuple[str, ...] = (ROTTEN_TOMATOES,)
    format: str | None = None  # csv, tsv, json, text or parquet; None: from the file suffix
    task: str = "auto"  # resolved by `resolve_task`
    prompt: str = "Review: {text}\nSentiment:"
    completion: str = " {label}"
    text_column: str = "text"
    label_column: str = "label"
    seq_len: int = 64
    eval_size: int | None = None  # held-out rows; None: min(1000, 10% of the rows)
    seed: int = 0
    packing: bool | None = None  # training examples several to a row (`packed_for_training`); None: where it helps

    def __post_init__(self):
        if self.format is not None and self.format not in BUILDERS:
            raise ValueError(f"data format must be one of {sorted(BUILDERS)}, got {self.format!r}")
        if self.task not in TASKS:
            raise ValueError(f"data task must be one of {TASKS}, got {self.task!r}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {self.seq_len}")
        if self.eval_size is not None and self.eval_size < 1:
            raise ValueError(f"eval_size must be at least 1, got {self.eval_size}")
        if self.packing and self.task not in (*PACKABLE, "auto"):
            raise ValueError(
                f"--packing (data.packing) packs examples of the {' and '.join(PACKABLE)} tasks; the {self.task} "
                "task's rows cannot be packed: drop it"
            )
        object.__setattr__(self, "files", tuple(self.files))


@dataclasses.dataclass
class Split:
    """Encoded rows: arrays of equal length N (`input_ids` and masks are (N, seq_len))."""

    arrays: dict[str, np.ndarray]
    choices: np.ndarray | None = None  # first token of each distinct completion, for accuracy
    labels: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.arrays["input_ids"])

    def take(self, index: np.ndarray) -> dict[str, np.ndarray]:
        return {name: array[index] for name, array in self.arrays.items()}


# -- reading -------------------------------------------------------------------------------------

CHAT_QUESTION = "Is this movie review positive or negative?\n\n{text}"


def chat_example(rows: int = 2000, seed: int = 0) -> list[dict]:
    """`rows` Rotten Tomatoes sentences (a seeded sample) as one-turn conversations: the user
    asks `CHAT_QUESTION`, the assistant answers "Positive." or "Negative." (the README's chat
    fine-tuning example, from offline data)."""
    table = read(DataConfig()).shuffle(seed=seed)
    return [
        {
            "messages": [
                {"role": "user", "content": CHAT_QUESTION.format(text=row["text"])},
                {"role": "assistant", "content": f"{row['label'].capitalize()}."},
            ]
        }
        for row in table.select(range(min(rows, len(table))))
    ]


def read(config: DataConfig):
    """The rows of `config.files` as a `datasets.Dataset` (the default task: Rotten Tomatoes
    sentences labelled ``positive`` / ``negative`` by the sign of their mean score)."""
    import datasets

    datasets.disable_progress_bars()
    if config.files == (ROTTEN_TOMATOES,):
        table = datasets.load_dataset(
            "csv", data_files=str(locate(ROTTEN_TOMATOES)), delimiter="\t", quoting=3, split="train"
        )
        table = table.filter(lambda row: row["sentiment"] != 0)
        return table.map(lambda row: {"label": "positive" if row["sentiment"] > 0 else "negative"})
    paths = [pathlib.Path(f) for f in config.files]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"data files not found: {missing}")
    suffixes = {p.suffix.lower() for p in paths}
    if config.format is None and (len(suffixes) != 1 or next(iter(suffixes)) not in FORMATS):
        raise ValueError(
            f"data files must share one of the suffixes {sorted(FORMATS)}, got {sorted(suffixes)}; or pass a format"
        )
    builder, options = BUILDERS[config.format or FORMATS[suffixes.pop()]]
    empty = ValueError(f"data files {list(config.files)} hold no rows")
    try:
        table = datasets.load_dataset(builder, data_files=[str(p) for p in paths], split="train", **options)
    except (ValueError, datasets.exceptions.DatasetsError) as err:
        if "corresponds to no data" in str(err):  # datasets' words for a file with a header and no rows
            raise empty from None
        problem = next(filter(None, (unreadable(path, builder) for path in paths)), None)
        raise ValueError(problem or f"data files {list(config.files)} cannot be read as {builder}: {err}") from None
    if len(table) == 0:
        raise empty
    return table


def unreadable(path: pathlib.Path, builder: str) -> str | None:
    """Why `path` is not a UTF-8 text file of `builder`'s format (a line number where it can
    say), or None when it cannot tell; asked only once `datasets` has failed to read it."""
    if builder == "parquet":
        return None
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        return f"{path}:{line}: not UTF-8 text (byte {raw[err.start]:#04x}); save the file as UTF-8"
    if builder != "json":
        return None
    try:
        json.loads(text)  # one JSON document (a list of rows, or {"data": [...]})
        return None
    except json.JSONDecodeError:
        pass
    for number, line in enumerate(text.splitlines(), 1):  # JSON Lines: a row per line
        try:
            if line.strip():
                json.loads(line)
        except json.JSONDecodeError as err:
            return f"{path}:{number}: not a JSON row ({err.msg} at column {err.colno})"
    return None


def template_columns(template: str) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(template) if field}


def held_out_rows(table, config: DataConfig) -> int:
    """How many of the table's rows are held out (`config.eval_size`, or by default
    min(1000, 10%)); refuses a split that would leave fewer than one row to train on."""
    rows = config.eval_size if config.eval_size is not None else max(1, min(1000, len(table) // 10))
    if len(table) <= rows:
        raise ValueError(f"data has {len(table)} rows, not more than --eval-size {rows}; lower --eval-size or add data")
    return rows


def resolve_task(config: DataConfig, table) -> DataConfig:
    """`config` with task ``auto`` made concrete from the data: ``chat`` when the first row
    is a conversation, else ``completion``."""
    if config.task != "auto":
        return config
    return dataclasses.replace(config, task="chat" if len(table) and chat.is_chat(table[0]) else "completion")


def check_columns(table, config: DataConfig) -> None:
    config = resolve_task(config, table)
    if config.task == "chat":
        if "messages" not in table.column_names and not {"prompt", "completion"} <= set(table.column_names):
            raise ValueError(
                f"chat data needs a 'messages' column, or 'prompt' and 'completion' message lists; its columns are "
                f"{table.column_names}"
            )
        return
    needed = {
        "completion": template_columns(config.prompt) | template_columns(config.completion),
        "text": {config.text_column},
        "classification": {config.text_column, config.label_column},
    }[config.task]
    absent = sorted(needed - set(table.column_names))
    if absent:
        raise ValueError(f"data has no column {absent}; its columns are {table.column_names}")


# -- encoding ------------------------------------------------------------------------------------


def encode(table, tokenizer, config: DataConfig) -> Split:
    """Tokenize `table` for `config.task` into fixed-shape arrays."""
    config = resolve_task(config, table)
    if config.task == "completion":
        return _encode_completion(table, tokenizer, config)
    if config.task == "text":
        return _encode_text(table, tokenizer, config)
    if config.task == "chat":
        return _encode_chat(table, tokenizer, config)
    return _encode_classification(table, tokenizer, config)


def _encode_completion(table, tokenizer, config: DataConfig) -> Split:
    prompts = [config.prompt.format(**row) for row in table]
    completions = [config.completion.format(**row) for row in table]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    completion_ids = [
        [*ids, tokenizer.eos_token_id] for ids in tokenizer(completions, add_special_tokens=False)["input_ids"]
    ]
    skeleton = len(tokenizer(config.prompt.format_map(_Blank()), add_special_tokens=False)["input_ids"])
    longest_completion = max(map(len, completion_ids))
    if config.seq_len < skeleton + longest_completion + 1:
        raise ValueError(
            f"seq_len {config.seq_len} is too small for the prompt: its template takes {skeleton} tokens and the "
            f"longest completion {longest_completion}; use at least {skeleton + longest_completion + 8}"
        )
    n, t = len(prompts), config.seq_len
    arrays = {name: np.zeros((n, t), np.int32) for name in ("input_ids", "attention_mask", "loss_mask")}
    arrays["answer"] = np.array([t - len(c) for c in completion_ids], np.int32)  # first completion token
    arrays["input_ids"][:] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        p = p[-(t - len(c)) :]  # over-long prompts lose their beginning; the template's end stays
        ids = p + c
        arrays["input_ids"][i, t - len(ids) :] = ids
        arrays["attention_mask"][i, t - len(ids) :] = 1
        arrays["loss_mask"][i, t - len(c) :] = 1
    distinct = sorted(set(completions))
    choices = None
    if len(distinct) <= 32:
        firsts = [tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in distinct]
        if len(set(firsts)) == len(firsts):
            choices = np.array(firsts, np.int32)
            arrays["choice"] = np.array([distinct.index(c) for c in completions], np.int32)
    return Split(arrays, choices, tuple(distinct))


def _encode_chat(table, tokenizer, config: DataConfig) -> Split:
    """Conversations, right-padded; a conversation longer than `seq_len` keeps its start."""
    t = config.seq_len
    arrays = {name: np.zeros((len(table), t), np.int32) for name in ("input_ids", "attention_mask", "loss_mask")}
    arrays["input_ids"][:] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for i, row in enumerate(table):
        ids, mask = chat.encode(tokenizer, *chat.conversation(row, f"data row {i}"))
        ids, mask = ids[:t], mask[:t]
        arrays["input_ids"][i, : len(ids)] = ids
        arrays["attention_mask"][i, : len(ids)] = 1
        arrays["loss_mask"][i, : len(ids)] = mask
    if not arrays["loss_mask"].any():
        raise ValueError(f"seq_len {t} cuts every conversation before its first assistant token; raise --seq-len")
    return Split(arrays)


def _encode_text(table, tokenizer, config: DataConfig) -> Split:
    ids = [
        tok
        for row in tokenizer(list(table[config.text_column]), add_special_tokens=False)["input_ids"]
        for tok in [*row, tokenizer.eos_token_id]
    ]
    rows = len(ids) // config.seq_len
    if rows == 0:
        raise ValueError(f"the text holds {len(ids)} tokens, fewer than one sequence of seq_len {config.seq_len}")
    input_ids = np.asarray(ids[: rows * config.seq_len], np.int32).reshape(rows, config.seq_len)
    ones = np.ones_like(input_ids)
    return Split({"input_ids": input_ids, "attention_mask": ones, "loss_mask": ones})


def _encode_classification(table, tokenizer, config: DataConfig) -> Split:
    labels = sorted(set(table[config.label_column]))
    encoded = tokenizer(
        list(table[config.text_column]),
        padding="max_length",
        truncation=True,
        max_length=config.seq_len,
        return_tensors="np",
    )
    arrays = {
        "input_ids": encoded["input_ids"].astype(np.int32),
        "attention_mask": encoded["attention_mask"].astype(np.int32),
        "label": np.array([labels.index(v) for v in table[config.label_column]], np.int32),
    }
    return Split(arrays, None, tuple(map(str, labels)))


class _Blank(dict):
    """Renders a template with every field empty (to measure its own length)."""

    def __missing__(self, key):
        return ""


def prepare(config: DataConfig, tokenizer) -> tuple[Split, Split]:
    """(train, held-out): read, check, split with a fixed seed, encode. Raises on bad input
    before any model work starts."""
    table = read(config)
    config = resolve_task(config, table)
    check_columns(table, config)
    parts = table.train_test_split(test_size=held_out_rows(table, config), seed=config.seed, shuffle=True)
    train = encode(parts["train"], tokenizer, config)
    held_out = encode(parts["test"], tokenizer, config)
    if train.choices is not None and held_out.labels != train.labels:
        held_out = dataclasses.replace(held_out, choices=None)
    return train, held_out


# -- packing -------------------------------------------------------------------------------------


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """The indices of the items in each bin, in order: each item (of length <= `capacity`)
    goes to the first bin with room for it. A max-tree over the bins' free room finds that
    bin in O(log n), so packing a large data set stays fast."""
    size = 1 << max(len(lengths) - 1, 0).bit_length()  # leaves: at least one bin per item
    room = [capacity] * (2 * size)  # room[size + b]: bin b's free room; above: the max of both children
    bins: list[list[int]] = []
    for item, length in enumerate(lengths):
        node = 1
        while node < size:
            node = 2 * node + (room[2 * node] < length)
        if node - size == len(bins):  # the first empty bin: the used ones come first
            bins.append([])
        bins[node - size].append(item)
        room[node] -= length
        while node > 1:
            node //= 2
            room[node] = max(room[2 * node], room[2 * node + 1])
    return bins


def pack(split: Split) -> Split:
    """`split`'s examples (each row's real tokens, as encoded: truncated to seq_len) packed
    first-fit, in order, into rows of seq_len: `segment_ids` number a row's examples from 1
    (0: padding, at the right, token id 0), `positions` restart at 0 in each, `loss_mask`
    is each example's own. Deterministic, and no token is lost. Per-row arrays (a
    completion's answer and choice) do not survive: score accuracy on unpacked rows."""
    ids, real, loss = split.arrays["input_ids"], split.arrays["attention_mask"].astype(bool), split.arrays["loss_mask"]
    lengths = real.sum(1)
    bins = first_fit(lengths.tolist(), ids.shape[1])
    names = ("input_ids", "attention_mask", "loss_mask", "segment_ids", "positions")
    arrays = {name: np.zeros((len(bins), ids.shape[1]), np.int32) for name in names}
    for row, examples in enumerate(bins):
        start = 0
        for segment, example in enumerate(examples, 1):
            cols = slice(start, start + lengths[example])
            arrays["input_ids"][row, cols] = ids[example, real[example]]
            arrays["loss_mask"][row, cols] = loss[example, real[example]]
            arrays["segment_ids"][row, cols] = segment
            arrays["positions"][row, cols] = np.arange(lengths[example])
            start = cols.stop
    arrays["attention_mask"] = (arrays["segment_ids"] > 0).astype(np.int32)
    return Split(arrays, split.choices, split.labels)


def packed_for_training(config: DataConfig, split: Split, batch_size: int) -> Split:
    """The training split as `config.packing` says: True packs it, False does not, None
    (the default) packs the completion and chat tasks' rows when that makes fewer rows that
    still fill a batch of `batch_size` (else packing saves nothing, or breaks the run)."""
    if config.packing is False or config.task not in PACKABLE:
        return split
    packed = pack(split)
    return packed if config.packing or batch_size <= len(packed) < len(split) else split


def token_use(split: Split) -> dict[str, Any]:
    """Whether `split` is packed, its examples and rows, and its real tokens / all row
    tokens with one example per row (``fill_before``) and as the rows are (``fill_after``):
    the padding that packing saved."""
    rows, seq_len = split.arrays["input_ids"].shape
    packed = "segment_ids" in split.arrays
    examples = int(split.arrays["segment_ids"].max(1).sum()) if packed else rows
    real = int(split.arrays["attention_mask"].sum())
    return {
        "packed": packed,
        "examples": examples,
        "rows": rows,
        "fill_before": real / (examples * seq_len),
        "fill_after": real / (rows * seq_len),
    }


# -- batching ------------------------------------------------------------------------------------


def check_batch(split: Split, batch_size: int) -> None:
    """Refuse a batch (sequences per step, micro-batches included) larger than the data."""
    if len(split) < batch_size:
        packed = " (packed; --no-packing keeps one example per row)" if "segment_ids" in split.arrays else ""
        raise ValueError(
            f"{len(split)} training rows{packed} are fewer than one batch of {batch_size} (batch size x grad accum); "
            "lower --batch-size / --grad-accum or add data"
        )


@dataclasses.dataclass(frozen=True)
class Batches:
    """Batch `step` of a seeded, epoch-wise reshuffled pass over `split`: a pure function of
    the step, so resuming at step k replays exactly what an uninterrupted run saw."""

    split: Split
    batch_size: int
    seed: int = 0

    def __post_init__(self):
        check_batch(self.split, self.batch_size)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.split) // self.batch_size

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of `step`."""
        return divmod(step, self.steps_per_epoch)

    def __call__(self, step: int, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The batch of `step`, or only its `rows` (a multi-host process reads its own)."""
        epoch, k = self.position(step)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.split))
        index = order[k * self.batch_size : (k + 1) * self.batch_size]
        return self.split.take(index if rows is None else index[rows])

    def iterate(self, start: int, stop: int, rows: np.ndarray | None = None) -> Iterator[dict[str, np.ndarray]]:
        for step in range(start, stop):
            yield self(step, rows)


def eval_batches(split: Split, batch_size: int, multiple: int = 16) -> Iterator[dict[str, Any]]:
    """Every row once, shortest first, each batch cropped to the smallest multiple of
    `multiple` tokens that holds its rows (left padding: crop from the left), the last one
    filled with weight-0 rows. Few distinct shapes, and no compute spent on padding."""
    lengths = split.arrays["attention_mask"].sum(1)
    order = np.argsort(lengths, kind="stable")
    seq_len = split.arrays["input_ids"].shape[1]
    for start in range(0, len(split), batch_size):
        index = order[np.minimum(np.arange(start, start + batch_size), len(split) - 1)]
        batch = split.take(index)
        batch["weight"] = (np.arange(start, start + batch_size) < len(split)).astype(np.float32)
        keep = min(seq_len, -(-int(lengths[index].max()) // multiple) * multiple)
        left_padded = "answer" in batch  # completion rows end at the right; others start at the left
        for name in ("input_ids", "attention_mask", "loss_mask"):
            if name in batch:
                batch[name] = batch[name][:, seq_len - keep :] if left_padded else batch[name][:, :keep]
        if "answer" in batch:
            batch["answer"] = batch["answer"] - (seq_len - keep)
        yield batch
