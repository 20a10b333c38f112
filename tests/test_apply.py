"""Factored `apply`: equal to merged weights, never builds ΔW, dropout on the LoRA input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jlora
from tests.conftest import TOKENS, build, perturb

# --- factored == merged, property-based over layouts, shapes, ranks and targets -----------


class Projections(nn.Module):
    """Two projections `proj` and `gate` of one kernel kind, summed."""

    kind: str
    d_in: int
    d_out: int
    heads: int

    def layer(self, name):
        if self.kind == "dense":
            return nn.Dense(self.d_out, name=name)
        if self.kind == "general_in":  # embed -> (heads, head_dim), like a q projection
            return nn.DenseGeneral((self.heads, self.d_out), name=name)
        if self.kind == "general_out":  # (heads, head_dim) -> embed, like an o projection
            return nn.DenseGeneral(self.d_out, axis=(-2, -1), name=name)
        return nn.Einsum((self.heads, self.d_in, self.d_out), "bhd,hde->be", name=name)

    @nn.compact
    def __call__(self, x):
        return self.layer("proj")(x) + self.layer("gate")(x)


class Stacked(nn.Module):
    """`Projections` scanned over 3 layers: stacked kernels with a leading layer axis."""

    inner: dict

    @nn.compact
    def __call__(self, x):
        body = lambda mdl, carry, _: (carry, mdl(carry))
        scan = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return scan(Projections(**self.inner, name="layers"), x, None)[1]


def input_shape(kind, d_in, heads):
    return (4, heads, d_in) if kind in ("general_out", "einsum") else (4, d_in)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["dense", "general_in", "general_out", "einsum"]),
    d_in=st.integers(2, 9),
    d_out=st.integers(2, 9),
    heads=st.integers(1, 3),
    r=st.integers(1, 4),
    targets=st.sampled_from([["proj"], ["gate"], ["proj", "gate"]]),
    stacked=st.booleans(),
    rslora=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_factored_equals_merged(kind, d_in, d_out, heads, r, targets, stacked, rslora, seed):
    inner = {"kind": kind, "d_in": d_in, "d_out": d_out, "heads": heads}
    model = Stacked(inner) if stacked else Projections(**inner)
    x = jax.random.normal(jax.random.key(seed), input_shape(kind, d_in, heads))
    base = model.init(jax.random.key(seed + 1), x)["params"]
    r = min(r, d_in, d_out)
    config = jlora.LoraConfig(r=r, alpha=2.0 * r, target_modules=targets, use_rslora=rslora)
    params = perturb(
        jlora.init(base, config, jax.random.key(seed + 2), specs=jlora.kernel_specs(model, x)), jax.random.key(seed)
    )
    factored = jlora.apply(model, params, config, x)
    merged = model.apply({"params": jlora.merge(params, config)}, x)
    assert not np.allclose(factored, model.apply({"params": base}, x), atol=1e-3)  # the adapters matter
    # float32: both sum at most ~30 products of O(1) terms; 1e-5 is ~100 ulp of the outputs.
    np.testing.assert_allclose(factored, merged, rtol=1e-5, atol=1e-5)
    # the factored path's own backward pass (jlora.apply._factored) against autodiff of the merged one
    adapters, frozen = jlora.split(params, config)
    weights = jax.random.normal(jax.random.key(seed + 3), factored.shape)

    def loss(adapters, x, factored: bool):
        joined = jlora.join(adapters, frozen)
        out = (
            jlora.apply(model, joined, config, x)
            if factored
            else model.apply({"params": jlora.merge(joined, config)}, x)
        )
        return (out * weights).sum()

    ours = jax.grad(loss, argnums=(0, 1))(adapters, x, True)
    theirs = jax.grad(loss, argnums=(0, 1))(adapters, x, False)
    for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)  # float32, sums of ~100 O(1) products


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_factored_equals_merged_in_bfloat16(scan):
    model, base, specs, config = build(scan, dtype=jnp.bfloat16)
    params = perturb(jlora.init(base, config, jax.random.key(1), specs=specs), jax.random.key(2))
    factored = jlora.apply(model, params, config, TOKENS)
    merged = model.apply({"params": jlora.merge(params, config)}, TOKENS)
    reference = build(scan)[0].apply({"params": jlora.merge(params, config)}, TOKENS)  # float32 compute
    assert factored.dtype == merged.dtype == jnp.bfloat16
    # bf16 keeps 8 significant bits (unit roundoff 2^-9); through 3 residual blocks each path
    # rounds activations and weights a few dozen times, so allow 2^-4 of the output scale.
    tol = 2**-4 * float(jnp.abs(reference).max())
    np.testing.assert_allclose(np.float32(factored), np.float32(merged), atol=tol)
    np.testing.assert_allclose(np.float32(factored), reference, atol=tol)


def test_apply_under_jit_matches_eager(transformer):
    model, base, specs, config = transformer
    params = perturb(jlora.init(base, config, jax.random.key(1), specs=specs), jax.random.key(2))
    jitted = jax.jit(lambda p, t: jlora.apply(model, p, config, t))
    eager = jlora.apply(model, params, config, TOKENS)
    # XLA fuses the jitted graph differently: float32 rounding only, ~10 ulp of the output scale.
    np.testing.assert_allclose(jitted(params, TOKENS), eager, atol=1e-6 * float(jnp.abs(eager).max()))


# --- ΔW is never built ---------------------------------------------------------------------


def intermediate_shapes(jaxpr) -> set[tuple[int, ...]]:
    """Shapes of every value computed in `jaxpr`, sub-jaxprs (scan bodies, pjit) included."""
    shapes = set()
    for eqn in jaxpr.eqns:
        shapes |= {tuple(v.aval.shape) for v in eqn.outvars}
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    shapes |= intermediate_shapes(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    shapes |= intermediate_shapes(sub)
    return shapes


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_factored_path_never_builds_delta_w(scan):
    model, base, specs, config = build(scan, target_modules=["up_proj"])
    params = perturb(jlora.init(base, config, jax.random.key(1), specs=specs), jax.random.key(2))
    kernel_shapes = {(8, 12), (3, 8, 12)}  # up_proj's kernel, per layer and stacked
    factored = jax.make_jaxpr(lambda p: jlora.apply(model, p, config, TOKENS))(params).jaxpr
    assert not intermediate_shapes(factored) & kernel_shapes
    merged = jax.make_jaxpr(lambda p: model.apply({"params": jlora.merge(p, config)}, TOKENS))(params).jaxpr
    assert intermediate_shapes(merged) & kernel_shapes  # the check does see a ΔW when one is built


# --- dropout ---------------------------------------------------------------------------------


def test_dropout_acts_on_the_lora_input_only(transformer):
    model, base, specs, _ = transformer
    config = jlora.LoraConfig(r=2, target_modules=["up_proj", "q_proj"], dropout=0.5)
    params = jlora.init(base, config, jax.random.key(1), specs=specs)
    run = jax.jit(
        lambda p, key, det: jlora.apply(model, p, config, TOKENS, rngs={"dropout": key}, deterministic=det),
        static_argnums=2,
    )
    # B = 0: the LoRA branch is zero, so dropout (applied to its input alone) changes nothing.
    np.testing.assert_array_equal(run(params, jax.random.key(7), False), run(params, jax.random.key(7), True))
    params = perturb(params, jax.random.key(2))
    eval_out = run(params, jax.random.key(7), True)
    np.testing.assert_array_equal(eval_out, run(params, jax.random.key(8), True))  # rng unused when deterministic
    assert not np.allclose(run(params, jax.random.key(7), False), eval_out, atol=1e-4)
    np.testing.assert_array_equal(run(params, jax.random.key(7), False), run(params, jax.random.key(7), False))
    assert not np.allclose(run(params, jax.random.key(7), False), run(params, jax.random.key(8), False), atol=1e-4)


class Linear(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="fc")(x)


def test_dropout_is_inverted_dropout_on_x():
    model, x = Linear(), jax.random.normal(jax.random.key(0), (2, 64))
    config = jlora.LoraConfig(r=2, target_modules=["fc"], dropout=0.25)
    params = perturb(
        jlora.init(model.init(jax.random.key(0), x)["params"], config, jax.random.key(1)), jax.random.key(2)
    )
    run = jax.vmap(lambda key: jlora.apply(model, params, config, x, rngs={"dropout": key}, deterministic=False))
    branch = run(jax.random.split(jax.random.key(3), 4000)) - model.apply(
        {"params": {"fc": {k: params["fc"][k] for k in ("kernel", "bias")}}}, x
    )
    s, a, b = config.scale("fc", 2), params["fc"]["lora_a"], params["fc"]["lora_b"]
    # a linear layer: E[s·drop(x)·A·B] = s·x·A·B, and each sample is s·(m ⊙ x / 0.75)·A·B
    # (4000 samples: the mean's sd is ~1% of the branch's scale, so 5% is a 5-sigma bound)
    np.testing.assert_allclose(branch.mean(0), s * x @ a @ b, atol=0.05 * float(jnp.abs(s * x @ a @ b).max()))
    assert float(branch.std(0).min()) > 0.1 * float(jnp.abs(s * x @ a @ b).max())  # and it is random


def test_dropout_needs_an_rng(mlp):
    model, base, x = mlp
    config = jlora.LoraConfig(r=2, target_modules=["fc1"], dropout=0.1)
    params = jlora.init(base, config, jax.random.key(0))
    with pytest.raises(ValueError, match="rngs has no 'dropout' key"):
        jlora.apply(model, params, config, x, deterministic=False)


def test_deterministic_reaches_the_models_own_dropout():
    class WithDropout(nn.Module):
        @nn.compact
        def __call__(self, x, deterministic: bool = True):
            return nn.Dropout(0.5)(nn.Dense(6, name="fc")(x), deterministic=deterministic)

    model, x = WithDropout(), jnp.ones((3, 4))
    config = jlora.LoraConfig(r=2, target_modules=["fc"])
    params = jlora.init(model.init(jax.random.key(0), x)["params"], config, jax.random.key(1))
    train = jlora.apply(model, params, config, x, rngs={"dropout": jax.random.key(0)}, deterministic=False)
    assert (train == 0).any() and not (jlora.apply(model, params, config, x) == 0).any()


def test_unapplied_adapters_are_an_error():
    class Raw(nn.Module):  # a matmul jlora cannot see: its adapters would be ignored silently
        @nn.compact
        def __call__(self, x):
            return x @ self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 4))

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Raw(name="raw")(nn.Dense(5, name="fc")(x))

    model, x = Model(), jnp.ones((2, 3))
    config = jlora.LoraConfig(r=1, target_modules=["raw", "fc"])
    params = jlora.init(model.init(jax.random.key(0), x)["params"], config, jax.random.key(1))
    with pytest.raises(ValueError, match=r"adapters on \['raw'\] were never applied"):
        jlora.apply(model, params, config, x)
