"""Named adapter sets on disk, saved and restored as one unit: one checkpoint or PEFT directory per named adapter.

A set is ``{name: adapter tree}`` with a config per name (one config for all, or ``{name: config}``). On disk it is
a directory holding ``adapter_set.json`` (the index) and one sub-directory per name: a ``jaxpeft.checkpoint``
directory (``save_adapter_set``) or the files ``PeftModel.save_pretrained`` writes for a non-default adapter
(``export_adapter_set``; PEFT loads them with ``PeftModel.from_pretrained(model, dir/name, adapter_name=name)`` and
``load_adapter(dir/other, adapter_name=other)``). Stack a set for serving with ``jaxpeft.stack_adapters`` and
combine it with ``jaxpeft.add_weighted_adapter``.

The index is the set's commit point. It names the adapters in order (so a bank stacked from a restored set gives
every adapter the same id as before) and records, per committed step, the SHA-256 of every file of every member.
Guarantees (each is a test in ``tests/test_adapter_sets.py`` or ``tests/test_adapter_set_faults.py``):

- **Every member of step N or none.** ``save_adapter_set`` checks every member before writing any (config, base
  fingerprint, shapes, step), writes them all, and only then writes the index naming step N; a kill or an error
  before that leaves the previous committed step the one that restores (the next save removes the torn leftovers).
  ``restore_adapter_set`` restores one committed step for every member, never each member's own latest.
- **An export is all or nothing.** ``export_adapter_set`` builds every member's files in memory first (any refusal
  writes nothing), stages them, then swaps them in with the index written last; an error on the way puts the old
  set back, and a kill on the way leaves the set without an index (imports refuse it, naming the interrupted
  export) until the next export completes.
- **What is read is what was written.** A member file whose bytes differ from the index's digest (a flipped byte,
  an edit, a member re-exported on its own) is refused by name before anything is read; so are duplicate or hidden
  names and an index that is not this format.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

from jaxpeft.protocol import MethodConfig

__all__ = ["INDEX_NAME", "export_adapter_set", "import_adapter_set", "restore_adapter_set", "save_adapter_set"]

#: The file naming a set's adapters, in order, with the committed steps and their digests.
INDEX_NAME = "adapter_set.json"
#: The index format written now; version 1 (names only, no steps or digests) is still read.
INDEX_VERSION = 2
CHECKPOINT, HF = "jaxpeft.checkpoint", "hf-peft"
_STAGING = ".jaxpeft-set-export"  # an export's staging directory inside the set (hidden: never a member name)


# ------------------------------------------------------------------------------------------------ names, index


def _check_names(names: Sequence[Any], where: str) -> list[str]:
    """``names`` as a list after refusing non-strings, path-like, hidden, reserved and duplicate names."""
    names = list(names)
    for name in names:
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(
                f"adapter name {name!r} in {where} cannot be a member directory: use a non-empty name without '/' "
                "that does not start with '.' (e.g. 'fr')."
            )
        if name == INDEX_NAME:
            raise ValueError(f"adapter name {name!r} in {where} is reserved for the set's index file; rename it.")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{where} names the adapters {repeated} more than once; every name must be unique.")
    return names


def _names(named: Mapping[str, Any]) -> list[str]:
    if not isinstance(named, Mapping) or not named:
        raise ValueError("`named` must be a non-empty mapping {name: adapter tree}.")
    return _check_names(list(named), "`named`")


def _configs(names: list[str], configs: MethodConfig | Mapping[str, MethodConfig]) -> dict[str, MethodConfig]:
    if isinstance(configs, MethodConfig):
        return dict.fromkeys(names, configs)
    if not isinstance(configs, Mapping) or set(configs) != set(names):
        got = sorted(configs) if isinstance(configs, Mapping) else type(configs).__name__
        raise ValueError(f"`configs` must be one method config or one per adapter {names}; got {got}.")
    return dict(configs)


def _write_index(directory: str, index: Mapping[str, Any]) -> None:
    """Write the index atomically (a temporary file renamed over it): the set's commit point."""
    tmp = os.path.join(directory, f".{INDEX_NAME}.tmp")
    with open(tmp, "w") as f:
        json.dump(index, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, INDEX_NAME))
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    from jaxpeft.hf._files import fsync_dir

    fsync_dir(directory)


