"""A fine-tuning run, end to end: what `jlora train` does, callable from Python.

`finetune(Run(...), out)` validates everything first (settings, the out folder, data, model,
targets, batch, mesh; nothing is written before), then evaluates the held-out split, trains
with checkpoints (resuming a killed run of the same settings where it stopped), evaluates
again, exports the adapters in the PEFT format and returns the results with the trained
adapters. `Run` holds the settings (`run.json` in the run folder); `load_run` and
`load_adapters` read a finished run back. The `jlora` command is argument parsing over this.
"""

from __future__ import annotations

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
        self.train = _section(TrainConfig, self.train)
        defaults = {"r": 8, "alpha": 16, "target_modules": default_targets(self.train)}
        self.lora = _section(LoraConfig, self.lora, defaults)
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


def default_targets(train) -> str | list[str]:
    """The modules a run adapts unless told: q, k, v, o; over an nf4 or int8 base every linear
    layer but the head, as QLoRA does (Dettmers et al. 2023, section 4: adapters on all of
    them are what recovers 16-bit quality) and peft / TRL QLoRA recipes (``"all-linear"``)."""
    return "all-linear" if train.quantize in ("nf4", "int8") else ["q_proj", "k_proj", "v_proj", "o_proj"]


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
    pretrained = load_model(run, label_count(run, table))  # unknown presets, files that are not models
    if run.data.task == "classification":  # a new head trains whole: DistilBERT's pre_classifier too
        heads = [m for m in pretrained.config.family.head_modules if m not in run.lora.modules_to_save]
        run = dataclasses.replace(
            run, lora=dataclasses.replace(run.lora, modules_to_save=[*run.lora.modules_to_save, *heads])
        )
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
    """`params` with the frozen kernels (and, with `train.quantize_embeddings`, the embedding
    tables) quantized as the run says (`train.quantize`, QLoRA: `jlora.quantize.quantize_model`),
    adapters and trainable modules untouched."""
    if run.train.quantize is None:
        return params
    from jlora.quantize import quantize_model

    return quantize_model(
        params, run.train.quantize, pretrained.kernel_specs(), run.lora, embeddings=run.train.quantize_embeddings
    )


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
        return run_of(folder).model
    if not (folder / "adapter_config.json").exists():
        raise FileNotFoundError(f"{folder} is neither a jlora run folder ({RUN_FILE}) nor a PEFT directory")
    named = jlora.peft.read(folder)[0].get("base_model_name_or_path")
    presets = {preset.hub_id: name for name, preset in PRESETS.items()}
    if named in presets or (named and pathlib.Path(named).exists()):
        return presets.get(named, named)
    raise ValueError(f"{folder}: base model {named!r} is neither a preset's nor a local folder; pass --model")


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
) -> tuple[dict | None, Any, Any]:
    """Evaluate, train, evaluate, export: the run folder `out`, continued where a killed
    run of the same settings left it; every metrics record also to `report` (`reporter`).
    Returns ``(results, adapters, base)``; results None on processes other than the first."""
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
    task = training.task_for(pretrained, run.lora, train_split, held_out, run.train.ce_chunk)
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
        return None, adapters, base
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
    return result, adapters, base


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
    run = run_of(folder)
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


def run_of(folder: str | pathlib.Path) -> Run:
    path = pathlib.Path(folder) / RUN_FILE
    settings = _read_json(path)
    if not isinstance(settings, dict) or set(settings) - {f.name for f in dataclasses.fields(Run)}:
        raise ValueError(f"{path} is not a jlora run file (a JSON object of model, scan, data, lora, train)")
    if isinstance(settings.get("data"), dict):
        settings["data"].setdefault("packing", False)  # a run recorded before packing existed did not pack
    return Run(**settings)


def _read_json(path: pathlib.Path):
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}); is it damaged?") from None


def read_text(path: pathlib.Path) -> str:
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
        run = run_of(path)
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


def label_count(run: Run, table=None) -> int | None:
    """The classifier's label count, from the run's data (`table`, or read)."""
    if run.data.task != "classification":
        return None
    from jlora import data

    table = data.read(run.data) if table is None else table
    return len(set(table[run.data.label_column]))


