"""Side by side: what training only the adapters saves, and what merging costs at inference.

Steps on one model, measured in one run, interleaved round-robin so machine noise hits
all of them alike:

  full        full fine-tuning (every parameter differentiated and updated by Adam)
  drop-in     the whole tree differentiated, jlora.optimizer zeroing frozen updates
  adapters    the recommended step: only the adapters differentiated (base closed over)

and inference with the base params, merged params, and factored adapters.
Prints ratios against `full` (training) and `base` (inference), and writes
benchmarks/results/train_step.{md,png}.

    python benchmarks/train_step.py [--layers 4 --embed 512 --seq 128 --batch 8]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jlora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


class Block(nn.Module):
    heads: int

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        q, k, v = (nn.Dense(d, name=n)(nn.RMSNorm()(x)) for n in ("q_proj", "k_proj", "v_proj"))
        split = lambda t: t.reshape(*t.shape[:-1], self.heads, d // self.heads)
        h = nn.dot_product_attention(split(q), split(k), split(v)).reshape(x.shape)
        x = x + nn.Dense(d, name="o_proj")(h)
        return x + nn.Dense(d, name="down_proj")(nn.silu(nn.Dense(4 * d, name="up_proj")(nn.RMSNorm()(x))))


class LM(nn.Module):
    layers: int
    embed: int
    vocab: int = 8192

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.embed, name="embed_tokens")(tokens)
        for i in range(self.layers):
            x = Block(heads=self.embed // 64, name=f"layers_{i}")(x)
        return nn.Dense(self.vocab, name="lm_head")(nn.RMSNorm()(x))


def loss_of(model, config, tokens):
    def loss(params):
        logits = jlora.apply(model, params, config, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    return loss


def make_steps(model, params, config, tokens):
    """{name: (step, inputs)}: each step maps (params, opt_state, *rest) to the next
    (params, opt_state), donating both. All clip gradients to global norm 1, as training does."""
    loss = loss_of(model, config, tokens)
    adapters, base = jlora.split(params, config)
    clipped_adam = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-4))
    txs = {
        "full": clipped_adam,
        "drop-in": jlora.optimizer(clipped_adam, config),
        "drop-in, clip outside": optax.chain(optax.clip_by_global_norm(1.0), jlora.optimizer(optax.adam(1e-4), config)),
        "adapters": jlora.optimizer(clipped_adam, config),
    }

    def whole_tree(tx):  # full fine-tuning, or the drop-in: jax.grad of every leaf
        def step(p, s):
            u, s = tx.update(jax.grad(loss)(p), s, p)
            return optax.apply_updates(p, u), s

        return step

    def adapters_only(a, s, base):  # the recommended step
        g = jax.grad(lambda a: loss(jlora.join(a, base)))(a)
        u, s = txs["adapters"].update(g, s, a)
        return optax.apply_updates(a, u), s

    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # each variant owns (and donates) its buffers
    merged = copy(jlora.merge(params, config))
    steps = {name: (whole_tree(tx), (copy(params), tx.init(params))) for name, tx in txs.items() if name != "adapters"}
    steps["full"] = (whole_tree(txs["full"]), (merged, txs["full"].init(merged)))
    steps["adapters"] = (adapters_only, (copy(adapters), txs["adapters"].init(adapters), copy(base)))
    return steps


def make_inference(model, params, config, tokens):
    merged = jlora.merge(params, config)
    base = jlora.split(params, config)[1]
    return {
        "base": (lambda p: model.apply({"params": p}, tokens), base),
        "merged": (lambda p: model.apply({"params": p}, tokens), merged),
        "factored": (lambda p: jlora.apply(model, p, config, tokens), params),
    }


def peak_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes


def measure(fns: dict, inputs: dict, repeats: int, carry: bool = True) -> dict[str, float]:
    """Median seconds per call, the candidates interleaved round-robin. With `carry`, each
    call's output is the next call's input (so donated buffers stay valid)."""
    times = {name: [] for name in fns}
    for i in range(repeats + 1):  # the first round warms up
        for name, fn in fns.items():
            start = time.perf_counter()
            out = jax.block_until_ready(fn(*inputs[name]))
            if i:
                times[name].append(time.perf_counter() - start)
            if carry:  # (params, opt_state) come back; further inputs stay
                inputs[name] = (*out, *inputs[name][len(out) :])
    return {name: statistics.median(t) for name, t in times.items()}


def table_rows(phase: str, compiled: dict, times: dict, reference: str) -> list[tuple]:
    """(phase, name, seconds, time ratio, bytes, memory ratio) per variant, against `reference`."""
    memory = {name: peak_bytes(c) for name, c in compiled.items()}
    return [
        (phase, name, times[name], times[name] / times[reference], memory[name], memory[name] / memory[reference])
        for name in compiled
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--embed", type=int, default=512)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    model = LM(layers=args.layers, embed=args.embed)
    tokens = jax.random.randint(jax.random.key(0), (args.batch, args.seq + 1), 0, model.vocab)
    base = model.init(jax.random.key(1), tokens[:, :-1])["params"]
    config = jlora.LoraConfig(r=args.rank, alpha=2 * args.rank, target_modules=TARGETS)
    params = jlora.init(base, config, jax.random.key(2))
    print(jlora.summary(params, config), "\n")

    steps = make_steps(model, params, config, tokens)
    compiled = {name: jax.jit(fn, donate_argnums=(0, 1)).lower(*st).compile() for name, (fn, st) in steps.items()}
    times = measure(compiled, {name: st for name, (_, st) in steps.items()}, args.repeats)
    rows = table_rows("train", compiled, times, reference="full")
    inference = make_inference(model, params, config, tokens[:, :-1])
    compiled = {name: jax.jit(fn).lower(p).compile() for name, (fn, p) in inference.items()}
    times = measure(compiled, {name: (p,) for name, (_, p) in inference.items()}, args.repeats, carry=False)
    rows += table_rows("infer", compiled, times, reference="base")

    header = (
        f"{args.layers} layers, embed {args.embed}, batch {args.batch} x {args.seq} tokens, r={args.rank} "
        f"on {', '.join(TARGETS)}; {jax.devices()[0].platform}, median of {args.repeats}"
    )
    table = [
        "| phase | variant | time (s) | time ratio | compiled memory (MiB) | memory ratio |",
        "|---|---|---|---|---|---|",
    ]
    table += [f"| {p} | {n} | {t:.3f} | {tr:.2f} | {m / 2**20:.0f} | {mr:.2f} |" for p, n, t, tr, m, mr in rows]
    report = header + "\n\n" + "\n".join(table) + "\n"
    print(report)
    out = pathlib.Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "train_step.md").write_text(report)
    plot(rows, header, out / "train_step.png")


def plot(rows, title, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    labels = [f"{p}: {n}" for p, n, *_ in rows]
    axes[0].barh(labels, [r[3] for r in rows], color="tab:blue")
    axes[0].set_xlabel("time ratio (vs full step / base inference)")
    axes[1].barh(labels, [r[5] for r in rows], color="tab:orange")
    axes[1].set_xlabel("compiled memory ratio")
    for ax in axes:
        ax.axvline(1.0, color="gray", lw=0.8)
        ax.invert_yaxis()
    axes[1].set_yticklabels([])
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
