"""`benchmarks.step_memory`: the attribution of a compiled training step's bytes adds up (on a
tiny Llama), and jlora's LoRA step carries no optimizer state, gradient or copy of frozen leaves."""

import jax
import pytest

from benchmarks import step_memory
from jlora.models import LlamaConfig
from jlora.tree import LORA_A, LORA_B

CONFIG = LlamaConfig(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=24,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=4,
    tie_word_embeddings=True,
)
ARGUMENTS = ("frozen params", "trainable params", "optimizer state", "batch", "step")
STEPS = [("lora", False), ("lora", True), ("full", False)]  # a compile each, about 4 s cold


@pytest.fixture(scope="module")
def steps():
    """(kind, remat) -> (Step, its attribution)."""
    out = {}
    for kind, remat in STEPS:
        step = step_memory.build(CONFIG, kind, remat, batch=3, seq=8)  # no activation of a kernel's shape
        per_layer = out[kind, False][1]["per layer"] if remat else None
        out[kind, remat] = step, step_memory.attribute(step, CONFIG, per_layer)
    return out


@pytest.mark.parametrize("kind, remat", STEPS)
def test_attribution_adds_up(steps, kind, remat):
    step, row = steps[kind, remat]
    # arguments: exactly the trees passed (less what jax.jit drops as unused: LoRA's `step`
    # scalar without dropout)
    assert sum(row.get(name, 0) for name in ARGUMENTS) == row["xla argument"]
    # every donated buffer is reused for an output
    assert row["xla alias"] == row["donated"]
    # the outputs beyond the aliased ones: the metrics, and the output tuples' tables of
    # pointers, which XLA counts too (8 bytes an element)
    outputs = jax.tree.leaves(step.compiled.out_info)
    metrics = row["xla output"] - row["xla alias"] - (4 * 4 if kind == "lora" else 0)  # four f32 metrics
    assert 0 <= metrics <= 8 * len(outputs)
    # temporaries: gradients + saved activations + kept logits + workspace, the workspace being
    # what the attribution leaves to XLA. Beyond the residuals, the backward pass holds the
    # cotangents of the layer it differentiates (about one layer's residuals), the logits'
    # gradient (the logits' size) and the gradient and update trees (the trainable tree's
    # size); with remat, the rebuilt layer's residuals, counted whole, are not all live at
    # once, so the count may exceed XLA's by up to one layer's
    assert row["activations"] > 0 and row["logits kept"] > 0
    assert -row["per layer"] <= row["workspace"] <= row["per layer"] + row["logits kept"] + row["gradients"]
    total = sum(row[name] for name in ("gradients", "activations", "logits kept", "workspace"))
    assert total == row["xla temp"]
    assert row["total"] == row["xla argument"] + row["xla temp"] + row["xla output"] - row["xla alias"]


def test_remat_keeps_fewer_activations(steps):
    plain, remat = steps["lora", False][1], steps["lora", True][1]
    assert remat["activations"] < plain["activations"] and remat["xla temp"] < plain["xla temp"]


def test_lora_step_holds_nothing_for_frozen_leaves(steps):
    step, row = steps["lora", False]
    adapters = step.args["trainable params"]
    adapter_bytes = step_memory.nbytes(adapters)
    moments = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(step.args["optimizer state"])[0]:
        if leaf.ndim:  # Adam's mu and nu; the rest are scalar counts
            assert path[-1].key in (LORA_A, LORA_B), jax.tree_util.keystr(path)
            moments.append(step_memory.nbytes(leaf))
    assert sum(moments) == 2 * adapter_bytes
    assert row["gradients"] == adapter_bytes
    assert step_memory.frozen_sized(step) == []
    # the detector sees full fine-tuning's gradients of the same leaves
    full, _ = steps["full", False]
    full.args["frozen params"] = full.args["trainable params"]
    try:
        assert step_memory.frozen_sized(full)
    finally:
        del full.args["frozen params"]
