"""The Llama family in Flax Linen: Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 and Phi-3.

One decoder with options covers them all (`LlamaConfig`): per-head q/k norms (Qwen3, Gemma 3),
norms scaled by ``1 + weight``, embeddings scaled by sqrt(hidden_size), norms after attention
and the MLP as well as before, GeGLU, a query scale, attention and final logit soft-capping
(Gemma), per-layer sliding windows and a separate RoPE base for sliding layers (Gemma 3), fused
q/k/v and gate/up projections, partial RoPE and LongRoPE (Phi-3).

Module names and nesting follow Hugging Face's (``model/layers_3/self_attn/q_proj``,
``model/layers_3/mlp/gate_proj``, ``lm_head``; Phi-3's fused ``self_attn/qkv_proj`` and
``mlp/gate_up_proj`` stay fused), so peft target lists work unchanged and a
parameter path maps to its checkpoint tensor by replacing ``/`` with ``.``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jlora.models.layers import KVCache, RMSNorm, attention, causal_mask, dense, f32_dot, run_layers, tanh_cap
from jlora.quantize import weight

Dtype = Any
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
LAYER_TYPES = ("full_attention", "sliding_attention")
NO_WINDOW = np.iinfo(np.int32).max  # the window of a full-attention layer
ACTIVATIONS = {"silu": nn.silu, "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True)}
GEMMA = ("gemma2", "gemma3_text")
# the families whose transformers model reads `attention_bias` (on q, k, v and o)
ATTENTION_BIAS = ("llama", "qwen3", *GEMMA)
# the families whose transformers model has fused qkv_proj and gate_up_proj
FUSED = ("phi3",)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The architecture; `from_hf` reads it from a Hugging Face config.

    Beyond Llama's: `hidden_act` of the MLP's gate; `qk_norm`, an RMSNorm over each head of q
    and k before RoPE; `norm_offset`, added to every RMSNorm's weight (Gemma: 1); `scale_embeddings`
    by sqrt(hidden_size); `sandwich_norms`, norms on the attention and MLP outputs too (Gemma's
    post_attention_layernorm, pre_/post_feedforward_layernorm); `query_pre_attn_scalar`, scores
    scaled by its inverse square root instead of head_dim's; soft-capping of attention scores
    and of the logits; `rope_local_theta`, the base of a default RoPE for sliding layers;
    `fused`, one ``qkv_proj`` for q, k and v (heads in that order) and one ``gate_up_proj`` for
    gate then up (Phi-3), split after the projection; `partial_rotary_factor`, RoPE over the first
    ``int(head_dim * factor)`` dims of each head only; LongRoPE's per-frequency `rope_short_factor`
    and `rope_long_factor`, the long ones once a position reaches `rope_original_max_positions`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    rope_beta_fast: float = 32.0  # yarn
    rope_beta_slow: float = 1.0  # yarn
    rope_truncate: bool = True  # yarn
    rope_attention_factor: float = 1.0  # yarn: scales cos and sin
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None  # which layers the window applies to (None: all)
    model_type: str = "llama"
    hidden_act: str = "silu"
    qk_norm: bool = False
    norm_offset: float = 0.0
    scale_embeddings: bool = False
    sandwich_norms: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    rope_local_theta: float | None = None  # sliding layers' RoPE (None: the global one)
    fused: bool = False
    partial_rotary_factor: float = 1.0
    rope_short_factor: tuple[float, ...] | None = None  # longrope
    rope_long_factor: tuple[float, ...] | None = None  # longrope

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"RoPE type {self.rope_type!r} is not supported; jlora supports {ROPE_TYPES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.layer_types is not None and (
            len(self.layer_types) != self.num_layers or not set(self.layer_types) <= set(LAYER_TYPES)
        ):
            raise ValueError(f"layer_types {self.layer_types} must give one of {LAYER_TYPES} per layer")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; jlora supports {list(ACTIVATIONS)}")
        frequencies = len(default_inv_freq(self.rope_theta, self.rotary_dim))
        if not 0 < 2 * frequencies <= self.head_dim:
            raise ValueError(
                f"partial_rotary_factor {self.partial_rotary_factor} gives {2 * frequencies} rotary dims "
                f"of head_dim {self.head_dim}; jlora needs 2 .. head_dim"
            )
        if self.rope_type == "longrope":
            for name in ("rope_short_factor", "rope_long_factor"):
                if len(getattr(self, name) or ()) != frequencies:
                    raise ValueError(f"longrope needs {name} of {frequencies} numbers, one per RoPE frequency")

    @property
    def rotary_dim(self) -> int:
        """The dims of each head that RoPE rotates (the first ones), as transformers computes them."""
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_hf(cls, hf: Any) -> LlamaConfig:
        """From a transformers config object (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 text or Phi-3),
        with the fields each family's model reads (`jlora.models.loading.check_hf_config` refuses the rest)."""
        family, heads = hf.model_type, hf.num_attention_heads
        gemma = family in GEMMA
        rope, local_rope = hf_ropes(hf)
        attention_bias = family in ATTENTION_BIAS and bool(getattr(hf, "attention_bias", False))
        window, layer_types = hf_windows(hf)
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
            rms_norm_eps=hf.rms_norm_eps,
            rope_theta=rope.get("rope_theta", getattr(hf, "rope_theta", None) or 10000.0),
            rope_type=rope.get("rope_type", rope.get("type", "default")),
            rope_factor=rope.get("factor", 1.0),
            rope_low_freq_factor=rope.get("low_freq_factor", 1.0),
            rope_high_freq_factor=rope.get("high_freq_factor", 4.0),
            rope_original_max_positions=rope.get("original_max_position_embeddings", 8192),
            rope_beta_fast=rope.get("beta_fast") or 32.0,
            rope_beta_slow=rope.get("beta_slow") or 1.0,
            rope_truncate=rope.get("truncate", True),
            rope_attention_factor=rope_attention_factor(rope, hf.max_position_embeddings),
            tie_word_embeddings=bool(hf.tie_word_embeddings),
            qkv_bias=attention_bias or family == "qwen2",
            o_bias=attention_bias,
            mlp_bias=family == "llama" and bool(getattr(hf, "mlp_bias", False)),
            sliding_window=window,
            layer_types=layer_types,
            model_type=family,
            hidden_act=hf.hidden_activation if gemma else hf.hidden_act,
            qk_norm=family in ("qwen3", "gemma3_text"),
            norm_offset=1.0 if gemma else 0.0,
            scale_embeddings=gemma,
            sandwich_norms=gemma,
            query_pre_attn_scalar=hf.query_pre_attn_scalar if gemma else None,
            # Gemma 3's model keeps attn_logit_softcapping but never applies it
            attn_logit_softcapping=hf.attn_logit_softcapping if family == "gemma2" else None,
            final_logit_softcapping=hf.final_logit_softcapping if gemma else None,
            rope_local_theta=None if local_rope is None else local_rope["rope_theta"],
            fused=family in FUSED,
            partial_rotary_factor=rope.get("partial_rotary_factor", 1.0),
            rope_short_factor=_floats(rope.get("short_factor")),
            rope_long_factor=_floats(rope.get("long_factor")),
        )

    def inv_freq(self, long: bool = False) -> np.ndarray:
        """RoPE inverse frequencies, with the config's scaling (as transformers computes them);
        `long` picks LongRoPE's long factors."""
        inv = default_inv_freq(self.rope_theta, self.rotary_dim)
        if self.rope_type == "longrope":
            return inv / np.asarray(self.rope_long_factor if long else self.rope_short_factor, np.float64)
        if self.rope_type == "linear":
            return inv / self.rope_factor
        if self.rope_type == "llama3":
            low_wavelen = self.rope_original_max_positions / self.rope_low_freq_factor
            high_wavelen = self.rope_original_max_positions / self.rope_high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > low_wavelen, inv / self.rope_factor, inv)
            smooth = (self.rope_original_max_positions / wavelen - self.rope_low_freq_factor) / (
                self.rope_high_freq_factor - self.rope_low_freq_factor
            )
            smoothed = (1 - smooth) * scaled / self.rope_factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            return np.where(medium, smoothed, scaled)
        if self.rope_type == "yarn":
            return self._yarn(inv)
        return inv

    def _yarn(self, inv: np.ndarray) -> np.ndarray:
        """YaRN: interpolated (inv / factor) low frequencies, extrapolated (inv) high ones,
        blended by a linear ramp over the correction range (transformers' formula)."""
        dim, original = self.rotary_dim, self.rope_original_max_positions
        correction = lambda turns: dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(self.rope_theta))
        low, high = correction(self.rope_beta_fast), correction(self.rope_beta_slow)
        if self.rope_truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        extrapolated = 1 - np.clip((np.arange(dim // 2) - low) / ((high - low) or 0.001), 0, 1)
        return inv / self.rope_factor * (1 - extrapolated) + inv * extrapolated

    def layer_windows(self) -> np.ndarray:
        """Each layer's sliding window (int32; `NO_WINDOW` for full attention)."""
        sliding = self.layer_types or ("sliding_attention",) * self.num_layers
        window = NO_WINDOW if self.sliding_window is None else self.sliding_window
        return np.array([window if t == "sliding_attention" else NO_WINDOW for t in sliding], np.int32)

    def ropes(self) -> tuple[np.ndarray, np.ndarray]:
        """The RoPEs' inverse frequencies (R, head_dim / 2) and cos/sin scales (R,): the global
        one, then with `rope_local_theta` the sliding layers' one."""
        if self.rope_local_theta is None:
            return self.inv_freq()[None], np.array([self.rope_attention_factor])
        local = default_inv_freq(self.rope_local_theta, self.rotary_dim)
        return np.stack([self.inv_freq(), local]), np.array([self.rope_attention_factor, 1.0])

    def per_layer(self) -> dict[str, np.ndarray]:
        """What differs between layers, one row per layer (passed through `run_layers`, so that a
        scanned stack shares one program): the window (with one) and the RoPE's index in `ropes`
        (with a local RoPE)."""
        out = {} if self.sliding_window is None else {"window": self.layer_windows()}
        if self.rope_local_theta is not None:
            sliding = self.layer_types or ("sliding_attention",) * self.num_layers
            out["rope"] = np.array([t == "sliding_attention" for t in sliding], np.int32)
        return out


def default_inv_freq(theta: float, head_dim: int) -> np.ndarray:
    """Unscaled RoPE inverse frequencies of base `theta`."""
    return 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def hf_ropes(hf: Any) -> tuple[dict, dict | None]:
    """A transformers config's RoPE parameters: the global ones, and the sliding layers' own
    (Gemma 3's ``rope_parameters`` by layer type; None elsewhere)."""
    rope = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    if hf.model_type == "gemma3_text":
        return dict(rope["full_attention"]), dict(rope["sliding_attention"])
    return rope, None


def hf_windows(hf: Any) -> tuple[int | None, tuple[str, ...] | None]:
    """(sliding window, layer types) as each family's transformers model applies them: Llama has
    none; Mistral and Phi-3 window every layer; Qwen2 and Qwen3 the sliding ones of their layer_types,
    with use_sliding_window; Gemma the sliding ones of its layer_types."""
    if hf.model_type == "llama":
        return None, None
    if hf.model_type in ("mistral", "phi3"):
        return hf.sliding_window, None
    if hf.model_type in GEMMA:
        return hf.sliding_window, tuple(hf.layer_types)
    window = hf.sliding_window if getattr(hf, "use_sliding_window", True) else None
    return window, None if window is None else tuple(hf.layer_types)


def rope_attention_factor(rope: dict, max_positions: int) -> float:
    """The scale of cos and sin: YaRN's and LongRoPE's (`attention_factor`, or derived from the
    scaling factor); 1 for the other RoPE types."""
    kind = rope.get("rope_type")
    if kind == "yarn":
        return yarn_attention_factor(rope)
    if kind != "longrope":
        return 1.0
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])
    original = rope["original_max_position_embeddings"]
    factor = rope.get("factor") or max_positions / original
    return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))


