"""`remat=True` on jlora's models: the same loss and adapter gradients, less memory kept for
the backward pass."""

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

import jlora
from jlora.models import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

LLAMA = LlamaConfig(
    vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=4
)
BERT = BertConfig(vocab_size=32, hidden_size=16, num_layers=4, num_heads=2, intermediate_size=20, num_labels=3)
IDS = jax.random.randint(jax.random.key(0), (4, 64), 1, 32)


def loss_and_grads(model, lora, labels_of):
    """(loss, adapter gradients, compiled backward bytes) of one dropout-on LoRA step."""
    plain = model.clone(remat=False)
    base = nn.meta.unbox(plain.init(jax.random.key(1), IDS)["params"])
    params = jlora.init(base, lora, jax.random.key(2), specs=jlora.kernel_specs(plain, IDS))
    params = jax.tree_util.tree_map_with_path(  # non-zero B, so A gets gradients too
        lambda p, x: 0.1 * jax.random.normal(jax.random.key(len(str(p))), x.shape) if p[-1].key == "lora_b" else x,
        params,
    )
    adapters, base = jlora.split(params, lora)

    def loss(adapters):
        logits = jlora.apply(
            model, jlora.join(adapters, base), lora, IDS, rngs={"dropout": jax.random.key(3)}, deterministic=False
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels_of(logits)).mean()

    step = jax.jit(jax.value_and_grad(loss))
    value, grads = step(adapters)
    return value, grads, step.lower(adapters).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_remat_keeps_loss_and_gradients_and_saves_memory(family, scan):
    if family == "llama":
        model = LlamaForCausalLM(LLAMA, scan=scan)
        lora = jlora.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], dropout=0.1)
        labels_of = lambda logits: IDS
    else:
        model = BertForSequenceClassification(BERT, scan=scan)  # hidden and attention dropout 0.1
        lora = jlora.LoraConfig(r=4, target_modules=["query", "value"], dropout=0.1)
        labels_of = lambda logits: IDS[:, 0] % 3
    value, grads, kept = loss_and_grads(model, lora, labels_of)
    value_remat, grads_remat, kept_remat = loss_and_grads(model.clone(remat=True), lora, labels_of)
    # float32, the same operations recomputed (dropout masks included): equal up to reassociation
    np.testing.assert_allclose(value_remat, value, rtol=1e-6)
    for g, h in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_remat), strict=True):
        np.testing.assert_allclose(h, g, rtol=1e-5, atol=1e-7)
    if scan:  # XLA's temporaries: the activations saved for backward are gone. Unrolled, XLA:CPU's
        # scheduler may hoist the recomputation next to the forward pass and save nothing
        assert kept_remat < kept / 2
