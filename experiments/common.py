"""What the studies share: the two tasks, one training run of a method, and the results files.

A run is keyed by everything that determines it (model, task sizes, method, training
settings, seed) and its result row is kept in ``results/runs/<key>.json`` (adapters in
``<key>.safetensors``), so studies that share a configuration (the rank sweep's r=8 and
the method comparison's LoRA) train it once, and an interrupted study picks up where it
stopped.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

import jlora
import jlora.models
from jlora import data
from jlora import train as training
from jlora.checkpoint import Checkpoints, fingerprint
from jlora.quantize import quantize_model
from jlora.tree import flatten, path_str, unflatten

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # a persistent cache: reruns compile nothing again
    jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "jlora-experiments-xla-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

RESULTS = pathlib.Path(__file__).parent / "results"
ENCODER = "all-minilm-l6-v2"
DECODER = "smollm2-135m-instruct"


# -- tasks ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
    """A pretrained model and its task's train / held-out (test) splits, and with the fair
    protocol a validation split carved from train, which picks learning rates."""

    model: str
    pretrained: jlora.models.Pretrained
    train: data.Split
    held_out: data.Split
    data: data.DataConfig
    validation: data.Split | None = None
    generic: data.Split | None = None  # text the model is not tuned on: its loss after training measures forgetting


def _first(split: data.Split, rows: int | None) -> data.Split:
    return split if rows is None else dataclasses.replace(split, arrays=split.take(np.arange(min(rows, len(split)))))


def encoder(rows: int | None = None, seq_len: int = 48, eval_size: int = 2000) -> Setup:
    """all-MiniLM-L6-v2 with a fresh 2-way classifier on Rotten Tomatoes sentences (8,568
    train / 2,000 held out; 48 tokens hold 95% of them whole). `rows` keeps the first rows
    of each split (smoke tests)."""
    config = data.DataConfig(task="classification", seq_len=seq_len, eval_size=eval_size)
    pretrained = jlora.models.load(ENCODER, head="classifier", num_labels=2, scan=False)
    train, held_out = data.prepare(config, pretrained.tokenizer)
    return Setup(ENCODER, pretrained, _first(train, rows), _first(held_out, rows), config)


def with_validation(setup: Setup, rows: int) -> Setup:
    """`setup` with `rows` of its training split set aside (a fixed permutation, the same for
    every run and seed) as the validation split."""
    order = np.random.default_rng(1234).permutation(len(setup.train))
    train, validation = (setup.train.take(np.sort(part)) for part in (order[rows:], order[:rows]))
    return dataclasses.replace(
        setup,
        train=dataclasses.replace(setup.train, arrays=train),
        validation=dataclasses.replace(setup.train, arrays=validation),
    )


def wikitext(tokenizer, rows: int = 128, seq_len: int = 128) -> data.Split:
    """The first `rows` sequences of `seq_len` tokens of WikiText-2's raw test set (``wikitext-2``
    preset): generic text, for the loss that tells what a fine-tune forgot."""
    import gzip

    import datasets

    from jlora.models.presets import locate

    with gzip.open(locate("wikitext-2") / "test.raw.gz", "rt", encoding="utf-8") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    table = datasets.Dataset.from_dict({"text": lines})
    return _first(data.encode(table, tokenizer, data.DataConfig(task="text", seq_len=seq_len)), rows)


def generic_loss(setup: Setup, params, lora: jlora.LoraConfig, batch_size: int = 32) -> float:
    """The model's mean next-token loss on `setup.generic` (WikiText-2) with `params`."""
    task = training.task_for(setup.pretrained, lora, setup.generic)
    return training.evaluate(training.make_eval_step(task), params, setup.generic, batch_size)["loss"]


TREC_CLASSES = ("description", "entity", "abbreviation", "human", "number", "location")  # label-coarse 0-5


