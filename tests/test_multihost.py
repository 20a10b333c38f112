"""Two `jax.distributed` processes on localhost train and checkpoint together; one process
restores their checkpoint onto another mesh and continues exactly as a single process."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import sharding
from jlora import train as training
from jlora.checkpoint import Checkpoints
from jlora.tree import flatten, path_str
from tests.test_sharding import SEQ, STEPS, setup, train

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (conftest sets them)")
ROOT = pathlib.Path(__file__).parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def next_step(checkpoints_dir, mesh=None):
    """Restore step STEPS (onto `mesh`, or one device) and run the step after it: (adapters, loss)."""
    model, lora, params, split = setup(scan=True)
    config = training.TrainConfig(steps=STEPS, batch_size=8, grad_accum=2, learning_rate=1e-2, warmup_steps=1)
    tx = training.make_optimizer(config, lora)
    adapters, base = jlora.split(params, lora)
    placement = training.Placement.derive(mesh, model, params, lora, tx) if mesh else None
    with Checkpoints(checkpoints_dir) as checkpoints:
        restored = checkpoints.restore(
            adapters,
            jax.eval_shape(tx.init, adapters),
            shardings=placement.adapters if mesh else None,
            opt_state_shardings=placement.opt_state if mesh else None,
        )
    assert restored.step == STEPS
    batch = training.shape_batch(split.take(np.arange(16)), 2)
    if mesh:
        base = jax.device_put(base, placement.base)
        batch = sharding.shard_batch(batch, mesh, 8, batch_axis=1)
        for name, leaf in flatten(restored.adapters).items():
            assert leaf.sharding == flatten(placement.adapters)[name], path_str(name)
    step = training.make_train_step(training.Task(model, lora, "causal", tail=SEQ), tx, jax.random.key(0), placement)
    adapters, _, metrics = step(restored.adapters, restored.opt_state, base, batch, jnp.int32(STEPS))
    return jax.tree.map(np.asarray, adapters), float(metrics["loss"])


@pytest.mark.usefixtures("fresh_compiles")
def test_two_processes_train_and_save_then_one_restores_on_another_mesh(tmp_path):
    port, directory = free_port(), tmp_path / "multihost"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the workers set 4 devices each
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"  # see conftest.fresh_compiles
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.multihost_worker", str(port), str(i), str(directory)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [w.communicate(timeout=420) for w in workers]
    for worker, (_, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err[-3000:]
    _, history = train(scan=True, checkpoints=Checkpoints(tmp_path / "single"))
    losses = [h["loss"] for h in history]
    for out, _ in outputs:  # both processes saw the same global losses as one process does
        multihost = json.loads(out.split("losses", 1)[1])
        np.testing.assert_allclose(multihost, losses, rtol=1e-5)
    ours, ours_loss = next_step(directory, sharding.make_mesh("fsdp=2,tensor=4"))  # 8 devices, one process
    theirs, theirs_loss = next_step(tmp_path / "single")
    assert np.isclose(ours_loss, theirs_loss, rtol=1e-5, atol=1e-6)
    for name, leaf in flatten(ours).items():
        np.testing.assert_allclose(leaf, flatten(theirs)[name], atol=1e-5, err_msg=path_str(name))
