"""Sequence packing: packed rows score each example as it scores alone, the packer keeps
every token in first-fit order, the padding saved is reported, and a run records it."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jlora
from jlora import cli, data
from jlora import train as training
from jlora.models import LlamaConfig, LlamaForCausalLM
from tests import tiny_task
from tests.conftest import perturb

SEQ_LEN = 16
LENGTHS = [5, 9, 3, 7, 4, 11, 2, 6]  # first fit into rows of 16: [5, 9, 2], [3, 7, 4], [11], [6]


def examples_split(lengths: list[int], seq_len: int, left_padded: bool, seed: int = 0) -> data.Split:
    """One example per row, as `data.encode` makes them (left-padded like completion rows or
    right-padded like chat rows): random tokens, the loss on a random tail of each."""
    rng = np.random.default_rng(seed)
    arrays = {
        name: np.zeros((len(lengths), seq_len), np.int32) for name in ("input_ids", "attention_mask", "loss_mask")
    }
    for row, n in enumerate(lengths):
        cols = slice(seq_len - n, seq_len) if left_padded else slice(0, n)
        arrays["input_ids"][row, cols] = rng.integers(3, 31, n)
        arrays["attention_mask"][row, cols] = 1
        arrays["loss_mask"][row, cols] = np.arange(n) >= rng.integers(1, max(n, 2))  # never the first token
    return data.Split(arrays)


@pytest.fixture(scope="module")
def adapted():
    """(model, params with non-zero adapters, LoRA config): a tiny Llama with a sliding
    window on its first layer, so packing meets the window and padding masks."""
    config = LlamaConfig(
        vocab_size=31,
        hidden_size=16,
        intermediate_size=24,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=4,
        sliding_window=4,
        layer_types=("sliding_attention", "full_attention"),
    )
    model = LlamaForCausalLM(config, scan=True)
    ids = jnp.zeros((1, SEQ_LEN), jnp.int32)
    params = nn.meta.unbox(model.init(jax.random.key(0), ids)["params"])
    lora = jlora.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
    adapted = jlora.init(params, lora, jax.random.key(1), specs=jlora.kernel_specs(model, ids))
    return model, perturb(adapted, jax.random.key(2)), lora


def per_example_losses(logits, arrays: dict, segments: np.ndarray) -> dict[tuple[int, int], float]:
    """Mean loss of each (row, segment) over its loss tokens."""
    losses = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], arrays["input_ids"][:, 1:]))
    weights = arrays["loss_mask"][:, 1:] * (segments[:, 1:] == segments[:, :-1])
    means = {}
    for row, segment in sorted({(int(r), int(segments[r, c])) for r, c in zip(*np.nonzero(segments), strict=True)}):
        own = weights[row] * (segments[row, 1:] == segment)
        means[(row, segment)] = float((losses[row] * own).sum() / own.sum())
    return means


@pytest.mark.parametrize("left_padded", [True, False], ids=["completion-like", "chat-like"])
def test_a_packed_batch_scores_each_example_as_unpacked(adapted, left_padded):
    model, params, lora = adapted
    unpacked = examples_split(LENGTHS, SEQ_LEN, left_padded)
    packed = data.pack(unpacked)
    assert len(packed) == 4
    batch = lambda split: {k: jnp.asarray(v) for k, v in split.arrays.items()}
    loss_p, n_p, logits_p = training.causal_lm_outputs(model, params, lora, batch(packed), tail=1)
    loss_u, n_u, logits_u = training.causal_lm_outputs(model, params, lora, batch(unpacked), tail=SEQ_LEN)
    assert logits_p.shape[1] == SEQ_LEN  # a packed batch is scored at every position, whatever the tail
    np.testing.assert_allclose(float(loss_p), float(loss_u), atol=1e-5, rtol=0)
    assert float(n_p) == float(n_u) == unpacked.arrays["loss_mask"][:, 1:].sum()
    alone = per_example_losses(logits_u, unpacked.arrays, unpacked.arrays["attention_mask"])
    together = per_example_losses(logits_p, packed.arrays, packed.arrays["segment_ids"])
    order = [e for examples in data.first_fit(LENGTHS, SEQ_LEN) for e in examples]
    np.testing.assert_allclose([together[k] for k in sorted(together)], [alone[(e, 1)] for e in order], atol=1e-5)


def test_the_kv_cache_path_refuses_segment_ids(adapted):
    model, params, _ = adapted
    ids = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="segment_ids"):
        model.apply({"params": params}, ids, ids + 1, ids, decode=True, segment_ids=ids + 1)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seq_len=st.integers(2, 24),
    lengths=st.lists(st.integers(1, 24), min_size=1, max_size=30),
    left_padded=st.booleans(),
)
def test_the_packer_keeps_every_token_in_first_fit_order(seq_len, lengths, left_padded):
    lengths = [min(n, seq_len) for n in lengths]  # encoded rows are truncated to seq_len already
    unpacked = examples_split(lengths, seq_len, left_padded)
    packed = data.pack(unpacked)
    again = data.pack(unpacked)
    assert all(np.array_equal(packed.arrays[k], again.arrays[k]) for k in packed.arrays)  # deterministic
    segments, positions = packed.arrays["segment_ids"], packed.arrays["positions"]
    np.testing.assert_array_equal(packed.arrays["attention_mask"], segments > 0)
    used = (segments > 0).sum(1)
    assert (used > 0).all() and all((segments[r, used[r] :] == 0).all() for r in range(len(packed)))  # padding last
    bins = data.first_fit(lengths, seq_len)
    assert sorted(e for examples in bins for e in examples) == list(range(len(lengths)))  # each example once
    real = unpacked.arrays["attention_mask"].astype(bool)
    for row, examples in enumerate(bins):
        assert examples == sorted(examples)  # in data order within a row
        assert np.array_equal(
            segments[row, : used[row]], np.repeat(np.arange(1, len(examples) + 1), [lengths[e] for e in examples])
        )
        for segment, example in enumerate(examples, 1):
            cols = segments[row] == segment
            np.testing.assert_array_equal(positions[row, cols], np.arange(lengths[example]))  # restarting
            for name in ("input_ids", "loss_mask"):  # no token lost, each example's loss mask its own
                np.testing.assert_array_equal(
                    packed.arrays[name][row, cols], unpacked.arrays[name][example, real[example]]
                )
    # first fit: a row's first example did not fit in any earlier row, so any two rows hold more than seq_len
    assert all(used[i] + used[j] > seq_len for i in range(len(used)) for j in range(i + 1, len(used)))


def test_the_padding_saved_is_reported():
    unpacked = examples_split([3, 1, 2, 2], 4, left_padded=True)
    assert data.token_use(unpacked) == {
        "packed": False,
        "examples": 4,
        "rows": 4,
        "fill_before": 0.5,
        "fill_after": 0.5,
    }
    assert data.token_use(data.pack(unpacked)) == {
        "packed": True,
        "examples": 4,
        "rows": 2,
        "fill_before": 0.5,
        "fill_after": 1.0,
    }


def test_packing_is_on_where_it_saves_rows_and_refused_where_rows_cannot_pack():
    split = examples_split(LENGTHS, SEQ_LEN, left_padded=True)
    choose = lambda batch, **kw: data.packed_for_training(data.DataConfig(**kw), split, batch)
    assert len(choose(4, task="completion")) == 4 and len(choose(5, task="completion")) == 8  # must fill a batch
    assert len(choose(5, task="chat", packing=True)) == 4 and len(choose(1, task="chat", packing=False)) == 8
    assert len(choose(1, task="text")) == 8
    for task in ("classification", "text"):
        with pytest.raises(ValueError, match=f"--packing .* the {task} task's rows cannot be packed"):
            data.DataConfig(task=task, packing=True)
    with pytest.raises(ValueError, match=r"\(packed; --no-packing keeps one example per row\)"):
        data.check_batch(data.pack(split), 5)


def test_a_run_packs_by_default_and_records_it(tmp_path, capsys):
    pytest.importorskip("transformers")
    model, csv = tiny_task.llama_dir(tmp_path / "model"), tiny_task.write_csv(tmp_path / "reviews.csv")
    out = tmp_path / "run"
    args = ["train", "--model", str(model), "--data", str(csv), "--seq-len", "32", "--eval-size", "40"]
    args += ["--batch-size", "8", "--rank", "2", "--steps", "2", "--quiet", "--out", str(out)]
    assert cli.main(args) == 0
    assert json.loads((out / "run.json").read_text())["data"]["packing"] is True
    use = json.loads((out / "results.json").read_text())["packing"]
    assert use["packed"] and use["examples"] == 200 and use["rows"] < 100 and use["fill_after"] > use["fill_before"]
    assert f"packing on: 200 examples in {use['rows']} rows" in capsys.readouterr().out
    assert cli.main([*args[:-1], str(tmp_path / "text"), "--task", "text", "--packing"]) == 2
    assert "the text task's rows cannot be packed" in capsys.readouterr().err
    assert cli.settings_from_args(cli.build_parser().parse_args(["train", "--no-packing"]))["data"]["packing"] is False
