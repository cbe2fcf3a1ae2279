"""Subprocess side of tests/test_checkpoint.py: saves/restores on another device count, or dies mid-save.

Run as ``python tests/_ckpt_worker.py MODE DIRECTORY``; the test sets ``XLA_FLAGS`` for the device count.
Modes: ``save-sharded`` (adapters and optimizer state sharded over all devices, saved as step 5, expected values
written to ``DIRECTORY/expected.safetensors``), ``restore-sharded`` (restore onto a mesh of all devices and
compare with that file), ``hang`` (save step 1, then block inside the commit of step 2 until killed) and
``kill`` (save step 1, then SIGKILL itself right after the async save of step 2 returns).
"""

from __future__ import annotations

import os
import signal
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxpeft
import jaxpeft.checkpoint
import jaxpeft.linen

WIDTH = 16


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
        return x + nn.Dense(WIDTH, name="up")(jnp.tanh(x)), None


class Net(nn.Module):
    """A dense input layer, a scanned stack of three blocks (stacked kernels) and a head."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(WIDTH, name="inp")(x)
        stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        x, _ = stack(name="layers")(x, None)
        return nn.Dense(4, name="head")(x)


def build(rank: int = 2):
    """``(model, params, cfg, x, tx)``: the same values in every process."""
    model = Net()
    x = jnp.ones((2, 8), jnp.float32)
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    cfg = jaxpeft.LoraConfig(rank=rank, alpha=4.0, targets=["inp", "up"])
    return model, params, cfg, x, optax.adam(1e-2)


def trained(model, params, cfg, x, tx, steps: int = 3):
    """Adapters and optimizer state after a few steps, so that both are non-trivial."""
    adapters = jaxpeft.linen.init(cfg, model, params, x, key=jax.random.key(1))
    opt_state = tx.init(adapters)

    @jax.jit
    def step(adapters, opt_state):
        grads = jax.grad(lambda a: jnp.mean(jaxpeft.linen.apply(model, {"params": params}, a, x) ** 2))(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state

    for _ in range(steps):
        adapters, opt_state = step(adapters, opt_state)
    return adapters, opt_state


def flat_arrays(tree) -> dict[str, np.ndarray]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jaxpeft.path_str(kp): np.asarray(leaf) for kp, leaf in flat}


def mesh_sharding(path: str, leaf) -> NamedSharding:
    """Shard A's fan-in axis and B's fan-out axis (both WIDTH) over every device; scalars replicated."""
    mesh = jax.make_mesh((jax.device_count(),), ("x",))
    shape = tuple(leaf.shape)
    if len(shape) >= 2 and path.endswith("/a"):
        return NamedSharding(mesh, P(*([None] * (len(shape) - 2)), "x", None))
    if len(shape) >= 2 and path.endswith("/b"):
        return NamedSharding(mesh, P(*([None] * (len(shape) - 1)), "x"))
    return NamedSharding(mesh, P())


def shard(tree):
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: jax.device_put(x, mesh_sharding(jaxpeft.path_str(kp), x)), tree
    )


def main(mode: str, directory: str) -> None:
    from safetensors.numpy import load_file, save_file

    model, params, cfg, x, tx = build()
    if mode == "save-sharded":
        adapters, opt_state = trained(model, params, cfg, x, tx)
        adapters, opt_state = shard(adapters), shard(opt_state)
        assert len(adapters["inp"]["kernel"].a.sharding.device_set) == jax.device_count()
        with jaxpeft.checkpoint.AdapterCheckpointer(directory, cfg, params) as ckpt:
            ckpt.save(5, adapters, opt_state)
        expected = {f"adapters/{k}": v for k, v in flat_arrays(adapters).items()}
        expected |= {f"opt/{k}": v for k, v in flat_arrays(opt_state).items()}
        save_file(expected, os.path.join(directory, "expected.safetensors"))
        print(f"saved on {jax.device_count()} devices")
    elif mode == "restore-sharded":
        like_adapters, like_opt = trained(model, params, cfg, x, tx, steps=0)
        like_adapters, like_opt = shard(like_adapters), shard(like_opt)
        restored = jaxpeft.checkpoint.restore_adapters(
            directory, cfg, params, adapters_like=like_adapters, opt_state_like=like_opt
        )
        expected = load_file(os.path.join(directory, "expected.safetensors"))
        for k, v in flat_arrays(restored.adapters).items():
            np.testing.assert_array_equal(v, expected[f"adapters/{k}"])
        for k, v in flat_arrays(restored.opt_state).items():
            np.testing.assert_array_equal(v, expected[f"opt/{k}"])
        a = restored.adapters["layers"]["up"]["kernel"].a
        assert a.sharding == mesh_sharding("layers/up/kernel/a", a), a.sharding
        assert len(a.sharding.device_set) == jax.device_count() > 1
        print(f"restored step {restored.step} on {jax.device_count()} devices")
    elif mode in ("hang", "kill"):
        adapters, opt_state = trained(model, params, cfg, x, tx)
        with jaxpeft.checkpoint.AdapterCheckpointer(directory, cfg, params) as ckpt:
            ckpt.save(1, adapters, opt_state)
            ckpt.wait()
            bigger = jax.tree.map(lambda v: v + 1.0, adapters)
            if mode == "hang":
                from orbax.checkpoint._src.path import atomicity

                async def never_commit(self):  # stands in for a crash just before the atomic rename
                    with open(os.path.join(directory, "IN_SAVE"), "w") as f:
                        f.write(str(os.getpid()))
                    while True:
                        time.sleep(1)

                atomicity.AtomicRenameTemporaryPath.finalize = never_commit
                ckpt.save(2, bigger, opt_state)
                ckpt.wait()
            else:
                ckpt.save(2, bigger, opt_state)
                os.kill(os.getpid(), signal.SIGKILL)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
