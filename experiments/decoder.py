"""Study 5: the decoder. SmolLM2-135M-Instruct on `jlora train`'s default task (Rotten
Tomatoes as ``"Review: {text}\\nSentiment:"`` -> ``" positive"`` / ``" negative"``; accuracy
= the model ranks the right label's first token above the other's): zero-shot against
LoRA on q,v (r=8, every seed), and the rank sweep on a smaller grid (r = 1, 64: the
first seed only; alpha 16, scaled by alpha / r).

    python -m experiments.decoder            # ~15 min on a 2-core CPU
"""

from __future__ import annotations

import time

import jax

import jlora
from experiments import common, ranks
from jlora import train as training

STEPS, BATCH = 40, 8
RANKS = (1, 8, 64)


def zero_shot(setup: common.Setup, batch_size: int = 64) -> dict:
    """The pretrained model's held-out accuracy, no training (deterministic: no seed)."""
    started = time.perf_counter()
    lora = jlora.LoraConfig(target_modules=["q_proj", "v_proj"])
    task = training.task_for(setup.pretrained, lora, setup.train)
    result = training.evaluate(training.make_eval_step(task), setup.pretrained.params, setup.held_out, batch_size)
    total = sum(leaf.size for leaf in jax.tree.leaves(setup.pretrained.params))
    return {
        "method": "zero-shot",
        "r": 0,
        "seed": 0,
        "accuracy": result["accuracy"],
        "loss": result["loss"],
        "trainable": 0,
        "trainable_percent": 0.0,
        "train_s": time.perf_counter() - started,
        "total_parameters": total,
    }


def rank_method(r: int) -> common.Method:
    return common.lora_method(f"LoRA q,v r={r}", target_modules=["q_proj", "v_proj"], r=r, alpha=16.0, head=())


def main(argv: list[str] | None = None) -> None:
    args = common.parser(__doc__, STEPS, BATCH).parse_args(argv)
    scale = common.scale_of(args)
    started = time.perf_counter()
    setup = common.decoder(scale.rows)
    methods = [rank_method(r) for r in RANKS]
    rows = [zero_shot(setup)] + [
        common.run(setup, method, seed, scale.steps, scale.batch_size, args.out / "runs") | {"r": r}
        for r, method in zip(RANKS, methods, strict=True)
        for seed in (scale.seeds if r == 8 else scale.seeds[:1])  # the other ranks: the first seed only
    ]
    config = common.study_config(setup, scale, methods)
    common.write_csv(args.out / "decoder.csv", rows, config)
    table = common.summary_table(
        rows,
        common.accuracy_columns(loss=True)
        | {
            "step s (median)": common.median("step_s", "{:.2f}"),
        },
    )
    title = "Study 5: SmolLM2-135M-Instruct on Rotten Tomatoes, zero-shot vs LoRA"
    common.write_markdown(args.out / "decoder.md", title, table, config, time.perf_counter() - started)
    ranks.rank_plot({"SmolLM2-135M-Instruct, LoRA": rows[1:]}, args.out / "decoder.png", baseline=rows[0])
    print(table)


if __name__ == "__main__":
    main()
