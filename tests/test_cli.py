"""The `jlora` command end to end on a tiny model, and its errors on bad input."""

import json
import os
import stat

import jax.numpy as jnp
import numpy as np
import pytest

from jlora import cli
from tests import tiny_task

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# a review of each label from the run's own data (train loss ~0.002, held-out accuracy >= 0.9): what the
# trained adapters must answer, whereas a made-up review may be one a 2-layer toy gets wrong
POSITIVE, NEGATIVE = (next(r["text"] for r in tiny_task.rows(240) if r["label"] == k) for k in ("positive", "negative"))
FAST = ["--seq-len", "16", "--eval-size", "40", "--batch-size", "8", "--rank", "4", "--quiet"]
TARGETS = ["--targets", "q_proj", "v_proj", "o_proj", "up_proj", "down_proj", "lm_head"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return tiny_task.llama_dir(root / "model"), tiny_task.write_csv(root / "reviews.csv")


@pytest.fixture(scope="module")
def trained_run(files, tmp_path_factory):
    model, csv = files
    out = tmp_path_factory.mktemp("runs") / "run"
    args = [
        "train",
        "--model",
        str(model),
        "--data",
        str(csv),
        *FAST,
        *TARGETS,
        "--steps",
        "150",
        "--lr",
        "1e-2",
        "--out",
        str(out),
    ]
    assert cli.main(args) == 0
    return out


def test_train_writes_a_complete_run_and_learns(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"run.json", "metrics.jsonl", "loss.png", "checkpoints", "peft", "results.json"} <= names
    results = json.loads((trained_run / "results.json").read_text())
    assert results["accuracy_after"] >= 0.9 > results["accuracy_before"]
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval"] for r in records if "eval" in r] == ["before", "after"]
    assert [r["step"] for r in records if "eval" not in r] == list(range(1, 151))
    assert json.loads((trained_run / "run.json").read_text())["lora"]["r"] == 4


def test_eval_and_generate_use_the_adapters(trained_run, capsys):
    assert cli.main(["eval", "--adapter", str(trained_run), "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"] >= 0.9
    for review, label in ((POSITIVE, "positive"), (NEGATIVE, "negative")):
        assert cli.main(["generate", "--adapter", str(trained_run), "--input", review, "--max-new-tokens", "2"]) == 0
        assert capsys.readouterr().out.split()[0] == label


def assert_same_logits(run_folder, torch_model):
    """jlora's factored logits of the run equal `torch_model`'s on held-out rows (float32: 1e-4)."""
    import jlora

    run, pretrained, params, _, held_out = cli.load_run(str(run_folder))
    ids, mask = held_out.arrays["input_ids"][:4], held_out.arrays["attention_mask"][:4]
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    ours = jlora.apply(pretrained.model, params, run.lora, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(positions))
    with torch.no_grad():
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        theirs = torch_model(**{k: torch.tensor(v) for k, v in inputs.items()}).logits.numpy()
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[valid], theirs[valid], atol=1e-4, rtol=0)


def test_merge_writes_a_model_transformers_loads(trained_run, tmp_path):
    out = tmp_path / "merged"
    assert cli.main(["merge", "--adapter", str(trained_run), "--out", str(out)]) == 0
    assert_same_logits(trained_run, transformers.AutoModelForCausalLM.from_pretrained(out).eval())
    assert cli.main(["merge", "--adapter", str(trained_run), "--out", str(out)]) == 2  # never over an existing folder


def test_the_run_folder_holds_a_peft_export_peft_loads(trained_run, files, tmp_path):
    peft = pytest.importorskip("peft")
    model_dir, _ = files
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    assert_same_logits(trained_run, peft.PeftModel.from_pretrained(base, trained_run / "peft").eval())
    mask = os.umask(0o022)
    try:
        assert cli.main(["export-peft", str(trained_run), str(tmp_path / "again")]) == 0
    finally:
        os.umask(mask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "again", *(tmp_path / "again").iterdir()]}
    assert modes == {"again": 0o755, "adapter_config.json": 0o644, "adapter_model.safetensors": 0o644}  # servable
    assert (tmp_path / "again" / "adapter_model.safetensors").read_bytes() == (
        trained_run / "peft" / "adapter_model.safetensors"
    ).read_bytes()


def error_of(capsys, *args) -> str:
    assert cli.main(list(args)) == 2
    return capsys.readouterr().err


