"""Quantized frozen weights: NF4 with double quantization (bit-exact with bitsandbytes), int8
and bf16, as pytree leaves that jit, `jax.tree` ops, sharding and Orbax treat as data.

Layout. A kernel ``(*stack, *inputs, *outputs)`` (a `jlora.spec.KernelSpec`) is quantized
one ``(fan_in, fan_out)`` matrix per stacked index (as bitsandbytes quantizes each
``nn.Linear`` on its own), in the order of torch's weight ``W = kernel.T``, ``(fan_out,
fan_in)``, flattened row-major: blocks run along the input axis, within one output row
whenever ``fan_in % block_size == 0``. The leaf then stores its arrays with shape
``(*stack, fan_out, ·)``: ``codes (*stack, fan_out, fan_in // 2)``, ``absmax (*stack,
fan_out, fan_in // block_size)``. Otherwise (blocks would straddle rows) it stores the
flat vector as one row, ``(*stack, 1, ·)``. Either way the bytes of `codes` are bnb's packed
4-bit codes (first element in the high nibble), and the statistics are its
``quant_state.absmax`` / ``state2.absmax`` / ``offset``, so a bnb checkpoint imports by
reshaping, and `dequantize` equals `bitsandbytes.functional.dequantize_4bit(...).T`.

Sharding. Blocks never straddle an output row (in the row layout), so sharding the
kernel's output axis shards `codes` and `absmax` along their row axis, and sharding its
input axis shards their last axis when each shard holds whole blocks; `partition_specs`
derives every array's `PartitionSpec` from the kernel's and replicates what cannot be
split without cutting a block (the second-level statistics when the input axis is split:
4 bytes per 16,384 weights).

Reproducing bitsandbytes 0.50 (CPU) bit for bit:
* 4-bit: absmax of each block of 64; full blocks scaled by ``x * (1 / max(absmax, 1e-38))``,
  a last partial block by ``x / max(absmax, 1e-38)`` (and that block's stored absmax is the
  clamped one); clipped to [-1, 1]; the code is the number of NF4 midpoints strictly below
  the value (a tie goes to the lower code); an odd count is padded with code 7 (zero).
* double quantization: ``offset = mean(absmax)`` summed in torch's CPU order (`_torch_sum`),
  then ``absmax - offset`` quantized with bnb's 8-bit dynamic map in blocks of 256 as its
  CPU kernel does: through a 65,536-bin table (`_dynamic_index`).
* dequantization: ``code8[q] * absmax2 + offset`` (two roundings, which `_exact` keeps XLA
  from fusing into an FMA), then ``nf4[q] * absmax`` in float32, cast once.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import PartitionSpec as P

from jlora.config import LoraConfig
from jlora.spec import KernelSpec, adapter_spec
from jlora.tree import LORA_A, LORA_B, Keys, Leaf, PyTree, flatten, is_adapter, is_trainable, path_str, unflatten

FORMATS = ("nf4", "int8", "bf16")
NF4_BLOCK, STATS_BLOCK = 64, 256

# bitsandbytes.functional.get_4bit_type("nf4"), as float32
NF4_CODE = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0,
    ],
    np.float32,
)  # fmt: skip
_NF4_BOUNDS = (NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)

# bitsandbytes.functional.create_dynamic_map() (signed, 8 bits), its positive half: the map
# is these, their negatives, 0 and 1. Written out because torch.linspace's float32 rounding,
# which the map is built with, depends on the CPU's vector width.
_DYNAMIC_POSITIVE = np.array(
    [
        5.5000004e-07, 3.2500002e-06, 7.75e-06, 2.1249998e-05, 4.375e-05, 6.625e-05, 8.875e-05, 0.00015625001,
        0.00026875004, 0.00038125002, 0.00049375003, 0.0006062501, 0.00071875006, 0.00083125, 0.0009437501,
        0.0012812499, 0.00184375, 0.00240625, 0.00296875, 0.0035312497, 0.00409375, 0.0046562497, 0.0052187503,
        0.00578125, 0.00634375, 0.00690625, 0.00746875, 0.00803125, 0.00859375, 0.009156249, 0.00971875, 0.01140625,
        0.01421875, 0.01703125, 0.019843752, 0.02265625, 0.02546875, 0.028281251, 0.03109375, 0.03390625, 0.036718752,
        0.03953125, 0.042343747, 0.04515625, 0.04796875, 0.05078125, 0.05359375, 0.05640625, 0.059218753, 0.06203125,
        0.06484375, 0.067656256, 0.070468746, 0.07328125, 0.07609375, 0.07890625, 0.08171876, 0.08453125, 0.08734375,
        0.09015625, 0.092968754, 0.09578126, 0.09859375, 0.107031256, 0.12109375, 0.13515624, 0.14921875, 0.16328125,
        0.17734376, 0.19140625, 0.20546874, 0.21953125, 0.23359375, 0.24765624, 0.26171875, 0.27578127, 0.28984374,
        0.30390626, 0.31796873, 0.33203125, 0.34609374, 0.36015624, 0.37421876, 0.38828123, 0.40234375, 0.41640624,
        0.43046874, 0.44453126, 0.45859373, 0.47265625, 0.4867187, 0.50078124, 0.5148437, 0.5289062, 0.54296875,
        0.5570313, 0.5710938, 0.58515626, 0.5992187, 0.61328125, 0.6273438, 0.6414063, 0.65546876, 0.6695312,
        0.68359375, 0.6976563, 0.7117188, 0.72578126, 0.7398437, 0.75390625, 0.7679688, 0.78203124, 0.79609376,
        0.8101562, 0.82421875, 0.8382813, 0.85234374, 0.86640626, 0.8804687, 0.89453125, 0.9085938, 0.92265624,
        0.93671876, 0.9507812, 0.96484375, 0.9789063, 0.99296874,
    ],
    np.float32,
)  # fmt: skip
DYNAMIC_CODE = np.sort(np.concatenate([-_DYNAMIC_POSITIVE, np.float32([0.0, 1.0]), _DYNAMIC_POSITIVE]))
_DYNAMIC_BOUNDS = np.float32(0.5) * (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:])
_LUT_STEPS = 65535  # bnb's CPU kernel maps [-1, 1] onto 65,536 bins, then a bin to its nearest code
_TORCH_LANES = 8  # float32 lanes of torch's CPU sum (AVX2)


# -- leaves -------------------------------------------------------------------------------


@struct.dataclass
class NF4(Leaf):
    """A kernel in NF4: `codes` uint8 (two codes a byte), `absmax` per block (float32, or
    uint8 codes of ``absmax - offset`` with double quantization, scaled by `absmax2` per 256
    of them). Array shapes as the module docstring says; static fields are aux data. An
    `embedding` leaf holds a ``(entries, width)`` table as the kernel of its transpose
    (`quantize_embedding`: `shape` is ``(width, entries)``), one row of blocks per entry."""

    codes: jax.Array
    absmax: jax.Array
    absmax2: jax.Array | None
    offset: jax.Array | None
    shape: tuple[int, ...] = struct.field(pytree_node=False)
    dtype: str = struct.field(pytree_node=False)
    layout: KernelSpec = struct.field(pytree_node=False)
    block_size: int = struct.field(pytree_node=False)
    embedding: bool = struct.field(pytree_node=False, default=False)


@struct.dataclass
class Int8(Leaf):
    """A kernel in symmetric int8: `codes` int8 and `absmax` float32 per block along the
    input axis (per output channel when the block is the whole row)."""

    codes: jax.Array
    absmax: jax.Array
    shape: tuple[int, ...] = struct.field(pytree_node=False)
    dtype: str = struct.field(pytree_node=False)
    layout: KernelSpec = struct.field(pytree_node=False)
    block_size: int = struct.field(pytree_node=False)
    embedding: bool = struct.field(pytree_node=False, default=False)


Quantized = NF4 | Int8


def is_quantized(x: Any) -> bool:
    return isinstance(x, NF4 | Int8)


def unstacked(leaf: Quantized) -> Quantized:
    """`leaf` with its static shape and layout fitted to its arrays: `nn.scan` slices the
    arrays' stacked leading axes, but the aux data it carries along still describe the stack."""
    dropped = leaf.layout.stack - (leaf.codes.ndim - 2)
    if dropped == 0:
        return leaf
    layout = dataclasses.replace(leaf.layout, stack=leaf.layout.stack - dropped)
    return leaf.replace(shape=leaf.shape[dropped:], layout=layout)


