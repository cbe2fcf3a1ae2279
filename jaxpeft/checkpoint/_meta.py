"""The ``meta`` item of a step: the format's names, the JSON written on save, its validation and reading."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import orbax.checkpoint as ocp

from jaxpeft._select import Layout
from jaxpeft.checkpoint._tables import MAX_LISTED, digest

FORMAT = "jaxpeft.adapter_checkpoint"
#: The format version written; version 3 added each adapter's static parts (``static``) to the metadata. A step
#: of a base-adjusting config (PiSSA, OLoRA) also holds the optional ``residual`` fingerprint (steps without it, from
#: an older jaxpeft, still restore, with a warning; an older jaxpeft ignores it), so the version stays 3.
VERSION = 3
#: The format versions read (version 2 lacks the static parts: they are not compared).
READ_VERSIONS = (2, 3)
#: The orbax items of a step.
ADAPTERS, EXTRA, OPT, META = "adapters", "extra", "opt_state", "meta"


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def clip(err: BaseException, limit: int = 300) -> str:
    """A dependency's error message, cut (tensorstore's hold whole specs)."""
    text = str(err)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def meta_file(step_directory: str) -> str:
    """The metadata file of a step directory."""
    return os.path.join(step_directory, META, "metadata")


def new_meta(
    step: int,
    config: Mapping[str, Any],
    adapters: Mapping[str, Any],
    base: Mapping[str, Any],
    *,
    residual: Mapping[str, Any] | None = None,
    **items: Any,
) -> dict[str, Any]:
    """The metadata of a step: its number, the config's dict, the adapters' node table, the base fingerprint, the
    shape tables of the optional items (None for an item not saved) and, for a base-adjusting config only, the
    ``residual`` fingerprint ``{"adjustment": cfg.base_adjustment, "params": {path: {"shape", "dtype",
    "positions", "bits"}}}`` (sampled entries of each adjusted weight, as bit patterns)."""
    meta = {"format": FORMAT, "version": VERSION, "step": step, "config": config, "adapters": adapters, "base": base}
    if residual is not None:
        meta["residual"] = residual
    return {**meta, **items}


# ------------------------------------------------------------------------------------------------ validation


def _is_shape_dtype(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], list)
        and all(is_int(d) and d >= 0 for d in value[0])
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


def _base_problem(base: Any) -> str | None:
    """Why the ``base`` fingerprint of the metadata is malformed, or None."""
    if not isinstance(base, dict) or not isinstance(base.get("digest"), str):
        shown = "missing" if base == "missing" else _short(base)
        return f'`base` is {shown}, expected {{"digest": sha256, "params": {{path: [shape, dtype]}}}}'
    problem = _table_problem(base.get("params"), "base.params")
    if problem is not None:
        return problem
    if digest(base["params"]) != base["digest"]:
        return (
            "`base.digest` is not the sha256 of `base.params` although that table of paths, shapes and dtypes is "
            "well formed (one of the two was edited)"
        )
    return None


def _residual_entry_problem(entry: Any) -> str | None:
    """Why one weight's residual fingerprint is malformed, or None."""
    if not isinstance(entry, dict) or not _is_shape_dtype([entry.get("shape"), entry.get("dtype")]):
        return f"is {_short(entry)}, expected an object with `shape`, `dtype`, `positions`, `bits`"
    size = math.prod(entry["shape"])
    positions, bits = entry.get("positions"), entry.get("bits")
    if not isinstance(positions, list) or not all(is_int(p) and 0 <= p < size for p in positions):
        return f"`positions` is {_short(positions)}, expected flat indices below the size {size}"
    if not isinstance(bits, list) or len(bits) != len(positions) or not all(is_int(b) and b >= 0 for b in bits):
        return f"`bits` is {_short(bits)}, expected one bit pattern (a non-negative integer) per position"
    return None


