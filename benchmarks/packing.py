"""The default run's training step with and without packing, side by side.

    python -m benchmarks.packing [--rounds 20]

Two `benchmarks.workers` processes, run alternately: the default `jlora train` run
(SmolLM2-135M-Instruct, Rotten Tomatoes completions, r = 8 on q, k, v, o, batch 8,
seq_len 64, float32), one with its rows packed (several reviews a row, segment ids), one
unpacked (one review a row, padded). Each step trains the run's own batches in order. The
figure that matters is real (non-padding) tokens per second: a packed step scores every
position, so it is slower, but it carries more reviews. Writes benchmarks/results/packing.md.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

from benchmarks.common import commit, machine, ratio

RESULTS = pathlib.Path(__file__).parent / "results"


def packing_train(spec: dict):
    """The default run's train step over its own batches, packed or not (a worker side)."""
    import jax
    import jax.numpy as jnp

    import jlora
    from jlora import data
    from jlora import train as training
    from jlora.finetune import Run, prepare

    start = time.perf_counter()
    run, pretrained, params, train, _ = prepare(Run(data={"packing": spec["packed"]}))
    adapters, base = jlora.split(params, run.lora)
    task = training.task_for(pretrained, run.lora, train, ce_chunk=run.train.ce_chunk)
    tx = training.make_optimizer(run.train, run.lora)
    step_fn = training.make_train_step(task, tx, jax.random.key(0))
    batches = data.Batches(train, run.train.batch_size, run.train.seed)
    shaped = [training.shape_batch(batches(i), 1) for i in range(spec["rounds"] + 1)]
    state = [adapters, tx.init(adapters)]
    index = [0]

    def run_step() -> None:
        batch = shaped[index[0]]
        index[0] += 1
        adapters, opt_state, _ = step_fn(*state, base, batch, jnp.int32(index[0]))
        state[:] = jax.block_until_ready([adapters, opt_state])

    loaded = time.perf_counter() - start
    tick = time.perf_counter()
    run_step()  # the first batch compiles; the rounds use the next ones
    ready = {
        "load_s": loaded,
        "first_step_s": time.perf_counter() - tick,
        "real_tokens": [int(b["attention_mask"].sum()) for b in shaped[1:]],
        "row_tokens": int(shaped[0]["input_ids"].size),
        "reviews": [
            int(b["segment_ids"].max(-1).sum()) if "segment_ids" in b else b["input_ids"].shape[-2] for b in shaped[1:]
        ],
        "fill": data.token_use(train),
    }
    return {"step": run_step}, ready


def main() -> None:
    from benchmarks.run import measure

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="alternating steps per side (default 20)")
    args = parser.parse_args()
    specs = {
        name: {"side": "packing", "packed": name == "packed", "rounds": args.rounds} for name in ("packed", "unpacked")
    }
    times, info = measure(specs, [(name, "step") for name in specs], args.rounds, lambda m: print(m, flush=True))
    rates = {
        name: [
            tokens / seconds for tokens, seconds in zip(info[name]["real_tokens"], times[f"{name}:step"], strict=True)
        ]
        for name in specs
    }
    per_round = ratio(rates["packed"], rates["unpacked"])
    lines = [
        f"# The default run's step, packed beside unpacked ({args.rounds} alternating rounds, batch 8 × 64)",
        "",
        "| side | real tokens / s (median) | step s (median) | reviews / step (mean) | real ÷ row tokens |",
        "|---|---|---|---|---|",
    ]
    for name in specs:
        fill = info[name]["fill"]["fill_after"]
        lines.append(
            f"| {name} | {statistics.median(rates[name]):.0f} | {statistics.median(times[f'{name}:step']):.2f} | "
            f"{statistics.mean(info[name]['reviews']):.1f} | {fill:.1%} |"
        )
    lines += [
        "",
        f"packed ÷ unpacked real tokens / s, per round: median {per_round['median']:.2f} "
        f"(min–max {per_round['min']:.2f}–{per_round['max']:.2f}).",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "packing.json").write_text(
        json.dumps({"commit": commit(), "machine": machine(), "times": times, "info": info}, indent=2)
    )
    (RESULTS / "packing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
