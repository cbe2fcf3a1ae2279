"""Subprocess side of tests/test_checkpoint_mesh.py: 8 CPU devices; save on a (2, 2, 2) data x fsdp x tp mesh, then
restore onto other meshes given only the sharded params.

Run as ``python tests/_ckpt_mesh_worker.py DIRECTORY``. Saves step 3 (adapters from ``jaxpeft.sharding.init``, the
head as ``extra``, a sharded Adam state over both) in ``DIRECTORY/ckpt`` and every saved array in
``DIRECTORY/saved.safetensors``, restores it onto each mesh of ``MESHES`` and prints one JSON line of results.
``nnx_case`` does the same for an NNX model: adapted on (2, 2, 2) with ``jaxpeft.nnx.adapt``, one optimizer step,
saved from ``jaxpeft.nnx.adapters_of``, restored onto (1, 2, 4) given the NNX model rebuilt there and loaded into it.
"""

import json
import os
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _ckpt_worker import build, expected_arrays  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxpeft  # noqa: E402
import jaxpeft.checkpoint  # noqa: E402
import jaxpeft.linen  # noqa: E402
import jaxpeft.nnx  # noqa: E402
import jaxpeft.sharding  # noqa: E402

AXES = ("data", "fsdp", "tp")
#: name -> (mesh shape, axis names in mesh order); the first is the mesh the step is saved on.
MESHES = {
    "2x2x2": ((2, 2, 2), AXES),
    "1x2x4": ((1, 2, 4), AXES),
    "2x2x2-permuted": ((2, 2, 2), ("tp", "data", "fsdp")),  # the same sizes, every device at another coordinate
}


def base_spec(path: str, leaf) -> P:
    """Kernels fsdp x tp on their fan-in x fan-out axes (after the scan's stack axis), biases tp."""
    stack = (None,) * (leaf.ndim - (2 if path.endswith("kernel") else 1))
    if path.endswith("kernel"):
        return P(*stack, "fsdp", "tp")
    return P(*stack, "tp") if path != "head/bias" else P()


def placed(tree, mesh):
    return jaxpeft._paths.map_with_paths(lambda p, x: jax.device_put(x, NamedSharding(mesh, base_spec(p, x))), tree)


def make_mesh(name: str) -> Mesh:
    shape, axes = MESHES[name]
    return Mesh(np.array(jax.devices()).reshape(shape), axes)


def perturbed(tree, seed: int):
    """``tree`` + positive noise (floats) or + 5 (integers), keeping each leaf's sharding: values that cannot match
    by chance."""
    rng = np.random.default_rng(seed)

    def bump(x):
        if np.issubdtype(x.dtype, np.integer):
            return x + 5
        return x + np.asarray(0.1 * np.abs(rng.standard_normal(x.shape)), x.dtype)  # Adam's nu stays positive

    return jax.tree.map(bump, tree)


def save(directory: str) -> None:
    model, params, cfg, x, tx = build()
    layouts = jaxpeft.linen.infer_layouts(model, x)
    params = placed(params, make_mesh("2x2x2"))
    adapters = perturbed(jaxpeft.sharding.init(cfg, params, key=jax.random.key(1), layouts=layouts), 0)
    extra = perturbed({"head": params["head"]}, 1)
    shardings = (jaxpeft.sharding.adapter_shardings(adapters, params), jax.tree.map(lambda a: a.sharding, extra))
    opt_state = perturbed(jaxpeft.sharding.init_optimizer(tx, (adapters, extra), shardings), 2)
    assert all(len(leaf.sharding.device_set) == 8 for leaf in jax.tree.leaves((adapters, extra, opt_state)))
    jaxpeft.checkpoint.save_adapters(os.path.join(directory, "ckpt"), 3, adapters, cfg, params, opt_state, extra=extra)
    from safetensors.numpy import save_file

    save_file(expected_arrays(adapters, opt_state, extra), os.path.join(directory, "saved.safetensors"))


def likes(model, params, cfg, x, tx):
    """``(adapters, opt_state, extra)`` as unsharded ``jax.ShapeDtypeStruct`` trees (what a fresh job has)."""
    adapters = jax.eval_shape(lambda p: jaxpeft.linen.init(cfg, model, p, x, key=jax.random.key(0)), params)
    extra = {"head": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params["head"])}
    return adapters, jax.eval_shape(tx.init, (adapters, extra)), extra


