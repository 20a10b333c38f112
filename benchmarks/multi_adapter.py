"""Serving several adapters from one base: a mixed batch against the alternatives.

On the SmolLM2-135M architecture (the real preset), LoRA r=8 on all seven projections,
four adapters, 8 prompts × 128 tokens (a forward pass, as in prefill), timed side by side
in one run, interleaved round-robin, median (min–max) of `--repeats`:

  base      one batch of 8 on the base model alone
  mixed     one batch of 8, example i with adapter i % 4 (`jlora.multi.apply`)
  separate  the same 8 as four single-adapter batches of 2 (`jlora.apply`, one compile)

Writes benchmarks/results/multi_adapter.{md,json}.

    python benchmarks/multi_adapter.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import platform
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp

import jlora
import jlora.models
from jlora import multi

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RESULTS = pathlib.Path(__file__).parent / "results"


def adapters_for(pretrained, n: int, r: int) -> list[tuple[dict, jlora.LoraConfig]]:
    config = jlora.LoraConfig(r=r, alpha=2 * r, target_modules=TARGETS)
    out = []
    for i in range(n):
        params = jlora.init(pretrained.params, config, jax.random.key(i), specs=pretrained.kernel_specs())
        adapters, base = jlora.split(params, config)
        adapters = jax.tree.map(lambda x, i=i: x + 0.01 * jax.random.normal(jax.random.key(100 + i), x.shape), adapters)
        out.append((jlora.join(adapters, base), config))
    return out


def commit() -> str:
    """The code's git commit, with "+changes" when the tree differs from it."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    return head + ("+changes" if dirty.stdout.strip() else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    pretrained = jlora.models.load("smollm2-135m-instruct", tokenizer=False)
    model, base = pretrained.model, pretrained.params
    adapters = adapters_for(pretrained, 4, 8)
    stacked = multi.stack(adapters)
    tokens = jax.random.randint(jax.random.key(0), (8, args.seq), 1, 1000)
    ids = jnp.arange(8, dtype=jnp.int32) % 4

    base_forward = jax.jit(lambda p, t: model.apply({"params": p}, t))
    mixed_forward = jax.jit(functools.partial(multi.apply, model))
    single_forward = jax.jit(lambda p, t: jlora.apply(model, p, adapters[0][1], t))
    joined = [params for params, _ in adapters]
    groups = [tokens[ids == k] for k in range(4)]
    candidates = {
        "base": lambda: base_forward(base, tokens),
        "mixed": lambda: mixed_forward(base, stacked, ids, tokens),
        "separate": lambda: [single_forward(p, g) for p, g in zip(joined, groups, strict=True)],
    }
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for fn in candidates.values():  # compile and warm up
        jax.block_until_ready(fn())
    for _ in range(args.repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    ratios = {
        "mixed ÷ base": [m / b for m, b in zip(times["mixed"], times["base"], strict=True)],
        "mixed ÷ separate": [m / s for m, s in zip(times["mixed"], times["separate"], strict=True)],
    }
    cpu = platform.processor() or platform.machine()
    machine = f"{cpu}, {os.cpu_count()} cores, {jax.device_count()} {jax.devices()[0].platform} device(s)"
    lines = [
        f"Mixed batch of 8 over 4 adapters (SmolLM2-135M, r=8 on 7 projections, 8 × {args.seq} tokens, forward), "
        f"{machine}, jax {jax.__version__}; per-repeat ratios, median (min–max) of {args.repeats}, interleaved.",
        "",
        "| figure | ratio | min–max |",
        "|---|---|---|",
        *(f"| {k} | {statistics.median(v):.2f} | {min(v):.2f}–{max(v):.2f} |" for k, v in ratios.items()),
        "",
        "Median seconds: " + ", ".join(f"{k} {v:.3f}" for k, v in median.items()),
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "multi_adapter.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "multi_adapter.json").write_text(
        json.dumps(
            {"commit": commit(), "machine": machine, "jax": jax.__version__, "seconds": times, "ratios": ratios},
            indent=1,
        )
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
