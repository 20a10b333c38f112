"""The training step and loop on a tiny random model and a synthetic task."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
import jlora.models
from jlora import data
from jlora import train as training
from tests import tiny_task
from tests.conftest import perturb

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import datasets

    pretrained = jlora.models.load(tiny_task.llama_dir(tmp_path_factory.mktemp("llama")))
    config = data.DataConfig(files=("unused",), seq_len=16)
    split = data.encode(datasets.Dataset.from_list(tiny_task.rows(160)), pretrained.tokenizer, config)
    lora = jlora.LoraConfig(
        r=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj", "lm_head"]
    )
    params = jlora.init(pretrained.params, lora, jax.random.key(0), specs=pretrained.kernel_specs())
    return pretrained, lora, params, split


def fresh_split(params, lora):
    """(adapters, base) with adapters copied: training donates them."""
    adapters, base = jlora.split(params, lora)
    return jax.tree.map(jnp.copy, adapters), base


def test_training_lowers_the_loss_and_leaves_the_base_bit_identical(setup):
    pretrained, lora, params, split = setup
    adapters, base = fresh_split(params, lora)
    frozen = jax.tree.map(np.array, base)
    task = training.task_for(pretrained, lora, split)
    config = training.TrainConfig(steps=150, batch_size=8, learning_rate=1e-2, warmup_steps=5)
    trained, history = training.fit(task, adapters, base, split, config, progress=False)
    first, last = np.mean([h["loss"] for h in history[:5]]), np.mean([h["loss"] for h in history[-5:]])
    assert last < 0.5 * first, (first, last)
    for before, after in zip(jax.tree.leaves(frozen), jax.tree.leaves(base), strict=True):
        np.testing.assert_array_equal(before, after)
    accuracy = training.evaluate(training.make_eval_step(task), jlora.join(trained, base), split, 32, False)
    assert accuracy["accuracy"] > 0.9  # the rule is learnable: one sentiment word decides


def test_loss_covers_the_completion_tokens_only(setup):
    pretrained, lora, params, split = setup
    batch = {k: jnp.asarray(v) for k, v in split.take(np.arange(4)).items()}
    task = training.task_for(pretrained, lora, split)
    loss, count, _ = task.loss(params, batch)
    logits = pretrained.model.apply(
        {"params": pretrained.params},
        batch["input_ids"],
        batch["attention_mask"],
        training.positions_of(batch["attention_mask"]),
    )
    logp = jax.nn.log_softmax(logits[:, :-1])
    token_logp = jnp.take_along_axis(logp, batch["input_ids"][:, 1:, None], -1)[..., 0]
    completion = batch["loss_mask"][:, 1:].astype(bool)
    assert int(count) == int(completion.sum()) == 4 * 2  # " positive"/" negative" and the end-of-text token
    np.testing.assert_allclose(loss, -token_logp[completion].sum(), rtol=1e-5)
    assert not np.isclose(loss, -token_logp[batch["attention_mask"][:, 1:].astype(bool)].sum(), rtol=1e-3)


def test_the_train_step_compiles_once(setup):
    pretrained, lora, params, split = setup
    adapters, base = fresh_split(params, lora)
    config = training.TrainConfig(steps=5, batch_size=4)
    tx = training.make_optimizer(config, lora)
    task = training.task_for(pretrained, lora, split)
    step = training.make_train_step(task, tx, jax.random.key(0))
    opt_state = tx.init(adapters)
    batches = data.Batches(split, 4)
    with jax.log_compiles():
        for i in range(5):
            adapters, opt_state, _ = step(adapters, opt_state, base, training.shape_batch(batches(i), 1), jnp.int32(i))
    assert step._cache_size() == 1


def test_gradient_accumulation_matches_one_big_batch(setup):
    pretrained, lora, params, split = setup
    adapters, base = jlora.split(params, lora)
    task = training.task_for(pretrained, lora, split)
    batch = data.Batches(split, 8)(0)
    tx = optax.sgd(1.0)  # the update is the gradient: compare gradients directly
    results = []
    for accum in (1, 2, 4):
        step = training.make_train_step(task, tx, jax.random.key(0))
        new, _, metrics = step(
            jax.tree.map(jnp.copy, adapters), tx.init(adapters), base, training.shape_batch(batch, accum), jnp.int32(0)
        )
        results.append((new, float(metrics["loss"])))
    for new, loss in results[1:]:
        assert np.isclose(loss, results[0][1], rtol=1e-5)
        for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(results[0][0]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_batches_are_a_pure_function_of_the_step(setup):
    *_, split = setup
    a, b = data.Batches(split, 8, seed=3), data.Batches(split, 8, seed=3)
    for step in (0, 7, 25, 26):  # 20 steps per epoch: 25 and 26 are in epoch 1
        np.testing.assert_array_equal(a(step)["input_ids"], b(step)["input_ids"])
    epoch = np.concatenate([a(s)["input_ids"] for s in range(a.steps_per_epoch)])
    assert len({r.tobytes() for r in epoch}) == len({r.tobytes() for r in split.arrays["input_ids"]})
    assert not np.array_equal(a(0)["input_ids"], a(a.steps_per_epoch)["input_ids"])  # reshuffled per epoch
    assert a.position(25) == (1, 5)


def test_bfloat16_compute_keeps_float32_adapters_and_state(setup):
    pretrained, lora, params, split = setup
    model = pretrained.model.clone(dtype=jnp.bfloat16)
    task = dataclasses.replace(training.task_for(pretrained, lora, split), model=model)
    adapters, base = fresh_split(params, lora)
    config = training.TrainConfig(steps=3, batch_size=8, dtype="bfloat16")
    trained, history = training.fit(task, adapters, base, split, config, progress=False)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(trained))
    assert np.isfinite([h["loss"] for h in history]).all()


def test_early_stopping_and_the_best_adapters(setup, tmp_path):
    """Held-out losses 1.0, 0.5, 0.6, 0.7 at steps 2, 4, 6, 8 with patience 2: training stops at
    step 8 (two evaluations without a new best), checkpointed there, and `best` holds step 4's
    adapters exactly (transformers' EarlyStoppingCallback and load_best_model_at_end)."""
    from jlora.checkpoint import Checkpoints, fingerprint

    pretrained, lora, params, split = setup
    adapters, base = fresh_split(params, lora)
    task = training.task_for(pretrained, lora, split)
    config = training.TrainConfig(steps=20, eval_every=2, early_stopping_patience=2, keep_best=True)
    losses, seen = iter([1.0, 0.5, 0.6, 0.7, 0.1]), {}

    def evaluate(adapters):
        seen[len(seen) * 2 + 2] = jax.tree.map(np.array, adapters)
        return {"loss": next(losses)}

    with Checkpoints(tmp_path / "ckpt") as checkpoints, Checkpoints(tmp_path / "best", max_to_keep=1) as best:
        trained, history = training.fit(
            task, adapters, base, split, config, tmp_path / "m.jsonl", False, checkpoints, None, evaluate, None, best
        )
        best.wait()
        assert [h["step"] for h in history] == list(range(1, 9)) and history[-1]["stopped_early"]
        assert checkpoints.latest_step() == 8 and best.latest_step() == 4
        kept = best.restore(jax.tree.map(jnp.zeros_like, trained), base_fingerprint=fingerprint(base)).adapters
    for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(seen[4]), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="set eval_every too"):
        training.TrainConfig(early_stopping_patience=2)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied-lm_head-adapted"])
