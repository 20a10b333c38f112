"""Where the bytes of one training step go: jlora's LoRA step and full fine-tuning on the
SmolLM2 preset's shapes, from XLA's compiled memory analysis, and a worker's RSS by stage.

Nothing heavy is loaded for the analysis: parameters are `jax.eval_shape` of the model, and
each step (`jlora.train.make_train_step`, LoRA r=8 on the seven projections; full fine-tuning
with clipped AdamW as `benchmarks.workers` builds it), batch 8 x 128, float32, with and
without remat, is lowered and compiled for those shapes. Its `memory_analysis()` is
attributed from the pytrees themselves: the arguments to frozen params, trainable params,
optimizer state and batch; the temporaries to gradients (the trainable tree's bytes), the
activations the backward pass keeps (the residuals of the vjp of the loss w.r.t. the
trainable tree, those that are not arguments), the logits the loss keeps, and XLA's
workspace (the rest). Writes the section "SmolLM2 preset, one training step (compiled
memory analysis)" of benchmarks/results/memory.md, keeping the rest of the file.

    python -m benchmarks.step_memory [--what-ifs] [--rss]
    python -m benchmarks.step_memory --stages lora [--remat] [--trim] [--ce-chunk N]

``--what-ifs`` adds the compiled totals with one change at a time that jlora does not make
(chunked cross-entropy, SwiGLU and softmax keeping less for their backward pass; a few
minutes). ``--rss`` adds the RSS probes, one process each (about 35 s each on 2 cores), and a
bare runtime's. ``--stages`` is one probe, printed as JSON: a process that builds the step
with the preset's weights as `benchmarks.workers` does, and the peak (VmHWM, reset before
each stage) and final RSS of each stage: imports, load, init, compile, first step; ``--trim``
hands the heap's free pages back to the OS (glibc ``malloc_trim``) after load, init and compile.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import pathlib
import re
import subprocess
import sys
from collections.abc import Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax._src.ad_checkpoint import _saved_residuals

import jlora
from benchmarks.common import BATCH, PRESET, RANK, SEQ, TARGETS, commit
from jlora import train as training
from jlora.models import LlamaConfig, LlamaForCausalLM

MIB, GIB = 2**20, 2**30
RESULTS = pathlib.Path(__file__).parent / "results"
SECTION = "## SmolLM2 preset, one training step (compiled memory analysis)"
FIELDS = ("argument", "output", "alias", "temp")
STEPS = (("lora", False), ("full", False), ("lora", True), ("full", True))
NAMES = {
    ("lora", False): "LoRA",
    ("full", False): "full FT",
    ("lora", True): "LoRA, remat",
    ("full", True): "full FT, remat",
}


def nbytes(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def preset_config() -> LlamaConfig:
    """The SmolLM2 preset's architecture, from its GGUF header."""
    from benchmarks.run import architecture

    return architecture()[0]


@dataclasses.dataclass
class Step:
    """One compiled step and the abstract trees it was compiled for."""

    compiled: jax.stages.Compiled
    args: dict[str, object]  # category -> pytree of ShapeDtypeStructs, in argument order
    donated: tuple[str, ...]  # the categories donated to the step
    loss: Callable  # loss(trainable, *rest): what the step differentiates, w.r.t. `trainable`
    trainable: object
    rest: tuple


