"""The ``jlora`` command: train, eval, generate, merge.

jlora train                        # SmolLM2-135M-Instruct on Rotten Tomatoes sentiment
jlora train --config run.yaml --steps 300 --out runs/mine
jlora eval --adapter runs/default
jlora generate --adapter runs/default --input "A gorgeous, witty, seductive movie."
jlora merge --adapter runs/default --out merged-model
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import shutil
import sys
import time
from typing import Any

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_OUT = "runs/default"
RUN_FILE = "run.json"


@dataclasses.dataclass
class Run:
    """Everything a run was made from; `run.json` in the run folder holds it."""

    model: str = DEFAULT_MODEL
    scan: bool = True
    data: Any = None  # DataConfig
    lora: Any = None  # LoraConfig
    train: Any = None  # TrainConfig

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
    "--task": ("data", "task", str, "completion (prompt -> completion), text (language modelling) or classification"),
    "--prompt": ("data", "prompt", str, "prompt template over columns (default 'Review: {text}\\nSentiment:')"),
    "--completion": ("data", "completion", str, "completion template over columns (default ' {label}')"),
    "--text-column": ("data", "text_column", str, "text column for the text and classification tasks"),
    "--label-column": ("data", "label_column", str, "label column for the classification task"),
    "--seq-len": ("data", "seq_len", int, "tokens per sequence (default 64)"),
    "--eval-size": ("data", "eval_size", int, "held-out rows (default 1000)"),
    "--targets": ("lora", "target_modules", "list", "modules to adapt, e.g. q_proj k_proj v_proj o_proj"),
    "--rank": ("lora", "r", int, "LoRA rank (default 8)"),
    "--alpha": ("lora", "alpha", float, "LoRA alpha (default 16)"),
    "--dropout": ("lora", "dropout", float, "dropout on the LoRA input (default 0)"),
    "--layers": ("lora", "layers", "ints", "only these layer indices get adapters"),
    "--steps": ("train", "steps", int, "optimizer steps (default 100)"),
    "--batch-size": ("train", "batch_size", int, "sequences per micro-batch (default 8)"),
    "--grad-accum": ("train", "grad_accum", int, "micro-batches per step (default 1)"),
    "--lr": ("train", "learning_rate", float, "peak learning rate (default 1e-3), warmup then cosine"),
    "--warmup": ("train", "warmup_steps", int, "warmup steps (default 10)"),
    "--weight-decay": ("train", "weight_decay", float, "AdamW weight decay (default 0)"),
    "--dtype": ("train", "dtype", str, "compute dtype: float32 or bfloat16 (parameters stay float32)"),
    "--seed": ("train", "seed", int, "seed for adapters, shuffling and dropout"),
}


def _add_flags(parser: argparse.ArgumentParser) -> None:
    for flag, (_, _, kind, text) in TRAIN_FLAGS.items():
        if kind == "list":
            parser.add_argument(flag, nargs="+", help=text)
        elif kind == "ints":
            parser.add_argument(flag, nargs="+", type=int, help=text)
        else:
            parser.add_argument(flag, type=kind, help=text)
    parser.add_argument(
        "--scan",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="scan the layer stack (default on: faster compiles)",
    )


def run_from_args(args: argparse.Namespace) -> Run:
    """The run: `--config` file (YAML or JSON) first, flags over it."""
    settings: dict[str, Any] = {}
    if getattr(args, "config", None):
        settings = _read_config(pathlib.Path(args.config))
    for flag, (section, field, _, _) in TRAIN_FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is not None:
            (settings.setdefault(section, {}) if section else settings)[field] = value
    if args.scan is not None:
        settings["scan"] = args.scan
    unknown = sorted(set(settings) - {"model", "scan", "data", "lora", "train"})
    if unknown:
        raise ValueError(f"unknown config sections {unknown}; known: model, scan, data, lora, train")
    return Run(**settings)


def _read_config(path: pathlib.Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"config file {path} not found")
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jlora",
        description="LoRA fine-tuning of Flax models in JAX. `jlora train` with no arguments fine-tunes "
        "SmolLM2-135M-Instruct on Rotten Tomatoes sentiment in a few minutes on a CPU.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,generate,merge,export-peft}")
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
    train.add_argument("--quiet", action="store_true", help="no progress bars")

    evaluate = sub.add_parser("eval", help="held-out loss and accuracy of a run (or of a model zero-shot)")
    evaluate.add_argument("--adapter", help="run folder whose adapters to evaluate")
    evaluate.add_argument("--model", help="evaluate this model without adapters (zero-shot)")
    evaluate.add_argument("--quiet", action="store_true")

    generate = sub.add_parser("generate", help="generate text, with a run's adapters applied")
    generate.add_argument("--adapter", help="run folder whose adapters to apply")
    generate.add_argument("--model", help="model without adapters (default: the run's, or the default preset)")
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt, as is (or chat-templated with --chat)")
    source.add_argument("--input", help="text filled into the run's prompt template, e.g. a review")
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

    merge = sub.add_parser("merge", help="write base + adapters as one Hugging Face model directory")
    merge.add_argument("--adapter", required=True, help="run folder")
    merge.add_argument("--out", required=True, help="new folder for the merged model (safetensors)")
    return parser


# -- commands -------------------------------------------------------------------------------------


def check_out(out: pathlib.Path, run: Run, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder."""
    if not out.exists() or not any(out.iterdir()):
        return
    if overwrite:
        shutil.rmtree(out)
        return
    previous = out / RUN_FILE
    if previous.exists():
        old, new = json.loads(previous.read_text()), json.loads(json.dumps(run.to_dict()))
        differs = sorted(k for k in new if old.get(k) != new[k])
        what = f"a different run (differing: {', '.join(differs)})" if differs else "this run already"
    else:
        what = "files that are not a jlora run"
    raise FileExistsError(f"{out} holds {what}; pass --overwrite to replace it or choose another --out")


