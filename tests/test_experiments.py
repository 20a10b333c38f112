"""Each study of experiments/ runs end to end on a tiny configuration (2 steps, 64 rows, one
seed, the real presets), so the scripts cannot rot; their numbers are not checked here."""

import csv
import importlib
import json

import pytest

STUDIES = ("methods", "freezing", "ranks", "subspace", "decoder", "qlora")


@pytest.mark.parametrize("study", STUDIES)
def test_study_runs_and_writes_its_results(study, tmp_path):
    importlib.import_module(f"experiments.{study}").main(["--smoke", "--out", str(tmp_path)])
    with (tmp_path / f"{study}.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows, f"{study}.csv has no rows"
    assert all(row["commit"] and json.loads(row["config"]) for row in rows)
    if "accuracy" in rows[0]:
        assert all(0.0 <= float(row["accuracy"]) <= 1.0 for row in rows)
    text = (tmp_path / f"{study}.md").read_text()
    assert text.count("\n|") >= len({row["method"] for row in rows}) + 1  # header + one line per group
    assert (tmp_path / f"{study}.png").stat().st_size > 1000
