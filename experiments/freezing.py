"""Study 2: the seed's freezing strategies (which layers get adapters) on all-MiniLM-L6-v2 /
Rotten Tomatoes, at one parameter budget: 165,888 adapter parameters (+770 in the head),
reached exactly by choosing each strategy's rank.

Per layer and per unit of rank, q,v take 1,536 parameters, q,k,v 2,304, the MLP 3,840 and
all six linear layers 6,912; 6 layers. Attention + MLP cannot hit the budget with one rank
(r=4 gives 147,456, 0.89 of it).

    python -m experiments.freezing           # ~7 min per seed on a 2-core CPU
"""

from __future__ import annotations

import time

from experiments import common

STEPS, BATCH = 150, 16
LAYER = r"bert/encoder/layer_\d+/"
ALL_LINEAR = LAYER + ".+"  # q, k, v, attention output, MLP in and out: every kernel in a layer
ATTENTION_MLP = LAYER + r"(attention/self/(query|key|value)|intermediate/dense|output/dense)"
STRATEGIES = (
    common.lora_method("q,v (the paper's) r=18", target_modules=["query", "value"], r=18),
    common.lora_method("attention only (q,k,v) r=12", target_modules=["query", "key", "value"], r=12),
    common.lora_method("attention + MLP r=4", target_modules=ATTENTION_MLP, r=4),
    common.lora_method("all linear r=4", target_modules=ALL_LINEAR, r=4),
    common.lora_method("late half (layers 3-5), all linear r=8", target_modules=ALL_LINEAR, r=8, layers=[3, 4, 5]),
    common.lora_method("late third (layers 4-5), all linear r=12", target_modules=ALL_LINEAR, r=12, layers=[4, 5]),
)


def main(argv: list[str] | None = None) -> None:
    args = common.parser(__doc__, STEPS, BATCH).parse_args(argv)
    scale = common.scale_of(args)
    started = time.perf_counter()
    setup = common.encoder(scale.rows)
    rows = [
        common.run(setup, method, seed, scale.steps, scale.batch_size, args.out / "runs")
        for method in STRATEGIES
        for seed in scale.seeds
    ]
    config = common.study_config(setup, scale, STRATEGIES)
    common.write_csv(args.out / "freezing.csv", rows, config)
    table = common.summary_table(
        rows,
        common.accuracy_columns()
        | {
            "step s (median)": common.median("step_s"),
        },
    )
    title = "Study 2: freezing strategies at a matched budget, all-MiniLM-L6-v2 / Rotten Tomatoes"
    common.write_markdown(args.out / "freezing.md", title, table, config, time.perf_counter() - started)
    common.accuracy_bars(rows, args.out / "freezing.png", "Where the adapters go (165,888 adapter parameters)")
    print(table)


if __name__ == "__main__":
    main()
