"""bfloat16 on XLA:CPU, measured small and side by side with torch, with the HLO as evidence.

    taskset -c 1 python -m benchmarks.bf16 [--rounds 5] [--layers 4] [--profile]
    taskset -c 1 python -m benchmarks.bf16 --sections step --layers 30 --rounds 2 --layouts

1. One matmul of the step's shapes, (1024, 576) x (576, 1536): jax with a bf16 output, jax
   accumulating in float32 (``preferred_element_type``) then cast to bf16, jax in float32,
   torch in bf16 and float32.
2. One Dense layer's forward and backward, x's gradient alone (a frozen kernel, as in LoRA)
   and with the kernel's (the kernel a float32 parameter cast to bf16, as Linen does):
   Linen's default bf16 dot, the float32-accumulating dot under jax's autodiff (jlora before
   `jlora.models.layers.narrow_dot`), ``narrow_dot``, and torch's bf16 autocast.
3. The optimized HLO of those layers and of jlora's bf16 LoRA train step on a small Llama
   (`--layers` layers of SmolLM2-135M's widths and vocabulary, batch 8 x 128, r = 8 on the
   seven projections, scanned), with the autodiff dot and with ``narrow_dot``: dots by
   operand and output dtypes and where XLA:CPU runs them (``ynn``: a YNNPACK fusion;
   ``eigen``: XLA's own dot thunk), which operands are converts, converts by direction and
   bytes, fusions. Instruction counts are static; FLOPs and bytes count each instruction
   once per execution (a scanned layer's body once per layer).
4. That step's time, both ways, beside jlora's float32 step and peft + torch's bf16
   autocast step of the same config (`--versus`: only jlora's bf16 step and peft's;
   `--layouts`: jlora's bf16 step with ``remat=True`` and unrolled too). `--profile` splits
   the step's time by kind of HLO instruction (a `jax.profiler` trace: XLA:CPU's thunks are
   named after their instructions).
5. `--full ROUNDS` runs the real benchmark's two sides (`benchmarks.run`'s bf16 group:
   SmolLM2-135M, 30 layers, one worker process each, on every CPU).

Every candidate of a section runs once per round, round-robin, so that a busy moment of
this shared machine hits them all; ratios are per round (median and min-max), times the
median and the best round. Under ``taskset -c 1`` both sides get the one CPU (torch one
thread, XLA's pool that CPU): on a 2-core machine shared with other work, torch's two
OpenMP threads wait on each other whenever one is descheduled, which favours jlora
unfairly; one CPU each keeps the comparison fair. Prints a markdown report
(benchmarks/results/bf16.md holds one, with the explanation).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import gzip
import json
import math
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable

from benchmarks.common import BATCH, RANK, SEQ, TARGETS, commit, machine, ratio
from benchmarks.peers import smollm2_config

M, K, N = BATCH * SEQ, 576, 1536  # tokens x embed -> the MLP's width
CPUS = len(os.sched_getaffinity(0))  # `taskset -c 0 python -m benchmarks.bf16`: one CPU for both sides


def rounds_of(candidates: dict[str, Callable[[], object]], rounds: int, seconds: float = 0.25) -> dict[str, list]:
    """Seconds per call of each candidate, `rounds` rounds round-robin; each round's figure
    the mean of as many calls as fill about `seconds` (at least one)."""
    calls = {}
    for name, fn in candidates.items():
        fn()  # compiled, warm
        tick = time.perf_counter()
        fn()
        calls[name] = max(1, round(seconds / max(time.perf_counter() - tick, 1e-6)))
    times = collections.defaultdict(list)
    for _ in range(rounds):
        for name, fn in candidates.items():
            tick = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            times[name].append((time.perf_counter() - tick) / calls[name])
    return dict(times)


def table(times: dict[str, list], flops: float | None, reference: str) -> str:
    head = "| candidate | median ms | best ms |" + (" GFLOP/s (best) |" if flops else "")
    head += f" ÷ {reference}, per round (time) |\n|---|---|---|" + ("---|" if flops else "") + "---|\n"
    rows = []
    for name, values in times.items():
        r = ratio(values, times[reference])
        row = f"| {name} | {statistics.median(values) * 1e3:.2f} | {min(values) * 1e3:.2f} |"
        if flops:
            row += f" {flops / min(values) / 1e9:.0f} |"
        rows.append(row + f" {r['median']:.2f} ({r['min']:.2f}–{r['max']:.2f}) |")
    return head + "\n".join(rows)


# -- the dots -------------------------------------------------------------------------------------


def autodiff_f32_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """jlora's projections before `narrow_dot`: float32 accumulation, cast back, and jax's
    own transposes for the backward pass (which contract the f32 cotangent with a bf16
    operand)."""
    import jax.numpy as jnp
    from jax import lax

    out = lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=jnp.float32)
    return out.astype(jnp.result_type(lhs, rhs))


def autodiff_f32_dot(lhs, rhs, dimension_numbers):
    """The tied head's logits before `jlora.models.layers.f32_dot`."""
    import jax.numpy as jnp
    from jax import lax

    return lax.dot_general(lhs, rhs, dimension_numbers, preferred_element_type=jnp.float32)


