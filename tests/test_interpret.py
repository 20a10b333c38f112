"""`jlora.interpret`: LoRA on unmodified functions (plain, Linen gemma style, NNX, ragged MoE).

For each model: adapters with B = 0 leave the output exactly as it was; after perturbing B
the factored output equals the merged one (W + s·B·A substituted) within 1e-5 in float32,
under `jit` too; gradients w.r.t. the adapters match those of the merged form; and the
compiled gradient program holds no kernel-shaped dot output (ΔW), which the merged one does.
"""

from __future__ import annotations

import math
import re
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import jlora
from jlora import interpret, multi
from jlora.tree import flatten, path_str, unflatten

# --- helpers ----------------------------------------------------------------------------


def perturb(params, key, scale=0.3):
    """Random B factors, so the adapters change the output."""
    flat = flatten(params)
    for keys, leaf in flat.items():
        if isinstance(keys[-1], str) and keys[-1].endswith("lora_b"):
            flat[keys] = scale * jax.random.normal(
                jax.random.fold_in(key, zlib.crc32(path_str(keys).encode())), leaf.shape
            )
    return unflatten(flat)


def split(params, config):
    """(adapters, join): `jlora.split`'s trainable leaves, which must be the adapters under the
    naming rule exactly, and the function that puts them back."""
    adapters, base = jlora.split(params, config)
    assert set(flatten(adapters)) == {k for k in flatten(params) if interpret.is_adapter(k[-1])}
    labels = flatten(jlora.tree.labels(params, config))
    assert {k for k, label in labels.items() if label == "trainable"} == set(flatten(adapters))
    return adapters, lambda new: jlora.join(new, base)


def kernel_dots(hlo: str, shapes) -> list[str]:
    """Dot outputs in `hlo` shaped like one of `shapes` (in any axis order): a built ΔW."""
    wanted = {tuple(sorted(s)) for s in shapes}
    dots = re.findall(r"= \w+\[([\d,]*)\]\S* dot\(", hlo)
    return [d for d in dots if tuple(sorted(int(n) for n in d.split(",") if n)) in wanted]


