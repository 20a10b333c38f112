"""Every study, one after another, each resuming from the runs it finds in results/runs/.

python -m experiments                      # the whole suite (many hours on a 2-core CPU)
python -m experiments fair ranks --smoke   # some studies; other flags go to each study
"""

from __future__ import annotations

import importlib
import sys

STUDIES = ("methods", "freezing", "ranks", "subspace", "decoder", "qlora", "fair")  # subspace reuses ranks' runs


def main(argv: list[str]) -> None:
    chosen = [a for a in argv if a in STUDIES] or list(STUDIES)
    flags = [a for a in argv if a not in STUDIES]
    for study in chosen:
        print(f"== experiments.{study} {' '.join(flags)}", flush=True)
        importlib.import_module(f"experiments.{study}").main(flags)


if __name__ == "__main__":
    main(sys.argv[1:])
