"""One process of `test_multihost`: ``python -m tests.multihost_worker PORT PROCESS_ID CHECKPOINTS``.

Joins a 2-process `jax.distributed` job on localhost (4 CPU devices each), trains the tiny
Llama of `test_sharding` on a data=2,fsdp=2,tensor=2 mesh over all 8 devices, each process
loading only its own rows, and saves Orbax checkpoints from both processes together."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax

port, process_id, directory = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)

from jlora import sharding  # noqa: E402
from jlora.checkpoint import Checkpoints  # noqa: E402
from tests.test_sharding import train  # noqa: E402

assert jax.device_count() == 8 and jax.local_device_count() == 4
with Checkpoints(directory) as checkpoints:
    _, history = train(scan=True, mesh=sharding.make_mesh("data=2,fsdp=2,tensor=2"), checkpoints=checkpoints)
print("losses", json.dumps([h["loss"] for h in history]), flush=True)
