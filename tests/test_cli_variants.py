"""`jlora train --init pissa|olora|…` and `--loraplus-ratio` end to end on a tiny model: a
base-changing run trains over its residual base, keeps its initial adapters, exports the
converted plain LoRA that peft applies to the original base, and resumes, evaluates and
merges over the same residual; LoRA+ is recorded and trains B faster."""

import json
import shutil

import numpy as np
import pytest

from jlora import cli
from jlora.tree import LORA_B, flatten
from tests import tiny_task
from tests.test_cli import FAST, assert_same_logits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    return tiny_task.llama_dir(root / "model"), tiny_task.write_csv(root / "reviews.csv")


def train(files, out, *extra) -> None:
    model, csv = files
    args = ["train", "--model", str(model), "--data", str(csv), *FAST, "--targets", "q_proj", "v_proj", "down_proj"]
    assert cli.main([*args, "--lr", "1e-2", "--checkpoint-every", "2", *extra, "--out", str(out)]) == 0


@pytest.fixture(scope="module")
def pissa_run(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "pissa"
    train(files, out, "--init", "pissa", "--steps", "4")
    return out


def test_a_pissa_run_exports_plain_lora_that_peft_applies_to_the_original_base(pissa_run, files, tmp_path):
    peft = pytest.importorskip("peft")
    assert (pissa_run / cli.INITIAL_ADAPTERS).exists()
    assert json.loads((pissa_run / "run.json").read_text())["lora"]["init"] == "pissa"
    config = json.loads((pissa_run / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["init_lora_weights"]) == (8, True)  # rank 2r: [A | A0], [B; -B0]
    original = transformers.AutoModelForCausalLM.from_pretrained(files[0])
    assert_same_logits(pissa_run, peft.PeftModel.from_pretrained(original, pissa_run / "peft").eval())
    assert cli.main(["export-peft", str(pissa_run), str(tmp_path / "again")]) == 0
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "again" / name).read_bytes() == (pissa_run / "peft" / name).read_bytes()


def test_eval_and_merge_of_a_pissa_run_use_its_residual_base(pissa_run, tmp_path, capsys):
    results = json.loads((pissa_run / "results.json").read_text())
    capsys.readouterr()
    assert cli.main(["eval", "--adapter", str(pissa_run), "--quiet"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["loss"] == pytest.approx(results["loss_after"], rel=1e-6)
    assert evaluated["accuracy"] == pytest.approx(results["accuracy_after"], abs=1e-9)
    assert cli.main(["merge", "--adapter", str(pissa_run), "--out", str(tmp_path / "merged")]) == 0
    assert_same_logits(pissa_run, transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval())


def test_generate_applies_a_pissa_run_as_its_export_does(pissa_run, files, capsys):
    review = tiny_task.rows(1)[0]["text"]
    answers = []
    for adapter in (pissa_run, pissa_run / "peft"):
        capsys.readouterr()
        args = ["generate", "--adapter", str(adapter), "--model", str(files[0]), "--input", review]
        assert cli.main([*args, "--max-new-tokens", "3"]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1]


def test_a_resumed_pissa_run_ends_where_the_uninterrupted_one_did(pissa_run, tmp_path):
    """Resuming from step 2 recomputes the residual base from the stored A0, B0: the
    checkpoint's fingerprint of it matches, and the export is byte for byte the same."""
    resumed = tmp_path / "resumed"
    shutil.copytree(pissa_run, resumed)
    for name in ("results.json", "peft", "checkpoints/4"):
        shutil.rmtree(resumed / name) if (resumed / name).is_dir() else (resumed / name).unlink()
    assert cli.main(["train", "--resume", str(resumed), "--quiet"]) == 0
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (resumed / "peft" / name).read_bytes() == (pissa_run / "peft" / name).read_bytes()


def b_norm(run) -> float:
    _, _, params, _, _ = cli.load_run(str(run))
    return float(np.sqrt(sum(np.sum(np.square(x)) for k, x in flatten(params).items() if k[-1] == LORA_B)))


def test_loraplus_is_recorded_and_moves_b_further(files, tmp_path):
    train(files, tmp_path / "plain", "--steps", "3", "--lr", "1e-3")
    train(files, tmp_path / "plus", "--steps", "3", "--lr", "1e-3", "--loraplus-ratio", "16", "--weight-decay", "0.01")
    assert json.loads((tmp_path / "plus" / "run.json").read_text())["train"]["loraplus_ratio"] == 16
    assert json.loads((tmp_path / "plain" / "run.json").read_text())["train"]["loraplus_ratio"] is None
    assert b_norm(tmp_path / "plus") > 8 * b_norm(tmp_path / "plain")