def build(config: LlamaConfig, kind: str, remat: bool, *, batch: int = BATCH, seq: int = SEQ,
          ce_chunk: int | None = None) -> Step:  # fmt: skip
    """Lower and compile `kind`'s ("lora" or "full") step for `config`, abstract parameters."""
    model = LlamaForCausalLM(config, scan=True, remat=remat)
    base = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]))
    lora = jlora.LoraConfig(r=RANK, alpha=2 * RANK, target_modules=list(TARGETS))
    task = training.Task(model, lora, "causal", tail=seq, ce_chunk=ce_chunk)
    tokens = jax.ShapeDtypeStruct((1, batch, seq), jnp.int32)  # (grad_accum, batch, seq)
    data = {"input_ids": tokens, "attention_mask": tokens, "loss_mask": tokens}
    micro = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), data)
    donated = ("trainable params", "optimizer state")
    if kind == "lora":  # `jlora train`'s step, as benchmarks.workers runs it
        specs = jlora.kernel_specs(model, jax.ShapeDtypeStruct((1, 2), jnp.int32))
        params = jax.eval_shape(lambda p: jlora.init(p, lora, jax.random.key(0), specs=specs), base)
        adapters, frozen = jlora.split(params, lora)
        tx = training.make_optimizer(training.TrainConfig(steps=10_000), lora)
        args = {
            "trainable params": adapters,
            "optimizer state": jax.eval_shape(tx.init, adapters),
            "frozen params": frozen,
            "batch": data,
            "step": jax.ShapeDtypeStruct((), jnp.int32),
        }
        compiled = training.make_train_step(task, tx, jax.random.key(0)).lower(*args.values()).compile()

        def lora_loss(adapters, frozen, batch):
            return task.loss(jlora.join(adapters, frozen), batch, logits=False)[0]

        return Step(compiled, args, donated, lora_loss, adapters, (frozen, micro))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4))
    logits = ce_chunk is None  # benchmarks.workers' full step takes the logits (ce_chunk unset)

    def full_loss(params, batch):
        return task.loss(params, batch, logits=logits)[0]

    def full_step(params, opt_state, batch):
        def mean(params):
            total, count, _ = task.loss(params, jax.tree.map(lambda a: a[0], batch), logits=logits)
            return total / count

        updates, opt_state = tx.update(jax.grad(mean)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    args = {"trainable params": base, "optimizer state": jax.eval_shape(tx.init, base), "batch": data}
    compiled = jax.jit(full_step, donate_argnums=(0, 1)).lower(*args.values()).compile()
    return Step(compiled, args, donated, full_loss, base, (micro,))


def residuals(step: Step) -> list[tuple[jax.ShapeDtypeStruct, str]]:
    """What the backward pass keeps from the forward pass: the residuals of the vjp of the
    step's loss w.r.t. its trainable tree alone (frozen params and batch as non-differentiated
    arguments), less those that are arguments themselves."""
    leaves, tree = jax.tree.flatten((step.trainable, *step.rest))

    def vjp(*leaves):
        trainable, *rest = jax.tree.unflatten(tree, leaves)
        return jax.vjp(lambda t: step.loss(t, *rest), trainable)

    closed, shape = jax.make_jaxpr(vjp, return_shape=True)(*leaves)
    kept = len(jax.tree.leaves(shape[1]))
    jaxpr = closed.jaxpr.replace(outvars=closed.jaxpr.outvars[len(closed.jaxpr.outvars) - kept :])
    saved = _saved_residuals(jaxpr, ("",) * len(jaxpr.invars))
    return [(a, why) for a, why in saved if not why.startswith("from the argument")]


HLO_TYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "int8": "s8", "uint8": "u8", "int32": "s32"}


