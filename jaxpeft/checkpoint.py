"""Adapter-only training checkpoints with orbax, for any method: adapters, trained extras, optimizer state, config.

This is the only jaxpeft module that imports orbax. A checkpoint step holds up to four orbax items:

- ``adapters``: each adapter node's arrays as plain nested dicts keyed by field,
  ``{..., "q_proj": {"kernel": {"a": A, "b": B}}}`` for LoRA, ``{"vector": l}`` for IA3
  (``StandardSave``: tensorstore/OCDBT arrays, framework-neutral, no pickle);
- ``extra``: any other trained tree saved beside the adapters (a classifier head, the norms: HF's
  ``modules_to_save``), as nested dicts keyed by path entries;
- ``opt_state``: the optimizer state's array leaves, likewise;
- ``meta``: JSON with the step, the method config (``cfg.to_dict()``), each adapter's type, array shapes and
  layout, the shapes of ``extra`` and ``opt_state``, and a fingerprint of the base params (path -> shape, dtype).

The base weights never enter a checkpoint. Restore reads against abstract targets: ``jax.eval_shape`` of the
method's own ``init`` on the current config and params (so the restored nodes carry the current static parts:
scale, dropout, layout) with the current shardings, so a checkpoint written on one mesh restores on another.
Every check (config, base fingerprint, adapter table and each adapter's static parts, ``*_like`` trees, on-disk
array metadata) runs before any array is read on restore, and before anything is written on save; a difference is
a ``ValueError`` that names the differing fields or paths and says what to do.

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

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import errno
import hashlib
import json
import math
import operator
import os
import re
import shutil
import socket
import uuid
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: the lock relies on its record (pid, host) alone
    fcntl = None  # type: ignore[assignment]

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxpeft._paths import leaves_with_paths, map_with_paths, set_path
from jaxpeft._select import Layout
from jaxpeft.methods.base import MethodConfig, adapter_items, config_from_dict, layouts_of
from jaxpeft.methods.base import init as method_init

__all__ = [
    "AdapterCheckpointer",
    "CheckpointLockedError",
    "Restored",
    "fingerprint",
    "read_config",
    "restore_adapters",
    "save_adapters",
]

FORMAT = "jaxpeft.adapter_checkpoint"
#: The format version written; version 3 added each adapter's static parts (``static``) to the metadata.
VERSION = 3
#: The format versions read (version 2 lacks the static parts: they are not compared).
READ_VERSIONS = (2, 3)
#: The lock file a writer holds in its checkpoint directory.
LOCK_FILE = "jaxpeft.lock"
#: Where pruned steps are renamed before they are deleted (orbax's ``todelete_subdir``; not a step name).
_TRASH = ".jaxpeft-deleting"
_STEP_NAME = re.compile(r"[0-9]+")
_ADAPTERS, _EXTRA, _OPT, _META = "adapters", "extra", "opt_state", "meta"
#: How to restore an optional item that a step holds (for the error when neither a target nor ``skip`` is given).
_HOW = {
    _OPT: "opt_state_like=jax.eval_shape(tx.init, trainable) (the same optimizer over the same trees, e.g. "
    "`adapters` or `(adapters, extra)`)",
    _EXTRA: "extra_like=<the tree you saved as `extra`, or its jax.eval_shape>",
}
_MAX_LISTED = 8

ShardingSpec = jax.sharding.Sharding | Callable[[str, jax.ShapeDtypeStruct], jax.sharding.Sharding] | None


class CheckpointLockedError(RuntimeError):
    """Another writer holds the checkpoint directory, or this writer lost its lock; the message names the owner."""


@dataclasses.dataclass(frozen=True)
class Restored:
    """What a restore returns.

    Attributes:
      step: the restored step.
      adapters: the adapter tree (nodes with the current config's static parts: scale, dropout, layout).
      opt_state: the optimizer state in the structure of ``opt_state_like``; None when the step holds none or
        it was skipped.
      config: the config the checkpoint was saved with (same method class as the current one; fields in
        ``restore_free``, such as LoRA's dropout, may differ from the current config's).
      extra: the extra trained tree in the structure of ``extra_like``; None when the step holds none or it was
        skipped.
    """

    step: int
    adapters: dict[str, Any]
    opt_state: Any
    config: MethodConfig
    extra: Any = None


# ------------------------------------------------------------------------------------------------ tables


def _absolute(directory: str | os.PathLike[str]) -> str:
    text = os.fspath(directory)
    return text if "://" in text else os.path.abspath(os.path.expanduser(text))


def _shape_dtype(leaf: Any) -> list[Any]:
    """``[shape, dtype name]`` of an array or ``ShapeDtypeStruct`` (JSON-ready, compares equal to its JSON)."""
    return [[int(d) for d in leaf.shape], jnp.dtype(leaf.dtype).name]


def _shape_table(flat: Mapping[str, Any]) -> dict[str, list[Any]]:
    return {path: _shape_dtype(leaf) for path, leaf in sorted(flat.items())}


def _digest(table: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()


def fingerprint(params: Any) -> dict[str, Any]:
    """The base-model fingerprint stored in every checkpoint: ``{"digest": sha256, "params": {path: [shape, dtype]}}``.

    Only paths, shapes and dtypes enter it, never values; ``params`` may be abstract (``jax.ShapeDtypeStruct``).
    """
    table = _shape_table(dict(leaves_with_paths(params)))
    return {"digest": _digest(table), "params": table}


def _nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        tree = set_path(tree, path, value)
    return tree


def _jsonable(value: Any) -> Any:
    """A static field's value as JSON that reads back equal (tuples become lists, non-finite floats strings)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(value):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}"
    return repr(value)


def _statics(node: Any) -> dict[str, Any]:
    """The node's non-array dataclass fields but ``layout`` (scale, dropout, ...), JSON-encoded."""
    if not dataclasses.is_dataclass(node):
        return {}
    arrays = {path.split("/")[0] for path, _ in leaves_with_paths(node)}
    return {
        f.name: _jsonable(getattr(node, f.name))
        for f in dataclasses.fields(node)
        if f.name not in arrays and f.name != "layout"
    }


def _node_table(adapters: Any) -> dict[str, dict[str, Any]]:
    """``{path: {"type", "arrays": {field: [shape, dtype]}, "layout", "static"}}`` of an (abstract or concrete)
    adapter tree."""
    table = {}
    for path, node in sorted(adapter_items(adapters)):
        lay = node.layout
        table[path] = {
            "type": type(node).__name__,
            "arrays": _shape_table(dict(leaves_with_paths(node))),
            "layout": {"stack": lay.stack, "fan_in": lay.fan_in, "fan_out": lay.fan_out, "kind": lay.kind},
            "static": _statics(node),
        }
    return table


def _split_statics(
    saved: Mapping[str, Any], current: Mapping[str, Any], free: Sequence[str]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``(saved, current)`` node tables without their static parts, then the static parts alone (``{path:
    {field: value}}``) less the ``free`` fields; an entry saved without static parts (format version 2) compares
    none."""

    def shape(table: Mapping[str, Any]) -> dict[str, Any]:
        return {p: {k: v for k, v in e.items() if k != "static"} for p, e in table.items()}

    def statics(table: Mapping[str, Any], other: Mapping[str, Any]) -> dict[str, Any]:
        return {
            p: {f" {k}": v for k, v in e["static"].items() if k not in free}  # labels as in _diff_table
            for p, e in table.items()
            if "static" in e and "static" in other.get(p, {"static": None})
        }

    return shape(saved), shape(current), statics(saved, current), statics(current, saved)


def _array_leaves(tree: Any, what: str, *, abstract: bool = False) -> dict[str, Any]:
    """``{path: array}`` of a tree to save (or, with ``abstract``, to restore into: ``ShapeDtypeStruct`` leaves
    too); Python numbers become numpy scalars. Raises on any other leaf and on paths that collide."""
    leaves = leaves_with_paths(tree)
    flat: dict[str, Any] = {}
    for path, leaf in leaves:
        if isinstance(leaf, (int, float, bool, np.number)):
            leaf = np.asarray(leaf)
        concrete_only = isinstance(leaf, jax.ShapeDtypeStruct) and not abstract
        if concrete_only or not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise ValueError(f"`{what}` leaf {path!r} is a {type(leaf).__name__}; only arrays can be checkpointed.")
        flat[path] = leaf
    counts = collections.Counter(p for p, _ in leaves)
    clashes = sorted({p for p, n in counts.items() if n > 1} | {q for p in flat for q in _prefixes(p) if q in flat})
    if clashes:
        raise ValueError(
            f"`{what}` has leaves whose paths collide once their keys are joined with '/': {clashes[:_MAX_LISTED]}; "
            "use keys without '/'."
        )
    return flat


def _prefixes(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


# ------------------------------------------------------------------------------------------------ messages


def _listed(lines: list[str]) -> str:
    shown = "; ".join(lines[:_MAX_LISTED])
    return shown + (f"; and {len(lines) - _MAX_LISTED} more" if len(lines) > _MAX_LISTED else "")


def _show(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, list) and len(value) == 2 and isinstance(value[1], str):
        return f"{tuple(value[0])} {value[1]}"  # [shape, dtype]
    if isinstance(value, Mapping) and "stack" in value:  # a layout
        return "Layout(" + ", ".join(f"{k}={v!r}" for k, v in value.items()) + ")"
    return str(tuple(value)) if isinstance(value, list) else str(value)


def _aspects(entry: Any) -> Any:
    """A node-table entry as ``{label: value}`` (``" type"``, ``".a"``, ``" layout"``); other entries unchanged."""
    if not isinstance(entry, Mapping) or "arrays" not in entry:
        return entry
    return {" type": entry["type"], **{f".{k}": v for k, v in entry["arrays"].items()}, " layout": entry["layout"]}


def _diff_table(
    saved: Mapping[str, Any], current: Mapping[str, Any], what: str, left: str = "checkpoint", right: str = "now"
) -> list[str]:
    """Lines naming each path whose entry differs between two ``{path: entry}`` tables.

    Adapter-node entries are compared aspect by aspect, so a line names only what differs, e.g.
    ``'inp/kernel'.a: checkpoint (8, 2) float32, now (6, 2) float32`` or ``'inp/kernel' type: ...``.
    """
    lines = [f"{p!r} missing {right} ({what})" for p in sorted(set(saved) - set(current))]
    lines += [f"{p!r} not in {left} ({what})" for p in sorted(set(current) - set(saved))]
    for p in sorted(set(saved) & set(current)):
        old, new = _aspects(saved[p]), _aspects(current[p])
        if old == new:
            continue
        if not isinstance(old, Mapping) or not isinstance(new, Mapping):
            lines.append(f"{p!r}: {left} {_show(old)}, {right} {_show(new)}")
            continue
        labels = [*old, *(k for k in new if k not in old)]
        lines += [
            f"{p!r}{k}: {left} {_show(old.get(k))}, {right} {_show(new.get(k))}"
            for k in labels
            if old.get(k) != new.get(k)
        ]
    return lines


def _config_diff(cfg: MethodConfig, saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    keys = sorted((set(saved) | set(current)) - set(cfg.restore_free))
    return [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


# ------------------------------------------------------------------------------------------------ restore targets


def _target(path: str, leaf: Any, like: Any, sharding: ShardingSpec) -> jax.ShapeDtypeStruct:
    """The sharded abstract target of one array: ``like``'s sharding, else ``sharding``, else the first device."""
    plain = jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype)
    found = getattr(like, "sharding", None)
    if found is None:
        if sharding is None:
            found = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        elif isinstance(sharding, jax.sharding.Sharding):
            found = sharding
        else:
            found = sharding(path, plain)
    return jax.ShapeDtypeStruct(plain.shape, plain.dtype, sharding=found)


@dataclasses.dataclass(frozen=True)
class _Target:
    """How one item is restored: the sharded abstract array per path, and a tree of the structure to rebuild."""

    arrays: dict[str, jax.ShapeDtypeStruct]
    like: Any

    def rebuild(self, restored: Any, item: str, step: int) -> Any:
        """``like`` filled with the restored arrays; raises if any leaf would stay missing or abstract."""
        found = dict(leaves_with_paths(restored))
        missing = sorted(set(self.arrays) - set(found))
        abstract = sorted(p for p, x in found.items() if not isinstance(x, jax.Array))
        if missing or abstract:
            raise ValueError(
                f"restoring step {step} would leave {item} leaves unfilled: missing {missing[:_MAX_LISTED]}, "
                f"abstract {abstract[:_MAX_LISTED]}; the checkpoint is incomplete."
            )
        return map_with_paths(lambda path, _: found[path], self.like)


def _aux_target(item: str, like: Any, saved: Mapping[str, Any] | None, where: str, sharding: ShardingSpec) -> _Target:
    """The target of an optional item (``opt_state``, ``extra``) from its ``*_like`` tree, checked against ``saved``."""
    if saved is None:
        raise ValueError(f"{where} has no `{item}` (it was saved without one); pass {item}_like=None.")
    flat = _array_leaves(like, f"{item}_like", abstract=True)
    diff = _diff_table(saved, _shape_table(flat), f"{item} leaf", right=f"in `{item}_like`")
    if diff:
        raise ValueError(
            f"`{item}_like` does not match the `{item}` saved in {where}: {_listed(diff)}. Pass {_HOW[item]}."
        )
    return _Target({p: _target(p, x, x, sharding) for p, x in flat.items()}, like)


def _check_skip(skip: Sequence[str], likes: Mapping[str, Any]) -> None:
    if isinstance(skip, str):
        raise ValueError(f"`skip`={skip!r} is a string; pass a tuple of item names, e.g. skip=({skip!r},).")
    unknown = sorted(set(skip) - set(likes))
    if unknown:
        raise ValueError(f"`skip`={tuple(skip)!r}: unknown items {unknown}; expected 'opt_state' and/or 'extra'.")
    both = [item for item in skip if likes[item] is not None]
    if both:
        raise ValueError(f"`skip` names {both[0]!r} but `{both[0]}_like` is given too; pass one or the other.")


# ------------------------------------------------------------------------------------------------ steps


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_step(step: Any) -> int:
    """``step`` as a non-negative int (Python, numpy or 0-d integer JAX scalar); bools and floats are refused."""
    if isinstance(step, (bool, np.bool_)) or getattr(step, "dtype", None) == np.bool_:
        raise TypeError(f"`step`={step!r} is a bool; expected a non-negative integer step number.")
    try:
        number = operator.index(step)
    except TypeError:
        raise TypeError(
            f"`step`={step!r} is a {type(step).__name__}; expected a non-negative integer step number (an int, "
            "not a float: 2.7 would silently become step 2)."
        ) from None
    if number < 0:
        raise ValueError(f"`step`={number}; expected a non-negative integer step number.")
    return number


def _resolve_step(steps: Sequence[int], incomplete: Mapping[int, str], directory: str, step: Any) -> int:
    """``step`` checked against the complete ``steps``, or the latest of them when ``step`` is None."""
    if step is None:
        if not steps:
            skipped = f" (incomplete steps skipped: {_incomplete_list(incomplete)})" if incomplete else ""
            raise FileNotFoundError(f"no complete checkpoint in {directory!r}{skipped}.")
        return steps[-1]
    step = _check_step(step)
    if step in incomplete:
        raise FileNotFoundError(
            f"step {step} in {directory!r} is incomplete ({incomplete[step]}); complete steps are {list(steps)}."
        )
    if step not in steps:
        raise FileNotFoundError(f"`step`={step!r} is not in {directory!r}; complete steps are {list(steps)}.")
    return step


def _incomplete_list(incomplete: Mapping[int, str]) -> str:
    return _listed([f"step {s}: {why}" for s, why in sorted(incomplete.items())])


# ------------------------------------------------------------------------------------------------ the writer lock


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started, in the kernel's clock ticks (Linux), to tell a reused pid from the owner."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate it: assume alive (the lock is then never stale)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _same_file(fd: int, path: str) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (not removed, not replaced)."""
    try:
        named, held = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _flock(fd: int) -> bool | None:
    """Take the kernel lock of ``fd``: True; None if another process holds it; False if unsupported here."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return None
    except OSError as err:
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return False
        raise
    return True


def _read_record(fd: int) -> dict[str, Any] | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 1 << 16).decode(errors="replace")
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    return record if isinstance(record, dict) else {"unreadable": text[:80]}


def _release(fd: int, path: str) -> None:
    try:
        if _same_file(fd, path):
            os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)  # releases the flock


class _Lock:
    """The one-writer lock of a checkpoint directory: ``jaxpeft.lock`` records the owner (pid, host, start time),
    is created with ``O_EXCL`` and held with ``flock`` while its owner lives, and is removed when it closes.

    A lock is stale, and taken over, when its owner is a dead process on this host (or a reused pid: the process
    start time differs). The kernel lock makes the take-over atomic: of two processes that find the same stale
    lock, one gets it. A lock from another host is never taken over (its process cannot be seen from here).
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, LOCK_FILE)
        self.record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "process_start": _process_start(os.getpid()),
            "token": uuid.uuid4().hex,
        }
        self._fd = self._acquire()
        self._finalizer = weakref.finalize(self, _release, self._fd, self.path)

    def _acquire(self) -> int:
        while True:
            try:
                fd, created = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                try:
                    fd, created = os.open(self.path, os.O_RDWR), False
                except FileNotFoundError:  # released meanwhile
                    continue
            try:
                if self._take(fd, created):
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # the file was released and replaced meanwhile: try the new one

    def _take(self, fd: int, created: bool) -> bool:
        kernel = _flock(fd)
        if kernel is None:
            raise CheckpointLockedError(self._held(_read_record(fd)))
        if not _same_file(fd, self.path):
            return False
        owner = _read_record(fd)
        free = (kernel or created) if owner is None else self._stale(owner, kernel)
        if not free:
            raise CheckpointLockedError(self._held(owner))
        data = json.dumps(self.record).encode()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, data)
        os.fsync(fd)
        return True

    @staticmethod
    def _stale(owner: Mapping[str, Any], kernel: bool) -> bool:
        if owner.get("host") != socket.gethostname():
            return False
        pid = owner.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or pid == os.getpid():
            return kernel  # ours or unknown: only the kernel lock tells whether it is still held
        if not _alive(pid):
            return True
        started, now = owner.get("process_start"), _process_start(pid)
        return started is not None and now is not None and started != now  # the pid was reused

    def _held(self, owner: Mapping[str, Any] | None) -> str:
        pid, here = (owner or {}).get("pid"), (owner or {}).get("host") == socket.gethostname()
        if owner is None:
            who = "a writer that is just starting"
        elif pid == os.getpid() and here:
            who = f"another AdapterCheckpointer of this process (pid {pid}); close it first"
        elif "unreadable" in owner:
            who = f"an unknown owner (the lock file holds {owner['unreadable']!r})"
        else:
            who = f"pid {pid!r} on host {owner.get('host')!r} since {owner.get('started')!r}"
            if here and isinstance(pid, int) and pid > 0 and not _alive(pid):
                who += " (not running: another writer is taking the lock over)"
        return (
            f"checkpoint directory {self.directory!r} is in use by another writer: {who} (lock file {self.path}). "
            "A directory takes one writer, so that no step mixes two runs: save into another directory, wait for "
            "that job to end, or open this one with read_only=True to restore beside it. If that process is gone "
            "(e.g. it ran on another host), delete the lock file."
        )

    def check(self) -> None:
        """Raise when the lock file was removed or replaced since it was taken (another writer may hold it)."""
        if not _same_file(self._fd, self.path):
            raise CheckpointLockedError(
                f"this AdapterCheckpointer lost its lock on {self.directory!r}: the lock file {self.path} was removed "
                "or replaced (or the directory itself) since it was opened, and another writer may be using the "
                "directory now. Nothing was saved; close this checkpointer and open the directory again."
            )

    def release(self) -> None:
        self._finalizer()