@contextlib.contextmanager
def autodiff_dots():
    """jlora's Llama as it was before `narrow_dot` (within this context, while tracing)."""
    from jlora.models import layers, llama

    saved = layers.f32_dot_general, llama.f32_dot
    layers.f32_dot_general, llama.f32_dot = autodiff_f32_dot_general, autodiff_f32_dot
    try:
        yield
    finally:
        layers.f32_dot_general, llama.f32_dot = saved


def matmuls(rounds: int) -> tuple[dict, str]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    torch.set_num_threads(CPUS)
    a32 = np.asarray(jax.random.normal(jax.random.key(0), (M, K)))
    b32 = np.asarray(jax.random.normal(jax.random.key(1), (K, N)))
    a, b = jnp.asarray(a32, jnp.bfloat16), jnp.asarray(b32, jnp.bfloat16)
    fa, fb = jnp.asarray(a32), jnp.asarray(b32)
    ta, tb = torch.from_numpy(a32.copy()), torch.from_numpy(b32.copy())
    ta16, tb16 = ta.bfloat16(), tb.bfloat16()
    bf16_out = jax.jit(lambda a, b: a @ b)
    f32_acc = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    f32 = jax.jit(lambda a, b: a @ b)
    candidates = {
        "torch bf16": lambda: ta16 @ tb16,
        "jax bf16 x bf16 -> bf16": lambda: jax.block_until_ready(bf16_out(a, b)),
        "jax bf16 x bf16 -> f32 -> bf16": lambda: jax.block_until_ready(f32_acc(a, b)),
        "jax f32": lambda: jax.block_until_ready(f32(fa, fb)),
        "torch f32": lambda: ta @ tb,
    }
    times = rounds_of(candidates, rounds)
    hlo = {
        "bf16 output": bf16_out.lower(a, b).compile().as_text(),
        "f32 accumulation": f32_acc.lower(a, b).compile().as_text(),
    }
    return times, hlo


