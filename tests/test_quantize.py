"""jlora.quantize: NF4 + double quantization bit for bit against bitsandbytes, int8 bounds,
quantized leaves as pytrees, the tree transform, bytes and partition specs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jlora import quantize as Q
from jlora.sharding import make_mesh
from jlora.spec import KernelSpec

torch = pytest.importorskip("torch")
try:
    import bitsandbytes.functional as bnbf
except Exception:  # not installed, or its native library does not load here
    bnbf = None
needs_bnb = pytest.mark.skipif(bnbf is None, reason="bitsandbytes is not importable")

SHAPES = [(64, 128), (300, 200), (7, 9), (1, 1), (5, 3), (33, 1000), (256, 4096), (3, 64)]  # torch (out, in)


def _weight(out: int, inp: int, seed: int = 0, scale: float = 0.02, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(out, inp, generator=gen) * scale).to(dtype)


def _kernel(w: torch.Tensor) -> jax.Array:
    """The jlora kernel (in, out) of a torch weight (out, in), in its dtype."""
    dtype = jnp.bfloat16 if w.dtype == torch.bfloat16 else jnp.float32
    return jnp.asarray(w.float().numpy().T).astype(dtype)


def _bits(x) -> np.ndarray:
    return np.asarray(x, np.float32).view(np.uint32)


def _assert_matches_bnb(w: torch.Tensor, double_quant: bool = True) -> None:
    """jlora's NF4 leaf of ``w.T`` holds bnb's bytes and statistics, and dequantizes to
    bnb's weights, bit for bit (float32 compared as bit patterns)."""
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    leaf = jax.jit(Q.quantize_nf4, static_argnames="double_quant")(_kernel(w), double_quant=double_quant)
    np.testing.assert_array_equal(np.asarray(leaf.codes).reshape(-1), packed.numpy().reshape(-1))
    if double_quant:
        np.testing.assert_array_equal(np.asarray(leaf.absmax).reshape(-1), state.absmax.numpy())
        np.testing.assert_array_equal(_bits(leaf.absmax2), _bits(state.state2.absmax.numpy()))
        assert _bits(leaf.offset) == _bits(state.offset.numpy())
    else:
        assert leaf.absmax2 is None and leaf.offset is None
        np.testing.assert_array_equal(_bits(leaf.absmax).reshape(-1), _bits(state.absmax.numpy()))
    ours = jax.jit(Q.dequantize)(leaf)
    assert ours.dtype == _kernel(w).dtype
    theirs = bnbf.dequantize_4bit(packed, state).float().numpy().T
    np.testing.assert_array_equal(_bits(ours.astype(jnp.float32)), _bits(theirs))


@needs_bnb
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_bit_exact_with_bitsandbytes(shape, dtype, double_quant):
    _assert_matches_bnb(_weight(*shape, dtype=dtype), double_quant)


@needs_bnb
@settings(max_examples=12, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    out=st.integers(1, 96),
    inp=st.integers(1, 700),
    log_scale=st.floats(-8, 3),
    seed=st.integers(0, 2**16),
    bf16=st.booleans(),
)
def test_nf4_bit_exact_drawn(out, inp, log_scale, seed, bf16):
    w = _weight(out, inp, seed, 10.0**log_scale, torch.bfloat16 if bf16 else torch.float32)
    _assert_matches_bnb(w)


@needs_bnb
def test_nf4_edge_values_bit_exact():
    """Zeros, ties on NF4 midpoints, a zero block and outliers follow bnb's rules."""
    mids = torch.from_numpy(np.concatenate([Q._NF4_BOUNDS, -Q._NF4_BOUNDS, [1.0, -1.0, 0.0]]).astype(np.float32))
    w = torch.cat([mids.repeat(12), torch.zeros(64 * 3), torch.randn(500) * 50]).reshape(-1, 4)
    _assert_matches_bnb(w)


@needs_bnb
def test_stacked_kernel_is_one_bnb_weight_per_layer():
    layers = [_weight(48, 128, seed) for seed in range(3)]
    kernel = jnp.stack([_kernel(w) for w in layers])  # (3, 128, 48)
    leaf = Q.quantize_nf4(kernel, KernelSpec(1, 1, 1))
    assert leaf.codes.shape == (3, 48, 64) and leaf.absmax.shape == (3, 48, 2) and leaf.offset.shape == (3,)
    for i, w in enumerate(layers):
        packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        np.testing.assert_array_equal(np.asarray(leaf.codes[i]).reshape(-1), packed.numpy().reshape(-1))
        assert _bits(leaf.offset[i]) == _bits(state.offset.numpy())
        np.testing.assert_array_equal(np.asarray(Q.dequantize(leaf)[i]), bnbf.dequantize_4bit(packed, state).numpy().T)


