"""QLoRA side by side: the same LoRA train step over a float32, a bf16 and an NF4 base (jlora),
and over qwix's NF4 (`qwix.LoraProvider` with ``weight_qtype="nf4"``), in one run.

    python -m benchmarks.quantized [--rounds 10] [--layers 30]
    python -m benchmarks.quantized --smoke      # 2 layers, 2 rounds: checks that it runs

Every side: the SmolLM2-135M architecture with random weights on jlora's Linen
`LlamaForCausalLM` (scanned layers, float32 compute; `benchmarks.peers` builds it and the
step: batch 8 × 128, LoRA r = 8, alpha 16 on the seven projections, a causal-LM loss over
every position, AdamW after clipping at 1, adapters float32). The bases:

* ``jlora-f32``: every leaf float32, as initialised;
* ``jlora-bf16``: every leaf cast to bfloat16;
* ``jlora-nf4``: that bf16 base with the seven projections' kernels in jlora's NF4 (blocks of
  64, double quantization: `jlora.quantize.quantize`), embedding and norms bf16;
* ``jlora-nf4-embed``: that, with the tied embedding table in NF4 too (`quantize_embedding`,
  ``jlora train --quantize nf4 --quantize-embeddings``): looked up row by row, and the tied
  head contracts with it, dequantized at its use;
* ``qwix-nf4``: qwix's QLoRA, the projections in qwix's NF4 (``tile_size=64``, a float32 scale
  a block, no double quantization; qwix tiles only the last contracting axis, so o_proj's
  (heads, head_dim, embed) kernel gets one scale per output over all 576 inputs), embedding
  and norms cast to bf16 after qwix's init (`benchmarks.peers.qwix_missing_adapters`).

Each side is its own `benchmarks.workers` process, run alternately, one at a time (A B C D A
B …); step-time ratios are per round, median and min–max. Reported per side: the base's
bytes (`jlora.quantize.nbytes`, 4-bit dtypes at 4 bits) and the seven projections' alone,
their ratio to bf16 (target ≤ 0.30 for the quantized kernels), the compiled step's temporary
bytes (XLA's memory analysis), the peak RSS during the timed steps (Linux's VmHWM, reset after
setup and the first step) and over the whole process, and load / compile / first-step times.
Writes benchmarks/results/quantized.{md,json} (``--smoke``: quantized-smoke.{md,json}).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import time

from benchmarks.common import BATCH, RANK, SEQ, TARGETS, commit, machine, ratio

RESULTS = pathlib.Path(__file__).parent / "results"
BASELINE = "jlora-bf16"
TARGET = 0.30  # quantized base (and projection) bytes ÷ bf16's
SIDES = {
    "jlora-f32": {"impl": "jlora", "base": "float32"},
    "jlora-bf16": {"impl": "jlora", "base": "bfloat16"},
    "jlora-nf4": {"impl": "jlora", "base": "nf4"},
    "jlora-nf4-embed": {"impl": "jlora", "base": "nf4", "embeddings": True},
    "qwix-nf4": {"impl": "qwix", "base": "nf4", "qwix_rule": {"weight_qtype": "nf4", "tile_size": 64}},
}


def stored_bytes(tree) -> int:
    """Bytes of every array in `tree` at its dtype's width (`jlora.quantize.nbytes`, except that
    4-bit dtypes such as qwix's ``uint4`` codes count 4 bits, not the byte numpy gives them)."""
    import jax
    import jax.numpy as jnp

    from jlora.quantize import nbytes

    leaves = jax.tree.leaves(tree)
    four_bit = [x for x in leaves if jnp.issubdtype(x.dtype, jnp.integer) and jnp.iinfo(x.dtype).bits == 4]
    return nbytes(leaves) - sum(math.prod(x.shape) for x in four_bit) // 2


