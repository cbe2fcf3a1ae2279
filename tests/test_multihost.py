"""Two processes joined by jax.distributed on loopback train, checkpoint and restore together; one process reads it.

Each worker has 2 CPU devices (gloo collectives), so the (data=2, tp=2) mesh spans both processes. The single
process here then restores the checkpoint on its one device and replays the training as the reference.
"""

import json
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxpeft
import jaxpeft.checkpoint
import jaxpeft.nnx
from tests._multihost_common import CFG, LAYOUTS, STEPS, TX, batches, host_params, nnx_model, nnx_step, step

WORKER = Path(__file__).with_name("_multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("multihost") / "ckpt"
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(i), str(port), str(directory)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        for i in range(2)
    ]
    outs = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        assert proc.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return directory, outs


def reference():
    params = host_params()
    adapters = jaxpeft.init(CFG, params, key=jax.random.key(1), layouts=LAYOUTS)
    opt = TX.init(adapters)
    losses = []
    for ids in batches():
        adapters, opt, loss = jax.jit(step)(adapters, opt, params, ids)
        losses.append(float(loss))
    return params, adapters, opt, losses


def test_two_processes_train_like_one(run):
    _, outs = run
    _, adapters, _, losses = reference()
    for out in outs:
        assert out["processes"] == 2 and out["devices"] == 4
        np.testing.assert_allclose(out["losses"], losses, rtol=1e-5)
        for got, want in zip(out["adapters"], jax.tree.leaves(adapters), strict=True):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_checkpoint_saved_by_two_processes_restores_there_and_on_one(run):
    directory, outs = run
    assert all(out["restored_equal"] and out["restored_sharding_kept"] for out in outs)
    params, _, opt, _ = reference()
    restored = jaxpeft.checkpoint.restore_adapters(directory, CFG, params, opt_state_like=opt)
    assert restored.step == STEPS
    for got, want in zip(jax.tree.leaves(restored.adapters), outs[0]["adapters"], strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want, np.float32))


def test_two_processes_export_global_adapters_to_one_peft_directory(run):
    """Both processes call export_adapters on adapters spread over both; process 0 writes; the files hold the
    gathered adapters exactly."""
    import jaxpeft.hf

    directory, outs = run
    peft = f"{directory}-peft"
    assert [out["exported"] for out in outs] == [str(Path(peft).resolve())] * 2
    params, _, _, _ = reference()
    _, imported = jaxpeft.hf.import_adapters(peft, params, lambda p: p.replace("/", "."), layouts=LAYOUTS)
    for got, want in zip(jax.tree.leaves(imported), outs[0]["adapters"], strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want, np.float32))


def test_two_processes_train_an_nnx_model_like_the_linen_one(run):
    """The NNX copy of the model, adapted with jaxpeft.nnx.adapt on the two-process mesh (the adapters of
    jaxpeft.sharding.init with the same key, placed alike), trains through nnx.jit and jaxpeft.nnx.optimizer to
    the Linen run's losses and adapters, and to those of a single-process NNX run."""
    _, outs = run
    params = host_params()
    model = jaxpeft.nnx.adapt(nnx_model(params), CFG, key=jax.random.key(1))
    opt = jaxpeft.nnx.optimizer(model, TX)
    losses = [float(nnx_step(model, opt, ids)) for ids in batches()]
    for out in outs:
        r = out["nnx"]
        assert r["init_equal_linen"], "nnx.adapt on the mesh gave other adapters than jaxpeft.sharding.init"
        assert r["placed_like_linen"] and r["sharding_kept"], "NNX adapters not placed like the Linen ones"
        np.testing.assert_allclose(r["losses"], out["losses"], rtol=1e-5)
        np.testing.assert_allclose(r["losses"], losses, rtol=1e-5)
        for got, linen, here in zip(
            r["adapters"], out["adapters"], jax.tree.leaves(jaxpeft.nnx.adapters_of(model)), strict=True
        ):
            np.testing.assert_allclose(np.asarray(got), np.asarray(linen), atol=1e-5)
            np.testing.assert_allclose(np.asarray(got), np.asarray(here), atol=1e-5)


def test_two_processes_train_qlora_over_a_sharded_nf4_base_like_one(run):
    """An NF4 base placed by base_specs across both processes (codes and scales sharded along tp) trains like one
    process over the same quantised params, and its checkpoint restores with the adapters' shardings."""
    _, outs = run
    qparams = jaxpeft.quantize(host_params(), CFG, kind="nf4", layouts=LAYOUTS)
    adapters = jaxpeft.init(CFG, qparams, key=jax.random.key(1), layouts=LAYOUTS)
    opt, losses = TX.init(adapters), []
    for ids in batches():
        adapters, opt, loss = jax.jit(step)(adapters, opt, qparams, ids)
        losses.append(float(loss))
    for out in outs:
        nf4 = out["nf4"]
        assert nf4["codes_sharded"] and nf4["restored_sharding_kept"]
        np.testing.assert_allclose(nf4["losses"], losses, rtol=1e-5)
        for got, want in zip(nf4["adapters"], jax.tree.leaves(adapters), strict=True):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
