"""jaxpeft.checkpoint onto another mesh: with only sharded params given, a restore takes the shardings that
jaxpeft.sharding derives from the base weights (8 CPU devices in a subprocess), and the step restores on 1 device."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from _ckpt_worker import build, expected_arrays
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxpeft
import jaxpeft.checkpoint as ckpt_lib
import jaxpeft.linen
import jaxpeft.sharding

WORKER = os.path.join(os.path.dirname(__file__), "_ckpt_mesh_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = ["2x2x2", "1x2x4", "2x2x2-permuted"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``(directory, results)``: the worker's checkpoint (saved on a (2, 2, 2) mesh) and its restore results."""
    directory = tmp_path_factory.mktemp("mesh")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, WORKER, str(directory)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return directory, json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh", MESHES)
def test_restore_onto_a_mesh_takes_the_derived_shardings(saved, mesh):
    """Given only the params sharded on the new mesh: values equal, every array on that mesh with the shardings
    jaxpeft.sharding derives (adapters from their base weights, extra from its params, optimizer state following)."""
    r = saved[1][mesh]
    assert r["equal"], "restored values differ from the saved ones"
    assert r["on_mesh"], "a restored array is not on the params' mesh"
    assert r["adapters_derived"] and r["extra_derived"] and r["opt_derived"]
    assert r["specs"] == {"layers/up/kernel/a": "P(None, 'fsdp', None)", "layers/up/kernel/b": "P(None, None, 'tp')"}
    assert r["trains"] is True, f"the restored state does not train on the new mesh: {r['trains']}"


def test_given_shardings_beat_the_derived_ones(saved):
    r = saved[1]["priority"]
    assert r["like_beats_derived"], "`adapters_like` shardings were not used"
    assert r["sharding_beats_derived"], "`sharding=` was not used"


def _restore_here(directory, params):
    model, _, cfg, x, tx = build(abstract=True)
    adapters = jax.eval_shape(lambda p: jaxpeft.linen.init(cfg, model, p, x, key=jax.random.key(0)), params)
    extra = {"head": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params["head"])}
    opt_like = jax.eval_shape(tx.init, (adapters, extra))
    return ckpt_lib.restore_adapters(directory / "ckpt", cfg, params, opt_state_like=opt_like, extra_like=extra)


def _assert_saved_values(directory, restored):
    from safetensors.numpy import load_file

    expected = load_file(directory / "saved.safetensors")
    got = expected_arrays(restored.adapters, restored.opt_state, restored.extra)
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_step_saved_on_8_devices_restores_on_one(saved):
    directory, _ = saved
    params = build()[1]  # on this process's one device, no NamedSharding: the first local device
    restored = _restore_here(directory, params)
    _assert_saved_values(directory, restored)
    leaves = jax.tree.leaves((restored.adapters, restored.opt_state, restored.extra))
    assert {leaf.sharding for leaf in leaves} == {jax.sharding.SingleDeviceSharding(jax.local_devices()[0])}


def test_params_on_a_one_device_mesh_give_named_shardings(saved):
    directory, _ = saved
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))
    params = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P())), build()[1])
    params["inp"]["kernel"] = jax.device_put(params["inp"]["kernel"], NamedSharding(mesh, P("fsdp", "tp")))
    restored = _restore_here(directory, params)
    _assert_saved_values(directory, restored)
    inp = restored.adapters["inp"]["kernel"]
    assert (inp.a.sharding, inp.b.sharding) == (
        NamedSharding(mesh, P("fsdp", None)),
        NamedSharding(mesh, P(None, "tp")),
    )
    assert restored.opt_state[0].mu[0]["inp"]["kernel"].a.sharding == inp.a.sharding
    assert all(getattr(x.sharding, "mesh", None) == mesh for x in jax.tree.leaves((restored.opt_state, restored.extra)))


def test_nnx_adapters_saved_on_a_mesh_restore_into_the_nnx_model_on_another(saved):
    """An NNX model adapted with jaxpeft.nnx.adapt on (2, 2, 2) and stepped once: its adapters_of saved with its
    base_params restore onto (1, 2, 4) given the NNX model rebuilt there, bit-equal, with the shardings
    jaxpeft.sharding.adapter_specs derives there, and load_adapters into it keeps them and gives the same outputs."""
    r = saved[1]["nnx"]
    assert r["saved_on_8"] and r["nonzero"], "the saved NNX adapters were not sharded or not trained"
    assert r["base_equal"], "the NNX base differs between the meshes"
    assert r["equal"], "restored NNX adapter values differ from the saved ones"
    assert r["restored_derived"], f"restored NNX adapters are not placed as derived on (1, 2, 4): {r['specs']}"
    assert r["specs"] == {
        "down/kernel/a": "P('tp', None)",
        "down/kernel/b": "P(None, 'fsdp')",
        "up/kernel/a": "P('fsdp', None)",
        "up/kernel/b": "P(None, 'tp')",
    }
    assert r["loaded_equal"] and r["loaded_derived"], "load_adapters changed the values or the shardings"
    assert r["output_close"], f"the NNX model's output moved on the new mesh by {r['output_max_diff']}"