def trec(rows: int | None = None, seq_len: int = 32, causal: bool = False) -> Setup:
    """TREC-6 question types (``trec-6`` preset: its first 5,452 questions train, the last
    500 are the standard test set): all-MiniLM-L6-v2 with a fresh 6-way classifier (32 tokens
    hold 99.9% of the questions whole), or with `causal` SmolLM2-135M-Instruct answering
    ``"Question: {text}\nType:"`` with the class's name (48 tokens)."""
    from jlora.models.presets import locate

    config = data.DataConfig(
        files=(str(locate("trec-6")),),
        task="completion" if causal else "classification",
        prompt="Question: {text}\nType:",
        seq_len=48 if causal else seq_len,
    )
    if causal:
        pretrained = jlora.models.load(DECODER, scan=True)
    else:
        pretrained = jlora.models.load(ENCODER, head="classifier", num_labels=len(TREC_CLASSES), scan=False)
    table = data.read(config).map(lambda row: {"label": TREC_CLASSES[int(row["label-coarse"])]})
    data.check_columns(table, config)
    train, test = (data.encode(table.select(r), pretrained.tokenizer, config) for r in (range(5452), range(5452, 5952)))
    if train.labels != test.labels:
        raise ValueError(f"TREC splits hold different classes: {train.labels} vs {test.labels}")
    return Setup(DECODER if causal else ENCODER, pretrained, _first(train, rows), _first(test, rows), config)


def decoder(rows: int | None = None, seq_len: int = 64, eval_size: int = 1000) -> Setup:
    """SmolLM2-135M-Instruct (scanned) on `jlora train`'s default task: the same sentences
    as ``"Review: {text}\\nSentiment:"`` -> ``" positive"`` / ``" negative"``."""
    config = data.DataConfig(seq_len=seq_len, eval_size=eval_size)
    pretrained = jlora.models.load(DECODER, scan=True)
    train, held_out = data.prepare(config, pretrained.tokenizer)
    return Setup(DECODER, pretrained, _first(train, rows), _first(held_out, rows), config)


# -- methods -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Method:
    """What is trained. With `adapters`, `lora` adds adapters and trains them with its
    `modules_to_save`; without, no adapter is added and only `lora.modules_to_save` is
    trained (head-only: the classifier; full fine-tuning: every module)."""

    name: str
    lora: jlora.LoraConfig
    learning_rate: float
    adapters: bool = True
    quantize: str | None = None  # the frozen base's kernels in "nf4" / "int8" (QLoRA)
    loraplus_ratio: float | None = None  # LoRA+: B at this many times the learning rate


def lora_method(name: str, learning_rate: float = 1e-3, head: Sequence[str] = ("classifier",), **lora) -> Method:
    """LoRA (alpha = 2r unless given, as `jlora train`'s alpha 16 for r=8)."""
    lora.setdefault("alpha", 2.0 * lora.get("r", 8))
    return Method(name, jlora.LoraConfig(modules_to_save=tuple(head), **lora), learning_rate)


def trained_modules(name: str, modules: str | Sequence[str], learning_rate: float) -> Method:
    """No adapters: `modules` (suffix names or one regex) trained fully."""
    return Method(name, jlora.LoraConfig(modules_to_save=modules), learning_rate, adapters=False)


# -- one run -------------------------------------------------------------------------------------


