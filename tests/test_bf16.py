"""bfloat16 compute: jlora's projections accumulate in float32, forward and backward
(`jlora.models.layers.narrow_dot`), and float32 compute is exactly what it was."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jlora
from jlora.models import layers, llama
from jlora.models.layers import f32_dot_general, narrow_dot
from jlora.models.llama import LlamaConfig, LlamaForCausalLM
from tests.tiny_task import PROJECTIONS

IDS = jnp.asarray(np.random.default_rng(0).integers(0, 53, (2, 7)), jnp.int32)
LORA = jlora.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"])
# bf16 keeps 8 significant bits: a rounded value is within half an ulp, 2^-8 of itself, and
# two roundings of float32 sums that differ only in their order are within one ulp, 2^-7
ULP = 2.0**-7


def tiny(dtype, tied: bool) -> tuple[nn.Module, dict, dict]:
    """A 2-layer Llama (GQA 4 -> 2 heads, scanned), its LoRA adapters and frozen base."""
    config = LlamaConfig(
        vocab_size=53,
        hidden_size=24,
        intermediate_size=40,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=6,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config, scan=True, dtype=dtype)
    params = nn.meta.unbox(model.init(jax.random.key(0), IDS)["params"])
    specs = jlora.kernel_specs(model, jax.ShapeDtypeStruct(IDS.shape, IDS.dtype))
    params = jlora.init(params, LORA, jax.random.key(1), specs=specs)
    params = jax.tree_util.tree_map_with_path(  # B non-zero: the adapters change the output
        lambda p, x: 0.1 * jax.random.normal(jax.random.key(2), x.shape) if p[-1].key == "lora_b" else x, params
    )
    adapters, base = jlora.split(params, LORA)
    return model, adapters, base


def lora_loss(model, base):
    return lambda adapters: jlora.apply(model, jlora.join(adapters, base), LORA, IDS).astype(jnp.float32).mean()


def dot_generals(jaxpr):
    """Every dot_general of a jaxpr and its sub-jaxprs (scan bodies, custom rules, remat)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from dot_generals(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from dot_generals(sub)


@pytest.mark.parametrize("tied", [False, True])
def test_bf16_projections_accumulate_in_float32_forward_and_backward(tied):
    """In a bf16 LoRA step every bf16 x bf16 dot asks for a float32 accumulator, and no
    projection contracts a float32 cotangent with a bf16 operand (autodiff's transpose of a
    float32-accumulating dot, which XLA:CPU runs as a float32 GEMM)."""
    model, adapters, base = tiny(jnp.bfloat16, tied)
    jaxpr = jax.make_jaxpr(jax.grad(lora_loss(model, base)))(adapters).jaxpr
    head = "embed_tokens" if tied else "lm_head"
    narrow = dict.fromkeys(PROJECTIONS, 0)
    for eqn in dot_generals(jaxpr):
        dtypes = {v.aval.dtype for v in eqn.invars}
        where = str(eqn.source_info.name_stack)
        if jnp.dtype(jnp.bfloat16) in dtypes:
            assert eqn.params["preferred_element_type"] == jnp.float32, where
        projection = next((name for name in PROJECTIONS if name in where.split("/")), None)
        if projection is not None:
            assert len(dtypes) == 1, f"{where}: a dot of {dtypes}"
            narrow[projection] += dtypes == {jnp.dtype(jnp.bfloat16)}
    # each projection: its forward dot and its input's gradient (adapted ones: the branch's two too)
    assert all(n >= 2 for n in narrow.values()), narrow
    # the vocabulary head: the logits and the hidden states' gradient, both bf16 x bf16 -> f32
    shapes = [
        tuple(v.aval.shape for v in eqn.invars)
        for eqn in dot_generals(jaxpr)
        if {v.aval.dtype for v in eqn.invars} == {jnp.dtype(jnp.bfloat16)}
    ]
    vocab = [s for s in shapes if 53 in s[1] or 53 in s[0]]
    assert len(vocab) == 2, f"{head}: {vocab}"


def test_bf16_projection_is_its_float32_accumulation_rounded_once():
    """A bf16 Dense's output is the float32-accumulated product rounded to bf16 (bitwise),
    and its input's gradient within one bf16 ulp of the float32 product's; accumulating in
    bf16 (each partial sum rounded, as a bf16 accumulator would) is many ulps off."""
    k1, k2 = jax.random.split(jax.random.key(0))
    x = jax.random.normal(k1, (4, 512), jnp.float32).astype(jnp.bfloat16)
    dense = layers.dense(16, ("embed", "mlp"), dtype=jnp.bfloat16, param_dtype=jnp.float32, name="d")
    variables = dense.init(jax.random.key(1), x)
    w = variables["params"]["kernel"].value.astype(jnp.bfloat16)
    y, vjp = jax.vjp(lambda x: dense.apply(variables, x), x)
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    reference = lax.dot_general(x, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(reference.astype(jnp.bfloat16)))
    g = jax.random.normal(k2, y.shape, jnp.float32).astype(jnp.bfloat16)
    (dx,) = vjp(g)
    assert dx.dtype == jnp.bfloat16
    dx_exact = np.asarray(g, np.float64) @ np.asarray(w, np.float64).T
    scale = np.abs(dx_exact).max()
    np.testing.assert_allclose(np.asarray(dx, np.float64), dx_exact, rtol=ULP, atol=ULP * scale)
    # a bf16 accumulator: every partial sum rounded to bf16
    partial = np.zeros(exact.shape, np.float32)
    xs, ws = np.asarray(x, np.float32), np.asarray(w, np.float32)
    for i in range(xs.shape[1]):
        partial = np.asarray(jnp.asarray(partial + np.outer(xs[:, i], ws[i])).astype(jnp.bfloat16), np.float32)
    ours = np.abs(np.asarray(y, np.float64) - exact).max()
    bf16_accumulated = np.abs(partial - exact).max()
    assert ours <= ULP * np.abs(exact).max()
    assert bf16_accumulated > 4 * ours


DIMENSIONS = [
    ((3, 8), (8, 5), (((1,), (0,)), ((), ()))),  # Dense
    ((2, 3, 8), (8, 4, 5), (((2,), (0,)), ((), ()))),  # DenseGeneral to (heads, head_dim)
    ((2, 3, 4, 5), (4, 5, 8), (((2, 3), (0, 1)), ((), ()))),  # DenseGeneral from (heads, head_dim)
    ((2, 3, 8), (5, 8), (((2,), (1,)), ((), ()))),  # a tied head: (vocab, embed)
    ((2, 3, 8), (2, 8, 5), (((2,), (1,)), ((0,), (0,)))),  # batched
    ((8, 3, 2), (4, 8, 2), (((0, 2), (1, 2)), ((), ()))),  # contracted axes first and last: transposes
]


@pytest.mark.parametrize(("lhs", "rhs", "dimension_numbers"), DIMENSIONS)
def test_narrow_dot_gradients_are_the_float32_products_rounded(lhs, rhs, dimension_numbers):
    """`narrow_dot`'s own transposes: both gradients, for each layout, within one bf16 ulp
    of the float32 products of the same bf16 values (its output cast to bf16, as
    `f32_dot_general` returns it, so its cotangent is bf16 too)."""
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, lhs).astype(jnp.bfloat16)
    w = jax.random.normal(k2, rhs).astype(jnp.bfloat16)
    out, vjp = jax.vjp(lambda x, w: f32_dot_general(x, w, dimension_numbers), x, w)
    assert out.dtype == jnp.bfloat16
    g = jax.random.normal(k3, out.shape).astype(jnp.bfloat16)
    grads = vjp(g)
    as32 = lambda t: t.astype(jnp.float32)
    _, vjp32 = jax.vjp(lambda x, w: lax.dot_general(x, w, dimension_numbers), as32(x), as32(w))
    for got, want in zip(grads, vjp32(as32(g)), strict=True):
        assert got.dtype == jnp.bfloat16
        want = np.asarray(want, np.float64)
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=ULP, atol=ULP * np.abs(want).max())
    # float32 logits (`f32_dot`): the same gradients, from a float32 cotangent
    out = narrow_dot(x, w, dimension_numbers, None, jnp.dtype(jnp.float32))
    assert out.dtype == jnp.float32