def test_chunked_cross_entropy_equals_the_whole_loss_and_holds_one_chunk_of_logits(tied):
    """The training loss `ce_chunk` positions at a time equals the whole loss (float32: the same
    terms summed in another order, 1e-6 relative) with the same adapter gradients (1e-5), while
    the compiled gradient program's temporary memory shrinks: the (positions × vocab) logits
    and their gradient exist one chunk at a time."""
    from jlora.models.llama import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=4096, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2, num_kv_heads=1,
        head_dim=8, tie_word_embeddings=tied, final_logit_softcapping=None if tied else 30.0,
    )  # fmt: skip
    model = LlamaForCausalLM(config, scan=True)
    ids = jax.random.randint(jax.random.key(0), (4, 48), 0, 4096)
    targets = ["q_proj", "v_proj"] + ([] if tied else ["lm_head"])
    lora = jlora.LoraConfig(r=2, target_modules=targets)
    params = nn_params(model, ids)
    params = jlora.init(params, lora, jax.random.key(1), specs=jlora.kernel_specs(model, ids))
    # random B, so the adapters matter (with a constant B, lm_head's A gradient would be a
    # sum over the vocabulary of ∂loss/∂logit: 0 up to the cap, all rounding)
    params = perturb(params, jax.random.key(2), scale=0.05)
    adapters, base = jlora.split(params, lora)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "loss_mask": (ids % 3 > 0).astype(jnp.int32)}
    whole = training.Task(model, lora, "causal", tail=48)
    chunked = dataclasses.replace(whole, ce_chunk=40)  # 10 positions of each of the 4 rows: 5 chunks

    def loss_of(task):
        return lambda ad: task.loss(jlora.join(ad, base), batch, logits=False)[0]

    expected, got = loss_of(whole)(adapters), loss_of(chunked)(adapters)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    grads, reference = (jax.grad(loss_of(t))(adapters) for t in (chunked, whole))
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * float(jnp.abs(r).max()))
    memory = {
        name: jax.jit(jax.grad(loss_of(t))).lower(adapters).compile().memory_analysis().temp_size_in_bytes
        for name, t in (("whole", whole), ("chunked", chunked))
    }
    logits_bytes = 4 * 48 * 4096 * 4
    assert memory["chunked"] < memory["whole"] - logits_bytes  # at least one whole logits array fewer


