"""Subprocess side of tests/test_adapter_set_faults.py: a set save or export killed (``SIGKILL``) at a chosen point.

Run as ``python tests/_set_worker.py MODE DIRECTORY KILL_AT``. Modes:

- ``save-kill``: commit steps 1 and 2 of the set (every value ``step * 100 + member``), then save step 3 and
  ``kill -9`` itself at point ``KILL_AT`` of it: ``member-K`` after K members are written, ``commit`` just as the
  index would be written.
- ``export-kill``: export the set with values of step 1, then export step 2's values and ``kill -9`` itself after
  ``KILL_AT`` file moves of the swap (``commit``: just as the index would be written).
"""

from __future__ import annotations

import os
import signal
import sys

import jax
import numpy as np

import jaxpeft
from jaxpeft import adapter_sets

NAMES = ("m0", "m1", "m2")
CFG = jaxpeft.LoraConfig(rank=2, alpha=4, targets=["hid", "out"])


def params():
    rng = np.random.default_rng(0)
    return {
        "hid": {"kernel": rng.standard_normal((6, 7)).astype(np.float32), "bias": np.zeros(7, np.float32)},
        "out": {"kernel": rng.standard_normal((7, 5)).astype(np.float32), "bias": np.zeros(5, np.float32)},
    }


def named(step: int) -> dict:
    """The set of ``step``: member k's every adapter element is ``step * 100 + k``."""
    fresh = jaxpeft.init(CFG, params(), key=jax.random.key(0))
    fill = {n: step * 100.0 + k for k, n in enumerate(NAMES)}
    return {n: jax.tree.map(lambda x, v=v: np.full(x.shape, v, x.dtype), fresh) for n, v in fill.items()}


def values(tree: dict) -> dict:
    """``{name: the one value of its elements}`` (a set from one step has one value per member)."""
    out = {}
    for name, adapters in tree.items():
        seen = {float(v) for leaf in jax.tree.leaves(adapters) for v in np.unique(np.asarray(leaf))}
        assert len(seen) == 1, seen
        out[name] = seen.pop()
    return out


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def save_kill(directory: str, kill_at: str) -> None:
    for step in (1, 2):
        adapter_sets.save_adapter_set(directory, named(step), CFG, params(), step=step)
    if kill_at == "commit":
        adapter_sets._write_index = lambda *a: _die()
    else:
        from jaxpeft.checkpoint import AdapterCheckpointer

        real, left = AdapterCheckpointer.save, [int(kill_at.split("-")[1])]

        def save(self, *args, **kwargs):
            if not left[0]:
                _die()
            left[0] -= 1
            return real(self, *args, **kwargs)

        AdapterCheckpointer.save = save
    adapter_sets.save_adapter_set(directory, named(3), CFG, params(), step=3)
    print("NOT KILLED", flush=True)


def export_kill(directory: str, kill_at: str) -> None:
    adapter_sets.export_adapter_set(directory, named(1), CFG, params(), lambda m: m)
    if kill_at == "commit":
        adapter_sets._write_index = lambda *a: _die()
    else:
        real, left = adapter_sets._move, [int(kill_at)]

        def move(src, dst):
            if not left[0]:
                _die()
            left[0] -= 1
            return real(src, dst)

        adapter_sets._move = move
    adapter_sets.export_adapter_set(directory, named(2), CFG, params(), lambda m: m)
    print("NOT KILLED", flush=True)


if __name__ == "__main__":
    mode, directory, kill_at = sys.argv[1:]
    {"save-kill": save_kill, "export-kill": export_kill}[mode](directory, kill_at)