def dense_layers(rounds: int, kernel_gradient: bool) -> tuple[dict, dict]:
    """A (8, 128, 576) -> 1536 Dense, forward and backward: x's gradient (a frozen kernel, as
    in a LoRA step), and with `kernel_gradient` the kernel's too (full fine-tuning)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from jax import lax

    from jlora.models.layers import f32_dot_general

    torch.set_num_threads(CPUS)
    x32 = np.asarray(jax.random.normal(jax.random.key(0), (BATCH, SEQ, K)))
    w32 = np.asarray(jax.random.normal(jax.random.key(1), (K, N))) * 0.02
    ct32 = np.asarray(jax.random.normal(jax.random.key(2), (BATCH, SEQ, N)))
    x, w, ct = jnp.asarray(x32, jnp.bfloat16), jnp.asarray(w32), jnp.asarray(ct32)
    dims = (((2,), (0,)), ((), ()))
    argnums = (0, 1) if kernel_gradient else 0

    def grads(dot):
        def loss(x, w):  # the kernel a float32 parameter cast to bf16, as Linen's promote_dtype does
            y = dot(x, w.astype(jnp.bfloat16), dims).astype(jnp.float32)
            return (y * y * ct).sum()  # not linear in y: the gradients need the forward product

        return jax.jit(jax.grad(loss, argnums=argnums))

    variants = {
        "jax bf16 dot (Linen's default)": grads(lambda x, w, d: lax.dot_general(x, w, d)),
        "jax f32 accumulation, autodiff (before)": grads(autodiff_f32_dot_general),
        "jax f32 accumulation, narrow_dot (after)": grads(f32_dot_general),
    }
    tx = torch.from_numpy(x32.copy()).bfloat16().requires_grad_()
    tw = torch.from_numpy(w32.T.copy()).requires_grad_(kernel_gradient)  # a Linear's (out, in) f32 weight
    tct = torch.from_numpy(ct32.copy())

    def torch_step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = torch.nn.functional.linear(tx, tw)
        y = y.float()
        (y * y * tct).sum().backward()
        tx.grad = tw.grad = None

    candidates = {"torch bf16 autocast": torch_step}
    candidates |= {name: (lambda fn=fn: jax.block_until_ready(fn(x, w))) for name, fn in variants.items()}
    times = rounds_of(candidates, rounds)
    hlo = {name: fn.lower(x, w).compile().as_text() for name, fn in variants.items()}
    return times, hlo


# -- the small Llama ------------------------------------------------------------------------------


def jlora_step(config, dtype: str, scan: bool = True, remat: bool = False):
    """(run one step, the compiled step): jlora's LoRA step (`jlora train`'s) over random weights."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jlora
    from jlora import train as training
    from jlora.models.llama import LlamaForCausalLM

    model = LlamaForCausalLM(config, scan=scan, dtype=jnp.dtype(dtype), remat=remat)
    shape = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"])
    lora = jlora.LoraConfig(r=RANK, alpha=2 * RANK, target_modules=list(TARGETS))
    params = jlora.init(params, lora, jax.random.key(0), specs=jlora.kernel_specs(model, shape))
    task = training.Task(model, lora, "causal", tail=SEQ)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, BATCH, SEQ), dtype=np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}
    adapters, base = jlora.split(params, lora)
    tx = training.make_optimizer(training.TrainConfig(steps=10_000), lora)
    state = [adapters, tx.init(adapters), base, batch, jnp.int32(0)]
    compiled = training.make_train_step(task, tx, jax.random.key(0)).lower(*state).compile()

    def run() -> None:
        state[:2] = jax.block_until_ready(compiled(*state)[:2])

    return run, compiled


def torch_step(config):
    """peft's LoRA step with bf16 autocast on transformers' Llama of `config` (`benchmarks.workers.torch_train`)."""
    from benchmarks.workers import torch_train
    from jlora.models.export import hf_config

    candidates, _ = torch_train({"dtype": "bfloat16", "hf_config": hf_config(config, "LlamaForCausalLM").to_dict()})
    return candidates["step"]


def profile_step(run: Callable[[], None], compiled, steps: int = 2) -> collections.Counter:
    """Milliseconds per step by kind of instruction (thunk durations summed; XLA:CPU runs
    independent thunks side by side, so the sum can exceed the step's wall time)."""
    import jax

    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(steps):
                run()
        path = glob.glob(f"{tmp}/**/perfetto_trace.json.gz", recursive=True)[0]
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    module = HloModule(compiled.as_text())
    out = collections.Counter()
    for e in events:
        inst = module.instructions.get(e.get("name")) if e.get("ph") == "X" else None
        if inst is not None and inst["op"] not in ("while", "call", "conditional"):
            out[module.kind(inst)] += e["dur"] / 1e3 / steps
    return out


# -- HLO ------------------------------------------------------------------------------------------

