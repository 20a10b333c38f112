"""The ``jlora`` command: train, eval, generate, merge, export-peft, import-peft.

jlora train                        # SmolLM2-135M-Instruct on Rotten Tomatoes sentiment
jlora train --config run.yaml --steps 300 --out runs/mine
jlora train --resume runs/mine     # after a crash or preemption: continue from the last checkpoint
jlora eval --adapter runs/default
jlora generate --adapter runs/default --input "A gorgeous, witty, seductive movie."
jlora merge --adapter runs/default --out merged-model
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import pathlib
import shutil
import sys
import time
from typing import Any

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_OUT = "runs/default"
RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"
BEST = "best"  # `--keep-best`: the adapters of the lowest held-out loss
INITIAL_ADAPTERS = "initial_adapters.safetensors"  # a base-changing init's A0, B0 (`fresh_params`)
# all a run writes
RUN_FILES = {
    RUN_FILE,
    "metrics.jsonl",
    "loss.png",
    CHECKPOINTS,
    "peft",
    "results.json",
    INITIAL_ADAPTERS,
    "tensorboard",
    BEST,
}
# exceptions that mean bad input (exit 2, a message); any other is a bug in jlora (exit 1)
BAD_INPUT = (ValueError, OSError)


@dataclasses.dataclass
class Run:
    """Everything a run was made from; `run.json` in the run folder holds it."""

    model: str = DEFAULT_MODEL
    scan: bool = True
    data: Any = None  # DataConfig
    lora: Any = None  # LoraConfig
    train: Any = None  # TrainConfig
    init_adapter: dict | None = None  # {"path", "hash"}: the adapter training started from

    def __post_init__(self):
        from jlora import LoraConfig
        from jlora.data import DataConfig
        from jlora.train import TrainConfig

        self.data = _section(DataConfig, self.data)
        self.lora = _section(
            LoraConfig, self.lora, {"r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
        )
        self.train = _section(TrainConfig, self.train)
        if self.data.task == "classification" and "classifier" not in self.lora.modules_to_save:
            # a new classification head must train fully (peft does the same for SEQ_CLS)
            saved = [*self.lora.modules_to_save, "classifier"]
            self.lora = dataclasses.replace(self.lora, modules_to_save=saved)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "scan": self.scan,
            "data": dataclasses.asdict(self.data),
            "lora": self.lora.to_dict(),
            "train": dataclasses.asdict(self.train),
            "init_adapter": self.init_adapter,
        }


def _section(cls, value, defaults: dict | None = None):
    if isinstance(value, cls):
        return value
    given = dict(value or {})
    unknown = sorted(set(given) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} settings {unknown}; known: {[f.name for f in dataclasses.fields(cls)]}"
        )
    return cls(**{**(defaults or {}), **given})


# -- arguments ------------------------------------------------------------------------------------

# flag -> (section, field, type, help); section None is a top-level Run field
TRAIN_FLAGS = {
    "--model": (
        None,
        "model",
        str,
        f"preset name, Hugging Face model directory or .gguf file (default {DEFAULT_MODEL})",
    ),
    "--data": ("data", "files", "list", "data files (csv, tsv, json, jsonl, txt, parquet); default: Rotten Tomatoes"),
    "--format": ("data", "format", str, "data format when the suffix does not say: csv, tsv, json, text, parquet"),
    "--task": (
        "data",
        "task",
        str,
        "completion (prompt -> completion), chat (conversations: assistant turns), text (language modelling), "
        "classification, or auto (default: chat for conversation rows, else completion)",
    ),
    "--prompt": ("data", "prompt", str, "prompt template over columns (default 'Review: {text}\\nSentiment:')"),
    "--completion": ("data", "completion", str, "completion template over columns (default ' {label}')"),
    "--text-column": ("data", "text_column", str, "text column for the text and classification tasks"),
    "--label-column": ("data", "label_column", str, "label column for the classification task"),
    "--seq-len": ("data", "seq_len", int, "tokens per sequence (default 64)"),
    "--eval-size": ("data", "eval_size", int, "held-out rows (default min(1000, 10%% of the rows))"),
    "--packing": (
        "data",
        "packing",
        "bool",
        "pack completion / chat training examples several to a row (default: when that saves rows)",
    ),
    "--targets": ("lora", "target_modules", "list", "modules to adapt, e.g. q_proj k_proj v_proj o_proj"),
    "--rank": ("lora", "r", int, "LoRA rank (default 8)"),
    "--alpha": ("lora", "alpha", float, "LoRA alpha (default 16)"),
    "--dropout": ("lora", "dropout", float, "dropout on the LoRA input (default 0)"),
    "--layers": ("lora", "layers", "ints", "only these layer indices get adapters"),
    "--init": (
        "lora",
        "init",
        str,
        "adapter initialisation: lora (default), gaussian, pissa, pissa_niter_N (randomized SVD, N iterations) or "
        f"olora; pissa and olora replace the base by the residual W - s·A·B (the run keeps A, B in {INITIAL_ADAPTERS}"
        "; its exports apply to the original base)",
    ),
    "--steps": ("train", "steps", int, "optimizer steps (default 100)"),
    "--batch-size": ("train", "batch_size", int, "sequences per micro-batch (default 8)"),
    "--grad-accum": ("train", "grad_accum", int, "micro-batches per step (default 1)"),
    "--lr": ("train", "learning_rate", float, "peak learning rate (default 1e-3), after a linear warmup"),
    "--warmup": ("train", "warmup_steps", int, "warmup steps (default 10)"),
    "--weight-decay": ("train", "weight_decay", float, "AdamW weight decay (default 0)"),
    "--loraplus-ratio": (
        "train",
        "loraplus_ratio",
        float,
        "LoRA+: train B at R × the learning rate, as peft's loraplus_lr_ratio (default: off)",
    ),
    "--dtype": ("train", "dtype", str, "compute dtype: float32 or bfloat16 (parameters stay float32)"),
    "--quantize": (
        "train",
        "quantize",
        str,
        "store the frozen base's kernels in nf4, int8 or bf16 and train the adapters over it (QLoRA; default: as "
        "loaded); eval, generate and merge of the run quantize it the same way",
    ),
    "--remat": ("train", "remat", "flag", "recompute each layer in the backward pass: less memory, ~1/3 more time"),
    "--seed": ("train", "seed", int, "seed for adapters, shuffling and dropout"),
    "--epochs": ("train", "epochs", float, "passes over the training rows, instead of --steps"),
    "--schedule": ("train", "schedule", str, "learning rate after the warmup: cosine (default), linear or constant"),
    "--eval-every": ("train", "eval_every", int, "steps between held-out evaluations during training (default: none)"),
    "--keep-best": (
        "train",
        "keep_best",
        "flag",
        "keep the adapters of the lowest held-out loss (with --eval-every) in RUN/best and use them at the end",
    ),
    "--early-stopping-patience": (
        "train",
        "early_stopping_patience",
        int,
        "stop after N held-out evaluations (--eval-every) without a lower loss (default: off)",
    ),
    "--report-to": (
        "train",
        "report_to",
        str,
        "tensorboard: also write the metrics as TensorBoard events in RUN/tensorboard",
    ),
    "--checkpoint-every": ("train", "checkpoint_every", int, "steps between checkpoints (default 50, and the last)"),
    "--keep-checkpoints": ("train", "keep_checkpoints", int, "how many recent checkpoints to keep (default 2)"),
}


def _add_flag(parser: argparse.ArgumentParser, flag: str, kind, text: str) -> None:
    if kind == "list":
        parser.add_argument(flag, nargs="+", help=text)
    elif kind == "flag":
        parser.add_argument(flag, action="store_const", const=True, help=text)
    elif kind == "ints":
        parser.add_argument(flag, nargs="+", type=int, help=text)
    elif kind == "bool":
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
    else:
        parser.add_argument(flag, type=kind, help=text)


def _add_flags(parser: argparse.ArgumentParser) -> None:
    for flag, (_, _, kind, text) in TRAIN_FLAGS.items():
        _add_flag(parser, flag, kind, text)
    parser.add_argument(
        "--scan",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="scan the layer stack (default on: faster compiles)",
    )


def run_from_args(args: argparse.Namespace) -> Run:
    """The run: `--config` file (YAML or JSON) first, flags over it."""
    return Run(**settings_from_args(args))


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the user gave, by section: the `--config` file's, then the flags'."""
    settings: dict[str, Any] = {}
    if getattr(args, "config", None):
        settings = _read_config(pathlib.Path(args.config))
    for flag, (section, field, _, _) in TRAIN_FLAGS.items():
        value = _flag(args, flag)
        if value is not None:
            (settings.setdefault(section, {}) if section else settings)[field] = value
    if args.scan is not None:
        settings["scan"] = args.scan
    unknown = sorted(set(settings) - {"model", "scan", "data", "lora", "train"})
    if unknown:
        raise ValueError(f"unknown config sections {unknown}; known: model, scan, data, lora, train")
    if {"steps", "epochs"} <= set(settings.get("train") or {}):
        raise ValueError("give --steps or --epochs (train.steps or train.epochs), not both")
    return settings