def load_model(run: Run, labels: int | None = None):
    import jax.numpy as jnp

    import jlora.models

    kwargs = {"scan": run.scan, "dtype": jnp.dtype(run.train.dtype)}
    if run.data.task == "classification":
        kwargs |= {"head": "classifier", "num_labels": labels}
    return jlora.models.load(run.model, **kwargs)


def prepare(run: Run):
    """Everything up to training, validating as early as possible: data, model, adapters."""
    import jax

    import jlora
    from jlora import data

    table = data.read(run.data)  # missing files, empty data
    data.check_columns(table, run.data)  # absent columns
    labels = len(set(table[run.data.label_column])) if run.data.task == "classification" else None
    pretrained = load_model(run, labels)  # unknown presets
    train, held_out = data.prepare(run.data, pretrained.tokenizer)  # seq_len too small
    params = jlora.init(pretrained.params, run.lora, jax.random.key(run.train.seed), specs=pretrained.kernel_specs())
    return pretrained, params, train, held_out


def cmd_train(args) -> int:
    import jlora
    from jlora import train as training

    started = time.perf_counter()
    run = run_from_args(args)
    out = pathlib.Path(args.out)
    check_out(out, run, args.overwrite)
    pretrained, params, train_split, held_out = prepare(run)
    summary = jlora.summary(params, run.lora)
    print(f"model {run.model}: {summary.total:,} parameters, {summary.trainable:,} trainable ({summary.percent:.2f}%)")
    print(f"data: {len(train_split):,} training rows, {len(held_out):,} held out; seq_len {run.data.seq_len}")
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_FILE).write_text(json.dumps(run.to_dict(), indent=2))
    metrics_file = out / "metrics.jsonl"
    adapters, base = jlora.split(params, run.lora)
    task = training.task_for(pretrained, run.lora, train_split)
    eval_step = training.make_eval_step(task)
    evals = {"before": training.evaluate(eval_step, params, held_out, run.train.eval_batch_size, not args.quiet)}
    _report("before", evals["before"], metrics_file)
    adapters, history = training.fit(task, adapters, base, train_split, run.train, metrics_file, not args.quiet)
    params = jlora.join(adapters, base)
    evals["after"] = training.evaluate(eval_step, params, held_out, run.train.eval_batch_size, not args.quiet)
    _report("after", evals["after"], metrics_file)
    save_adapters(out / "adapters", adapters)
    export_peft(run, pretrained, params, out / "peft")
    training.plot_loss(history, evals, out / "loss.png")
    result = {
        "accuracy_before": evals["before"].get("accuracy"),
        "accuracy_after": evals["after"].get("accuracy"),
        "loss_before": evals["before"]["loss"],
        "loss_after": evals["after"]["loss"],
        "train_seconds": history[-1]["elapsed_s"],
        "median_tokens_per_s": float(sorted(h["tokens_per_s"] for h in history)[len(history) // 2]),
        "wall_seconds": time.perf_counter() - started,
        "steps": len(history),
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(
        f"wrote {out}/ (run.json, metrics.jsonl, loss.png, adapters/, results.json) in {result['wall_seconds']:.0f} s"
    )
    return 0


def _report(name: str, result: dict, metrics_file: pathlib.Path) -> None:
    text = f"held-out {name}: loss {result['loss']:.4f}"
    if "accuracy" in result:
        text += f", accuracy {result['accuracy']:.2%}"
    print(text)
    with metrics_file.open("a") as f:
        f.write(json.dumps({"eval": name, **result}) + "\n")


def export_peft(run: Run, pretrained, params, out: pathlib.Path) -> pathlib.Path:
    """The run's adapters as a Hugging Face PEFT directory (peft, vLLM and TGI load it)."""
    import jlora.peft
    from jlora.models import PRESETS, hf_module_name

    preset = PRESETS.get(run.model)
    return jlora.peft.export(
        params,
        run.lora,
        out,
        hf_module_name,
        task_type="SEQ_CLS" if run.data.task == "classification" else "CAUSAL_LM",
        base_model_name_or_path=preset.hub_id if preset else run.model,
    )


def save_adapters(path: pathlib.Path, adapters) -> None:
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path.absolute(), adapters)
    checkpointer.wait_until_finished()


def load_run(folder: str):
    """(run, pretrained, params with the run's adapters, train and held-out data) of a run folder."""
    import orbax.checkpoint as ocp

    import jlora

    path = pathlib.Path(folder)
    if not (path / RUN_FILE).exists():
        raise FileNotFoundError(f"{path} is not a jlora run folder (no {RUN_FILE})")
    if not (path / "adapters").exists():
        raise FileNotFoundError(f"{path} has no adapters/ (did the run finish?)")
    run = Run(**json.loads((path / RUN_FILE).read_text()))
    pretrained, params, train, held_out = prepare(run)
    template, base = jlora.split(params, run.lora)
    adapters = ocp.StandardCheckpointer().restore((path / "adapters").absolute(), template)
    return run, pretrained, jlora.join(adapters, base), train, held_out


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
    task = training.task_for(pretrained, run.lora, train_split)
    result = training.evaluate(
        training.make_eval_step(task), params, held_out, run.train.eval_batch_size, not args.quiet
    )
    print(json.dumps(result))
    return 0


def cmd_generate(args) -> int:
    import jax
    import jax.numpy as jnp

    import jlora.models

    if args.adapter:
        run, pretrained, params, _, _ = load_run(args.adapter)
        lora = run.lora
    else:
        run = Run(model=args.model or DEFAULT_MODEL)
        pretrained, lora = load_model(run), None
        params = pretrained.params
    tok = pretrained.tokenizer
    text = args.prompt if args.prompt is not None else run.data.prompt.format(**{run.data.text_column: args.input})
    chat = args.chat if args.chat is not None else args.adapter is None
    if chat:
        text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    ids = jnp.asarray([tok(text, add_special_tokens=False)["input_ids"]])
    tokens = jlora.models.generate(
        pretrained.model,
        params,
        ids,
        max_new_tokens=args.max_new_tokens,
        key=jax.random.key(args.seed),
        temperature=args.temperature,
        top_p=args.top_p,
        eos_token_id=tok.eos_token_id,
        lora=lora,
    )
    print(tok.decode(tokens[0], skip_special_tokens=True))
    return 0


def cmd_merge(args) -> int:
    import jlora
    from jlora.models.export import save_hf

    run, pretrained, params, _, _ = load_run(args.adapter)
    out = save_hf(pretrained, jlora.merge(params, run.lora), args.out)
    print(f"wrote {out}/ (config.json, model.safetensors, tokenizer): load it with transformers' from_pretrained")
    return 0


def cmd_export_peft(args) -> int:
    run, pretrained, params, _, _ = load_run(args.run)
    out = export_peft(run, pretrained, params, pathlib.Path(args.out))
    print(f"wrote {out}/ (adapter_config.json, adapter_model.safetensors)")
    return 0


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "generate": cmd_generate,
    "merge": cmd_merge,
    "export-peft": cmd_export_peft,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"jlora {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
