"""What every benchmark shares: the shapes measured, the machine, the commit, and
per-round ratios of times measured side by side."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from collections.abc import Sequence

PRESET = "smollm2-135m-instruct"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BATCH, SEQ, RANK = 8, 128, 8


def commit() -> str:
    """The code's git commit, with "+changes" when tracked files differ from it."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    return head + ("+changes" if dirty.stdout.strip() else "")


def machine() -> dict[str, str]:
    """CPU model, cores and the versions that decide the numbers."""
    from importlib.metadata import version

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    packages = ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft")
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        **{name: version(name) for name in packages},
    }


def ratio(numerator: Sequence[float], denominator: Sequence[float]) -> dict[str, float]:
    """Median, min and max of the per-round ratios (the two measured in the same rounds)."""
    values = [a / b for a, b in zip(numerator, denominator, strict=True)]
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}