def check(fn, params, args, config, *, weights=None, rtol=1e-5, factored=True, merged_dots=True):
    """The acceptance checks for ``fn(params, *args)`` with `config`'s targets adapted; `rtol` above
    1e-5 (bf16 compute, where XLA may drop a program's bf16 roundings) also loosens the no-op check.
    `merged_dots`: the merged program is expected to show ΔW as a dot (the detector's control)."""
    specs = interpret.lora_specs(fn, params, *args, targets=config)
    if weights is not None:
        assert {p: s.roles for p, s in specs.items()} == weights
    adapted = interpret.init(params, specs, config, jax.random.key(7))
    wrapped = interpret.lora(fn, config)
    # init is a no-op, exactly
    no_op = 0 if rtol <= 1e-5 else rtol
    np.testing.assert_allclose(wrapped(adapted, *args), fn(params, *args), rtol=no_op, atol=no_op)

    # the merged reference keeps W + s·B·A in float32 (merging into a bf16 weight would round ΔW away)
    merge = lambda p: interpret.merge(jax.tree.map(lambda v: v.astype(jnp.float32), p), specs, config)
    adapted = perturb(adapted, jax.random.key(8))
    out = wrapped(adapted, *args)
    merged = fn(merge(adapted), *args)
    assert not np.allclose(out, fn(params, *args), atol=1e-3)  # the adapters matter
    np.testing.assert_allclose(out, merged, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(jax.jit(wrapped)(adapted, *args), out, rtol=1e-5, atol=1e-5)

    adapters, join = split(adapted, config)
    probe = jax.random.normal(jax.random.key(9), jnp.shape(out))
    loss_factored = lambda ad: jnp.sum(wrapped(join(ad), *args) * probe)
    loss_merged = lambda ad: jnp.sum(fn(merge(join(ad)), *args) * probe)
    grads, expected = (flatten(jax.grad(loss)(adapters)) for loss in (loss_factored, loss_merged))
    assert grads.keys() == flatten(adapters).keys()  # gradients reach the adapters only
    for keys in grads:
        scale = float(jnp.abs(expected[keys]).max())
        np.testing.assert_allclose(grads[keys], expected[keys], atol=10 * rtol * scale, err_msg=path_str(keys))

    flat = flatten(params)
    shapes = []
    for path, spec in specs.items():
        shape = next(leaf.shape for keys, leaf in flat.items() if path_str(keys) == path)
        shapes += [shape, tuple(n for n, role in zip(shape, spec.roles, strict=True) if role != "s")]
    programs = {
        name: jax.jit(jax.grad(loss)).lower(adapters).compile()
        for name, loss in (("factored", loss_factored), ("merged", loss_merged))
    }
    if merged_dots:
        assert kernel_dots(programs["merged"].as_text(), shapes)  # the detector sees a built ΔW
    if factored:
        assert not kernel_dots(programs["factored"].as_text(), shapes)
    return {name: c.memory_analysis().temp_size_in_bytes for name, c in programs.items()}


# --- (a) a plain function: nested dict, scan over stacked layers, remat, W @ x, dtype casts --

D, F, C, L, TOKENS = 32, 64, 48, 3, 4


def plain_params(key, dtype=jnp.float32):
    k = jax.random.split(key, 4)
    return {
        "embed": {"kernel": jax.random.normal(k[0], (16, D)) / 4},
        "layers": {  # stacked: one leading axis of L layers, stored in bfloat16
            "up": (jax.random.normal(k[1], (L, D, F)) / math.sqrt(D)).astype(dtype),
            "down": (jax.random.normal(k[2], (L, F, D)) / math.sqrt(F)).astype(dtype),
        },
        "head": jax.random.normal(k[3], (C, D)) / math.sqrt(D),  # used as W @ x
    }


def plain(params, x, compute=jnp.float32):
    def layer(h, w):
        up = h.astype(compute) @ w["up"].astype(compute)  # the weight is cast before the matmul
        return h + (jnp.tanh(up) @ w["down"].astype(compute)).astype(h.dtype), None

    h, _ = lax.scan(jax.checkpoint(layer), x @ params["embed"]["kernel"], params["layers"])
    return (params["head"] @ h.T).T


def test_plain_function_scan_remat_left_weight_cast():
    x = jax.random.normal(jax.random.key(1), (TOKENS, 16))
    params = plain_params(jax.random.key(0), jnp.bfloat16)  # bf16 weights cast to f32: exact
    config = jlora.LoraConfig(r=2, alpha=4, target_modules=["embed", "up", "down", "head"])
    weights = {"embed/kernel": "io", "layers/up": "sio", "layers/down": "sio", "head": "oi"}
    memory = check(plain, params, (x,), config, weights=weights)
    assert memory["factored"] < memory["merged"]


def test_bf16_compute():
    """f32 weights cast to bf16 before the matmul: factored ≈ merged at bf16 precision."""
    x = jax.random.normal(jax.random.key(1), (TOKENS, 16))
    fn = lambda p, x: plain(p, x, jnp.bfloat16).astype(jnp.float32)
    config = jlora.LoraConfig(r=2, alpha=4, target_modules=["up", "down"])
    check(fn, plain_params(jax.random.key(0)), (x,), config, rtol=3e-2)


def test_other_uses_see_the_merged_weight():
    """A gather, a conv and arithmetic on an adapted weight get W + s·B·A there; fallback='error' names it."""

    def fn(p, ids):
        e = p["table"][ids]  # gather
        x = e @ p["table"].T  # a contraction: teaches the layout, factored
        conv = lax.conv_general_dilated(x[None, None], p["table"][None, None, :4], (1, 1), "VALID")
        return x.sum() + conv.sum() + jnp.sum(p["table"] ** 2)

    params = {"table": jax.random.normal(jax.random.key(0), (12, 8))}
    ids = jnp.array([1, 5, 7])
    config = jlora.LoraConfig(r=2, target_modules=["table"])
    specs = interpret.lora_specs(fn, params, ids, targets=config)
    assert specs["table"].roles == "oi"
    adapted = perturb(interpret.init(params, specs, config, jax.random.key(1)), jax.random.key(2))
    out = interpret.lora(fn, config)(adapted, ids)
    np.testing.assert_allclose(out, fn(interpret.merge(adapted, specs, config), ids), rtol=1e-5)
    with pytest.raises(ValueError, match=r"table: its use by `gather`"):
        interpret.lora(fn, config, fallback="error")(adapted, ids)


def test_custom_vjp_cond_while_jit():
    """Weights passed into custom_vjp / custom_jvp functions, cond branches, loops and jit."""

    @jax.custom_vjp
    def matmul(x, w):
        return x @ w

    matmul.defvjp(lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, res[0].T @ g))

    @jax.custom_jvp
    def act(x):
        return jnp.tanh(x)

    act.defjvp(lambda primals, tangents: (jnp.tanh(primals[0]), tangents[0] / jnp.cosh(primals[0]) ** 2))

    def fn(p, x):
        x = act(matmul(x, p["a"]))
        x = lax.cond(x.sum() > 0, lambda x: x @ p["b"], lambda x: -x, x)
        x = lax.fori_loop(0, 2, lambda i, x: jnp.tanh(x @ p["stack"][i]), x)  # a scan, indexing a stack
        return jax.jit(lambda x, w: x @ w.T)(x, p["c"])

    k = jax.random.split(jax.random.key(0), 4)
    params = {
        "a": jax.random.normal(k[0], (8, 8)) / 3,
        "b": jax.random.normal(k[1], (8, 8)) / 3,
        "stack": jax.random.normal(k[2], (2, 8, 8)) / 3,
        "c": jax.random.normal(k[3], (5, 8)) / 3,
    }
    x = jax.random.normal(jax.random.key(1), (3, 8))
    config = jlora.LoraConfig(r=2, target_modules=["a", "b", "stack", "c"])
    weights = {"a": "io", "b": "io", "stack": "sio", "c": "oi"}
    check(fn, params, (x,), config, weights=weights, factored=False)  # `a` is merged for custom_vjp