# ------------------------------------------------------------------------------------------------ step directories


def _step_problem(path: str) -> tuple[str, str] | None:
    """``("incomplete" | "foreign", why)`` for a step directory that cannot be restored as a jaxpeft step
    because files are missing or it is another program's; None when complete (or malformed: reported on use)."""
    meta_file = os.path.join(path, _META, "metadata")
    if not os.path.isfile(meta_file):
        ours = any(os.path.isdir(os.path.join(path, item)) for item in (_META, _ADAPTERS))
        if ours or not any(files for _, _, files in os.walk(path)):
            return "incomplete", "meta/metadata is missing"
        return "foreign", f"it holds {sorted(os.listdir(path))[:_MAX_LISTED]} and no jaxpeft metadata"
    try:
        with open(meta_file, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return "foreign", "its metadata is not a jaxpeft adapter checkpoint's"
    if _meta_problem(meta, None) is not None:
        return None
    for item in (_ADAPTERS, _OPT, _EXTRA):
        if meta[item] and not os.path.isfile(os.path.join(path, item, "_METADATA")):
            return "incomplete", f"{item}/_METADATA is missing"
    return None


def _scan_steps(directory: str) -> tuple[dict[int, tuple[str, str]], dict[int, str]]:
    """``({step: (directory name, why incomplete)}, {step: why foreign})`` over the step directories of a local
    checkpoint directory (a remote one is not scanned)."""
    incomplete: dict[int, tuple[str, str]] = {}
    foreign: dict[int, str] = {}
    if "://" in directory or not os.path.isdir(directory):
        return incomplete, foreign
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if not _STEP_NAME.fullmatch(name) or not os.path.isdir(path):
            continue
        try:
            problem = _step_problem(path)
        except FileNotFoundError:  # removed meanwhile (a writer's pruning)
            continue
        if problem is not None and problem[0] == "incomplete":
            incomplete[int(name)] = (name, problem[1])
        elif problem is not None:
            foreign[int(name)] = problem[1]
    return incomplete, foreign


def _empty_trash(directory: str, *, remove: bool = False) -> None:
    """Delete the pruned steps renamed into the trash (none of them is listed any more)."""
    trash = os.path.join(directory, _TRASH)
    try:
        entries = os.listdir(trash)
    except OSError:
        return
    for entry in entries:
        shutil.rmtree(os.path.join(trash, entry), ignore_errors=True)
    if remove:
        with contextlib.suppress(OSError):
            os.rmdir(trash)


def _discard(directory: str, names: Sequence[str]) -> None:
    """Rename step directories out of the listing (atomic), then delete them."""
    trash = os.path.join(directory, _TRASH)
    os.makedirs(trash, exist_ok=True)
    for name in names:
        os.rename(os.path.join(directory, name), os.path.join(trash, f"{name}.{uuid.uuid4().hex[:8]}"))
    _empty_trash(directory)


# ------------------------------------------------------------------------------------------------ metadata


def _clip(err: BaseException, limit: int = 300) -> str:
    """A dependency's error message, cut (tensorstore's hold whole specs)."""
    text = str(err)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_shape_dtype(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], list)
        and all(_is_int(d) and d >= 0 for d in value[0])
        and isinstance(value[1], str)
    )


