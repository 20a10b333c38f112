"""Many adapters over one base (jlora.multi): per-example adapters in one compiled pass equal
each adapter alone, and weighted combinations equal peft's add_weighted_adapter.

Tolerances: float32 throughout. Against jlora.apply the sums are the same terms in another
order (and zero-padded ranks add exact zeros), so 1e-5 on logits of order 1; against torch
(another matmul library) 1e-4, as in test_peft.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
import jlora.models
import jlora.peft
from jlora import multi
from jlora.models import hf_module_name
from tests import tiny_task
from tests.conftest import TOKENS, build, perturb

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = tiny_task.PROJECTIONS
IDS = jnp.array([[5, 9, 2, 7, 11, 3], [4, 4, 8, 1, 6, 2], [3, 14, 1, 9, 22, 5], [7, 7, 2, 18, 1, 10]])
MIXED = jnp.array([0, 1, -1, 1])
WEIGHTS = [0.7, -0.4]  # a negative weight exercises peft's sign handling in "linear"


def per_row(outputs, ids):
    """Row i of outputs[ids[i]] (outputs[-1] is the base's)."""
    return np.stack([np.asarray(outputs[int(k)][row]) for row, k in enumerate(ids)])


@pytest.fixture(scope="module", params=[False, True], ids=["unrolled", "scanned"])
def adapters(request, llama):
    """The jlora Llama and two adapters of different ranks, targets, scales and rslora."""
    pretrained = jlora.models.load(llama, scan=request.param, tokenizer=False)
    configs = [
        jlora.LoraConfig(r=2, alpha=4, target_modules=TARGETS),
        jlora.LoraConfig(
            r=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], rank_pattern={"o_proj": 3}, use_rslora=True
        ),
    ]
    specs = pretrained.kernel_specs()
    return pretrained, [
        (perturb(jlora.init(pretrained.params, c, jax.random.key(i), specs=specs), jax.random.key(10 + i)), c)
        for i, c in enumerate(configs)
    ]


def test_one_compiled_forward_serves_each_adapter_the_base_and_mixed_batches(adapters):
    pretrained, pairs = adapters
    model, base = pretrained.model, pretrained.params
    stacked = multi.stack(pairs)
    forward = jax.jit(functools.partial(multi.apply, model))
    alone = [jlora.apply(model, params, config, IDS) for params, config in pairs]
    alone.append(model.apply({"params": base}, IDS))  # alone[-1]: the base
    for i, j in ((0, 1), (0, 2), (1, 2)):  # the adapters and the base tell apart
        assert not np.allclose(alone[i], alone[j], atol=1e-2)
    for k in (0, 1, -1):
        np.testing.assert_allclose(forward(base, stacked, jnp.full(4, k, jnp.int32), IDS), alone[k], atol=1e-5, rtol=0)
    np.testing.assert_allclose(forward(base, stacked, MIXED, IDS), per_row(alone, MIXED), atol=1e-5, rtol=0)
    forward(base, jax.tree.map(lambda x: -x, stacked), MIXED, IDS)  # other adapter values: same program
    assert forward._cache_size() == 1  # five calls, one compilation


def test_stacked_layout_and_rank_padding(adapters):
    pretrained, pairs = adapters
    stacked = multi.stack(pairs)
    flat = jlora.tree.flatten(stacked)
    q = next(k[:-1] for k in flat if k[-2] == "q_proj")
    layers = (2,) if "layers" in q else ()  # a scanned kernel keeps its layer axis first
    assert flat[(*q, "lora_a")].shape == (*layers, 2, 16, 4)  # (*stack, n, embed, R = max rank)
    assert flat[(*q, "lora_b")].shape == (*layers, 2, 4, 4, 4)  # (*stack, n, R, heads, head_dim)
    k = next(k[:-1] for k in flat if k[-2] == "k_proj")
    assert not np.any(flat[(*k, "lora_b")][(slice(None),) * len(layers) + (1,)])  # adapter 1 lacks k_proj: zeros
    alone = multi.stack(pairs[:1])  # adapter 0 at its own rank 2, not padded to 4
    ids = jnp.zeros(4, jnp.int32)
    np.testing.assert_allclose(
        multi.apply(pretrained.model, pretrained.params, stacked, ids, IDS),
        multi.apply(pretrained.model, pretrained.params, alone, ids, IDS),
        atol=1e-6,  # padding adds exact zeros; only the summation blocking may differ
        rtol=0,
    )