BYTES = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8, "s32": 4, "u32": 4, "s64": 8, "u64": 8, "s8": 1, "u8": 1, "pred": 1}
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = ")
COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{\s*$")


def _split_type(s: str) -> tuple[str, str]:
    if not s.startswith("("):
        return tuple(s.split(" ", 1))
    depth = 0
    for i, c in enumerate(s):
        depth += (c == "(") - (c == ")")
        if depth == 0:
            return s[: i + 1], s[i + 1 :].lstrip()
    raise ValueError(s)


def shape_of(t: str) -> tuple[str | None, tuple[int, ...]]:
    m = re.match(r"(\w+)\[([\d,]*)\]", t)
    return (m.group(1), tuple(int(d) for d in m.group(2).split(",") if d)) if m else (None, ())


class HloModule:
    """The instructions of an optimized HLO module's text (``compiled.as_text()``)."""

    def __init__(self, text: str):
        self.computations: dict[str, list[dict]] = {}
        self.instructions: dict[str, dict] = {}
        current = None
        for line in text.splitlines():
            m = INSTRUCTION.match(line)
            if m is None:
                header = COMPUTATION.match(line)
                if header:
                    current = self.computations.setdefault(header.group(1), [])
                continue
            type_, rest = _split_type(line[m.end() :])
            op = re.match(r"([\w\-]+)\(", rest).group(1)
            args, depth = rest[len(op) + 1 :], 1
            end = 0
            while depth:
                depth += (args[end] == "(") - (args[end] == ")")
                end += 1
            end -= 1
            attrs = args[end + 1 :]
            inst = {
                "name": m.group(1),
                "type": type_,
                "op": op,
                "args": args[:end],
                "operands": re.findall(r"%([\w.\-]+)", args[:end]),
                "attrs": attrs,
                "calls": re.findall(r"(?:calls|body|condition|to_apply)=%([\w.\-]+)", attrs),
            }
            self.instructions[inst["name"]] = inst
            current.append(inst)
        self.caller = {c: inst for inst in self.instructions.values() for c in inst["calls"]}
        for name, insts in self.computations.items():
            for inst in insts:
                inst["computation"] = name

    def times_run(self, computation: str) -> int:
        """How often a computation runs per call of the module (while bodies by their known trip counts)."""
        caller = self.caller.get(computation)
        if caller is None:
            return 1
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', caller["attrs"])
        body = re.search(r"body=%([\w.\-]+)", caller["attrs"])
        n = int(trips.group(1)) if trips and body and body.group(1) == computation else 1
        return n * self.times_run(caller["computation"])

    def source(self, name: str) -> dict:
        """The instruction an operand comes from, through a fused computation's parameters."""
        inst = self.instructions[name]
        caller = self.caller.get(inst["computation"])
        if inst["op"] == "parameter" and caller is not None and caller["op"] == "fusion":
            return self.source(caller["operands"][int(inst["args"])])
        return inst

    def is_convert(self, inst: dict) -> bool:
        """A convert, or a fusion of nothing but a convert (XLA:CPU's ``wrapped_convert``)."""
        if inst["op"] == "convert":
            return True
        if inst["op"] != "fusion" or "__ynn_fusion" in inst["attrs"]:
            return False
        ops = {i["op"] for i in self.computations[inst["calls"][0]]}
        return "convert" in ops and ops <= {"convert", "parameter", "bitcast", "copy", "transpose"}

    def converted_from(self, inst: dict) -> str | None:
        """The dtype a convert (or a convert's fusion) converts from; None for anything else."""
        if not self.is_convert(inst):
            return None
        if inst["op"] == "convert":
            return shape_of(self.instructions[inst["operands"][0]]["type"])[0]
        root = self.computations[inst["calls"][0]][-1]
        while root["op"] != "convert":  # a bitcast, copy or transpose of the convert
            root = self.instructions[root["operands"][0]]
        return shape_of(self.instructions[root["operands"][0]]["type"])[0]

    def where(self, inst: dict) -> str:
        caller = self.caller.get(inst["computation"])
        if caller is not None and caller["op"] == "fusion":
            return "ynn" if "__ynn_fusion" in caller["attrs"] else "loop fusion"
        return "eigen"

    def dot(self, inst: dict) -> dict:
        (ldt, lshape), (rdt, _) = (shape_of(self.instructions[o]["type"]) for o in inst["operands"][:2])
        odt, oshape = shape_of(inst["type"])
        contracted = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inst["attrs"]).group(1)
        k = math.prod(lshape[int(i)] for i in contracted.split(",") if i)
        return {
            "dtypes": f"{ldt} x {rdt} -> {odt}",
            "where": self.where(inst),
            "flops": 2 * math.prod(oshape) * k,
            "converted from": [self.converted_from(self.source(o)) for o in inst["operands"][:2]],
        }

    def kind(self, inst: dict) -> str:
        """A thunk's kind, for the time split: dots by dtypes, converts, other fusions."""
        if inst["op"] == "fusion":
            body = self.computations[inst["calls"][0]]
            dots = [i for i in body if i["op"] == "dot"]
            if dots:
                vocab = (
                    any("49152" in self.instructions[o]["type"] for o in inst["operands"]) or "49152" in inst["type"]
                )
                return f"dot {self.dot(dots[0])['dtypes']}" + (" (the vocabulary head)" if vocab else "")
            if self.is_convert(inst):
                return f"convert {self.converted_from(inst)} -> {shape_of(inst['type'])[0]}"
            ops = {i["op"] for i in body}
            if ops & {"exponential", "log", "reduce", "tanh", "logistic", "rsqrt"}:
                return "fusion: exp, log, logistic, reductions"
            if ops & {"dynamic-slice", "dynamic-update-slice", "scatter", "gather", "pad", "slice", "concatenate"}:
                return "fusion: slices, pads, scan stacking (dynamic-(update-)slice)"
            return "fusion: other element-wise"
        if inst["op"] == "dot":
            return f"dot {self.dot(inst)['dtypes']} (eigen)"
        return inst["op"]

    def counts(self) -> dict:
        dots = collections.defaultdict(lambda: {"n": 0, "GFLOP": 0.0, "converted from": collections.Counter()})
        converts = collections.defaultdict(lambda: {"n": 0, "MB": 0.0})
        fusions = collections.Counter()
        for inst in self.instructions.values():
            runs = self.times_run(inst["computation"])
            if inst["op"] == "dot":
                d = self.dot(inst)
                row = dots[(d["dtypes"], d["where"])]
                row["n"] += 1
                row["GFLOP"] += runs * d["flops"] / 1e9
                row["converted from"].update(t for t in d["converted from"] if t)
            elif inst["op"] == "convert":
                src, (dst, shape) = shape_of(self.instructions[inst["operands"][0]]["type"])[0], shape_of(inst["type"])
                row = converts[f"{src} -> {dst}"]
                row["n"] += 1
                row["MB"] += runs * BYTES.get(dst, 4) * math.prod(shape) / 1e6
            elif inst["op"] == "fusion":
                fusions[
                    "__ynn_fusion" if "__ynn_fusion" in inst["attrs"] else re.search(r"kind=(k\w+)", inst["attrs"])[1]
                ] += 1
        custom = collections.Counter(
            re.findall(r'custom_call_target="([^"]+)"', " ".join(i["attrs"] for i in self.instructions.values()))
        )
        return {"dots": dict(dots), "converts": dict(converts), "fusions": dict(fusions), "custom-calls": dict(custom)}

    def text_of(self, inst: dict) -> str:
        operands = ", ".join(self.instructions[o]["type"].split("{")[0] for o in inst["operands"])
        kind = re.search(r'"kind":"(\w+)"|kind=(k\w+)', inst["attrs"])
        kind = f" {kind.group(1) or kind.group(2)}" if kind and inst["op"] == "fusion" else ""
        dims = " ".join(re.findall(r"(?:lhs|rhs)_contracting_dims=\{[\d,]*\}", inst["attrs"]))
        return f"{inst['type'].split('{')[0]} {inst['op']}({operands}){kind}{' ' + dims if dims else ''}"

    def listing(self) -> list[str]:
        """Every instruction but parameters, bitcasts and constants: fused computations' first."""
        out = []
        for name, insts in self.computations.items():
            caller = self.caller.get(name)
            for inst in insts:
                if inst["op"] not in ("parameter", "bitcast", "constant", "tuple", "get-tuple-element"):
                    where = f"  in {caller['name']}: " if caller is not None else ""
                    out.append(f"{where}%{inst['name']} = {self.text_of(inst)}")
        return out

    def upcast_updates(self) -> tuple[int, float, list[str]]:
        """bf16 stacks updated through float32: dynamic-update-slice fusions that convert the
        whole bf16 buffer to f32, update it and convert it back (count, MB those converts
        write per call, the first one's fused computation)."""
        count, mb, example = 0, 0.0, []
        for inst in self.instructions.values():
            if inst["op"] != "fusion" or not inst["calls"] or "__ynn_fusion" in inst["attrs"]:
                continue
            body = self.computations[inst["calls"][0]]
            for dus in (i for i in body if i["op"] == "dynamic-update-slice"):
                buffer = self.instructions[dus["operands"][0]]
                if buffer["op"] == "convert" and self.converted_from(buffer) == "bf16":
                    shape = shape_of(buffer["type"])[1]
                    count += 1
                    mb += self.times_run(inst["computation"]) * (4 + 2) * math.prod(shape) / 1e6
                    if not example:
                        example = [f"%{inst['name']} = {self.text_of(inst)}"]
                        example += [f"  %{i['name']} = {self.text_of(i)}" for i in body if i["op"] != "constant"]
        return count, mb, example


