"""Named adapter sets on disk: one orbax checkpoint, or one HF PEFT adapter directory, per named adapter.

A set is ``{name: adapter tree}`` with a config per name (one config for all, or ``{name: config}``). On disk it is
a directory holding ``adapter_set.json`` (the names in order, so a bank stacked from a restored set gives every
adapter the same id as before, and each name's method) and one sub-directory per name: a
``jaxpeft.checkpoint`` directory (``save_adapter_set``) or the files ``PeftModel.save_pretrained`` writes for a
non-default adapter (``export_adapter_set``; PEFT loads them with ``PeftModel.from_pretrained(model, dir/name,
adapter_name=name)`` and ``load_adapter(dir/other, adapter_name=other)``). Stack a set for serving with
``jaxpeft.stack_adapters`` and combine it with ``jaxpeft.add_weighted_adapter``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from jaxpeft.protocol import MethodConfig

__all__ = ["INDEX_NAME", "export_adapter_set", "import_adapter_set", "restore_adapter_set", "save_adapter_set"]

#: The file naming a set's adapters, in order.
INDEX_NAME = "adapter_set.json"


def _names(named: Mapping[str, Any]) -> list[str]:
    if not isinstance(named, Mapping) or not named:
        raise ValueError("`named` must be a non-empty mapping {name: adapter tree}.")
    names = list(named)
    for name in names:
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
            raise ValueError(
                f"adapter name {name!r} cannot be a directory name; use a non-empty name without '/' (e.g. 'fr')."
            )
        if name == INDEX_NAME:
            raise ValueError(f"adapter name {name!r} is reserved for the set's index file.")
    return names


def _configs(names: list[str], configs: MethodConfig | Mapping[str, MethodConfig]) -> dict[str, MethodConfig]:
    if isinstance(configs, MethodConfig):
        return dict.fromkeys(names, configs)
    if not isinstance(configs, Mapping) or set(configs) != set(names):
        got = sorted(configs) if isinstance(configs, Mapping) else type(configs).__name__
        raise ValueError(f"`configs` must be one method config or one per adapter {names}; got {got}.")
    return dict(configs)


def _write_index(directory: str, names: list[str], configs: Mapping[str, MethodConfig], kind: str) -> None:
    index = {"format": kind, "names": names, "methods": {n: configs[n].method for n in names}}
    tmp = os.path.join(directory, f".{INDEX_NAME}.tmp")
    with open(tmp, "w") as f:
        json.dump(index, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, INDEX_NAME))


def read_index(directory: str | os.PathLike[str], kind: str) -> list[str]:
    """The adapter names of a set directory, in order; a clear error when it is not a set of this ``kind``."""
    path = os.path.join(os.fspath(directory), INDEX_NAME)
    try:
        with open(path) as f:
            index = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path!r} does not exist: {os.fspath(directory)!r} is not an adapter set directory (written by "
            "jaxpeft.adapter_sets.save_adapter_set / export_adapter_set). For one adapter use "
            "jaxpeft.checkpoint.restore_adapters / jaxpeft.hf.import_adapters."
        ) from None
    except (OSError, ValueError) as err:
        raise ValueError(f"{path!r} is not a readable adapter set index: {err}") from None
    if not isinstance(index, dict) or index.get("format") != kind:
        got = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise ValueError(f"{path!r} describes a set of format {got!r}; expected {kind!r}.")
    names = index.get("names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path!r} has no list of adapter names.")
    _names(dict.fromkeys(names))
    return names


def save_adapter_set(
    directory: str | os.PathLike[str],
    named: Mapping[str, Any],
    configs: MethodConfig | Mapping[str, MethodConfig],
    params: Any,
    *,
    step: int = 0,
    **options: Any,
) -> str:
    """Save each named adapter as its own ``jaxpeft.checkpoint`` directory ``directory/<name>`` (one step).

    Every check of ``jaxpeft.checkpoint.save_adapters`` runs per adapter (config, base fingerprint, shapes); the
    index is written last, so an interrupted save leaves no index naming a missing adapter. ``options`` as for
    ``save_adapters`` (``layouts``, ...).

    Returns:
      The set's absolute directory.
    """
    from jaxpeft.checkpoint import save_adapters

    names = _names(named)
    table = _configs(names, configs)
    root = os.path.abspath(os.fspath(directory))
    os.makedirs(root, exist_ok=True)
    for name in names:
        save_adapters(os.path.join(root, name), step, named[name], table[name], params, **options)
    _write_index(root, names, table, "jaxpeft.checkpoint")
    return root


def restore_adapter_set(
    directory: str | os.PathLike[str],
    params: Any,
    *,
    configs: MethodConfig | Mapping[str, MethodConfig] | None = None,
    step: int | None = None,
    **options: Any,
) -> tuple[dict[str, Any], dict[str, MethodConfig]]:
    """``({name: adapters}, {name: config})`` of a set saved by :func:`save_adapter_set`, in its saved order.

    Without ``configs`` each adapter's config is read from its checkpoint (``jaxpeft.checkpoint.read_config``).
    """
    from jaxpeft.checkpoint import read_config, restore_adapters

    names = read_index(directory, "jaxpeft.checkpoint")
    root = os.fspath(directory)
    table = (
        {n: read_config(os.path.join(root, n), step) for n in names} if configs is None else _configs(names, configs)
    )
    out = {}
    for name in names:
        restored = restore_adapters(os.path.join(root, name), table[name], params, step=step, **options)
        out[name] = restored.adapters
    return out, table


def export_adapter_set(
    directory: str | os.PathLike[str],
    named: Mapping[str, Any],
    configs: MethodConfig | Mapping[str, MethodConfig],
    params: Any,
    module_name: Any,
    **kwargs: Any,
) -> str:
    """Write each named adapter as a HF PEFT adapter directory ``directory/<name>`` (``jaxpeft.hf.export_adapters``).

    ``kwargs`` go to every export (``layouts``, ``task_type``, ...). Returns the set's absolute directory.
    """
    from jaxpeft import hf

    names = _names(named)
    table = _configs(names, configs)
    root = os.path.abspath(os.fspath(directory))
    os.makedirs(root, exist_ok=True)
    for name in names:
        hf.export_adapters(os.path.join(root, name), named[name], table[name], params, module_name, **kwargs)
    _write_index(root, names, table, "hf-peft")
    return root


def import_adapter_set(
    directory: str | os.PathLike[str], params: Any, module_name: Any, **kwargs: Any
) -> tuple[dict[str, Any], dict[str, MethodConfig]]:
    """``({name: adapters}, {name: config})`` of a set written by :func:`export_adapter_set`."""
    from jaxpeft import hf

    names = read_index(directory, "hf-peft")
    adapters, table = {}, {}
    for name in names:
        cfg, tree = hf.import_adapters(os.path.join(os.fspath(directory), name), params, module_name, **kwargs)
        adapters[name], table[name] = tree, cfg
    return adapters, table
