"""Study 6: QLoRA. The default `jlora train` run (SmolLM2-135M-Instruct, Rotten Tomatoes,
LoRA r=8 on q,k,v,o, 100 steps of 8) with its float32 base against the same run with the
frozen kernels in NF4 with double quantization (`--quantize nf4`), three seeds each: the
QLoRA paper's claim that a 4-bit base loses nothing to LoRA fine-tuning, at small scale.

Each run is the CLI itself, in a subprocess, so the study measures exactly what a user runs;
its run folder is kept in ``results/runs/qlora-<format>-<seed>/`` (not committed) and reused when the study
is resumed.

    python -m experiments.qlora              # ~35 min on a 2-core CPU
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time

from safetensors.numpy import load_file

from experiments import common

FORMATS = {"float32 base": [], "nf4 base": ["--quantize", "nf4"]}


def run(fmt: str, seed: int, extra: list[str], runs: pathlib.Path) -> dict:
    """One default run (cached by its folder under `runs`), as a result row."""
    out = runs / f"qlora-{fmt.split()[0]}-{seed}"
    if not (out / "results.json").exists():
        command = [sys.executable, "-m", "jlora.cli", "train", "--seed", str(seed), *FORMATS[fmt], *extra]
        subprocess.run([*command, "--out", str(out), "--overwrite"], check=True)
    results = json.loads((out / "results.json").read_text())
    settings = json.loads((out / "run.json").read_text())
    trainable = sum(t.size for t in load_file(out / "peft" / "adapter_model.safetensors").values())
    return {
        "method": fmt,
        "seed": seed,
        "accuracy": results["accuracy_after"],
        "loss": results["loss_after"],
        "accuracy_before": results["accuracy_before"],
        "train_s": results["train_seconds"],
        "tokens_per_s": results["median_tokens_per_s"],
        "quantize": settings["train"].get("quantize"),
        "trainable": trainable,
        "base_bytes": results["base_bytes"],
    }


def main(argv: list[str] | None = None) -> None:
    args = common.parser(__doc__, steps=100, batch_size=8).parse_args(argv)
    scale = common.scale_of(args)
    extra = ["--steps", str(scale.steps), "--batch-size", str(scale.batch_size)]
    if args.smoke:
        extra += ["--eval-size", "16", "--seq-len", "32"]
    started = time.perf_counter()
    rows = [run(fmt, seed, extra, args.out / "runs") for seed in scale.seeds for fmt in FORMATS]
    parameters = rows[0]["base_bytes"] / 4 + rows[0]["trainable"]  # the float32 run's base: 4 bytes a weight
    rows = [r | {"trainable_percent": 100 * r["trainable"] / parameters} for r in rows]
    config = {"command": "jlora train --seed S [--quantize nf4]", "extra": extra, "seeds": list(scale.seeds)}
    args.out.mkdir(parents=True, exist_ok=True)
    common.write_csv(args.out / "qlora.csv", rows, config)
    columns = {
        "held-out accuracy %": common.pm("accuracy", 100),
        "held-out loss": common.pm("loss", 1, 3),
        "train s (median)": common.median("train_s", "{:.0f}"),
        "tokens/s (median)": common.median("tokens_per_s", "{:.0f}"),
        "base MB": lambda group: f"{group[0]['base_bytes'] / 1e6:.0f}",
    }
    groups = common.grouped(rows)
    gap = [100 * (q["accuracy"] - f["accuracy"]) for f, q in zip(*groups.values(), strict=True)]
    mean, std = common.mean_std(gap)
    notes = (
        f"NF4 minus float32, paired by seed: {mean:+.2f} ± {std:.2f} accuracy points (n={len(gap)}). "
        "The adapters train in float32 on both; only the frozen projections differ (4.13 bits a weight)."
    )
    common.write_markdown(
        args.out / "qlora.md",
        "QLoRA: the default run with an NF4 base against float32",
        common.summary_table(rows, columns),
        config,
        time.perf_counter() - started,
        notes,
    )
    common.accuracy_bars(
        rows,
        args.out / "qlora.png",
        "jlora train, SmolLM2-135M: float32 vs NF4 base",
    )
    print((args.out / "qlora.md").read_text())


if __name__ == "__main__":
    main()
