"""The GPU benchmark mode runs on any backend with tiny shapes (`--dry-run`), so a machine with
an accelerator runs it unchanged: every case measured, the table and the raw numbers written."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parent.parent


def test_gpu_benchmark_dry_run_measures_every_case(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--dry-run", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "gpu-dry-run.json").read_text())
    assert [(r["case"], r["remat"]) for r in rows] == [("tiny", False), ("tiny", True)]
    for row in rows:
        assert row["tokens_per_s"] > 0 and row["mfu_measured_peak"] > 0 and row["loss"] > 0
    table = (tmp_path / "gpu-dry-run.md").read_text()
    assert table.count("| tiny |") == 2
    code = "import sys, benchmarks.gpu as g; g._case('tiny', g.DRY_RUN['tiny'], False, 1, True); "
    code += "print([m for m in ('datasets', 'gguf', 'transformers', 'torch') if m in sys.modules])"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert loaded.stdout.strip().splitlines()[-1] == "[]"  # none of them is needed on a GPU image