def test_while_loop():
    """A weight read in a while loop's body (forward only: reverse mode has no while loops)."""
    fn = lambda p, x, n: lax.fori_loop(0, n, lambda i, x: jnp.tanh(x @ p["w"]), x)
    params, x, n = {"w": jax.random.normal(jax.random.key(0), (8, 8)) / 3}, jnp.ones((2, 8)), jnp.int32(3)
    config = jlora.LoraConfig(r=2, target_modules=["w"])
    specs = interpret.lora_specs(fn, params, x, n, targets=config)
    adapted = perturb(interpret.init(params, specs, config, jax.random.key(1)), jax.random.key(2))
    out = jax.jit(interpret.lora(fn, config, fallback="error"))(adapted, x, n)  # factored in the loop
    np.testing.assert_allclose(out, fn(interpret.merge(adapted, specs, config), x, n), rtol=1e-5, atol=1e-6)


def test_errors():
    fn = lambda p, x: x @ p["w"] + p["bias_table"].sum()
    params = {"w": jnp.ones((4, 3)), "bias_table": jnp.ones((2, 3))}
    with pytest.raises(ValueError, match="bias_table: targeted, but the function never contracts it"):
        interpret.lora_specs(fn, params, jnp.ones((2, 4)), targets=["w", "bias_table"])
    with pytest.raises(ValueError, match=r"all-linear.*needs modules that own a `kernel`"):
        interpret.lora_specs(fn, params, jnp.ones((2, 4)), targets="all-linear")
    config = jlora.LoraConfig(r=1, target_modules=["w"])
    adapted = interpret.init(
        params, interpret.lora_specs(fn, params, jnp.ones((2, 4)), targets=config), config, jax.random.key(0)
    )
    assert set(adapted) == {"w", "w_lora_a", "w_lora_b", "bias_table"}
    with pytest.raises(ValueError, match=r"adapters on \['w'\] were never applied"):
        interpret.lora(lambda p, x: x.sum(), config)(adapted, jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="have no weight beside them"):
        interpret.lora(fn, config)({**params, "v_lora_a": jnp.ones((4, 1))}, jnp.ones((2, 4)))