def restore_onto(directory: str, name: str, saved: dict) -> dict:
    """Restore onto mesh ``name`` with only sharded params; compare values and shardings with the derived ones."""
    model, params, cfg, x, tx = build()
    mesh = make_mesh(name)
    params = placed(params, mesh)
    _, opt_like, extra_like = likes(model, params, cfg, x, tx)
    restored = jaxpeft.checkpoint.restore_adapters(
        os.path.join(directory, "ckpt"), cfg, params, opt_state_like=opt_like, extra_like=extra_like
    )
    got = expected_arrays(restored.adapters, restored.opt_state, restored.extra)
    adapters = jaxpeft.sharding.adapter_shardings(restored.adapters, params)  # from the base, on this mesh
    extra = {"head": jax.tree.map(lambda a: a.sharding, params["head"])}
    opt = jaxpeft.sharding.optimizer_shardings(opt_like, (adapters, extra))

    @jax.jit
    def train_step(trainable, opt_state):
        def loss(t):
            base = {**params, "head": t[1]["head"]}
            return jnp.mean(jaxpeft.linen.apply(model, {"params": base}, t[0], x) ** 2)

        updates, opt_state = tx.update(jax.grad(loss)(trainable), opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    try:  # the restored state trains on this mesh as it is
        trained, _ = train_step((restored.adapters, restored.extra), restored.opt_state)
        trains = bool(np.isfinite(np.asarray(trained[0]["inp"]["kernel"].a)).all()) or "not finite"
    except ValueError as err:
        trains = str(err)[:300]

    def same(tree, shardings) -> bool:
        return jax.tree.leaves(jax.tree.map(lambda a: a.sharding, tree)) == jax.tree.leaves(shardings)

    return {
        "equal": got.keys() == saved.keys() and all(np.array_equal(got[k], saved[k]) for k in saved),
        "adapters_derived": same(restored.adapters, adapters),
        "extra_derived": same(restored.extra, extra),
        "opt_derived": same(restored.opt_state, opt),
        "on_mesh": all(
            getattr(leaf.sharding, "mesh", None) == mesh
            for leaf in jax.tree.leaves((restored.adapters, restored.opt_state, restored.extra))
        ),
        "trains": trains,
        "specs": {
            p: str(getattr(leaf.sharding, "spec", leaf.sharding))
            for p, leaf in jaxpeft._paths.leaves_with_paths(restored.adapters)
            if p.startswith("layers/")
        },
    }


def priority(directory: str) -> dict:
    """``adapters_like`` shardings beat ``sharding=``, which beats the derived shardings."""
    model, params, cfg, x, tx = build()
    mesh = make_mesh("1x2x4")
    params = placed(params, mesh)
    abstract, _, _ = likes(model, params, cfg, x, tx)
    device = SingleDeviceSharding(jax.devices()[5])
    replicated = NamedSharding(mesh, P())
    adapters_like = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), abstract)
    given = jaxpeft.checkpoint.restore_adapters(
        os.path.join(directory, "ckpt"), cfg, params, skip=("opt_state", "extra"), sharding=device
    )
    like = jaxpeft.checkpoint.restore_adapters(
        os.path.join(directory, "ckpt"), cfg, params, adapters_like=adapters_like, skip=("opt_state", "extra")
    )
    return {
        "sharding_beats_derived": all(leaf.sharding == device for leaf in jax.tree.leaves(given.adapters)),
        "like_beats_derived": all(leaf.sharding == replicated for leaf in jax.tree.leaves(like.adapters)),
    }


class NnxNet(nnx.Module):
    """Two Linear layers, kernels FSDP x TP through ``nnx.with_partitioning`` (biases replicated), and a head."""

    def __init__(self, rngs: nnx.Rngs):
        def part(*names):
            return nnx.with_partitioning(nnx.initializers.normal(0.3), names)

        self.up = nnx.Linear(8, 16, kernel_init=part("fsdp", "tp"), rngs=rngs)
        self.down = nnx.Linear(16, 8, kernel_init=part("tp", "fsdp"), rngs=rngs)
        self.head = nnx.Linear(8, 4, kernel_init=part("fsdp", None), rngs=rngs)

    def __call__(self, x):
        return self.head(x + self.down(jnp.tanh(self.up(x))))