def _floats(values: Any) -> tuple[float, ...] | None:
    return None if values is None else tuple(float(v) for v in values)


def yarn_attention_factor(rope: dict) -> float:
    """YaRN's scale of cos and sin: `attention_factor`, or derived from `factor` (and `mscale`)."""
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])
    scale = lambda m=1.0: 1.0 if rope["factor"] <= 1 else 0.1 * m * math.log(rope["factor"]) + 1.0
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    return scale(mscale) / scale(mscale_all_dim) if mscale and mscale_all_dim else scale()


def rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotary embedding in Hugging Face's layout (rotate the two halves of the rotary dims: the
    first ``cos.shape[-1]`` of head_dim; the rest pass unchanged)."""
    width = cos.shape[-1]
    x, rest = x[..., :width], x[..., width:]
    rotated = jnp.concatenate([-x[..., width // 2 :], x[..., : width // 2]], axis=-1)
    out = x * cos[:, :, None] + rotated * sin[:, :, None]
    return jnp.concatenate([out, rest], axis=-1).astype(x.dtype)


def rms_norm(config: LlamaConfig, dtype: Dtype, param_dtype: Dtype, name: str, axis_name: str = "embed") -> RMSNorm:
    return RMSNorm(config.rms_norm_eps, config.norm_offset, axis_name, dtype, param_dtype, name=name)


class LlamaAttention(nn.Module):
    config: LlamaConfig
    dtype: Dtype
    param_dtype: Dtype
    decode: bool = False

    @nn.compact
    def __call__(self, x, mask, segment_ids, cos, sin, window=None):
        c, kw = self.config, {"dtype": self.dtype, "param_dtype": self.param_dtype}
        project = lambda heads, axis, name: dense(
            (heads, c.head_dim), ("embed", axis, "head_dim"), use_bias=c.qkv_bias, name=name, **kw
        )(x)
        if c.fused:  # one projection, its heads q's then k's then v's (Phi-3)
            qkv = project(c.num_heads + 2 * c.num_kv_heads, "qkv_heads", "qkv_proj")
            q, k, v = jnp.split(qkv, [c.num_heads, c.num_heads + c.num_kv_heads], axis=-2)
        else:
            q = project(c.num_heads, "heads", "q_proj")
            k = project(c.num_kv_heads, "kv_heads", "k_proj")
            v = project(c.num_kv_heads, "kv_heads", "v_proj")
        if c.qk_norm:  # per head, before RoPE
            q = rms_norm(c, name="q_norm", axis_name="head_dim", **kw)(q)
            k = rms_norm(c, name="k_norm", axis_name="head_dim", **kw)(k)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        if self.decode:
            k, v, key_valid, slots = KVCache(name="cache")(k, v, mask)
        else:
            key_valid, slots = mask, jnp.arange(x.shape[1])[None]
        scale = None if c.query_pre_attn_scalar is None else c.query_pre_attn_scalar**-0.5
        visible = causal_mask(slots, key_valid, window, segment_ids)
        h = attention(q, k, v, visible, scale=scale, softcap=c.attn_logit_softcapping)
        out = dense(
            c.hidden_size, ("heads", "head_dim", "embed"), axis=(-2, -1), use_bias=c.o_bias, name="o_proj", **kw
        )
        return out(h)


class LlamaMLP(nn.Module):
    config: LlamaConfig
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x):
        c, kw = self.config, {"dtype": self.dtype, "param_dtype": self.param_dtype, "use_bias": self.config.mlp_bias}
        if c.fused:  # one projection, gate's outputs then up's (Phi-3)
            gate_up = dense((2, c.intermediate_size), ("embed", "gate_up", "mlp"), name="gate_up_proj", **kw)(x)
            gate, up = gate_up[..., 0, :], gate_up[..., 1, :]
        else:
            gate = dense(c.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)(x)
            up = dense(c.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)(x)
        return dense(c.hidden_size, ("mlp", "embed"), name="down_proj", **kw)(ACTIVATIONS[c.hidden_act](gate) * up)


class LlamaBlock(nn.Module):
    """Pre-norm attention and MLP, each added to the residual; with `sandwich_norms` their
    outputs are normed too (Gemma: post_attention_layernorm is then the attention output's norm
    and pre_feedforward_layernorm the MLP input's)."""

    config: LlamaConfig
    dtype: Dtype
    param_dtype: Dtype
    decode: bool = False
    scanned: bool = False

    @nn.compact
    def __call__(self, x, mask, segment_ids, cos, sin, layer=None):
        c, kw = self.config, {"dtype": self.dtype, "param_dtype": self.param_dtype}
        layer = layer or {}
        index = layer.get("rope", 0)  # cos and sin are stacked over the config's RoPEs
        attn = LlamaAttention(c, decode=self.decode, name="self_attn", **kw)
        h = attn(
            rms_norm(c, name="input_layernorm", **kw)(x), mask, segment_ids, cos[index], sin[index], layer.get("window")
        )
        if c.sandwich_norms:
            h = rms_norm(c, name="post_attention_layernorm", **kw)(h)
        x = x + h
        pre_mlp = "pre_feedforward_layernorm" if c.sandwich_norms else "post_attention_layernorm"
        h = LlamaMLP(c, name="mlp", **kw)(rms_norm(c, name=pre_mlp, **kw)(x))
        if c.sandwich_norms:
            h = rms_norm(c, name="post_feedforward_layernorm", **kw)(h)
        x = x + h
        return (x, None) if self.scanned else x


class LlamaModel(nn.Module):
    config: LlamaConfig
    scan: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask, positions, decode: bool, segment_ids=None):
        c, kw = self.config, {"dtype": self.dtype, "param_dtype": self.param_dtype}
        embed_init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed"))
        x = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=embed_init, name="embed_tokens", **kw)(input_ids)
        if c.scale_embeddings:  # the scale rounded to the embedding's dtype, as transformers does
            x = x * jnp.asarray(math.sqrt(c.hidden_size), self.param_dtype).astype(x.dtype)
        cos, sin = rope_tables(c, positions, self.dtype)
        block_kwargs = {"config": c, "decode": decode, **kw}
        layer = jax.tree.map(jnp.asarray, c.per_layer())  # traced: a scanned stack shares one program
        args = (x, attention_mask, segment_ids, cos, sin)
        x = run_layers(
            LlamaBlock,
            c.num_layers,
            self.scan,
            "layers",
            *args,
            per_layer=(layer,) if layer else (),
            remat=self.remat,
            **block_kwargs,
        )
        return rms_norm(c, name="norm", **kw)(x)