def _table_problem(table: Any, name: str) -> str | None:
    if not isinstance(table, dict):
        return f"`{name}` is {_short(table)}, expected an object {{path: [shape, dtype]}}"
    for path, value in table.items():
        if not _is_shape_dtype(value):
            return f"`{name}`[{path!r}] is {_short(value)}, expected [shape, dtype] such as [[8, 2], 'float32']"
    return None


def _entry_problem(entry: Any, version: Any) -> str | None:
    """Why an ``adapters`` entry of the metadata is malformed, or None."""
    if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
        return f"is {_short(entry)}, expected an object with the node `type`, `arrays`, `layout`"
    problem = _table_problem(entry.get("arrays"), "arrays")
    if problem is not None:
        return problem
    layout = entry.get("layout")
    fields = ("stack", "fan_in", "fan_out", "kind")
    if not isinstance(layout, dict) or set(layout) != set(fields):
        return f"`layout` is {_short(layout)}, expected an object with {list(fields)}"
    try:
        Layout(**layout)
    except (TypeError, ValueError) as err:
        return f"`layout` is {_short(layout)}: {err}"
    if version != 2 and not isinstance(entry.get("static"), dict):
        return f"`static` is {_short(entry.get('static'))}, expected an object {{field: value}}"
    return None


def _meta_problem(meta: dict[str, Any], step: int | None) -> str | None:
    """Why the metadata of a jaxpeft step (``format`` already checked) is malformed, or None."""
    version = meta.get("version")
    if not _is_int(version) or version not in READ_VERSIONS:
        return f"`version` is {_short(version)}"
    if not _is_int(meta.get("step")) or (step is not None and meta["step"] != step):
        return f"`step` is {_short(meta.get('step'))}, expected {step if step is not None else 'an integer'}"
    config = meta.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("method"), str):
        return f"`config` is {_short(config)}, expected an object with a `method` name"
    adapters = meta.get("adapters")
    if not isinstance(adapters, dict) or not adapters:
        return f"`adapters` is {_short(adapters)}, expected a non-empty object {{path: adapter entry}}"
    for path, entry in adapters.items():
        problem = _entry_problem(entry, version)
        if problem is not None:
            return f"`adapters`[{path!r}] {problem}"
    base = meta.get("base", "missing")
    if not isinstance(base, dict) or not isinstance(base.get("digest"), str):
        shown = "missing" if base == "missing" else _short(base)
        return f'`base` is {shown}, expected {{"digest": sha256, "params": {{path: [shape, dtype]}}}}'
    problem = _table_problem(base.get("params"), "base.params")
    if problem is not None:
        return problem
    if _digest(base["params"]) != base["digest"]:
        return (
            "`base.digest` is not the sha256 of `base.params` although that table of paths, shapes and dtypes is "
            "well formed (one of the two was edited)"
        )
    for item in (_OPT, _EXTRA):
        if item not in meta:
            return f"`{item}` is missing, expected null or an object {{path: [shape, dtype]}}"
        if meta[item] is not None:
            problem = _table_problem(meta[item], item)
            if problem is not None:
                return problem
    return None


