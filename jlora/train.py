"""Training: a jitted, pure step that differentiates the adapters only, an eval step, and
a loop with a progress bar, JSONL metrics and a loss-curve plot.

The step takes ``(adapters, opt_state, base, batch, step)``: the frozen base is an
argument that is never differentiated, `adapters` and `opt_state` are donated, and the
batch always has the same shape (``(grad_accum, batch_size, seq_len)``), so the step
compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import math
import os
import pathlib
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jlora
from jlora import quantize, sharding
from jlora.checkpoint import Checkpoints, fingerprint
from jlora.data import Batches, Split, eval_batches
from jlora.optim import decay_mask
from jlora.quantize import FORMATS, dequantize_tree

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings."""

    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    dtype: str = "float32"
    remat: bool = False  # recompute each layer in the backward pass: activation memory of one layer
    eval_batch_size: int = 32
    seed: int = 0
    checkpoint_every: int = 50  # steps between adapter checkpoints; the last step is always saved
    keep_checkpoints: int = 2
    schedule: str = "cosine"  # after the warmup: "cosine" or "linear" decay to zero, or "constant"
    eval_every: int | None = None  # steps between held-out evaluations during training
    keep_best: bool = False  # keep the adapters of the best held-out loss (of `eval_every` and the end) and use them
    early_stopping_patience: int | None = None  # stop after this many evaluations without a lower held-out loss
    epochs: float | None = None  # passes over the data; sets `steps` once the data is known (`with_epochs`)
    quantize: str | None = None  # frozen kernels stored in "nf4", "int8" or "bf16" (QLoRA, `jlora.quantize`)
    quantize_embeddings: bool = False  # the frozen embedding tables too (`quantize_model(embeddings=True)`)
    loraplus_ratio: float | None = None  # LoRA+: B trained at this many times the learning rate (`jlora.loraplus`)
    report_to: str | None = None  # "tensorboard": every metrics record also as TensorBoard scalars (`TensorBoard`)
    ce_chunk: int | None = 1024  # causal LM training: cross-entropy this many positions at a time (0 / None: whole)

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "eval_batch_size", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.ce_chunk is not None and self.ce_chunk < 0:
            raise ValueError(f"ce_chunk must be >= 1, or 0 / unset for the whole loss at once, got {self.ce_chunk}")
        if self.eval_every is not None and self.eval_every < 1:
            raise ValueError(f"eval_every must be at least 1, got {self.eval_every}")
        if (self.keep_best or self.early_stopping_patience is not None) and self.eval_every is None:
            raise ValueError("keep_best and early_stopping_patience compare held-out losses: set eval_every too")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ValueError(f"early_stopping_patience must be at least 1, got {self.early_stopping_patience}")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.quantize is not None and self.quantize not in FORMATS:
            raise ValueError(f"quantize must be one of {', '.join(FORMATS)} (or unset), got {self.quantize!r}")
        if self.quantize_embeddings and self.quantize is None:
            raise ValueError("quantize_embeddings stores the embedding tables as `quantize` says: set quantize too")
        if self.loraplus_ratio is not None and not self.loraplus_ratio > 0:
            raise ValueError(f"loraplus_ratio must be > 0 (or unset), got {self.loraplus_ratio}")
        if self.report_to not in (None, "tensorboard"):
            raise ValueError(f"report_to must be 'tensorboard' (or unset), got {self.report_to!r}")
        if self.report_to and importlib.util.find_spec("tensorboardX") is None:
            raise ValueError("report_to 'tensorboard' writes with tensorboardX: pip install 'jlora[tensorboard]'")


SCHEDULES = ("cosine", "linear", "constant")


def with_epochs(config: TrainConfig, rows: int) -> TrainConfig:
    """`config` with `steps` set from `epochs` over `rows` training rows (a partial last
    batch counts as a step); unchanged without `epochs`."""
    if config.epochs is None:
        return config
    per_step = config.batch_size * config.grad_accum
    return dataclasses.replace(config, steps=max(1, math.ceil(config.epochs * rows / per_step)))


