"""Building blocks shared by jlora's models: projections with logical axes and float32
accumulation, attention with grouped KV heads, masks and a KV cache, and layer stacks
that are unrolled or `nn.scan`-ned."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any


NARROW = (jnp.bfloat16, jnp.float16)  # the compute dtypes whose products accumulate in float32


def f32_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`lax.dot_general` accumulating in float32 and returning the inputs' dtype: with
    bfloat16 inputs this is what makes bf16 matmuls fast (and accurate) on CPU, and what
    tensor cores and the MXU do anyway. With bf16 inputs its backward pass (`narrow_dot`)
    computes the input's gradient the same way, bf16 x bf16 -> f32; float32 inputs take
    `lax.dot_general` and jax's autodiff unchanged."""
    dtype = jnp.result_type(lhs, rhs)
    if lhs.dtype == rhs.dtype and dtype in NARROW:
        return narrow_dot(lhs, rhs, _hashable(dimension_numbers), precision, dtype)
    out = lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=jnp.float32)
    return out.astype(dtype)


def f32_dot(lhs: jax.Array, rhs: jax.Array, dimension_numbers) -> jax.Array:
    """`lax.dot_general` accumulated in and returned as float32 (a vocabulary projection's
    logits); with bf16 inputs the backward pass contracts the cotangent rounded to bf16 for
    lhs's gradient (`narrow_dot`), as torch's bf16 autocast does with its bf16 logits."""
    if lhs.dtype == rhs.dtype and lhs.dtype in NARROW:
        return narrow_dot(lhs, rhs, _hashable(dimension_numbers), None, jnp.dtype(jnp.float32))
    return lax.dot_general(lhs, rhs, dimension_numbers, preferred_element_type=jnp.float32)


def _hashable(dimension_numbers) -> tuple:
    return tuple(tuple(tuple(int(d) for d in dims) for dims in pair) for pair in dimension_numbers)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def narrow_dot(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision, out_dtype) -> jax.Array:
    """``dot_general(lhs, rhs)`` of two bf16 (or f16) operands accumulated in float32, cast to
    `out_dtype`.

    Its own backward pass, because autodiff's transposes contract the float32 cotangent of
    the float32 accumulator with a bf16 operand: XLA:CPU converts that operand to f32 and
    runs an f32 GEMM (a fifth of the bf16 one's speed here), and on GPU the mixed dot is
    no tensor-core GEMM either. Here lhs's gradient (the activations' gradient, the one a
    LoRA step needs) contracts the cotangent cast to the operands' dtype with rhs, bf16 x
    bf16 -> f32, cast to lhs's dtype: what torch's bf16 autocast computes (its bf16 outputs'
    gradients are bf16). rhs's gradient (a kernel's, in full fine-tuning) stays a float32
    contraction as autodiff computes it: it contracts over the tokens, a form XLA:CPU 0.10's
    bf16 dots do not all take (some fail at run time with "Unsupported element type for
    DotThunk::Execute: BF16 x BF16 = F32"); so does lhs's when its axes need transposing."""
    return _narrow_dot_fwd(lhs, rhs, dimension_numbers, precision, out_dtype)[0]


def _narrow_dot_fwd(lhs, rhs, dimension_numbers, precision, out_dtype):
    out = lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=jnp.float32)
    return out.astype(out_dtype), (lhs, rhs)


def _narrow_dot_bwd(dimension_numbers, precision, out_dtype, residuals, g):
    lhs, rhs = residuals
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    swapped = ((rhs_contract, lhs_contract), (rhs_batch, lhs_batch))
    return (
        _transpose_dot(g, lhs, rhs, dimension_numbers, precision, narrow=True),
        _transpose_dot(g, rhs, lhs, swapped, precision, swap_ans=True),
    )


narrow_dot.defvjp(_narrow_dot_fwd, _narrow_dot_bwd)