# -- layout: kernel <-> rows of blocks ------------------------------------------------------


def _row_length(layout: KernelSpec, shape: Sequence[int], block_size: int) -> tuple[int, int]:
    """``(rows, row length)`` of one matrix: ``(fan_out, fan_in)`` when blocks fit in a row,
    else one row of ``fan_in * fan_out``."""
    fan_in, fan_out = layout.fan_in_out(shape)
    return (fan_out, fan_in) if fan_in % block_size == 0 else (1, fan_in * fan_out)


def _to_rows(w: jax.Array, layout: KernelSpec, block_size: int) -> jax.Array:
    """``(*stack, *in, *out)`` -> ``(*stack, rows, length)`` float32, torch's ``W`` order."""
    stack = w.shape[: layout.stack]
    fan_in, fan_out = layout.fan_in_out(w.shape)
    rows, length = _row_length(layout, w.shape, block_size)
    matrix = jnp.swapaxes(w.astype(jnp.float32).reshape(*stack, fan_in, fan_out), -1, -2)
    return matrix.reshape(*stack, rows, length)


def _from_rows(x: jax.Array, shape: Sequence[int], layout: KernelSpec) -> jax.Array:
    stack = tuple(shape[: layout.stack])
    fan_in, fan_out = layout.fan_in_out(shape)
    return jnp.swapaxes(x.reshape(*stack, fan_out, fan_in), -1, -2).reshape(shape)


