"""Adapter checkpoints with Orbax: only what is trained, resumable exactly, bound to its base.

Each saved step holds three Orbax items: ``adapters`` (the trainable tree), ``opt_state``
and ``meta`` (JSON: the step, the data position, the `LoraConfig` and a `fingerprint` of
the frozen base). `Checkpoints` wraps an `orbax.checkpoint.CheckpointManager`: saves are
asynchronous by default, old steps are pruned by `max_to_keep` (or kept best-by-metric),
and every step is written to a temporary folder that is renamed only once complete, so a
process killed mid-write leaves the earlier steps intact; opening the folder again removes
the half-written one before anything else happens.

Restoring reads the saved fingerprint first: adapters trained against another base are an
error that says what differs, unless `force=True`. `meta` also holds a digest of every saved
array, checked after reading: a damaged step (a truncated or altered file) is a
`DamagedCheckpoint` naming the step and the complete ones before it, never wrong values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jlora.config import LoraConfig
from jlora.tree import PyTree, flatten, is_leaf, path_str

ITEMS = ("adapters", "opt_state", "meta")
UNFINISHED = "*.orbax-checkpoint-tmp*"  # Orbax's name for a step folder still being written


# -- the base model's fingerprint ----------------------------------------------------------------


def _as_uint32(x: jax.Array) -> jax.Array:
    """The bits of `x` as a flat uint32 vector (narrower types widened, 8-byte types split)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).ravel()
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32).ravel()


def _digest(x: jax.Array) -> jax.Array:
    """Two order-sensitive 32-bit sums of a mixed hash of every element. Computed on the
    device where `x` lives (sharded arrays included); integer sums wrap exactly, so the
    result does not depend on how the reduction is split."""
    bits = _as_uint32(x)
    index = jnp.arange(bits.size, dtype=jnp.uint32)
    mixed = bits * jnp.uint32(0x9E3779B1) + index
    mixed = (mixed ^ (mixed >> 15)) * jnp.uint32(0x85EBCA77)
    mixed = mixed ^ (mixed >> 13)
    return jnp.stack([mixed.sum(dtype=jnp.uint32), (mixed * (2 * index + 1)).sum(dtype=jnp.uint32)])


_digests = jax.jit(lambda tree: jax.tree.map(_digest, tree))


def fingerprint(base: PyTree) -> dict[str, Any]:
    """What adapters were trained against: every base leaf's shape and dtype, and a content
    hash of all of them (one pass over the base on its devices; nothing is copied to host
    but 8 bytes an array). A quantized kernel is described by its format and original
    dtype (``NF4(float32)``) and hashed over its arrays."""
    flat = flatten(base)
    digests = flatten(jax.device_get(_digests(base)))
    content = hashlib.sha256()
    leaves = {}
    for keys in sorted(flat, key=path_str):
        leaf = flat[keys]
        dtype = f"{type(leaf).__name__}({leaf.dtype})" if is_leaf(leaf) else str(leaf.dtype)
        leaves[path_str(keys)] = [list(leaf.shape), dtype]
        content.update(f"{path_str(keys)}:{leaf.shape}:{dtype}:".encode())
        content.update(np.asarray(jax.tree.leaves(digests[keys])).tobytes())
    return {"leaves": leaves, "hash": content.hexdigest()}


def fingerprint_difference(saved: Mapping, current: Mapping) -> str | None:
    """None when the fingerprints agree, else a sentence saying what differs."""
    if saved["hash"] == current["hash"]:
        return None
    old, new = saved["leaves"], current["leaves"]
    problems = [f"{p} missing from this base" for p in sorted(old.keys() - new.keys())]
    problems += [f"{p} not in the saved base" for p in sorted(new.keys() - old.keys())]
    problems += [
        f"{p}: saved {tuple(old[p][0])} {old[p][1]}, now {tuple(new[p][0])} {new[p][1]}"
        for p in sorted(old.keys() & new.keys())
        if old[p] != new[p]
    ]
    if not problems:
        return (
            f"the base has the same shapes and dtypes but different values (content hash {saved['hash'][:12]} "
            f"saved, {current['hash'][:12]} now): another checkpoint of the same architecture"
        )
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    return "; ".join(problems[:5]) + more


def leaf_digests(tree: PyTree) -> dict[str, str]:
    """Per leaf of any pytree (optimizer states included): its dtype and content digest."""
    paths_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    digests = jax.device_get(_digests([leaf for _, leaf in paths_leaves]))
    return {
        jax.tree_util.keystr(path): f"{jnp.asarray(leaf).dtype}:{np.asarray(digest).tobytes().hex()}"
        for (path, leaf), digest in zip(paths_leaves, digests, strict=True)
    }


# -- checkpoints ---------------------------------------------------------------------------------


class DamagedCheckpoint(ValueError):
    """A saved step whose files cannot be read or whose arrays differ from what was saved."""


@dataclasses.dataclass
class Restored:
    """One restored step: `adapters` (and `opt_state` when asked for) and the saved `meta`."""

    step: int
    adapters: PyTree
    opt_state: PyTree | None
    meta: dict[str, Any]

    @property
    def config(self) -> LoraConfig:
        return LoraConfig(**self.meta["lora"])