def _transpose_dot(g, x, y, dimension_numbers, precision, swap_ans=False, narrow=False) -> jax.Array:
    """x's gradient of ``dot_general(x, y)`` (``dot_general(y, x)`` with `swap_ans`) from its
    cotangent `g`, accumulated in float32, cast to x's dtype: jax's own transpose rule
    (``_dot_general_transpose_lhs``). With `narrow`, and where the product comes out in x's
    axis order (no transpose for XLA to fold into the dot), g is cast to y's dtype and
    contracted with y as it is (bf16 x bf16 -> f32); otherwise both in float32."""
    (x_contract, y_contract), (x_batch, y_batch) = dimension_numbers
    x_kept = [i for i in range(x.ndim) if i not in x_contract and i not in x_batch]
    y_kept = [i for i in range(y.ndim) if i not in y_contract and i not in y_batch]
    n_batch = len(x_batch)
    start = n_batch if swap_ans else n_batch + len(x_kept)  # where g holds y's kept axes
    dims = ((tuple(range(start, start + len(y_kept))), tuple(y_kept)), (tuple(range(n_batch)), tuple(y_batch)))
    x_contract_by_y = [x_contract[i] for i in sorted(range(len(y_contract)), key=lambda i: y_contract[i])]
    unsorted = [*x_batch, *x_kept, *x_contract_by_y]
    order = tuple(unsorted.index(i) for i in range(x.ndim))
    if narrow and order == tuple(range(x.ndim)) and not swap_ans:
        g = g.astype(y.dtype)
    else:
        g, y = g.astype(jnp.float32), y.astype(jnp.float32)
    out = lax.dot_general(g, y, dims, precision=precision, preferred_element_type=jnp.float32)
    return lax.transpose(out, order).astype(x.dtype)


def dense(
    features: int | Sequence[int],
    names: tuple[str, ...],
    *,
    axis: int | Sequence[int] = -1,
    use_bias: bool = False,
    dtype: Dtype,
    param_dtype: Dtype,
    init_std: float = 0.02,
    name: str,
) -> nn.DenseGeneral | nn.Dense:
    """A projection whose kernel carries logical axis `names` (inputs then outputs)."""
    kernel_init = nn.with_logical_partitioning(nn.initializers.normal(init_std), names)
    n_out = len(features) if isinstance(features, Sequence) else 1
    bias_init = nn.with_logical_partitioning(nn.initializers.zeros_init(), names[-n_out:])
    common = {
        "use_bias": use_bias,
        "dtype": dtype,
        "param_dtype": param_dtype,
        "kernel_init": kernel_init,
        "bias_init": bias_init,
        "dot_general": f32_dot_general,
        "name": name,
    }
    if isinstance(features, int) and axis == -1:
        return nn.Dense(features, **common)
    return nn.DenseGeneral(features, axis=axis, **common)


def norm(kind: type[nn.RMSNorm] | type[nn.LayerNorm], epsilon: float, dtype: Dtype, param_dtype: Dtype, name: str):
    """An `nn.RMSNorm` or `nn.LayerNorm` whose parameters carry the ``embed`` axis name."""
    inits = {"scale_init": nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",))}
    if kind is nn.LayerNorm:
        inits["bias_init"] = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",))
    return kind(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name, **inits)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis, in float32, scaled by ``offset + scale``: Llama's norms have
    offset 0 (the scale starts at 1); Gemma's store the scale minus one (offset 1, starting at 0).
    `axis_name` is the scale's logical axis (``head_dim`` for per-head q/k norms)."""

    epsilon: float
    offset: float = 0.0
    axis_name: str = "embed"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros_init() if self.offset else nn.initializers.ones_init()
        partitioned = nn.with_logical_partitioning(init, (self.axis_name,))
        scale = self.param("scale", partitioned, (x.shape[-1],), self.param_dtype)
        x = x.astype(jnp.float32)
        normed = x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.epsilon)
        return (normed * (self.offset + scale.astype(jnp.float32))).astype(self.dtype)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    dropout: Callable[[jax.Array], jax.Array] | None = None,
    *,
    scale: float | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """Softmax attention in float32 with grouped KV heads (no repeated K/V in memory).

    q (B, T, H, D), k and v (B, S, K, D) with H a multiple of K, mask (B, T, S) bool;
    `dropout`, if given, is applied to the attention probabilities. Scores are scaled by
    `scale` (default D ** -0.5) and, with `softcap`, squashed to ``softcap * tanh(s / softcap)``
    before masking (Gemma 2)."""
    b, t, h, d = q.shape
    groups = h // k.shape[2]
    q = q.reshape(b, t, k.shape[2], groups, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (d**-0.5 if scale is None else scale)
    scores = tanh_cap(scores, softcap)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = (probs if dropout is None else dropout(probs)).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)


def tanh_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """``cap * tanh(x / cap)``: `x` squashed into (-cap, cap) (Gemma's soft-capping); `x` itself without a cap."""
    return x if cap is None else jnp.tanh(x / cap) * cap