def _digests_problem(digests: Any, names: list[str]) -> str | None:
    if not isinstance(digests, dict) or set(digests) != set(names):
        return f"`digests` is not an object with one entry per name {names}"
    for name, files in digests.items():
        if not isinstance(files, dict) or not files or not all(isinstance(v, str) for v in files.values()):
            return f"`digests`[{name!r}] is not an object {{file: sha256}}"
    return None


def _index_problem(index: Any, kind: str) -> str | None:
    """Why ``index`` is not a readable set index of ``kind`` (names checked by the caller), or None."""
    if not isinstance(index, dict) or index.get("format") != kind:
        got = index.get("format") if isinstance(index, dict) else type(index).__name__
        return f"it describes a set of format {got!r}; expected {kind!r}"
    names = index.get("names")
    if not isinstance(names, list) or not names:
        return "it has no list of adapter names"
    version = index.get("version", 1)
    if version == 1:
        return None
    if version != INDEX_VERSION:
        return f"its `version` is {version!r}; this jaxpeft reads versions 1 and {INDEX_VERSION} (upgrade jaxpeft)"
    if kind == HF:
        return _digests_problem(index.get("digests"), names)
    commits = index.get("commits")
    if not isinstance(commits, list) or not commits:
        return "it has no list of committed steps"
    steps: list[Any] = [c.get("step") if isinstance(c, dict) else None for c in commits]
    numbers = all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in steps)
    if not numbers or steps != sorted(set(steps)):
        return f"its committed steps {steps} are not distinct non-negative integers in ascending order"
    for commit in commits:
        problem = _digests_problem(commit.get("digests"), names)
        if problem is not None:
            return f"commit {commit['step']}: {problem}"
    return None


def _read_index(directory: str, kind: str) -> dict[str, Any]:
    """The checked index of a set directory of ``kind``; a clear error when it is missing or malformed."""
    path = os.path.join(directory, INDEX_NAME)
    try:
        with open(path) as f:
            index = json.load(f)
    except FileNotFoundError:
        if os.path.isdir(os.path.join(directory, _STAGING)):
            raise FileNotFoundError(
                f"{path!r} does not exist: an export of this adapter set into {directory!r} was interrupted (its "
                f"files are in {_STAGING!r}). Export the set again to complete it."
            ) from None
        raise FileNotFoundError(
            f"{path!r} does not exist: {directory!r} is not an adapter set directory (written by "
            "jaxpeft.adapter_sets.save_adapter_set / export_adapter_set). For one adapter use "
            "jaxpeft.checkpoint.restore_adapters / jaxpeft.hf.import_adapters."
        ) from None
    except (OSError, ValueError) as err:
        raise ValueError(f"{path!r} is not a readable adapter set index: {err}") from None
    if isinstance(index, dict) and isinstance(index.get("names"), list):
        _check_names(index["names"], repr(path))
    problem = _index_problem(index, kind)
    if problem is not None:
        raise ValueError(f"{path!r} is not a valid adapter set index: {problem}.")
    return dict(index)


def read_index(directory: str | os.PathLike[str], kind: str) -> list[str]:
    """The adapter names of a set directory, in order; a clear error when it is not a set of this ``kind``."""
    return list(_read_index(os.path.abspath(os.fspath(directory)), kind)["names"])


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _file_digests(root: str, files: Sequence[str] | None = None) -> dict[str, str]:
    """``{relative path: sha256}`` of ``files`` under ``root`` that exist (default: every file under it)."""
    if files is not None:
        return {f: _sha256(os.path.join(root, f)) for f in files if os.path.isfile(os.path.join(root, f))}
    out = {}
    for parent, dirs, names in os.walk(root):
        dirs.sort()
        for file in sorted(names):
            path = os.path.join(parent, file)
            out[os.path.relpath(path, root)] = _sha256(path)
    return out


