"""Adapter checkpoints: exact round trips, pruning, other meshes, other bases, killed writes."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jlora
from jlora.checkpoint import Checkpoints, DamagedCheckpoint, fingerprint, leaf_digests
from tests.conftest import build, perturb


@pytest.fixture
def trained():
    """(adapters, opt_state, base, config, tx) after two Adam steps, so every leaf is non-trivial."""
    _, base_params, specs, config = build(scan=True)
    params = perturb(jlora.init(base_params, config, jax.random.key(1), specs=specs), jax.random.key(2))
    adapters, base = jlora.split(params, config)
    tx = optax.adam(1e-2)
    opt_state = tx.init(adapters)
    for _ in range(2):
        grads = jax.tree.map(jnp.ones_like, adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        adapters = optax.apply_updates(adapters, updates)
    return adapters, opt_state, base, config, tx


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bit-identical: nothing is recomputed


def save(checkpoints, step, trained, **kw):
    adapters, opt_state, base, config, _ = trained
    return checkpoints.save(step, adapters, opt_state, config=config, base_fingerprint=fingerprint(base), **kw)


def test_round_trip_is_exact_and_keeps_config_and_data_position(trained, tmp_path):
    adapters, opt_state, base, config, tx = trained
    with Checkpoints(tmp_path / "ckpt") as checkpoints:
        save(checkpoints, 7, trained, extra={"data": {"epoch": 1, "batch": 3}})
        checkpoints.wait()
        zeros = jax.tree.map(jnp.zeros_like, adapters)
        restored = checkpoints.restore(zeros, jax.eval_shape(tx.init, adapters), base_fingerprint=fingerprint(base))
    assert restored.step == 7 and restored.meta["data"] == {"epoch": 1, "batch": 3}
    assert restored.config == config
    assert_trees_equal(restored.adapters, adapters)
    assert_trees_equal(restored.opt_state, opt_state)
    assert not (tmp_path / "ckpt" / "7" / "base").exists()  # the frozen base is never written
    written = sum(f.stat().st_size for f in (tmp_path / "ckpt" / "7").rglob("*") if f.is_file())
    assert written < sum(x.nbytes for x in jax.tree.leaves(base)) + 200_000  # adapters, moments and metadata only


def test_async_save_is_safe_against_donating_the_arrays_right_after(trained, tmp_path):
    adapters, opt_state, base, config, _ = trained
    expected = jax.tree.map(np.array, adapters)
    bump = jax.jit(lambda tree: jax.tree.map(lambda x: x + 1.0, tree), donate_argnums=0)
    with Checkpoints(tmp_path / "ckpt") as checkpoints:
        checkpoints.save(1, adapters, opt_state, config=config, base_fingerprint=fingerprint(base))
        for _ in range(3):  # overwrite the saved buffers while the write may still be running
            adapters = bump(adapters)
        checkpoints.wait()
        restored = checkpoints.restore(adapters)
    assert_trees_equal(restored.adapters, expected)


def test_max_to_keep_and_best_metric(trained, tmp_path):
    with Checkpoints(tmp_path / "latest", max_to_keep=2) as checkpoints:
        for step in range(1, 6):
            save(checkpoints, step, trained)
        checkpoints.wait()
        assert checkpoints.all_steps() == [4, 5] and checkpoints.latest_step() == 5
    losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: 0.5, 5: 4.0}
    with Checkpoints(tmp_path / "best", max_to_keep=2, best_metric="loss") as checkpoints:
        for step, loss in losses.items():
            save(checkpoints, step, trained, metrics={"loss": loss})
        checkpoints.wait()
        assert checkpoints.all_steps() == [2, 4] and checkpoints.best_step() == 4


def test_restore_onto_another_mesh(trained, tmp_path):
    if jax.device_count() < 4:
        pytest.skip("needs 4 devices (tests set --xla_force_host_platform_device_count)")
    adapters = trained[0]
    with Checkpoints(tmp_path / "ckpt") as checkpoints:
        save(checkpoints, 1, trained)  # saved from one device
        checkpoints.wait()
        mesh = jax.make_mesh((2, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)

        def spec(path, x):  # rank axis replicated; the stacked-layer axis split over "data"
            return NamedSharding(mesh, P("data") if x.ndim >= 2 and x.shape[0] % 2 == 0 else P())

        shardings = jax.tree_util.tree_map_with_path(spec, adapters)
        restored = checkpoints.restore(adapters, shardings=shardings)
    for leaf, want in zip(jax.tree.leaves(restored.adapters), jax.tree.leaves(shardings), strict=True):
        assert leaf.sharding == want
    assert_trees_equal(restored.adapters, adapters)


def test_another_base_is_refused_naming_the_difference_unless_forced(trained, tmp_path):
    adapters, base = trained[0], trained[2]
    with Checkpoints(tmp_path / "ckpt") as checkpoints:
        save(checkpoints, 1, trained)
        checkpoints.wait()
        nudged = jax.tree.map(lambda x: x.at[(0,) * x.ndim].add(1e-6) if x.ndim else x, base)
        with pytest.raises(ValueError, match=r"same shapes and dtypes but different values.*force=True"):
            checkpoints.restore(adapters, base_fingerprint=fingerprint(nudged))
        _, other, _, _ = build(scan=True, r=2)
        other = jax.tree.map(lambda x: x, other)
        other["embed_tokens"]["embedding"] = jnp.zeros((13, 8))
        with pytest.raises(ValueError, match=r"embed_tokens/embedding: saved \(11, 8\) float32, now \(13, 8\)"):
            checkpoints.restore(adapters, base_fingerprint=fingerprint(other))
        forced = checkpoints.restore(adapters, base_fingerprint=fingerprint(nudged), force=True)
    assert_trees_equal(forced.adapters, adapters)


def test_fingerprint_sees_every_element_and_ignores_nothing():
    base = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.zeros(4, jnp.bfloat16)}
    same = fingerprint(jax.tree.map(jnp.copy, base))["hash"]
    assert fingerprint(base)["hash"] == same
    swapped = {"w": base["w"][::-1], "b": base["b"]}  # same multiset of values, other order
    assert fingerprint(swapped)["hash"] != same
    assert fingerprint({**base, "b": base["b"].at[3].set(1)})["hash"] != same
    assert fingerprint({**base, "b": base["b"].astype(jnp.float16)})["hash"] != same


KILLED_WRITE = textwrap.dedent(
    """
    import os, signal, sys
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    import jlora
    from jlora.checkpoint import Checkpoints, DamagedCheckpoint, fingerprint, leaf_digests

    def killed(self, *args, **kwargs):  # every file of the step is written; the rename that commits it is next
        print("writing", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    config = jlora.LoraConfig(r=2, target_modules=["dense"])
    base = {"dense": {"kernel": jnp.ones((4, 4))}}
    checkpoints = Checkpoints(sys.argv[1])
    small = {"dense": {"lora_a": jnp.full((4, 2), 1.0), "lora_b": jnp.full((2, 4), 2.0)}}
    checkpoints.save(1, small, None, config=config, base_fingerprint=fingerprint(base))
    checkpoints.wait()
    for temporary in (atomicity.AtomicRenameTemporaryPath, atomicity.CommitFileTemporaryPath):
        temporary.finalize = killed
    checkpoints.save(2, {"dense": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 4))}}, None, config=config,
                     base_fingerprint=fingerprint(base))
    checkpoints.wait()
    print("not killed", flush=True)
    """
)


def test_a_write_killed_half_way_leaves_the_previous_step_restorable(tmp_path):
    """Deterministic: the child kills itself at the last moment of writing step 2, with all
    of its files on disk but the step not committed (no timing, whatever the load)."""
    directory = tmp_path / "ckpt"
    child = subprocess.run(
        [sys.executable, "-c", KILLED_WRITE, str(directory)], capture_output=True, text=True, timeout=300
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert child.stdout.split() == ["writing"]
    leftovers = [p.name for p in directory.iterdir() if p.name != "1"]
    assert len(leftovers) == 1 and "tmp" in leftovers[0], leftovers  # step 2 was written and never committed
    template = {"dense": {"lora_a": jnp.zeros((4, 2)), "lora_b": jnp.zeros((2, 4))}}
    with Checkpoints(directory) as checkpoints:
        assert os.listdir(directory) == ["1"]  # opening removed the half-written step, before returning
        assert checkpoints.all_steps() == [1]
        restored = checkpoints.restore(template)
    assert restored.step == 1
    np.testing.assert_array_equal(restored.adapters["dense"]["lora_b"], np.full((2, 4), 2.0))


@pytest.mark.parametrize("damage", ["truncate", "overwrite"])
def test_a_damaged_step_is_reported_with_the_step_and_the_one_before(tmp_path, damage):
    config = jlora.LoraConfig(r=2, target_modules=["dense"])
    base = {"dense": {"kernel": jnp.ones((4, 4))}}
    step_adapters = lambda s: {"dense": {"lora_a": jnp.full((64, 2), float(s)), "lora_b": jnp.full((2, 64), 2.0)}}
    with Checkpoints(tmp_path, async_save=False) as checkpoints:
        for step in (1, 2):
            checkpoints.save(step, step_adapters(step), None, config=config, base_fingerprint=fingerprint(base))
    tensors = [p for p in (tmp_path / "2" / "adapters").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert tensors
    for path in tensors:  # a copy cut short, or bytes altered in place
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:-16] + bytes(16))
    with Checkpoints(tmp_path) as checkpoints, pytest.raises(DamagedCheckpoint) as error:
        checkpoints.restore(step_adapters(0))
    assert f"{tmp_path} step 2 is damaged" in str(error.value)
    assert "fall back to step 1" in str(error.value)
    with Checkpoints(tmp_path) as checkpoints:
        np.testing.assert_array_equal(checkpoints.restore(step_adapters(0), step=1).adapters["dense"]["lora_a"], 1.0)


def test_values_that_read_back_but_differ_from_the_saved_ones_are_refused(tmp_path):
    """The content check itself: `meta` says what was saved; here it disagrees with the arrays."""
    config = jlora.LoraConfig(r=2, target_modules=["dense"])
    base = {"dense": {"kernel": jnp.ones((4, 4))}}
    adapters = {"dense": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 4))}}
    altered = {"dense": {**adapters["dense"], "lora_b": adapters["dense"]["lora_b"].at[1, 3].set(0)}}
    assert leaf_digests(altered) != leaf_digests(adapters)  # one element of 16 changes the digest
    with Checkpoints(tmp_path, async_save=False) as checkpoints:
        checkpoints.save(1, adapters, None, config=config, base_fingerprint=fingerprint(base))
        assert checkpoints.restore(adapters).meta["digests"]["adapters"] == leaf_digests(adapters)
    meta_file = tmp_path / "1" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["digests"]["adapters"] = leaf_digests(altered)
    meta_file.write_text(json.dumps(meta))
    with Checkpoints(tmp_path) as checkpoints, pytest.raises(DamagedCheckpoint, match=r"\['lora_b'\] differs"):
        checkpoints.restore(adapters)


def test_restoring_from_an_empty_folder_says_so(tmp_path):
    checkpoints = Checkpoints(tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        checkpoints.restore({"a": jnp.zeros(2)})