# -- the report -----------------------------------------------------------------------------------


def hlo_tables(title: str, text: str, listing: bool = False) -> str:
    """Dots, converts and fusions of an optimized HLO module; with `listing`, its instructions."""
    module = HloModule(text)
    c = module.counts()
    out = [
        f"**{title}**\n",
        "| dot: operands -> output | runs in | dots | GFLOP per call | operands that are converts |",
    ]
    out.append("|---|---|---|---|---|")
    for (dtypes, where), row in sorted(c["dots"].items()):
        converted = ", ".join(f"{n} from {t}" for t, n in sorted(row["converted from"].items())) or "none"
        out.append(f"| {dtypes} | {where} | {row['n']} | {row['GFLOP']:.2f} | {converted} |")
    out += ["", "| convert | instructions | MB written per call |", "|---|---|---|"]
    for direction, row in sorted(c["converts"].items()):
        out.append(f"| {direction} | {row['n']} | {row['MB']:.1f} |")
    fusions = ", ".join(f"{k} {v}" for k, v in sorted(c["fusions"].items()))
    custom = ", ".join(f"{k} {v}" for k, v in sorted(c["custom-calls"].items())) or "none"
    out.append(f"\nFusions: {fusions}. Custom calls: {custom}.")
    count, mb, example = module.upcast_updates()
    if count:
        out.append(
            f"\nbf16 stacks updated through float32 (a dynamic-update-slice fusion converting the whole"
            f" buffer to f32 and back): {count} fusions, {mb:.0f} MB of converts per call. The first:\n"
        )
        out += ["```", *example, "```"]
    if listing:
        out += ["", "```", *module.listing(), "```"]
    return "\n".join(out) + "\n"


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="rounds per section (default 5)")
    parser.add_argument("--layers", type=int, default=4, help="layers of the small Llama (default 4)")
    parser.add_argument("--sections", default="matmul,dense,step", help="of matmul, dense, step (comma-separated)")
    parser.add_argument("--profile", action="store_true", help="split the small step's time by instruction kind")
    parser.add_argument("--versus", action="store_true", help="time only jlora's bf16 step (after) and peft's")
    parser.add_argument("--layouts", action="store_true", help="also jlora's bf16 step with remat=True and unrolled")
    parser.add_argument("--full", type=int, default=0, metavar="ROUNDS", help="also the 30-layer benchmark's sides")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    began = time.perf_counter()
    out = [
        "# bfloat16 on XLA:CPU (`python -m benchmarks.bf16`)\n",
        f"Commit {commit()}; "
        + ", ".join(f"{k} {v}" for k, v in machine().items())
        + f"; {CPUS} CPUs to run on (torch threads and XLA's pool); at the start, {load()}.\n",
    ]
    if "matmul" in sections:
        times, hlo = matmuls(args.rounds)
        out.append(f"## 1. One matmul ({M}, {K}) x ({K}, {N}), {args.rounds} rounds ({load()})\n")
        out.append(table(times, 2 * M * K * N, "torch bf16") + "\n")
        for name, text in hlo.items():
            out.append(hlo_tables(f"jax, {name}", text, listing=True))
    if "dense" in sections:
        for kernel_gradient in (False, True):
            times, hlo = dense_layers(args.rounds, kernel_gradient)
            which = "x's and the kernel's gradients" if kernel_gradient else "x's gradient (a frozen kernel)"
            out.append(f"## 2. A Dense layer ({BATCH}, {SEQ}, {K}) -> {N}, forward and {which}, {args.rounds} rounds")
            out.append(f"({load()})\n")
            out.append(table(times, (3 if kernel_gradient else 2) * 2 * M * K * N, "torch bf16 autocast") + "\n")
            for name, text in hlo.items():
                out.append(hlo_tables(name, text, listing=True))
    if "step" in sections:
        out += small_steps(args.layers, args.rounds, args.profile, not args.versus, args.layouts)
    if args.full:
        out += full_steps(args.full)
    out.append(f"Wall time {time.perf_counter() - began:.0f} s; at the end, {load()}.")
    print("\n".join(out))