def _verify(where: str, name: str, expected: Mapping[str, str], actual: Mapping[str, str]) -> None:
    """Refuse a member whose files differ from the digests its set's index recorded."""
    changed = sorted(f for f in expected if actual.get(f) != expected[f])
    missing = [f for f in changed if f not in actual]
    if changed:
        what = f"files {missing} are missing" if missing else f"the bytes of {changed[:4]} changed"
        raise ValueError(
            f"adapter {name!r} of the set {where!r} is not what the set committed: {what} since it was written (a "
            "damaged copy, an edit, or the member rewritten on its own). Write the set again, or restore/import "
            "that member alone with jaxpeft.checkpoint / jaxpeft.hf."
        )


# ------------------------------------------------------------------------------------------------ checkpoints


def _commit_table(index: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    return {c["step"]: c for c in index.get("commits", ())}


def save_adapter_set(
    directory: str | os.PathLike[str],
    named: Mapping[str, Any],
    configs: MethodConfig | Mapping[str, MethodConfig],
    params: Any,
    *,
    step: int = 0,
    max_to_keep: int | None = 3,
    **options: Any,
) -> str:
    """Save every named adapter as step ``step`` of its ``jaxpeft.checkpoint`` directory ``directory/<name>``, as one
    commit.

    Every check of ``jaxpeft.checkpoint.save_adapters`` runs for every member before any member is written; the
    index naming the step (with every file's digest) is written last, so a set restores with every member at one
    committed step or not at all. Members' steps that no commit names (left by a save that was killed or failed)
    are removed before writing. The members of a set are fixed when it is first saved.

    Args:
      directory: the set's directory (created).
      named: ``{name: adapter tree}``; the names are directory names (no '/', no leading '.').
      configs: one config for every adapter, or ``{name: config}``.
      params: the base params (as for ``save_adapters``).
      step: the step number; a step already committed is refused (never overwritten).
      max_to_keep: keep the N most recent committed steps (None keeps all); older steps are removed from every
        member after the new commit.
      **options: as for :class:`jaxpeft.checkpoint.AdapterCheckpointer` (``layouts``, ...).

    Returns:
      The set's absolute directory.

    Raises:
      ValueError: bad names or configs; a member's adapters do not match its config; the step is committed
        already; the set holds other names. Nothing is written then.
    """
    from jaxpeft.checkpoint import AdapterCheckpointer
    from jaxpeft.checkpoint._meta import is_int
    from jaxpeft.checkpoint._steps import check_step

    names = _names(named)
    table = _configs(names, configs)
    step = check_step(step)
    if max_to_keep is not None and (not is_int(max_to_keep) or max_to_keep < 1):
        raise ValueError(f"`max_to_keep`={max_to_keep!r}; expected a positive number of steps, or None for all.")
    root = os.path.abspath(os.fspath(directory))
    index = _read_index(root, CHECKPOINT) if os.path.lexists(os.path.join(root, INDEX_NAME)) else None
    commits = _commit_table(index) if index is not None else {}
    _check_same_members(root, index, names)
    if step in commits:
        raise ValueError(
            f"`step`={step} is already committed in the adapter set {root!r} (committed steps {sorted(commits)}); "
            "a set's steps are never overwritten. Save the next step, or into a new directory."
        )
    os.makedirs(root, exist_ok=True)
    with contextlib.ExitStack() as stack:
        opened = {"max_to_keep": None, "async_save": False, **options}
        members = {
            n: stack.enter_context(AdapterCheckpointer(os.path.join(root, n), table[n], params, **opened))
            for n in names
        }
        for ckpt in members.values():  # torn leftovers of an interrupted save: never committed, never restored
            for leftover in sorted(set(ckpt.all_steps()) - set(commits)):
                ckpt.delete(leftover)
        for name, ckpt in members.items():  # every check before any write
            ckpt.check(step, named[name], force=True)
        for name, ckpt in members.items():
            ckpt.save(step, named[name], force=True)
            ckpt.wait()
        digests = {n: _file_digests(os.path.join(root, n, str(step))) for n in names}
        commits[step] = {"step": step, "methods": {n: table[n].method for n in names}, "digests": digests}
        kept = sorted(commits)[-max_to_keep:] if max_to_keep else sorted(commits)
        new_index = {"format": CHECKPOINT, "version": INDEX_VERSION, "names": names}
        _write_index(root, {**new_index, "commits": [commits[s] for s in kept]})  # the commit point
        for old in sorted(set(commits) - set(kept)):
            for ckpt in members.values():
                with contextlib.suppress(FileNotFoundError):
                    ckpt.delete(old)
    return root


def _check_same_members(root: str, index: Mapping[str, Any] | None, names: list[str]) -> None:
    if index is not None and list(index["names"]) != names:
        raise ValueError(
            f"the adapter set {root!r} holds the adapters {index['names']}; `named` has {names}. A set keeps its "
            "members (in order) across steps: save the same names, or a new set into another directory."
        )


def _committed_step(root: str, index: Mapping[str, Any], step: int | None) -> tuple[int, dict[str, Any] | None]:
    """The step to restore and its commit (None for a version-1 index, which recorded no steps)."""
    from jaxpeft.checkpoint._steps import check_step

    if index.get("version", 1) == 1:
        return _legacy_step(root, index["names"], step), None
    commits = _commit_table(index)
    if step is None:
        step = max(commits)
    step = check_step(step)
    if step not in commits:
        raise FileNotFoundError(
            f"`step`={step} is not a committed step of the adapter set {root!r}; committed steps are "
            f"{sorted(commits)} (a step saved by some members only, by an interrupted save, never restores)."
        )
    return step, commits[step]


def _legacy_step(root: str, names: list[str], step: int | None) -> int:
    """A version-1 set (no commit record): ``step``, or the latest step, which every member must share."""
    if step is not None:
        return step
    from jaxpeft.checkpoint._steps import complete_steps, open_manager, scan_steps

    latest = {}
    for name in names:
        path = os.path.join(root, name)
        manager = open_manager(path, read_only=True)
        try:
            steps = complete_steps(manager, scan_steps(path)[0])
        finally:
            manager.close()
        latest[name] = steps[-1] if steps else None
    if len(set(latest.values())) > 1:
        raise ValueError(
            f"the adapter set {root!r} was written by an older jaxpeft (its index records no committed step) and its "
            f"members' latest steps differ: {latest} (a save was interrupted). Pass `step=` a step every member "
            "holds, then save the set again to give it a commit record."
        )
    return next(iter(latest.values())) or 0


def restore_adapter_set(
    directory: str | os.PathLike[str],
    params: Any,
    *,
    configs: MethodConfig | Mapping[str, MethodConfig] | None = None,
    step: int | None = None,
    **options: Any,
) -> tuple[dict[str, Any], dict[str, MethodConfig]]:
    """``({name: adapters}, {name: config})`` of one committed step (default: the latest) of a set saved by
    :func:`save_adapter_set`, in its saved order.

    Every member's files are checked against the index's digests before any array is read. Without ``configs``
    each adapter's config is read from its checkpoint (``jaxpeft.checkpoint.read_config``); ``options`` go to
    every ``jaxpeft.checkpoint.restore_adapters``.

    Raises:
      FileNotFoundError: not a set directory; ``step`` is not committed.
      ValueError: a malformed index; a member's files differ from the committed digests; as ``restore_adapters``.
    """
    from jaxpeft.checkpoint import read_config, restore_adapters

    root = os.path.abspath(os.fspath(directory))
    index = _read_index(root, CHECKPOINT)
    names = list(index["names"])
    step, commit = _committed_step(root, index, step)
    if commit is not None:
        for name in names:
            _verify(root, name, commit["digests"][name], _file_digests(os.path.join(root, name, str(step))))
    table = (
        {n: read_config(os.path.join(root, n), step) for n in names} if configs is None else _configs(names, configs)
    )
    out = {}
    for name in names:
        out[name] = restore_adapters(os.path.join(root, name), table[name], params, step=step, **options).adapters
    return out, table


# ------------------------------------------------------------------------------------------------ HF PEFT


def export_adapter_set(
    directory: str | os.PathLike[str],
    named: Mapping[str, Any],
    configs: MethodConfig | Mapping[str, MethodConfig],
    params: Any,
    module_name: Any,
    **kwargs: Any,
) -> str:
    """Write each named adapter as a HF PEFT adapter directory ``directory/<name>`` (``jaxpeft.hf.export_adapters``),
    all of them or none.

    ``kwargs`` go to every export (``layouts``, ``task_type``, ...). Every member's files are built in memory first,
    so any refusal writes nothing; then they are staged and swapped in, each member's config after its tensors,
    and the index (with every file's digest) last. An error on the way puts the previous set back; a kill on the
    way leaves no index (importing names the interrupted export) until an export completes. Other files in the
    member directories are never touched; one export of a set at a time.

    Returns:
      The set's absolute directory.
    """
    from jaxpeft import hf
    from jaxpeft.hf._files import export_lock, fresh_staging, serialise

    names = _names(named)
    table = _configs(names, configs)
    payloads = {n: serialise(*hf.to_state_dict(named[n], table[n], params, module_name, **kwargs)) for n in names}
    root = os.path.abspath(os.fspath(directory))
    for path in (root, *(os.path.join(root, n) for n in names)):
        if os.path.lexists(path) and not os.path.isdir(path):
            raise ValueError(f"export target {path!r} exists and is not a directory; remove it or pick another path.")
    index = {
        "format": HF,
        "version": INDEX_VERSION,
        "names": names,
        "methods": {n: table[n].method for n in names},
        "digests": {n: {f: hashlib.sha256(b).hexdigest() for f, b in payloads[n].items()} for n in names},
    }
    os.makedirs(root, exist_ok=True)
    with export_lock(os.path.join(root, _STAGING + ".lock"), root):
        _swap_in(root, payloads, index, fresh_staging(os.path.join(root, _STAGING)))
    return root


def _swap_in(root: str, payloads: Mapping[str, Mapping[str, bytes]], index: Mapping[str, Any], staging: str) -> None:
    """Stage every member's files, move the old index out, swap each member's pair (tensors, then config), and
    write the new index (the commit); undo everything on an exception."""
    from jaxpeft.hf._config import CONFIG_NAME
    from jaxpeft.hf._files import WEIGHTS_NAME, write_file

    order = (WEIGHTS_NAME, CONFIG_NAME)
    moves: list[tuple[str, str]] = []  # (from, to) done so far, undone in reverse
    try:
        for name, payload in payloads.items():
            os.makedirs(os.path.join(staging, "new", name))
            os.makedirs(os.path.join(staging, "old", name))
            for file, data in payload.items():
                write_file(os.path.join(staging, "new", name, file), data)
        moves += _move(os.path.join(root, INDEX_NAME), os.path.join(staging, "old", INDEX_NAME))
        for name in payloads:
            member = os.path.join(root, name)
            os.makedirs(member, exist_ok=True)
            for file in reversed(order):  # the old config out first
                moves += _move(os.path.join(member, file), os.path.join(staging, "old", name, file))
            _fsync_dir(member)
            for file in order:  # the new config in last
                moves += _move(os.path.join(staging, "new", name, file), os.path.join(member, file))
            _fsync_dir(member)
        _write_index(root, index)
    except BaseException:
        for src, dst in reversed(moves):
            with contextlib.suppress(OSError):
                os.replace(dst, src)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)


def _move(src: str, dst: str) -> list[tuple[str, str]]:
    """Move ``src`` to ``dst`` if it exists; the move done, as a list to extend the undo log with."""
    if not os.path.lexists(src):
        return []
    os.replace(src, dst)
    return [(src, dst)]


def import_adapter_set(
    directory: str | os.PathLike[str], params: Any, module_name: Any, **kwargs: Any
) -> tuple[dict[str, Any], dict[str, MethodConfig]]:
    """``({name: adapters}, {name: config})`` of a set written by :func:`export_adapter_set`.

    Every member's files are checked against the index's digests first (a version-1 index has none).
    """
    from jaxpeft import hf

    root = os.path.abspath(os.fspath(directory))
    index = _read_index(root, HF)
    for name in index["names"] if "digests" in index else ():
        expected = index["digests"][name]
        _verify(root, name, expected, _file_digests(os.path.join(root, name), list(expected)))
    adapters, table = {}, {}
    for name in index["names"]:
        cfg, tree = hf.import_adapters(os.path.join(root, name), params, module_name, **kwargs)
        adapters[name], table[name] = tree, cfg
    return adapters, table
