"""Matmul FLOPs of one LoRA train step, counted from the model's shapes.

Per token, a dense layer with kernel (n_in, n_out) costs 2·n_in·n_out FLOPs forward. In a
LoRA step every frozen kernel also costs one backward matmul (the input gradient; no weight
gradient), each adapter costs three times its forward (x·A·B forward, input and weight
gradients), and attention's two batched matmuls (QKᵀ and PV, over the full causal square
that jlora computes) cost three times their forward (gradients for both operands). Norms,
softmax and element-wise work are not counted: this is the FLOP count MFU is quoted in.
"""

from __future__ import annotations


def lora_step_flops(config, batch: int, seq: int, rank: int, targets: tuple[str, ...], full: bool = False) -> float:
    """FLOPs of one LoRA step (or, with `full`, one full fine-tuning step: every kernel's
    weight gradient too) for a `jlora.models.LlamaConfig`."""
    tokens = batch * seq
    e, m, h, kv, d = (
        config.hidden_size,
        config.intermediate_size,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
    )
    kernels = {
        "q_proj": (e, h * d),
        "k_proj": (e, kv * d),
        "v_proj": (e, kv * d),
        "o_proj": (h * d, e),
        "gate_proj": (e, m),
        "up_proj": (e, m),
        "down_proj": (m, e),
    }
    per_layer = 0.0
    frozen_factor = 3 if full else 2  # forward + input gradient (+ weight gradient)
    for name, (n_in, n_out) in kernels.items():
        per_layer += frozen_factor * 2 * tokens * n_in * n_out
        if name in targets and not full:
            per_layer += 3 * 2 * tokens * rank * (n_in + n_out)
    per_layer += 3 * 2 * (2 * batch * h * seq * seq * d)  # QKᵀ and PV, forward and two gradients
    head = frozen_factor * 2 * tokens * e * config.vocab_size  # the logits
    return config.num_layers * per_layer + head
