"""Subprocess side of tests/test_checkpoint_faults.py: a second writer, a kill during pruning, a failing save.

Run as ``python tests/_ckpt_faults_worker.py MODE DIRECTORY [ARGS]``. The worker compiles nothing: its params are
``jax.eval_shape`` of the model's init and its adapters are filled with ``np.full``. Modes:

- ``writer RUN GO``: print ``READY``, wait until the file ``GO`` exists, then open ``DIRECTORY`` as a writer and
  save steps 1..6 whose every adapter value is ``RUN * 100 + step``; print ``SAVED`` or ``LOCKED <message>``;
- ``prune-kill``: save steps 1, 2, 3 with ``max_to_keep=2`` and block inside the first file deletion of the
  pruning of step 1, after writing ``DIRECTORY/../IN_DELETE``, until the test kills it (``kill -9``);
- ``save-fail``: save step 0, then make the writes of step 1 fail twice: the directory refuses new entries (as a
  read-only one would; root ignores ``chmod``, so ``os.mkdir`` is refused instead), then the final rename of the
  step fails in the background; print ``FAILED <kind> <error>`` for each and ``STEPS <list>``, save step 1 for
  real and print ``STEPS <list>`` again, then ``DONE <time>`` just before the interpreter starts exiting,
  without closing the checkpointer (the test measures how long the exit takes);
- ``read-damaged``: save steps 1 and 2, delete the array data files of step 1, restore it and print ``ERROR
  <type>: <message>``, then restore the latest step and print ``LATEST <step> <values>`` (in a subprocess because
  orbax, after tensorstore's failed read, reports "Event loop is closed" from its threads at unpredictable times).
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time

import jax
import numpy as np
from _ckpt_worker import abstract_state, build

import jaxpeft.checkpoint as ckpt_lib


@functools.cache
def _abstract():
    model, params, cfg, x, tx = build(abstract=True)
    return params, cfg, abstract_state(model, params, cfg, x, tx)[0]


def filled(value: float):
    """``(params, cfg, adapters)`` of ``build()``: abstract params, adapters with every element ``value``."""
    params, cfg, adapters = _abstract()
    return params, cfg, jax.tree.map(lambda s: np.full(s.shape, value, s.dtype), adapters)


def writer(directory: str, run: int, go: str) -> None:
    params, cfg, _ = filled(0.0)
    print("READY", flush=True)
    while not os.path.exists(go):
        time.sleep(0.005)
    try:
        ckpt = ckpt_lib.AdapterCheckpointer(directory, cfg, params, max_to_keep=None, async_save=False)
    except ckpt_lib.CheckpointLockedError as err:
        print(f"LOCKED {err}", flush=True)
        return
    with ckpt:
        for step in range(1, 7):
            ckpt.save(step, filled(run * 100.0 + step)[2])
    print("SAVED", flush=True)


def prune_kill(directory: str) -> None:
    params, cfg, _ = filled(0.0)
    real_unlink = os.unlink
    first = threading.Lock()

    def stuck_unlink(path, *args, **kwargs):  # the first deletion happens, then every deletion blocks
        if os.fspath(path).endswith(getattr(ckpt_lib, "LOCK_FILE", "jaxpeft.lock")):
            return real_unlink(path, *args, **kwargs)
        if first.acquire(blocking=False):
            real_unlink(path, *args, **kwargs)
            with open(os.path.join(os.path.dirname(directory), "IN_DELETE"), "w") as f:
                f.write(str(os.getpid()))
        while True:
            time.sleep(1)

    with ckpt_lib.AdapterCheckpointer(directory, cfg, params, max_to_keep=2, async_save=False) as ckpt:
        for step in (1, 2):
            ckpt.save(step, filled(float(step))[2])
        os.unlink = stuck_unlink
        ckpt.save(3, filled(3.0)[2])
        ckpt.wait()
    raise SystemExit("the pruning of step 1 never deleted a file")


def save_fail(directory: str) -> None:
    params, cfg, adapters = filled(1.0)
    ckpt = ckpt_lib.AdapterCheckpointer(directory, cfg, params, async_save=True)
    ckpt.save(0, adapters)
    ckpt.wait()
    inside = os.path.abspath(directory) + os.sep

    def refuse(real):
        def patched(path, *args, **kwargs):
            if os.path.abspath(os.fspath(path)).startswith(inside):
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return real(path, *args, **kwargs)

        return patched

    for kind, name in (("mkdir", "mkdir"), ("rename", "rename")):
        real = getattr(os, name)
        setattr(os, name, refuse(real))
        try:
            ckpt.save(1, adapters)
            ckpt.wait()
            print(f"NOT FAILED {kind}", flush=True)
        except Exception as err:
            print(f"FAILED {kind} {type(err).__name__}: {err}", flush=True)
        finally:
            setattr(os, name, real)
    print(f"STEPS {ckpt.all_steps()}", flush=True)
    ckpt.save(1, adapters)  # the checkpointer stays usable
    ckpt.wait()
    print(f"STEPS {ckpt.all_steps()}", flush=True)
    print(f"DONE {time.time()}", flush=True)  # no close(): the process must still exit promptly


def read_damaged(directory: str) -> None:
    params, cfg, _ = filled(0.0)
    with ckpt_lib.AdapterCheckpointer(directory, cfg, params, async_save=False) as ckpt:
        for step in (1, 2):
            ckpt.save(step, filled(float(step))[2])
    data = os.path.join(directory, "1", "adapters", "d")
    for name in os.listdir(data):
        os.remove(os.path.join(data, name))
    try:
        ckpt_lib.restore_adapters(directory, cfg, params, step=1)
        print("ERROR none", flush=True)
    except Exception as err:
        print(f"ERROR {type(err).__name__}: {err}", flush=True)
    latest = ckpt_lib.restore_adapters(directory, cfg, params)
    values = sorted({float(v) for leaf in jax.tree.leaves(latest.adapters) for v in np.unique(np.asarray(leaf))})
    print(f"LATEST {latest.step} {values}", flush=True)


def main(mode: str, directory: str, *args: str) -> None:
    if mode == "writer":
        writer(directory, int(args[0]), args[1])
    elif mode == "prune-kill":
        prune_kill(directory)
    elif mode == "save-fail":
        save_fail(directory)
    elif mode == "read-damaged":
        read_damaged(directory)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(*sys.argv[1:])