def frozen_sized(step: Step) -> list[str]:
    """HLO instructions of the compiled step, other than parameters, their tuple elements and
    bitcasts, whose result has the shape of a whole frozen leaf: a gradient, an accumulator or
    a copy of something frozen (none expected)."""
    frozen = jax.tree.leaves(step.args.get("frozen params", {}))
    shapes = {f"{HLO_TYPES[jnp.dtype(x.dtype).name]}[{','.join(map(str, x.shape))}]" for x in frozen if x.ndim > 1}
    found = []
    for line in step.compiled.as_text().splitlines():
        match = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = (\w+\[[\d,]*\])\S* ([\w\-]+)\(", line)
        if match and match.group(1) in shapes and match.group(2) not in ("parameter", "get-tuple-element", "bitcast"):
            found.append(f"{match.group(2)} {match.group(1)}")
    return found


def attribute(step: Step, config: LlamaConfig, per_layer: int | None = None) -> dict:
    """Bytes by category (see the module docstring) beside XLA's own figures.

    With remat, `per_layer` is one layer's residuals without remat: the backward pass rebuilds
    them for the layer it differentiates, so they count with the activations."""
    m = step.compiled.memory_analysis()
    row = {f"xla {f}": getattr(m, f"{f}_size_in_bytes") for f in FIELDS}
    kept = getattr(step.compiled._executable, "_kept_var_idx", None)  # jit drops unused arguments
    index = 0
    for name, tree in step.args.items():
        leaves = jax.tree.leaves(tree)
        row[name] = sum(nbytes(x) for i, x in enumerate(leaves, index) if kept is None or i in kept)
        index += len(leaves)
    saved = residuals(step)
    logits = sum(nbytes(a) for a, _ in saved if a.shape and a.shape[-1] == config.vocab_size)
    stacked = sum(nbytes(a) for a, _ in saved if a.shape and a.shape[0] == config.num_layers)
    row["per layer"] = stacked // config.num_layers if per_layer is None else per_layer
    row["activations"] = sum(nbytes(a) for a, _ in saved) - logits + (per_layer or 0)
    row["logits kept"] = logits
    row["gradients"] = nbytes(step.trainable)
    row["workspace"] = row["xla temp"] - row["activations"] - logits - row["gradients"]
    row["donated"] = sum(row[name] for name in step.donated)
    row["total"] = row["xla argument"] + row["xla temp"] + row["xla output"] - row["xla alias"]
    row["frozen-sized"] = frozen_sized(step)
    return row


def analyse(config: LlamaConfig, **options) -> dict[tuple[str, bool], dict]:
    """`attribute` of the four steps, (kind, remat) -> row; `options` go to `build`."""
    rows = {}
    for kind, remat in STEPS:
        per_layer = rows[kind, False]["per layer"] if remat else None
        rows[kind, remat] = attribute(build(config, kind, remat, **options), config, per_layer)
    return rows


# -- what-ifs: changes jlora does not make, to measure what they would save -------------------------


@contextlib.contextmanager
def what_if(changes: frozenset[str]) -> Iterator[None]:
    """Within this context (while steps are traced), ``"swiglu"``: the MLP's ``act(gate) * up``
    recomputed in the backward pass from gate and up (`jax.checkpoint`), keeping those two
    instead of the activation's internals; ``"softmax"``: the attention softmax keeping its
    output alone (``dx = p * (g - Σ g·p)``)."""
    from jlora.models import llama
    from jlora.models.layers import dense

    mlp_call, softmax = llama.LlamaMLP.__call__, jax.nn.softmax
    if "swiglu" in changes:
        gated = {name: jax.checkpoint(lambda g, u, f=f: f(g) * u) for name, f in llama.ACTIVATIONS.items()}

        def call(self, x):
            c = self.config
            kw = {"dtype": self.dtype, "param_dtype": self.param_dtype, "use_bias": c.mlp_bias}
            assert not c.fused, "what_if('swiglu') is for separate gate and up projections"
            gate = dense(c.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)(x)
            up = dense(c.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)(x)
            return dense(c.hidden_size, ("mlp", "embed"), name="down_proj", **kw)(gated[c.hidden_act](gate, up))

        llama.LlamaMLP.__call__ = nn.compact(call)
    if "softmax" in changes:

        @jax.custom_vjp
        def probabilities(x):
            return softmax(x, axis=-1)

        def forward(x):
            p = softmax(x, axis=-1)
            return p, p

        probabilities.defvjp(forward, lambda p, g: (p * (g - (g * p).sum(-1, keepdims=True)),))

        def patched(x, axis=-1, where=None):
            return probabilities(x) if axis == -1 and where is None else softmax(x, axis, where)

        jax.nn.softmax = patched
    try:
        yield
    finally:
        llama.LlamaMLP.__call__, jax.nn.softmax = mlp_call, softmax


WHAT_IFS = [
    ("jlora as it is", frozenset(), None),
    ("cross-entropy in chunks of 128 positions (`ce_chunk=128`)", frozenset(), 128),
    ("SwiGLU keeps gate and up only", frozenset({"swiglu"}), None),
    ("softmax keeps its probabilities only", frozenset({"softmax"}), None),
    ("all three", frozenset({"swiglu", "softmax"}), 128),
]


def what_ifs(config: LlamaConfig) -> list[tuple[str, dict]]:
    out = []
    for label, changes, chunk in WHAT_IFS:
        with what_if(changes):
            totals = {k: build(config, *k, ce_chunk=chunk).compiled.memory_analysis() for k in STEPS}
        out.append((label, {k: m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
                            - m.alias_size_in_bytes for k, m in totals.items()}))  # fmt: skip
    return out


# -- RSS ------------------------------------------------------------------------------------------


def rss() -> tuple[int, int]:
    """(current, high-water since the last reset) RSS of this process in bytes (Linux)."""
    with open("/proc/self/status") as f:
        status = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.startswith("Vm")}
    return status["VmRSS"], status["VmHWM"]


