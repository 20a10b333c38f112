"""LoRA training throughput, MFU and peak device memory on an accelerator.

    python -m benchmarks.gpu             # a CUDA (or TPU) machine: results/gpu.{md,json}, within ~8 minutes
    python -m benchmarks.gpu --dry-run   # tiny shapes, 2 steps, any backend: results/gpu-dry-run.{md,json}

Each case runs in its own process (so peak device memory is its own): jlora's train step
(`jlora.train.make_train_step`: adapters-only gradient, AdamW after clipping) on a scanned
Linen Llama with random weights, a bfloat16 base and compute, float32 adapters and optimizer
state (what `jlora train --dtype bfloat16` keeps), r = 16 on the seven
projections, a causal-LM loss over every position; with and without `remat`, for the
SmolLM2-135M shape and a Llama-3.2-1B shape. Per case: compile time, median step time of
the timed steps, tokens/s, MFU against the bf16 matmul peak measured in the same process
(an 8192² matmul with float32 accumulation) and against the device's nominal peak when
known, and peak device memory (``memory_stats()["peak_bytes_in_use"]``). Needs jax, flax,
optax and jlora only: no datasets, gguf, transformers or torch on this path. Chunked
cross-entropy (issue 21) is not built yet: the logits of every position exist at once.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

RESULTS = pathlib.Path(__file__).parent / "results"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK = 16
FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads")
# name: (the LlamaConfig FIELDS, batch, sequence)
SHAPES = {
    "smollm2-135m": ((49_152, 576, 1536, 30, 9, 3), 16, 1024),
    "llama-1b": ((128_256, 2048, 8192, 16, 32, 8), 8, 1024),  # Llama-3.2-1B
}
DRY_RUN = {"tiny": ((256, 64, 96, 2, 4, 2), 2, 32)}
NOMINAL_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "TPU v5 lite": 197e12, "TPU v4": 275e12}


def _case(name: str, shape: tuple, remat: bool, steps: int, dry_run: bool) -> dict:
    """One case, measured in this process."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jlora
    from benchmarks.flops import lora_step_flops
    from jlora import train as training
    from jlora.models.llama import LlamaConfig, LlamaForCausalLM

    sizes, batch_size, seq = shape
    fields = dict(zip(FIELDS, sizes, strict=True))
    config = LlamaConfig(**fields, head_dim=fields["hidden_size"] // fields["num_heads"], tie_word_embeddings=True)
    model = LlamaForCausalLM(config, scan=True, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, remat=remat)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, batch_size, seq), dtype=np.int32)
    tick = time.perf_counter()
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), ids[0, :1, :8])["params"])
    lora = jlora.LoraConfig(r=RANK, alpha=2 * RANK, target_modules=list(TARGETS))  # float32 adapters
    params = jlora.init(params, lora, jax.random.key(1), specs=jlora.kernel_specs(model, ids[0, :1, :8]))
    adapters, base = jlora.split(params, lora)
    task = training.Task(model, lora, "causal", tail=seq)
    tx = training.make_optimizer(training.TrainConfig(steps=10_000), lora)
    step = training.make_train_step(task, tx, jax.random.key(2))
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}
    state = [adapters, tx.init(adapters)]
    built = time.perf_counter() - tick
    tick = time.perf_counter()
    compiled = step.lower(*state, base, batch, jnp.int32(0)).compile()
    compile_s = time.perf_counter() - tick
    times = []
    for i in range(steps + 1):  # the first run is a warmup
        tick = time.perf_counter()
        adapters, opt_state, metrics = compiled(*state, base, batch, jnp.int32(i))
        jax.block_until_ready(metrics)
        state = [adapters, opt_state]
        times.append(time.perf_counter() - tick)
    step_s = statistics.median(times[1:])
    peak = _matmul_peak(64 if dry_run else 8192)
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    flops = lora_step_flops(config, batch_size, seq, RANK, TARGETS)
    nominal = next((v for k, v in NOMINAL_BF16.items() if k.lower() in device.device_kind.lower()), None)
    return {
        "case": name,
        "remat": remat,
        "device": device.device_kind,
        "batch": batch_size,
        "seq": seq,
        "build_s": built,
        "compile_s": compile_s,
        "step_s": step_s,
        "tokens_per_s": batch_size * seq / step_s,
        "mfu_measured_peak": flops / step_s / peak,
        "mfu_nominal_peak": flops / step_s / nominal if nominal else None,
        "matmul_peak_flops": peak,
        "peak_bytes": stats.get("peak_bytes_in_use"),
        "loss": float(metrics["loss"]),
    }


def _matmul_peak(n: int) -> float:
    """FLOP/s of an n² bf16 matmul with float32 accumulation, best of 5."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.bfloat16)
    mm = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32))
    mm(a).block_until_ready()
    best = float("inf")
    for _ in range(5):
        tick = time.perf_counter()
        mm(a).block_until_ready()
        best = min(best, time.perf_counter() - tick)
    return 2 * n**3 / best


def markdown(rows: list[dict], dry_run: bool) -> str:
    gib = lambda b: f"{b / 2**30:.2f} GiB" if b else "n/a"
    pct = lambda x: f"{x:.1%}" if x is not None else "n/a"
    device = rows[0]["device"] if rows else "?"
    lines = [
        f"# LoRA train step on {device}{' (dry run: tiny shapes)' if dry_run else ''}",
        "",
        f"bf16 base and compute, float32 adapters, r = {RANK} on the 7 projections, random weights, scanned layers.",
        "",
        "| case | remat | batch × seq | compile s | step s | tokens/s | MFU (measured) | MFU (nominal) | peak memory |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {'yes' if r['remat'] else 'no'} | {r['batch']} × {r['seq']} | {r['compile_s']:.1f} | "
            f"{r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {pct(r['mfu_measured_peak'])} | "
            f"{pct(r['mfu_nominal_peak'])} | {gib(r['peak_bytes'])} |"
        )
    if rows:
        lines += ["", f"Measured bf16 matmul peak: {rows[0]['matmul_peak_flops'] / 1e12:.1f} TFLOP/s."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, 2 steps: check the script on any backend")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case (default 10)")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="results folder (default benchmarks/results)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a case in this process: NAME:REMAT, JSON on stdout
    args = parser.parse_args()
    shapes = DRY_RUN if args.dry_run else SHAPES
    steps = 2 if args.dry_run else args.steps
    if args.one:
        name, remat = args.one.split(":")
        print(json.dumps(_case(name, shapes[name], remat == "1", steps, args.dry_run)), flush=True)
        return
    rows = []
    for name in shapes:
        for remat in (False, True):
            command = [sys.executable, "-m", "benchmarks.gpu", "--one", f"{name}:{int(remat)}", "--steps", str(steps)]
            command += ["--dry-run"] * args.dry_run
            print(f"{name}, remat {remat}", flush=True)
            done = subprocess.run(command, capture_output=True, text=True, env=os.environ)
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
                rows.append({"case": name, "remat": remat, "error": done.stderr.strip().splitlines()[-1:]})
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"  {rows[-1]['tokens_per_s']:,.0f} tokens/s, step {rows[-1]['step_s']:.3f} s", flush=True)
    measured = [r for r in rows if "error" not in r]
    stem = "gpu-dry-run" if args.dry_run else "gpu"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(rows, indent=2))
    text = markdown(measured, args.dry_run)
    text += "".join(f"\n{r['case']} (remat {r['remat']}) failed: {r['error']}\n" for r in rows if "error" in r)
    (args.out / f"{stem}.md").write_text(text)
    print(text)
    if len(measured) < len(rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
