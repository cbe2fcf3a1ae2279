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
from tests._multihost_common import CFG, LAYOUTS, STEPS, TX, batches, host_params, step

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
