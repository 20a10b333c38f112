"""The load cache of GGUF checkpoints: what reading a GGUF file gives, kept in formats that read fast.

Reading a GGUF file means parsing its metadata (SmolLM2's 49,152 vocabulary strings and merges,
seconds in gguf-py), dequantizing its tensors and converting its tokenizer. `load_gguf` keeps what
that gives, once per file, in ``<cache>/gguf/<name>-<hash>/``: the dequantized float32 tensors as
one safetensors file (memory-mapped when read back), the `LlamaConfig` as json and the tokenizer as
``save_pretrained`` writes it (``tokenizer.json``, the chat template). Only safetensors and json are
read back, never pickles.

``<cache>`` is ``$JLORA_CACHE_DIR``, else ``$XDG_CACHE_HOME/jlora``, else ``~/.cache/jlora``;
``JLORA_CACHE_DIR=off`` turns the cache off. An entry is keyed by the file's resolved path, size
and mtime, `FORMAT`, the code that reads GGUF files (`CODE`) and the versions of gguf and
transformers: a changed file, an edit to that code or another version makes a new entry, which
replaces the file's old one (one entry per file; SmolLM2's is 517 MiB of float32, 5.5x the GGUF).
Entries are written in a temporary sibling folder and renamed into place, so a reader sees a whole
entry or none; one that does not read back whole is ignored and rewritten. A cache that cannot be
written warns once and the load goes on without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import pathlib
import re
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jlora.models.llama import LlamaConfig

FORMAT = 1  # bump when an entry's layout changes
# the code whose output an entry holds: an edit to it makes new entries
CODE = tuple(pathlib.Path(__file__).with_name(name) for name in ("cache.py", "loading.py", "llama.py"))
MANIFEST, TENSORS, CONFIG, TOKENIZER = "entry.json", "tensors.safetensors", "config.json", "tokenizer"
# tokenizer options that ``save_pretrained`` does not keep; passed back to ``from_pretrained``
TOKENIZER_OPTIONS = ("add_bos_token", "add_eos_token")
_warned = False


@dataclasses.dataclass(frozen=True)
class Entry:
    """Where the cache keeps one GGUF file (`folder`) and what identifies that file (`key`, json)."""

    folder: pathlib.Path
    key: str


def root() -> pathlib.Path | None:
    """The cache folder, or None when ``JLORA_CACHE_DIR=off``."""
    configured = os.environ.get("JLORA_CACHE_DIR", "")
    if configured.lower() == "off":
        return None
    if configured:
        return pathlib.Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (pathlib.Path(xdg) if xdg else pathlib.Path.home() / ".cache") / "jlora"


def entry(path: pathlib.Path) -> Entry | None:
    """The cache entry of GGUF file `path` as it is now, or None when the cache is off."""
    folder = root()
    if folder is None:
        return None
    source = path.resolve()
    stat = source.stat()
    versions = {name: importlib.metadata.version(name) for name in ("gguf", "transformers")}
    code = hashlib.sha256(b"".join(file.read_bytes() for file in CODE)).hexdigest()
    key = json.dumps(
        {"format": FORMAT, "source": str(source), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        | {"code": code, **versions},
        sort_keys=True,
    )
    name = f"{re.sub(r'[^A-Za-z0-9._-]', '_', source.stem)[:64]}-{hashlib.sha256(key.encode()).hexdigest()[:20]}"
    return Entry(folder / "gguf" / name, key)


def read(at: Entry, *, tokenizer: bool) -> tuple[LlamaConfig, dict[str, Callable[[], Any]], Any | None] | None:
    """(config, tensors, tokenizer) from the entry, or None when it is missing, incomplete, made for
    another file or lacks a tokenizer that is asked for: the caller then reads the GGUF file."""
    manifest = _manifest(at)
    if manifest is None or (tokenizer and manifest["tokenizer"] is None):
        return None
    try:
        fields = json.loads((at.folder / CONFIG).read_text())
        config = LlamaConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
        tensors = _tensors(at.folder / TENSORS, manifest["tensors"])
        tok = None
        if tokenizer:
            from transformers import PreTrainedTokenizerFast

            options = manifest["tokenizer"]
            tok = PreTrainedTokenizerFast.from_pretrained(at.folder / TOKENIZER, local_files_only=True, **options)
        return config, tensors, tok
    except Exception:  # whatever a damaged entry raises, it is not trusted
        return None


def write(at: Entry, config: LlamaConfig, tensors: Mapping[str, np.ndarray], tokenizer: Any | None) -> bool:
    """Store what reading the GGUF file gave; False (with a warning, once) when the cache cannot
    be written. A whole entry another process wrote meanwhile is kept."""
    from safetensors.numpy import save_file

    parent, tmp = at.folder.parent, None
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{at.folder.name}.", suffix=".tmp", dir=parent))
        save_file({name: np.ascontiguousarray(value) for name, value in tensors.items()}, tmp / TENSORS)
        (tmp / CONFIG).write_text(json.dumps(dataclasses.asdict(config), indent=1))
        options = None
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / TOKENIZER)
            options = {k: tokenizer.init_kwargs[k] for k in TOKENIZER_OPTIONS if k in tokenizer.init_kwargs}
        manifest = {"key": json.loads(at.key), "tensors": sorted(tensors), "tokenizer": options}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _publish(tmp, at, has_tokenizer=tokenizer is not None)
        _prune(at)
        return True
    except Exception as error:  # a cache that cannot be written never fails the load
        global _warned
        if not _warned:
            _warned = True
            warnings.warn(
                f"jlora: cannot write the GGUF load cache in {parent} ({error}); loading without it "
                "(JLORA_CACHE_DIR sets its folder, JLORA_CACHE_DIR=off turns it off)",
                stacklevel=3,
            )
        return False
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _manifest(at: Entry) -> dict | None:
    """The entry's manifest when the entry is whole and made for this file, else None."""
    try:
        manifest = json.loads((at.folder / MANIFEST).read_text())
        whole = all((at.folder / name).is_file() for name in (TENSORS, CONFIG))
        tokenizer = manifest["tokenizer"] is None or (at.folder / TOKENIZER / "tokenizer.json").is_file()
        return manifest if manifest["key"] == json.loads(at.key) and whole and tokenizer else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _tensors(file: pathlib.Path, names: list[str]) -> dict[str, Callable[[], Any]]:
    """``{name: loader}`` over one open (memory-mapped) safetensors file holding exactly `names`;
    the open file stays readable if the entry is replaced meanwhile."""
    from safetensors import safe_open

    handle = safe_open(file, framework="numpy")
    if sorted(handle.keys()) != sorted(names):
        raise ValueError(f"{file}: holds other tensors than its manifest names")
    return {name: (lambda name=name: handle.get_tensor(name)) for name in names}


