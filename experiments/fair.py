"""Study 7: a fair method comparison on all-MiniLM-L6-v2, Rotten Tomatoes and TREC-6.

Study 1 gave every method one learning rate and 0.28 of an epoch. Here each method gets
its own learning rate, chosen on a validation split carved from the training split (the
test split is never looked at to choose): it starts from three rates of a shared log grid
and, while the best rate is at the edge of what it tried, tries the next one out, so that
the chosen rate is a maximum inside the grid. Every run trains one epoch (AdamW, 10% warmup,
cosine decay, clipping at 1); the chosen rate then runs with two more seeds, and the test
accuracy is reported over the three (mean ± sd, and LoRA's gap to full fine-tuning with a
95% confidence interval, paired by seed). The learning-rate curves test "LoRA wants about
10x full fine-tuning's rate" (LoRA Without Regret) on the way.

    python -m experiments.fair                     # both tasks, ~3.5 h on a 2-core CPU
    python -m experiments.fair --tasks trec-6      # one task; reruns reuse every finished run
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable

import numpy as np
from scipy import stats

from experiments import common

GRID = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2)
BATCH, EPOCHS = 16, 1
TASKS: dict[str, tuple[Callable[..., common.Setup], int]] = {  # task: (setup, validation rows)
    "rotten-tomatoes": (common.encoder, 1000),
    "trec-6": (common.trec, 500),
}
FULL = "full fine-tuning"


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A method at any learning rate, and the rates its sweep starts from."""

    name: str
    at: Callable[[float], common.Method]
    start: tuple[float, ...]


def lora_candidate(name: str, start: tuple[float, ...], **changes) -> Candidate:
    """LoRA r=8 (alpha 16) on `target_modules` (default every linear layer), `head` trained
    fully (default the classifier); `use_dora`, and Method fields (quantize, loraplus_ratio)."""
    lora = {k: changes.pop(k) for k in ("target_modules", "use_dora", "head") if k in changes}
    lora.setdefault("target_modules", "all-linear")
    return Candidate(name, lambda lr: dataclasses.replace(common.lora_method(name, lr, **lora), **changes), start)


CANDIDATES = (
    Candidate("head only", lambda lr: common.trained_modules("head only", ["classifier"], lr), (1e-3, 5e-3, 2e-2)),
    Candidate(FULL, lambda lr: common.trained_modules(FULL, "bert|classifier", lr), (2e-5, 5e-5, 1e-4)),
    lora_candidate("LoRA q,v", (5e-4, 1e-3, 2e-3), target_modules=["query", "value"]),
    lora_candidate("LoRA all-linear", (5e-4, 1e-3, 2e-3)),
    lora_candidate("LoRA+ all-linear (ratio 16)", (1e-4, 2e-4, 5e-4), loraplus_ratio=16.0),
    lora_candidate("DoRA all-linear", (5e-4, 1e-3, 2e-3), use_dora=True),
    lora_candidate("QLoRA all-linear (NF4 base)", (5e-4, 1e-3, 2e-3), quantize="nf4"),
)


def trained(task: str, setup: common.Setup, steps: int, batch: int, runs, method: common.Method, seed: int) -> dict:
    """One run's row (cached by `common.run`), named by this study's method and task."""
    return common.run(setup, method, seed, steps, batch, runs) | {"method": method.name, "task": task}


def best_rate(rows: dict[float, dict]) -> float:
    """The learning rate with the best validation accuracy (ties: the lower validation loss)."""
    return max(rows, key=lambda lr: (rows[lr]["val_accuracy"], -rows[lr]["val_loss"]))


def sweep(candidate: Candidate, train: Callable[[common.Method, int], dict], extend: bool = True) -> dict[float, dict]:
    """Seed-0 runs of `candidate` over its start rates, extended along the grid while the
    best is at the edge of the rates tried. Returns ``{learning rate: row}``."""
    rows: dict[float, dict] = {}
    todo = list(candidate.start)
    while todo:
        rows |= {lr: train(candidate.at(lr), 0) for lr in todo}
        i = GRID.index(best_rate(rows))
        todo = [GRID[j] for j in (i - 1, i + 1) if extend and 0 <= j < len(GRID) and GRID[j] not in rows]
    return rows


def gap_row(task: str, final: list[dict]) -> dict | None:
    """The best LoRA-family method under 1% trainable (by mean test accuracy) minus full
    fine-tuning, paired by seed: mean and a 95% t interval."""
    by_method = common.grouped(final)
    if FULL not in by_method:
        return None
    small = {m: g for m, g in by_method.items() if m != FULL and g[0]["trainable_percent"] < 1 and "LoRA" in m}
    if not small:
        return None
    best = max(small, key=lambda m: np.mean([r["accuracy"] for r in small[m]]))
    full = {r["seed"]: r["accuracy"] for r in by_method[FULL]}
    gaps = [100 * (r["accuracy"] - full[r["seed"]]) for r in small[best] if r["seed"] in full]
    mean, sd = common.mean_std(gaps)
    half = stats.t.ppf(0.975, len(gaps) - 1) * sd / math.sqrt(len(gaps)) if len(gaps) > 1 else float("nan")
    return {"task": task, "method": best, "gap": mean, "low": mean - half, "high": mean + half, "n": len(gaps)}