def _abstract(tree: PyTree, shardings: Any = None) -> PyTree:
    """`jax.ShapeDtypeStruct`s for `tree`, placed by `shardings` (one sharding or a tree of
    them) or else where the leaves of `tree` already are."""
    if shardings is None:
        shardings = jax.tree.map(lambda x: getattr(x, "sharding", None), tree)
    elif isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpoints:
    """The adapter checkpoints of one run, in `directory` (one sub-folder per step).

    ``best_metric`` keeps the `max_to_keep` steps best by that metric (``best_mode`` "min" or
    "max") instead of the latest ones; steps saved without metrics are then kept too."""

    def __init__(
        self,
        directory: str | pathlib.Path,
        *,
        max_to_keep: int | None = 3,
        best_metric: str | None = None,
        best_mode: str = "min",
        async_save: bool = True,
    ):
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be at least 1 (or None: keep all), got {max_to_keep}")
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            best_fn=(lambda metrics: float(metrics[best_metric])) if best_metric else None,
            best_mode=best_mode,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=False,  # done below, before the manager looks: Orbax does it in a thread
            create=True,
        )
        if jax.process_index() == 0:
            for unfinished in self.directory.glob(UNFINISHED):  # what a killed write left behind
                shutil.rmtree(unfinished)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def save(
        self,
        step: int,
        adapters: PyTree,
        opt_state: PyTree | None,
        *,
        config: LoraConfig,
        base_fingerprint: Mapping[str, Any],
        metrics: Mapping[str, float] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> bool:
        """Start saving `step` (returns once the arrays are copied off the devices, so the
        caller may donate them to the next step). `opt_state` None saves adapters alone
        (an export, not a resumable step). `extra` is JSON kept in `meta`, such as the data
        position. Returns whether a save was started."""
        saved = {"adapters": adapters} if opt_state is None else {"adapters": adapters, "opt_state": opt_state}
        meta = {
            "step": step,
            "lora": config.to_dict(),
            "base": dict(base_fingerprint),
            "metrics": dict(metrics or {}),
            "digests": {name: leaf_digests(tree) for name, tree in saved.items()},
            **dict(extra or {}),
        }
        items = {"adapters": ocp.args.StandardSave(adapters), "meta": ocp.args.JsonSave(meta)}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        return self._manager.save(step, args=ocp.args.Composite(**items), metrics=dict(metrics) if metrics else None)

    def restore(
        self,
        adapters_like: PyTree,
        opt_state_like: PyTree | None = None,
        *,
        step: int | None = None,
        base_fingerprint: Mapping[str, Any] | None = None,
        shardings: Any = None,
        opt_state_shardings: Any = None,
        force: bool = False,
    ) -> Restored:
        """Restore `step` (default: the latest complete one) into the structure of
        `adapters_like` (arrays or `jax.ShapeDtypeStruct`s; a tree from `jlora.split` of
        a freshly initialised model will do), placed by `shardings` when given: the mesh
        may differ from the one that saved. `opt_state_like` (e.g.
        ``jax.eval_shape(tx.init, adapters_like)``) restores the optimizer state too.

        With `base_fingerprint`, a checkpoint made against another base is a ValueError
        saying what differs, unless `force`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory} holds no complete checkpoint")
        if step not in self.all_steps():
            raise FileNotFoundError(f"{self.directory} has no checkpoint of step {step}; it has {self.all_steps()}")
        meta = self._read(step, {"meta": ocp.args.JsonRestore()})["meta"]
        if base_fingerprint is not None and not force:
            difference = fingerprint_difference(meta["base"], base_fingerprint)
            if difference:
                raise ValueError(
                    f"{self.directory} step {step} was trained against another base model: {difference}. "
                    "Load the base it was made with, or pass force=True to restore anyway"
                )
        items = {"adapters": ocp.args.StandardRestore(_abstract(adapters_like, shardings))}
        if opt_state_like is not None:
            if not (self.directory / str(step) / "opt_state").exists():
                raise ValueError(f"{self.directory} step {step} has no optimizer state (an import?): it cannot resume")
            items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state_like, opt_state_shardings))
        restored = self._read(step, items)
        for name, digests in meta.get("digests", {}).items():
            if name in restored and restored[name] is not None:
                self._check(step, name, digests, leaf_digests(restored[name]))
        return Restored(step, restored["adapters"], restored.get("opt_state") if opt_state_like else None, meta)

    def _read(self, step: int, items: dict) -> dict:
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, OSError) as err:  # tensorstore's and json's words for a truncated or altered file
            raise self._damaged(step, f"its files cannot be read ({str(err).splitlines()[0][:300]})") from None

    def _check(self, step: int, name: str, saved: Mapping[str, str], now: Mapping[str, str]) -> None:
        """Every restored leaf whose dtype is the saved one has the saved content."""
        for path, digest in saved.items():
            if path in now and now[path].split(":")[0] == digest.split(":")[0] and now[path] != digest:
                raise self._damaged(step, f"{name}{path} differs from what was saved (content digest)")

    def _damaged(self, step: int, reason: str) -> DamagedCheckpoint:
        earlier = [s for s in self.all_steps() if s < step]
        fallback = (
            f"the steps kept before it are {earlier}: delete {self.directory / str(step)} to fall back to "
            f"step {earlier[-1]}, or restore step={earlier[-1]}"
            if earlier
            else "no earlier step is kept"
        )
        return DamagedCheckpoint(f"{self.directory} step {step} is damaged: {reason}; {fallback}")

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        return self._manager.best_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def wait(self) -> None:
        """Block until every started save is complete on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