def projections(tree) -> list:
    """The seven projections' kernels in `tree` (what NF4 quantizes), a quantized one whole
    (jlora's `NF4`, qwix's `WithAux`: its shape is the kernel's)."""
    import jax

    from jlora.quantize import is_quantized

    whole = lambda x: is_quantized(x) or type(x).__name__ == "WithAux"
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=whole)[0]
    return [x for path, x in flat if any(f"'{name}'" in jax.tree_util.keystr(path) for name in TARGETS)]


def jlora_base(adapters, base, fmt: str, embeddings: bool = False):
    """jlora's base stored as `fmt`: as initialised (float32), every leaf bf16, or that with
    the projections' kernels NF4 (their layouts read off the adapters beside them), and with
    `embeddings` the embedding table too."""
    import jax
    import jax.numpy as jnp

    import jlora
    from jlora.quantize import quantize

    if fmt == "float32":
        return base
    base = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)
    if fmt == "bfloat16":
        return base
    targets = rf".*/({'|'.join(TARGETS)})/kernel" + ("|.*/embed_tokens/embedding" if embeddings else "")
    quantized = quantize(jlora.join(adapters, base), fmt, targets)
    return jlora.split(quantized, jlora.LoraConfig(target_modules=list(TARGETS)))[1]


def rest_in_bf16(base):
    """qwix's base with every float32 array that qwix left unquantized (embedding, norms) bf16."""
    import jax
    import jax.numpy as jnp
    from qwix._src.providers.ptq import WithAux

    cast = lambda x: x if isinstance(x, WithAux) else x.astype(jnp.bfloat16)
    return jax.tree.map(cast, base, is_leaf=lambda x: isinstance(x, WithAux))


def quantized_train(spec: dict):
    """One side (`SIDES`) as a `benchmarks.workers` candidate: the step, and the base's bytes.
    A qwix side that cannot build its step answers ``{"error": …}`` and is left out of the rounds."""
    try:
        return _quantized_train(spec)
    except Exception as err:
        if spec["impl"] != "qwix":
            raise
        return {}, {"error": f"{type(err).__name__}: {str(err).splitlines()[0]}"}


def _quantized_train(spec: dict):
    import gc

    from benchmarks.peers import _linen, train_candidates
    from benchmarks.workers import reset_rss_high_water

    start = time.perf_counter()
    loss, adapters, base = _linen({**spec, "model": "linen"})
    base = (
        jlora_base(adapters, base, spec["base"], spec.get("embeddings", False))
        if spec["impl"] == "jlora"
        else rest_in_bf16(base)
    )
    kernels = projections(base)
    sizes = {
        "base_bytes": stored_bytes(base),
        "kernel_bytes": stored_bytes(kernels),
        "kernel_weights": sum(math.prod(x.shape) for x in kernels),
    }
    candidates, ready = train_candidates(loss, adapters, base, time.perf_counter() - start)
    gc.collect()
    reset_rss_high_water()  # what follows: the timed steps alone
    return candidates, {**ready, **sizes}