def test_adapter_names():
    assert interpret.adapter_names("kernel") == ("lora_a", "lora_b")
    assert interpret.adapter_names("gating_einsum") == ("gating_einsum_lora_a", "gating_einsum_lora_b")
    assert interpret.adapter_names("kernel", kernel_layout=False) == ("kernel_lora_a", "kernel_lora_b")
    assert interpret.is_adapter("lora_b") and interpret.is_adapter("w_lora_a") and not interpret.is_adapter("w")


def test_interleaved_kernel_is_named_apart_and_the_shape_readers_refuse_it():
    """An NNX Einsum kernel ``(N, D, H)`` contracted on D ('oio') gets ``kernel_lora_a``: the
    `(*stack, *in, *out)` readers (jlora.merge, peft export) would misread its layout from the
    shapes (here N == D, so the shapes fit 'ioo' too), so they refuse it by name."""
    layer = nnx.Einsum("btd,ndh->btnh", (4, 4, 6), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    params = nnx.to_pure_dict(state)
    fn = lambda p, x: nnx.merge(graphdef, p)(x)
    x = jax.random.normal(jax.random.key(1), (2, 3, 4))
    config = jlora.LoraConfig(r=2, target_modules=r"kernel")
    specs = interpret.lora_specs(fn, params, x, targets=config)
    assert specs["kernel"].roles == "oio"
    adapted = perturb(interpret.init(params, specs, config, jax.random.key(2)), jax.random.key(3))
    assert {"kernel_lora_a", "kernel_lora_b"} <= set(adapted)
    out = interpret.lora(fn, config)(adapted, x)
    np.testing.assert_allclose(out, fn(interpret.merge(adapted, specs, config), x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="kernel_lora_a: an adapter of a weight whose layout only the function"):
        jlora.merge(adapted, config)


# --- (b) Linen in the gemma style: self.param('w') + jnp.einsum, interleaved layouts, bare leaves

B, T, N, K, H, DM, FF, V = 2, 5, 4, 2, 6, 16, 40, 23


class Einsum(nn.Module):
    shape: tuple[int, ...]

    @nn.compact
    def __call__(self, eqn: str, x):
        return jnp.einsum(eqn, x, self.param("w", nn.initializers.normal(), self.shape))


class Attention(nn.Module):
    @nn.compact
    def __call__(self, x):
        q = Einsum((N, DM, H), name="q_einsum")("BTD,NDH->BTNH", x)
        k, v = Einsum((2, K, DM, H), name="kv_einsum")("BSD,CKDH->CBSKH", x)
        q = q.reshape(B, T, K, N // K, H)
        probs = jax.nn.softmax(jnp.einsum("BTKGH,BSKH->BTKGS", q, k) / math.sqrt(H), axis=-1)
        encoded = jnp.einsum("BTKGS,BSKH->BTKGH", probs, v).reshape(B, T, N, H)
        return Einsum((N, H, DM), name="attn_vec_einsum")("BTNH,NHD->BTD", encoded)


class FeedForward(nn.Module):
    @nn.compact
    def __call__(self, x):
        w_gating = self.param("gating_einsum", nn.initializers.normal(0.2), (2, FF, DM))
        gate = jax.nn.gelu(jnp.dot(x, w_gating[0].T))
        up = jnp.dot(x, w_gating[1].T)
        return jnp.dot(gate * up, self.param("linear", nn.initializers.normal(0.2), (FF, DM)))


class Gemma(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        embedding = self.param("input_embedding", nn.initializers.normal(), (V, DM))
        x = jnp.take(embedding, tokens, axis=0)
        x = x + Attention(name="attn")(x)
        x = x + FeedForward(name="mlp")(x)
        return jnp.dot(x, embedding.T)  # tied decoding


GEMMA_TARGETS = ["q_einsum", "kv_einsum", "attn_vec_einsum", "gating_einsum", "linear"]


@pytest.fixture(scope="module")
def gemma():
    model, tokens = Gemma(), jnp.arange(B * T).reshape(B, T) % V
    return model, model.init(jax.random.key(0), tokens)["params"], tokens


def test_linen_gemma_style(gemma):
    model, params, tokens = gemma
    fn = lambda p, tokens: model.apply({"params": p}, tokens)
    weights = {
        "attn/q_einsum/w": "oio",
        "attn/kv_einsum/w": "ooio",
        "attn/attn_vec_einsum/w": "iio",
        "mlp/gating_einsum": "soi",
        "mlp/linear": "io",
    }
    memory = check(fn, params, (tokens,), jlora.LoraConfig(r=2, target_modules=GEMMA_TARGETS), weights=weights)
    assert memory["factored"] < memory["merged"]


def test_gemma_style_tree_is_refused_by_the_kernel_merge(gemma):
    """jlora.merge reads layouts from kernel shapes; on `w_lora_a` adapters it refuses rather than drop them."""
    model, params, tokens = gemma
    fn = lambda p, tokens: model.apply({"params": p}, tokens)
    config = jlora.LoraConfig(r=2, target_modules=GEMMA_TARGETS)
    specs = interpret.lora_specs(fn, params, tokens, targets=config)
    adapted = interpret.init(params, specs, config, jax.random.key(0))
    with pytest.raises(ValueError, match=r"jlora\.interpret\.merge"):
        jlora.merge(adapted, config)


def test_linen_tied_embedding_gathered_and_contracted(gemma):
    """The embedding is gathered (merged there) and contracted by the decoding (factored)."""
    model, params, tokens = gemma
    fn = lambda p, tokens: model.apply({"params": p}, tokens)
    config = jlora.LoraConfig(r=2, target_modules=["input_embedding", "q_einsum"])
    check(fn, params, (tokens,), config, weights={"input_embedding": "oi", "attn/q_einsum/w": "oio"}, factored=False)


# --- (c) NNX: Linear / LinearGeneral / Einsum, a vmapped stack under nnx.scan and nnx.remat --


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.q = nnx.LinearGeneral(DM, (N, H), rngs=rngs)
        self.o = nnx.LinearGeneral((N, H), DM, axis=(-2, -1), rngs=rngs)
        self.mix = nnx.Einsum("btnh,nhd->btd", (N, H, DM), rngs=rngs)
        self.up = nnx.Linear(DM, FF, rngs=rngs)
        self.down = nnx.Linear(FF, DM, rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.q(x))
        x = x + 0.2 * (self.o(h) + self.mix(h))  # scaled residuals keep the outputs O(1)
        return x + 0.2 * self.down(jax.nn.gelu(self.up(x)))


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Block(rngs)

        self.blocks = make(rngs)
        self.head = nnx.Linear(DM, 7, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        @nnx.remat
        def body(x, block):
            return block(x)

        return self.head(body(x, self.blocks))


def test_nnx_scanned_stack():
    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    params = nnx.to_pure_dict(state)
    fn = lambda p, x: nnx.merge(graphdef, p)(x)  # a pure function of the state
    x = jax.random.normal(jax.random.key(1), (B, T, DM))
    weights = {
        "blocks/q/kernel": "sioo",
        "blocks/o/kernel": "siio",
        "blocks/mix/kernel": "siio",
        "blocks/up/kernel": "sio",
        "blocks/down/kernel": "sio",
        "head/kernel": "io",
    }
    config = jlora.LoraConfig(r=2, target_modules=["q", "o", "mix", "up", "down", "head"])
    memory = check(fn, params, (x,), config, weights=weights)
    assert memory["factored"] < memory["merged"]


# --- (d) a mixture of experts over lax.ragged_dot ------------------------------------------

E, M, D_MOE, F_MOE = 4, 8, 32, 256  # weights large beside the tokens, as in a real MoE


def moe(params, x):
    """Top-1 routing; tokens sorted by expert; grouped matmuls over stacked expert weights."""
    logits = x @ params["router"]
    expert = jnp.argmax(logits, axis=-1)
    order = jnp.argsort(expert)
    sizes = jnp.bincount(expert, length=E).astype(jnp.int32)
    xs, experts = x[order], params["experts"]
    h = jax.nn.silu(lax.ragged_dot(xs, experts["gate"], sizes)) * lax.ragged_dot(xs, experts["up"], sizes)
    y = lax.ragged_dot(h, experts["down"], sizes)
    weight = jnp.take_along_axis(jax.nn.softmax(logits), expert[:, None], axis=-1)
    return jnp.zeros_like(y).at[order].set(y) * weight


def test_ragged_dot_moe():
    k = jax.random.split(jax.random.key(0), 4)
    params = {
        "router": jax.random.normal(k[0], (D_MOE, E)),
        "experts": {
            "gate": jax.random.normal(k[1], (E, D_MOE, F_MOE)) / 6,
            "up": jax.random.normal(k[2], (E, D_MOE, F_MOE)) / 6,
            "down": jax.random.normal(k[3], (E, F_MOE, D_MOE)) / 16,
        },
    }
    x = jax.random.normal(jax.random.key(1), (M, D_MOE))
    config = jlora.LoraConfig(r=2, target_modules=["gate", "up", "down"])
    weights = {"experts/gate": "sio", "experts/up": "sio", "experts/down": "sio"}
    memory = check(moe, params, (x,), config, weights=weights)
    assert memory["factored"] < memory["merged"]


# --- batched contractions (vmap over a stack) and shard_map ---------------------------------


def test_vmapped_stack_batch_axes():
    """`jax.vmap` over stacked weights makes the stack a dot_general batch axis: per-index adapters."""

    def fn(p, x):  # x: (E, T, D)
        h = jax.vmap(lambda w, x: jnp.tanh(x @ w))(p["w_in"], x)
        return jax.vmap(lambda w, h: w @ h.T)(p["w_out"], h)  # the weight on the left, batched

    k = jax.random.split(jax.random.key(0), 3)
    params = {"w_in": jax.random.normal(k[0], (3, 24, 40)) / 5, "w_out": jax.random.normal(k[1], (3, 32, 40)) / 6}
    x = jax.random.normal(k[2], (3, 2, 24))
    config = jlora.LoraConfig(r=2, target_modules=["w_in", "w_out"])
    check(fn, params, (x,), config, weights={"w_in": "sio", "w_out": "soi"})


def test_shard_map_gets_the_merged_weight():
    mesh = jax.make_mesh((2,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    P = jax.sharding.PartitionSpec

    def fn(p, x):
        local = lambda w, x: lax.psum(x @ w, "x")  # each device holds half the input axis
        return jax.shard_map(local, mesh=mesh, in_specs=(P("x", None), P(None, "x")), out_specs=P())(p["w"], x)

    params = {"w": jax.random.normal(jax.random.key(0), (8, 6))}
    x = jax.random.normal(jax.random.key(1), (3, 8))
    config = jlora.LoraConfig(r=2, target_modules=["w"])
    specs = interpret.lora_specs(fn, params, x, targets=config)
    assert specs["w"].roles == "io"  # learned inside the shard_map body
    adapted = perturb(interpret.init(params, specs, config, jax.random.key(1)), jax.random.key(2))
    out = interpret.lora(fn, config)(adapted, x)
    np.testing.assert_allclose(out, fn(interpret.merge(adapted, specs, config), x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="w: its use by `shard_map`"):
        interpret.lora(fn, config, fallback="error")(adapted, x)


def test_reshapes_and_slices():
    """A fused projection split by reshape and by slicing follows its factors; a reshape that mixes
    input and output axes gets the merged weight."""

    def fused(p, x):  # qkv: (D, 3·H) -> (D, 3, H); a slice of the output axis
        qkv = x @ p["qkv"].reshape(24, 3, 40).reshape(24, 120)[:, :80]
        return qkv + x @ p["qkv"][:, 40:120]

    params = {"qkv": jax.random.normal(jax.random.key(0), (24, 120)) / 5}
    x = jax.random.normal(jax.random.key(1), (2, 24))
    config = jlora.LoraConfig(r=2, target_modules=["qkv"])
    check(fused, params, (x,), config, weights={"qkv": "io"}, merged_dots=False)  # XLA reassociates it

    mixed = lambda p, x: x @ p["qkv"] + x @ p["qkv"].reshape(-1)[::-1].reshape(24, 120)
    specs = interpret.lora_specs(mixed, params, x, targets=config)
    adapted = perturb(interpret.init(params, specs, config, jax.random.key(1)), jax.random.key(2))
    out = interpret.lora(mixed, config)(adapted, x)
    np.testing.assert_allclose(out, mixed(interpret.merge(adapted, specs, config), x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="qkv: its use by `reshape`"):
        interpret.lora(mixed, config, fallback="error")(adapted, x)


# --- per-example adapters (multi.lora) on any function -------------------------------


def per_example_matches_each_adapter_alone(fn, params, x, configs, n_examples):
    """Two adapters stacked: example e under ``ids[e]`` equals that adapter alone (or the base for
    -1), within 1e-5 in float32 (the same terms summed in another order); one compilation for
    every mix."""
    pairs = []
    for i, config in enumerate(configs):
        specs = interpret.lora_specs(fn, params, x, targets=config)
        adapted = perturb(interpret.init(params, specs, config, jax.random.key(i)), jax.random.key(20 + i))
        pairs.append((adapted, config))
    alone = [interpret.lora(fn, c)(p, x) for p, c in pairs] + [fn(params, x)]  # alone[-1]: the base
    assert not np.allclose(alone[0], alone[1], atol=1e-3)
    forward = jax.jit(multi.lora(fn))
    stacked = multi.stack(pairs)
    mixes = [[0, 1, -1, 1][:n_examples], [1, -1, 0, 0][:n_examples], [-1] * n_examples]
    for mix in mixes:
        out = forward(params, stacked, jnp.array(mix, jnp.int32), x)
        expected = np.stack([np.asarray(alone[k][e]) for e, k in enumerate(mix)])
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5, err_msg=str(mix))
    assert forward._cache_size() == 1


def test_per_example_plain_function_under_scan_and_remat():
    x = jax.random.normal(jax.random.key(1), (TOKENS, 16))
    params = plain_params(jax.random.key(0))
    configs = [
        jlora.LoraConfig(r=2, alpha=4, target_modules=["embed", "up", "down"]),
        jlora.LoraConfig(r=3, alpha=3, target_modules=["up"], use_rslora=True),
    ]
    no_head = lambda p, x: plain({**p, "head": jnp.eye(C, D)}, x)  # its W @ x.T is checked below
    per_example_matches_each_adapter_alone(no_head, params, x, configs, TOKENS)

    config = jlora.LoraConfig(r=2, target_modules=["head"])
    specs = interpret.lora_specs(plain, params, x, targets=config)
    stacked = multi.stack([(interpret.init(params, specs, config, jax.random.key(0)), config)])
    with pytest.raises(ValueError, match="head: per-example adapters need the examples along axis 0"):
        multi.lora(plain)(params, stacked, jnp.zeros(TOKENS, jnp.int32), x)


def test_per_example_gemma_style_and_nnx(gemma):
    model, params, tokens = gemma
    fn = lambda p, tokens: model.apply({"params": p}, tokens)
    configs = [
        jlora.LoraConfig(r=2, target_modules=GEMMA_TARGETS),
        jlora.LoraConfig(r=3, alpha=6, target_modules=["q_einsum", "gating_einsum"]),
    ]
    per_example_matches_each_adapter_alone(fn, params, tokens, configs, B)

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    net = lambda p, x: nnx.merge(graphdef, p)(x)
    x = jax.random.normal(jax.random.key(1), (B, T, DM))
    configs = [
        jlora.LoraConfig(r=2, target_modules=["q", "o", "mix", "up", "down", "head"]),
        jlora.LoraConfig(r=1, alpha=3, target_modules=["mix", "head"]),
    ]
    per_example_matches_each_adapter_alone(net, nnx.to_pure_dict(state), x, configs, B)


def test_per_example_refuses_uses_without_one_merged_weight(gemma):
    model, params, tokens = gemma
    fn = lambda p, tokens: model.apply({"params": p}, tokens)
    config = jlora.LoraConfig(r=2, target_modules=["input_embedding"])
    specs = interpret.lora_specs(fn, params, tokens, targets=config)
    stacked = multi.stack([(interpret.init(params, specs, config, jax.random.key(0)), config)])
    with pytest.raises(ValueError, match=r"input_embedding: its use by `.*` needs the weight itself"):
        multi.lora(fn)(params, stacked, jnp.zeros(B, jnp.int32), tokens)
    with pytest.raises(ValueError, match="1-D integer"):
        multi.lora(fn)(params, stacked, jnp.zeros((B, 1), jnp.int32), tokens)