def _flag(args: argparse.Namespace, flag: str):
    return getattr(args, flag[2:].replace("-", "_"), None)


def _read_config(path: pathlib.Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"config file {path} not found")
    import yaml

    try:
        settings = yaml.safe_load(_read_text(path)) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path} is not valid YAML or JSON: {err}") from None
    if not isinstance(settings, dict):
        raise ValueError(f"config file {path} must hold a mapping of sections, got {type(settings).__name__}")
    return settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jlora",
        description="LoRA fine-tuning of Flax models in JAX. `jlora train` with no arguments fine-tunes "
        "SmolLM2-135M-Instruct on Rotten Tomatoes sentiment in a few minutes on a CPU.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error (also JLORA_DEBUG=1 in the environment)"
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{train,eval,generate,merge,export-peft,import-peft}"
    )
    train = sub.add_parser(
        "train",
        help="fine-tune a model with LoRA",
        description="Fine-tune with LoRA. Every setting is a flag or a key of --config "
        "(sections model, scan, data, lora, train).",
    )
    train.add_argument("--config", help="YAML or JSON file with the settings; flags override it")
    _add_flags(train)
    train.add_argument("--out", default=DEFAULT_OUT, help=f"run folder (default {DEFAULT_OUT})")
    train.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    train.add_argument(
        "--resume",
        metavar="RUN",
        help="continue the run in this folder from its last complete checkpoint, with the settings of its run.json",
    )
    train.add_argument(
        "--init-adapter",
        metavar="DIR",
        help="start from this adapter (a PEFT directory or a jlora run folder): its LoRA settings become the "
        "run's, flags may not contradict them (but --dropout), the optimizer starts fresh",
    )
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.add_argument(
        "--mesh",
        help="shard training over a device mesh, e.g. data=2,fsdp=2,tensor=2 or fsdp=-1 (-1: the rest of the "
        "devices); default: one device",
    )
    train.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process job (jax.distributed.initialize; detects Cloud TPU, SLURM, MPI, Kubernetes)",
    )
    train.add_argument("--coordinator", help="host:port of process 0 (implies --distributed)")
    train.add_argument("--num-processes", type=int, help="processes in the job (with --coordinator)")
    train.add_argument("--process-id", type=int, help="this process's index (with --coordinator)")

    evaluate = sub.add_parser("eval", help="held-out loss and accuracy of a run (or of a model zero-shot)")
    evaluate.add_argument("--adapter", help="run folder whose adapters to evaluate")
    evaluate.add_argument("--model", help="evaluate this model without adapters (zero-shot)")
    evaluate.add_argument("--quiet", action="store_true")

    generate = sub.add_parser(
        "generate", help="generate text with adapters applied: several adapters over one base, in one batch"
    )
    generate.add_argument(
        "--adapter",
        action="append",
        help="run folder or PEFT directory; repeat to serve several from one loaded base (each prompt runs "
        "with every adapter, or as --prompts says)",
    )
    generate.add_argument("--model", help="model without adapters (default: the run's, or the default preset)")
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt, as is (or chat-templated with --chat)")
    source.add_argument("--input", help="text filled into the run's prompt template, e.g. a review")
    source.add_argument(
        "--prompts",
        help='JSONL file, a row per line: {"adapter": "<an --adapter path or base>", "prompt" or "input": "..."}',
    )
    generate.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap the prompt in the tokenizer's chat template (default: on without --adapter)",
    )
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=0)

    export = sub.add_parser("export-peft", help="write a run's adapters in the Hugging Face PEFT format")
    export.add_argument("run", help="run folder")
    export.add_argument("out", help="new folder for adapter_config.json + adapter_model.safetensors")

    imports = sub.add_parser(
        "import-peft",
        help="turn a Hugging Face PEFT adapter directory into a jlora run folder (for eval, generate, merge)",
    )
    imports.add_argument("dir", help="folder with adapter_config.json + adapter_model.safetensors")
    imports.add_argument("--out", help="new run folder (default runs/<the directory's name>)")
    for flag, (section, _, kind, text) in TRAIN_FLAGS.items():
        if section in (None, "data"):
            _add_flag(imports, flag, kind, text)
    imports.add_argument(
        "--scan", action=argparse.BooleanOptionalAction, default=None, help="scan the layer stack (default on)"
    )

    merge = sub.add_parser("merge", help="write base + adapters as one Hugging Face model directory")
    merge.add_argument("--adapter", required=True, help="run folder")
    merge.add_argument("--out", required=True, help="new folder for the merged model (safetensors)")
    return parser


