"""`jlora.finetune`: the whole `jlora train` run from Python, with no argparse in sight."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest

import jlora
from jlora import train as training
from jlora.finetune import Result, Run, finetune, load_run
from tests import tiny_task

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return {"model": tiny_task.llama_dir(root / "model"), "csv": tiny_task.write_csv(root / "reviews.csv")}


def settings(sources, **train) -> dict:
    return {
        "model": str(sources["model"]),
        "data": {"files": [str(sources["csv"])], "seq_len": 16, "eval_size": 40},
        "lora": {"r": 2, "target_modules": ["q_proj", "v_proj"]},
        "train": {"batch_size": 8, "steps": 6, "learning_rate": 1e-2, **train},
    }


def test_finetune_returns_the_results_and_the_trained_adapters(sources, tmp_path):
    result = finetune(settings(sources), tmp_path / "run", progress=False)
    assert isinstance(result, Result) and result.out == tmp_path / "run"
    assert result.results == json.loads((tmp_path / "run" / "results.json").read_text())
    assert result.run.data.task == "completion" and result.run.train.steps == 6  # made concrete from the data
    leaves = jlora.tree.flatten(result.adapters)
    assert leaves and all(jlora.tree.is_adapter(keys[-1]) for keys in leaves)
    # the returned adapters are the exported / checkpointed ones: their held-out loss is the run's "after"
    _, pretrained, _, _, held_out = load_run(str(tmp_path / "run"))
    task = training.task_for(pretrained, result.run.lora, held_out, held_out)
    params = jlora.join(result.adapters, result.base)
    metrics = training.evaluate(training.make_eval_step(task), params, held_out, 32, False)
    np.testing.assert_allclose(metrics["loss"], result.results["loss_after"], rtol=1e-5)  # float32, same sums

    again = finetune(out=tmp_path / "run", resume=True, progress=False)  # complete: read back, not retrained
    assert again.results == result.results
    for a, b in zip(jax.tree.leaves(again.adapters), jax.tree.leaves(result.adapters), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_run_object_and_bad_settings_refused_before_writing(sources, tmp_path):
    run = Run(**settings(sources))
    assert finetune(run, tmp_path / "object", progress=False).results["steps"] == 6
    with pytest.raises(ValueError, match="rank must be an integer"):
        finetune({**settings(sources), "lora": {"r": 0}}, tmp_path / "bad", progress=False)
    with pytest.raises(FileExistsError, match="holds this run already"):
        finetune(run, tmp_path / "object", progress=False)
    with pytest.raises(ValueError, match="resume takes every setting"):
        finetune(run, tmp_path / "object", resume=True)
    assert not (tmp_path / "bad").exists()


def test_compilation_cache_is_on_by_default_in_the_user_cache(monkeypatch, tmp_path):
    from jlora.finetune import compilation_cache

    previous = jax.config.jax_compilation_cache_dir  # the tests' own (conftest)
    try:
        assert compilation_cache() == pathlib.Path(previous)  # one the user set is kept
        jax.config.update("jax_compilation_cache_dir", None)
        monkeypatch.setenv("JLORA_CACHE_DIR", "off")
        assert compilation_cache() is None and not jax.config.jax_compilation_cache_dir
        monkeypatch.delenv("JLORA_CACHE_DIR")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
        assert compilation_cache() == tmp_path / "jlora" / "xla"
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jlora" / "xla")
        jax.config.update("jax_compilation_cache_dir", None)
        monkeypatch.setenv("JLORA_CACHE_DIR", str(tmp_path / "mine"))  # jlora's cache folder, the GGUF cache's too
        assert compilation_cache() == tmp_path / "mine" / "xla"
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)