def _blocks(x: jax.Array, block_size: int) -> jax.Array:
    """``(..., L)`` -> ``(..., ceil(L / block_size), block_size)``, zero-padded."""
    pad = -x.shape[-1] % block_size
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return x.reshape(*x.shape[:-1], -1, block_size)


def _unblocks(x: jax.Array, length: int) -> jax.Array:
    return x.reshape(*x.shape[:-2], -1)[..., :length]


# -- NF4 ------------------------------------------------------------------------------------


def _absmax_scaled(x: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array]:
    """bnb's blockwise absmax and values scaled into [-1, 1] (``(..., nb)``, ``(..., nb, bs)``):
    full blocks multiply by the reciprocal, a partial last block divides, and an all-zero
    block scales to 0 (bnb clamps its absmax at 1e-38, a subnormal, which it stores for a
    partial block; XLA flushes subnormals to zero, hence the explicit cases)."""
    length = x.shape[-1]
    full = length // block_size * block_size
    blocks = x[..., :full].reshape(*x.shape[:-1], -1, block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    inverse = jnp.where(absmax == 0, 0.0, 1.0 / jnp.where(absmax == 0, 1.0, absmax))
    scaled = blocks * inverse[..., None]
    if full < length:
        rest = x[..., full:]
        last = jnp.max(jnp.abs(rest), axis=-1, keepdims=True)
        rest = jnp.where(last == 0, 0.0, rest / jnp.where(last == 0, 1.0, last))
        absmax = jnp.concatenate([absmax, jnp.where(last == 0, np.float32(1e-38), last)], axis=-1)
        scaled = jnp.concatenate([scaled, _blocks(rest, block_size)], axis=-2)
    return absmax, jnp.clip(scaled, -1.0, 1.0)


def _pack(q: jax.Array) -> jax.Array:
    """4-bit codes ``(..., L)`` -> bytes ``(..., ceil(L / 2))``, the first in the high nibble;
    an odd length is padded with code 7 (zero), as bnb pads the scaled values with 0."""
    q = jnp.pad(q, [(0, 0)] * (q.ndim - 1) + [(0, q.shape[-1] % 2)], constant_values=7)
    return (q[..., 0::2] << 4) | q[..., 1::2]


def _unpack(codes: jax.Array, length: int) -> jax.Array:
    q = jnp.stack([codes >> 4, codes & 0xF], axis=-1)
    return q.reshape(*codes.shape[:-1], -1)[..., :length]


def _fold(x: jax.Array, axis: int) -> jax.Array:
    """Left-to-right sum along `axis` (0 for an empty axis): a fixed float32 order."""
    x = jnp.moveaxis(x, axis, 0)
    out = jnp.zeros(x.shape[1:], x.dtype)
    for i in range(x.shape[0]):
        out = out + x[i]
    return out


def _cascade(rows: jax.Array, step: int) -> jax.Array:
    """torch's ``multi_row_sum`` over `rows` ``(..., size, 4, lanes)``: level 0 adds `step`
    rows at a time, each level flushes into the next after `step` of its own additions, the
    last never flushes, and the leftovers of every level are added last, lowest first."""
    level, leftovers = rows, []
    for _ in range(3):
        n = level.shape[-3] // step * step
        leftovers.append(_fold(level[..., n:, :, :], -3))
        level = _fold(level[..., :n, :, :].reshape(*level.shape[:-3], -1, step, *level.shape[-2:]), -3)
    acc = leftovers[0]
    for extra in (*leftovers[1:], _fold(level, -3)):
        acc = acc + extra
    return acc


def _torch_sum(x: jax.Array) -> jax.Array:
    """Sum over the last axis in the order of torch's float32 CPU sum on one thread (AVX2:
    vectors of 8 lanes, 4 at a time through a 4-level cascade, the leftover vectors, then the
    scalar tail and the lanes), so that bnb's ``offset = absmax.mean()`` is reproduced bit
    for bit. Beyond 32,768 elements torch splits the sum over threads; then this agrees
    with it to about an ulp."""
    n = x.shape[-1]
    lanes = _TORCH_LANES if n >= _TORCH_LANES else 1
    nvec = n // lanes
    vecs = x[..., : nvec * lanes].reshape(*x.shape[:-1], nvec, lanes)
    size = nvec // 4
    power = (size - 1).bit_length() if size > 2 else 1  # torch's CeilLog2
    partial = _cascade(vecs[..., : size * 4, :].reshape(*x.shape[:-1], size, 4, lanes), 1 << max(4, power // 4))
    acc = partial[..., 0, :]
    for j in range(size * 4, nvec):
        acc = acc + vecs[..., j, :]
    for k in range(1, 4):
        acc = acc + partial[..., k, :]
    total = _fold(x[..., nvec * lanes :], -1)
    for k in range(lanes):
        total = total + acc[..., k]
    return total


def _dynamic_lut() -> np.ndarray:
    """bnb's CPU table from 65,536 bins over [-1, 1] to the nearest dynamic code of each
    bin's centre ``-1 + 2 i / 65535`` (a tie goes to the lower code), built in float32."""
    centres = np.float32(-1.0) + np.float32(2.0) * np.arange(_LUT_STEPS + 1, dtype=np.float32) / np.float32(_LUT_STEPS)
    return np.searchsorted(_DYNAMIC_BOUNDS, centres, side="left").astype(np.uint8)


_DYNAMIC_LUT = _dynamic_lut()


def _exact(x: jax.Array) -> jax.Array:
    """`x`, rounded where it stands: XLA neither fuses a product through this into an FMA
    nor folds a constant through it (it rewrites ``x / c`` as ``x * (1 / c)``), so the
    float32 operations round one at a time, as bitsandbytes' do. NaN stays NaN."""
    return jnp.where(jnp.isnan(x), jnp.nan, x)


def _dynamic_index(v: jax.Array) -> jax.Array:
    """The 8-bit dynamic code of ``v`` in [-1, 1] as bnb's CPU kernel finds it: its bin
    ``trunc(((v + 1) * 0.5) * 65535 + 0.5)`` through `_DYNAMIC_LUT`."""
    bins = ((v + 1.0) * 0.5 * np.float32(_LUT_STEPS) + 0.5).astype(jnp.int32)
    return jnp.asarray(_DYNAMIC_LUT)[bins]


def _quantize_dynamic(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """bnb's ``quantize_blockwise(x, blocksize=256)`` on CPU over the last axis: codes
    ``(..., n)`` uint8 and absmax ``(..., ceil(n / 256))``; an all-zero block gets code 0."""
    blocks = _blocks(x, STATS_BLOCK)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    scaled = jnp.clip(blocks * (1.0 / jnp.where(absmax == 0, 1.0, absmax))[..., None], -1.0, 1.0)
    codes = jnp.where(absmax[..., None] == 0, 0, _dynamic_index(scaled)).astype(jnp.uint8)
    return _unblocks(codes, x.shape[-1]), absmax


def double_quantize(absmax: jax.Array, offset: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``absmax - offset`` (``(..., n)``, ``offset (...)``) in 8 bits: ``(codes, absmax2)``."""
    return _quantize_dynamic(absmax - offset[..., None])


def quantize_nf4(
    w: jax.Array, layout: KernelSpec | None = None, block_size: int = NF4_BLOCK, double_quant: bool = True
) -> NF4:
    """A kernel ``(*stack, *in, *out)`` in NF4, as ``bnb.functional.quantize_4bit(kernel.T,
    blocksize=block_size, quant_type="nf4", compress_statistics=double_quant)`` per matrix."""
    layout = layout or default_layout(w.shape)
    rows = _to_rows(w, layout, block_size)
    absmax, scaled = _absmax_scaled(rows, block_size)
    q = jnp.searchsorted(jnp.asarray(_NF4_BOUNDS), scaled, side="left").astype(jnp.uint8)
    codes = _pack(_unblocks(q, rows.shape[-1]))
    absmax2 = offset = None
    if double_quant:
        flat = absmax.reshape(*absmax.shape[:-2], -1)
        total = _torch_sum(flat)
        offset = total / jnp.where(jnp.isnan(total), jnp.nan, np.float32(flat.shape[-1]))  # unfoldable, see _exact
        qabsmax, absmax2 = double_quantize(flat, offset)
        absmax = qabsmax.reshape(absmax.shape)
    return NF4(codes, absmax, absmax2, offset, tuple(w.shape), jnp.dtype(w.dtype).name, layout, block_size)


def _nf4_absmax(leaf: NF4) -> jax.Array:
    """The float32 absmax per block; with double quantization ``code8[q] * absmax2 + offset``,
    rounded after the product as bnb does."""
    if leaf.absmax2 is None:
        return leaf.absmax
    flat = leaf.absmax.reshape(*leaf.absmax.shape[:-2], -1)
    scaled = _blocks(jnp.asarray(DYNAMIC_CODE)[flat], STATS_BLOCK) * leaf.absmax2[..., None]
    return (_exact(_unblocks(scaled, flat.shape[-1])) + leaf.offset[..., None]).reshape(leaf.absmax.shape)


def _dequantize_nf4(leaf: NF4, dtype: Any) -> jax.Array:
    length = _row_length(leaf.layout, leaf.shape, leaf.block_size)[1]
    values = jnp.asarray(NF4_CODE)[_unpack(leaf.codes, length)]
    rows = _unblocks(_blocks(values, leaf.block_size) * _nf4_absmax(leaf)[..., None], length)
    return _from_rows(rows, leaf.shape, leaf.layout).astype(dtype)


# -- int8 -----------------------------------------------------------------------------------


def quantize_int8(w: jax.Array, layout: KernelSpec | None = None, block_size: int | None = None) -> Int8:
    """A kernel in symmetric int8, ``round(x * 127 / absmax)`` per output channel (block
    None: the whole input row) or per block of `block_size` along the input axis."""
    layout = layout or default_layout(w.shape)
    block_size = block_size or layout.fan_in_out(w.shape)[0]
    rows = _to_rows(w, layout, block_size)
    blocks = _blocks(rows, block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    scale = jnp.where(absmax == 0, 0.0, 127.0 / jnp.where(absmax == 0, 1.0, absmax))
    codes = jnp.clip(jnp.round(blocks * scale[..., None]), -127, 127).astype(jnp.int8)
    return Int8(_unblocks(codes, rows.shape[-1]), absmax, tuple(w.shape), jnp.dtype(w.dtype).name, layout, block_size)


def _dequantize_int8(leaf: Int8, dtype: Any) -> jax.Array:
    length = leaf.codes.shape[-1]
    blocks = _blocks(leaf.codes.astype(jnp.float32), leaf.block_size) * (leaf.absmax / 127.0)[..., None]
    return _from_rows(_unblocks(blocks, length), leaf.shape, leaf.layout).astype(dtype)


# -- one leaf -------------------------------------------------------------------------------


def default_layout(shape: Sequence[int]) -> KernelSpec:
    """``(in, out)`` for a 2-D kernel; otherwise every axis but the last is an input (pass
    the kernel's `KernelSpec` for stacked layers, so each layer is quantized on its own)."""
    return KernelSpec(0, len(shape) - 1, 1)


def dequantize(leaf: Quantized, dtype: Any = None) -> jax.Array:
    """The kernel (or embedding table) a quantized leaf stands for, in `dtype` (default: the
    original one)."""
    dtype = dtype or leaf.dtype
    w = _dequantize_nf4(leaf, dtype) if isinstance(leaf, NF4) else _dequantize_int8(leaf, dtype)
    return w.T if leaf.embedding else w


def weight(x: Any, dtype: Any = None) -> jax.Array:
    """`x` as an array in `dtype` (default its own): a quantized leaf dequantized, for code that
    reads a weight itself (a tied head's table) rather than through a module."""
    if is_quantized(x):
        return dequantize(x, dtype)
    return jnp.asarray(x, dtype)


def take(table: Quantized, ids: jax.Array, dtype: Any = None) -> jax.Array:
    """``dequantize(table)[ids]`` of a quantized embedding table, dequantizing only the rows
    `ids` takes (each entry is its own row of blocks when the width is a multiple of the block
    size; otherwise the whole table is dequantized)."""
    if not table.embedding:
        raise ValueError("take: the leaf is a kernel, not an embedding table (quantize_embedding)")
    dtype = dtype or table.dtype
    width = table.shape[0]
    if width % table.block_size:  # blocks straddle entries
        return jnp.take(dequantize(table, dtype), ids, axis=0)
    # the scales taken as `jnp.take` takes (an id out of range gives NaN), as nn.Embed's lookup does
    if isinstance(table, NF4):
        values, scale = jnp.asarray(NF4_CODE)[_unpack(table.codes[ids], width)], jnp.take(_nf4_absmax(table), ids, 0)
    else:
        values, scale = table.codes[ids].astype(jnp.float32), jnp.take(table.absmax, ids, 0) / 127.0
    return _unblocks(_blocks(values, table.block_size) * scale[..., None], width).astype(dtype)


def quantize_leaf(w: jax.Array, fmt: str, layout: KernelSpec | None = None, block_size: int | None = None) -> Any:
    """One kernel in `fmt`: an `NF4` (double quantized), an `Int8`, or a bf16 array."""
    if fmt == "nf4":
        return quantize_nf4(w, layout, block_size or NF4_BLOCK)
    if fmt == "int8":
        return quantize_int8(w, layout, block_size)
    if fmt == "bf16":
        return w.astype(jnp.bfloat16)
    raise ValueError(f"quantize: fmt must be one of {FORMATS}, got {fmt!r}")


# compiled once per kernel shape (op by op, NF4's fixed-order sums dispatch thousands of ops)
_quantize_leaf = jax.jit(quantize_leaf, static_argnums=(1, 2, 3))
_dequantize = jax.jit(dequantize, static_argnums=(1,))


def quantize_embedding(table: jax.Array, fmt: str, block_size: int | None = None) -> Any:
    """An ``(entries, width)`` embedding table in `fmt`, quantized as bitsandbytes quantizes an
    ``nn.Embedding`` weight: blocks along the width, one entry's row at a time, so a lookup
    (`take`) dequantizes only the rows it takes, and a tied output head (``x · tableᵀ``) is a
    contraction with the leaf as its ``(width, entries)`` kernel."""
    if table.ndim != 2:
        raise ValueError(f"quantize_embedding: a table of 2 axes (entries, width), got shape {table.shape}")
    leaf = _quantize_leaf(table.T, fmt, None, block_size)
    return leaf.replace(embedding=True) if is_quantized(leaf) else leaf.T


# -- trees ----------------------------------------------------------------------------------

DEFAULT_TARGETS = r"(?:.*/)?kernel"
EMBEDDING = "embedding"  # the table of a Linen nn.Embed


def _targeted(keys: Keys, leaf: Any, targets: str | Callable[[str, Any], bool]) -> bool:
    """A frozen weight of 2+ axes whose '/'-joined path (leaf name included) `targets`
    matches in full (a regex) or accepts (a predicate); adapters never are."""
    if is_adapter(keys[-1]) or is_quantized(leaf) or getattr(leaf, "ndim", 0) < 2:
        return False
    path = path_str(keys)
    return targets(path, leaf) if callable(targets) else re.fullmatch(targets, path) is not None


def _layout(keys: Keys, flat: Mapping[Keys, Any], layouts: Mapping[str, KernelSpec]) -> KernelSpec:
    """The kernel's axis layout: given, read off its adapters, or `default_layout`."""
    module = keys[:-1]
    if path_str(module) in layouts:
        return layouts[path_str(module)]
    a, b = flat.get((*module, LORA_A)), flat.get((*module, LORA_B))
    if keys[-1] == "kernel" and a is not None and b is not None:
        return adapter_spec(flat[keys].shape, a.shape, b.shape)
    return default_layout(flat[keys].shape)


def quantize(
    params: PyTree,
    fmt: str = "nf4",
    targets: str | Callable[[str, Any], bool] = DEFAULT_TARGETS,
    block_size: int | None = None,
    layouts: Mapping[str, KernelSpec] | None = None,
) -> dict:
    """`params` with every targeted frozen weight replaced by its quantized leaf.

    `targets` is a regex over a leaf's whole path (default: every `kernel` of 2+ axes; e.g.
    ``r".*(kernel|embedding)"`` adds embedding tables, quantized by `quantize_embedding`) or a
    predicate ``(path, leaf) -> bool``;
    `lora_a` / `lora_b`, 1-D leaves (norms, biases) and quantized leaves are never touched.
    `layouts` gives ``{module path: KernelSpec}`` (`jlora.spec.kernel_specs`) for kernels
    that carry no adapters to read it from; see `default_layout`. `block_size`: NF4 64,
    int8 None (per output channel).
    """
    if fmt not in FORMATS:
        raise ValueError(f"quantize: fmt must be one of {FORMATS}, got {fmt!r}")
    flat, layouts = flatten(params), layouts or {}

    def quantized(keys: Keys, leaf: Any) -> Any:
        if not _targeted(keys, leaf, targets):
            return leaf
        if keys[-1] == EMBEDDING:
            return quantize_embedding(leaf, fmt, block_size)
        return _quantize_leaf(leaf, fmt, _layout(keys, flat, layouts), block_size)

    return unflatten({keys: quantized(keys, leaf) for keys, leaf in flat.items()})


def quantize_model(
    params: PyTree,
    fmt: str,
    specs: Mapping[str, Any],
    config: LoraConfig | None = None,
    block_size: int | None = None,
    embeddings: bool = False,
) -> dict:
    """`quantize` of the frozen kernels that `jlora.apply` computes: those of the Dense /
    DenseGeneral / Einsum modules in `specs` (`jlora.kernel_specs`, whose layouts quantize
    each stacked layer on its own, as `nn.scan` slices it), but not the trainable ones of
    `config` (`modules_to_save`). Kernels the model uses otherwise stay as they are. With
    `embeddings`, the frozen tables of its ``nn.Embed`` modules too (`quantize_embedding`:
    looked up and attended to through the same interceptor), which bitsandbytes' QLoRA keeps
    in 16 bits: a large share of a small model with a large vocabulary."""
    layouts = {path: spec for path, spec in specs.items() if isinstance(spec, KernelSpec)}

    def frozen(path: str, leaf: Any) -> bool:
        module, _, name = path.rpartition("/")
        if config is not None and is_trainable(tuple(path.split("/")), config):
            return False
        return (name == "kernel" and module in layouts) or (embeddings and name == EMBEDDING and leaf.ndim == 2)

    return quantize(params, fmt, frozen, block_size, layouts)


def dequantize_tree(params: PyTree, dtype: Any = None) -> PyTree:
    """`params` with every quantized leaf dequantized (in `dtype`, default its own)."""
    return jax.tree.map(lambda x: _dequantize(x, dtype) if is_quantized(x) else x, params, is_leaf=is_quantized)


def nbytes(tree: PyTree) -> int:
    """Bytes of every array in `tree` (quantized leaves: codes and statistics; arrays or
    `jax.ShapeDtypeStruct`s)."""
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def bits_per_weight(leaf: Quantized) -> float:
    """Stored bits per weight of one quantized leaf (NF4 + double quantization: 4.127)."""
    return 8 * nbytes(leaf) / math.prod(leaf.shape)


# -- sharding -------------------------------------------------------------------------------


def _merged(axes: Sequence[Any]) -> Any:
    """The spec of several axes flattened into one: the major axis's, when the rest are not
    sharded (then each shard is a contiguous range), else None."""
    return axes[0] if axes and all(a is None for a in axes[1:]) else None


def _shards(entry: Any, axis_sizes: Mapping[str, int]) -> int:
    names = (entry,) if isinstance(entry, str) else tuple(entry or ())
    return math.prod(axis_sizes[a] for a in names)


def partition_specs(leaf: Quantized, spec: P, axis_sizes: Mapping[str, int]) -> Quantized:
    """The leaf with a `PartitionSpec` in place of each array, from the kernel's `spec` on
    a mesh of `axis_sizes` (``mesh.shape``): stacked axes keep theirs, the row axis takes
    the output axes', the last axis of `codes` the input axes' when it divides evenly, and
    that of `absmax` too when every shard then holds whole blocks (so each code finds its
    scale on its own device); the second-level statistics split with the rows when each
    shard holds whole blocks of 256. Anything else is replicated."""
    layout, shape = leaf.layout, leaf.shape
    spec = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
    spec = spec[::-1] if leaf.embedding else spec  # the table's spec, for its transpose
    stack = spec[: layout.stack]
    rows, length = _row_length(layout, shape, leaf.block_size)
    nb = -(-length // leaf.block_size)
    row = _merged([spec[i] for i in layout.out_axes]) if rows > 1 else None
    col = _merged([spec[i] for i in layout.in_axes]) if rows > 1 else None
    row = row if row is not None and rows % _shards(row, axis_sizes) == 0 else None
    col = col if col is not None and leaf.codes.shape[-1] % _shards(col, axis_sizes) == 0 else None
    block_col = col if col is not None and nb % _shards(col, axis_sizes) == 0 else None
    specs = {"codes": P(*stack, row, col), "absmax": P(*stack, row, block_col)}
    if isinstance(leaf, NF4) and leaf.absmax2 is not None:
        whole = col is None and row is not None and rows // _shards(row, axis_sizes) * nb % STATS_BLOCK == 0
        specs |= {"absmax2": P(*stack, row if whole else None), "offset": P(*stack)}
    return leaf.replace(**specs)
