"""jlora's benchmark suite: every figure a ratio of two sides measured in the same run.

    python -m benchmarks.run [--quick]

Each side runs in its own worker process (`benchmarks.workers`); the sides of a figure are
alive together and run one at a time, round-robin (A B A B …), so slow and fast moments of
this shared machine hit both. Every ratio is per round, reported as the median with its
min–max. Writes benchmarks/results/latest.{md,json,png}. The shapes: the SmolLM2-135M
architecture (the real preset's weights for jlora; the same config as a transformers
LlamaForCausalLM for peft), batch 8 × 128 tokens, LoRA r=8 on all seven projections.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

from benchmarks.common import BATCH, PRESET, RANK, SEQ, TARGETS, commit, machine, ratio
from benchmarks.flops import lora_step_flops

ROOT = pathlib.Path(__file__).parent.parent
RESULTS = pathlib.Path(__file__).parent / "results"
MATMUL_N = 4096  # benchmarks.workers.matmul_candidates


class Worker:
    """A `benchmarks.workers` process: started, asked to run candidates, closed."""

    def __init__(self, name: str, spec: dict):
        self.name = name
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.workers", json.dumps(spec)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.ready = self._answer()["ready"]
        self.closing: dict = {}  # peak_rss_bytes, high_water_rss_bytes

    def _answer(self) -> dict:
        for line in self.process.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"worker {self.name} ended (exit code {self.process.wait()}); its stderr says why")

    def run(self, candidate: str) -> float:
        self.process.stdin.write(candidate + "\n")
        self.process.stdin.flush()
        return self._answer()["seconds"]

    def close(self) -> None:
        self.process.stdin.write("exit\n")
        self.process.stdin.flush()
        self.closing = self._answer()
        self.process.wait()


def measure(specs: dict[str, dict], plan: list[tuple[str, str]], repeats: int, log) -> tuple[dict, dict]:
    """Start the workers of `specs` one after another, run `plan` ((worker, candidate) pairs)
    `repeats` rounds, close them. Returns (seconds per "worker:candidate", worker info). A
    worker whose side could not be built (ready holds an "error") is left out of the rounds."""
    workers = {}
    try:
        for name, spec in specs.items():
            log(f"  starting {name}")
            workers[name] = Worker(name, spec)
        times = defaultdict(list)
        plan = [(name, candidate) for name, candidate in plan if "error" not in workers[name].ready]
        for i in range(repeats):
            for name, candidate in plan:
                times[f"{name}:{candidate}"].append(workers[name].run(candidate))
            log(f"  round {i + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
        for worker in workers.values():
            worker.close()
    finally:
        for worker in workers.values():
            worker.process.kill()
    info = {name: {**w.ready, "peak_rss_bytes": None, **w.closing} for name, w in workers.items()}
    return dict(times), info


def jlora_spec(mode: str, dtype: str = "float32", **extra) -> dict:
    return {"side": "jlora", "mode": mode, "dtype": dtype, "scan": True, **extra}


def architecture() -> tuple:
    """The preset's `LlamaConfig` (for the FLOP count) and the same as a transformers
    LlamaConfig dict (for the torch side, which then needs no JAX)."""
    import gguf

    from jlora.models import locate
    from jlora.models.export import hf_config
    from jlora.models.loading import gguf_config

    config = gguf_config(gguf.GGUFReader(str(locate(PRESET))))
    return config, hf_config(config, "LlamaForCausalLM").to_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (about 10 minutes on 2 cores)")
    parser.add_argument("--repeats", type=int, help="rounds per figure (default 3 with --quick, else 10)")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 10)
    began = time.perf_counter()
    log = lambda text: print(f"[{time.perf_counter() - began:6.0f}s] {text}", flush=True)
    config, hf = architecture()
    torch_spec = lambda dtype: {"side": "torch", "dtype": dtype, "hf_config": hf}
    times, info = {}, {}

    def group(title, specs, plan, rounds=repeats):
        log(title)
        t, i = measure(specs, plan, rounds, log)
        times.update(t)
        info.update(i)

    group(
        "float32 training: jlora LoRA, jlora full fine-tuning, peft LoRA; matmul peak",
        {
            "jlora-lora": jlora_spec("lora", matmul_peak=True),
            "jlora-full": jlora_spec("full"),
            "peft-lora": torch_spec("float32"),
        },
        [("jlora-lora", "step"), ("jlora-full", "step"), ("peft-lora", "step"), ("jlora-lora", "matmul_f32")],
    )
    group(
        "bfloat16 training: jlora LoRA (bf16 compute, f32 accumulation) vs peft LoRA (autocast bf16)",
        {"jlora-lora-bf16": jlora_spec("lora", "bfloat16", matmul_peak=True), "peft-lora-bf16": torch_spec("bfloat16")},
        [("jlora-lora-bf16", "step"), ("peft-lora-bf16", "step"), ("jlora-lora-bf16", "matmul_bf16")],
    )
    peer = lambda impl: {"side": "peer", "model": "linen", "impl": impl, "layers": config.num_layers}
    group(
        "jlora beside qwix: the same LoRA step on the same Linen model (random weights, `benchmarks.peers`)",
        {"jlora-peer": peer("jlora"), "qwix-lora": peer("qwix")},
        [("jlora-peer", "step"), ("qwix-lora", "step")],
    )
    group(
        "the optax-only freezing path (whole tree differentiated) vs jlora's adapters-only step",
        {
            "jlora-lora-2": jlora_spec("lora"),
            "optax": jlora_spec("optax"),
            "optax-clip": jlora_spec("optax-clip-outside"),
        },
        [("jlora-lora-2", "step"), ("optax", "step"), ("optax-clip", "step")],
    )
    group(
        "memory with rematerialisation: jlora LoRA vs full fine-tuning, remat=True",
        {"jlora-lora-remat": jlora_spec("lora", remat=True), "jlora-full-remat": jlora_spec("full", remat=True)},
        [("jlora-lora-remat", "step"), ("jlora-full-remat", "step")],
    )
    group(
        "inference: base, merged, factored; adapter bytes",
        {"infer": {"side": "jlora-infer"}},
        [("infer", "base"), ("infer", "merged"), ("infer", "factored")],
        rounds=repeats if args.quick else 2 * repeats,
    )
    group(
        "many adapters: a mixed batch over 4 adapters vs the base alone and vs 4 separate batches",
        {"multi": {"side": "jlora-multi"}},
        [("multi", "base"), ("multi", "mixed"), ("multi", "separate")],
        rounds=repeats if args.quick else 2 * repeats,
    )
    group("compile time, unrolled layers", {"jlora-unrolled": jlora_spec("lora", scan=False, compile_only=True)}, [], 0)
    with tempfile.TemporaryDirectory() as caches:  # the second process finds what the first left
        cold, warm = (jlora_spec("lora", compile_only=True, cache_dir=caches) for _ in range(2))
        group("time to first step, jlora's caches empty then filled", {"first-cold": cold, "first-warm": warm}, [], 0)

    figures = assemble(times, info, config)
    results = {
        "commit": commit(),
        "machine": machine(),
        "args": {"quick": args.quick, "repeats": repeats},
        "shapes": {"preset": PRESET, "batch": BATCH, "seq": SEQ, "rank": RANK, "targets": list(TARGETS)},
        "figures": figures,
        "seconds": times,
        "workers": info,
        "wall_s": time.perf_counter() - began,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=1))
    report = markdown(results)
    (RESULTS / "latest.md").write_text(report)
    plot(figures, RESULTS / "latest.png")
    print(report)


def assemble(times: dict, info: dict, config) -> list[dict]:
    """The figures, each {number, name, median, min, max, target, met, note}."""
    figures = []

    def add(number, name, value, target=None, met=None, note=""):
        value = value if isinstance(value, dict) else {"median": value, "min": value, "max": value, "n": 1}
        figures.append({"number": number, "name": name, **value, "target": target, "met": met, "note": note})

    def per_round(a, b):
        return ratio(times[a], times[b])

    def within(value, low, high):
        return low <= value["median"] <= high

    r = per_round("jlora-lora:step", "jlora-full:step")
    add(1, "train step: jlora LoRA ÷ jlora full fine-tuning (float32)", r, "≤ 0.70", r["median"] <= 0.70)
    for dtype, jl, pt in (("float32", "jlora-lora", "peft-lora"), ("bfloat16", "jlora-lora-bf16", "peft-lora-bf16")):
        r = per_round(f"{pt}:step", f"{jl}:step")  # tokens/s ratio = inverse time ratio
        add(2, f"train throughput: jlora LoRA ÷ peft + torch LoRA, tokens/s ({dtype})", r, "≥ 1.0", r["median"] >= 1.0)
    r = per_round("jlora-peer:step", "qwix-lora:step")
    add(2, "train step: jlora LoRA ÷ qwix LoRA, same Linen model (float32)", r, "≤ 0.8", r["median"] <= 0.8)
    r = per_round("infer:merged", "infer:base")
    add(3, "inference: merged ÷ base forward", r, "1.00 ± 0.03", within(r, 0.97, 1.03))
    r = per_round("infer:factored", "infer:base")
    add(3, "inference: factored ÷ base forward", r, "≤ 1.10", r["median"] <= 1.10)
    rss = {name: w["peak_rss_bytes"] for name, w in info.items()}
    value = rss["jlora-lora"] / rss["jlora-full"]
    add(4, "peak RSS: jlora LoRA ÷ jlora full fine-tuning", value, "≤ 0.5", value <= 0.5)
    value = rss["jlora-lora-remat"] / rss["jlora-full-remat"]
    add(4, "peak RSS: jlora LoRA ÷ jlora full fine-tuning, both remat=True", value, "≤ 0.5", value <= 0.5)
    add(4, "peak RSS: jlora LoRA ÷ peft + torch LoRA (float32)", rss["jlora-lora"] / rss["peft-lora"])
    disk = info["infer"]
    add(5, "adapter bytes on disk (Orbax) ÷ base bytes (float32)", disk["adapter_orbax_bytes"] / disk["base_bytes"])
    add(5, "adapter bytes on disk (PEFT safetensors) ÷ base bytes", disk["adapter_peft_bytes"] / disk["base_bytes"])
    flops = lora_step_flops(config, BATCH, SEQ, RANK, TARGETS)
    matmul = 2 * MATMUL_N**3
    for dtype, worker, peak in (
        ("float32", "jlora-lora", "matmul_f32"),
        ("bfloat16", "jlora-lora-bf16", "matmul_bf16"),
    ):
        r = per_round(f"{worker}:{peak}", f"{worker}:step")
        r = {k: v * flops / matmul if k != "n" else v for k, v in r.items()}  # (flops/t_step) ÷ (matmul/t_matmul)
        peak_gflops = matmul / min(times[f"{worker}:{peak}"]) / 1e9
        note = f"{flops / 1e9:.0f} GFLOP per step; matmul peak {peak_gflops:.0f} GFLOP/s"
        add(6, f"MFU of the jlora LoRA step ({dtype}) ÷ measured matmul peak", r, "≥ 0.40", r["median"] >= 0.40, note)
    lora = info["jlora-lora"]
    first = lora["load_s"] + lora["compile_s"] + lora["first_step_s"]
    note = f"load {lora['load_s']:.1f} s + compile {lora['compile_s']:.1f} s + first step {lora['first_step_s']:.1f} s"
    add(7, "time to first step, seconds (load + compile + step; scanned)", first, note=note)
    for side, caches in (("first-cold", "empty"), ("first-warm", "filled")):
        ready = info[side]
        note = f"load {ready['load_s']:.1f} s + compile {ready['compile_s']:.1f} s + step {ready['first_step_s']:.1f} s"
        value = ready["since_start_s"]
        add(7, f"time to first step from process start, jlora's caches {caches}, s", value, "≤ 12", value <= 12, note)
    unrolled = info["jlora-unrolled"]["compile_s"]
    add(
        7,
        "compile time: unrolled ÷ scanned (30 layers)",
        unrolled / lora["compile_s"],
        note=f"{unrolled:.1f} s unrolled",
    )
    for name, label in (
        ("optax", "clipping inside multi_transform"),
        ("optax-clip", "clipping the whole gradient tree"),
    ):
        r = per_round(f"{name}:step", "jlora-lora-2:step")
        add(8, f"optax-only freezing ({label}) ÷ jlora adapters-only step", r)
    for other, label in (("base", "one base-only batch"), ("separate", "4 single-adapter batches")):
        add(9, f"mixed batch of 8 over 4 adapters ÷ {label}", per_round("multi:mixed", f"multi:{other}"))
    return figures


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# Benchmarks: latest results",
        "",
        f"`python -m benchmarks.run{' --quick' if results['args']['quick'] else ''}` at commit "
        f"`{results['commit'][:12]}`, {results['args']['repeats']} rounds, {results['wall_s'] / 60:.1f} minutes.",
        f"Machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}, jax {m['jax']}, flax {m['flax']}, "
        f"optax {m['optax']}, torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}.",
        f"Shapes: {PRESET} architecture, batch {BATCH} × {SEQ} tokens, LoRA r={RANK} on {', '.join(TARGETS)}.",
        "Ratios are per round (the two sides measured back to back), median and min–max over the rounds.",
        "",
        "| # | figure | ratio | min–max | target | met | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in results["figures"]:
        spread = f"{f['min']:.3f}–{f['max']:.3f}" if f["n"] > 1 else ""
        met = "" if f["met"] is None else ("yes" if f["met"] else "**no**")
        target = f["target"] or ""
        lines.append(f"| {f['number']} | {f['name']} | {f['median']:.3f} | {spread} | {target} | {met} | {f['note']} |")
    medians = {k: statistics.median(v) for k, v in results["seconds"].items()}
    lines += ["", "Median seconds per call: " + ", ".join(f"{k} {v:.3f}" for k, v in medians.items())]
    rss = {k: w["peak_rss_bytes"] / 2**30 for k, w in results["workers"].items() if w.get("peak_rss_bytes")}
    lines += ["", "Peak RSS per worker (GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in rss.items()), ""]
    return "\n".join(lines)


def plot(figures: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [f for f in figures if f["number"] != 7]  # seconds, not ratios
    fig, ax = plt.subplots(figsize=(9, 0.38 * len(shown) + 1))
    colors = ["tab:green" if f["met"] else "tab:red" if f["met"] is False else "tab:gray" for f in shown]
    y = range(len(shown))
    ax.barh(y, [f["median"] for f in shown], color=colors)
    ax.errorbar(
        [f["median"] for f in shown],
        y,
        xerr=[[f["median"] - f["min"] for f in shown], [f["max"] - f["median"] for f in shown]],
        fmt="none",
        color="black",
        lw=0.8,
    )
    ax.set_yticks(list(y), [f"{f['number']}. {f['name']}" for f in shown], fontsize=7)
    ax.axvline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("ratio (green: target met, red: missed, gray: no target)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
