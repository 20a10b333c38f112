"""Study 6: QLoRA. The default `jlora train` run (SmolLM2-135M-Instruct, Rotten Tomatoes,
LoRA r=8, 100 steps of 8) with its float32 base against the same run with the frozen kernels
in NF4 with double quantization (`--quantize nf4`) or int8, three seeds each: the QLoRA
paper's claim that a 4-bit base loses nothing to LoRA fine-tuning, at small scale. The
default adapters are q,k,v,o over a float32 base and every linear layer (``all-linear``) over
a quantized one, QLoRA's recipe; float32 with all-linear adapters separates what the base
loses from what the extra adapters give. (NF4 with q,k,v,o, the default before: 84.8 ± 0.9%,
-1.17 ± 0.51 points, at commit c8df864.)

Each run is the CLI itself, in a subprocess, so the study measures exactly what a user runs;
its run folder is kept in ``results/runs/qlora-<arm>-<seed>/`` (not committed) and reused when the study
is resumed.

    python -m experiments.qlora              # ~60 min on a 2-core CPU
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time

from safetensors.numpy import load_file

from experiments import common

# arm: (folder slug, CLI flags, the arms it is paired with)
ARMS = {
    "float32 base (q,k,v,o: the default)": ("float32", [], ()),
    "nf4 base (all-linear: the default)": ("nf4-all-linear", ["--quantize", "nf4"], ("float32", "float32-all-linear")),
    "int8 base (all-linear: the default)": (
        "int8-all-linear",
        ["--quantize", "int8"],
        ("float32", "float32-all-linear"),
    ),
    "float32 base, all-linear": ("float32-all-linear", ["--targets", "all-linear"], ("float32",)),
}
SLUGS = {slug: arm for arm, (slug, _, _) in ARMS.items()}


def run(arm: str, seed: int, extra: list[str], runs: pathlib.Path) -> dict:
    """One default run (cached by its folder under `runs`), as a result row."""
    slug, flags, _ = ARMS[arm]
    out = runs / f"qlora-{slug}-{seed}"
    if not (out / "results.json").exists():
        command = [sys.executable, "-m", "jlora.cli", "train", "--seed", str(seed), *flags, *extra]
        subprocess.run([*command, "--out", str(out), "--overwrite"], check=True)
    results = json.loads((out / "results.json").read_text())
    settings = json.loads((out / "run.json").read_text())
    trainable = sum(t.size for t in load_file(out / "peft" / "adapter_model.safetensors").values())
    return {
        "method": arm,
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


def paired_gaps(rows: list[dict]) -> str:
    """Each arm minus the arms it is paired with, paired by seed, in accuracy points."""
    by_arm = {arm: {r["seed"]: r for r in group} for arm, group in common.grouped(rows).items()}
    lines = []
    for arm, (_, _, references) in ARMS.items():
        for reference in (SLUGS[slug] for slug in references):
            if arm not in by_arm or reference not in by_arm:
                continue
            seeds = sorted(set(by_arm[arm]) & set(by_arm[reference]))
            gap = [100 * (by_arm[arm][s]["accuracy"] - by_arm[reference][s]["accuracy"]) for s in seeds]
            mean, std = common.mean_std(gap)
            lines.append(f"- {arm} minus {reference}, paired by seed: {mean:+.2f} ± {std:.2f} points (n={len(gap)})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = common.parser(__doc__, steps=100, batch_size=8).parse_args(argv)
    scale = common.scale_of(args)
    extra = ["--steps", str(scale.steps), "--batch-size", str(scale.batch_size)]
    if args.smoke:
        extra += ["--eval-size", "16", "--seq-len", "32"]
    started = time.perf_counter()
    arms = list(ARMS) if not args.smoke else list(ARMS)[:2]
    rows = [run(arm, seed, extra, args.out / "runs") for arm in arms for seed in scale.seeds]  # the defaults first
    parameters = rows[0]["base_bytes"] / 4 + rows[0]["trainable"]  # the float32 run's base: 4 bytes a weight
    rows = [r | {"trainable_percent": 100 * r["trainable"] / parameters} for r in rows]
    config = {
        "command": "jlora train --seed S FLAGS",
        "flags": {arm: flags for arm, (_, flags, _) in ARMS.items()},
        "extra": extra,
        "seeds": list(scale.seeds),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    common.write_csv(args.out / "qlora.csv", rows, config)
    columns = {
        "zero-shot %": lambda group: f"{100 * group[0]['accuracy_before']:.1f}",
        "held-out accuracy %": common.pm("accuracy", 100),
        "held-out loss": common.pm("loss", 1, 3),
        "train s (median)": common.median("train_s", "{:.0f}"),
        "tokens/s (median)": common.median("tokens_per_s", "{:.0f}"),
        "base MB": lambda group: f"{group[0]['base_bytes'] / 1e6:.0f}",
    }
    notes = (
        f"{paired_gaps(rows)}\n\nThe adapters train in float32 in every arm; only the frozen projections differ "
        "(NF4 with double quantization: 4.13 bits a weight; int8 per output channel: 8.1). The GGUF the base "
        "loads from stores them in Q4_1 already, so NF4 rounds a 4-bit grid onto another."
    )
    common.write_markdown(
        args.out / "qlora.md",
        "QLoRA: the default run with an NF4 or int8 base against float32",
        common.summary_table(rows, columns),
        config,
        time.perf_counter() - started,
        notes,
    )
    common.accuracy_bars(
        rows,
        args.out / "qlora.png",
        "jlora train, SmolLM2-135M: float32, NF4 and int8 bases, default and crossed adapters",
    )
    print((args.out / "qlora.md").read_text())


if __name__ == "__main__":
    main()