def schedule(config: TrainConfig) -> optax.Schedule:
    """Linear warmup to the learning rate, then `config.schedule` (optax's cosine or linear
    decay to zero, or constant), counted from step 1: the first step trains at lr / warmup
    (not 0), and a decay ends above 0 at the last step."""
    lr, warmup, total = config.learning_rate, min(config.warmup_steps, config.steps), config.steps + 1
    after = {
        "cosine": optax.cosine_decay_schedule(lr, total - warmup),
        "linear": optax.linear_schedule(lr, 0.0, total - warmup),
        "constant": optax.constant_schedule(lr),
    }[config.schedule]
    counted_from_one = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])
    return lambda step: counted_from_one(step + 1)


def make_optimizer(config: TrainConfig, lora: jlora.LoraConfig) -> optax.GradientTransformation:
    """AdamW with global-norm clipping and the schedule, on the trainable leaves only. With
    `loraplus_ratio`, LoRA+ (`jlora.loraplus`: B at ratio × the learning rate) with weight decay
    spared where peft's `create_loraplus_optimizer` spares it (`decay_mask`), so it equals peft's."""
    loraplus = config.loraplus_ratio is not None
    mask = decay_mask if loraplus and config.weight_decay else None
    adamw = optax.adamw(schedule(config), weight_decay=config.weight_decay, mask=mask)
    tx = optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)
    return jlora.optimizer(jlora.loraplus(tx, config.loraplus_ratio) if loraplus else tx, lora)


# -- losses --------------------------------------------------------------------------------------


def positions_of(mask: jax.Array) -> jax.Array:
    """Token positions that ignore padding (left padding shifts nothing)."""
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


def lm_head_of(model: nn.Module, params, lora: jlora.LoraConfig) -> tuple[Callable, Any] | None:
    """``(head, head_params)``: `model`'s vocabulary projection as ``head(head_params, hidden)
    -> float32 logits`` (the tied embedding or `lm_head`, with its adapters applied through
    `jlora.interpret` and the final soft-cap), for `chunked_cross_entropy`. None where the
    head's adapters need the interceptor (DoRA, LoRA dropout on the head)."""
    from jlora import interpret
    from jlora.models.layers import f32_dot, tanh_cap

    config, dtype = model.config, model.dtype
    if config.tie_word_embeddings:
        head_params, name = {"embed_tokens": params["model"]["embed_tokens"]}, ("embed_tokens", "embedding")
    else:
        head_params, name = {"lm_head": params["lm_head"]}, ("lm_head", "kernel")
    adapted = any(jlora.tree.is_adapter(keys[-1]) for keys in jlora.tree.flatten(head_params))
    if adapted and (lora.use_dora or lora.dropout):
        return None
    if adapted:  # `interpret` reads the weight beside its adapters as an array
        head_params = dequantize_tree(head_params)

    def head(p, hidden):
        w = quantize.weight(p[name[0]][name[1]], dtype)  # a quantized one dequantized, per chunk
        contract = 1 if config.tie_word_embeddings else 0  # (vocab, embed) or (embed, vocab)
        dims = (((hidden.ndim - 1,), (contract,)), ((), ()))
        # bf16: the logits' gradient meets the head in bf16, as in the model (`f32_dot`); `interpret`
        # reads an adapted head's contraction from a plain dot_general
        dot = functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32) if adapted else f32_dot
        return tanh_cap(dot(hidden, w, dims), config.final_logit_softcapping)

    return (interpret.lora(head, lora) if adapted else head), head_params