def lr_plot(sweeps: dict[str, dict[str, dict[float, dict]]], path) -> None:
    """Validation accuracy against the learning rate, one curve per method, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sweeps), figsize=(6.5 * len(sweeps), 4.2), squeeze=False)
    for ax, (task, by_method) in zip(axes[0], sweeps.items(), strict=True):
        for name, rows in by_method.items():
            rates = sorted(rows)
            ax.plot(rates, [100 * rows[lr]["val_accuracy"] for lr in rates], marker="o", label=name)
            best = best_rate(rows)
            ax.plot([best], [100 * rows[best]["val_accuracy"]], marker="*", markersize=12, color="black")
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate (one epoch, seed 0)")
        ax.set_ylabel("validation accuracy %")
        ax.set_title(f"all-MiniLM-L6-v2 / {task} (star: chosen)", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__, steps=0, batch_size=BATCH)  # steps 0: one epoch
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    args = p.parse_args(argv)
    scale = common.scale_of(args)
    started = time.perf_counter()
    candidates = CANDIDATES if not args.smoke else CANDIDATES[4:]  # LoRA+, DoRA, QLoRA
    sweeps: dict[str, dict[str, dict[float, dict]]] = {}
    rows, final, tried = [], [], {}
    for task in args.tasks:
        make, validation = TASKS[task]
        setup = common.with_validation(make(scale.rows), validation if not args.smoke else 16)
        steps = scale.steps or math.ceil(EPOCHS * len(setup.train) / scale.batch_size)  # --steps: a fixed count

        train = functools.partial(trained, task, setup, steps, scale.batch_size, args.out / "runs")
        sweeps[task] = {}
        for candidate in candidates:
            if args.smoke:
                candidate = dataclasses.replace(candidate, start=candidate.start[1:2])
            swept = sweeps[task][candidate.name] = sweep(candidate, train, extend=not args.smoke)
            best = best_rate(swept)
            tried[f"{task}: {candidate.name}"] = sorted(swept)
            rows += [r | {"stage": "sweep"} for r in swept.values()]
            runs = [swept[best]] + [train(candidate.at(best), s) for s in scale.seeds if s != 0]
            final += [r | {"stage": "final"} for r in runs]
    args.out.mkdir(parents=True, exist_ok=True)
    config = {
        "model": common.ENCODER,
        "tasks": {t: {"validation_rows": TASKS[t][1]} for t in args.tasks},
        "epochs": EPOCHS,
        "batch_size": scale.batch_size,
        "grid": GRID,
        "learning_rates_tried": tried,
        "seeds": list(scale.seeds),
        "optimizer": "AdamW (no weight decay), 10% linear warmup, cosine decay, global-norm clipping at 1",
        "selection": "best validation accuracy of seed 0 (ties: lower validation loss), best rate inside the grid",
    }
    common.write_csv(args.out / "fair.csv", rows + [r for r in final if r["seed"] != 0], config)
    columns = {
        "learning rate": common.first("learning_rate", "{:g}"),
        "validation % (seed 0)": lambda g: f"{100 * next(r for r in g if r['seed'] == 0)['val_accuracy']:.1f}",
        "test accuracy %": common.pm("accuracy", 100),
        "trainable %": common.first("trainable_percent", "{:.3f}"),
        "train min (sum)": lambda g: f"{sum(r['train_s'] for r in g) / 60:.0f}",
    }
    sections, gaps = [], []
    for task in args.tasks:
        group = [r for r in final if r["task"] == task]
        sections.append(f"## {task}\n\n{common.summary_table(group, columns)}")
        gap = gap_row(task, group)
        if gap:
            gaps.append(
                f"- {task}: {gap['method']} minus full fine-tuning, paired by seed: {gap['gap']:+.2f} points "
                f"(95% CI {gap['low']:+.2f} to {gap['high']:+.2f}, n={gap['n']})"
            )
    compute = (sum(r["train_s"] for r in rows) + sum(r["train_s"] for r in final if r["seed"] != 0)) / 3600
    notes = "\n".join(gaps) + f"\n\nTraining time of every run of the study, summed: {compute:.1f} h on this machine."
    common.write_markdown(
        args.out / "fair.md",
        "Study 7: each method at its own learning rate, one epoch",
        "\n\n".join(sections),
        config,
        time.perf_counter() - started,
        notes,
    )
    lr_plot(sweeps, args.out / "fair.png")
    print((args.out / "fair.md").read_text())


if __name__ == "__main__":
    main()