def test_generation_continues_each_prompt_with_its_own_adapter(adapters):
    pretrained, pairs = adapters
    model, base = pretrained.model, pretrained.params
    mask = jnp.array([[1] * 6, [0, 0, 1, 1, 1, 1], [1] * 6, [1, 1, 1, 1, 0, 0]])
    alone = [jlora.models.generate(model, p, IDS, mask, max_new_tokens=5, lora=c) for p, c in pairs]
    alone.append(jlora.models.generate(model, base, IDS, mask, max_new_tokens=5))
    assert not np.array_equal(alone[0], alone[-1]) and not np.array_equal(alone[1], alone[-1])
    stacked = multi.stack(pairs)
    compiled = jlora.models.generate._cache_size()  # jitted once per process, for every model
    for ids in (MIXED, jnp.array([1, 0, 0, -1])):
        tokens = jlora.models.generate(model, jlora.join(stacked, base), IDS, mask, max_new_tokens=5, adapter_ids=ids)
        np.testing.assert_array_equal(tokens, per_row(alone, ids))
    assert jlora.models.generate._cache_size() == compiled + 1  # two mixes, one compilation


def test_mixed_batch_on_every_kernel_kind_under_scan():
    """Dense, DenseGeneral in and out, and Einsum ('btd,de->bte'), in nn.scan-ned blocks."""
    model, base, specs, config = build(scan=True)
    pairs = [
        (perturb(jlora.init(base, c, jax.random.key(i), specs=specs), jax.random.key(5 + i), scale=0.05), c)
        for i, c in enumerate([config, jlora.LoraConfig(r=3, alpha=1.5, target_modules=["mix", "o_proj", "up_proj"])])
    ]
    alone = [jlora.apply(model, p, c, TOKENS) for p, c in pairs]
    ids = jnp.array([1, 0])
    np.testing.assert_allclose(
        multi.apply(model, base, multi.stack(pairs), ids, TOKENS),
        per_row(alone, ids),
        atol=1e-5,
        rtol=0,
    )


def test_mixed_batch_on_a_bert_classifier(tmp_path):
    pretrained = jlora.models.load(tiny_task.hf_bert_classifier(tmp_path / "bert"), head="classifier", tokenizer=False)
    model, base, specs = pretrained.model, pretrained.params, pretrained.kernel_specs()
    configs = [
        jlora.LoraConfig(r=2, alpha=4, target_modules=["query", "value"]),
        jlora.LoraConfig(r=3, alpha=3, target_modules=["query", "key", "dense"]),
    ]
    pairs = [
        (perturb(jlora.init(base, c, jax.random.key(i), specs=specs), jax.random.key(7 + i)), c)
        for i, c in enumerate(configs)
    ]
    ids = jnp.array([[2, 7, 9, 4, 0, 0], [3, 5, 8, 1, 6, 2], [9, 9, 4, 0, 0, 0], [1, 2, 3, 4, 5, 6]])
    mask = (ids > 0).astype(jnp.int32)
    alone = [jlora.apply(model, p, c, ids, mask) for p, c in pairs] + [model.apply({"params": base}, ids, mask)]
    choice = jnp.array([1, -1, 0, 0])
    mixed = multi.apply(model, base, multi.stack(pairs), choice, ids, mask)
    np.testing.assert_allclose(mixed, per_row(alone, choice), atol=1e-5, rtol=0)


def test_stack_and_combine_refuse_what_they_cannot_represent(adapters):
    pretrained, pairs = adapters
    with pytest.raises(ValueError, match="'linear' needs adapters of one rank"):
        multi.combine(pairs, WEIGHTS, "linear")
    adapters_only, _ = jlora.split(*pairs[0])
    with pytest.raises(ValueError, match="no weight beside them"):
        multi.stack([(adapters_only, pairs[0][1])])
    saving = jlora.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(ValueError, match="modules_to_save"):
        multi.stack([(pairs[0][0], saving)])
    with pytest.raises(ValueError, match="1-D integer"):
        multi.apply(pretrained.model, pretrained.params, multi.stack(pairs), jnp.zeros((4, 1), jnp.int32), IDS)


# -- weighted combination against peft ----------------------------------------------------------

PEFT_CASES = {"cat": {}, "linear": {}, "svd": {}, "svd_full": {"svd_rank": 8}}