def stages(kind: str, remat: bool, trim: bool = False, ce_chunk: int | None = None) -> dict[str, list[int]]:
    """{stage: [peak during it, RSS after it]} of this process building `kind`'s step with the
    preset's weights as `benchmarks.workers.jlora_train` does, then running it once."""
    import ctypes

    import numpy as np

    import jlora.models
    from benchmarks.workers import reset_rss_high_water

    found = {}

    def mark(stage):
        if trim and stage in ("load", "init", "compile"):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        now, peak = rss()
        found[stage] = [peak, now]
        reset_rss_high_water()

    jnp.zeros(1).block_until_ready()
    mark("imports")
    pretrained = jlora.models.load(PRESET, scan=True, tokenizer=False)
    mark("load")
    lora = jlora.LoraConfig(r=RANK, alpha=2 * RANK, target_modules=list(TARGETS))
    task = training.Task(pretrained.model.clone(remat=remat), lora, "causal", tail=SEQ, ce_chunk=ce_chunk)
    ids = np.random.default_rng(0).integers(0, pretrained.config.vocab_size, (1, BATCH, SEQ), dtype=np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}
    if kind == "full":
        tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4))

        def step(params, opt_state, batch):
            def mean(params):
                total, count, _ = task.loss(params, jax.tree.map(lambda a: a[0], batch), logits=ce_chunk is None)
                return total / count

            updates, opt_state = tx.update(jax.grad(mean)(params), opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        jitted = jax.jit(step, donate_argnums=(0, 1))
        state = [pretrained.params, tx.init(pretrained.params), batch]
    else:
        params = jlora.init(pretrained.params, lora, jax.random.key(0), specs=pretrained.kernel_specs())
        adapters, base = jlora.split(params, lora)
        del params
        tx = training.make_optimizer(training.TrainConfig(steps=10_000), lora)
        jitted = training.make_train_step(task, tx, jax.random.key(0))
        state = [adapters, tx.init(adapters), base, batch, jnp.int32(0)]
    jax.block_until_ready(state[:2])
    mark("init")
    compiled = jitted.lower(*state).compile()
    mark("compile")
    state[:2] = jax.block_until_ready(compiled(*state)[:2])
    mark("step")
    return found


# (kind, remat, trim, ce_chunk): the four steps, then with remat trimmed, then also chunked
PROBES = [(kind, remat, False, None) for kind, remat in STEPS]
PROBES += [(kind, True, True, chunk) for chunk in (None, 128) for kind in ("lora", "full")]


def probe(kind: str, remat: bool, trim: bool = False, ce_chunk: int | None = None) -> dict:
    """`stages` in a process of its own (so that its RSS is its own)."""
    command = [sys.executable, "-m", "benchmarks.step_memory", "--stages", kind]
    command += ["--remat"] * remat + ["--trim"] * trim + [f"--ce-chunk={ce_chunk}"] * bool(ce_chunk)
    root = pathlib.Path(__file__).parent.parent
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True, cwd=root).stdout)


def bare_runtime() -> int:
    """Peak RSS of a process that imports jax and jlora and makes one array: its VmHWM, as
    ``ru_maxrss`` would count the parent's RSS too (Linux keeps it across fork and exec)."""
    code = "import jax, jlora; jax.numpy.zeros(1).block_until_ready(); "
    code += "print(next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')))"
    root = pathlib.Path(__file__).parent.parent
    return int(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root).stdout
    )


# -- the report -----------------------------------------------------------------------------------


def mib(x: float) -> str:
    return f"{x / MIB:,.1f}"


ROWS = [
    ("arguments: frozen params", "frozen params"),
    ("arguments: trainable params", "trainable params"),
    ("arguments: optimizer state (Adam μ, ν; counts)", "optimizer state"),
    ("arguments: batch", "batch"),
    ("**arguments** (XLA)", "xla argument"),
    ("temporaries: gradients (the trainable tree's bytes)", "gradients"),
    ("temporaries: activations saved for the backward pass", "activations"),
    ("temporaries: logits kept by the loss", "logits kept"),
    ("temporaries: XLA workspace (the rest)", "workspace"),
    ("**temporaries** (XLA)", "xla temp"),
    ("**outputs** (XLA)", "xla output"),
    ("**aliased**: donated arguments reused as outputs (XLA)", "xla alias"),
    ("**arguments + temporaries + outputs − aliased**", "total"),
]


