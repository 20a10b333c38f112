"""Every bad invocation of `jlora` is a message and exit code 2, and touches no file: each
case runs in a working directory that also holds unrelated files, and a snapshot (paths,
sizes, hashes) of it is the same before and after."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from jlora import cli, finetune
from tests import tiny_task

pytest.importorskip("torch")
pytest.importorskip("transformers")

FAST = ["--seq-len", "16", "--eval-size", "40", "--batch-size", "8", "--rank", "4", "--quiet"]


def snapshot(root: pathlib.Path) -> dict[str, tuple[int, str]]:
    """Path -> (size, sha256) of every file under `root`, and every folder (size -1)."""
    files = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        files[key] = (
            (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()) if path.is_file() else (-1, "")
        )
    return files


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder with a project's files, a tiny model, data files good and bad, a trained
    run (two checkpoints) and variants of it, and a PEFT export."""
    root = tmp_path_factory.mktemp("work")
    (root / "notes.txt").write_text("a user's own file\n")
    (root / "project").mkdir()
    (root / "project" / "main.py").write_text("print('hello')\n")
    model = tiny_task.llama_dir(root / "model")
    csv = tiny_task.write_csv(root / "reviews.csv")
    run = root / "run"
    train = ["train", "--model", str(model), "--data", str(csv), *FAST, "--steps", "2", "--checkpoint-every", "1"]
    assert cli.main([*train, "--out", str(run)]) == 0
    (root / "empty.csv").write_text("text,label\n")
    (root / "latin1.csv").write_bytes("text,label\ncaf\xe9 was good,positive\n".encode("latin-1"))
    rows = [json.dumps(r) for r in tiny_task.rows(20)]
    (root / "broken.jsonl").write_text("\n".join([rows[0], rows[1][:-3], *rows[2:]]) + "\n")
    (root / "not-a-model.gguf").write_text("these are not GGUF bytes\n")
    (root / "bad.yaml").write_text("lora: {r: [\n")
    (root / "list.yaml").write_text("- r: 4\n")
    (root / "prompts.jsonl").write_text('{"input": "the plot was dull"}\n{"input": \n')
    (root / "prompts-latin1.jsonl").write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    damaged = root / "damaged-run"
    shutil.copytree(run, damaged)
    for path in (damaged / "checkpoints" / "2" / "adapters").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    bad_json = root / "bad-json-run"
    shutil.copytree(run, bad_json)
    (bad_json / "run.json").write_text('{"model": ')
    question = root / "question-run"  # a completion run whose prompt template has two columns
    shutil.copytree(run, question)
    settings = json.loads((question / "run.json").read_text())
    settings["data"]["prompt"] = "Question: {question}\nReview: {text}\nAnswer:"
    (question / "run.json").write_text(json.dumps(settings))
    unknown_base = root / "unknown-base-peft"
    shutil.copytree(run / "peft", unknown_base)
    config = json.loads((unknown_base / "adapter_config.json").read_text())
    (unknown_base / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/nothing"}))
    list_config = root / "list-config-peft"
    shutil.copytree(run / "peft", list_config)
    (list_config / "adapter_config.json").write_text(json.dumps([config]))
    for name, initial in (("pissa-no-initial-run", None), ("pissa-bad-initial-run", b"not safetensors")):
        shutil.copytree(run, root / name)  # as if a PiSSA run had lost or damaged its initial adapters
        settings = json.loads((root / name / "run.json").read_text())
        (root / name / "run.json").write_text(json.dumps({**settings, "lora": {**settings["lora"], "init": "pissa"}}))
        if initial is not None:
            (root / name / cli.INITIAL_ADAPTERS).write_bytes(initial)
    (root / "pissa-no-initial-run" / "results.json").unlink()  # resumable
    (root / "existing").mkdir()
    (root / "existing" / "keep.txt").write_text("keep me\n")
    (root / "a-file").write_text("not a folder\n")
    return root


TRAIN = ["train", "--model", "model", "--data", "reviews.csv", *FAST]
# (argv, words the message must hold); paths are relative to the working directory
CASES = [
    (["train", "--model", "model", "--data", "missing.jsonl", "--out", ".", "--overwrite"], "current directory"),
    (["train", "--model", "model", "--data", "missing.jsonl", "--out", "..", "--overwrite"], "parent of it"),
    ([*TRAIN, "--out", "project", "--overwrite"], "replaces only a jlora run folder"),
    ([*TRAIN, "--out", "project"], "files that are not a jlora run (main.py)"),
    ([*TRAIN, "--out", "a-file"], "is a file"),
    ([*TRAIN, "--out", "run", "--overwrite", "--data", "missing.csv"], "data files not found"),
    ([*TRAIN, "--out", "run", "--overwrite", "--batch-size", "100000"], "fewer than one batch of 100000"),
    ([*TRAIN, "--out", "new", "--data", "missing.csv"], "data files not found"),
    ([*TRAIN, "--out", "new", "--data", "latin1.csv"], "latin1.csv:2: not UTF-8 text (byte 0xe9)"),
    ([*TRAIN, "--out", "new", "--data", "broken.jsonl"], "broken.jsonl:2: not a JSON row"),
    ([*TRAIN, "--out", "new", "--data", "empty.csv"], "hold no rows"),
    ([*TRAIN, "--out", "new", "--prompt", "Review: {body}"], "data has no column ['body']"),
    ([*TRAIN, "--out", "new", "--model", "not-a-model.gguf"], "not a GGUF file"),
    ([*TRAIN, "--out", "new", "--model", "gpt5"], "neither a preset"),
    ([*TRAIN, "--out", "new", "--rank", "0"], "rank must be an integer >= 1"),
    ([*TRAIN, "--out", "new", "--rank", "1000"], "exceeds min(in, out)"),
    ([*TRAIN, "--out", "new", "--steps", "-3"], "steps must be at least 1"),
    ([*TRAIN, "--out", "new", "--seq-len", "1"], "seq_len must be at least 2"),
    ([*TRAIN, "--out", "new", "--seq-len", "4"], "seq_len 4 is too small"),
    ([*TRAIN, "--out", "new", "--batch-size", "100000"], "fewer than one batch of 100000"),
    ([*TRAIN, "--out", "new", "--targets", "q_projj"], "match no kernel"),
    ([*TRAIN, "--out", "new", "--mesh", "data=3"], "has 3 devices, but there are 8"),
    ([*TRAIN, "--out", "new", "--mesh", "data=8", "--batch-size", "12"], "does not split over the mesh's 8"),
    ([*TRAIN, "--out", "new", "--task", "poetry"], "data task must be one of"),
    ([*TRAIN, "--out", "new", "--dropout", "1.5"], "dropout must be in [0, 1)"),
    ([*TRAIN, "--out", "new", "--dtype", "float16"], "dtype must be 'float32' or 'bfloat16'"),
    ([*TRAIN, "--out", "new", "--quantize", "nf3"], "quantize must be one of nf4, int8, bf16"),
    ([*TRAIN, "--out", "new", "--init", "pissa_niter_x"], "init must be one of"),
    ([*TRAIN, "--out", "new", "--init", "loftq"], "init must be one of"),
    ([*TRAIN, "--out", "new", "--loraplus-ratio", "0"], "loraplus_ratio must be > 0"),
    ([*TRAIN, "--out", "new", "--report-to", "wandb"], "report_to must be 'tensorboard'"),
    ([*TRAIN, "--out", "new", "--loraplus-ratio", "-2"], "loraplus_ratio must be > 0"),
    (["train", "--config", "missing.yaml", "--out", "new"], "config file missing.yaml not found"),
    (["train", "--config", "bad.yaml", "--out", "new"], "is not valid YAML"),
    (["train", "--config", "list.yaml", "--out", "new"], "must hold a mapping"),
    (["train", "--resume", "nowhere"], "no run.json there"),
    (["train", "--resume", "run", "--rank", "2"], "--resume takes every setting"),
    (["train", "--resume", "bad-json-run"], "bad-json-run/run.json is not valid JSON"),
    (["train", "--rank", "four"], "invalid int value: 'four'"),
    (["eval", "--adapter", "nowhere"], "not a jlora run folder"),
    (["eval", "--adapter", "damaged-run", "--quiet"], "step 2 is damaged"),
    (["eval", "--adapter", "bad-json-run"], "is not valid JSON"),
    (["eval", "--adapter", "pissa-no-initial-run"], "initial_adapters.safetensors, which is missing"),
    (["export-peft", "pissa-bad-initial-run", "peft-out"], "is not a readable safetensors file"),
    (["train", "--resume", "pissa-no-initial-run"], "which is missing"),
    (["generate", "--adapter", "question-run", "--input", "x"], "also needs ['question']"),
    (["generate", "--adapter", "run", "--prompts", "prompts.jsonl"], "prompts.jsonl:2: not a JSON row"),
    (["generate", "--adapter", "run", "--prompts", "prompts-latin1.jsonl"], "not UTF-8 text"),
    (["generate", "--adapter", "nowhere", "--prompt", "x"], "neither a jlora run folder"),
    (["generate", "--adapter", "run"], "one of the arguments --prompt --input --prompts is required"),
    (["merge", "--adapter", "run", "--out", "existing"], "existing exists; choose a new folder"),
    (["merge", "--adapter", "nowhere", "--out", "merged"], "not a jlora run folder"),
    (["merge", "--adapter", "damaged-run", "--out", "merged"], "fall back to step 1"),
    (["export-peft", "run", "existing"], "existing exists; choose a new folder"),
    (["export-peft", "run", "a-file/peft"], "is a file"),
    (["export-peft", "nowhere", "peft-out"], "not a jlora run folder"),
    (["import-peft", "nowhere"], "expected adapter_config.json"),
    (["import-peft", "run/peft", "--out", "existing"], "existing exists"),
    (["import-peft", "unknown-base-peft", "--out", "imported"], "pass --model"),
    (["import-peft", "list-config-peft", "--out", "imported"], "adapter_config.json"),
]


@pytest.mark.parametrize(("argv", "words"), CASES, ids=[" ".join(argv[:1] + argv[-3:]) for argv, _ in CASES])
def test_bad_invocation_is_a_message_and_changes_no_file(workdir, monkeypatch, capsys, argv, words):
    monkeypatch.chdir(workdir)
    before = snapshot(workdir.parent)  # the working directory and its parent (`--out ..`)
    try:
        code = cli.main(argv)
    except SystemExit as exit:  # argparse's own usage errors
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert words in err, err
    assert "Traceback" not in err
    assert snapshot(workdir.parent) == before


def test_an_internal_error_is_exit_1_with_a_hint_and_debug_shows_the_traceback(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    monkeypatch.setitem(cli.COMMANDS, "eval", lambda args: {}["a bug"])
    assert cli.main(["eval", "--adapter", "run"]) == 1
    err = capsys.readouterr().err
    assert "internal error: KeyError" in err and "--debug" in err and "report" in err
    with pytest.raises(KeyError):
        cli.main(["--debug", "eval", "--adapter", "run"])


def test_a_failed_overwrite_puts_the_previous_run_back(workdir, tmp_path, monkeypatch, capsys):
    """A new run that fails after validation and before its first checkpoint (here: in its
    'before' evaluation) leaves the old run where it was, byte for byte."""
    from jlora import train

    out = tmp_path / "run"
    shutil.copytree(workdir / "run", out)
    before = snapshot(tmp_path)

    def failing(*args, **kwargs):
        raise RuntimeError("the device fell over")

    monkeypatch.setattr(train, "evaluate", failing)
    argv = ["train", "--model", str(workdir / "model"), "--data", str(workdir / "reviews.csv"), *FAST]
    assert cli.main([*argv, "--alpha", "4", "--out", str(out), "--overwrite"]) == 1
    assert "holds the previous run" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


KILL_PHASES = ["moved aside", "new run.json", "first checkpoint", "results"]
RANDOM_KILLS = [
    pytest.param(f"after {seconds:.1f} s", marks=pytest.mark.slow) for seconds in (1.5, 4.2, 7.7, 11.3, 16.4)
]


@pytest.mark.parametrize("phase", KILL_PHASES + RANDOM_KILLS)
def test_a_killed_overwrite_leaves_the_old_run_or_the_new_one_complete(workdir, tmp_path, phase):
    """SIGKILL as soon as the replacing run reaches `phase` (or, with `-m slow`, at fixed
    times that land anywhere, startup included): the old run is intact (in place or where
    the CLI said it moved it), or the new one is complete; never neither."""
    out = tmp_path / "run"
    shutil.copytree(workdir / "run", out)
    old = snapshot(out)
    aside = finetune.previous_of(out)
    started = time.monotonic()
    reached = {
        "moved aside": lambda: aside.exists(),
        "new run.json": lambda: (out / "run.json").exists() and aside.exists(),
        "first checkpoint": lambda: (out / "checkpoints" / "1").exists() and aside.exists(),
        "results": lambda: (out / "results.json").exists(),
    }.get(phase, lambda: time.monotonic() - started > float(phase.split()[1]))
    argv = ["train", "--model", str(workdir / "model"), "--data", str(workdir / "reviews.csv"), *FAST]
    argv += ["--steps", "3", "--checkpoint-every", "1", "--alpha", "4", "--out", str(out), "--overwrite"]
    child = subprocess.Popen([sys.executable, "-m", "jlora.cli", *argv], stdout=subprocess.DEVNULL)
    try:
        while child.poll() is None and not reached():
            time.sleep(0.002)
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
    finally:
        code = child.wait(timeout=300)
    assert reached() or phase not in KILL_PHASES, f"the run stopped (exit {code}) before reaching {phase!r}"
    assert code in (-signal.SIGKILL, 0)
    new_complete = (out / "results.json").exists() and json.loads((out / "run.json").read_text())["lora"]["alpha"] == 4
    old_intact = any(where.exists() and snapshot(where) == old for where in (out, aside))
    assert new_complete or old_intact
    if not new_complete:  # the next run refuses, saying where the old run is
        assert cli.main(argv[:-1]) == 2