def _meta_file(directory: str, step: int) -> str:
    return os.path.join(directory, str(step), _META, "metadata")


def _read_meta(manager: ocp.CheckpointManager, directory: str, step: int) -> dict[str, Any]:
    """The checked metadata of ``step``; a ``ValueError`` names the file, what is wrong and what to do."""
    where = f"checkpoint step {step} in {directory!r}"
    path = _meta_file(directory, step)
    local = "://" not in directory
    if local and not os.path.isfile(path):
        found = sorted(os.listdir(os.path.dirname(os.path.dirname(path))))
        raise ValueError(
            f"{where} is not a jaxpeft adapter checkpoint: it has no metadata file {path} (it holds "
            f"{found[:_MAX_LISTED]}); it was written by another program or damaged. Open the directory the adapters "
            "were saved in."
        )
    try:
        meta = manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META]
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{where}: its metadata file {path} is not valid JSON ({err}); it was truncated or edited. Restore "
            "another step, or save this one again."
        ) from None
    except Exception as err:
        raise ValueError(
            f"{where}: its metadata ({path}) could not be read ({type(err).__name__}: {_clip(err)}); the step is "
            "damaged or not a jaxpeft adapter checkpoint. Restore another step."
        ) from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        shown = _short(meta.get("format")) if isinstance(meta, dict) else f"none (it is a JSON {type(meta).__name__})"
        raise ValueError(
            f"{where} is not a jaxpeft adapter checkpoint: its metadata ({path}) has format {shown}, "
            f"expected {FORMAT!r}. Open the directory the adapters were saved in."
        )
    version = meta.get("version")
    if not _is_int(version) or version not in READ_VERSIONS:
        raise ValueError(
            f"{where} has format version {_short(version)} ({path}); this jaxpeft reads versions "
            f"{list(READ_VERSIONS)}. Read it with the jaxpeft that wrote it (upgrade, if that one is newer)."
        )
    problem = _meta_problem(meta, step)
    if problem is not None:
        raise ValueError(
            f"{where}: its metadata ({path}) is malformed: {problem}. The file was edited or damaged: restore "
            "another step, or save this one again."
        )
    return meta


