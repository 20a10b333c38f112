"""`jlora train --resume`: a run killed with SIGKILL ends exactly where an uninterrupted one does."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jlora import cli
from jlora.checkpoint import Checkpoints
from tests import tiny_task

pytest.importorskip("torch")

STEPS = 24
DETERMINISTIC = ("step", "loss", "lr", "grad_norm", "epoch")  # not the timings


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return tiny_task.llama_dir(root / "model"), tiny_task.write_csv(root / "reviews.csv", n=160)


def train_args(files, out, *extra):
    model, csv = files
    return [
        "train",
        "--model",
        str(model),
        "--data",
        str(csv),
        "--seq-len",
        "16",
        "--eval-size",
        "32",
        "--batch-size",
        "8",
        "--rank",
        "4",
        "--dropout",
        "0.1",  # the dropout keys must be replayed too
        "--lr",
        "1e-2",
        "--steps",
        str(STEPS),
        "--checkpoint-every",
        "5",
        "--quiet",
        "--out",
        str(out),
        *extra,
    ]


def records(run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def step_records(run):
    return [{k: r[k] for k in DETERMINISTIC} for r in records(run) if "eval" not in r]


def adapters_of(run):
    import jax

    _, _, params, _, _ = cli.load_run(str(run))
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def kill_after(args, out, steps_seen: int, checkpoint: int | None = None) -> None:
    """Start `jlora train` in a subprocess and SIGKILL it once `steps_seen` steps are logged
    (and the checkpoint of step `checkpoint` is complete)."""
    metrics = os.path.join(out, "metrics.jsonl")
    process = subprocess.Popen([sys.executable, "-m", "jlora.cli", *args], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        lines = open(metrics).read().splitlines() if os.path.exists(metrics) else []  # noqa: SIM115
        logged = sum('"eval"' not in line for line in lines) >= steps_seen
        if logged and (checkpoint is None or os.path.exists(os.path.join(out, "checkpoints", str(checkpoint)))):
            break
        time.sleep(0.02)
    assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read()}"
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_killed_run_resumes_to_the_same_adapters_and_metrics(files, tmp_path):
    reference = tmp_path / "reference"
    assert cli.main(train_args(files, reference)) == 0
    killed = tmp_path / "killed"
    kill_after(train_args(files, killed), killed, 8, checkpoint=5)  # between the checkpoints of steps 5 and 10
    with Checkpoints(killed / "checkpoints") as checkpoints:
        assert 5 <= checkpoints.latest_step() < STEPS
    assert not (killed / "results.json").exists()
    kill_after(["train", "--resume", str(killed), "--quiet"], killed, 14)  # killed again, while resuming
    assert cli.main(["train", "--resume", str(killed), "--quiet"]) == 0

    assert step_records(killed) == step_records(reference)  # every step's loss, lr, grad norm: bit-identical
    evals = lambda run: [r for r in records(run) if "eval" in r]
    assert evals(killed) == evals(reference)
    ours, theirs = adapters_of(killed), adapters_of(reference)
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    assert (killed / "peft" / "adapter_model.safetensors").read_bytes() == (
        reference / "peft" / "adapter_model.safetensors"
    ).read_bytes()
    done = json.loads((killed / "results.json").read_text())
    assert done["accuracy_after"] == json.loads((reference / "results.json").read_text())["accuracy_after"]


def test_resume_refuses_settings_flags_and_unknown_folders(files, tmp_path, capsys):
    assert cli.main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no run.json there" in capsys.readouterr().err
    run = tmp_path / "run"
    (run).mkdir()
    (run / "run.json").write_text(json.dumps(cli.Run().to_dict()))
    assert cli.main(["train", "--resume", str(run), "--rank", "4"]) == 2
    assert "drop --rank" in capsys.readouterr().err