def run_key(setup: Setup, method: Method, config: training.TrainConfig) -> str:
    described = {
        "model": setup.model,
        "data": dataclasses.asdict(setup.data),
        "rows": [len(setup.train), len(setup.held_out)],
        "method": {"lora": method.lora.to_dict(), "adapters": method.adapters, "lr": method.learning_rate},
        "train": dataclasses.asdict(config),
    }
    if method.quantize:  # only when set, so that the keys of runs made before these fields stay
        described["method"]["quantize"] = method.quantize
    for extra in (setup.validation, setup.generic):
        if extra is not None:
            described["rows"].append(len(extra))
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_config(method: Method, seed: int, steps: int, batch_size: int) -> training.TrainConfig:
    """AdamW, 10% warmup then cosine decay, clipping at 1: the settings every study shares."""
    return training.TrainConfig(
        steps=steps,
        batch_size=batch_size,
        learning_rate=method.learning_rate,
        warmup_steps=max(1, steps // 10),
        seed=seed,
        eval_batch_size=64,
        loraplus_ratio=method.loraplus_ratio,
    )


def run(
    setup: Setup,
    method: Method,
    seed: int,
    steps: int,
    batch_size: int,
    runs: pathlib.Path,
    checkpoint_size: bool = False,
) -> dict[str, Any]:
    """Train `method` from the pretrained weights and evaluate it on the held-out split.

    Returns a row: held-out accuracy and loss, trainable parameters (count, %), XLA's
    planned peak memory of one training step, median step time, (with `checkpoint_size`)
    the bytes of an Orbax checkpoint of the trained leaves alone."""
    config = train_config(method, seed, steps, batch_size)
    key = run_key(setup, method, config)
    row_file = runs / f"{key}.json"
    if row_file.exists():
        row = json.loads(row_file.read_text())
        if "checkpoint_mb" in row or not checkpoint_size:
            return row  # else train it again (deterministic) to measure its checkpoint
    params, specs = setup.pretrained.params, setup.pretrained.kernel_specs()
    if method.quantize:  # as `jlora train --quantize` does: DoRA's magnitude is the quantized weight's norm
        quantized = lambda tree: quantize_model(tree, method.quantize, specs, method.lora)
        params = quantized(params) if method.lora.use_dora else params
    if method.adapters:
        params = jlora.init(params, method.lora, jax.random.key(seed), specs=specs)
    if method.quantize and not method.lora.use_dora:
        params = quantized(params)
    if "classifier" in params:  # a fresh head per seed (the loader's is seeded 0)
        params = dict(params, classifier=_fresh_head(params["classifier"], seed))
    counts = jlora.summary(params, method.lora)
    adapters, base = jlora.split(params, method.lora)
    adapters = jax.tree.map(jnp.copy, adapters)  # fit donates them; the pretrained tree stays intact
    task = training.task_for(setup.pretrained, method.lora, setup.train)
    memory = step_memory(task, config, adapters, base, setup.train)
    print(f"{method.name} seed {seed}: {counts.trainable:,} trainable ({counts.percent:.3f}%)", flush=True)
    adapters, history = training.fit(task, adapters, base, setup.train, config)
    params = jlora.join(adapters, base)
    eval_step = training.make_eval_step(task)
    result = training.evaluate(eval_step, params, setup.held_out, config.eval_batch_size)
    if setup.validation is not None:
        validation = training.evaluate(eval_step, params, setup.validation, config.eval_batch_size)
    seconds = np.diff([0.0] + [h["elapsed_s"] for h in history])
    row = {
        "method": method.name,
        "seed": seed,
        "accuracy": result["accuracy"],
        "loss": result["loss"],
        "trainable": counts.trainable,
        "trainable_percent": counts.percent,
        "peak_step_memory_mb": memory / 1e6,
        "step_s": float(np.median(seconds[1:])) if len(seconds) > 1 else float(seconds[0]),
        "train_s": history[-1]["elapsed_s"],
        "final_train_loss": float(np.mean([h["loss"] for h in history[-10:]])),
        "steps": steps,
        "batch_size": batch_size,
        "learning_rate": method.learning_rate,
        "run": key,
    }
    if setup.validation is not None:
        row |= {"val_accuracy": validation["accuracy"], "val_loss": validation["loss"]}
    if setup.generic is not None:
        row["generic_loss"] = generic_loss(setup, params, method.lora)
    if checkpoint_size:
        row["checkpoint_mb"] = checkpoint_bytes(adapters, base, method.lora) / 1e6
    runs.mkdir(parents=True, exist_ok=True)
    if method.adapters:
        save_adapters(adapters, runs / f"{key}.safetensors")
    row_file.write_text(json.dumps(row))
    return row


def _fresh_head(head: dict, seed: int) -> dict:
    """The classifier re-drawn for `seed` (normal, std 0.02 as BERT's initializer; bias 0)."""
    kernel = 0.02 * jax.random.normal(jax.random.key(10_000 + seed), head["kernel"].shape, head["kernel"].dtype)
    return {"kernel": kernel, "bias": jnp.zeros_like(head["bias"])}


def step_memory(task: training.Task, config: training.TrainConfig, adapters, base, split: data.Split) -> int:
    """XLA's planned peak bytes of one compiled training step: its arguments (base,
    trained leaves, optimizer state, batch), its outputs that do not reuse an argument's
    buffer, and its temporaries. Exact and noise-free, unlike a process's RSS."""
    tx = training.make_optimizer(config, task.lora)
    opt_state = jax.eval_shape(tx.init, adapters)
    batch = training.shape_batch(data.Batches(split, config.batch_size)(0), 1)
    step = training.make_train_step(task, tx, jax.random.key(0))
    stats = step.lower(adapters, opt_state, base, batch, jnp.int32(0)).compile().memory_analysis()
    return (
        stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes + stats.temp_size_in_bytes
    )


def checkpoint_bytes(adapters, base, lora: jlora.LoraConfig) -> int:
    """Bytes on disk of an Orbax checkpoint of the trained leaves (no optimizer state)."""
    with tempfile.TemporaryDirectory() as folder:
        with Checkpoints(folder, async_save=False) as checkpoints:
            checkpoints.save(1, adapters, None, config=lora, base_fingerprint=fingerprint(base))
        item = pathlib.Path(folder) / "1" / "adapters"
        return sum(f.stat().st_size for f in item.rglob("*") if f.is_file())


def save_adapters(adapters, path: pathlib.Path) -> None:
    save_file({path_str(keys): np.asarray(leaf) for keys, leaf in flatten(adapters).items()}, str(path))


def load_adapters(path: pathlib.Path) -> dict:
    return unflatten({tuple(name.split("/")): leaf for name, leaf in load_file(str(path)).items()})


def adapters_of(row: dict, runs: pathlib.Path) -> dict:
    return load_adapters(runs / f"{row['run']}.safetensors")


# -- results -------------------------------------------------------------------------------------


@functools.cache
def commit() -> str:
    """The commit the scripts run at (read once, when a study starts), with ``+dirty`` when
    tracked files had uncommitted changes."""
    root = pathlib.Path(__file__).parent.parent
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
    ).stdout.strip()
    return (head.stdout.strip() or "unknown") + ("+dirty" if dirty else "")