# ------------------------------------------------------------------------------------------------ orbax


def _open_manager(directory: str, *, read_only: bool, **options: Any) -> ocp.CheckpointManager:
    """One orbax manager with every item registered (a fresh process can restore without having saved)."""
    if read_only and "://" not in directory and not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint directory {directory!r}.")
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for item in (_ADAPTERS, _EXTRA, _OPT):
        handler = ocp.StandardCheckpointHandler()
        registry.add(item, ocp.args.StandardSave, handler)
        registry.add(item, ocp.args.StandardRestore, handler)
    json_handler = ocp.JsonCheckpointHandler()
    registry.add(_META, ocp.args.JsonSave, json_handler)
    registry.add(_META, ocp.args.JsonRestore, json_handler)
    manager_options = ocp.CheckpointManagerOptions(
        # read_only: never create the directory nor remove a running job's in-progress temporary directories.
        cleanup_tmp_directories=not read_only,
        create=not read_only,
        # Pruning renames a step into the trash first (atomic) and jaxpeft deletes it from there: a kill during
        # the deletion leaves no half-deleted step listed.
        todelete_subdir=None if read_only or "://" in directory else _TRASH,
        # Temporary directories are created before `save` returns: when that fails (a read-only or removed
        # directory) `save` raises, instead of orbax's writer threads waiting 300 s at exit for a signal that
        # never comes.
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        **options,
    )
    return ocp.CheckpointManager(directory, options=manager_options, handler_registry=registry)


# ------------------------------------------------------------------------------------------------ checkpointer