def _publish(tmp: pathlib.Path, at: Entry, *, has_tokenizer: bool) -> None:
    """Rename `tmp` into place. An entry already there that reads back (a concurrent writer's) is
    kept, unless it lacks the tokenizer that `tmp` has; any other is moved aside and removed."""
    with contextlib.suppress(OSError):
        os.rename(tmp, at.folder)
        return
    if read(at, tokenizer=has_tokenizer) is not None:
        return
    stale = at.folder.with_name(f".{at.folder.name}.{uuid.uuid4().hex[:8]}.stale")
    with contextlib.suppress(OSError):
        os.rename(at.folder, stale)
    with contextlib.suppress(OSError):  # lost to another writer: theirs stays
        os.rename(tmp, at.folder)
    shutil.rmtree(stale, ignore_errors=True)


def _prune(at: Entry) -> None:
    """Remove the other entries of the same file (made before it, or the code, changed): one entry
    per file, so the cache does not grow with each edit."""
    source = json.loads(at.key)["source"]
    for folder in at.folder.parent.glob(f"{at.folder.name.rsplit('-', 1)[0]}-*"):
        try:
            other = json.loads((folder / MANIFEST).read_text())["key"]["source"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if folder != at.folder and other == source:
            shutil.rmtree(folder, ignore_errors=True)
