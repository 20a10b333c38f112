"""Study 1: frozen linear probe, head-only, full fine-tuning and LoRA (q,v r=8) on
all-MiniLM-L6-v2 / Rotten Tomatoes: accuracy, trainable parameters, peak step memory,
step time and checkpoint size.

    python -m experiments.methods            # ~20 min on a 2-core CPU
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import common
from jlora.models import BertModel, mean_pool

STEPS, BATCH = 150, 16
METHODS = (
    common.trained_modules("head only", ["classifier"], learning_rate=5e-3),
    common.trained_modules("full fine-tuning", "bert|classifier", learning_rate=1e-4),
    common.lora_method("LoRA q,v r=8", target_modules=["query", "value"], r=8),
)


def sentence_embeddings(setup: common.Setup, split, batch_size: int = 256) -> np.ndarray:
    """The frozen encoder's mean-pooled hidden states (the model's sentence embedding)."""
    bert = BertModel(setup.pretrained.model.config)
    embed = jax.jit(lambda params, ids, mask: mean_pool(bert.apply({"params": params}, ids, mask)[0], mask))
    ids, mask = split.arrays["input_ids"], split.arrays["attention_mask"]
    return np.concatenate(
        [
            embed(setup.pretrained.params["bert"], ids[i : i + batch_size], mask[i : i + batch_size])
            for i in range(0, len(ids), batch_size)
        ]
    )


def linear_probe(setup: common.Setup, l2: float = 1e-3, iterations: int = 200) -> dict:
    """L2-regularised logistic regression on frozen sentence embeddings, fitted to
    convergence with L-BFGS on the whole training split (deterministic: no seed)."""
    started = time.perf_counter()
    x_train, x_test = sentence_embeddings(setup, setup.train), sentence_embeddings(setup, setup.held_out)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    y_train, y_test = setup.train.arrays["label"], setup.held_out.arrays["label"]
    classes = int(y_train.max()) + 1

    def loss(w):
        logits = x_train @ w["kernel"] + w["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y_train).mean() + l2 * jnp.sum(w["kernel"] ** 2)

    w = {"kernel": jnp.zeros((x_train.shape[1], classes)), "bias": jnp.zeros(classes)}
    solver = optax.lbfgs()
    state = solver.init(w)
    value_and_grad = optax.value_and_grad_from_state(loss)

    @jax.jit
    def iterate(w, state):
        value, grad = value_and_grad(w, state=state)
        updates, state = solver.update(grad, state, w, value=value, grad=grad, value_fn=loss)
        return optax.apply_updates(w, updates), state

    for _ in range(iterations):
        w, state = iterate(w, state)
    logits = x_test @ w["kernel"] + w["bias"]
    return {
        "method": "linear probe (frozen)",
        "seed": 0,
        "accuracy": float((logits.argmax(-1) == y_test).mean()),
        "loss": float(optax.softmax_cross_entropy_with_integer_labels(logits, y_test).mean()),
        "trainable": int(w["kernel"].size + w["bias"].size),
        "trainable_percent": 100
        * (w["kernel"].size + w["bias"].size)
        / sum(x.size for x in jax.tree.leaves(setup.pretrained.params)),
        "train_s": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> None:
    args = common.parser(__doc__, STEPS, BATCH).parse_args(argv)
    scale = common.scale_of(args)
    started = time.perf_counter()
    setup = common.encoder(scale.rows)
    rows = [linear_probe(setup)]
    for method in METHODS:
        for seed in scale.seeds:
            rows.append(
                common.run(setup, method, seed, scale.steps, scale.batch_size, args.out / "runs", checkpoint_size=True)
            )
    config = common.study_config(setup, scale, METHODS) | {
        "linear_probe": "L-BFGS logistic regression, L2 1e-3, 200 iterations, standardised mean-pooled embeddings"
    }
    seconds = time.perf_counter() - started
    common.write_csv(args.out / "methods.csv", rows, config)
    table = common.summary_table(
        rows,
        common.accuracy_columns()
        | {
            "peak step memory MB": common.first("peak_step_memory_mb", "{:.0f}"),
            "step s (median)": common.median("step_s"),
            "checkpoint MB": common.first("checkpoint_mb", "{:.2f}"),
        },
    )
    common.write_markdown(
        args.out / "methods.md", "Study 1: methods on all-MiniLM-L6-v2 / Rotten Tomatoes", table, config, seconds
    )
    common.accuracy_bars(rows, args.out / "methods.png", "all-MiniLM-L6-v2 on Rotten Tomatoes")
    print(table)


if __name__ == "__main__":
    main()
