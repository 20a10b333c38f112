"""Each study of experiments/ runs end to end on a tiny configuration (2 steps, 64 rows, one
seed, the real presets), so the scripts cannot rot; their numbers are not checked here."""

import csv
import importlib
import json

import pytest

from experiments.__main__ import STUDIES  # what `python -m experiments` runs


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


def test_fair_sweep_extends_until_the_best_rate_is_inside_what_it_tried():
    from experiments import fair

    accuracy = {lr: 1 - abs(i - 2) / 10 for i, lr in enumerate(fair.GRID)}  # peaks at GRID[2]
    trained = []

    def train(method, seed):
        trained.append(method.learning_rate)
        return {"val_accuracy": accuracy[method.learning_rate], "val_loss": 0.0}

    candidate = fair.Candidate("x", lambda lr: fair.common.trained_modules("x", ["classifier"], lr), fair.GRID[5:8])
    rows = fair.sweep(candidate, train)
    assert fair.best_rate(rows) == fair.GRID[2] and sorted(rows) == list(fair.GRID[1:8])
    assert len(trained) == len(set(trained))  # no rate trained twice
    tie = {1e-3: {"val_accuracy": 0.8, "val_loss": 0.5}, 2e-3: {"val_accuracy": 0.8, "val_loss": 0.4}}
    assert fair.best_rate(tie) == 2e-3


def test_fair_gap_is_paired_by_seed_with_a_t_interval():
    from experiments import fair

    def row(method, seed, accuracy, share=0.5):
        return {"method": method, "seed": seed, "accuracy": accuracy, "trainable_percent": share}

    final = [row(fair.FULL, s, a, 100) for s, a in enumerate((0.80, 0.82, 0.84))]
    final += [row("LoRA q,v", s, a) for s, a in enumerate((0.79, 0.80, 0.83))]  # gaps -1, -2, -1
    final += [row("LoRA all-linear", s, a, 1.5) for s, a in enumerate((0.9, 0.9, 0.9))]  # over 1%: not a candidate
    gap = fair.gap_row("t", final)
    assert gap["method"] == "LoRA q,v" and gap["n"] == 3
    assert abs(gap["gap"] + 4 / 3) < 1e-9 and gap["low"] < -4 / 3 < gap["high"]
    assert abs((gap["high"] - gap["low"]) / 2 - 4.303 * (1 / 3**0.5) / 3**0.5) < 1e-3  # t(0.975, 2) · sd / √n
