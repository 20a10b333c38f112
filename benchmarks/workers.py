"""One side of a benchmark in its own process: ``python -m benchmarks.workers '<spec JSON>'``.

The worker builds what its spec names (a jlora or a peft + torch train step, jlora's
inference variants, or several adapters over one base) on the SmolLM2-135M architecture,
prints one JSON line when ready (load and compile times), then reads commands on stdin:
a candidate's name runs it once and answers ``{"seconds": …}``; ``exit`` answers with the
process's peak RSS (and its high-water mark since a side last reset it) and ends. One
process per side keeps peak RSS its own, and lets the orchestrator (`benchmarks.run`) run
exactly one side at a time, so torch's and XLA's thread pools never compete.
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import sys
import tempfile
import time
from collections.abc import Callable

from benchmarks.common import BATCH, PRESET, RANK, SEQ, TARGETS

Candidates = dict[str, Callable[[], None]]
STARTED = time.perf_counter()  # the process's start, near enough (before jax is imported)


def jlora_train(spec: dict) -> tuple[Candidates, dict]:
    """A jlora train step: ``lora`` (jlora's adapters-only step), ``full`` (full fine-tuning),
    or the optax-only freezing path, differentiating the whole adapted tree: ``optax``
    (`multi_transform` with clipping inside) and ``optax-clip-outside``. With ``cache_dir``,
    jlora's caches (the GGUF load cache and XLA's compilation cache) live there, as
    ``JLORA_CACHE_DIR`` puts them for `jlora train`."""
    if spec.get("cache_dir"):
        os.environ["JLORA_CACHE_DIR"] = spec["cache_dir"]
        from jlora.finetune import compilation_cache

        compilation_cache()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import jlora
    import jlora.models
    from jlora import train as training

    start = time.perf_counter()
    pretrained = jlora.models.load(PRESET, scan=spec["scan"], dtype=jnp.dtype(spec["dtype"]), tokenizer=False)
    model = pretrained.model.clone(remat=spec.get("remat", False))
    lora = jlora.LoraConfig(r=RANK, alpha=2 * RANK, target_modules=list(TARGETS))
    task = training.Task(model, lora, "causal", tail=SEQ)
    ids = np.random.default_rng(0).integers(0, pretrained.config.vocab_size, (1, BATCH, SEQ), dtype=np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}
    clip_adamw = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4))
    mode = spec["mode"]
    if mode == "full":
        params, tx = pretrained.params, clip_adamw
    else:
        params = jlora.init(pretrained.params, lora, jax.random.key(0), specs=pretrained.kernel_specs())
    if mode == "optax":
        tx = optax.multi_transform({"trainable": clip_adamw, "frozen": optax.set_to_zero()}, jlora.labels(params, lora))
    elif mode == "optax-clip-outside":
        tx = optax.chain(
            optax.clip_by_global_norm(1.0),
            optax.multi_transform(
                {"trainable": optax.adamw(1e-4), "frozen": optax.set_to_zero()}, jlora.labels(params, lora)
            ),
        )
    loaded = time.perf_counter() - start

    if mode == "lora":  # jlora's own step, as `jlora train` runs it
        adapters, base = jlora.split(params, lora)
        tx = training.make_optimizer(training.TrainConfig(steps=10_000), lora)
        jitted = training.make_train_step(task, tx, jax.random.key(0))
        state = [adapters, tx.init(adapters), base, batch, jnp.int32(0)]
    else:  # every leaf differentiated

        def step(params, opt_state, batch):
            def loss(params):
                total, count, _ = task.loss(params, jax.tree.map(lambda a: a[0], batch))
                return total / count

            updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        jitted = jax.jit(step, donate_argnums=(0, 1))
        state = [params, tx.init(params), batch]
    tick = time.perf_counter()
    compiled = jitted.lower(*state).compile()
    compile_s = time.perf_counter() - tick

    def run() -> None:
        state[:2] = jax.block_until_ready(compiled(*state)[:2])

    tick = time.perf_counter()
    run()
    ready = {
        "load_s": loaded,
        "compile_s": compile_s,
        "first_step_s": time.perf_counter() - tick,
        "since_start_s": time.perf_counter() - STARTED,  # imports, load, compile and the step
    }
    if spec.get("compile_only"):
        return {}, ready
    candidates = {"step": run}
    if spec.get("matmul_peak"):
        candidates |= matmul_candidates()
    return candidates, ready


def matmul_candidates(n: int = 4096) -> Candidates:
    """One (n, n) @ (n, n) matmul in float32, and in bfloat16 with float32 accumulation."""
    import jax
    import jax.numpy as jnp

    a, b = (jax.random.normal(jax.random.key(i), (n, n)) for i in range(2))
    f32 = jax.jit(lambda a, b: a @ b)
    bf16 = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    for fn, args in ((f32, (a, b)), (bf16, (a16, b16))):
        jax.block_until_ready(fn(*args))
    return {
        "matmul_f32": lambda: jax.block_until_ready(f32(a, b)),
        "matmul_bf16": lambda: jax.block_until_ready(bf16(a16, b16)),
    }


def jlora_infer(spec: dict) -> tuple[Candidates, dict]:
    """Forward passes: the base model, merged adapters (W + s·A·B), factored adapters
    (x·W + s·x·A·B). Also reports the adapters' bytes on disk (Orbax and PEFT) and the
    base's (float32)."""
    import jax
    import numpy as np

    import jlora
    import jlora.models
    import jlora.peft
    from jlora.checkpoint import Checkpoints, fingerprint

    pretrained = jlora.models.load(PRESET, scan=True, tokenizer=False)
    model = pretrained.model
    lora = jlora.LoraConfig(r=RANK, alpha=2 * RANK, target_modules=list(TARGETS))
    params = jlora.init(pretrained.params, lora, jax.random.key(0), specs=pretrained.kernel_specs())
    params = jax.tree_util.tree_map_with_path(  # trained-looking adapters: B non-zero
        lambda p, x: 0.01 * jax.random.normal(jax.random.key(1), x.shape) if p[-1].key == "lora_b" else x, params
    )
    adapters, base = jlora.split(params, lora)
    merged = jlora.merge(params, lora)
    ids = np.random.default_rng(0).integers(0, pretrained.config.vocab_size, (BATCH, SEQ), dtype=np.int32)
    plain = jax.jit(lambda p: model.apply({"params": p}, ids))
    factored = jax.jit(lambda p: jlora.apply(model, p, lora, ids))
    inputs = {"base": (plain, base), "merged": (plain, merged), "factored": (factored, params)}
    for fn, p in inputs.values():
        jax.block_until_ready(fn(p))
    with tempfile.TemporaryDirectory() as tmp:
        with Checkpoints(tmp + "/ckpt") as checkpoints:
            checkpoints.save(1, adapters, None, config=lora, base_fingerprint=fingerprint(base))
        saved = pathlib.Path(tmp, "ckpt", "1", "adapters")
        orbax_bytes = sum(f.stat().st_size for f in saved.rglob("*") if f.is_file())
        out = jlora.peft.export(params, lora, tmp + "/peft", jlora.models.hf_module_name)
        peft_bytes = (out / "adapter_model.safetensors").stat().st_size
    ready = {
        "adapter_orbax_bytes": orbax_bytes,
        "adapter_peft_bytes": peft_bytes,
        "base_bytes": sum(x.nbytes for x in jax.tree.leaves(base)),
        "adapter_params": sum(x.size for x in jax.tree.leaves(adapters)),
    }
    return {name: (lambda fn=fn, p=p: jax.block_until_ready(fn(p))) for name, (fn, p) in inputs.items()}, ready