def old_f32_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """jlora's projections' dot before `narrow_dot`."""
    out = lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=jnp.float32)
    return out.astype(jnp.result_type(lhs, rhs))


def old_f32_dot(lhs, rhs, dimension_numbers):
    return lax.dot_general(lhs, rhs, dimension_numbers, preferred_element_type=jnp.float32)


@pytest.mark.parametrize("tied", [False, True])
def test_float32_compute_is_unchanged(monkeypatch, tied):
    """In float32 the model traces to the very program it did before `narrow_dot` (same
    jaxpr, forward and LoRA gradient), and computes bitwise the same logits and gradients."""
    model, adapters, base = tiny(jnp.float32, tied)
    loss = lora_loss(model, base)
    forward = lambda adapters: jlora.apply(model, jlora.join(adapters, base), LORA, IDS)
    now = [str(jax.make_jaxpr(f)(adapters)) for f in (forward, jax.grad(loss))]
    values = [forward(adapters), jax.grad(loss)(adapters)]
    with monkeypatch.context() as patch:
        patch.setattr(layers, "f32_dot_general", old_f32_dot_general)
        patch.setattr(llama, "f32_dot", old_f32_dot)
        before = [str(jax.make_jaxpr(f)(adapters)) for f in (forward, jax.grad(loss))]
        old_values = [forward(adapters), jax.grad(loss)(adapters)]
    assert now == before
    for a, b in zip(jax.tree.leaves(values), jax.tree.leaves(old_values), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_xla_cpu_runs_the_bf16_layers_backward_as_bf16_gemms():
    """The optimized HLO (`benchmarks.bf16.HloModule`) of a bf16 Dense's forward and input
    gradient: with `f32_dot_general` both products are bf16 x bf16 -> f32 dots; autodiff of
    the float32-accumulating dot leaves an f32 x f32 one, fed by a convert of the bf16 kernel."""
    from benchmarks.bf16 import HloModule

    x = jnp.ones((4, 32, 64), jnp.bfloat16)
    w = jnp.ones((64, 96), jnp.float32)
    dims = (((2,), (0,)), ((), ()))

    def dots(dot) -> dict:
        def loss(x, w):  # the kernel an argument, a float32 parameter cast to bf16 as Linen does
            y = dot(x, w.astype(jnp.bfloat16), dims).astype(jnp.float32)
            return (y * y).sum()

        text = jax.jit(jax.grad(loss)).lower(x, w).compile().as_text()
        return HloModule(text).counts()["dots"]

    assert {dtypes for dtypes, _ in dots(f32_dot_general)} == {"bf16 x bf16 -> f32"}
    before = dots(old_f32_dot_general)
    assert ("bf16 x bf16 -> f32" in {d for d, _ in before}) and ("f32 x f32 -> f32" in {d for d, _ in before})
    assert sum(row["converted from"]["bf16"] for (d, _), row in before.items() if d == "f32 x f32 -> f32") >= 1