@needs_bnb
def test_code_tables_are_bitsandbytes():
    np.testing.assert_array_equal(Q.NF4_CODE, bnbf.get_4bit_type("nf4", device="cpu").numpy())
    np.testing.assert_array_equal(Q.DYNAMIC_CODE, bnbf.create_dynamic_map().numpy())


@pytest.mark.parametrize("n", [*range(1, 40), 100, 513, 4097, 30001])
def test_torch_sum_order(n):
    x = np.random.default_rng(n).random(n).astype(np.float32) * 0.1
    assert _bits(jax.jit(Q._torch_sum)(jnp.asarray(x))) == _bits(torch.from_numpy(x).sum().numpy())


# -- int8 -----------------------------------------------------------------------------------


def _int8_bound(leaf: Q.Int8, kernel: jax.Array) -> None:
    """|dequantize - w| <= absmax / 254 for every element, absmax its block's."""
    rows = Q._to_rows(kernel, leaf.layout, leaf.block_size)
    bound = Q._unblocks(
        jnp.broadcast_to(leaf.absmax[..., None] / 254.0, (*leaf.absmax.shape, leaf.block_size)), rows.shape[-1]
    )
    err = jnp.abs(Q._to_rows(Q.dequantize(leaf), leaf.layout, leaf.block_size) - rows)
    assert bool(jnp.all(err <= bound * (1 + 2**-20)))


@pytest.mark.parametrize("block_size", [None, 64, 100])
@pytest.mark.parametrize("shape", [(128, 48), (200, 300), (9, 7)])
def test_int8_round_trip_bound(shape, block_size):
    kernel = jax.random.normal(jax.random.key(1), shape) * jnp.linspace(0.01, 3, shape[1])
    leaf = jax.jit(Q.quantize_int8, static_argnames="block_size")(kernel, block_size=block_size)
    assert leaf.codes.dtype == jnp.int8 and Q.dequantize(leaf).shape == shape
    _int8_bound(leaf, kernel)
    if block_size is None:  # per output channel: one absmax per column of the kernel
        np.testing.assert_array_equal(leaf.absmax[:, 0], jnp.max(jnp.abs(kernel), axis=0))


@needs_bnb
def test_int8_per_channel_is_bnb_vectorwise():
    w = _weight(40, 96, scale=1.0)
    codes, stats, _ = bnbf.int8_vectorwise_quant(w.clone())
    leaf = Q.quantize_int8(_kernel(w))
    np.testing.assert_array_equal(np.asarray(leaf.codes), codes.numpy())
    np.testing.assert_array_equal(np.asarray(leaf.absmax[:, 0]), stats.numpy())


# -- leaves as pytrees ----------------------------------------------------------------------


def test_leaves_are_pytrees():
    kernel = jax.random.normal(jax.random.key(0), (256, 96))
    leaf = Q.quantize_nf4(kernel)
    arrays = jax.tree.leaves(leaf)
    assert [a.dtype for a in arrays] == [jnp.uint8, jnp.uint8, jnp.float32, jnp.float32]
    assert [a.shape for a in arrays] == [(96, 128), (96, 4), (2,), ()]
    assert len(jax.tree.leaves(Q.quantize_nf4(kernel, double_quant=False))) == 2
    same = jax.jit(lambda x: x)(leaf)
    assert isinstance(same, Q.NF4) and same.shape == leaf.shape and same.layout == leaf.layout
    np.testing.assert_array_equal(jax.jit(Q.dequantize)(same), Q.dequantize(leaf))
    assert jax.tree.structure(jax.tree.map(jnp.zeros_like, leaf)) == jax.tree.structure(leaf)
    bf16 = jax.jit(lambda x: Q.dequantize(x, jnp.bfloat16))(leaf)
    assert bf16.dtype == jnp.bfloat16 and bf16.shape == (256, 96)