def rope_tables(config: LlamaConfig, positions: jax.Array, dtype: Dtype) -> tuple[jax.Array, jax.Array]:
    """cos and sin (R, B, T, rotary dims) of each of the config's RoPEs at `positions` (B, T).
    LongRoPE's long factors apply, as in transformers, once any position reaches the original
    length (`rope_original_max_positions`)."""
    inv_freq, scales = config.ropes()
    inv_freq = jnp.asarray(inv_freq, jnp.float32)
    if config.rope_type == "longrope":
        long = jnp.max(positions) + 1 > config.rope_original_max_positions
        inv_freq = jnp.where(long, jnp.asarray(config.inv_freq(long=True), jnp.float32)[None], inv_freq)
    angles = positions[None, ..., None].astype(jnp.float32) * inv_freq[:, None, None]
    angles = jnp.concatenate([angles, angles], axis=-1)
    scales = jnp.asarray(scales, jnp.float32)[:, None, None, None]
    return (jnp.cos(angles) * scales).astype(dtype), (jnp.sin(angles) * scales).astype(dtype)


class LlamaForCausalLM(nn.Module):
    """Decoder with a language-model head; returns float32 logits (B, T, vocab).

    Args of `__call__`: `input_ids` (B, T); `attention_mask` (B, T), 1 for real tokens
    (padding anywhere); `positions` (B, T), default 0..T-1 as in transformers (required
    with `decode`); `decode` uses and updates the KV cache in the ``cache`` collection
    (see `jlora.models.generate`); `logits_last` > 0 computes logits for the last that many
    positions only (a training loss on completions at the end of left-padded rows needs no
    more); `segment_ids` (B, T), for rows packed with several examples (`jlora.data.pack`):
    tokens attend only within their own segment (with `positions` restarting per segment,
    each example scores as it would alone; not with `decode`). `hidden_only` returns the
    final (normed) hidden states instead of logits, for a chunked loss
    (`jlora.train.chunked_cross_entropy`).

    `remat` recomputes each layer in the backward pass instead of keeping its activations
    (`jlora.models.layers.run_layers`); parameters and outputs are the same.
    """

    config: LlamaConfig
    scan: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(
        self,
        input_ids,
        attention_mask=None,
        positions=None,
        decode: bool = False,
        logits_last: int = 0,
        segment_ids=None,
        hidden_only: bool = False,
    ):
        if decode and segment_ids is not None:
            raise ValueError("segment_ids are for packed training rows; decode=True takes none")
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        if positions is None:
            if decode:
                raise ValueError("decode=True needs explicit positions (jlora.models.generate computes them)")
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        c = self.config
        long_cache = c.rope_type == "longrope" and input_ids.shape[1] > c.rope_original_max_positions
        if decode and self.is_initializing() and long_cache:  # sizing the cache (`init_cache`)
            raise ValueError(
                f"a KV cache of {input_ids.shape[1]} tokens with longrope: past original_max_position_embeddings"
                f" ({c.rope_original_max_positions}) transformers recomputes the cache with the long factors,"
                " which jlora's decoding does not; decode at most that many tokens"
            )
        model = LlamaModel(self.config, self.scan, self.dtype, self.param_dtype, self.remat, name="model")
        hidden = model(input_ids, attention_mask, positions, decode, segment_ids)
        if logits_last:  # only the last positions' logits: the vocabulary projection is costly
            hidden = hidden[:, -logits_last:]
        if hidden_only:  # the final hidden states, for a loss that applies the head itself (`lm_head_of`)
            return hidden
        if self.config.tie_word_embeddings:
            embedding = weight(nn.meta.unbox(model.variables["params"]["embed_tokens"]["embedding"]), self.dtype)
            dims = (((hidden.ndim - 1,), (1,)), ((), ()))
            logits = f32_dot(hidden, embedding, dims)
        else:
            lm_head = dense(
                self.config.vocab_size,
                ("embed", "vocab"),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="lm_head",
            )
            logits = lm_head(hidden).astype(jnp.float32)
        return tanh_cap(logits, self.config.final_logit_softcapping)