# -- commands -------------------------------------------------------------------------------------


def check_out(out: pathlib.Path, run: Run, overwrite: bool) -> bool:
    """Refuse to mix two runs in one folder, and to replace anything but a jlora run; True
    when `out` holds a run that `--overwrite` will replace. Writes nothing."""
    aside = previous_of(out)
    if aside.exists():
        raise FileExistsError(
            f"{aside} holds the run that an interrupted --overwrite moved aside from {out}: "
            f"get it back with `rm -r {out}; mv {aside} {out}`, or delete it, then run again"
        )
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; choose a folder")
    held = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if not held:
        return False
    if overwrite:
        refuse_to_replace(out, held)
        return True
    previous = out / RUN_FILE
    if previous.exists():
        old, new = _read_json(previous), json.loads(json.dumps(run.to_dict()))
        for field, unresolved in (("task", "auto"), ("packing", None)):  # resolved from the data once read
            if new["data"][field] == unresolved:
                new["data"][field] = old.get("data", {}).get(field)
        differs = sorted(k for k in new if old.get(k) != new[k])
        same = f"this run already (--resume {out} continues it)"
        what = f"a different run (differing: {', '.join(differs)})" if differs else same
    else:
        what = f"files that are not a jlora run ({_listing(held)})"
    raise FileExistsError(f"{out} holds {what}; pass --overwrite to replace it or choose another --out")


def refuse_to_replace(out: pathlib.Path, held: list[str]) -> None:
    """`--overwrite` replaces a jlora run folder only: never the current directory or a
    parent of it, the file system's root, the home directory, a repository, or a folder
    holding anything a run does not write."""
    path, here = out.resolve(), pathlib.Path.cwd().resolve()
    if path == here or path in here.parents:
        raise FileExistsError(f"--overwrite will not replace {out}: it is the current directory or a parent of it")
    if path == pathlib.Path(path.anchor) or path == pathlib.Path.home().resolve() or (path / ".git").exists():
        raise FileExistsError(f"--overwrite will not replace {out}: it is the root, the home directory or a repository")
    foreign = [name for name in held if name not in RUN_FILES]
    if RUN_FILE not in held or foreign:
        raise FileExistsError(
            f"--overwrite replaces only a jlora run folder ({RUN_FILE} and the files a run writes); {out} holds "
            f"{_listing(foreign or held)}: choose another --out"
        )


def _listing(names: list[str], most: int = 8) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def previous_of(out: pathlib.Path) -> pathlib.Path:
    """Where `--overwrite` keeps the run it replaces until the new one is complete."""
    out = out.resolve()
    return out.with_name(f".{out.name}.previous")


@contextlib.contextmanager
def replacing(out: pathlib.Path, replace: bool, writer: bool = True):
    """The body makes a run in `out`. With `replace`, the run there before is first moved
    aside (`previous_of(out)`): it comes back if the new run fails before its first
    checkpoint, and is deleted once the new run is complete (a `--resume` of a replacing
    run that was killed completes the replacement the same way)."""
    aside = previous_of(out)
    if replace and writer:
        out.rename(aside)
        print(f"moved the previous run aside to {aside}; it is deleted once this run is complete")
    try:
        yield
    except BaseException:
        if writer and aside.exists():
            if _has_checkpoint(out):
                print(f"the run it replaces is kept in {aside}", file=sys.stderr)
            else:
                shutil.rmtree(out, ignore_errors=True)
                aside.rename(out)
                print(f"the new run failed before its first checkpoint: {out} holds the previous run", file=sys.stderr)
        raise
    if writer and aside.exists():
        doomed = aside.with_name(f"{aside.stem}.deleting")  # one rename, so a kill never leaves half a previous run
        shutil.rmtree(doomed, ignore_errors=True)
        aside.rename(doomed)
        shutil.rmtree(doomed)


def _has_checkpoint(out: pathlib.Path) -> bool:
    folder = out / CHECKPOINTS
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def check_new_folder(out: str | pathlib.Path) -> pathlib.Path:
    """A folder an export will create: it must not exist yet (refused before any loading)."""
    out = pathlib.Path(out)
    if out.exists() or out.is_symlink():
        raise FileExistsError(f"{out} exists; choose a new folder")
    if out.parent.exists() and not out.parent.is_dir():
        raise FileExistsError(f"{out.parent} is a file, so {out} cannot be made there")
    return out


def load_model(run: Run, labels: int | None = None):
    import jax.numpy as jnp

    import jlora.models

    kwargs = {"scan": run.scan, "dtype": jnp.dtype(run.train.dtype)}
    if run.data.task == "classification":
        kwargs |= {"head": "classifier", "num_labels": labels}
    pretrained = jlora.models.load(run.model, **kwargs)
    if run.train.remat:
        pretrained.model = pretrained.model.clone(remat=True)
    return pretrained