def _residual_problem(residual: Any, adapters: Mapping[str, Any]) -> str | None:
    """Why the ``residual`` fingerprint of the metadata is malformed, or None."""
    if not isinstance(residual, dict) or not isinstance(residual.get("adjustment"), str):
        return f'`residual` is {_short(residual)}, expected {{"adjustment": str, "params": {{path: entry}}}}'
    params = residual.get("params")
    if not isinstance(params, dict) or set(params) != set(adapters):
        shown = sorted(params) if isinstance(params, dict) else params
        return f"`residual.params` is {_short(shown)}, expected an object over the adapted paths {sorted(adapters)}"
    for path, entry in params.items():
        problem = _residual_entry_problem(entry)
        if problem is not None:
            return f"`residual.params`[{path!r}] {problem}"
    return None


def meta_problem(meta: dict[str, Any], step: int | None) -> str | None:
    """Why the metadata of a jaxpeft step (``format`` already checked) is malformed, or None."""
    version = meta.get("version")
    if not is_int(version) or version not in READ_VERSIONS:
        return f"`version` is {_short(version)}"
    if not is_int(meta.get("step")) or (step is not None and meta["step"] != step):
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
    problem = _base_problem(meta.get("base", "missing"))
    if problem is not None:
        return problem
    if "residual" in meta:
        problem = _residual_problem(meta["residual"], adapters)
        if problem is not None:
            return problem
    for item in (OPT, EXTRA):
        if item not in meta:
            return f"`{item}` is missing, expected null or an object {{path: [shape, dtype]}}"
        if meta[item] is not None:
            problem = _table_problem(meta[item], item)
            if problem is not None:
                return problem
    return None


# ------------------------------------------------------------------------------------------------ reading


def read_meta(manager: ocp.CheckpointManager, directory: str, step: int) -> dict[str, Any]:
    """The checked metadata of ``step``; a ``ValueError`` names the file, what is wrong and what to do."""
    where = f"checkpoint step {step} in {directory!r}"
    path = meta_file(os.path.join(directory, str(step)))
    if "://" not in directory and not os.path.isfile(path):
        found = sorted(os.listdir(os.path.dirname(os.path.dirname(path))))
        raise ValueError(
            f"{where} is not a jaxpeft adapter checkpoint: it has no metadata file {path} (it holds "
            f"{found[:MAX_LISTED]}); it was written by another program or damaged. Open the directory the adapters "
            "were saved in."
        )
    try:
        meta = manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{where}: its metadata file {path} is not valid JSON ({err}); it was truncated or edited. Restore "
            "another step, or save this one again."
        ) from None
    except Exception as err:
        raise ValueError(
            f"{where}: its metadata ({path}) could not be read ({type(err).__name__}: {clip(err)}); the step is "
            "damaged or not a jaxpeft adapter checkpoint. Restore another step."
        ) from err
    _check_format(meta, where, path)
    problem = meta_problem(meta, step)
    if problem is not None:
        raise ValueError(
            f"{where}: its metadata ({path}) is malformed: {problem}. The file was edited or damaged: restore "
            "another step, or save this one again."
        )
    return meta


def _check_format(meta: Any, where: str, path: str) -> None:
    """Raise when ``meta`` is not a jaxpeft checkpoint's, or of a format version this jaxpeft does not read."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        shown = _short(meta.get("format")) if isinstance(meta, dict) else f"none (it is a JSON {type(meta).__name__})"
        raise ValueError(
            f"{where} is not a jaxpeft adapter checkpoint: its metadata ({path}) has format {shown}, "
            f"expected {FORMAT!r}. Open the directory the adapters were saved in."
        )
    version = meta.get("version")
    if not is_int(version) or version not in READ_VERSIONS:
        raise ValueError(
            f"{where} has format version {_short(version)} ({path}); this jaxpeft reads versions "
            f"{list(READ_VERSIONS)}. Read it with the jaxpeft that wrote it (upgrade, if that one is newer)."
        )