def causal_mask(
    query_slots: jax.Array,
    key_valid: jax.Array,
    sliding_window: int | jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """(B, T, S): key slot s is visible from query slot t if s <= t, the key is not padding,
    (with a window, a static or traced integer) t - s < window, and (with `segment_ids`
    (B, T), for rows packed with several examples whose keys are the queries) both are of
    one segment: attention never crosses examples."""
    key_slots = jnp.arange(key_valid.shape[-1])
    visible = key_slots[None, None, :] <= query_slots[..., None]
    if sliding_window is not None:
        visible &= query_slots[..., None] - key_slots[None, None, :] < sliding_window
    if segment_ids is not None:
        visible &= segment_ids[:, :, None] == segment_ids[:, None, :]
    return visible & key_valid[:, None, :].astype(bool)


class KVCache(nn.Module):
    """Keys and values of earlier tokens, in the ``cache`` collection.

    `init_cache` sizes it for a batch and a maximum length; each call then writes the new
    tokens' keys, values and padding mask at the cache index and returns the whole cache
    and the slots of the new tokens."""

    @nn.compact
    def __call__(self, k: jax.Array, v: jax.Array, valid: jax.Array):
        cached_k = self.variable("cache", "key", jnp.zeros, k.shape, k.dtype)
        cached_v = self.variable("cache", "value", jnp.zeros, v.shape, v.dtype)
        cached_valid = self.variable("cache", "valid", jnp.zeros, valid.shape, bool)
        index = self.variable("cache", "index", lambda: jnp.array(0, jnp.int32))
        if self.is_initializing():  # `init_cache` traces with the full length: keep it empty
            return k, v, valid, jnp.arange(k.shape[1])[None]
        start = index.value
        cached_k.value = lax.dynamic_update_slice(cached_k.value, k.astype(cached_k.value.dtype), (0, start, 0, 0))
        cached_v.value = lax.dynamic_update_slice(cached_v.value, v.astype(cached_v.value.dtype), (0, start, 0, 0))
        cached_valid.value = lax.dynamic_update_slice(cached_valid.value, valid.astype(bool), (0, start))
        index.value = start + k.shape[1]
        slots = start + jnp.arange(k.shape[1])[None]
        return cached_k.value, cached_v.value, cached_valid.value, slots


def init_cache(model: nn.Module, batch: int, max_length: int) -> dict:
    """An empty KV cache for `model` (called with ``decode=True``), for `batch` sequences of
    up to `max_length` tokens."""
    ids = jnp.zeros((batch, max_length), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, positions=ids, decode=True))["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.meta.unbox(shapes))


def run_layers(
    block: type[nn.Module],
    n_layers: int,
    scan: bool,
    name: str,
    x: jax.Array,
    *args,
    per_layer: Sequence[Any] = (),
    remat: bool = False,
    **block_kwargs,
) -> jax.Array:
    """Run `n_layers` blocks ``x -> x`` (call from a compact method): unrolled as
    ``{name}_0``, ``{name}_1``, … (the Hugging Face layout), or one `nn.scan` named
    `name` whose parameters and cache carry a leading ``layers`` axis (faster compiles).
    Blocks take a ``scanned`` attribute and then return ``(x, None)``; `args` are
    broadcast to every layer; each entry of `per_layer` (an array, or a pytree of them) has a
    leading axis of `n_layers` and layer i gets its row i (after `args`). With `remat`, each
    block keeps only its input for the backward pass and recomputes the rest (`nn.remat`):
    activation memory of one layer instead of all, for about one more forward pass; Python
    bools in `args` stay static.
    Use it with `scan`: unrolled, XLA may schedule the recomputation early and keep as much."""
    if remat:
        block = nn.remat(block, static_argnums=tuple(2 + i for i, a in enumerate(args) if isinstance(a, bool)))
    if not scan:
        for i in range(n_layers):
            rows = (jax.tree.map(lambda a, i=i: a[i], tree) for tree in per_layer)
            x = block(**block_kwargs, name=f"{name}_{i}")(x, *args, *rows)
        return x
    stack = nn.scan(
        block,
        variable_axes={"params": 0, "cache": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,) * len(args) + (0,) * len(per_layer),
        length=n_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return stack(**block_kwargs, scanned=True, name=name)(x, *args, *per_layer)[0]