class AdapterCheckpointer:
    """Adapter-only checkpoints in a directory, through one orbax ``CheckpointManager``; any method.

    Use it as a context manager (or call ``close``): it waits for pending async saves on exit. Saves are atomic
    (orbax writes into a temporary directory and renames it when complete), so a save interrupted mid-way leaves
    every earlier checkpoint loadable; leftovers are removed when the next writer opens the directory.

    One writer per directory: a writer holds the lock file ``jaxpeft.lock`` (its pid, host and start time) from
    opening to ``close`` (or its process's end), and a second writer, in this process or another, gets
    :class:`CheckpointLockedError` naming the owner, so no step can mix two runs. A stale lock (its process died
    on this host) is taken over. Read-only checkpointers take no lock and may read beside a writer. In a
    multi-process job only process 0 takes the lock (it is orbax's primary host, which creates, renames and
    deletes step directories; the others write array shards into them): the job counts as one writer. Remote
    directories (``gs://...``) are not locked.

    Opening a directory also checks its step directories: an incomplete one (files missing, e.g. an older
    jaxpeft's pruning killed mid-deletion) is removed by a writer and skipped by a read-only checkpointer, with a
    warning naming it either way; a directory holding another program's orbax steps is refused for writing.

    Example::

      with jaxpeft.checkpoint.AdapterCheckpointer("ckpt", cfg, params, max_to_keep=3) as ckpt:
          for step in range(steps):
              (adapters, head), opt_state = train_step((adapters, head), opt_state, batch)
              ckpt.save(step, adapters, opt_state, extra=head)     # async; skipped off the save interval
      restored = jaxpeft.checkpoint.restore_adapters(
          "ckpt", cfg, params, opt_state_like=opt_state, extra_like=head)

    Args:
      directory: checkpoint root (resolved to an absolute path; created by a writer).
      cfg: the method config; saved as JSON and compared on restore.
      params: the base params (arrays or ``jax.ShapeDtypeStruct``): only their paths, shapes and dtypes are
        kept (fingerprinted, and used to plan the adapters); never saved.
      max_to_keep: keep the N most recently saved steps (None keeps all).
      save_interval_steps: ``save`` writes only steps divisible by this (unless ``force=True``).
      async_save: write in a background thread; ``wait``/``close`` block until done.
      layouts: kernel layouts as for ``jaxpeft.init``; by default the layouts the adapter nodes carry on save
        and the saved ones on restore.
      read_only: only restore: the directory must exist, is never created, locked or cleaned, and ``save``
        raises. (A training job's temporary directories are left alone, so an evaluator can read beside it.)

    Raises:
      CheckpointLockedError: another writer holds the directory.
      ValueError: the directory holds steps that are not jaxpeft adapter checkpoints (for a writer).
      FileNotFoundError: ``read_only`` and no such directory.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        cfg: MethodConfig,
        params: Any,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        async_save: bool = True,
        layouts: Mapping[str, Layout] | None = None,
        read_only: bool = False,
    ) -> None:
        if not isinstance(cfg, MethodConfig):
            raise TypeError(f"`cfg` is a {type(cfg).__name__}; expected a method config such as jaxpeft.LoraConfig.")
        if max_to_keep is not None and (not _is_int(max_to_keep) or max_to_keep < 1):
            raise ValueError(f"`max_to_keep`={max_to_keep!r}; expected a positive number of steps, or None for all.")
        if not _is_int(save_interval_steps) or save_interval_steps < 1:
            raise ValueError(f"`save_interval_steps`={save_interval_steps!r}; expected a positive integer.")
        self._directory = _absolute(directory)
        self._read_only = read_only
        self._interval = save_interval_steps
        self._async = async_save
        self._cfg = cfg
        self._config = cfg.to_dict()
        self._params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype), params)
        self._fingerprint = fingerprint(self._params)
        self._layouts = dict(layouts) if layouts is not None else None
        self._plan_cache: tuple[dict[str, Layout], Any, dict[str, Any]] | None = None
        self._pending: list[int] = []  # async saves not yet waited for
        local = "://" not in self._directory
        # Process 0 is orbax's primary host: it alone creates, renames and deletes step directories.
        self._primary = local and not read_only and jax.process_index() == 0
        self._lock: _Lock | None = None
        if local and not read_only:
            os.makedirs(self._directory, exist_ok=True)
        if self._primary:
            self._lock = _Lock(self._directory)
        try:
            self._incomplete = self._check_steps()
            self._manager = _open_manager(
                self._directory,
                read_only=read_only,
                save_interval_steps=save_interval_steps,
                preservation_policy=ocp.checkpoint_managers.LatestN(max_to_keep),
                enable_async_checkpointing=async_save,
            )
        except BaseException:
            if self._lock is not None:
                self._lock.release()
            raise

    def _check_steps(self) -> dict[int, str]:
        """The incomplete steps to skip (none left after a writer removed them); refuses another program's steps
        to a writer."""
        incomplete, foreign = _scan_steps(self._directory)
        if foreign and not self._read_only:
            raise ValueError(
                f"checkpoint directory {self._directory!r} holds steps that are not jaxpeft adapter checkpoints: "
                f"{_listed([f'step {s}: {why}' for s, why in sorted(foreign.items())])}. Saving beside them would mix "
                "two formats in one listing and pruning would delete them: save into another directory."
            )
        if not incomplete:
            if self._primary:
                _empty_trash(self._directory)
            return {}
        reasons = {step: why for step, (_, why) in incomplete.items()}
        if self._primary:
            _discard(self._directory, [name for name, _ in incomplete.values()])
            warnings.warn(
                f"removed incomplete checkpoint steps from {self._directory!r}: {_incomplete_list(reasons)} (a "
                "deletion or copy was interrupted, e.g. by a kill during pruning); the complete steps are intact.",
                stacklevel=3,
            )
            return {}
        if self._read_only:
            warnings.warn(
                f"skipping incomplete checkpoint steps in {self._directory!r}: {_incomplete_list(reasons)} (a "
                "deletion or copy was interrupted); they are left on disk (read_only) and the next writer removes "
                "them.",
                stacklevel=3,
            )
        return reasons

    @property
    def directory(self) -> str:
        """The absolute checkpoint root."""
        return self._directory

    def __enter__(self) -> AdapterCheckpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def latest_step(self) -> int | None:
        """The highest complete step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """Every complete step, ascending (a step still being written asynchronously included)."""
        return sorted(s for s in self._manager.all_steps() if s not in self._incomplete)

    def wait(self) -> None:
        """Block until pending async saves are on disk.

        Raises:
          OSError, RuntimeError: an async save failed (the message names the steps); those steps are not on disk
            and not listed, the earlier ones are intact, and the checkpointer stays usable.
        """
        try:
            self._manager.wait_until_finished()
        except Exception as err:
            steps, self._pending = self._pending, []
            raise self._save_failed(steps, err) from err
        self._pending = []
        if self._primary:
            _empty_trash(self._directory)

    def close(self) -> None:
        """Wait for pending saves, release the manager and the directory's lock (raises as ``wait``)."""
        try:
            self.wait()
        finally:
            with contextlib.suppress(Exception):  # the error of a failed save was raised by `wait` already
                self._manager.close()
            if self._primary:
                _empty_trash(self._directory, remove=True)
            if self._lock is not None:
                self._lock.release()

    def _save_failed(self, steps: Sequence[int], err: BaseException) -> Exception:
        """The error for a failed save of ``steps`` (an ``OSError`` if the cause was one, else a ``RuntimeError``),
        after dropping those steps from the listing."""
        with contextlib.suppress(Exception):
            self._manager.reload()  # forget steps that never reached the disk
        message = (
            f"saving step {', '.join(map(str, steps)) or '?'} in {self._directory!r} failed: "
            f"{type(err).__name__}: {_clip(err)}. That step is not on disk; the complete steps {self.all_steps()} are "
            "intact. Fix the cause (a full disk, a read-only, moved or removed directory) and save again."
        )
        if isinstance(err, OSError):
            return OSError(err.errno, message) if err.errno else OSError(message)
        return RuntimeError(message)

    def _where(self, step: int) -> str:
        return f"checkpoint step {step} in {self._directory!r}"

    def _planned(self, layouts: Mapping[str, Layout]) -> tuple[Any, dict[str, Any]]:
        """The adapters the config makes on the params, abstractly (``jax.eval_shape`` of the method's init), and
        their node table; the last result is cached, so saving every step re-traces nothing."""
        if self._plan_cache is None or self._plan_cache[0] != layouts:

            def make(params: Any, key: jax.Array) -> Any:
                return method_init(self._cfg, params, key=key, layouts=layouts)

            expected = jax.eval_shape(make, self._params, jax.ShapeDtypeStruct((), jax.random.key(0).dtype))
            self._plan_cache = (dict(layouts), expected, _node_table(expected))
        return self._plan_cache[1], self._plan_cache[2]

    # ------------------------------------------------------------------------------------------------ save

    def save(self, step: int, adapters: Any, opt_state: Any = None, *, extra: Any = None, force: bool = False) -> bool:
        """Save ``adapters`` (and ``opt_state``, ``extra``) as ``step``; returns whether a checkpoint was written.

        Checks first that ``adapters`` are exactly what the config makes on the params (paths, node types,
        array shapes and dtypes, layouts, static parts such as the scale), so that every saved step can be
        restored; nothing is written when a check fails. A step off ``save_interval_steps`` is skipped (False)
        unless ``force``. Nothing else is skipped silently: a step already saved is an error (never overwritten,
        ``force`` or not: the directory always keeps a complete copy of every step it lists), and so is a step
        below the latest (e.g. a run restarted into an old directory) unless ``force``. With ``async_save`` the
        arrays are copied off the device before this returns and written in the background; call ``wait`` (or
        ``close``) before relying on the files.

        Args:
          step: the step number, a non-negative integer.
          adapters: the adapter tree.
          opt_state: the optimizer state (any pytree of arrays), or None.
          extra: any other trained pytree of arrays saved beside the adapters (a classifier head, the norms),
            or None.
          force: write even off the save interval, or below the latest step (``latest_step`` stays the highest
            step; ``max_to_keep`` keeps the most recently saved steps).

        Raises:
          TypeError: ``step`` is not an integer (a float, a bool, a string).
          ValueError: a negative ``step``; ``step`` already saved, or below the latest without ``force``; the
            adapters do not match the config on these params; a non-array leaf in ``adapters``, ``opt_state`` or
            ``extra``; a read-only checkpointer.
          CheckpointLockedError: this writer's lock file was removed or replaced.
          OSError, RuntimeError: writing failed (the message names the step; earlier steps are intact).
        """
        if self._read_only:
            raise ValueError(
                f"this AdapterCheckpointer of {self._directory!r} is read-only; open one without read_only."
            )
        step = _check_step(step)
        if not force and step % self._interval:
            return False
        steps = self.all_steps()
        if step in steps:
            raise ValueError(
                f"`step`={step} is already saved in {self._directory!r} (steps {steps}); checkpoints are never "
                f"overwritten, force=True included. Resume from the latest step ({steps[-1]}: restore() it and save "
                "the steps after it), save into a new directory, or delete that step's directory first."
            )
        if not force and steps and step < steps[-1]:
            raise ValueError(
                f"`step`={step} is below the latest step {steps[-1]} in {self._directory!r} (steps {steps}), so it "
                "would not be the latest: is this a run restarted into an old directory? Resume from the latest "
                "step (restore() it and save the steps after it), save into a new directory, or pass force=True to "
                "save it anyway."
            )
        meta: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "step": step,
            "config": self._config,
            "adapters": self._check_adapters(adapters),
            "base": self._fingerprint,
        }
        trees = {_ADAPTERS: _array_leaves(adapters, _ADAPTERS)}
        for item, tree in ((_OPT, opt_state), (_EXTRA, extra)):
            flat = None if tree is None else _array_leaves(tree, item)
            meta[item] = None if flat is None else _shape_table(flat)
            if flat:  # an empty state (e.g. plain SGD's) is rebuilt from its `*_like` structure alone
                trees[item] = flat
        args = {item: ocp.args.StandardSave(_nested(flat)) for item, flat in trees.items()}
        args[_META] = ocp.args.JsonSave(meta)
        if self._lock is not None:
            self._lock.check()
        if self._primary:
            _empty_trash(self._directory)  # the steps pruned by earlier saves
        try:
            written = bool(self._manager.save(step, args=ocp.args.Composite(**args), force=True))
        except Exception as err:
            raise self._save_failed([step], err) from err
        if written and self._async:
            self._pending.append(step)
        return written

    def _check_adapters(self, adapters: Any) -> dict[str, Any]:
        """The node table of ``adapters`` after checking it equals the one the config makes on the params (the
        static parts but the config's ``restore_free`` fields included)."""
        given = _node_table(adapters)
        try:
            _, planned = self._planned({**layouts_of(adapters), **(self._layouts or {})})
        except ValueError as err:
            raise ValueError(
                "cannot check `adapters` against `cfg` on these params (if `cfg` selects a parameter that "
                f"`adapters` lack, they were made with another config): {err}"
            ) from err
        planned_shapes, given_shapes, planned_statics, given_statics = _split_statics(
            planned, given, self._cfg.restore_free
        )
        diff = _diff_table(planned_shapes, given_shapes, "adapter", left="config", right="in `adapters`")
        diff = diff or _diff_table(planned_statics, given_statics, "adapter", left="config", right="in `adapters`")
        if diff:
            raise ValueError(
                f"`adapters` are not what `cfg` ({type(self._cfg).__name__}) makes on these params: {_listed(diff)}. "
                "Pass the config and params the adapters were initialised with."
            )
        return given

    # ------------------------------------------------------------------------------------------------ restore

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata of ``step`` (default: the latest), checked as on restore."""
        return _read_meta(self._manager, self._directory, self._resolve(step))

    def _resolve(self, step: Any) -> int:
        return _resolve_step(self.all_steps(), self._incomplete, self._directory, step)

    def _unreadable(self, step: int, err: BaseException) -> ValueError:
        return ValueError(
            f"{self._where(step)} could not be read ({type(err).__name__}: {_clip(err)}); files of the step are "
            "missing or were changed (e.g. a copy or deletion was interrupted). Restore another step: complete steps "
            f"are {self.all_steps()}."
        )

    def restore(
        self,
        step: int | None = None,
        *,
        adapters_like: Any = None,
        opt_state_like: Any = None,
        extra_like: Any = None,
        skip: Sequence[str] = (),
        sharding: ShardingSpec = None,
        check_base: bool = True,
    ) -> Restored:
        """Restore ``step`` (default: the latest) against abstract targets from the current config and shardings.

        Guarantees: the restored adapters have exactly the paths, node types and shapes that the method's
        ``init`` makes from the current config on the current params, and its static parts; nothing saved is
        silently dropped (a saved ``opt_state`` or ``extra`` must be given a target or skipped explicitly); every
        check runs before any array is read; no leaf is left abstract; the base weights are not read.

        Args:
          step: which step; None for the latest complete one.
          adapters_like: the current adapters (arrays or ``jax.ShapeDtypeStruct``, e.g. freshly initialised and
            sharded); each restored array takes its leaf's sharding.
          opt_state_like: the current optimizer state (e.g. ``tx.init(adapters)`` or its ``jax.eval_shape``);
            the saved state is restored into its structure with its shardings.
          extra_like: the structure (arrays or ``jax.ShapeDtypeStruct``) of the ``extra`` tree saved beside the
            adapters; restored into it with its shardings.
          skip: items not to restore although saved: ``("opt_state",)``, ``("extra",)`` or both.
          sharding: for leaves whose sharding is not given by a ``*_like`` tree: one ``Sharding`` for all, or
            ``fn(path, ShapeDtypeStruct) -> Sharding``; default the first local device.
          check_base: compare the base fingerprint (paths, shapes, dtypes of every param). Turn off only to
            load adapters onto a base whose other leaves changed on purpose (e.g. cast to bf16); the adapted
            paths and shapes are checked regardless.

        Raises:
          FileNotFoundError: no such step, or it is incomplete.
          TypeError: ``step`` is not an integer.
          ValueError: the step's metadata is missing, malformed or edited, or from another program or format
            version; the saved config, fingerprint or adapters' static parts differ from the current ones (the
            message names the fields or paths); the on-disk arrays differ from the targets or cannot be read; a
            ``*_like`` tree does not match what was saved, or nothing was saved for it; a saved
            ``opt_state``/``extra`` with neither a target nor ``skip``; ``skip`` names an unknown item or one whose
            ``*_like`` is given; a leaf would stay abstract.
        """
        likes = {_OPT: opt_state_like, _EXTRA: extra_like}
        _check_skip(skip, likes)
        self.wait()
        step = self._resolve(step)
        meta = _read_meta(self._manager, self._directory, step)
        self._check_saved(meta, step, check_base)
        config = self._saved_config(meta, step)
        targets = {_ADAPTERS: self._adapter_target(meta, step, adapters_like, sharding)}
        for item, like in likes.items():
            if like is not None:
                targets[item] = _aux_target(item, like, meta.get(item), self._where(step), sharding)
            elif meta.get(item) is not None and item not in skip:
                raise ValueError(
                    f"{self._where(step)} holds `{item}`; say how to restore it: pass {_HOW[item]}, or "
                    f"skip=({item!r},) to leave it."
                )
        self._check_on_disk(step, targets)
        args = {item: ocp.args.StandardRestore(_nested(t.arrays)) for item, t in targets.items() if t.arrays}
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as err:
            raise self._unreadable(step, err) from err
        trees = {item: t.rebuild(restored[item] if item in args else {}, item, step) for item, t in targets.items()}
        return Restored(step, trees[_ADAPTERS], trees.get(_OPT), config, trees.get(_EXTRA))

    def _check_saved(self, meta: Mapping[str, Any], step: int, check_base: bool) -> None:
        """Raise when the saved config (or, with ``check_base``, the base fingerprint) differs from the current."""
        config_diff = _config_diff(self._cfg, meta["config"], self._config)
        if config_diff:
            raise ValueError(
                f"{self._where(step)} was saved with a different config: {_listed(config_diff)}. Restore with the "
                "saved config (jaxpeft.checkpoint.read_config) or start a new directory."
            )
        if check_base and meta["base"]["digest"] != self._fingerprint["digest"]:
            diff = _diff_table(meta["base"]["params"], self._fingerprint["params"], "base param shape, dtype")
            if not diff:  # _read_meta checks the digest against its table: only a hash collision gets here
                diff = ["the digests differ although every path, shape and dtype agrees (the metadata was edited)"]
            raise ValueError(
                f"{self._where(step)} was saved for a different base model: {_listed(diff)}. Load the base model "
                "it was trained on (or pass check_base=False if only non-adapted leaves changed on purpose)."
            )

    def _saved_config(self, meta: Mapping[str, Any], step: int) -> MethodConfig:
        try:
            config: MethodConfig = type(self._cfg).from_dict(meta["config"])
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"{self._where(step)}: its saved config is invalid ({err}); the metadata was edited or written by "
                "another version of the method. Restore another step."
            ) from None
        return config

    def _adapter_target(
        self, meta: Mapping[str, Any], step: int, adapters_like: Any, sharding: ShardingSpec
    ) -> _Target:
        """The abstract adapter tree from the method's init (checked against the saved table) and its targets."""
        layouts = self._layouts
        if layouts is None:
            layouts = {p: Layout(**info["layout"]) for p, info in meta["adapters"].items()}
        try:
            expected, table = self._planned(layouts)
        except ValueError as err:
            raise ValueError(f"{self._where(step)}: the current config does not plan on these params: {err}") from err
        saved, current, saved_statics, statics = _split_statics(meta["adapters"], table, self._cfg.restore_free)
        diff = _diff_table(saved, current, "adapter")
        if diff:
            raise ValueError(
                f"{self._where(step)} holds adapters that the current config does not make on these params: "
                f"{_listed(diff)}. Restore on the base model it was trained on, with the layouts it was saved with."
            )
        diff = _diff_table(saved_statics, statics, "adapter static part")
        if diff:
            raise ValueError(
                f"{self._where(step)} holds adapters whose static parts differ from what the current config gives "
                f"them: {_listed(diff)}. The configs compare equal but assign other values (e.g. the same pattern "
                "entries in another order, where the first match wins): restore with the saved config "
                "(jaxpeft.checkpoint.read_config)."
            )
        abstract = dict(leaves_with_paths(expected))
        like = dict(leaves_with_paths(adapters_like)) if adapters_like is not None else {}
        if adapters_like is not None:
            shapes = {p: list(x.shape) for p, x in abstract.items()}
            diff = _diff_table(
                shapes, {p: list(x.shape) for p, x in like.items()}, "adapter array", right="in `adapters_like`"
            )
            if diff:
                raise ValueError(f"`adapters_like` does not match the adapters in the checkpoint: {_listed(diff)}.")
        return _Target({p: _target(p, x, like.get(p), sharding) for p, x in abstract.items()}, expected)

    def _check_on_disk(self, step: int, targets: Mapping[str, _Target]) -> None:
        """Raise when orbax's on-disk array metadata differs from the restore targets (a damaged step)."""
        try:
            disk = self._manager.item_metadata(step)
        except Exception as err:
            raise self._unreadable(step, err) from err
        for item, target in targets.items():
            if not target.arrays:
                continue
            tree = getattr(disk.get(item), "tree", None)  # None: the item is missing on disk
            found = {p: _shape_dtype(x) for p, x in leaves_with_paths(tree)}
            diff = _diff_table(found, _shape_table(target.arrays), f"on-disk {item} array", right="expected")
            if diff:
                raise ValueError(f"{self._where(step)}: on-disk {item} arrays differ: {_listed(diff)}.")