def nn_params(model, ids):
    import flax.linen as nn

    return nn.meta.unbox(model.init(jax.random.key(0), ids)["params"])


@pytest.mark.parametrize("rows,length,chunk", [(3, 7, 1), (3, 7, 4), (2, 13, 5), (4, 9, 1000), (1, 1, 3)])
def test_chunked_cross_entropy_any_split(rows, length, chunk):
    """Any chunk size, with padding to whole chunks: the value and the gradients (of the hidden
    states and of the head) equal the whole loss's in float32 (1e-6 / 1e-5)."""
    keys = jax.random.split(jax.random.key(rows * 100 + length), 4)
    hidden = jax.random.normal(keys[0], (rows, length, 6))
    head_params = {"w": jax.random.normal(keys[1], (6, 11))}
    targets = jax.random.randint(keys[2], (rows, length), 0, 11)
    weights = (jax.random.uniform(keys[3], (rows, length)) > 0.3).astype(jnp.float32)
    head = lambda p, h: h @ p["w"]

    def whole(p, h):
        return (optax.softmax_cross_entropy_with_integer_labels(head(p, h), targets) * weights).sum()

    chunked = lambda p, h: training.chunked_cross_entropy(head, p, h, targets, weights, chunk)
    np.testing.assert_allclose(chunked(head_params, hidden), whole(head_params, hidden), rtol=1e-6)
    for got, want in zip(
        jax.tree.leaves(jax.grad(chunked, argnums=(0, 1))(head_params, hidden)),
        jax.tree.leaves(jax.grad(whole, argnums=(0, 1))(head_params, hidden)),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_eval_of_a_task_without_choices_is_chunked_and_equal(setup):
    """Text and chat tasks have no accuracy, so the eval step needs no logits: chunked, it gives
    the whole loss's sums (float32, 1e-6)."""
    pretrained, lora, params, split = setup
    plain = dataclasses.replace(training.task_for(pretrained, lora, split), choices=())
    chunked = dataclasses.replace(plain, ce_chunk=16)
    batch = next(iter(data.eval_batches(split, 8)))
    whole, parts = (training.make_eval_step(t)(params, batch) for t in (plain, chunked))
    assert set(whole) == set(parts) == {"loss", "tokens", "rows"}
    for name in whole:
        np.testing.assert_allclose(parts[name], whole[name], rtol=1e-6)