def main() -> None:
    from benchmarks.run import measure

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, help="alternating steps per side (default 10; --smoke: 2)")
    parser.add_argument("--layers", type=int, help="decoder layers (default 30, SmolLM2's; --smoke: 2)")
    parser.add_argument("--smoke", action="store_true", help="2 layers, 2 rounds, quantized-smoke.{md,json}")
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.smoke else 10)
    layers = args.layers or (2 if args.smoke else 30)
    began = time.perf_counter()
    specs = {name: {"side": "quantized", "layers": layers, **side} for name, side in SIDES.items()}
    log = lambda text: print(f"[{time.perf_counter() - began:6.0f}s] {text}", flush=True)
    log(f"{', '.join(specs)}: {layers} layers, {rounds} rounds")
    times, info = measure(specs, [(name, "step") for name in specs], rounds, log)
    built = [name for name in specs if "error" not in info[name]]
    results = {
        "commit": commit(),
        "machine": machine(),
        "args": {"rounds": rounds, "layers": layers, "smoke": args.smoke},
        "shapes": {"batch": BATCH, "seq": SEQ, "rank": RANK, "targets": list(TARGETS)},
        "seconds": times,
        "workers": info,
        "step_ratios": {
            f"{a} ÷ {b}": ratio(times[f"{a}:step"], times[f"{b}:step"])
            for a, b in [(n, BASELINE) for n in built if n != BASELINE]
            + [("jlora-nf4", "qwix-nf4"), ("jlora-nf4-embed", "jlora-nf4")]
            if a in built and b in built
        },
        "wall_s": time.perf_counter() - began,
    }
    stem = RESULTS / ("quantized-smoke" if args.smoke else "quantized")
    RESULTS.mkdir(exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    stem.with_suffix(".md").write_text(markdown(results))
    print(stem.with_suffix(".md").read_text())


def markdown(results: dict) -> str:
    """The tables: per side bytes, memory and times; then the per-round step-time ratios."""
    mib = lambda b: f"{b / 2**20:.1f} MiB" if b is not None else "n/a"
    info, args = results["workers"], results["args"]
    bf16 = info[BASELINE]
    kernel_ratio = info["jlora-nf4"]["kernel_bytes"] / bf16["kernel_bytes"]
    lines = [
        f"# QLoRA: the LoRA step over a float32, bf16 and NF4 base ({args['layers']} layers, batch {BATCH} × {SEQ}, "
        f"r = {RANK}, {args['rounds']} rounds{', smoke run' if args['smoke'] else ''})",
        "",
        f"`python -m benchmarks.quantized{' --smoke' if args['smoke'] else ''}` at commit "
        f"`{results['commit'][:12]}`, {results['wall_s'] / 60:.1f} minutes; {results['machine']['cpu']}, "
        f"{results['machine']['cores']} cores.",
        "",
        "| side | base | ÷ bf16 | projections | ÷ bf16 | bits / weight | temp memory | peak RSS, steps "
        "| peak RSS, process | median step s | load / compile / first step s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, w in info.items():
        if "error" in w:
            continue
        seconds = statistics.median(results["seconds"][f"{name}:step"])
        lines.append(
            f"| {name} | {mib(w['base_bytes'])} | {w['base_bytes'] / bf16['base_bytes']:.3f} | "
            f"{mib(w['kernel_bytes'])} | {w['kernel_bytes'] / bf16['kernel_bytes']:.3f} | "
            f"{8 * w['kernel_bytes'] / w['kernel_weights']:.2f} | {mib(w['temp_bytes'])} | "
            f"{mib(w.get('high_water_rss_bytes'))} | {mib(w['peak_rss_bytes'])} | {seconds:.3f} | "
            f"{w['load_s']:.1f} / {w['compile_s']:.1f} / {w['first_step_s']:.1f} |"
        )
    whole = info["jlora-nf4-embed"]["base_bytes"] / bf16["base_bytes"]
    met = lambda r: "met" if r <= TARGET else "**not met**"
    lines += [
        "",
        f"jlora's NF4 projections ÷ bf16's: {kernel_ratio:.3f} (target ≤ {TARGET}: {met(kernel_ratio)}). The whole "
        f"base ÷ bf16's is {info['jlora-nf4']['base_bytes'] / bf16['base_bytes']:.3f} with the tied 49,152-word "
        f"embedding left bf16 (as bitsandbytes' QLoRA keeps it; {1 - bf16['kernel_bytes'] / bf16['base_bytes']:.0%} "
        f"of the bf16 base, norms included), and {whole:.3f} with it in NF4 too (`--quantize-embeddings`; target "
        f"≤ {TARGET}: {met(whole)}).",
        "",
        "| step time ratio (per round) | median | min–max |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {r['median']:.3f} | {r['min']:.3f}–{r['max']:.3f} |" for k, r in results["step_ratios"].items()]
    failed = {name: w["error"] for name, w in info.items() if "error" in w}
    lines += ["", *(f"{name}: not measured, its step could not be built: `{error}`" for name, error in failed.items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