def test_quantize_tree_targets_and_inverse():
    key = jax.random.key(0)
    params = {
        "embed": {"embedding": jax.random.normal(key, (50, 64))},
        "layer": {
            "q_proj": {"kernel": jax.random.normal(key, (64, 128)), "bias": jnp.zeros(128)},
            "norm": {"scale": jnp.ones(64)},
            "v_proj": {
                "kernel": jax.random.normal(key, (64, 32)),
                "lora_a": jnp.ones((64, 4)),
                "lora_b": jnp.ones((4, 32)),
            },
        },
    }
    for fmt, kind in (("nf4", Q.NF4), ("int8", Q.Int8)):
        q = Q.quantize(params, fmt)
        assert isinstance(q["layer"]["q_proj"]["kernel"], kind) and isinstance(q["layer"]["v_proj"]["kernel"], kind)
        for keys in (
            ("embed", "embedding"),
            ("layer", "q_proj", "bias"),
            ("layer", "norm", "scale"),
            ("layer", "v_proj", "lora_a"),
        ):
            node_q, node_p = q, params
            for k in keys:
                node_q, node_p = node_q[k], node_p[k]
            assert node_q is node_p
        back = Q.dequantize_tree(q)
        assert jax.tree.structure(back) == jax.tree.structure(params)
        err = jnp.abs(back["layer"]["q_proj"]["kernel"] - params["layer"]["q_proj"]["kernel"]).max()
        assert 0 < err < 0.25 * jnp.abs(params["layer"]["q_proj"]["kernel"]).max()
    with_embedding = Q.quantize(params, "nf4", targets=r".*(kernel|embedding)")
    assert isinstance(with_embedding["embed"]["embedding"], Q.NF4)
    assert Q.quantize(params, "bf16")["layer"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="fmt"):
        Q.quantize(params, "fp8")


def test_quantize_reads_stacked_layout_from_adapters():
    params = {
        "layers": {
            "mlp": {"kernel": jnp.ones((3, 128, 16)), "lora_a": jnp.ones((3, 128, 2)), "lora_b": jnp.ones((3, 2, 16))}
        }
    }
    leaf = Q.quantize(params)["layers"]["mlp"]["kernel"]
    assert leaf.layout == KernelSpec(1, 1, 1) and leaf.offset.shape == (3,)


def test_nbytes_and_bits_per_weight():
    kernel = jnp.ones((4096, 1024), jnp.bfloat16)
    leaf = Q.quantize_nf4(kernel)
    n = kernel.size
    assert Q.nbytes(leaf) == n // 2 + n // 64 + 4 * n // 64 // 256 + 4
    assert Q.bits_per_weight(leaf) == pytest.approx(4.127, abs=5e-4)
    assert Q.nbytes(Q.quantize_nf4(kernel, double_quant=False)) == n // 2 + 4 * n // 64
    assert Q.nbytes(jax.eval_shape(Q.quantize_nf4, kernel)) == Q.nbytes(leaf)
    assert Q.nbytes({"w": leaf, "b": jnp.zeros(10)}) == Q.nbytes(leaf) + 40
    assert Q.nbytes(Q.quantize_int8(kernel)) == n + 4 * 1024


# -- sharding -------------------------------------------------------------------------------


def test_partition_specs_follow_the_kernel():
    sizes = {"data": 1, "fsdp": 2, "tensor": 4}
    leaf = jax.eval_shape(Q.quantize_nf4, jnp.ones((4096, 1024)))
    specs = Q.partition_specs(leaf, P("fsdp", "tensor"), sizes)
    assert (specs.codes, specs.absmax, specs.absmax2, specs.offset) == (
        P("tensor", "fsdp"),
        P("tensor", "fsdp"),
        P(None),
        P(),
    )
    out_only = Q.partition_specs(leaf, P(None, "tensor"), sizes)
    assert out_only.codes == P("tensor", None) and out_only.absmax2 == P("tensor")
    odd = Q.partition_specs(jax.eval_shape(Q.quantize_nf4, jnp.ones((100, 64))), P("fsdp", "tensor"), sizes)
    assert odd.codes == P(None, None)  # 100 is no multiple of 64: one flat row, replicated
    stacked = Q.partition_specs(
        jax.eval_shape(lambda w: Q.quantize_nf4(w, KernelSpec(1, 1, 1)), jnp.ones((2, 192, 64))),
        P(None, "fsdp", "tensor"),
        sizes,
    )
    # 96 code bytes split in 2, but 3 blocks do not: each shard reads replicated scales
    assert stacked.codes == P(None, "tensor", "fsdp") and stacked.absmax == P(None, "tensor", None)
    channel = Q.partition_specs(jax.eval_shape(Q.quantize_int8, jnp.ones((256, 64))), P("fsdp", "tensor"), sizes)
    assert channel.codes == P("tensor", "fsdp") and channel.absmax == P("tensor", None)


def test_sharded_leaf_dequantizes_to_the_same_kernel():
    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip("needs 8 (simulated) devices")
    mesh = make_mesh({"fsdp": 2, "tensor": 4}, devices=devices[:8])  # Auto axes, as jlora's steps use
    kernel = jax.random.normal(jax.random.key(3), (512, 256))
    leaf = Q.quantize_nf4(kernel)
    specs = Q.partition_specs(leaf, P("fsdp", "tensor"), dict(mesh.shape))
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
    sharded = jax.device_put(leaf, shardings)
    assert sharded.codes.sharding.spec == P("tensor", "fsdp")
    out = jax.jit(Q.dequantize, out_shardings=NamedSharding(mesh, P("fsdp", "tensor")))(sharded)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(Q.dequantize(leaf)))