def report(rows: dict, config: LlamaConfig, command: str) -> list[str]:
    lora, full = rows["lora", False], rows["full", False]
    ratio = {remat: rows["lora", remat]["total"] / rows["full", remat]["total"] for remat in (False, True)}
    lines = [
        SECTION,
        "",
        f"From `{command}`: {PRESET}'s shapes ({config.num_layers} layers, vocabulary {config.vocab_size:,}, tied "
        f"embedding), batch {BATCH} × {SEQ}, float32, whole-logits cross-entropy (the workers set no `ce_chunk`). "
        f"LoRA r={RANK} on the seven projections is `jlora.train.make_train_step`; full fine-tuning, clipped AdamW, "
        "is the step `benchmarks/workers.py` builds. Abstract parameters; each step lowered, compiled and its "
        "`compiled.memory_analysis()` attributed (MiB):",
        "",
        "| MiB | " + " | ".join(NAMES[k] for k in STEPS) + " |",
        "|---" * (len(STEPS) + 1) + "|",
    ]
    for label, key in ROWS:
        cells = [(f"**{mib(rows[k][key])}**" if key == "total" else mib(rows[k].get(key, 0))) for k in STEPS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"**LoRA ÷ full FT of arguments + temporaries + outputs − aliased: {ratio[False]:.3f} without remat, "
        f"{ratio[True]:.3f} with it** (targets for peak RSS: ≤ 0.50 and ≤ 0.40).",
        "",
        "- Donated and aliased: both steps donate the trainable tree and the optimizer state "
        f"(`donate_argnums=(0, 1)`), and XLA reuses all of it for the outputs (LoRA {mib(lora['xla alias'])} MiB, "
        f"full FT {mib(full['xla alias'])} MiB); outputs beyond those are the metrics and XLA's output tuples. "
        "LoRA's frozen params and the batches are not donated: the base is read again every step. The unused "
        "`step` argument (no dropout) is dropped by `jax.jit`.",
        f"- LoRA's optimizer state is Adam's moments of the adapters alone, {mib(lora['optimizer state'])} MiB "
        f"= 2 × {mib(lora['trainable params'])} MiB + counts; its gradients are the adapters'. The compiled LoRA "
        f"step has {len(lora['frozen-sized'])} instructions with a frozen leaf's shape (a gradient, accumulator or "
        "copy of something frozen would show there), and the base is an argument, not a closed-over constant.",
        f"- Activations: without remat {mib(lora['per layer'])} MiB per layer for LoRA, {mib(full['per layer'])} "
        "for full FT (which also keeps the norms' normalised inputs, for their scales' gradients). LoRA keeps "
        "nothing that full FT does not: every projection is adapted, and its branch's dA = xᵀ·(g·Bᵀ) needs the "
        "same input x that the kernel's own gradient would. Of the 60 MiB, 36 are six (8, 128, 1536) tensors of "
        "the MLP (gate, up, three of SiLU's internals, the product), 9 two of attention's (8, 9, 128, 128) "
        "(the softmax keeps its input and output), the rest the hidden states, q, k, v and attention's output. "
        "With remat: each layer's input, plus one layer's residuals rebuilt while it is differentiated.",
        f"- Logits: the loss keeps the softmax of the (8, 127, {config.vocab_size:,}) logits, "
        f"{mib(lora['logits kept'])} MiB, and the backward pass makes their gradient (in the workspace). "
        "`ce_chunk` (1024 by default in `jlora train`) covers all 1,016 positions of this batch in one chunk.",
        "- Workspace: what XLA allocates beyond the above, e.g. the cotangents of the layer being differentiated, "
        "the logits' gradient, and for full FT the update's param-sized temporaries.",
    ]
    return lines


