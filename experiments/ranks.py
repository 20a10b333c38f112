"""Study 3: the rank sweep r ∈ {1, 2, 4, 8, 16, 64} of LoRA on q,v, all-MiniLM-L6-v2 /
Rotten Tomatoes. alpha is fixed at 16 and the adapter scaled by alpha / r, as in the paper
(its r=8 run is study 1's LoRA run, trained once).

    python -m experiments.ranks              # ~20 min on a 2-core CPU
"""

from __future__ import annotations

import pathlib
import time

from experiments import common

STEPS, BATCH = 150, 16
RANKS = (1, 2, 4, 8, 16, 64)


def rank_method(r: int) -> common.Method:
    name = "LoRA q,v r=8" if r == 8 else f"LoRA q,v r={r}"  # r=8 is study 1's
    return common.lora_method(name, target_modules=["query", "value"], r=r, alpha=16.0)


def main(argv: list[str] | None = None) -> None:
    args = common.parser(__doc__, STEPS, BATCH).parse_args(argv)
    scale = common.scale_of(args)
    started = time.perf_counter()
    setup = common.encoder(scale.rows)
    methods = [rank_method(r) for r in RANKS]
    rows = [
        common.run(setup, method, seed, scale.steps, scale.batch_size, args.out / "runs") | {"r": r}
        for r, method in zip(RANKS, methods, strict=True)
        for seed in scale.seeds
    ]
    config = common.study_config(setup, scale, methods)
    common.write_csv(args.out / "ranks.csv", rows, config)
    table = common.summary_table(
        rows,
        common.accuracy_columns(loss=True),
        by="r",
    )
    title = "Study 3: rank sweep of LoRA on q,v, all-MiniLM-L6-v2 / Rotten Tomatoes"
    common.write_markdown(args.out / "ranks.md", title, table, config, time.perf_counter() - started)
    rank_plot({"all-MiniLM-L6-v2 / Rotten Tomatoes": rows}, args.out / "ranks.png")
    print(table)


def rank_plot(curves: dict[str, list[dict]], path: pathlib.Path, baseline: dict | None = None) -> None:
    """Held-out accuracy against the rank (log scale), mean ± std over seeds, one curve
    each; `baseline` (a row) is drawn as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for label, rows in curves.items():
        groups = common.grouped(rows, "r")
        ranks = sorted(groups)
        stats = [common.mean_std([100 * r["accuracy"] for r in groups[k]]) for k in ranks]
        ax.errorbar(ranks, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3, label=label)
    if baseline is not None:
        ax.axhline(100 * baseline["accuracy"], color="gray", linestyle="--", label=baseline["method"])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rank r of the q,v adapters")
    ax.set_ylabel("held-out accuracy % (mean ± std)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