def load_inputs(run: Run, mesh=None):
    """(run, pretrained, train, held-out), validating as early as possible: data, held-out
    size, model, sequence length, batch and mesh; the run's data task and packing made
    concrete (``auto``: chat for conversations; packed where it saves rows) and its steps
    (from ``epochs``, over the packed rows). Writes nothing."""
    from jlora import data
    from jlora import train as training

    table = data.read(run.data)  # missing or unreadable files, empty data
    run = dataclasses.replace(run, data=data.resolve_task(run.data, table))
    data.check_columns(table, run.data)  # absent columns
    data.held_out_rows(table, run.data)  # more held out than there are rows
    pretrained = load_model(run, _labels(run, table))  # unknown presets, files that are not models
    train, held_out = data.prepare(run.data, pretrained.tokenizer)  # seq_len too small
    train = data.packed_for_training(run.data, train, run.train.batch_size * run.train.grad_accum)
    run = dataclasses.replace(run, data=dataclasses.replace(run.data, packing="segment_ids" in train.arrays))
    data.check_batch(train, run.train.batch_size * run.train.grad_accum)
    run = dataclasses.replace(run, train=training.with_epochs(run.train, len(train)))
    if mesh is not None:
        from jlora.sharding import BATCH

        shards = math.prod(mesh.shape[axis] for axis in BATCH)
        if run.train.batch_size % shards:
            raise ValueError(f"--batch-size {run.train.batch_size} does not split over the mesh's {shards} data shards")
    return run, pretrained, train, held_out


def prepare(run: Run, mesh=None, initial: dict | None = None):
    """(run, pretrained, params, train, held-out): `load_inputs` and fresh adapters of
    `run.lora` (unknown targets, ranks too large), from `initial` for a base-changing init
    (`fresh_params`)."""
    run, pretrained, train, held_out = load_inputs(run, mesh)
    return run, pretrained, quantized(run, pretrained, fresh_params(run, pretrained, initial)), train, held_out


def fresh_params(run: Run, pretrained, initial: dict | None = None):
    """`pretrained`'s params with fresh adapters of `run.lora`. A base-changing init (PiSSA,
    OLoRA) starts them at `initial` (A0, B0 by path, as `initial_factors` gives them; decomposed
    from the kernels when None) over the residual base W - s·A0·B0, which is always computed
    from those factors (`jlora.merge.unmerge`): a run, its resume, eval, merge and exports then
    hold the same base bit for bit, as the checkpoints' fingerprint of it requires."""
    import jax

    import jlora
    from jlora.merge import unmerge

    def init(lora, params=pretrained.params):
        return jlora.init(params, lora, jax.random.key(run.train.seed), specs=pretrained.kernel_specs())

    if run.lora.use_dora and not run.lora.changes_base:  # the magnitude of the weights DoRA scales (dequantized)
        return init(run.lora, quantized(run, pretrained, pretrained.params))
    if not run.lora.changes_base:
        return init(run.lora)
    if initial is None:
        initial = initial_factors(init(run.lora))
    shapes = jax.eval_shape(lambda: init(dataclasses.replace(run.lora, init="lora")))
    return unmerge(pretrained.params, _initial_tree(initial, shapes), run.lora)


def initial_factors(params) -> dict:
    """``{path: array}`` of every LoRA factor in `params`, on the host (safetensors' form)."""
    import numpy as np

    from jlora.tree import LORA_A, LORA_B, flatten, path_str

    return {path_str(keys): np.asarray(leaf) for keys, leaf in flatten(params).items() if keys[-1] in (LORA_A, LORA_B)}


def _initial_tree(initial: dict, shapes) -> dict:
    """`initial` (``{path: array}``) as the tree of the factors in `shapes` (a tree of arrays
    or of their shapes), refused unless it holds exactly those, shaped and typed alike."""
    import jax.numpy as jnp

    from jlora.tree import LORA_A, LORA_B, flatten, path_str, unflatten

    wanted = {path_str(keys): (keys, leaf) for keys, leaf in flatten(shapes).items() if keys[-1] in (LORA_A, LORA_B)}
    if initial.keys() != wanted.keys() or any(
        (initial[p].shape, initial[p].dtype) != (leaf.shape, leaf.dtype) for p, (_, leaf) in wanted.items()
    ):
        raise ValueError(
            f"{INITIAL_ADAPTERS} does not hold the initial adapters of the run's LoRA settings (altered, or another "
            "run's)"
        )
    return unflatten({keys: jnp.asarray(initial[p]) for p, (keys, _) in wanted.items()})


def read_initial(folder: pathlib.Path, run: Run, required: bool = True) -> dict | None:
    """The A0, B0 a base-changing run keeps (`INITIAL_ADAPTERS`); None for other runs, and
    when the file is missing but not `required` (a run killed before it wrote it)."""
    path = folder / INITIAL_ADAPTERS
    if not run.lora.changes_base or not (required or path.exists()):
        return None
    if not path.exists():
        raise FileNotFoundError(
            f"{folder}: a run with init={run.lora.init!r} trains over a residual base computed from its initial "
            f"adapters, kept in {INITIAL_ADAPTERS}, which is missing"
        )
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from None


def write_initial(folder: pathlib.Path, initial: dict) -> None:
    """Keep `initial` (`initial_factors`) in the run folder, replaced atomically."""
    from safetensors.numpy import save_file

    staging = folder / f"{INITIAL_ADAPTERS}.tmp"
    save_file(initial, staging)
    os.replace(staging, folder / INITIAL_ADAPTERS)


def quantized(run: Run, pretrained, params):
    """`params` with the frozen kernels quantized as the run says (`train.quantize`, QLoRA:
    `jlora.quantize.quantize_model`), adapters and trainable modules untouched."""
    if run.train.quantize is None:
        return params
    from jlora.quantize import quantize_model

    return quantize_model(params, run.train.quantize, pretrained.kernel_specs(), run.lora)


