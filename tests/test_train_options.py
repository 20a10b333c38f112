"""How a run trains: from an existing adapter (`--init-adapter`), schedules, epochs, evaluation during training."""

from __future__ import annotations

import itertools
import json

import jax.numpy as jnp
import numpy as np
import pytest

from jlora import cli, data
from jlora import train as training
from tests import tiny_task

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

FAST = ["--seq-len", "16", "--eval-size", "40", "--batch-size", "8", "--quiet"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A tiny model, its data, a jlora run trained on them and a peft-made adapter (random
    A and B, so it changes the model) over the same base."""
    root = tmp_path_factory.mktemp("sources")
    model, csv = tiny_task.llama_dir(root / "model"), tiny_task.write_csv(root / "reviews.csv")
    run = root / "run"
    args = ["train", "--model", str(model), "--data", str(csv), *FAST, "--rank", "4", "--targets", "q_proj", "v_proj"]
    assert cli.main([*args, "--steps", "20", "--lr", "1e-2", "--out", str(run)]) == 0
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(model)
    config = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["k_proj", "down_proj"], init_lora_weights=False)
    peft.get_peft_model(base, config).save_pretrained(root / "peft")
    return {"model": model, "csv": csv, "run": run, "peft": root / "peft"}


def first_batch_loss(out, source) -> float:
    """The loss of `source`'s own adapters on the first training batch of the run in `out`."""
    run, pretrained, _, train_split, _ = cli.load_run(str(out))
    params, _ = cli.load_adapters(str(source), pretrained)
    batch = data.Batches(train_split, run.train.batch_size * run.train.grad_accum, run.train.seed)(0)
    loss, count, _ = training.task_for(pretrained, run.lora, train_split).loss(
        params, {name: jnp.asarray(array) for name, array in batch.items()}
    )
    return float(loss / count)


@pytest.mark.parametrize("kind", ["run", "peft"])
def test_training_starts_from_the_adapter(sources, tmp_path, kind):
    out = tmp_path / "continued"
    args = ["train", "--init-adapter", str(sources[kind]), "--data", str(sources["csv"]), *FAST, "--steps", "5"]
    assert cli.main([*args, "--out", str(out)]) == 0  # --model: the adapter's base
    settings = json.loads((out / "run.json").read_text())
    expected = {"run": (4, 16, ["q_proj", "v_proj"]), "peft": (2, 6.0, ["down_proj", "k_proj"])}[kind]
    assert (settings["lora"]["r"], settings["lora"]["alpha"], sorted(settings["lora"]["target_modules"])) == expected
    assert settings["init_adapter"]["path"] == str(sources[kind].absolute()) and settings["init_adapter"]["hash"]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in steps if r.get("step") == 1 and "eval" not in r)
    # float32, the same sums compiled once in the train step and once here
    np.testing.assert_allclose(first["loss"], first_batch_loss(out, sources[kind]), rtol=1e-5)
    assert first["lr"] > 0  # warmup counted from step 1: the first step trains


def test_flags_that_contradict_the_adapter_are_refused_by_name(sources, tmp_path, capsys):
    out = tmp_path / "refused"
    args = ["train", "--init-adapter", str(sources["peft"]), "--data", str(sources["csv"]), *FAST, "--out", str(out)]
    assert cli.main([*args, "--rank", "8", "--targets", "k_proj", "down_proj"]) == 2
    err = capsys.readouterr().err
    assert "r=8 (the adapter has 2)" in err and "target_modules" not in err
    assert not out.exists()
    assert cli.main([*args, "--dropout", "0.1", "--steps", "1"]) == 0  # the dropout is the run's to choose
    assert json.loads((out / "run.json").read_text())["lora"]["dropout"] == 0.1


def test_the_schedule_starts_above_zero_and_ends_above_zero():
    lr = training.schedule(training.TrainConfig(steps=20, warmup_steps=4, learning_rate=1.0))
    values = [float(lr(step)) for step in range(20)]
    np.testing.assert_allclose(values[:4], [0.25, 0.5, 0.75, 1.0], rtol=1e-6)  # warmup reaches the peak at step 4
    assert all(a >= b for a, b in itertools.pairwise(values[3:])) and values[-1] > 0