def compilation_cache() -> pathlib.Path | None:
    """Turn on XLA's persistent compilation cache (unless the user set one, or
    ``JLORA_CACHE_DIR=off``) in ``xla/`` of jlora's cache folder (`jlora.models.cache.root`:
    ``$JLORA_CACHE_DIR``, else ``$XDG_CACHE_HOME/jlora`` or ``~/.cache/jlora``). A later run of
    the same shapes (a resume, eval, generate, the same run again) loads its compiled steps
    instead of compiling them. Returns the folder."""
    import jax

    from jlora.models import cache

    if jax.config.jax_compilation_cache_dir:  # JAX_COMPILATION_CACHE_DIR, or set in code
        return pathlib.Path(jax.config.jax_compilation_cache_dir)
    root = cache.root()
    if root is None:
        return None
    jax.config.update("jax_compilation_cache_dir", str(root / "xla"))
    return root / "xla"


@dataclasses.dataclass
class Result:
    """What `finetune` made: the run folder, the settings as run (data task, packing and steps
    made concrete), `results.json`'s numbers, and the trained adapters with the frozen base
    (`jlora.join(adapters, base)` is the adapted tree of `pretrained.model`)."""

    out: pathlib.Path
    run: Run
    results: dict | None
    adapters: Any
    base: Any
    pretrained: Any


def finetune(
    run: Run | dict | None = None,
    out: str | pathlib.Path = DEFAULT_OUT,
    *,
    init_adapter: str | None = None,
    overwrite: bool = False,
    resume: bool = False,
    mesh=None,
    progress: bool = True,
) -> Result:
    """Run `jlora train`: `run` (a `Run`, or its dict as in run.json / the YAML config;
    default: the built-in SmolLM2 sentiment run) in the folder `out`.

    Everything is validated before anything is written. A folder holding another run or
    other files is refused; ``overwrite`` replaces a jlora run folder only, and only once
    this run is complete. ``resume`` continues the run in `out` from its last checkpoint
    (its settings come from its run.json; `run` must be None). ``init_adapter`` (a PEFT
    directory or a run folder) starts from those adapters and their LoRA settings, which
    ``run["lora"]`` may not contradict. `mesh` (`jlora.sharding.make_mesh`) shards the run.
    """
    import jax

    import jlora

    started = time.perf_counter()
    compilation_cache()
    out = pathlib.Path(out)
    given = _settings(run)
    if resume:
        if run is not None or init_adapter is not None:
            raise ValueError(f"resume takes every setting from {out / RUN_FILE}; pass no run or init_adapter")
        if not (out / RUN_FILE).exists():
            raise FileNotFoundError(f"resume {out}: no {RUN_FILE} there; start the run without resuming")
        run = run_of(out)
        if (out / "results.json").exists():
            print(f"{out} is complete (results.json); nothing to resume")
            _, pretrained, params, _, _ = load_run(str(out))
            adapters, base = jlora.split(params, run.lora)
            return Result(out, run, _read_json(out / "results.json"), adapters, base, pretrained)
        replace = False
        source = run.init_adapter["path"] if run.init_adapter and not _has_checkpoint(out) else None
        given = {}
    else:
        source = init_adapter
        if source and "model" not in given:
            given["model"] = adapter_base_model(source)
        run = Run(**given)
        replace = check_out(out, run, overwrite)
    if source:
        run, *prepared = prepare_from_adapter(run, source, given.get("lora", {}), mesh)
    else:
        initial = read_initial(out, run, required=_has_checkpoint(out)) if resume else None
        run, *prepared = prepare(run, mesh, initial)
    with replacing(out, replace, writer=jax.process_index() == 0), reporter(run, out) as report:
        results, adapters, base = train_run(
            run, out, *prepared, mesh=mesh, progress=progress, started=started, report=report
        )
    return Result(out, run, results, adapters, base, prepared[0])


def _settings(run: Run | dict | None) -> dict:
    """The settings the caller gave: a dict as it is; a `Run`'s, with only the LoRA fields
    that differ from the default run's (the others an ``init_adapter`` sets)."""
    if not isinstance(run, Run):
        return dict(run or {})
    settings, default = run.to_dict(), Run().lora.to_dict()
    settings["lora"] = {k: v for k, v in settings["lora"].items() if v != default.get(k)}
    return settings