def prepare_from_adapter(run: Run, source: str, given_lora: dict, mesh=None):
    """`prepare` with the adapters of `source` (a PEFT directory or a jlora run) instead of
    fresh ones: the run takes their LoRA settings, which `given_lora` (what the user set)
    may not contradict, except the dropout. Returns the run too, recording the source."""
    import jlora
    from jlora.checkpoint import fingerprint

    run, pretrained, train, held_out = load_inputs(run, mesh)
    params, lora = load_adapters(source, pretrained)
    contradicted = [
        f"{field}={value!r} (the adapter has {getattr(lora, field)!r})"
        for field, value in given_lora.items()
        if field != "dropout" and not _same_setting(lora, dataclasses.replace(lora, **{field: value}), field)
    ]
    if contradicted:
        raise ValueError(
            f"--init-adapter {source}: the run's LoRA settings are the adapter's; these contradict them: "
            f"{', '.join(contradicted)}. Drop them"
        )
    lora = dataclasses.replace(lora, dropout=given_lora.get("dropout", run.lora.dropout))
    adapters, _ = jlora.split(params, lora)
    run = dataclasses.replace(run, lora=lora)
    _, base = jlora.split(quantized(run, pretrained, pretrained.params), lora)  # this run's, not the source's
    params = jlora.join(adapters, base)
    origin = {"path": str(pathlib.Path(source).absolute()), "hash": fingerprint(adapters)["hash"]}
    if run.init_adapter is not None and run.init_adapter["hash"] != origin["hash"]:
        raise ValueError(f"{source}: the adapter changed since this run started from it (its content hash differs)")
    return dataclasses.replace(run, init_adapter=origin), pretrained, params, train, held_out


def _same_setting(lora, other, field: str) -> bool:
    """Whether two LoraConfigs agree on `field` (module lists in any order)."""
    mine, theirs = getattr(lora, field), getattr(other, field)
    return sorted(mine) == sorted(theirs) if field in ("target_modules", "modules_to_save") else mine == theirs


def adapter_base_model(source: str) -> str:
    """The base model of a PEFT directory (a preset's hub id or a local folder) or of a run."""
    import jlora.peft
    from jlora.models import PRESETS

    folder = pathlib.Path(source)
    if (folder / RUN_FILE).exists():
        return _run_of(folder).model
    if not (folder / "adapter_config.json").exists():
        raise FileNotFoundError(f"{folder} is neither a jlora run folder ({RUN_FILE}) nor a PEFT directory")
    named = jlora.peft.read(folder)[0].get("base_model_name_or_path")
    presets = {preset.hub_id: name for name, preset in PRESETS.items()}
    if named in presets or (named and pathlib.Path(named).exists()):
        return presets.get(named, named)
    raise ValueError(f"{folder}: base model {named!r} is neither a preset's nor a local folder; pass --model")


def start_devices(args):
    """Join a multi-process job when asked (flags, or what `jax.distributed` detects: Cloud
    TPU, SLURM, Open MPI, Kubernetes, JAX_COORDINATOR_ADDRESS) and build the `--mesh`."""
    if args.distributed or args.coordinator:
        import jax

        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    if not args.mesh:
        return None
    from jlora.sharding import make_mesh

    return make_mesh(args.mesh)


def resumed_run(args) -> tuple[Run, pathlib.Path]:
    """The run of `--resume RUN`: its own run.json; settings flags would contradict it."""
    out = pathlib.Path(args.resume)
    if not (out / RUN_FILE).exists():
        raise FileNotFoundError(f"--resume {out}: no {RUN_FILE} there; start the run without --resume")
    given = [flag for flag in TRAIN_FLAGS if _flag(args, flag) is not None]
    given += ["--config"] * bool(args.config) + ["--scan"] * (args.scan is not None)
    if given:
        raise ValueError(f"--resume takes every setting from {out / RUN_FILE}; drop {', '.join(given)}")
    return _run_of(out), out


def cmd_train(args) -> int:
    """Validate everything (settings, out folder, data, model, targets, batch, mesh), then
    train in `--out`: a run there is replaced only with `--overwrite`, and only once this
    run is complete."""
    import jax

    started = time.perf_counter()
    mesh = start_devices(args)
    given: dict[str, Any] = {}
    if args.resume:
        run, out = resumed_run(args)
        if (out / "results.json").exists():
            print(f"{out} is complete (results.json); nothing to resume")
            return 0
        replace = False
        source = run.init_adapter["path"] if run.init_adapter and not _has_checkpoint(out) else None
    else:
        given, out, source = settings_from_args(args), pathlib.Path(args.out), args.init_adapter
        if source and "model" not in given:
            given["model"] = adapter_base_model(source)
        run = Run(**given)
        replace = check_out(out, run, args.overwrite)
    if source:
        run, *prepared = prepare_from_adapter(run, source, given.get("lora", {}), mesh)
    else:
        initial = read_initial(out, run, required=_has_checkpoint(out)) if args.resume else None
        run, *prepared = prepare(run, mesh, initial)
    with replacing(out, replace, writer=jax.process_index() == 0), reporter(run, out) as report:
        return train_run(run, out, *prepared, mesh=mesh, progress=not args.quiet, started=started, report=report)


@contextlib.contextmanager
def reporter(run: Run, out: pathlib.Path):
    """Where the run's metrics records also go (`--report-to`): a `TensorBoard` writer in
    ``out/tensorboard`` on process 0, closed when the run ends, or None."""
    import jax

    from jlora import train as training

    if run.train.report_to != "tensorboard" or jax.process_index() != 0:
        yield None
        return
    report = training.TensorBoard(out / "tensorboard")
    try:
        yield report
    finally:
        report.close()