@pytest.fixture(scope="module")
def peft_combined(llama, tmp_path_factory):
    """Two peft adapters (random A and B) saved, and the logits of peft's combinations of them."""
    root = tmp_path_factory.mktemp("peft")
    configs = {
        "a": peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
        ),
        "b": peft.LoraConfig(
            r=4,
            lora_alpha=16,
            target_modules=["q_proj", "k_proj", "v_proj"],
            rank_pattern={"k_proj": 2},
            init_lora_weights=False,
        ),
    }
    for i, (name, config) in enumerate(configs.items()):
        torch.manual_seed(i)
        peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(llama), config).save_pretrained(
            root / name
        )
    model = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(llama), root / "a", adapter_name="a"
    )
    model.load_adapter(root / "b", adapter_name="b")
    logits, ranks = {}, {}
    for name, kwargs in PEFT_CASES.items():
        model.add_weighted_adapter(["a", "b"], WEIGHTS, name, combination_type=name.split("_")[0], **kwargs)
        model.set_adapter(name)
        with torch.no_grad():
            logits[name] = model.eval()(input_ids=torch.tensor(np.asarray(IDS))).logits.numpy()
        ranks[name] = model.peft_config[name].r
    return root, logits, ranks


@pytest.fixture(scope="module")
def imported(llama, peft_combined):
    pretrained = jlora.models.load(llama, scan=True, tokenizer=False)
    root = peft_combined[0]
    return pretrained, [jlora.peft.load(root / name, pretrained.params, hf_module_name) for name in ("a", "b")]


@pytest.mark.parametrize("name", PEFT_CASES)
def test_combinations_equal_peft_add_weighted_adapter(imported, peft_combined, name):
    (pretrained, pairs), (_, logits, ranks) = imported, peft_combined
    combined, config = multi.combine(pairs, WEIGHTS, name.split("_")[0], **PEFT_CASES[name])
    assert config.r == ranks[name] and config.scale("q_proj", config.r) == 1.0
    ours = jlora.apply(pretrained.model, jlora.join(combined, pretrained.params), config, IDS)
    np.testing.assert_allclose(ours, logits[name], atol=1e-4, rtol=0)


def deltas(params, config=None):
    """``{module keys: ΔW}`` per layer, flattened to (*stack, in, out), times the config's scale."""
    out = {}
    for keys, leaves in jlora.tree.adapted_modules(params).items():
        a, b = leaves["lora_a"], leaves["lora_b"]
        spec = jlora.adapter_spec(leaves["kernel"].shape, a.shape, b.shape)
        stack, r = a.shape[: spec.stack], a.shape[-1]
        scale = config.scale(jlora.tree.path_str(keys), r) if config else 1.0
        out[keys] = scale * a.reshape(*stack, -1, r) @ b.reshape(*stack, r, -1)
    return out


def test_full_rank_svd_is_the_exact_weighted_sum_and_the_clamp_clips_each_layer(imported):
    pretrained, pairs = imported
    sources = [deltas(params, config) for params, config in pairs]
    full, _ = multi.combine(pairs, WEIGHTS, "svd", svd_rank=8)
    for keys, ours in deltas(jlora.join(full, pretrained.params)).items():
        exact = sum(w * source[keys] for w, source in zip(WEIGHTS, sources, strict=True) if keys in source)
        np.testing.assert_allclose(ours, exact, atol=1e-5, rtol=0)
    # not compared with peft: the clamp's bound depends on the singular vectors' signs, which torch's
    # and LAPACK's SVDs choose differently (peft's own result varies with them)
    clamped, _ = multi.combine(pairs, WEIGHTS, "svd", svd_rank=2, svd_clamp=0.9)
    plain, _ = multi.combine(pairs, WEIGHTS, "svd", svd_rank=2)
    for keys, leaves in jlora.tree.adapted_modules(plain).items():
        node = functools.reduce(lambda tree, key: tree[key], keys, clamped)
        # peft's bound: the 0.9 quantile of both factors' entries, per module of each of the 2 layers
        hi = jnp.quantile(jnp.concatenate([leaves[k].reshape(2, -1) for k in ("lora_a", "lora_b")], -1), 0.9, axis=-1)
        for k in ("lora_a", "lora_b"):
            bound = hi.reshape(2, *[1] * (leaves[k].ndim - 1))
            np.testing.assert_allclose(node[k], jnp.clip(leaves[k], -bound, bound), atol=1e-6, rtol=0)


def test_combinations_with_rslora_keep_scale_one(adapters):
    """peft 0.21 copies the first adapter's use_rslora into the combined config (alpha = r), so
    its result is sqrt(r) times too large; jlora's combined adapter always has scale 1."""
    pretrained, pairs = adapters
    params, config = pairs[1]  # use_rslora=True
    alone = jlora.apply(pretrained.model, params, config, IDS)
    # one adapter (always combined "linear", as in peft), and "cat" with the other weighted 0
    for combined, new in (multi.combine(pairs[1:], [1.0], "svd"), multi.combine(pairs[::-1], [1.0, 0.0], "cat")):
        assert not new.use_rslora
        ours = jlora.apply(pretrained.model, jlora.join(combined, pretrained.params), new, IDS)
        np.testing.assert_allclose(ours, alone, atol=1e-5, rtol=0)
