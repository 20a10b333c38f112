"""`init`: adapter shapes and values, target selection, and its error messages."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.tree import flatten, path_str
from tests.conftest import ALL_PROJ, TOKENS, build


def adapted(params):
    return {path_str(k[:-1]) for k in flatten(params) if k[-1] == "lora_a"}


def test_adapter_shapes_for_every_kernel_layout(transformer):
    model, base, specs, config = transformer
    params = jlora.init(base, config, jax.random.key(1), specs=specs)
    stack = (3,) if model.scan else ()
    attn = params["layers"]["block"]["attn"] if model.scan else params["layers_1"]["attn"]
    assert attn["q_proj"]["kernel"].shape == (*stack, 8, 2, 3)  # DenseGeneral embed -> (heads, head_dim)
    assert attn["q_proj"]["lora_a"].shape == (*stack, 8, 2)
    assert attn["q_proj"]["lora_b"].shape == (*stack, 2, 2, 3)
    assert attn["o_proj"]["kernel"].shape == (*stack, 2, 3, 8)  # DenseGeneral (heads, head_dim) -> embed
    assert attn["o_proj"]["lora_a"].shape == (*stack, 2, 3, 2)
    assert attn["o_proj"]["lora_b"].shape == (*stack, 2, 8)
    assert attn["mix"]["lora_a"].shape == (*stack, 8, 2)  # Einsum
    assert jlora.adapter_spec(*(attn["o_proj"][n].shape for n in ("kernel", "lora_a", "lora_b"))) == jlora.KernelSpec(
        stack=len(stack), n_in=2, n_out=1
    )
    for keys, leaf in flatten(params).items():
        if keys[-1] == "lora_b":
            assert not leaf.any(), "B must start at zero"
        if keys[-1] in ("lora_a", "lora_b"):
            assert leaf.dtype == jnp.float32


def test_outputs_equal_the_base_model_exactly_after_init(transformer):
    model, base, specs, config = transformer
    params = jlora.init(base, config, jax.random.key(1), specs=specs)
    expected = model.apply({"params": base}, TOKENS)
    np.testing.assert_array_equal(jlora.apply(model, params, config, TOKENS), expected)
    np.testing.assert_array_equal(model.apply({"params": jlora.merge(params, config)}, TOKENS), expected)


def test_lora_init_is_peft_kaiming_uniform_and_gaussian_is_std_one_over_r():
    kernel = {"fc": {"kernel": jnp.zeros((400, 300))}}
    a = jlora.init(kernel, jlora.LoraConfig(r=16, target_modules=["fc"]), jax.random.key(0))["fc"]["lora_a"]
    bound = 1 / np.sqrt(400)  # kaiming_uniform_(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in))
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.99 * bound
    np.testing.assert_allclose(np.std(a), bound / np.sqrt(3), rtol=0.03)  # 6400 samples: ~1% sd error
    g = jlora.init(kernel, jlora.LoraConfig(r=16, target_modules=["fc"], init="gaussian"), jax.random.key(0))
    np.testing.assert_allclose(np.std(g["fc"]["lora_a"]), 1 / 16, rtol=0.03)


def test_module_keys_depend_on_the_path_only():
    base = {"a": {"kernel": jnp.zeros((6, 6))}, "b": {"kernel": jnp.zeros((6, 6))}}
    both = jlora.init(base, jlora.LoraConfig(r=2, target_modules=["a", "b"]), jax.random.key(0))
    one = jlora.init(base, jlora.LoraConfig(r=2, target_modules=["b"]), jax.random.key(0))
    np.testing.assert_array_equal(both["b"]["lora_a"], one["b"]["lora_a"])
    assert not np.array_equal(both["a"]["lora_a"], both["b"]["lora_a"])


def test_adapter_dtype_follows_config():
    params = jlora.init(
        {"fc": {"kernel": jnp.zeros((6, 6))}},
        jlora.LoraConfig(r=2, target_modules=["fc"], dtype=jnp.bfloat16),
        jax.random.key(0),
    )
    assert params["fc"]["lora_a"].dtype == params["fc"]["lora_b"].dtype == jnp.bfloat16


def test_exclude_modules_removes_targets(transformer):
    _model, base, specs, _config = transformer
    kept = adapted(jlora.init(base, jlora.LoraConfig(r=2, target_modules=r".*_proj"), jax.random.key(1), specs=specs))
    excluded = adapted(
        jlora.init(
            base,
            jlora.LoraConfig(r=2, target_modules=r".*_proj", exclude_modules=["k_proj"]),
            jax.random.key(1),
            specs=specs,
        )
    )
    assert any(p.endswith("k_proj") for p in kept)
    assert excluded == {p for p in kept if not p.endswith("k_proj")}


def test_rank_pattern_sets_per_module_rank(transformer):
    _model, base, specs, _ = transformer
    config = jlora.LoraConfig(r=2, target_modules=ALL_PROJ, rank_pattern={"v_proj": 4, "down_proj": 1})
    for keys, leaf in flatten(jlora.init(base, config, jax.random.key(1), specs=specs)).items():
        if keys[-1] == "lora_a":
            expected = {"v_proj": 4, "down_proj": 1}.get(keys[-2], 2)
            assert leaf.shape[-1] == expected, path_str(keys)


def test_layers_selects_unrolled_layers():
    _model, base, specs, _ = build(scan=False)
    params = jlora.init(
        base, jlora.LoraConfig(r=2, target_modules=ALL_PROJ, layers=[2]), jax.random.key(1), specs=specs
    )
    assert adapted(params) and all(p.startswith("layers_2/") for p in adapted(params))


def test_layers_selects_along_the_stacked_axis():
    _model, base, specs, _ = build(scan=True)
    params = jlora.init(
        base, jlora.LoraConfig(r=2, target_modules=ALL_PROJ, layers=[2]), jax.random.key(1), specs=specs
    )
    a = params["layers"]["block"]["up_proj"]["lora_a"]
    assert not a[:2].any() and a[2].all()
    with pytest.raises(ValueError, match=r"layers \(5,\) out of range for .*up_proj, which stacks 3 layers"):
        jlora.init(base, jlora.LoraConfig(r=2, target_modules=["up_proj"], layers=[5]), jax.random.key(1), specs=specs)


def test_no_match_lists_the_kernels_that_exist(mlp):
    _, base, _ = mlp
    with pytest.raises(ValueError) as err:
        jlora.init(base, jlora.LoraConfig(target_modules=["q_proj"]), jax.random.key(0))
    assert "match no kernel" in str(err.value) and "fc1" in str(err.value) and "fc2" in str(err.value)


def test_embedding_target_points_to_modules_to_save():
    _, base, specs, _ = build(scan=False)
    with pytest.raises(ValueError, match=r"embed_tokens.*hold no `kernel`.*modules_to_save"):
        jlora.init(base, jlora.LoraConfig(target_modules=["embed_tokens"]), jax.random.key(0), specs=specs)


def test_rank_larger_than_the_kernel_is_an_error(mlp):
    _, base, _ = mlp
    with pytest.raises(ValueError, match=r"rank 5 for fc2 exceeds min\(in, out\) = min\(16, 4\)"):
        jlora.init(base, jlora.LoraConfig(r=5, target_modules=["fc2"]), jax.random.key(0))


def test_nd_kernel_without_specs_is_not_guessed():
    _, base, _, config = build(scan=True)
    with pytest.raises(ValueError, match=r"only a 2-D kernel is evidently \(in, out\).*kernel_specs\(model"):
        jlora.init(base, config, jax.random.key(0))


def test_interleaved_einsum_kernel_is_refused_with_the_reason():
    class Gemma(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Einsum((2, 4, 3), "btd,ndh->btnh", name="q_einsum")(x)

    x = jnp.ones((1, 2, 4))
    base = Gemma().init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match=r"ordered 'oio'.*input axes before all output axes"):
        jlora.init(
            base,
            jlora.LoraConfig(r=1, target_modules=["q_einsum"]),
            jax.random.key(0),
            specs=jlora.kernel_specs(Gemma(), x),
        )


def test_other_init_errors(mlp):
    _, base, _ = mlp
    config = jlora.LoraConfig(r=2, target_modules=["fc1"])
    with pytest.raises(ValueError, match="already hold LoRA adapters"):
        jlora.init(jlora.init(base, config, jax.random.key(0)), config, jax.random.key(0))
    with pytest.raises(ValueError, match=r"modules_to_save \['head'\] match no module"):
        jlora.init(base, jlora.LoraConfig(r=2, target_modules=["fc1"], modules_to_save=["head"]), jax.random.key(0))
    with pytest.raises(ValueError, match="rank_pattern key 'fc9' matches none of the adapted modules"):
        jlora.init(base, jlora.LoraConfig(r=2, target_modules=["fc1"], rank_pattern={"fc9": 1}), jax.random.key(0))


def test_boxed_params_and_variables_dicts_are_refused_with_the_fix():
    class Logical(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
            return nn.Dense(4, kernel_init=init, name="fc")(x)

    variables = Logical().init(jax.random.key(0), jnp.ones((1, 3)))
    config = jlora.LoraConfig(r=1, target_modules=["fc"])
    with pytest.raises(ValueError, match=r"nn.Partitioned .* pass nn.meta.unbox\(params\)"):
        jlora.init(variables["params"], config, jax.random.key(0))
    with pytest.raises(ValueError, match=r"got a variables dict; pass its 'params' collection"):
        jlora.init(nn.meta.unbox(variables), config, jax.random.key(0))
    assert "lora_a" in jlora.init(nn.meta.unbox(variables)["params"], config, jax.random.key(0))["fc"]


def test_kernel_specs_learns_layouts_without_running_the_model():
    _model, _, specs, _ = build(scan=True)
    assert specs["layers/block/attn/q_proj"] == jlora.KernelSpec(stack=1, n_in=1, n_out=2)
    assert specs["layers/block/attn/o_proj"] == jlora.KernelSpec(stack=1, n_in=2, n_out=1)
    assert specs["layers/block/attn/mix"] == jlora.KernelSpec(stack=1, n_in=1, n_out=1)
    assert specs["classifier"] == jlora.KernelSpec(stack=0, n_in=1, n_out=1)


def test_kernel_specs_allocates_nothing():
    class Huge(nn.Module):  # a 4 TB kernel: only an abstract trace can look at it
        @nn.compact
        def __call__(self, x):
            return nn.DenseGeneral((1000, 1000), name="up")(x)

    specs = jlora.kernel_specs(Huge(), jax.ShapeDtypeStruct((2, 1_000_000), jnp.float32))
    assert specs == {"up": jlora.KernelSpec(stack=0, n_in=1, n_out=2)}


def test_summary_counts_trainable_parameters(transformer):
    _model, base, specs, _ = transformer
    config = jlora.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"])
    params = jlora.init(base, config, jax.random.key(1), specs=specs)
    s = jlora.summary(params, config)
    base_total = sum(x.size for x in jax.tree.leaves(base))
    adapters = 3 * 2 * (8 * 2 + 2 * 2 * 3)  # layers x {q, v} x (A + B)
    assert s.total == base_total + adapters
    assert s.trainable == adapters + 8 * 5 + 5  # + classifier kernel and bias
    assert s.by_module["q_proj"][0] == 3 * (8 * 2 + 2 * 2 * 3)
    assert s.by_module["k_proj"][0] == 0
    assert abs(s.percent - 100 * s.trainable / s.total) < 1e-12
    assert "q_proj" in str(s) and "all" in str(s)
