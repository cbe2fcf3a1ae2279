"""Step numbers and step directories: validation, incomplete and foreign steps, rename-then-delete pruning, and
the orbax manager that lists them."""

from __future__ import annotations

import contextlib
import json
import operator
import os
import re
import shutil
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from jaxpeft.checkpoint._meta import ADAPTERS, EXTRA, FORMAT, META, OPT, meta_file, meta_problem
from jaxpeft.checkpoint._tables import MAX_LISTED, listed

#: Where pruned steps are renamed before they are deleted (orbax's ``todelete_subdir``; not a step name).
TRASH = ".jaxpeft-deleting"
_STEP_NAME = re.compile(r"[0-9]+")


def check_step(step: Any) -> int:
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


def resolve_step(steps: Sequence[int], incomplete: Mapping[int, str], directory: str, step: Any) -> int:
    """``step`` checked against the complete ``steps``, or the latest of them when ``step`` is None."""
    if step is None:
        if not steps:
            skipped = f" (incomplete steps skipped: {step_list(incomplete)})" if incomplete else ""
            raise FileNotFoundError(f"no complete checkpoint in {directory!r}{skipped}.")
        return steps[-1]
    step = check_step(step)
    if step in incomplete:
        raise FileNotFoundError(
            f"step {step} in {directory!r} is incomplete ({incomplete[step]}); complete steps are {list(steps)}."
        )
    if step not in steps:
        raise FileNotFoundError(f"`step`={step!r} is not in {directory!r}; complete steps are {list(steps)}.")
    return step


def step_list(reasons: Mapping[int, str]) -> str:
    """``{step: why}`` as ``"step 3: why; step 5: why"``."""
    return listed([f"step {s}: {why}" for s, why in sorted(reasons.items())])


def complete_steps(manager: ocp.CheckpointManager, incomplete: Mapping[int, str]) -> list[int]:
    """The steps the manager lists but the incomplete ones, ascending."""
    return sorted(s for s in manager.all_steps() if s not in incomplete)


# ------------------------------------------------------------------------------------------------ step directories


def _step_problem(path: str) -> tuple[str, str] | None:
    """``("incomplete" | "foreign", why)`` for a step directory that cannot be restored as a jaxpeft step
    because files are missing or it is another program's; None when complete (or malformed: reported on use)."""
    metadata = meta_file(path)
    if not os.path.isfile(metadata):
        ours = any(os.path.isdir(os.path.join(path, item)) for item in (META, ADAPTERS))
        if ours or not any(files for _, _, files in os.walk(path)):
            return "incomplete", "meta/metadata is missing"
        return "foreign", f"it holds {sorted(os.listdir(path))[:MAX_LISTED]} and no jaxpeft metadata"
    try:
        with open(metadata, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return "foreign", "its metadata is not a jaxpeft adapter checkpoint's"
    if meta_problem(meta, None) is not None:
        return None
    for item in (ADAPTERS, OPT, EXTRA):
        if meta[item] and not os.path.isfile(os.path.join(path, item, "_METADATA")):
            return "incomplete", f"{item}/_METADATA is missing"
    return None


def scan_steps(directory: str) -> tuple[dict[int, str], dict[int, str], list[str]]:
    """``({step: why incomplete}, {step: why foreign}, the incomplete steps' directory names)`` over the step
    directories of a local checkpoint directory (a remote one is not scanned)."""
    incomplete: dict[int, str] = {}
    foreign: dict[int, str] = {}
    names: list[str] = []
    if "://" in directory or not os.path.isdir(directory):
        return incomplete, foreign, names
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if not _STEP_NAME.fullmatch(name) or not os.path.isdir(path):
            continue
        try:
            problem = _step_problem(path)
        except FileNotFoundError:  # removed meanwhile (a writer's pruning)
            continue
        if problem is not None and problem[0] == "incomplete":
            incomplete[int(name)] = problem[1]
            names.append(name)
        elif problem is not None:
            foreign[int(name)] = problem[1]
    return incomplete, foreign, names


def empty_trash(directory: str, *, remove: bool = False) -> None:
    """Delete the pruned steps renamed into the trash (none of them is listed any more)."""
    trash = os.path.join(directory, TRASH)
    try:
        entries = os.listdir(trash)
    except OSError:
        return
    for entry in entries:
        shutil.rmtree(os.path.join(trash, entry), ignore_errors=True)
    if remove:
        with contextlib.suppress(OSError):
            os.rmdir(trash)


def discard(directory: str, names: Sequence[str]) -> None:
    """Rename step directories out of the listing (atomic), then delete them."""
    trash = os.path.join(directory, TRASH)
    os.makedirs(trash, exist_ok=True)
    for name in names:
        os.rename(os.path.join(directory, name), os.path.join(trash, f"{name}.{uuid.uuid4().hex[:8]}"))
    empty_trash(directory)


# ------------------------------------------------------------------------------------------------ orbax


def open_manager(directory: str, *, read_only: bool, **options: Any) -> ocp.CheckpointManager:
    """One orbax manager with every item registered (a fresh process can restore without having saved)."""
    if read_only and "://" not in directory and not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint directory {directory!r}.")
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for item in (ADAPTERS, EXTRA, OPT):
        handler = ocp.StandardCheckpointHandler()
        registry.add(item, ocp.args.StandardSave, handler)
        registry.add(item, ocp.args.StandardRestore, handler)
    json_handler = ocp.JsonCheckpointHandler()
    registry.add(META, ocp.args.JsonSave, json_handler)
    registry.add(META, ocp.args.JsonRestore, json_handler)
    manager_options = ocp.CheckpointManagerOptions(
        # read_only: never create the directory nor remove a running job's in-progress temporary directories.
        cleanup_tmp_directories=not read_only,
        create=not read_only,
        # Pruning renames a step into the trash first (atomic) and jaxpeft deletes it from there: a kill during
        # the deletion leaves no half-deleted step listed.
        todelete_subdir=None if read_only or "://" in directory else TRASH,
        # Temporary directories are created before `save` returns: when that fails (a read-only or removed
        # directory) `save` raises, instead of orbax's writer threads waiting 300 s at exit for a signal that
        # never comes.
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        **options,
    )
    return ocp.CheckpointManager(directory, options=manager_options, handler_registry=registry)