@needs_bnb
def test_dequantize_where_bnb_cpu_dequantize_4bit_errs():
    """bitsandbytes 0.50's CPU `dequantize_4bit` scales some elements by the wrong block's
    absmax when the row length is no multiple of 64 but the element count is (here (128, 96)):
    its codes and statistics still equal jlora's, and jlora's dequantization equals those
    codes times bnb's own dequantized statistics (`dequantize_blockwise`), bit for bit."""
    w = _weight(128, 96, seed=3)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    leaf = jax.jit(Q.quantize_nf4)(_kernel(w))
    np.testing.assert_array_equal(np.asarray(leaf.codes).reshape(-1), packed.numpy().reshape(-1))
    codes = packed.numpy().reshape(-1)
    q = np.stack([codes >> 4, codes & 0xF], axis=-1).reshape(-1)
    absmax = (bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset).numpy()
    reference = (Q.NF4_CODE[q].reshape(-1, 64) * absmax[:, None]).reshape(w.shape)
    np.testing.assert_array_equal(_bits(jax.jit(Q.dequantize)(leaf).T), _bits(reference))
    bnb = bnbf.dequantize_4bit(packed, state).numpy()
    assert np.abs(bnb - w.numpy()).max() > 2 * np.abs(reference - w.numpy()).max()  # bnb's, not jlora's, is off


# -- embedding tables -----------------------------------------------------------------------


@needs_bnb
@pytest.mark.parametrize("shape", [(61, 64), (30, 100), (7, 9)])  # (entries, width): rows of blocks, or straddling
def test_embedding_table_is_bnb_quantized_weight_and_lookups_take_its_rows(shape):
    """A table quantizes as bnb quantizes an ``nn.Embedding`` weight (entries, width), and
    `take` gives the dequantized table's rows, bit for bit, in NF4 and int8."""
    table = _weight(*shape, seed=3)
    packed, state = bnbf.quantize_4bit(table, blocksize=64, quant_type="nf4", compress_statistics=True)
    leaf = jax.jit(Q.quantize_embedding, static_argnums=1)(jnp.asarray(table.numpy()), "nf4")
    assert leaf.embedding and leaf.shape == shape[::-1]
    np.testing.assert_array_equal(np.asarray(leaf.codes).reshape(-1), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(leaf.absmax).reshape(-1), state.absmax.numpy())
    np.testing.assert_array_equal(_bits(Q.dequantize(leaf)), _bits(bnbf.dequantize_4bit(packed, state).numpy()))
    ids = jnp.array([[0, shape[0] - 1, 3 % shape[0]], [1 % shape[0], 1 % shape[0], 2 % shape[0]]])
    for quantized in (leaf, Q.quantize_embedding(jnp.asarray(table.numpy()), "int8")):
        rows = jax.jit(Q.take)(quantized, ids)
        assert rows.shape == (*ids.shape, shape[1])
        np.testing.assert_array_equal(_bits(rows), _bits(Q.dequantize(quantized)[ids]))
    assert np.isnan(Q.take(leaf, jnp.array([shape[0]]))).all()  # out of range: NaN, as jnp.take and nn.Embed
    with pytest.raises(ValueError, match="not an embedding table"):
        Q.take(Q.quantize_nf4(jnp.ones((64, 8))), ids)


def test_quantize_tree_quantizes_embedding_tables_as_tables():
    params = {
        "embed": {"embedding": jax.random.normal(jax.random.key(0), (50, 128))},
        "fc": {"kernel": jnp.ones((128, 8))},
    }
    out = Q.quantize(params, "nf4", r".*(kernel|embedding)")
    assert out["embed"]["embedding"].embedding and not out["fc"]["kernel"].embedding
    table = params["embed"]["embedding"]
    error = np.abs(Q.dequantize_tree(out)["embed"]["embedding"] - table)
    assert np.all(error <= 0.153 * np.abs(table).max(axis=1, keepdims=True))  # half NF4 widest gap (-1, -0.696)
    assert Q.quantize(params, "bf16", r".*embedding")["embed"]["embedding"].dtype == jnp.bfloat16
    sizes = {"fsdp": 2, "tensor": 4}
    specs = Q.partition_specs(
        jax.eval_shape(lambda t: Q.quantize_embedding(t, "nf4"), jnp.ones((4096, 512))), P("tensor", "fsdp"), sizes
    )
    assert specs.codes == P("tensor", "fsdp") and specs.absmax == P("tensor", "fsdp")  # entries along rows