def train_run(
    run: Run, out: pathlib.Path, pretrained, params, train_split, held_out, *, mesh, progress, started, report=None
):
    """Evaluate, train, evaluate, export: the run folder `out`, continued where a killed
    run of the same settings left it; every metrics record also to `report` (`reporter`)."""
    import jax

    import jlora
    from jlora import data
    from jlora import train as training
    from jlora.checkpoint import Checkpoints

    summary = jlora.summary(params, run.lora)
    print(f"model {run.model}: {summary.total:,} parameters, {summary.trainable:,} trainable ({summary.percent:.2f}%)")
    print(f"data: {len(train_split):,} training rows, {len(held_out):,} held out; seq_len {run.data.seq_len}")
    use = data.token_use(train_split)
    print(
        f"packing {'on' if use['packed'] else 'off'}: {use['examples']:,} examples in {use['rows']:,} rows; real "
        f"tokens {use['fill_before']:.1%} of the row tokens one example per row, {use['fill_after']:.1%} as trained"
    )
    writer = jax.process_index() == 0  # files are written once; checkpoints by every process
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_FILE).write_text(json.dumps(run.to_dict(), indent=2))
    metrics_file = out / "metrics.jsonl"
    adapters, base = jlora.split(params, run.lora)
    initial = initial_factors(adapters) if run.lora.changes_base else None  # a host copy: `fit` donates `adapters`
    if writer and initial is not None and not (out / INITIAL_ADAPTERS).exists():
        write_initial(out, initial)
    task = training.task_for(pretrained, run.lora, train_split, held_out)
    eval_step = training.make_eval_step(task)
    evals = {r["eval"]: r for r in training.read_metrics(metrics_file) if "eval" in r}  # kept by a resumed run
    if "before" not in evals:
        evals["before"] = training.evaluate(eval_step, params, held_out, run.train.eval_batch_size, progress)
        _report("before", 0, evals["before"], metrics_file, report)
    best = Checkpoints(out / BEST, max_to_keep=1) if run.train.keep_best else None
    periodic = Checkpoints(out / CHECKPOINTS, max_to_keep=run.train.keep_checkpoints)
    with periodic as checkpoints, best or contextlib.nullcontext():
        if checkpoints.latest_step() is not None:
            print(f"resuming from step {checkpoints.latest_step()} of {out / CHECKPOINTS}")
        held_out_metrics = lambda adapters: training.evaluate(
            eval_step, jlora.join(adapters, base), held_out, run.train.eval_batch_size, False
        )
        adapters, history = training.fit(
            task,
            adapters,
            base,
            train_split,
            run.train,
            metrics_file,
            progress,
            checkpoints,
            mesh,
            held_out_metrics,
            report,
            best,
        )
    last_step = history[-1]["step"]
    if "after" not in evals:
        params = jlora.join(adapters, base)
        evals["after"] = training.evaluate(eval_step, params, held_out, run.train.eval_batch_size, progress)
        _report("after", last_step, evals["after"], metrics_file, report)
    best_step = last_step
    if best is not None:
        adapters, best_step, evals["after"] = best_of(out, adapters, base, evals["after"], metrics_file, last_step)
    if jax.process_count() > 1:  # every process holds a part of the adapters: gather them for the export
        from jax.experimental import multihost_utils

        adapters = multihost_utils.process_allgather(adapters, tiled=True)
    if not writer:
        return 0
    shutil.rmtree(out / "peft", ignore_errors=True)  # a resumed run killed after its export writes it again
    export_peft(run, pretrained, jlora.join(adapters, base), out / "peft", initial)
    during = [r for r in training.read_metrics(metrics_file) if r.get("eval") == "step"]
    training.plot_loss(history, evals, out / "loss.png", during)
    last = out / CHECKPOINTS / str(last_step)
    adapter_bytes, checkpoint_bytes = _bytes_under(last / "adapters"), _bytes_under(last)
    result = {
        "accuracy_before": evals["before"].get("accuracy"),
        "accuracy_after": evals["after"].get("accuracy"),
        "loss_before": evals["before"]["loss"],
        "loss_after": evals["after"]["loss"],
        "train_seconds": history[-1]["elapsed_s"],
        "median_tokens_per_s": float(sorted(h["tokens_per_s"] for h in history)[len(history) // 2]),
        "wall_seconds": time.perf_counter() - started,
        "steps": last_step,
        "stopped_early": bool(history[-1].get("stopped_early", False)),
        "best_step": best_step,  # the step of the adapters exported and evaluated "after"
        "adapter_bytes": adapter_bytes,  # what export and serving need
        "checkpoint_bytes": checkpoint_bytes,  # with the optimizer state, to resume
        "base_bytes": sum(leaf.nbytes for leaf in jax.tree.leaves(base)),
        "packing": use,  # examples, rows, real tokens / row tokens before and after packing
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    base_mb = result["base_bytes"] / 1e6
    print(
        f"adapters on disk {adapter_bytes / 1e6:.2f} MB, {adapter_bytes / result['base_bytes']:.2%} of the base's "
        f"{base_mb:.0f} MB ({checkpoint_bytes / 1e6:.2f} MB with the optimizer state)"
    )
    kept = f", {INITIAL_ADAPTERS}" if initial is not None else ""
    print(
        f"wrote {out}/ (run.json, metrics.jsonl, loss.png, {CHECKPOINTS}/, peft/, results.json{kept}) "
        f"in {result['wall_seconds']:.0f} s"
    )
    return 0


def best_of(out: pathlib.Path, adapters, base, after: dict, metrics_file: pathlib.Path, last_step: int):
    """``(adapters, step, held-out metrics)`` of the lowest held-out loss: the last step's
    (`after`) or the evaluation kept in ``out/best``, restored from there."""
    import jax

    from jlora.checkpoint import Checkpoints, fingerprint
    from jlora.train import read_metrics

    during = {r["step"]: r for r in read_metrics(metrics_file) if r.get("eval") == "step"}
    with Checkpoints(out / BEST, max_to_keep=1) as best:
        step = best.latest_step()
        if step is None or step not in during or during[step]["loss"] >= after["loss"]:
            return adapters, last_step, after
        like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), adapters)
        restored = best.restore(like, step=step, base_fingerprint=fingerprint(base))
    metrics = {k: v for k, v in during[step].items() if k not in ("eval", "step")}
    print(f"keeping step {step}'s adapters: loss {metrics['loss']:.4f} (step {last_step}: {after['loss']:.4f})")
    return restored.adapters, step, metrics


def _bytes_under(folder: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _report(name: str, step: int, result: dict, metrics_file: pathlib.Path, report=None) -> None:
    from jlora import train as training

    text = f"held-out {name}: loss {result['loss']:.4f}"
    if "accuracy" in result:
        text += f", accuracy {result['accuracy']:.2%}"
    print(text)
    training.append_record(metrics_file, {"eval": name, "step": step, **result}, report)


def export_peft(run: Run, pretrained, params, out: pathlib.Path, initial: dict | None = None) -> pathlib.Path:
    """The run's adapters as a Hugging Face PEFT directory (peft, vLLM and TGI load it); a
    base-changing run's, with its `initial` adapters, as plain LoRA for the original base."""
    import jlora.peft
    from jlora.models import hf_module_name

    return jlora.peft.export(
        params,
        run.lora,
        out,
        hf_module_name,
        task_type="SEQ_CLS" if run.data.task == "classification" else "CAUSAL_LM",
        base_model_name_or_path=hub_id(run.model),
        initial=None if initial is None else _initial_tree(initial, params),
    )


def hub_id(model: str) -> str:
    from jlora.models import PRESETS

    return PRESETS[model].hub_id if model in PRESETS else model


def load_run(folder: str):
    """(run, pretrained, params with the run's adapters, train and held-out data) of a run
    folder: the latest complete checkpoint, refused if made against another base."""

    path = pathlib.Path(folder)
    if not (path / RUN_FILE).exists():
        raise FileNotFoundError(f"{path} is not a jlora run folder (no {RUN_FILE})")
    run = _run_of(folder)
    run, pretrained, params, train, held_out = prepare(run, initial=read_initial(path, run))
    return run, pretrained, restore_adapters(path, run, params), train, held_out


def restore_adapters(folder: pathlib.Path, run: Run, params):
    """`params` (freshly initialised with `run.lora`) with the run's adapters: those a finished
    `--keep-best` run chose (``best_step`` in results.json), else the latest checkpoint;
    refused if the checkpoint was made against another base."""
    import jlora
    from jlora.checkpoint import Checkpoints, fingerprint

    if not (folder / CHECKPOINTS).exists():
        raise FileNotFoundError(f"{folder} has no {CHECKPOINTS}/ (did the run save a step?)")
    chosen = _read_json(folder / "results.json").get("best_step") if (folder / "results.json").exists() else None
    kept = chosen is not None and (folder / BEST / str(chosen)).exists()
    template, base = jlora.split(params, run.lora)
    with Checkpoints(folder / (BEST if kept else CHECKPOINTS)) as checkpoints:
        restored = checkpoints.restore(template, step=chosen if kept else None, base_fingerprint=fingerprint(base))
    return jlora.join(restored.adapters, base)


def cmd_eval(args) -> int:
    from jlora import data
    from jlora import train as training

    if args.adapter:
        run, pretrained, params, train_split, held_out = load_run(args.adapter)
    else:  # zero-shot: the model as it is, on the default task
        run = Run(model=args.model or DEFAULT_MODEL)
        pretrained = load_model(run)
        params = pretrained.params
        train_split, held_out = data.prepare(run.data, pretrained.tokenizer)
    task = training.task_for(pretrained, run.lora, train_split, held_out)
    result = training.evaluate(
        training.make_eval_step(task), params, held_out, run.train.eval_batch_size, not args.quiet
    )
    print(json.dumps(result))
    return 0


def cmd_generate(args) -> int:
    """Prompts continued by one loaded base, each with its own adapter (or none): every
    `--adapter` is stacked once and the batch is generated in one pass."""
    import jax
    import jax.numpy as jnp

    import jlora
    import jlora.models
    from jlora import multi

    paths = args.adapter or []
    run = _run_of(paths[0]) if paths and (pathlib.Path(paths[0]) / RUN_FILE).exists() else Run()
    run = dataclasses.replace(run, model=args.model or (run.model if paths else DEFAULT_MODEL))
    pretrained = load_model(run)
    tok = pretrained.tokenizer
    rows = _prompt_rows(args, paths, run)
    chat = args.chat if args.chat is not None else (not paths or run.data.task == "chat")
    texts = [
        tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
        if chat
        else t
        for _, t in rows
    ]
    encoded = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, encoded))
    ids = jnp.asarray([[tok.pad_token_id or 0] * (width - len(e)) + e for e in encoded])  # left-padded
    mask = jnp.asarray([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    params, adapter_ids = pretrained.params, None
    if paths:
        stacked = multi.stack([load_adapters(path, pretrained) for path in paths])
        base = quantized(run, pretrained, pretrained.params)  # the first run's
        params, adapter_ids = jlora.join(stacked, base), jnp.asarray([i for i, _ in rows], jnp.int32)
    tokens = jlora.models.generate(
        pretrained.model,
        params,
        ids,
        mask,
        max_new_tokens=args.max_new_tokens,
        key=jax.random.key(args.seed),
        temperature=args.temperature,
        top_p=args.top_p,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id or 0,
        adapter_ids=adapter_ids,
    )
    for (index, _), row in zip(rows, tokens, strict=True):
        text = tok.decode(row, skip_special_tokens=True)
        print(f"[{paths[index] if index >= 0 else 'base'}] {text}" if len(rows) > 1 else text)
    return 0


def _run_of(folder: str | pathlib.Path) -> Run:
    path = pathlib.Path(folder) / RUN_FILE
    settings = _read_json(path)
    if not isinstance(settings, dict) or set(settings) - {f.name for f in dataclasses.fields(Run)}:
        raise ValueError(f"{path} is not a jlora run file (a JSON object of model, scan, data, lora, train)")
    if isinstance(settings.get("data"), dict):
        settings["data"].setdefault("packing", False)  # a run recorded before packing existed did not pack
    return Run(**settings)


def _read_json(path: pathlib.Path):
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}); is it damaged?") from None