# ------------------------------------------------------------------------------------------------ one-shot


def save_adapters(
    directory: str | os.PathLike[str],
    step: int,
    adapters: Any,
    cfg: MethodConfig,
    params: Any,
    opt_state: Any = None,
    *,
    extra: Any = None,
    **options: Any,
) -> str:
    """Save one step and wait until it is on disk; returns the absolute directory.

    ``options`` are those of :class:`AdapterCheckpointer` (``max_to_keep``, ``layouts``, ...). The step is
    written off the save interval and below the latest step (``force=True``), but a step already saved is an
    error, as for :meth:`AdapterCheckpointer.save`. For a training loop keep one :class:`AdapterCheckpointer`
    open instead.
    """
    with AdapterCheckpointer(directory, cfg, params, **options) as ckpt:
        ckpt.save(step, adapters, opt_state, extra=extra, force=True)
        ckpt.wait()
        return ckpt.directory


def restore_adapters(
    directory: str | os.PathLike[str],
    cfg: MethodConfig,
    params: Any,
    *,
    step: int | None = None,
    layouts: Mapping[str, Layout] | None = None,
    **restore_kwargs: Any,
) -> Restored:
    """Restore one step (default: the latest) read-only; keyword arguments as :meth:`AdapterCheckpointer.restore`."""
    with AdapterCheckpointer(directory, cfg, params, layouts=layouts, async_save=False, read_only=True) as ckpt:
        return ckpt.restore(step, **restore_kwargs)


def read_config(
    directory: str | os.PathLike[str], step: int | None = None, *, configs: Sequence[type[MethodConfig]] = ()
) -> MethodConfig:
    """The config a checkpoint step (default: the latest) was saved with, e.g. to rebuild adapters for inference.

    Built-in methods are found by their ``method`` name; for a method of your own pass its config class in
    ``configs``. The directory is only read (incomplete steps are skipped).

    Raises:
      FileNotFoundError: no such directory or step; TypeError: ``step`` is not an integer; ValueError: the
        step's metadata or saved config is missing, malformed or unknown (the message names the file).
    """
    path = _absolute(directory)
    manager = _open_manager(path, read_only=True)
    try:
        incomplete = {s: why for s, (_, why) in _scan_steps(path)[0].items()}
        steps = sorted(s for s in manager.all_steps() if s not in incomplete)
        step = _resolve_step(steps, incomplete, path, step)
        meta = _read_meta(manager, path, step)
    finally:
        manager.close()
    try:
        return config_from_dict(meta["config"], configs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"checkpoint step {step} in {path!r}: {err}") from None