NNX_CFG = jaxpeft.LoraConfig(rank=2, alpha=4.0, targets=["up", "down"])
NNX_X = np.random.default_rng(3).standard_normal((8, 8)).astype(np.float32)


def nnx_model(mesh: Mesh, key: int):
    """The same base values on any mesh (kernels placed by their partitioning metadata), adapted with ``key``."""
    with jax.set_mesh(mesh):
        model = NnxNet(nnx.Rngs(0))
    return jaxpeft.nnx.adapt(model, NNX_CFG, key=jax.random.key(key))


def nnx_case(directory: str) -> dict:
    """Save an NNX model's adapters (after one AdamW step) on (2, 2, 2); restore onto (1, 2, 4) given only the NNX
    model rebuilt there (its ``base_params``), load them into it, and compare values, shardings and outputs."""
    mesh = make_mesh("2x2x2")
    model = nnx_model(mesh, 1)
    optimizer = jaxpeft.nnx.optimizer(model, optax.adamw(1e-2))

    @nnx.jit
    def train_step(model, optimizer, x):
        loss, grads = nnx.value_and_grad(
            lambda m: jnp.mean((m(x) - 1.0) ** 2), argnums=nnx.DiffState(0, jaxpeft.nnx.AdapterParam)
        )(model)
        optimizer.update(model, grads)
        return loss

    train_step(model, optimizer, jax.device_put(NNX_X, NamedSharding(mesh, P("data"))))
    adapters = jaxpeft.nnx.adapters_of(model)
    saved = {p: np.asarray(x) for p, x in jaxpeft._paths.leaves_with_paths(adapters)}
    saved_on_8 = all(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(adapters))
    nonzero = all(np.abs(saved[p]).min() > 0 for p in saved)  # B moved off zero: the step changed everything
    jaxpeft.checkpoint.save_adapters(
        os.path.join(directory, "nnx"), 1, adapters, NNX_CFG, jaxpeft.nnx.base_params(model)
    )
    expected = np.asarray(model(NNX_X))

    mesh2 = make_mesh("1x2x4")
    model2 = nnx_model(mesh2, 7)  # other adapter values: the load must replace them all
    params2 = jaxpeft.nnx.base_params(model2)
    restored = jaxpeft.checkpoint.restore_adapters(os.path.join(directory, "nnx"), NNX_CFG, params2)
    got = {p: np.asarray(x) for p, x in jaxpeft._paths.leaves_with_paths(restored.adapters)}
    specs = jaxpeft.sharding.adapter_specs(restored.adapters, params2)
    derived = [NamedSharding(mesh2, s) for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))]
    restored_shardings = [x.sharding for x in jax.tree.leaves(restored.adapters)]
    jaxpeft.nnx.load_adapters(model2, restored.adapters)
    loaded = jaxpeft.nnx.adapters_of(model2)
    output = np.asarray(model2(NNX_X))
    return {
        "saved_on_8": saved_on_8,
        "nonzero": nonzero,
        "equal": got.keys() == saved.keys() and all(np.array_equal(got[k], saved[k]) for k in saved),
        "restored_derived": restored_shardings == derived,
        "loaded_derived": [x.sharding for x in jax.tree.leaves(loaded)] == derived,
        "loaded_equal": all(
            np.array_equal(np.asarray(x), saved[p]) for p, x in jaxpeft._paths.leaves_with_paths(loaded)
        ),
        "specs": {p: str(x.sharding.spec) for p, x in jaxpeft._paths.leaves_with_paths(restored.adapters)},
        "output_close": bool(np.allclose(output, expected, rtol=1e-6, atol=1e-6)),
        "output_max_diff": float(np.abs(output - expected).max()),
        "base_equal": all(
            np.array_equal(np.asarray(a), np.asarray(b))
            for a, b in zip(jax.tree.leaves(jaxpeft.nnx.base_params(model)), jax.tree.leaves(params2), strict=True)
        ),
    }


def main(directory: str) -> None:
    from safetensors.numpy import load_file

    save(directory)
    saved = load_file(os.path.join(directory, "saved.safetensors"))
    out = {name: restore_onto(directory, name, saved) for name in MESHES}
    out["priority"] = priority(directory)
    out["nnx"] = nnx_case(directory)
    print(json.dumps(out))
    sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1])
