"""Subprocess side of tests/test_multihost.py: one of two processes joined by ``jax.distributed`` on loopback.

Run as ``python tests/_multihost_worker.py PROCESS_ID PORT DIRECTORY``. Each process has 2 CPU devices; together
they form a (data=2, tp=2) mesh whose data axis spans the processes. They train a sharded LoRA step a few times,
save an adapter checkpoint together (one logical writer), restore it sharded, and print one JSON line.
"""

import json
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `tests` importable

PROCESS_ID, PORT, DIRECTORY = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{PORT}", num_processes=2, process_id=PROCESS_ID)

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxpeft  # noqa: E402
import jaxpeft.checkpoint  # noqa: E402
import jaxpeft.sharding  # noqa: E402
from tests._multihost_common import CFG, LAYOUTS, STEPS, TX, batches, host_params, specs, step  # noqa: E402


def main() -> None:
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "tp"))

    def place(x, spec):
        return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda idx: x[idx])

    params = jax.tree.map(place, host_params(), specs(), is_leaf=lambda x: isinstance(x, np.ndarray))
    adapters = jaxpeft.sharding.init(CFG, params, key=jax.random.key(1), layouts=LAYOUTS)
    shardings = jaxpeft.sharding.adapter_shardings(adapters, params)
    opt = jaxpeft.sharding.init_optimizer(TX, adapters, shardings)
    train = jax.jit(step, out_shardings=(shardings, jax.tree.map(lambda x: x.sharding, opt), None))
    losses = []
    for ids in batches():
        adapters, opt, loss = train(adapters, opt, params, place(ids, P("data")))
        losses.append(float(loss))
    with jaxpeft.checkpoint.AdapterCheckpointer(DIRECTORY, CFG, params, async_save=False) as ckpt:
        ckpt.save(STEPS, adapters, opt)
    restored = jaxpeft.checkpoint.restore_adapters(DIRECTORY, CFG, params, adapters_like=adapters, opt_state_like=opt)
    same = all(
        bool(jax.jit(lambda a, b: (a == b).all(), out_shardings=NamedSharding(mesh, P()))(a, b))
        for a, b in zip(jax.tree.leaves(restored.adapters), jax.tree.leaves(adapters), strict=True)
    )
    kept = all(
        a.sharding == b.sharding
        for a, b in zip(jax.tree.leaves(restored.adapters), jax.tree.leaves(adapters), strict=True)
    )
    host = multihost_utils.process_allgather(adapters, tiled=True)
    print(
        json.dumps(
            {
                "process": jax.process_index(),
                "processes": jax.process_count(),
                "devices": jax.device_count(),
                "losses": losses,
                "restored_equal": same,
                "restored_sharding_kept": kept,
                "adapters": [np.asarray(x).tolist() for x in jax.tree.leaves(host)],
            }
        ),
        flush=True,
    )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
