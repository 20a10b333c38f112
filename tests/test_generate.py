"""KV-cache generation: token for token what repeated full forward passes give."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
import jlora.models
from jlora.models import LlamaConfig, LlamaForCausalLM

CONFIG = LlamaConfig(
    vocab_size=61, hidden_size=32, intermediate_size=40, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8
)


def tiny(scan: bool):
    model = LlamaForCausalLM(CONFIG, scan=scan)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    # scale up the random init so the greedy path is not one repeated token
    return model, jax.tree.map(lambda x: x * 4 if x.ndim > 1 else x, params)


def prompts():
    ids = jax.random.randint(jax.random.key(1), (3, 6), 1, CONFIG.vocab_size)
    mask = jnp.array([[1] * 6, [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])  # none, left and right padding
    return ids, mask


def greedy_by_full_forward(model, params, ids, mask, steps):
    """The reference: each step reruns the whole sequence and takes the last real token's argmax."""
    apply = jax.jit(lambda p, i, m, pos: model.apply({"params": p}, i, m, pos))
    out = []
    for row in range(ids.shape[0]):
        seq = [int(t) for t, m in zip(ids[row], mask[row], strict=True) if m]
        for _ in range(steps):
            logits = apply(params, jnp.array([seq]), jnp.ones((1, len(seq)), jnp.int32), jnp.arange(len(seq))[None])
            seq.append(int(jnp.argmax(logits[0, -1])))
        out.append(seq[-steps:])
    return np.array(out)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_cached_generation_matches_full_forward_passes(scan):
    model, params = tiny(scan)
    ids, mask = prompts()
    tokens = jlora.models.generate(model, params, ids, mask, max_new_tokens=7)
    expected = greedy_by_full_forward(model, params, ids, mask, 7)
    np.testing.assert_array_equal(np.asarray(tokens), expected)
    assert len(set(expected.ravel().tolist())) > 3  # a real sequence, not one repeated token


def test_generation_with_adapters_factored_equals_merged():
    model, params = tiny(scan=False)
    config = jlora.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    specs = jlora.kernel_specs(model, jnp.zeros((1, 4), jnp.int32))
    adapted = jlora.init(params, config, jax.random.key(2), specs=specs)
    adapted = jax.tree_util.tree_map_with_path(
        lambda p, x: jax.random.normal(jax.random.key(3), x.shape) if p[-1].key == "lora_b" else x, adapted
    )
    ids, mask = prompts()
    factored = jlora.models.generate(model, adapted, ids, mask, max_new_tokens=6, lora=config)
    merged = jlora.models.generate(model, jlora.merge(adapted, config), ids, mask, max_new_tokens=6)
    base = jlora.models.generate(model, params, ids, mask, max_new_tokens=6)
    np.testing.assert_array_equal(factored, merged)
    assert not np.array_equal(factored, base)  # the adapters change what is generated


def test_eos_stops_a_sequence_and_pads_the_rest():
    model, params = tiny(scan=False)
    ids, mask = prompts()
    free = np.asarray(jlora.models.generate(model, params, ids, mask, max_new_tokens=6))
    eos = int(free[0, 2])
    tokens = np.asarray(
        jlora.models.generate(model, params, ids, mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    )
    np.testing.assert_array_equal(tokens[0, :3], free[0, :3])
    assert (tokens[0, 3:] == 0).all()


def test_sampling_top_p_and_temperature():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 4000)
    draws = jax.vmap(lambda k: jlora.models.sample(logits, k, 1.0, 0.7))(keys)[:, 0]
    counts = np.bincount(np.asarray(draws), minlength=4) / 4000
    assert counts[2] == counts[3] == 0  # outside the 0.7 nucleus {0, 1}
    np.testing.assert_allclose(counts[:2], [0.5 / 0.8, 0.3 / 0.8], atol=0.03)  # renormalised; 3 sd of 4000 draws
    assert (jlora.models.sample(logits, keys[0], 0.0, 1.0) == 0).all()
    hot = jax.vmap(lambda k: jlora.models.sample(logits, k, 100.0, 1.0))(keys)[:, 0]
    assert np.bincount(np.asarray(hot), minlength=4).min() > 800  # near uniform at high temperature
