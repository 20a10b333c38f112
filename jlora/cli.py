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
import dataclasses
import json
import os
import pathlib
import sys
from typing import Any

from jlora.finetune import (
    CHECKPOINTS,
    DEFAULT_MODEL,
    DEFAULT_OUT,
    INITIAL_ADAPTERS,
    RUN_FILE,
    Run,
    adapter_base_model,
    compilation_cache,
    export_peft,
    finetune,
    label_count,
    load_adapters,
    load_model,
    load_run,
    quantized,
    read_initial,
    read_text,
    run_of,
)

# exceptions that mean bad input (exit 2, a message); any other is a bug in jlora (exit 1)
BAD_INPUT = (ValueError, OSError)


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
    "--targets": (
        "lora",
        "target_modules",
        "list",
        "modules to adapt, or all-linear (every linear layer but the head); default q_proj k_proj v_proj o_proj, "
        "and all-linear with --quantize nf4 or int8 (the QLoRA recipe)",
    ),
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
    "--quantize-embeddings": (
        "train",
        "quantize_embeddings",
        "flag",
        "with --quantize: the frozen embedding tables too (a tied head included; bitsandbytes keeps them 16-bit)",
    ),
    "--ce-chunk": (
        "train",
        "ce_chunk",
        int,
        "causal LM training: the cross-entropy over this many positions at a time, so the whole logits never exist "
        "(default 1024; 0: the whole loss at once)",
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
        settings = yaml.safe_load(read_text(path)) or {}
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


def check_new_folder(out: str | pathlib.Path) -> pathlib.Path:
    """A folder an export will create: it must not exist yet (refused before any loading)."""
    out = pathlib.Path(out)
    if out.exists() or out.is_symlink():
        raise FileExistsError(f"{out} exists; choose a new folder")
    if out.parent.exists() and not out.parent.is_dir():
        raise FileExistsError(f"{out.parent} is a file, so {out} cannot be made there")
    return out


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


def check_resume(args) -> None:
    """Refuse settings flags beside `--resume RUN`: its own run.json holds them."""
    out = pathlib.Path(args.resume)
    if not (out / RUN_FILE).exists():
        raise FileNotFoundError(f"--resume {out}: no {RUN_FILE} there; start the run without --resume")
    given = [flag for flag in TRAIN_FLAGS if _flag(args, flag) is not None]
    given += ["--config"] * bool(args.config) + ["--scan"] * (args.scan is not None)
    if given:
        raise ValueError(f"--resume takes every setting from {out / RUN_FILE}; drop {', '.join(given)}")


def cmd_train(args) -> int:
    """`jlora.finetune.finetune` with the flags' settings (`--resume`: the run's own)."""
    mesh = start_devices(args)
    if args.resume:
        check_resume(args)  # settings flags would contradict the run's
        finetune(out=args.resume, resume=True, mesh=mesh, progress=not args.quiet)
    else:
        settings = settings_from_args(args)
        finetune(
            settings,
            args.out,
            init_adapter=args.init_adapter,
            overwrite=args.overwrite,
            mesh=mesh,
            progress=not args.quiet,
        )
    return 0


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
    task = training.task_for(pretrained, run.lora, train_split, held_out, run.train.ce_chunk)
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
    run = run_of(paths[0]) if paths and (pathlib.Path(paths[0]) / RUN_FILE).exists() else Run()
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


def _prompt_rows(args, paths: list[str], run: Run) -> list[tuple[int, str]]:
    """(adapter index or -1, prompt text) per row: `--prompts FILE` (JSONL with "prompt" or
    "input" and "adapter": one of the `--adapter` paths or "base"), or the one `--prompt` /
    `--input` with every adapter (or the base alone)."""
    if args.prompts is None:
        text = args.prompt if args.prompt is not None else _fill(run, args.input)
        return [(i, text) for i in range(len(paths))] or [(-1, text)]
    rows = []
    for number, line in enumerate(read_text(pathlib.Path(args.prompts)).splitlines(), 1):
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
    pretrained = load_model(run, label_count(run))
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
    compilation_cache()
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
