"""`LoraConfig`: which kernels get adapters, their rank, scale and initialisation.

Module paths are the '/'-joined keys of a parameter tree up to the module that owns a
`kernel`, e.g. ``layers_3/attn/q_proj``. Matching follows peft:

* a list of names matches a module whose path ends with that name (or with a '/'-joined
  run of names such as ``attn/q_proj``);
* a single string is a regular expression that must match the whole path;
* ``"all-linear"`` (peft's shorthand, from QLoRA) targets every module that owns a kernel
  except the output head (``lm_head``, ``score``, ``classifier``) and `modules_to_save`;
* `rank_pattern` / `alpha_pattern` keys are regular expressions matched against the end
  of the path (``q_proj`` or ``layers_1[01]/.*/v_proj``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
from flax.core import FrozenDict

INITS = ("lora", "gaussian")
# initialisations from the kernel itself, which also replace it by the residual W - s·A·B
BASE_CHANGING_INITS = ("pissa", "pissa_niter_<N>", "olora")
DEFAULT_LAYERS_PATTERN = "layers?|h|blocks?"
ALL_LINEAR = "all-linear"  # peft's INCLUDE_LINEAR_LAYERS_SHORTHAND
OUTPUT_HEADS = ("lm_head", "score", "classifier")  # what "all-linear" leaves alone, as peft does


def _compile(field: str, pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"LoraConfig.{field}: invalid regular expression {pattern!r}: {err}") from None


def _names(field: str, value: str | Sequence[str] | None) -> str | tuple[str, ...] | None:
    """Normalise a name list (or one regex) to a hashable value, validating it; ``"all-linear"``
    (any case, alone or as a one-name list as the CLI gives it) stays the shorthand."""
    if [str(n).lower() for n in ([value] if isinstance(value, str) else value or ())] == [ALL_LINEAR]:
        return ALL_LINEAR
    if value is None or isinstance(value, str):
        if isinstance(value, str):
            _compile(field, value)
        return value
    names = tuple(value)
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"LoraConfig.{field}: entries must be non-empty module names, got {name!r}")
    return names


def _suffix_regex(names: tuple[str, ...]) -> re.Pattern:
    return re.compile(r"(?:.*/)?(?:" + "|".join(re.escape(n) for n in names) + ")")


def _matches(spec: str | tuple[str, ...] | None, path: str) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return _suffix_regex(spec).fullmatch(path) is not None


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """What to adapt and how; validated on construction, hashable, JSON-serialisable.

    Attributes:
      r: rank of each adapter.
      alpha: the LoRA alpha; the adapter output is scaled by alpha / r (alpha / sqrt(r)
        with `use_rslora`).
      dropout: dropout rate on the LoRA branch's input during training.
      target_modules: module names (suffix match), one regex over the whole path, or
        ``"all-linear"``: every module with a kernel but the output head and `modules_to_save`.
      exclude_modules: same syntax; matching modules never get adapters.
      layers: indices of the layers that get adapters (None: all). The index is read from
        a path component such as ``layers_11`` or ``layers/11``, or is the stacked axis of
        a scanned layer. With `layers` set, modules outside numbered layers get none.
      layers_pattern: regex for the name of the layer container in paths.
      rank_pattern: per-module rank overrides, ``{regex: r}``.
      alpha_pattern: per-module alpha overrides, ``{regex: alpha}``.
      use_rslora: scale by alpha / sqrt(r) (Kalajdzievski 2023) instead of alpha / r.
      use_dora: DoRA (Liu et al. 2024), as peft's ``use_dora``: a trainable magnitude m per
        output feature beside A and B, initialised to the norm of W, and the layer computes
        ``m / ‖W + s·A·B‖ · (W + s·A·B)`` (the norm over the input axes, held constant in the
        backward pass).
      init: ``"lora"`` (A Kaiming-uniform as in peft, B = 0) or ``"gaussian"`` (A normal
        with std 1/r, B = 0): the base is untouched and the adapted model starts equal to it.
        ``"pissa"`` (Meng et al. 2024: A, B from the kernel's top-r singular triplets),
        ``"pissa_niter_N"`` (the same by randomized SVD with N subspace iterations) or
        ``"olora"`` (Büyükakyüz 2024: A, B from the kernel's QR decomposition) also replace each
        adapted kernel by the residual ``W - s·A·B``, as peft does: `init` returns that
        residual base, the adapted model still starts equal to the original, and a PEFT export
        needs the initial adapters to convert back to the original base (`jlora.peft.export`).
      modules_to_save: modules whose every parameter is trained fully (e.g. a classifier).
      dtype: dtype of the adapter parameters.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | Sequence[str] = ("q_proj", "v_proj")
    exclude_modules: str | Sequence[str] | None = None
    layers: Sequence[int] | None = None
    layers_pattern: str = DEFAULT_LAYERS_PATTERN
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "lora"
    modules_to_save: Sequence[str] = ()
    dtype: Any = "float32"

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)
        _check_rank("r", self.r)
        _check_alpha("alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout}")
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"LoraConfig.use_dora must be true or false, got {self.use_dora!r}")
        if self.init not in INITS and not self.changes_base:
            raise ValueError(f"LoraConfig.init must be one of {INITS + BASE_CHANGING_INITS}, got {self.init!r}")
        target = _names("target_modules", self.target_modules)
        if not target:
            raise ValueError("LoraConfig.target_modules is empty: name the modules to adapt, e.g. ['q_proj', 'v_proj']")
        set_("target_modules", target)
        set_("exclude_modules", _names("exclude_modules", self.exclude_modules))
        set_("modules_to_save", _names("modules_to_save", self.modules_to_save) or ())
        _compile("layers_pattern", self.layers_pattern)
        if self.layers is not None:
            layers = tuple(self.layers)
            if not layers or any(not isinstance(i, int) or i < 0 for i in layers):
                raise ValueError(f"LoraConfig.layers must be non-negative layer indices, got {self.layers!r}")
            set_("layers", tuple(sorted(set(layers))))
        for field, check in (("rank_pattern", _check_rank), ("alpha_pattern", _check_alpha)):
            pattern = dict(getattr(self, field))
            for key, value in pattern.items():
                _compile(field, key)
                check(f"{field}[{key!r}]", value)
            set_(field, FrozenDict(pattern))
        try:
            set_("dtype", jnp.dtype(self.dtype).name)
        except TypeError:
            raise ValueError(f"LoraConfig.dtype: {self.dtype!r} is not a dtype") from None

    @property
    def changes_base(self) -> bool:
        """Whether `init` replaces the adapted kernels by a residual (PiSSA, OLoRA)."""
        return self.init in ("pissa", "olora") or re.fullmatch(r"pissa_niter_\d+", str(self.init)) is not None

    # -- per-module decisions ------------------------------------------------------
    def targets(self, path: str) -> bool:
        """Whether the module at `path` gets an adapter (layer selection aside). With
        ``"all-linear"`` this holds for any module but a head: call it on modules that own a kernel."""
        if self.target_modules == ALL_LINEAR:
            chosen = path.rsplit("/", 1)[-1] not in OUTPUT_HEADS and not self.saves(path)
        else:
            chosen = _matches(self.target_modules, path)
        return chosen and not _matches(self.exclude_modules, path)

    def saves(self, path: str) -> bool:
        """Whether the module at `path` is trained fully (`modules_to_save`)."""
        return _matches(self.modules_to_save, path)

    def layer_index(self, path: str) -> int | None:
        """The layer index in `path` (``layers_11`` or ``layers/11``), or None."""
        found = re.findall(rf"(?:^|/)(?:{self.layers_pattern})[_/](\d+)(?=/|$)", path)
        return int(found[-1]) if found else None

    def rank(self, path: str) -> int:
        return _lookup(self.rank_pattern, path, self.r)

    def scale(self, path: str, r: int) -> float:
        """The factor s in W + s·A·B for the module at `path` with rank `r`."""
        alpha = _lookup(self.alpha_pattern, path, self.alpha)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # -- serialisation --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; `LoraConfig(**d)` rebuilds the config."""
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            out[field.name] = value
        return out


def suffix_match(pattern: str, path: str) -> bool:
    """Whether the regex `pattern` matches a whole trailing run of components of `path`."""
    return re.fullmatch(rf"(?:.*/)?(?:{pattern})", path) is not None


def _lookup(patterns: Mapping[str, Any], path: str, default):
    return next((value for key, value in patterns.items() if suffix_match(key, path)), default)


def _check_rank(name: str, r) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"LoraConfig.{name}: rank must be an integer >= 1, got {r!r}")


def _check_alpha(name: str, alpha) -> None:
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise ValueError(f"LoraConfig.{name}: alpha must be a number > 0, got {alpha!r}")