def chunked_cross_entropy(head: Callable, head_params, hidden, targets, weights, chunk: int) -> jax.Array:
    """``Σ weights · CE(head(head_params, hidden), targets)`` over ``(batch, positions)``, about
    `chunk` positions at a time (whole rows' spans of the sequence, so a batch sharded over
    devices stays so), each chunk's logits recomputed in the backward pass (`jax.checkpoint`
    in a `lax.scan`): the (positions × vocabulary) logits and their gradient never exist
    whole, only one chunk's. Equal to the whole loss up to the order of the sums."""
    rows, length = targets.shape
    per_row = max(1, min(length, chunk // rows))
    chunks = max(1, -(-length // per_row))
    size = -(-length // chunks)  # the least padding for that many chunks
    pad = [(0, 0), (0, chunks * size - length)]
    h = jnp.pad(hidden, [*pad, (0, 0)])
    t, w = jnp.pad(targets, pad), jnp.pad(weights, pad)

    @jax.checkpoint
    def one(p, h, t, w):
        return (optax.softmax_cross_entropy_with_integer_labels(head(p, h), t) * w).sum()

    def body(total, xs):
        return total + one(head_params, *xs), None

    split = lambda x: jnp.moveaxis(x.reshape(rows, chunks, size, *x.shape[2:]), 1, 0)  # (chunks, rows, size, …)
    return jax.lax.scan(body, jnp.zeros((), jnp.float32), (split(h), split(t), split(w)))[0]


def causal_lm_outputs(
    model: nn.Module, params, lora, batch: Batch, tail: int, rngs=None, deterministic=True, ce_chunk: int | None = None
):
    """(per-token loss sums, token count, logits of the last `tail` positions). A packed
    batch (`segment_ids` and `positions`, `jlora.data.pack`) is scored at every position,
    each example alone: attention and predictions stay within it. With `ce_chunk` (and a
    head `lm_head_of` can take apart), the loss is `chunked_cross_entropy` and the logits
    None."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    packed = {"segment_ids": batch["segment_ids"]} if "segment_ids" in batch else {}
    tail = ids.shape[1] if packed else min(tail, ids.shape[1])  # eval batches may be cropped shorter
    positions = batch["positions"] if packed else positions_of(mask)
    head = lm_head_of(model, params, lora) if ce_chunk else None
    if head is not None and "lm_head" in params:  # applied by the loss: the model never builds it
        params = {name: tree for name, tree in params.items() if name != "lm_head"}
    outputs = jlora.apply(
        model,
        params,
        lora,
        ids,
        mask,
        positions,
        logits_last=tail,
        rngs=rngs,
        deterministic=deterministic,
        hidden_only=head is not None,
        **packed,
    )
    targets = ids[:, -tail + 1 :] if tail > 1 else ids[:, :0]
    weights = batch["loss_mask"][:, -tail + 1 :].astype(jnp.float32)
    if packed:  # an example's first token is not predicted from the example before it
        weights = weights * (batch["segment_ids"][:, 1:] == batch["segment_ids"][:, :-1])
    if "weight" in batch:  # padding rows of the last eval batch
        weights = weights * batch["weight"][:, None]
    if head is not None:
        return chunked_cross_entropy(*head, outputs[:, :-1], targets, weights, ce_chunk), weights.sum(), None
    losses = optax.softmax_cross_entropy_with_integer_labels(outputs[:, :-1], targets)
    return (losses * weights).sum(), weights.sum(), outputs


def classifier_outputs(model: nn.Module, params, lora, batch: Batch, rngs=None, deterministic=True):
    logits = jlora.apply(
        model, params, lora, batch["input_ids"], batch["attention_mask"], rngs=rngs, deterministic=deterministic
    )
    weights = batch.get("weight", jnp.ones(logits.shape[0]))
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return (losses * weights).sum(), weights.sum(), logits


@dataclasses.dataclass(frozen=True)
class Task:
    """How a model scores a batch: its loss, and (with labels or choices) its accuracy."""

    model: nn.Module
    lora: jlora.LoraConfig
    kind: str  # "causal" or "classifier"
    tail: int = 0  # causal: positions whose logits the loss needs
    choices: tuple[int, ...] = ()  # causal: first tokens of the possible completions
    ce_chunk: int | None = None  # causal: a training loss without logits, this many positions at a time

    def loss(self, params, batch: Batch, rngs=None, deterministic=True, logits=True):
        """(loss sum, token count, logits); ``logits=False`` lets a causal loss be chunked
        (`ce_chunk`), and the logits are then None."""
        if self.kind == "classifier":
            return classifier_outputs(self.model, params, self.lora, batch, rngs, deterministic)
        chunk = None if logits else self.ce_chunk
        return causal_lm_outputs(self.model, params, self.lora, batch, self.tail, rngs, deterministic, chunk)

    def correct(self, logits: jax.Array, batch: Batch) -> jax.Array | None:
        """Weighted count of rows whose label (or completion) the model ranks first; None for a
        causal task without choices (whose `logits` may be None: a chunked loss)."""
        if self.kind != "classifier" and not self.choices:
            return None
        weight = batch.get("weight", jnp.ones(logits.shape[0]))
        if self.kind == "classifier":
            return ((logits.argmax(-1) == batch["label"]) * weight).sum()
        seq_len = batch["input_ids"].shape[1]
        row = batch["answer"] - 1 - (seq_len - self.tail)  # the position that predicts the answer
        scores = jnp.take_along_axis(logits, row[:, None, None], axis=1)[:, 0][:, jnp.asarray(self.choices)]
        return ((scores.argmax(-1) == batch["choice"]) * weight).sum()


def task_for(
    pretrained, lora: jlora.LoraConfig, train: Split, held_out: Split | None = None, ce_chunk: int | None = None
) -> Task:
    """How `pretrained` scores `train`'s task. A causal task's `tail` covers the loss
    positions of `train`'s rows, or of `held_out`'s when `train` is packed (packed batches
    are scored at every position; the tail keeps evaluating unpacked rows cheap)."""
    if "label" in train.arrays:
        return Task(pretrained.model, lora, "classifier")
    rows = held_out if held_out is not None and "segment_ids" in train.arrays else train
    seq_len = rows.arrays["input_ids"].shape[1]
    tail = seq_len - int(np.flatnonzero(rows.arrays["loss_mask"].any(0))[0]) + 1
    choices = tuple(int(c) for c in train.choices) if train.choices is not None else ()
    return Task(pretrained.model, lora, "causal", tail=min(tail, seq_len), choices=choices, ce_chunk=ce_chunk)


# -- steps ---------------------------------------------------------------------------------------


class Placement(NamedTuple):
    """Where a sharded step's inputs live: shardings of adapters, optimizer state and base
    (trees), and of the batch (one sharding for every batch array)."""

    mesh: Mesh
    adapters: Any
    opt_state: Any
    base: Any
    batch: NamedSharding

    @classmethod
    def derive(cls, mesh: Mesh, model: nn.Module, params: Any, lora: jlora.LoraConfig, tx) -> Placement:
        """The base sharded by the model's logical axis names (`jlora.sharding.RULES`; a
        quantized kernel's arrays as that kernel), adapters and optimizer state derived
        from their kernels'."""
        specs = sharding.logical_specs(model, jax.ShapeDtypeStruct((1, 2), jnp.int32))
        kernels = jax.eval_shape(dequantize_tree, params)  # what quantized leaves stand for
        adapter_tree, _ = jlora.split(
            sharding.adapter_shardings(kernels, sharding.param_shardings(kernels, specs, mesh)), lora
        )
        _, base_tree = jlora.split(sharding.param_shardings(params, specs, mesh), lora)
        adapters, _ = jlora.split(params, lora)
        return cls(
            mesh,
            adapter_tree,
            sharding.opt_state_shardings(tx, adapters, adapter_tree, mesh),
            base_tree,
            sharding.batch_sharding(mesh, 2, batch_axis=1),  # (grad_accum, batch, …)
        )


def make_train_step(
    task: Task, tx: optax.GradientTransformation, key: jax.Array, placement: Placement | None = None
) -> Callable:
    """``(adapters, opt_state, base, batch, step) -> (adapters, opt_state, metrics)``, jitted.

    `batch` arrays are ``(grad_accum, batch_size, …)``: gradients of the summed token
    losses accumulate over the micro-batches, then are divided by the token count, so the
    update is the one for the mean loss over the whole batch. With a `placement`, the step
    is compiled for those shardings (inputs must already live there: nothing is moved)."""

    def step(adapters, opt_state, base, batch, step):
        def micro(carry, inputs):
            grads, loss_sum, count = carry
            micro_batch, index = inputs
            rngs = {"dropout": jax.random.fold_in(jax.random.fold_in(key, step), index)}

            def summed(adapters):
                loss, n, _ = task.loss(
                    jlora.join(adapters, base), micro_batch, rngs=rngs, deterministic=False, logits=False
                )
                return loss, n

            (loss, n), g = jax.value_and_grad(summed, has_aux=True)(adapters)
            return (jax.tree.map(jnp.add, grads, g), loss_sum + loss, count + n), None

        zeros = jax.tree.map(jnp.zeros_like, adapters)
        accum = jax.tree.leaves(batch)[0].shape[0]
        (grads, loss_sum, count), _ = jax.lax.scan(micro, (zeros, 0.0, 0.0), (batch, jnp.arange(accum)))
        grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grads)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        metrics = {
            "loss": loss_sum / jnp.maximum(count, 1.0),
            "grad_norm": optax.tree.norm(grads),
            "tokens": count,  # the loss's
            "seen": batch["attention_mask"].sum(),  # every real token of the global batch
        }
        return optax.apply_updates(adapters, updates), opt_state, metrics

    if placement is None:
        return jax.jit(step, donate_argnums=(0, 1))
    replicated = NamedSharding(placement.mesh, PartitionSpec())
    return jax.jit(
        step,
        in_shardings=(placement.adapters, placement.opt_state, placement.base, placement.batch, replicated),
        out_shardings=(placement.adapters, placement.opt_state, replicated),
        donate_argnums=(0, 1),
    )


def make_eval_step(task: Task) -> Callable:
    """``(params, batch) -> sums`` of loss, token count, correct rows and rows, jitted. A
    causal task without choices needs no logits: its loss is chunked (`Task.ce_chunk`)."""
    scored = task.kind == "classifier" or bool(task.choices)

    def step(params, batch):
        loss, n, logits = task.loss(params, batch, logits=scored)
        sums = {"loss": loss, "tokens": n, "rows": batch["weight"].sum()}
        correct = task.correct(logits, batch)
        if correct is not None:
            sums["correct"] = correct
        return sums

    return jax.jit(step)


def evaluate(eval_step: Callable, params, split: Split, batch_size: int, progress: bool = True) -> dict[str, float]:
    """Mean loss and (where the task has labels) accuracy over every row of `split`."""
    from tqdm.auto import tqdm

    totals: dict[str, float] = {}
    batches = eval_batches(split, batch_size)
    total = -(-len(split) // batch_size)
    for batch in tqdm(batches, total=total, desc="eval", unit="batch", disable=not progress, leave=False):
        for name, value in eval_step(params, batch).items():
            totals[name] = totals.get(name, 0.0) + float(value)
    result = {"loss": totals["loss"] / max(totals["tokens"], 1.0)}
    if "correct" in totals:
        result["accuracy"] = totals["correct"] / totals["rows"]
    return result


# -- the loop ------------------------------------------------------------------------------------


def shape_batch(batch: dict[str, np.ndarray], grad_accum: int) -> dict[str, np.ndarray]:
    """(grad_accum * batch_size, …) -> (grad_accum, batch_size, …)."""
    return {name: a.reshape(grad_accum, -1, *a.shape[1:]) for name, a in batch.items()}


def fit(
    task: Task,
    adapters: Any,
    base: Any,
    train: Split,
    config: TrainConfig,
    metrics_file: pathlib.Path | None = None,
    progress: bool = True,
    checkpoints: Checkpoints | None = None,
    mesh: Mesh | None = None,
    evaluate: Callable[[Any], dict] | None = None,
    report: Callable[[dict], None] | None = None,
    best: Checkpoints | None = None,
) -> tuple[Any, list[dict]]:
    """Train `adapters` for `config.steps` steps; returns them and the per-step history.
    `adapters` are donated to the step (their buffers are reused): keep no other reference.

    With `checkpoints`, the adapters and optimizer state are saved every
    `config.checkpoint_every` steps and at the end, and a run that finds a checkpoint
    there resumes from the latest one: the batches, dropout keys and learning rate are
    pure functions of the step, so it ends exactly where an uninterrupted run would.
    `metrics_file` then loses the records of steps after that checkpoint, which are redone.

    With `evaluate` (adapters -> held-out metrics) and `config.eval_every`, the held-out
    metrics every that many steps (before the last) go to `metrics_file` as
    ``{"eval": "step", "step": …}`` records. `report` (e.g. `TensorBoard`) receives every
    record written there too. `best` (a `Checkpoints` of one) then receives the adapters of
    each evaluation that lowers the held-out loss, and ``config.early_stopping_patience``
    stops training (with a checkpoint of that step) after that many evaluations without one,
    as transformers' ``EarlyStoppingCallback`` does; the last history record then says
    ``"stopped_early": True``.

    With a `mesh` (`jlora.sharding.make_mesh`), the base is placed once, sharded by its
    logical axes, adapters and optimizer state by their kernels', and each process loads
    only the batch rows its devices hold (one or many hosts alike)."""
    from tqdm.auto import tqdm

    tx = make_optimizer(config, task.lora)
    placement, rows = None, None
    if mesh is not None:
        placement = Placement.derive(mesh, task.model, jlora.join(adapters, base), task.lora, tx)
        adapters, base = jax.device_put(adapters, placement.adapters), jax.device_put(base, placement.base)
        rows = sharding.local_rows(mesh, (config.grad_accum, config.batch_size), batch_axis=1)
        rows = (np.arange(config.grad_accum)[:, None] * config.batch_size + rows).ravel()
    init = tx.init if placement is None else jax.jit(tx.init, out_shardings=placement.opt_state)
    opt_state = init(adapters)
    step_fn = make_train_step(task, tx, jax.random.key(config.seed), placement)
    batches = Batches(train, config.batch_size * config.grad_accum, config.seed)
    lr = schedule(config)
    base_fingerprint, data_fingerprint = (fingerprint(base), split_fingerprint(train)) if checkpoints else (None, None)
    start, history, losses = 0, [], []  # losses: the held-out losses of the evaluations so far
    if checkpoints is not None and checkpoints.latest_step() is not None:
        restored = checkpoints.restore(adapters, opt_state, base_fingerprint=base_fingerprint)  # same placement
        if restored.meta["data"]["hash"] != data_fingerprint:
            raise ValueError(f"{checkpoints.directory}: the training data differ from those the checkpoint was made on")
        adapters, opt_state, start = restored.adapters, restored.opt_state, restored.step
        history = [r for r in read_metrics(metrics_file) if r.get("step", 0) <= start and "eval" not in r]
    losses = [r["loss"] for r in read_metrics(metrics_file) if r.get("eval") == "step" and r["step"] <= start]
    if checkpoints is not None:  # records of steps after the checkpoint (or of all, without one) are redone
        rewrite_metrics(metrics_file, lambda r: r.get("step", 0) <= start)
    bar = tqdm(total=config.steps, initial=start, desc="train", unit="step", disable=not progress)
    began = time.perf_counter() - (history[-1]["elapsed_s"] if history else 0.0)
    for step, batch in zip(range(start, config.steps), batches.iterate(start, config.steps, rows), strict=True):
        tick = time.perf_counter()
        shaped = shape_batch(batch, config.grad_accum)
        if mesh is not None:
            shaped = sharding.shard_batch(shaped, mesh, config.batch_size, batch_axis=1)
        adapters, opt_state, metrics = step_fn(adapters, opt_state, base, shaped, jnp.int32(step))
        metrics = {k: float(v) for k, v in metrics.items()}
        seconds = time.perf_counter() - tick
        record = {
            "step": step + 1,
            "loss": metrics["loss"],
            "lr": float(lr(step)),
            "grad_norm": metrics["grad_norm"],
            "tokens_per_s": metrics["seen"] / seconds,
            "elapsed_s": time.perf_counter() - began,
            "epoch": batches.position(step)[0],
        }
        evaluated = None
        if evaluate is not None and config.eval_every and (step + 1) % config.eval_every == 0 < config.steps - step - 1:
            evaluated = evaluate(adapters)
            if best is not None and (not losses or evaluated["loss"] < min(losses)):
                best.save(step + 1, adapters, None, config=task.lora, base_fingerprint=fingerprint(base))
            losses.append(evaluated["loss"])
        patience = config.early_stopping_patience
        stopping = patience is not None and len(losses) > patience
        stopping = stopping and min(losses[-patience:]) >= min(losses[:-patience])  # no new best in `patience`
        if stopping:
            record["stopped_early"] = True
        history.append(record)
        append_record(metrics_file, record, report)
        if evaluated is not None:
            append_record(metrics_file, {"eval": "step", "step": step + 1, **evaluated}, report)
        if checkpoints is not None and (
            (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps or stopping
        ):
            epoch, index = batches.position(step + 1)
            checkpoints.save(
                step + 1,
                adapters,
                opt_state,
                config=task.lora,
                base_fingerprint=base_fingerprint,
                metrics={"loss": record["loss"]},
                extra={"data": {"hash": data_fingerprint, "epoch": epoch, "batch": index}},
            )
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        bar.update()
        if stopping:
            print(f"early stopping at step {step + 1}: no lower held-out loss in {patience} evaluations")
            break
    bar.close()
    if checkpoints is not None:
        checkpoints.wait()
    return adapters, history


def split_fingerprint(split: Split) -> str:
    """A hash of the training rows, so a resumed run can tell its data changed."""
    digest = hashlib.sha256()
    for name in sorted(split.arrays):
        digest.update(name.encode() + np.ascontiguousarray(split.arrays[name]).tobytes())
    return digest.hexdigest()


def read_metrics(path: pathlib.Path | None) -> list[dict]:
    """The records of a JSONL metrics file; a last line cut short by a kill is dropped."""
    if path is None or not path.exists():
        return []
    records = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines) - 1:
                raise ValueError(f"{path}: line {number + 1} is not JSON") from None
    return records


def rewrite_metrics(path: pathlib.Path | None, keep: Callable[[dict], bool]) -> None:
    """Keep the records `keep` accepts, replacing the file atomically."""
    if path is None or not path.exists() or jax.process_index() != 0:
        return
    staging = path.with_name(path.name + ".tmp")
    staging.write_text("".join(json.dumps(r) + "\n" for r in read_metrics(path) if keep(r)))
    os.replace(staging, path)


def append_record(path: pathlib.Path | None, record: dict, report: Callable[[dict], None] | None = None) -> None:
    """One metrics record, to `path` and to `report`, by process 0 only."""
    if jax.process_index() != 0:
        return
    if path is not None:
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")
    if report is not None:
        report(record)


class TensorBoard:
    """Metrics records as TensorBoard scalars in `directory` (with tensorboardX, which needs no
    TensorFlow): ``train/<name>`` for step records, ``eval/<name>`` for held-out ones (before,
    during and after training), at the record's step; flushed after each record, so a running
    TensorBoard shows it at once."""

    def __init__(self, directory: pathlib.Path):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(directory))

    def __call__(self, record: dict) -> None:
        group = "train" if "eval" not in record else "eval"
        for name, value in record.items():
            if name not in ("step", "eval") and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(f"{group}/{name}", value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def plot_loss(history: Iterable[dict], evals: dict[str, dict], path: pathlib.Path, during: Iterable[dict] = ()) -> None:
    """A PNG of the training loss per step (and its running mean), with the held-out losses
    before, `during` (``eval_every`` records) and after training marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = list(history)
    steps = [h["step"] for h in history]
    losses = np.array([h["loss"] for h in history])
    window = max(1, len(losses) // 20)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, alpha=0.35, label="train loss")
    ax.plot(steps[window - 1 :], smooth, label=f"train loss, mean of {window}")
    during = list(during)
    if during:
        ax.plot([r["step"] for r in during], [r["loss"] for r in during], "o-", label="held-out loss during training")
    for name, result in evals.items():
        x = 0 if name == "before" else steps[-1]
        label = f"held-out loss {name}" + (f" (accuracy {result['accuracy']:.1%})" if "accuracy" in result else "")
        ax.scatter([x], [result["loss"]], zorder=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (completion tokens)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
