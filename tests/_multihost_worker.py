"""Subprocess side of tests/test_multihost.py: one of two processes joined by ``jax.distributed`` on loopback.

Run as ``python tests/_multihost_worker.py PROCESS_ID PORT DIRECTORY``. Each process has 2 CPU devices; together
they form a (data=2, tp=2) mesh whose data axis spans the processes. They train a sharded LoRA step a few times,
save an adapter checkpoint together (one logical writer), restore it sharded, and print one JSON line. The NNX copy
of the model (``NnxNet``, holding the same placed params) is then adapted with ``jaxpeft.nnx.adapt`` on the mesh and
trained on the same batches through ``nnx.jit`` and ``jaxpeft.nnx.optimizer``.
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
import jaxpeft.hf  # noqa: E402
import jaxpeft.nnx  # noqa: E402
import jaxpeft.sharding  # noqa: E402
from tests._multihost_common import (  # noqa: E402
    CFG,
    LAYOUTS,
    STEPS,
    TX,
    batches,
    host_params,
    nnx_model,
    nnx_step,
    specs,
    step,
)


def main() -> None:
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "tp"))

    def place(x, spec):
        return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda idx: x[idx])

    params = jax.tree.map(place, host_params(), specs(), is_leaf=lambda x: isinstance(x, np.ndarray))
    adapters = jaxpeft.sharding.init(CFG, params, key=jax.random.key(1), layouts=LAYOUTS)
    shardings = jaxpeft.sharding.adapter_shardings(adapters, params)
    opt = jaxpeft.sharding.init_optimizer(TX, adapters, shardings)
    initial = adapters
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
    # every process exports the global (non-addressable) adapters; process 0 writes, the other waits for it
    exported = jaxpeft.hf.export_adapters(f"{DIRECTORY}-peft", adapters, CFG, params, lambda p: p.replace("/", "."))
    host = multihost_utils.process_allgather(adapters, tiled=True)
    nnx_out = train_nnx(mesh, params, place, initial, shardings)
    nf4_out = train_nf4(mesh, place)
    print(
        json.dumps(
            {
                "process": jax.process_index(),
                "processes": jax.process_count(),
                "devices": jax.device_count(),
                "losses": losses,
                "restored_equal": same,
                "restored_sharding_kept": kept,
                "exported": exported,
                "adapters": [np.asarray(x).tolist() for x in jax.tree.leaves(host)],
                "nnx": nnx_out,
                "nf4": nf4_out,
            }
        ),
        flush=True,
    )
    jax.distributed.shutdown()


def train_nnx(mesh, params, place, initial, shardings) -> dict:
    """The NNX model on the same placed params, adapted on the mesh (key 1) and trained on the same batches."""
    equal = jax.jit(lambda a, b: (a == b).all(), out_shardings=NamedSharding(mesh, P()))
    with jax.set_mesh(mesh):
        model = jaxpeft.nnx.adapt(nnx_model(params), CFG, key=jax.random.key(1))
    start = jaxpeft.nnx.adapters_of(model)
    same_init = jax.tree.structure(start) == jax.tree.structure(initial) and all(
        bool(equal(a, b)) for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(initial), strict=True)
    )

    def placed_like_linen(tree) -> bool:  # equivalent, not equal: after a step P(None, None) may read P()
        if jax.tree.structure(tree) != jax.tree.structure(initial):
            return False
        pairs = zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True)
        return all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in pairs)

    opt = jaxpeft.nnx.optimizer(model, TX)
    losses = [float(nnx_step(model, opt, place(ids, P("data")))) for ids in batches()]
    trained = jaxpeft.nnx.adapters_of(model)
    host = multihost_utils.process_allgather(trained, tiled=True)
    return {
        "init_equal_linen": same_init,
        "placed_like_linen": placed_like_linen(start),
        "sharding_kept": placed_like_linen(trained),
        "losses": losses,
        "adapters": [np.asarray(x).tolist() for x in jax.tree.leaves(host)],
    }


def train_nf4(mesh, place) -> dict:
    """QLoRA across both processes: an NF4 base whose codes and scales are placed by base_specs on the mesh, the
    same steps, then a checkpoint restored over the sharded quantised base without adapters_like."""
    qhost = jaxpeft.quantize(host_params(), CFG, kind="nf4", layouts=LAYOUTS)
    qspecs = jaxpeft.sharding.base_specs(qhost, LAYOUTS, mesh=mesh)
    qparams = jax.tree.map(lambda x, s: place(np.asarray(x), s), qhost, qspecs)
    adapters = jaxpeft.sharding.init(CFG, qparams, key=jax.random.key(1), layouts=LAYOUTS)
    shardings = jaxpeft.sharding.adapter_shardings(adapters, qparams)
    opt = jaxpeft.sharding.init_optimizer(TX, adapters, shardings)
    train = jax.jit(step, out_shardings=(shardings, jax.tree.map(lambda x: x.sharding, opt), None))
    losses = []
    for ids in batches():
        adapters, opt, loss = train(adapters, opt, qparams, place(ids, P("data")))
        losses.append(float(loss))
    directory = f"{DIRECTORY}-nf4"
    jaxpeft.checkpoint.save_adapters(directory, STEPS, adapters, CFG, qparams, async_save=False)
    restored = jaxpeft.checkpoint.restore_adapters(directory, CFG, qparams)
    kept = all(
        a.sharding.is_equivalent_to(s, a.ndim)
        for a, s in zip(jax.tree.leaves(restored.adapters), jax.tree.leaves(shardings), strict=True)
    )
    codes = [x for x in jax.tree.leaves(qparams) if x.dtype == np.uint8]
    return {
        "losses": losses,
        "restored_sharding_kept": kept,
        "codes_sharded": all(not x.sharding.is_fully_replicated for x in codes),
        "adapters": [
            np.asarray(x).tolist() for x in jax.tree.leaves(multihost_utils.process_allgather(adapters, tiled=True))
        ],
    }


if __name__ == "__main__":
    main()