@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
def test_schedules_warm_up_then_follow_their_shape(name):
    lr = training.schedule(training.TrainConfig(steps=10, warmup_steps=2, learning_rate=1.0, schedule=name))
    values = np.array([float(lr(step)) for step in range(10)])
    np.testing.assert_allclose(values[:2], [0.5, 1.0], rtol=1e-6)
    if name == "constant":
        np.testing.assert_allclose(values[2:], 1.0)
    else:
        assert np.all(np.diff(values[1:]) < 0) and values[-1] > 0
    if name == "linear":
        np.testing.assert_allclose(np.diff(values[1:]), -1 / 9, rtol=1e-5)  # lr -> 0 over steps 2..11


def test_epochs_set_the_steps_and_eval_every_records_held_out_metrics(sources, tmp_path):
    out = tmp_path / "epochs"
    args = ["train", "--model", str(sources["model"]), "--data", str(sources["csv"]), *FAST, "--epochs", "0.5"]
    assert cli.main([*args, "--eval-every", "4", "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["train"]["steps"] == 13 and run["train"]["epochs"] == 0.5  # ceil(0.5 * 200 rows / 8)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["eval"], r["step"]) for r in records if "eval" in r] == [
        ("before", 0),
        ("step", 4),
        ("step", 8),
        ("step", 12),
        ("after", 13),
    ]
    assert cli.main([*args, "--steps", "5", "--out", str(tmp_path / "both")]) == 2


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` from the TFRecord event files in `folder` (length, CRC,
    an `Event` proto, CRC per record), read with tensorboardX's own protos."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_report_to_tensorboard_writes_every_metrics_record(sources, tmp_path):
    pytest.importorskip("tensorboardX")
    out = tmp_path / "tb"
    args = ["train", "--model", str(sources["model"]), "--data", str(sources["csv"]), *FAST, "--rank", "2"]
    assert cli.main([*args, "--steps", "4", "--eval-every", "2", "--report-to", "tensorboard", "--out", str(out)]) == 0
    assert json.loads((out / "run.json").read_text())["train"]["report_to"] == "tensorboard"
    scalars = tensorboard_scalars(out / "tensorboard")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "eval" not in r]
    assert [s for s, _ in scalars["train/loss"]] == [r["step"] for r in steps]
    np.testing.assert_allclose([v for _, v in scalars["train/loss"]], [r["loss"] for r in steps], rtol=1e-6)
    evals = [r for r in records if "eval" in r]  # before (step 0), during (step 2), after (step 4)
    assert [s for s, _ in scalars["eval/loss"]] == [r["step"] for r in evals] == [0, 2, 4]
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s"} <= scalars.keys()


def test_keep_best_exports_and_reloads_the_lowest_held_out_loss(sources, tmp_path):
    """Whichever evaluation has the lowest held-out loss (one during training or the last step),
    `results.json`, `peft/` and `jlora eval` use those adapters."""
    out = tmp_path / "best"
    args = ["train", "--model", str(sources["model"]), "--data", str(sources["csv"]), *FAST, "--rank", "2"]
    assert cli.main([*args, "--steps", "9", "--eval-every", "3", "--lr", "0.3", "--keep-best", "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["loss"] for r in records if r.get("eval") in ("step", "after")}
    assert sorted(evals) == [3, 6, 9]
    results = json.loads((out / "results.json").read_text())
    assert results["best_step"] == min(evals, key=evals.get) and results["loss_after"] == min(evals.values())
    assert not results["stopped_early"]
    # the run's adapters, reloaded (from best/ or checkpoints/) and from peft/, give the chosen loss again
    for source in (out, out / "peft"):
        _, pretrained, _, _, held_out = cli.load_run(str(out))
        params, _ = cli.load_adapters(str(source), pretrained)
        run = cli.load_run(str(out))[0]
        task = training.task_for(pretrained, run.lora, held_out, held_out)
        metrics = training.evaluate(training.make_eval_step(task), params, held_out, 32, False)
        np.testing.assert_allclose(metrics["loss"], results["loss_after"], rtol=1e-5)  # float32, same sums


def test_early_stopping_patience_needs_eval_every(sources, tmp_path, capsys):
    args = ["train", "--model", str(sources["model"]), "--data", str(sources["csv"]), *FAST]
    assert cli.main([*args, "--early-stopping-patience", "2", "--out", str(tmp_path / "x")]) == 2
    assert "set eval_every too" in capsys.readouterr().err and not (tmp_path / "x").exists()