def small_steps(layers: int, rounds: int, profile: bool, compare: bool, layouts: bool) -> list[str]:
    """Sections 3 and 4; without `compare`, only jlora's bf16 step (after) and peft's; with
    `layouts`, jlora's bf16 step with `remat` and unrolled too."""
    import torch

    config = smollm2_config(layers)  # SmolLM2-135M's widths and vocabulary, fewer layers
    steps = {"after": jlora_step(config, "bfloat16")}
    if compare:
        with autodiff_dots():
            steps["before"] = jlora_step(config, "bfloat16")
        steps["float32"] = jlora_step(config, "float32")
    if layouts:
        steps["remat"] = jlora_step(config, "bfloat16", remat=True)
        steps["unrolled"] = jlora_step(config, "bfloat16", scan=False)
    peft = torch_step(config)
    torch.set_num_threads(CPUS)
    title = f"{layers} layers of SmolLM2-135M, its 49,152-word tied head, batch {BATCH} x {SEQ}, r = {RANK}"
    out = [f"## 3. HLO of jlora's bf16 LoRA train step ({title})\n"]
    for name, label in (("before", "f32 accumulation under jax's autodiff (before)"), ("after", "narrow_dot (after)")):
        if name in steps:
            compiled = steps[name][1]
            out.append(hlo_tables(label, compiled.as_text()))
            temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
            out.append(f"XLA's temporary buffers: {temp:.0f} MiB.\n")
    labels = {
        "before": "jlora bf16, autodiff dots (before)",
        "after": "jlora bf16, narrow_dot (after)",
        "float32": "jlora float32",
        "remat": "jlora bf16, narrow_dot, remat=True",
        "unrolled": "jlora bf16, narrow_dot, unrolled (scan=False)",
    }
    peft_name = "peft + torch, bf16 autocast"
    candidates = {peft_name: peft} | {labels[name]: run for name, (run, _) in steps.items()}
    times = rounds_of(candidates, rounds, seconds=0.0)
    out.append(f"## 4. That step, {rounds} rounds ({load()})\n")
    out.append(table(times, None, peft_name))
    for name in ("before", "after", "remat", "unrolled"):
        if name in steps:
            r = ratio(times[peft_name], times[labels[name]])
            out.append(
                f"\n{labels[name]} tokens/s ÷ peft + torch bf16's, per round: "
                f"{r['median']:.2f} ({r['min']:.2f}–{r['max']:.2f})."
            )
    if compare:
        r = ratio(times[labels["before"]], times[labels["after"]])
        out.append(
            f"\njlora bf16 before ÷ after, step time per round: {r['median']:.2f} ({r['min']:.2f}–{r['max']:.2f})."
        )
    out.append("")
    if profile:
        order = ("before", "after", "remat", "unrolled")
        split = {name: profile_step(*steps[name]) for name in order if name in steps}
        kinds = sorted({k for s in split.values() for k in s}, key=lambda k: -max(s.get(k, 0) for s in split.values()))
        out.append(f"### Where the step's time goes (thunk ms per step, profiled; {load()})\n")
        out.append("| instruction kind | " + " | ".join(split) + " |\n|---|" + "---|" * len(split))
        for k in kinds:
            out.append(f"| {k} | " + " | ".join(f"{s.get(k, 0):.1f}" for s in split.values()) + " |")
        out.append("| all thunks | " + " | ".join(f"{sum(s.values()):.1f}" for s in split.values()) + " |\n")
    return out


def full_steps(rounds: int) -> list[str]:
    """`benchmarks.run`'s bf16 sides (its workers, one process each, unpinned)."""
    from benchmarks.run import architecture, jlora_spec, measure

    _, hf = architecture()
    specs = {
        "jlora-lora-bf16": jlora_spec("lora", "bfloat16"),
        "peft-lora-bf16": {"side": "torch", "dtype": "bfloat16", "hf_config": hf},
    }
    full, _ = measure(specs, [(name, "step") for name in specs], rounds, lambda line: None)
    r = ratio(full["peft-lora-bf16:step"], full["jlora-lora-bf16:step"])
    out = [f"## 5. The benchmark's bf16 sides (SmolLM2-135M, 30 layers), {rounds} rounds ({load()})\n"]
    out += [f"- {name}: median {statistics.median(v):.2f} s, best {min(v):.2f} s" for name, v in full.items()]
    out.append(f"\njlora tokens/s ÷ peft + torch's, per round: {r['median']:.2f} ({r['min']:.2f}–{r['max']:.2f}).\n")
    return out


if __name__ == "__main__":
    main()
