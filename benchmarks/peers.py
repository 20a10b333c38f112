"""jlora beside qwix: the same LoRA train step on the same Linen and NNX models.

    python -m benchmarks.peers [--rounds 20] [--layers 30]

Sides (each its own `benchmarks.workers` process, run alternately, one at a time):

* ``jlora``: jlora's Linen path (`jlora.apply`, the factored branch with its own backward);
* ``jlora-fn``: jlora's function transform (`jlora.interpret.lora`) on the same Linen
  model's ``apply``, and on an NNX model through ``nnx.split`` / ``nnx.merge``;
* ``qwix``: `qwix.apply_lora_to_model` on the same two models.

Every side: the SmolLM2-135M architecture with random weights (jlora's `LlamaForCausalLM`,
scanned layers, for Linen; a decoder of the same shapes written with `flax.nnx` for NNX),
batch 8 × 128, LoRA r = 8, alpha 16 on the seven projections, a causal-LM loss over every
position, gradients of the adapters only, AdamW after clipping at 1, float32. Reports the
median and min–max of the per-round step-time ratios, first-step times and the compiled
step's temporary memory (XLA's memory analysis), in benchmarks/results/peers.md.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

from benchmarks.common import BATCH, RANK, SEQ, TARGETS, commit, machine, ratio

RESULTS = pathlib.Path(__file__).parent / "results"
PATTERN = f".*({'|'.join(TARGETS)})"


def smollm2_config(layers: int):
    from jlora.models.llama import LlamaConfig

    return LlamaConfig(
        vocab_size=49_152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=layers,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=100_000.0,
        tie_word_embeddings=True,
    )


def nnx_decoder(config, rngs):
    """A Llama-style decoder of `config`'s shapes in `flax.nnx` (GQA attention, RMSNorm,
    SwiGLU, tied head), with layers as a Python list: NNX code as people write it."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    d, f = config.hidden_size, config.intermediate_size
    h, kv, hd = config.num_heads, config.num_kv_heads, config.head_dim

    class Block(nnx.Module):
        def __init__(self, rngs):
            linear = lambda i, o: nnx.Linear(i, o, use_bias=False, rngs=rngs)
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
                linear(d, h * hd),
                linear(d, kv * hd),
                linear(d, kv * hd),
                linear(h * hd, d),
            )
            self.gate_proj, self.up_proj, self.down_proj = linear(d, f), linear(d, f), linear(f, d)
            self.norm1, self.norm2 = nnx.RMSNorm(d, rngs=rngs), nnx.RMSNorm(d, rngs=rngs)

        def __call__(self, x, causal):
            b, t, _ = x.shape
            y = self.norm1(x)
            q = self.q_proj(y).reshape(b, t, h, hd)
            k = jnp.repeat(self.k_proj(y).reshape(b, t, kv, hd), h // kv, axis=2)
            v = jnp.repeat(self.v_proj(y).reshape(b, t, kv, hd), h // kv, axis=2)
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(hd)
            attention = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
            x = x + self.o_proj(jnp.einsum("bhqk,bkhd->bqhd", attention, v).reshape(b, t, h * hd))
            y = self.norm2(x)
            return x + self.down_proj(jax.nn.silu(self.gate_proj(y)) * self.up_proj(y))

    class Decoder(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(config.vocab_size, d, rngs=rngs)
            self.layers = nnx.List([Block(rngs) for _ in range(config.num_layers)])
            self.norm = nnx.RMSNorm(d, rngs=rngs)

        def __call__(self, ids):
            causal = jnp.tril(jnp.ones((ids.shape[1], ids.shape[1]), bool))
            x = self.embed(ids)
            for layer in self.layers:
                x = layer(x, causal)
            return self.embed.attend(self.norm(x))

    return Decoder(rngs)


def causal_loss(logits, ids):
    import optax

    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def _linen(spec: dict):
    """(loss(adapters, base, ids), adapters, base) for the Linen model on `spec["impl"]`."""
    import jax
    import jax.numpy as jnp

    import jlora
    from jlora import interpret
    from jlora.models.llama import LlamaForCausalLM

    model = LlamaForCausalLM(smollm2_config(spec["layers"]), scan=True)
    ids = jnp.zeros((BATCH, SEQ), jnp.int32)
    lora = jlora.LoraConfig(r=RANK, alpha=2 * RANK, target_modules=list(TARGETS))
    if spec["impl"] == "qwix":
        import qwix

        rule = qwix.LoraRule(module_path=PATTERN, rank=RANK, alpha=2.0 * RANK, **spec.get("qwix_rule", {}))
        adapted = qwix.apply_lora_to_model(model, qwix.LoraProvider([rule]))
        params = adapted.init(jax.random.key(0), ids)["params"]
        if rule.weight_qtype is not None:
            params = qwix_missing_adapters(adapted, params, ids)
        params = nn_unbox(params)
        is_lora = lambda path: "_lora_" in jax.tree_util.keystr(path)
        adapters, base = _partition(params, is_lora)
        return lambda a, b, ids: causal_loss(adapted.apply({"params": _combine(a, b)}, ids), ids), adapters, base
    params = nn_unbox(model.init(jax.random.key(0), ids)["params"])
    specs = jlora.kernel_specs(model, ids)
    params = jlora.init(params, lora, jax.random.key(1), specs=specs)
    adapters, base = jlora.split(params, lora)
    if spec["impl"] == "jlora":
        forward = lambda p, ids: jlora.apply(model, p, lora, ids)
    else:
        forward = interpret.lora(lambda p, ids: model.apply({"params": p}, ids), lora)
    return lambda a, b, ids: causal_loss(forward(jlora.join(a, b), ids), ids), adapters, base


def qwix_missing_adapters(adapted, params, ids):
    """`params` of qwix's QLoRA model with the adapters its ``init`` left out, made by one more
    forward pass with ``params`` mutable (the quantized kernels and the adapters ``init`` made
    are kept); checks that every projection then has both.

    Why (qwix 0.1.8): in a traced init (`nn.scan`'s body, a jitted init) `PtqProvider` swaps
    the kernel for its `WithAux` first (providers/ptq.py:149-157), so `LoraProvider` looks the
    weight up from the float tracer (providers/lora.py:263, `flax_util.find_param`), which walks
    it back through unary ops and matches shapes against the walked-to array
    (utils/flax_util.py:257-275): for `nn.DenseGeneral` that is the flat initialiser output
    before its reshape, so q/k/v/o get no adapters, and ``apply`` then raises
    `ScopeParamNotFoundError` for ``kernel_lora_a`` (lora.py:518)."""
    import jax
    from flax import traverse_util

    _, variables = adapted.apply({"params": params}, ids, rngs={"params": jax.random.key(1)}, mutable=["params"])
    params = variables["params"]
    flat = traverse_util.flatten_dict(nn_unbox(params))
    modules = {path[:-1] for path in flat if path[-1] == "kernel" and path[-2] in TARGETS}
    missing = sorted("/".join(m) for m in modules for s in ("a", "b") if (*m, f"kernel_lora_{s}") not in flat)
    if missing or {m[-1] for m in modules} != set(TARGETS):
        raise RuntimeError(f"qwix made no adapters for {missing or 'some projections'}")
    return params


def _nnx(spec: dict):
    """(loss(adapters, base, ids), adapters, base) for the NNX model on `spec["impl"]`."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jlora
    from jlora import interpret

    model = nnx_decoder(smollm2_config(spec["layers"]), nnx.Rngs(0))
    ids = jnp.zeros((BATCH, SEQ), jnp.int32)
    lora = jlora.LoraConfig(r=RANK, alpha=2 * RANK, target_modules=list(TARGETS))
    if spec["impl"] == "qwix":
        import qwix

        provider = qwix.LoraProvider([qwix.LoraRule(module_path=PATTERN, rank=RANK, alpha=2.0 * RANK)])
        model = qwix.apply_lora_to_model(model, provider, ids, rngs=nnx.Rngs(1))
        graphdef, adapters, base = nnx.split(model, nnx.LoRAParam, ...)
        return lambda a, b, ids: causal_loss(nnx.merge(graphdef, a, b)(ids), ids), adapters, base
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    fn = lambda p, ids: nnx.merge(graphdef, p)(ids)
    specs = interpret.lora_specs(fn, params, ids, targets=lora)
    params = interpret.init(params, specs, lora, jax.random.key(1))
    adapters, base = _partition(params, lambda path: interpret.is_adapter(path[-1].key))
    forward = interpret.lora(fn, lora)
    return lambda a, b, ids: causal_loss(forward(_combine(a, b), ids), ids), adapters, base


def nn_unbox(tree):
    import flax.linen as nn

    return nn.meta.unbox(tree)


def _partition(tree, keep):
    """(the leaves `keep(path)` selects, the others) as two trees of the same structure
    with None elsewhere."""
    import jax

    chosen = jax.tree_util.tree_map_with_path(lambda p, x: x if keep(p) else None, tree)
    rest = jax.tree_util.tree_map_with_path(lambda p, x: None if keep(p) else x, tree)
    return chosen, rest


def _combine(a, b):
    import jax

    return jax.tree.map(lambda x, y: x if y is None else y, b, a, is_leaf=lambda x: x is None)


def peer_train(spec: dict):
    """One side's step as a `benchmarks.workers` candidate (`train_candidates`)."""
    start = time.perf_counter()
    loss, adapters, base = (_nnx if spec["model"] == "nnx" else _linen)(spec)
    return train_candidates(loss, adapters, base, time.perf_counter() - start)


def train_candidates(loss, adapters, base, loaded: float):
    """The step of `loss(adapters, base, ids)` (AdamW after clipping at 1, adapters donated) as
    a `benchmarks.workers` candidate, with load / compile / first-step times and the compiled
    step's temporary bytes."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 49_152, (BATCH, SEQ), dtype=np.int32))

    def step(adapters, opt_state, base, ids):
        value, grads = jax.value_and_grad(loss)(adapters, base, ids)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, value

    state = [adapters, tx.init(adapters), base, ids]
    tick = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*state).compile()
    compile_s = time.perf_counter() - tick
    memory = compiled.memory_analysis()

    def run() -> None:
        state[:2] = jax.block_until_ready(compiled(*state)[:2])

    tick = time.perf_counter()
    run()
    ready = {
        "load_s": loaded,
        "compile_s": compile_s,
        "first_step_s": time.perf_counter() - tick,
        "temp_bytes": int(memory.temp_size_in_bytes) if memory is not None else None,
        "trainable": int(sum(x.size for x in jax.tree.leaves(adapters))),
    }
    return {"step": run}, ready


def main() -> None:
    from benchmarks.run import measure

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="alternating steps per side (default 20)")
    parser.add_argument("--layers", type=int, default=30, help="decoder layers (default 30, SmolLM2's)")
    args = parser.parse_args()
    sides = {
        "linen": ["jlora", "jlora-fn", "qwix"],
        "nnx": ["jlora-fn", "qwix"],
    }
    rows, raw = [], {}
    for model, impls in sides.items():
        specs = {impl: {"side": "peer", "model": model, "impl": impl, "layers": args.layers} for impl in impls}
        print(f"{model}: {', '.join(impls)}, {args.rounds} rounds", flush=True)
        times, info = measure(specs, [(impl, "step") for impl in impls], args.rounds, lambda m: print(m, flush=True))
        raw[model] = {"times": times, "info": info}
        for impl in impls:
            if impl != "qwix":
                rows.append((model, f"{impl} ÷ qwix", ratio(times[f"{impl}:step"], times["qwix:step"]), info, impl))
        if "jlora" in impls:
            fn_over_linen = ratio(times["jlora-fn:step"], times["jlora:step"])
            rows.append((model, "jlora-fn ÷ jlora", fn_over_linen, info, "jlora-fn"))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "peers.json").write_text(json.dumps({"commit": commit(), "machine": machine(), **raw}, indent=2))
    (RESULTS / "peers.md").write_text(markdown(rows, raw, args))
    print((RESULTS / "peers.md").read_text())


def markdown(rows, raw, args) -> str:
    mib = lambda b: f"{b / 2**20:.0f} MiB" if b is not None else "n/a"
    lines = [
        f"# jlora beside qwix ({args.layers} layers, batch {BATCH} × {SEQ}, r = {RANK}, {args.rounds} rounds)",
        "",
        "| model | step time ratio | median | min–max |",
        "|---|---|---|---|",
    ]
    lines += [f"| {m} | {name} | {r['median']:.3f} | {r['min']:.3f}–{r['max']:.3f} |" for m, name, r, _, _ in rows]
    lines += ["", "| model | side | load s | compile s | first step s | temp memory | trainable |"]
    lines += ["|---|---|---|---|---|---|---|"]
    for model, data in raw.items():
        for impl, info in data["info"].items():
            lines.append(
                f"| {model} | {impl} | {info['load_s']:.1f} | {info['compile_s']:.1f} | {info['first_step_s']:.1f} | "
                f"{mib(info['temp_bytes'])} | {info['trainable']:,} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