def jlora_multi(spec: dict) -> tuple[Candidates, dict]:
    """Four adapters over one base: a batch of 8 on the base alone, one mixed batch
    (example i with adapter i % 4, `jlora.multi.apply`), and four single-adapter batches of 2."""
    from benchmarks.multi_adapter import candidates

    return candidates(), {}


def torch_train(spec: dict) -> tuple[Candidates, dict]:
    """peft LoRA on transformers' LlamaForCausalLM of the same config (random weights: the
    same shapes and FLOPs), AdamW on the adapters, clipping at 1; float32, or bfloat16
    autocast (torch's fastest CPU setting)."""
    import peft
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    start = time.perf_counter()
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**spec["hf_config"]))
    model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(TARGETS)))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ))
    bf16 = spec["dtype"] == "bfloat16"

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    loaded = time.perf_counter() - start
    tick = time.perf_counter()
    step()
    return {"step": step}, {"load_s": loaded, "first_step_s": time.perf_counter() - tick}


def peer_train(spec: dict) -> tuple[Candidates, dict]:
    """The same LoRA step by jlora (Linen path or function transform) or qwix (`benchmarks.peers`)."""
    from benchmarks.peers import peer_train as train

    return train(spec)


def quantized_train(spec: dict) -> tuple[Candidates, dict]:
    """That LoRA step over a float32, bf16 or NF4 base (jlora), or qwix's NF4 (`benchmarks.quantized`)."""
    from benchmarks.quantized import quantized_train as train

    return train(spec)


def packing_train(spec: dict) -> tuple[Candidates, dict]:
    """The default run's step, packed or not (`benchmarks.packing`)."""
    from benchmarks.packing import packing_train as train

    return train(spec)


def rss_high_water() -> int | None:
    """Peak RSS in bytes since the start or the last `reset_rss_high_water` (Linux's VmHWM)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def reset_rss_high_water() -> None:
    """Restart VmHWM from the current RSS (Linux: ``5`` into clear_refs), so that it measures what follows."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


SIDES = {
    "jlora": jlora_train,
    "jlora-infer": jlora_infer,
    "jlora-multi": jlora_multi,
    "torch": torch_train,
    "peer": peer_train,
    "quantized": quantized_train,
    "packing": packing_train,
}


def main() -> None:
    spec = json.loads(sys.argv[1])
    candidates, ready = SIDES[spec["side"]](spec)
    print(json.dumps({"ready": ready}), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "exit":
            break
        tick = time.perf_counter()
        candidates[command]()
        print(json.dumps({"seconds": time.perf_counter() - tick}), flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_rss_bytes": peak, "high_water_rss_bytes": rss_high_water()}), flush=True)


if __name__ == "__main__":
    main()
