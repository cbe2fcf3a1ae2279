"""Subprocess side of tests/test_checkpoint.py: restores and saves on another device count, or dies mid-save.

Run as ``python tests/_ckpt_worker.py MODE DIRECTORY``; the test sets ``XLA_FLAGS`` for the device count and has
saved step 1 in ``DIRECTORY/one``. The worker compiles nothing: its params are ``jax.eval_shape`` of the model's
init (checkpoints need only their shapes) and every value it handles comes from the checkpoint. Modes:

- ``reshard``: restore step 1 (adapters, optimizer state, ``extra`` head) sharded over a mesh of all devices,
  compare it with ``DIRECTORY/expected.safetensors`` and check the shardings, then save it as step 2 in
  ``DIRECTORY/many``;
- ``hang``: save step 2 (step 1's adapters + 1) in ``DIRECTORY/one`` and block inside its commit until killed;
- ``kill``: likewise, but SIGKILL itself right after the async save of step 2 returns.
"""

from __future__ import annotations

import functools
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


def build(rank: int = 2, abstract: bool = False):
    """``(model, params, cfg, x, tx)``: the same values in every process (shapes only with ``abstract``)."""
    model = Net()
    x = jnp.ones((2, 8), jnp.float32)
    init = functools.partial(jax.eval_shape, model.init) if abstract else jax.jit(model.init)
    params = init(jax.random.key(0), x)["params"]
    cfg = jaxpeft.LoraConfig(rank=rank, alpha=4.0, targets=["inp", "up"])
    return model, params, cfg, x, optax.adam(1e-2)


def abstract_state(model, params, cfg, x, tx):
    """``(adapters, opt_state)`` as ``jax.ShapeDtypeStruct`` trees: what a fresh process restores into."""
    adapters = jax.eval_shape(lambda p: jaxpeft.linen.init(cfg, model, p, x, key=jax.random.key(0)), params)
    return adapters, jax.eval_shape(tx.init, adapters)


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


def expected_arrays(adapters, opt_state, head) -> dict[str, np.ndarray]:
    """Every saved array by ``item/path`` (the keys of ``expected.safetensors``)."""
    trees = {"adapters": adapters, "opt": opt_state, "extra": head}
    return {f"{item}/{k}": v for item, tree in trees.items() for k, v in flat_arrays(tree).items()}


def mesh_sharding(path: str, leaf) -> NamedSharding:
    """Shard A's fan-in axis, B's fan-out axis and the head kernel's fan-in (all WIDTH) over every device; the
    rest replicated."""
    mesh = jax.make_mesh((jax.device_count(),), ("x",))
    shape = tuple(leaf.shape)
    if len(shape) >= 2 and (path.endswith("/a") or path == "kernel"):
        return NamedSharding(mesh, P(*([None] * (len(shape) - 2)), "x", None))
    if len(shape) >= 2 and path.endswith("/b"):
        return NamedSharding(mesh, P(*([None] * (len(shape) - 1)), "x"))
    return NamedSharding(mesh, P())


def sharded_like(tree):
    """``tree`` as ``jax.ShapeDtypeStruct`` leaves carrying their ``mesh_sharding``."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=mesh_sharding(jaxpeft.path_str(kp), x)), tree
    )


def reshard(directory: str) -> None:
    from safetensors.numpy import load_file

    model, params, cfg, x, tx = build(abstract=True)
    adapters, opt_state = abstract_state(model, params, cfg, x, tx)
    restored = jaxpeft.checkpoint.restore_adapters(
        os.path.join(directory, "one"),
        cfg,
        params,
        adapters_like=sharded_like(adapters),
        opt_state_like=sharded_like(opt_state),
        extra_like=sharded_like(params["head"]),
    )
    expected = load_file(os.path.join(directory, "expected.safetensors"))
    got = expected_arrays(restored.adapters, restored.opt_state, restored.extra)
    assert got.keys() == expected.keys(), sorted(set(got) ^ set(expected))
    for k, v in got.items():
        np.testing.assert_array_equal(v, expected[k], err_msg=k)
    for path, leaf in (
        ("layers/up/kernel/a", restored.adapters["layers"]["up"]["kernel"].a),
        ("kernel", restored.extra["kernel"]),
    ):
        assert leaf.sharding == mesh_sharding(path, leaf), (path, leaf.sharding)
        assert len(leaf.sharding.device_set) == jax.device_count() > 1
    jaxpeft.checkpoint.save_adapters(
        os.path.join(directory, "many"), 2, restored.adapters, cfg, params, restored.opt_state, extra=restored.extra
    )
    print(f"restored step {restored.step} on {jax.device_count()} devices and saved it as step 2")


def die_saving(directory: str, mode: str) -> None:
    model, params, cfg, x, tx = build(abstract=True)
    with jaxpeft.checkpoint.AdapterCheckpointer(os.path.join(directory, "one"), cfg, params) as ckpt:
        restored = ckpt.restore(1, opt_state_like=abstract_state(model, params, cfg, x, tx)[1])
        bigger = jax.tree.map(lambda v: v + 1.0, restored.adapters)
        if mode == "hang":
            from orbax.checkpoint._src.path import atomicity

            async def never_commit(self):  # stands in for a crash just before the atomic rename
                with open(os.path.join(directory, "IN_SAVE"), "w") as f:
                    f.write(str(os.getpid()))
                while True:
                    time.sleep(1)

            atomicity.AtomicRenameTemporaryPath.finalize = never_commit
            ckpt.save(2, bigger, restored.opt_state)
            ckpt.wait()
        else:
            ckpt.save(2, bigger, restored.opt_state)
            os.kill(os.getpid(), signal.SIGKILL)


def main(mode: str, directory: str) -> None:
    if mode == "reshard":
        reshard(directory)
    elif mode in ("hang", "kill"):
        die_saving(directory, mode)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