def test_bad_input_is_refused_before_anything_is_written(files, tmp_path, capsys):
    model, csv = files
    out = tmp_path / "run"
    base = ["train", "--model", str(model), *FAST, "--out", str(out)]
    assert "data files not found: ['" in error_of(capsys, *base, "--data", str(tmp_path / "nope.csv"))
    assert "data has no column ['body']" in error_of(capsys, *base, "--data", str(csv), "--prompt", "Review: {body}")
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    assert "hold no rows" in error_of(capsys, *base, "--data", str(empty))
    small = error_of(capsys, *[a if a != "16" else "4" for a in base], "--data", str(csv))
    assert "seq_len 4 is too small for the prompt" in small
    unknown = error_of(capsys, *base, "--data", str(csv), "--targets", "q_projj")
    assert "match no kernel" in unknown and "model/layers/self_attn/q_proj" in unknown
    preset = error_of(capsys, *base[:1], "--model", "gpt5", *base[3:], "--data", str(csv))
    assert "neither a preset (smollm2-135m-instruct, all-minilm-l6-v2)" in preset
    assert not out.exists()


def test_a_folder_holding_another_run_is_refused_unless_overwrite(files, tmp_path, capsys):
    model, csv = files
    out = tmp_path / "run"
    args = ["train", "--model", str(model), "--data", str(csv), *FAST, "--steps", "2", "--out", str(out)]
    assert cli.main(args) == 0
    assert "holds a different run (differing: lora)" in error_of(capsys, *args, "--alpha", "4")
    assert "holds this run already" in error_of(capsys, *args)
    assert cli.main([*args, "--alpha", "4", "--overwrite"]) == 0
    assert json.loads((out / "run.json").read_text())["lora"]["alpha"] == 4


def test_config_file_and_flags(files, tmp_path):
    model, csv = files
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {model}\ndata:\n  files: [{csv}]\n  seq_len: 16\nlora:\n  r: 2\ntrain:\n  steps: 3\n")
    args = cli.build_parser().parse_args(["train", "--config", str(config), "--rank", "3"])
    run = cli.run_from_args(args)
    assert run.lora.r == 3 and run.train.steps == 3 and run.data.seq_len == 16 and run.model == str(model)
    config.write_text("lora:\n  rank: 2\n")
    with pytest.raises(ValueError, match=r"unknown LoraConfig settings \['rank'\]"):
        cli.run_from_args(cli.build_parser().parse_args(["train", "--config", str(config)]))


@pytest.mark.usefixtures("fresh_compiles")
def test_train_on_a_mesh_matches_one_device(files, tmp_path):
    import jax

    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (conftest sets them)")
    model, csv = files
    args = ["train", "--model", str(model), "--data", str(csv), *FAST, "--steps", "3", "--grad-accum", "2"]
    assert cli.main([*args, "--out", str(tmp_path / "one")]) == 0
    assert cli.main([*args, "--out", str(tmp_path / "mesh"), "--mesh", "data=2,fsdp=2,tensor=2"]) == 0
    records = [(tmp_path / name / "metrics.jsonl").read_text().splitlines() for name in ("one", "mesh")]
    losses = [[r["loss"] for r in map(json.loads, lines) if "eval" not in r] for lines in records]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)  # float32, other summation order
    assert cli.main(["train", "--model", str(model), "--mesh", "data=3", "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()


def test_train_with_remat_takes_the_same_steps(files, tmp_path):
    model, csv = files
    args = ["train", "--model", str(model), "--data", str(csv), *FAST, "--steps", "3", "--dropout", "0.1"]
    assert cli.main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert cli.main([*args, "--out", str(tmp_path / "remat"), "--remat"]) == 0
    assert json.loads((tmp_path / "remat" / "run.json").read_text())["train"]["remat"] is True
    records = [(tmp_path / name / "metrics.jsonl").read_text().splitlines() for name in ("plain", "remat")]
    losses = [[r["loss"] for r in map(json.loads, lines) if "eval" not in r] for lines in records]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)  # float32, recomputed in another fusion


def test_generate_serves_several_adapters_from_one_base_in_one_batch(trained_run, files, tmp_path, capsys):
    model, _ = files
    peft_dir = str(trained_run / "peft")  # the same adapters again, as a PEFT directory
    prompts = tmp_path / "prompts.jsonl"
    rows = [
        {"adapter": str(trained_run), "input": POSITIVE},
        {"adapter": peft_dir, "input": NEGATIVE},
        {"adapter": "base", "prompt": f"Review: {NEGATIVE}\nSentiment:"},
    ]
    prompts.write_text("\n".join(map(json.dumps, rows)))
    args = ["generate", "--adapter", str(trained_run), "--adapter", peft_dir, "--max-new-tokens", "2"]
    assert cli.main([*args, "--prompts", str(prompts)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"[{trained_run}] positive" and lines[1] == f"[{peft_dir}] negative"
    single = ["generate", "--model", str(model), "--no-chat", "--prompt", rows[2]["prompt"], "--max-new-tokens", "2"]
    assert cli.main(single) == 0
    assert lines[2] == f"[base] {capsys.readouterr().out.strip()}"  # the base row is the base model's answer
    prompts.write_text(json.dumps({"adapter": "elsewhere", "input": "x"}))
    assert "adapter 'elsewhere' is not one of --adapter" in error_of(capsys, *args, "--prompts", str(prompts))
