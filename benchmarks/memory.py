"""Bytes per device of LoRA training for Llama-3-8B and Llama-3-70B shapes on a mesh.

Nothing is allocated: parameter shapes come from `jax.eval_shape` of jlora's Llama model
(scanned layers) with the real configurations (a quantized base, QLoRA, by `jax.eval_shape`
of `jlora.quantize` too), their shardings from `jlora.sharding`'s rules, and activations
from the residuals that the LoRA step saves for its backward pass (`jax.ad_checkpoint` on an
abstract trace of the real loss), for one device's share of the batch. Writes the top of
`benchmarks/results/memory.md` (the sections after it, `benchmarks.step_memory`'s, are kept).

python benchmarks/memory.py [--mesh fsdp=8 --mesh fsdp=16] [--quantize bf16 --quantize nf4]
                            [--local-batch 1] [--seq 2048]
"""

from __future__ import annotations

import argparse
import math
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax._src.ad_checkpoint import saved_residuals

import jlora
from jlora import quantize, sharding
from jlora.models import LlamaConfig, LlamaForCausalLM
from jlora.tree import flatten

LLAMA3 = {
    "Llama-3-8B": LlamaConfig(128256, 4096, 14336, 32, 32, 8, 128, rope_theta=500000.0),
    "Llama-3-70B": LlamaConfig(128256, 8192, 28672, 80, 64, 8, 128, rope_theta=500000.0),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GIB = 2**30


def per_device_bytes(shapes, specs, axis_sizes) -> float:
    """Bytes one device holds of `shapes` sharded by `specs` (PartitionSpecs; a quantized
    leaf has one per array)."""
    total = 0.0
    flat_specs = flatten(specs)
    for keys, leaf in flatten(shapes).items():
        arrays = jax.tree.leaves(leaf)
        for array, spec in zip(arrays, jax.tree.leaves(flat_specs[keys], is_leaf=_is_spec), strict=True):
            split = 1
            for entry in spec:
                for axis in (entry,) if isinstance(entry, str) else entry or ():
                    split *= axis_sizes[axis]
            total += math.prod(array.shape) * array.dtype.itemsize / split
    return total


def _is_spec(x) -> bool:
    return isinstance(x, jax.sharding.PartitionSpec)


def row(name: str, config: LlamaConfig, axis_sizes: dict, local: int, seq: int, r: int, dtype, fmt: str) -> dict:
    model = LlamaForCausalLM(config, scan=True, dtype=dtype, param_dtype=dtype)
    ids = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    base = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), ids)["params"]))
    lora = jlora.LoraConfig(r=r, alpha=2 * r, target_modules=TARGETS)
    kernel_specs = jlora.kernel_specs(model, ids)
    params = jax.eval_shape(lambda p: jlora.init(p, lora, jax.random.key(0), specs=kernel_specs), base)
    logical = sharding.logical_specs(model, ids)
    adapter_specs, _ = jlora.split(
        sharding.adapter_specs(params, sharding.partition_specs(params, logical, axis_sizes)), lora
    )
    if fmt != "bf16":  # the frozen projections and lm_head; embeddings and norms stay bf16
        params = jax.eval_shape(lambda p: quantize.quantize_model(p, fmt, kernel_specs, lora), params)
    adapters, frozen = jlora.split(params, lora)
    _, base_specs = jlora.split(sharding.partition_specs(params, logical, axis_sizes), lora)
    tokens = jax.ShapeDtypeStruct((local, seq), jnp.int32)

    def residuals(model) -> int:
        def loss(adapters, frozen, tokens):
            logits = jlora.apply(model, jlora.join(adapters, frozen), lora, tokens)
            return jax.nn.logsumexp(logits.astype(jnp.float32), -1).mean()

        saved = saved_residuals(loss, adapters, frozen, tokens)  # the parameters themselves are counted above
        return sum(math.prod(a.shape) * a.dtype.itemsize for a, why in saved if not why.startswith("from the argument"))

    kept = residuals(model)
    # remat=True keeps each layer's input; the layer being differentiated is recomputed whole
    kept_remat = residuals(model.clone(remat=True)) + kept / config.num_layers
    adapter_bytes = per_device_bytes(adapters, adapter_specs, axis_sizes)
    return {
        "model": name,
        "parameters": sum(math.prod(x.shape) for x in jax.tree.leaves(base)),
        "base": per_device_bytes(frozen, base_specs, axis_sizes),
        "adapters": adapter_bytes,
        "optimizer": 2 * adapter_bytes * 4 / jnp.dtype(lora.dtype).itemsize,  # Adam: two float32 moments
        "activations": kept / axis_sizes["tensor"],
        "activations_remat": kept_remat / axis_sizes["tensor"],
        "global_batch": local * axis_sizes["data"] * axis_sizes["fsdp"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mesh", action="append", help="mesh spec; repeat for several (default: two)")
    parser.add_argument("--quantize", action="append", choices=quantize.FORMATS, help="base format; repeat")
    parser.add_argument("--local-batch", type=int, default=1, help="sequences per data-parallel rank")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "memory.md"))
    args = parser.parse_args()
    lines = [
        f"Bytes per device for LoRA r={args.rank} on all seven projections: bf16 compute, the base in bf16 or nf4 "
        "(the base column), float32 "
        f"adapters and Adam state, {args.local_batch} sequence(s) of {args.seq} tokens per data-parallel rank. "
        "From `python benchmarks/memory.py` (shapes by `jax.eval_shape`, no allocation).",
        "",
        "| model | mesh | global batch | base | base bytes | adapters | optimizer state | activations | total "
        "| activations, remat | total, remat |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for spec in args.mesh or ["fsdp=8", "fsdp=16", "data=8,fsdp=8,tensor=4"]:
        sizes = sharding.parse_mesh(spec, math.prod(int(part.split("=")[1]) for part in spec.split(",")))
        for name, config in LLAMA3.items():
            for fmt in args.quantize or ["bf16", "nf4"]:
                r = row(name, config, sizes, args.local_batch, args.seq, args.rank, jnp.bfloat16, fmt)
                cells = [r["base"], r["adapters"], r["optimizer"]]
                columns = [*cells, r["activations"], sum(cells) + r["activations"]]
                columns += [r["activations_remat"], sum(cells) + r["activations_remat"]]
                lines.append(
                    f"| {name} ({r['parameters'] / 1e9:.2f} B) | {spec} ({math.prod(sizes.values())} devices) | "
                    f"{r['global_batch']} | {fmt} | " + " | ".join(f"{c / GIB:.2f} GiB" for c in columns) + " |"
                )
    lines += [
        "",
        "Activations are the residuals the step saves for its backward pass, divided by the tensor axis (which "
        "splits the heads and MLP width that hold nearly all of them). They dominate: jlora's attention keeps "
        "the (heads, seq, seq) probabilities, about 0.5 GiB per layer per 2,048-token sequence at 32 heads. "
        "With `remat=True` (`jlora train --remat`) each layer keeps only its input, and the layer being "
        "differentiated is recomputed whole (counted: one layer's residuals on top), for about one more "
        "forward pass of time. XLA's temporaries come on top.",
        "",
        "An nf4 base (`jlora train --quantize nf4`: the seven projections and lm_head in NF4 with double "
        "quantization, 4.13 bits a weight; embeddings and norms bf16) shards like the bf16 weights it replaces "
        "(blocks along the sharded axis, `jlora.quantize.partition_specs`). fsdp=8 is one 8×H100 host; fsdp=16 "
        "a v5e-16 slice (16 GiB of HBM a chip).",
    ]
    out = pathlib.Path(args.out)
    # the sections after this table (from "## …" on: `benchmarks.step_memory`'s) are kept
    kept = out.read_text().partition("\n## ") if out.exists() else ("", "", "")
    out.write_text("\n".join(lines) + "\n" + (f"\n## {kept[2]}" if kept[1] else ""))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
