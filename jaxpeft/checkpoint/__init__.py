"""Adapter-only training checkpoints with orbax, for any method: adapters, trained extras, optimizer state, config.

This is the only jaxpeft package that imports orbax. A checkpoint step holds up to four orbax items:

- ``adapters``: each adapter node's arrays as plain nested dicts keyed by field,
  ``{..., "q_proj": {"kernel": {"a": A, "b": B}}}`` for LoRA, ``{"vector": l}`` for IA3
  (``StandardSave``: tensorstore/OCDBT arrays, framework-neutral, no pickle);
- ``extra``: any other trained tree saved beside the adapters (a classifier head, the norms: HF's
  ``modules_to_save``), as nested dicts keyed by path entries;
- ``opt_state``: the optimizer state's array leaves, likewise;
- ``meta``: JSON with the step, the method config (``cfg.to_dict()``), each adapter's type, array shapes and
  layout, the shapes of ``extra`` and ``opt_state``, and a fingerprint of the base params (path -> shape, dtype);
  for a config that changes the base at init (PiSSA, OLoRA: ``cfg.base_adjustment``) also a fingerprint of the
  residual base the adapters are trained over (16 sampled entries of each adjusted weight, bit for bit).

The base weights never enter a checkpoint (but for those few sampled entries). Restore reads against abstract
targets: ``jax.eval_shape`` of the method's own ``init`` on the current config and params (so the restored nodes
carry the current static parts: scale, dropout, layout) with the current shardings, so a checkpoint written on one
mesh restores on another: each leaf takes its ``*_like`` leaf's sharding, else ``sharding=``, else (when the params
carry ``NamedSharding`` objects) the sharding ``jaxpeft.sharding`` derives from the base weights (the optimizer state
following the adapters), else the first local device.
Every check (config and its base adjustment, base and residual fingerprints, adapter table and each adapter's static
parts, ``*_like`` trees, on-disk array metadata) runs before any array is read on restore, and before anything is
written on save; a difference is a ``ValueError`` that names the differing fields or paths and says what to do.
PiSSA/OLoRA adapters restore only over the residual base they were trained over (``jaxpeft.init_adjusted``'s params,
checked on the sampled entries), never silently over the original weights.

Under faults and concurrent use (each point is a test in ``tests/test_checkpoint_faults.py``):

- One writer per directory: a writer holds ``jaxpeft.lock`` (pid, host, start time; created with ``O_EXCL``, held
  with ``flock``) until it closes or its process ends; a second writer gets :class:`CheckpointLockedError`, a stale
  lock (a dead pid on this host) is taken over. Read-only checkpointers take no lock. In a multi-process job only
  process 0 (orbax's primary host, which creates, renames and deletes the step directories) takes it: the job is
  one writer.
- Saves never do nothing silently and never overwrite: an existing step, or one below the latest, is an error
  naming the steps and the options; only steps off ``save_interval_steps`` return False.
- Pruning renames a step out of the listing before deleting it, so a kill never leaves a half-deleted step
  listed; an incomplete step found on opening (an older jaxpeft's interrupted pruning, a damaged copy) is
  removed by a writer, and skipped (with a warning) by a read-only checkpointer.
- A failed save raises (an ``OSError`` or ``RuntimeError`` naming the step and directory) and leaves no thread
  behind that would keep the process from exiting.
"""

from jaxpeft.checkpoint._checkpointer import AdapterCheckpointer, Restored, read_config, restore_adapters, save_adapters
from jaxpeft.checkpoint._lock import LOCK_FILE as LOCK_FILE
from jaxpeft.checkpoint._lock import CheckpointLockedError
from jaxpeft.checkpoint._meta import FORMAT as FORMAT
from jaxpeft.checkpoint._meta import READ_VERSIONS as READ_VERSIONS
from jaxpeft.checkpoint._meta import VERSION as VERSION
from jaxpeft.checkpoint._tables import fingerprint
from jaxpeft.checkpoint._targets import ShardingSpec as ShardingSpec

__all__ = [
    "AdapterCheckpointer",
    "CheckpointLockedError",
    "Restored",
    "fingerprint",
    "read_config",
    "restore_adapters",
    "save_adapters",
]