def write_csv(path: pathlib.Path, rows: list[dict], config: dict) -> None:
    """One line per run, each with the commit and the study's configuration (JSON)."""
    stamp = {"commit": commit(), "config": json.dumps(config, sort_keys=True)}
    columns = list(dict.fromkeys(k for row in rows for k in row)) + list(stamp)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(row | stamp for row in rows)


def grouped(rows: list[dict], by: str = "method") -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row[by], []).append(row)
    return groups


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    values = np.asarray(values, float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def summary_table(rows: list[dict], columns: dict[str, Callable[[list[dict]], str]], by: str = "method") -> str:
    """A markdown table with one line per group of `rows`; each column renders a group."""
    lines = ["| " + " | ".join([by, *columns]) + " |", "|" + "---|" * (len(columns) + 1)]
    for name, group in grouped(rows, by).items():
        lines.append("| " + " | ".join([str(name), *(render(group) for render in columns.values())]) + " |")
    return "\n".join(lines)


def pm(field: str, scale: float = 1.0, digits: int = 1) -> Callable[[list[dict]], str]:
    """Renders mean ± std of `field` (× `scale`) over a group, with the number of runs."""

    def render(group: list[dict]) -> str:
        mean, std = mean_std([r[field] * scale for r in group])
        return f"{mean:.{digits}f} ± {std:.{digits}f} (n={len(group)})"

    return render


def first(field: str, fmt: str = "{:,}") -> Callable[[list[dict]], str]:
    """Renders a field that is the same for every run of a group ("–" where it has none)."""
    return lambda group: fmt.format(group[0][field]) if field in group[0] else "–"


def median(field: str, fmt: str = "{:.3f}") -> Callable[[list[dict]], str]:
    """Renders the median of `field` over a group ("–" where it has none)."""
    return lambda group: fmt.format(float(np.median([r[field] for r in group]))) if field in group[0] else "–"


def accuracy_columns(loss: bool = False) -> dict[str, Callable[[list[dict]], str]]:
    """The columns every study's table starts with: held-out accuracy (and loss), trained share."""
    columns = {"held-out accuracy %": pm("accuracy", 100)}
    if loss:
        columns["held-out loss"] = pm("loss", 1, 3)
    return columns | {"trainable": first("trainable"), "trainable %": first("trainable_percent", "{:.3f}")}


def write_markdown(path: pathlib.Path, title: str, table: str, config: dict, seconds: float, notes: str = "") -> None:
    notes = f"{notes}\n\n" if notes else ""
    text = (
        f"# {title}\n\n{table}\n\n{notes}"
        f"Commit `{commit()}`, {jax.devices()[0].device_kind} ({os.cpu_count()} cores), "
        f"study took {seconds / 60:.1f} min. Configuration:\n\n```json\n{json.dumps(config, indent=2)}\n```\n"
    )
    path.write_text(text)


def accuracy_bars(rows: list[dict], path: pathlib.Path, title: str) -> None:
    """Held-out accuracy per method (mean ± std over seeds), each bar labelled with its trained share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = grouped(rows)
    names = list(groups)[::-1]  # first method on top
    stats = [mean_std([100 * r["accuracy"] for r in groups[n]]) for n in names]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(names) + 1.4))
    ax.barh(range(len(names)), [m for m, _ in stats], xerr=[s for _, s in stats], capsize=3, color="tab:blue")
    for y, (name, (mean, std)) in enumerate(zip(names, stats, strict=True)):
        label = f"{mean:.1f}%  ({groups[name][0]['trainable']:,} trained, {groups[name][0]['trainable_percent']:.3g}%)"
        ax.annotate(label, (mean + std, y), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    low = min(m - s for m, s in stats)
    ax.set_xlim(max(0, low - 5), 100)
    ax.set_xlabel("held-out accuracy % (mean ± std over seeds)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def study_config(setup: Setup, scale: Scale, methods: Sequence[Method]) -> dict:
    """What a study ran: model, data sizes, schedule, seeds and every method's settings."""
    return {
        "model": setup.model,
        "data": {"train_rows": len(setup.train), "held_out_rows": len(setup.held_out), "seq_len": setup.data.seq_len},
        "steps": scale.steps,
        "batch_size": scale.batch_size,
        "seeds": list(scale.seeds),
        "optimizer": "AdamW (no weight decay), 10% linear warmup, cosine decay, global-norm clipping at 1",
        "methods": {
            m.name: {"learning_rate": m.learning_rate, "adapters": m.adapters, "lora": m.lora.to_dict()}
            for m in methods
        },
    }


# -- command line --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Scale:
    """How big a study runs: the full study, or a smoke test of a few steps on a few rows."""

    steps: int
    batch_size: int
    seeds: tuple[int, ...]
    rows: int | None  # None: whole splits


def parser(description: str, steps: int, batch_size: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", type=pathlib.Path, default=RESULTS, help="results folder (default experiments/results)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--smoke", action="store_true", help="2 steps on 64 rows, one seed: checks the script runs")
    return p


def scale_of(args: argparse.Namespace) -> Scale:
    commit()  # the commit the study starts at
    if args.smoke:
        return Scale(steps=2, batch_size=4, seeds=(0,), rows=64)
    return Scale(args.steps, args.batch_size, tuple(args.seeds), None)
