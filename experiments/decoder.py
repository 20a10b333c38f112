"""Study 5: the decoder, on study 7's fair protocol, and what fine-tuning makes it forget.

SmolLM2-135M-Instruct on `jlora train`'s default task (Rotten Tomatoes as
``"Review: {text}\\nSentiment:"`` -> ``" positive"`` / ``" negative"``) and on TREC-6 (the
question's type by name); accuracy = the model ranks the right label's first token above the
others': zero-shot, LoRA on q,v and on every linear layer (r=8) and full fine-tuning, each at
the learning rate a validation split picks (`experiments.fair.sweep`, a smaller start of two
rates), then three seeds; the rank sweep r = 1, 64 of LoRA q,v at its chosen rate (the first
seed). A fixed budget of 200 steps of 8 (1,600 examples: 18% of an epoch of Rotten Tomatoes,
32% of TREC-6; a full epoch of every run would take days on this CPU). After every
run, the loss on WikiText-2 (generic text nobody tunes on) against the pretrained model's:
"LoRA learns less and forgets less" (Biderman et al. 2024), forgetting against accuracy.

    python -m experiments.decoder            # ~6 h on a 2-core CPU (resumable; --tasks to pick)
"""

from __future__ import annotations

import functools
import time

import jax

import jlora
from experiments import common, fair
from jlora import train as training

STEPS, BATCH, VALIDATION = 200, 8, 500
TASKS = {"rotten-tomatoes": common.decoder, "trec-6": functools.partial(common.trec, causal=True)}
RANKS = (1, 64)
QV = ["q_proj", "v_proj"]
CANDIDATES = (
    fair.lora_candidate("LoRA q,v r=8", (1e-3, 2e-3), target_modules=QV, head=()),
    fair.lora_candidate("LoRA all-linear r=8", (5e-4, 1e-3), head=()),
    fair.Candidate(fair.FULL, lambda lr: common.trained_modules(fair.FULL, "model|lm_head", lr), (2e-5, 5e-5)),
)


def zero_shot(setup: common.Setup, batch_size: int = 64) -> dict:
    """The pretrained model's held-out accuracy and WikiText-2 loss, no training (no seed)."""
    started = time.perf_counter()
    lora = jlora.LoraConfig(target_modules=["q_proj", "v_proj"])
    task = training.task_for(setup.pretrained, lora, setup.train)
    result = training.evaluate(training.make_eval_step(task), setup.pretrained.params, setup.held_out, batch_size)
    return {
        "method": "zero-shot",
        "r": 0,
        "seed": 0,
        "accuracy": result["accuracy"],
        "loss": result["loss"],
        "generic_loss": common.generic_loss(setup, setup.pretrained.params, lora),
        "trainable": 0,
        "trainable_percent": 0.0,
        "train_s": time.perf_counter() - started,
        "total_parameters": sum(leaf.size for leaf in jax.tree.leaves(setup.pretrained.params)),
    }


def forgetting_plot(rows: list[dict], before: dict[str, float], path) -> None:
    """Held-out accuracy against the WikiText-2 loss increase, one point per run, a panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(before), figsize=(6.5 * len(before), 4.2), squeeze=False)
    for ax, task in zip(axes[0], before, strict=True):
        for name, group in common.grouped([r for r in rows if r["task"] == task]).items():
            x = [r["generic_loss"] - before[task] for r in group]
            ax.scatter(x, [100 * r["accuracy"] for r in group], label=name, s=25)
        ax.axvline(0.0, color="gray", lw=0.8)
        ax.set_xlabel("forgetting: WikiText-2 loss after − before (nats per token)")
        ax.set_ylabel("held-out accuracy %")
        ax.set_title(f"SmolLM2-135M-Instruct on {task}: learning vs forgetting", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def study(task: str, args, scale: common.Scale) -> tuple[dict, list[dict], list[dict], dict]:
    """One task: (its zero-shot row, sweep rows, final rows, the rates tried per method)."""
    setup = TASKS[task](scale.rows)
    setup = common.with_validation(setup, VALIDATION if not args.smoke else 16)
    setup.generic = common.wikitext(setup.pretrained.tokenizer, rows=128 if not args.smoke else 4)
    train = functools.partial(fair.trained, task, setup, scale.steps, scale.batch_size, args.out / "runs")
    baseline = zero_shot(setup) | {"task": task}
    rows, final, tried = [], [], {}
    for candidate in CANDIDATES if not args.smoke else CANDIDATES[:1]:
        if args.smoke:
            candidate = fair.Candidate(candidate.name, candidate.at, candidate.start[:1])
        swept = fair.sweep(candidate, train, extend=not args.smoke)
        best = fair.best_rate(swept)
        tried[f"{task}: {candidate.name}"] = sorted(swept)
        rows += [r | {"stage": "sweep"} for r in swept.values()]
        final += [swept[best]] + [train(candidate.at(best), s) for s in scale.seeds if s != 0]
        if candidate.name == "LoRA q,v r=8":
            for r in RANKS if not args.smoke else ():
                name = f"LoRA q,v r={r}"
                method = common.lora_method(name, best, head=(), target_modules=QV, r=r, alpha=16.0)
                final.append(train(method, scale.seeds[0]))
    final = [r | {"stage": "final", "forgetting": r["generic_loss"] - baseline["generic_loss"]} for r in final]
    return baseline | {"stage": "zero-shot", "forgetting": 0.0, "learning_rate": 0.0}, rows, final, tried


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__, STEPS, BATCH)
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    args = p.parse_args(argv)
    scale = common.scale_of(args)
    started = time.perf_counter()
    baselines, rows, final, tried = {}, [], [], {}
    for task in args.tasks if not args.smoke else args.tasks[:1]:
        baseline, swept, finished, rates = study(task, args, scale)
        baselines[task] = baseline
        rows, final, tried = rows + swept, final + finished, tried | rates
    config = {
        "model": common.DECODER,
        "tasks": list(baselines),
        "validation_rows": VALIDATION,
        "generic_text": {"source": "WikiText-2 raw test set", "rows": 128, "seq_len": 128},
        "steps": scale.steps,
        "batch_size": scale.batch_size,
        "seeds": list(scale.seeds),
        "learning_rates_tried": tried,
        "selection": "best validation accuracy of seed 0 (ties: lower validation loss), best rate inside the grid",
    }
    swept_runs = {r["run"] for r in rows}
    extra = [r for r in final if r["run"] not in swept_runs]  # seeds 1, 2 and the ranks
    common.write_csv(args.out / "decoder.csv", [*baselines.values(), *rows, *extra], config)
    columns = {
        "learning rate": common.first("learning_rate", "{:g}"),
        "held-out accuracy %": common.pm("accuracy", 100),
        "WikiText-2 loss": common.pm("generic_loss", 1, 3),
        "forgetting (Δ loss)": common.pm("forgetting", 1, 3),
        "trainable %": common.first("trainable_percent", "{:.3f}"),
    }
    tables = [
        f"## {task}\n\n" + common.summary_table([baseline, *[r for r in final if r["task"] == task]], columns)
        for task, baseline in baselines.items()
    ]
    notes = f"Training time of every run of the study, summed: {sum(r['train_s'] for r in rows + extra) / 3600:.1f} h."
    title = "Study 5: SmolLM2-135M-Instruct: LoRA, full fine-tuning and forgetting"
    seconds = time.perf_counter() - started
    common.write_markdown(args.out / "decoder.md", title, "\n\n".join(tables), config, seconds, notes)
    forgetting_plot(final, {t: b["generic_loss"] for t, b in baselines.items()}, args.out / "decoder.png")
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
