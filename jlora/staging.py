"""New folders written in full or not at all, readable as the user's umask says.

Exports (PEFT adapters, merged models, imported runs) are written into a hidden sibling
folder and renamed into place only when complete, so a failure or a kill never leaves a
half-written `out`. `tempfile.mkdtemp` makes that folder 0700 and safetensors writes 0600
files; a serving container running as another user could not read them, so the modes are
set from the umask (0755 / 0644 under the usual 022) before the rename.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staged(out: str | pathlib.Path) -> Iterator[pathlib.Path]:
    """Yield an empty hidden folder beside `out` to write into; it becomes `out` when the
    body succeeds and is deleted when it fails. `out` must not exist."""
    out = pathlib.Path(out)
    if out.exists() or out.is_symlink():
        raise FileExistsError(f"{out} exists; choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield staging
        mask = _umask()
        for path in [staging, *staging.rglob("*")]:
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