def _prompt_rows(args, paths: list[str], run: Run) -> list[tuple[int, str]]:
    """(adapter index or -1, prompt text) per row: `--prompts FILE` (JSONL with "prompt" or
    "input" and "adapter": one of the `--adapter` paths or "base"), or the one `--prompt` /
    `--input` with every adapter (or the base alone)."""
    if args.prompts is None:
        text = args.prompt if args.prompt is not None else _fill(run, args.input)
        return [(i, text) for i in range(len(paths))] or [(-1, text)]
    rows = []
    for number, line in enumerate(_read_text(pathlib.Path(args.prompts)).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{args.prompts}:{number}: not a JSON row ({err.msg} at column {err.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{args.prompts}:{number}: a row must be a JSON object, got {type(row).__name__}")
        adapter = row.get("adapter") or "base"
        if adapter != "base" and adapter not in paths:
            raise ValueError(f"{args.prompts}:{number}: adapter {adapter!r} is not one of --adapter {paths} or 'base'")
        if ("prompt" in row) == ("input" in row):
            raise ValueError(f"{args.prompts}:{number}: give exactly one of 'prompt' and 'input'")
        text = row["prompt"] if "prompt" in row else _fill(run, row["input"], f"{args.prompts}:{number}: ")
        rows.append((paths.index(adapter) if adapter != "base" else -1, text))
    if not rows:
        raise ValueError(f"{args.prompts} holds no prompts")
    return rows


def _fill(run: Run, text: str, where: str = "") -> str:
    """The run's prompt template with `text` as its text column (a chat run: the user's turn)."""
    from jlora.data import template_columns

    if run.data.task == "chat":
        return text
    others = sorted(template_columns(run.data.prompt) - {run.data.text_column})
    if others:
        raise ValueError(
            f"{where}--input fills the column {run.data.text_column!r}, but the run's prompt template "
            f"{run.data.prompt!r} also needs {others}: pass the whole prompt with --prompt instead"
        )
    return run.data.prompt.format(**{run.data.text_column: text})


def _read_text(path: pathlib.Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})") from None


def load_adapters(path: str, pretrained):
    """(params with adapters, LoraConfig) of a run folder or a PEFT directory, over
    `pretrained`'s base; a base-changing run's as its PEFT export holds them (plain LoRA of
    rank 2r for the original base), so they stack with others and start other runs."""
    import tempfile

    import jlora.peft
    from jlora.models import hf_module_name

    folder = pathlib.Path(path)
    if (folder / RUN_FILE).exists():
        run = _run_of(path)
        initial = read_initial(folder, run)
        params = restore_adapters(folder, run, quantized(run, pretrained, fresh_params(run, pretrained, initial)))
        if initial is None:
            return params, run.lora
        with tempfile.TemporaryDirectory() as tmp:
            converted = export_peft(run, pretrained, params, pathlib.Path(tmp) / "peft", initial)
            return jlora.peft.load(converted, pretrained.params, hf_module_name)
    if (folder / "adapter_config.json").exists():
        return jlora.peft.load(folder, pretrained.params, hf_module_name)
    raise FileNotFoundError(f"{folder} is neither a jlora run folder ({RUN_FILE}) nor a PEFT directory")


def cmd_merge(args) -> int:
    import jlora
    from jlora.models.export import save_hf

    check_new_folder(args.out)
    run, pretrained, params, _, _ = load_run(args.adapter)
    out = save_hf(pretrained, jlora.merge(params, run.lora), args.out)
    print(f"wrote {out}/ (config.json, model.safetensors, tokenizer): load it with transformers' from_pretrained")
    return 0


def cmd_export_peft(args) -> int:
    check_new_folder(args.out)
    run, pretrained, params, _, _ = load_run(args.run)
    out = export_peft(run, pretrained, params, pathlib.Path(args.out), read_initial(pathlib.Path(args.run), run))
    print(f"wrote {out}/ (adapter_config.json, adapter_model.safetensors)")
    return 0


def cmd_import_peft(args) -> int:
    """A PEFT directory -> a run folder (run.json + a step-0 checkpoint) that eval,
    generate, merge and export-peft take. Written to a hidden folder and renamed."""
    import jlora
    import jlora.peft
    from jlora.checkpoint import Checkpoints, fingerprint
    from jlora.models import hf_module_name
    from jlora.staging import staged

    source = pathlib.Path(args.dir)
    out = pathlib.Path(args.out) if args.out else pathlib.Path("runs") / source.absolute().name
    check_new_folder(out)
    peft_config, _ = jlora.peft.read(source)
    settings = run_from_args(args).to_dict()
    if args.model is None:
        settings["model"] = adapter_base_model(args.dir)
    if peft_config.get("task_type") == "SEQ_CLS" and (args.task or "classification") == "classification":
        settings["data"]["task"] = "classification"
    run = Run(**settings)
    pretrained = load_model(run, _labels(run))
    params, lora = jlora.peft.load(source, pretrained.params, hf_module_name)
    run = dataclasses.replace(run, lora=lora)
    adapters, base = jlora.split(params, run.lora)
    with staged(out) as staging:
        (staging / RUN_FILE).write_text(json.dumps(run.to_dict(), indent=2))
        with Checkpoints(staging / CHECKPOINTS, async_save=False) as checkpoints:
            checkpoints.save(0, adapters, None, config=run.lora, base_fingerprint=fingerprint(base))
    summary = jlora.summary(params, run.lora)
    print(f"wrote {out}/ ({RUN_FILE}, {CHECKPOINTS}/): {summary.trainable:,} adapter parameters on {run.model}")
    return 0


def _labels(run: Run, table=None) -> int | None:
    """The classifier's label count, from the run's data (`table`, or read)."""
    if run.data.task != "classification":
        return None
    from jlora import data

    table = data.read(run.data) if table is None else table
    return len(set(table[run.data.label_column]))


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "generate": cmd_generate,
    "merge": cmd_merge,
    "export-peft": cmd_export_peft,
    "import-peft": cmd_import_peft,
}


def main(argv: list[str] | None = None) -> int:
    """Exit 0 on success, 2 on bad input (a message that names the problem, as argparse
    does for bad flags), 1 on an internal error (a one-line hint; `--debug` or JLORA_DEBUG=1
    shows the traceback), 130 when interrupted."""
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("JLORA_DEBUG", "") not in ("", "0")
    try:
        return COMMANDS[args.command](args)
    except BAD_INPUT as err:
        if debug:
            raise
        print(f"jlora {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jlora {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        print(
            f"jlora {args.command}: internal error: {type(err).__name__}: {err}\n"
            "this is a bug in jlora: please report it with the traceback that --debug (or JLORA_DEBUG=1) shows",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