def what_if_lines(results: list[tuple[str, dict]], command: str) -> list[str]:
    lines = [
        "",
        f"Changes jlora does not make, one at a time, compiled the same way (`{command}`; MiB of arguments + "
        "temporaries + outputs − aliased):",
        "",
        "| change | LoRA | full FT | LoRA ÷ full | LoRA, remat | full FT, remat | LoRA ÷ full, remat |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, t in results:
        cells = [mib(t["lora", False]), mib(t["full", False]), f"{t['lora', False] / t['full', False]:.3f}"]
        cells += [mib(t["lora", True]), mib(t["full", True]), f"{t['lora', True] / t['full', True]:.3f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def rss_lines(probes: dict, bare: int, rows: dict) -> list[str]:
    lines = ["", "### Peak RSS: the benchmark workers, and where it goes", ""]
    latest = RESULTS / "latest.json"
    if latest.exists():
        results = json.loads(latest.read_text())
        peak = {name: w.get("peak_rss_bytes") or 0 for name, w in results["workers"].items()}
        lines += [
            f"`benchmarks/results/latest.md` (`python -m benchmarks.run` at `{results['commit'][:12]}`): "
            f"jlora-lora {peak['jlora-lora'] / GIB:.2f} GiB ÷ jlora-full {peak['jlora-full'] / GIB:.2f} GiB = "
            f"{peak['jlora-lora'] / peak['jlora-full']:.3f}; with remat {peak['jlora-lora-remat'] / GIB:.2f} ÷ "
            f"{peak['jlora-full-remat'] / GIB:.2f} = {peak['jlora-lora-remat'] / peak['jlora-full-remat']:.3f}. "
            "(jlora-lora also holds the 4096² matmul-peak arrays; jlora-lora-2, the same step without them, "
            f"peaked at {peak['jlora-lora-2'] / GIB:.2f} GiB.)",
            "",
        ]
    lines += [
        f"A bare `import jax, jlora; jax.numpy.zeros(1)` process peaks at {bare / GIB:.3f} GiB. The probe "
        f"(`--stages`, at `{commit()[:12]}`, the load cache filled first) builds each step as the worker does, one "
        "process each (GiB; each stage's peak is its own):",
        "",
        "| probe | imports | load: peak | after load | after init | after compile | step: peak | **process peak** "
        "| compiled total | after load − imports − params | compile − init | step peak − compile |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (kind, remat, trim, chunk), s in probes.items():
        params = rows[kind, remat]["frozen params" if kind == "lora" else "trainable params"]
        g = {stage: (peak / GIB, now / GIB) for stage, (peak, now) in s.items()}
        label = NAMES[kind, remat] + (", trim" if trim else "") + (f", ce_chunk {chunk}" if chunk else "")
        compiled = f"{rows[kind, remat]['total'] / GIB:.3f}" if chunk is None else "–"
        cells = [g["imports"][1], g["load"][0], g["load"][1], g["init"][1], g["compile"][1], g["step"][0]]
        extra = [g["load"][1] - g["imports"][1] - params / GIB, g["compile"][1] - g["init"][1]]
        extra.append(g["step"][0] - g["compile"][1])
        top = max(v[0] for v in g.values())
        lines.append(
            f"| {label} | "
            + " | ".join(f"{c:.3f}" for c in cells)
            + f" | **{top:.3f}** | {compiled} | "
            + " | ".join(f"{c:.3f}" for c in extra)
            + " |"
        )
    return lines


def write_section(lines: list[str], path: pathlib.Path) -> None:
    """Replace this script's section of `path` where it is (else append it), keeping the rest."""
    text = path.read_text() if path.exists() else ""
    section = "\n".join(lines) + "\n"
    start = text.find(SECTION)
    if start < 0:
        path.write_text(text.rstrip("\n") + "\n\n" + section)
        return
    end = text.find("\n## ", start + len(SECTION))
    path.write_text(text[:start] + section + (text[end:] if end >= 0 else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what-ifs", action="store_true", help="also the compiled totals of changes jlora lacks")
    parser.add_argument("--rss", action="store_true", help="also the RSS probes (a process per probe)")
    parser.add_argument("--stages", choices=("lora", "full"), help="one RSS probe, printed as JSON")
    parser.add_argument("--remat", action="store_true", help="--stages: with remat")
    parser.add_argument("--trim", action="store_true", help="--stages: malloc_trim after load, init and compile")
    parser.add_argument("--ce-chunk", type=int, help="--stages: cross-entropy this many positions at a time")
    parser.add_argument("--out", default=str(RESULTS / "memory.md"))
    args = parser.parse_args()
    if args.stages:
        print(json.dumps(stages(args.stages, args.remat, args.trim, args.ce_chunk)))
        return
    config = preset_config()
    rows = analyse(config)
    command = "python -m benchmarks.step_memory" + " --what-ifs" * args.what_ifs + " --rss" * args.rss
    lines = report(rows, config, command)
    if args.what_ifs:
        lines += what_if_lines(what_ifs(config), command)
    if args.rss:
        fill = f"import jlora.models; jlora.models.load({PRESET!r}, scan=True, tokenizer=False)"
        subprocess.run(
            [sys.executable, "-c", fill], check=True, capture_output=True
        )  # the load cache, as a worker finds it
        probes = {spec: probe(*spec) for spec in PROBES}
        lines += rss_lines(probes, bare_runtime(), rows)
    print("\n".join(lines))
    write_section(lines, pathlib.Path(args.out))


if __name__ == "__main__":
    main()
