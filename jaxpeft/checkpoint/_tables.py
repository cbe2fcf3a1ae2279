"""Tables of paths, shapes, dtypes and adapter nodes, and the diffs between two tables that errors name."""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxpeft import quant
from jaxpeft._paths import leaves_with_paths, set_path
from jaxpeft.protocol import MethodConfig, adapter_items

#: How many entries an error lists before "and N more".
MAX_LISTED = 8


def listed(lines: Sequence[str]) -> str:
    """``lines`` joined by "; ", the first ``MAX_LISTED`` of them and a count of the rest."""
    shown = "; ".join(lines[:MAX_LISTED])
    return shown + (f"; and {len(lines) - MAX_LISTED} more" if len(lines) > MAX_LISTED else "")


# ------------------------------------------------------------------------------------------------ arrays


def abstract(leaf: Any) -> jax.ShapeDtypeStruct:
    """The shape and dtype of an array (or ``ShapeDtypeStruct``), without its sharding."""
    return jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype)


def shape_dtype(leaf: Any) -> list[Any]:
    """``[shape, dtype name]`` of an array or ``ShapeDtypeStruct`` (JSON-ready, compares equal to its JSON)."""
    return [[int(d) for d in leaf.shape], jnp.dtype(leaf.dtype).name]


def shape_table(flat: Mapping[str, Any]) -> dict[str, list[Any]]:
    return {path: shape_dtype(leaf) for path, leaf in sorted(flat.items())}


def digest(table: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()


def fingerprint(params: Any) -> dict[str, Any]:
    """The base-model fingerprint stored in every checkpoint: ``{"digest": sha256, "params": {path: [shape, dtype]}}``.

    Only paths, shapes and dtypes enter it, never values; ``params`` may be abstract (``jax.ShapeDtypeStruct``).
    """
    table = shape_table(dict(leaves_with_paths(params)))
    return {"digest": digest(table), "params": table}


# ------------------------------------------------------------------------------------------------ residual base

#: How many entries of each base-adjusted weight the residual fingerprint samples.
SAMPLES = 16


def sample_positions(size: int, count: int = SAMPLES) -> list[int]:
    """``count`` fixed flat positions spread evenly over ``size`` entries (every entry when there are fewer)."""
    if size <= count:
        return list(range(size))
    return [((2 * i + 1) * size) // (2 * count) for i in range(count)]


def is_concrete(leaf: Any) -> bool:
    """Whether a param (a quantised one included) holds values, not ``jax.ShapeDtypeStruct``s or tracers."""
    leaves = jax.tree.leaves(leaf)
    return bool(leaves) and all(
        isinstance(x, (jax.Array, np.ndarray)) and not isinstance(x, jax.core.Tracer) for x in leaves
    )


@functools.partial(jax.jit, static_argnums=1)
def _take(weight: Any, positions: tuple[int, ...]) -> jax.Array:
    """The entries of ``weight`` (dequantised if quantised) at flat ``positions``; any sharding, under jit."""
    values = quant.dequantize(weight)
    if values.ndim == 0:
        return values.reshape(1)
    index = np.unravel_index(np.asarray(positions, np.int64), values.shape)
    return values[tuple(jnp.asarray(i) for i in index)]


def _bits(values: np.ndarray) -> list[int]:
    """The bit patterns of ``values`` (compared exactly: -0.0 and 0.0 differ, and so do NaN payloads)."""
    return [int(b) for b in values.view(np.dtype(f"uint{8 * values.dtype.itemsize}")).ravel()]


def sample_entries(weight: Any, positions: Sequence[int]) -> list[int]:
    """The bit patterns of ``weight``'s entries at flat ``positions``, in the weight's (logical) dtype.

    ``weight`` is a concrete array (a ``QuantizedArray`` is dequantised), sharded in any way: the entries are
    gathered under ``jit``, and a result that this process cannot address whole (a multi-process job) is
    all-gathered, so every process computes the same sample (all must call this, as they all save and restore).
    """
    if not positions:
        return []
    taken = _take(weight, tuple(int(p) for p in positions))
    if not taken.is_fully_addressable:
        taken = multihost_utils.process_allgather(taken, tiled=True)
    return _bits(np.asarray(jax.device_get(taken)))


def residual_entry(weight: Any, positions: Sequence[int] | None = None) -> dict[str, Any]:
    """A residual weight's fingerprint ``{"shape", "dtype", "positions", "bits"}`` at ``positions`` (default:
    :func:`sample_positions` of its size), JSON-ready; the bits compare exactly."""
    size = math.prod(weight.shape)
    where = sample_positions(size) if positions is None else [int(p) for p in positions]
    shape, dtype = shape_dtype(weight)
    return {"shape": shape, "dtype": dtype, "positions": where, "bits": sample_entries(weight, where)}


def _decoded(bits: int, dtype: str) -> str:
    """One sampled entry as a number, for an error message."""
    try:
        kind = jnp.dtype(dtype)
        value = np.asarray(bits, np.dtype(f"uint{8 * kind.itemsize}")).view(kind)
        return str(value[()])  # the shortest text that reads back to the entry in its dtype
    except (TypeError, ValueError, OverflowError):
        return hex(bits)


def residual_diff(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Lines naming each path whose residual fingerprint differs, with the first differing entry."""
    lines = []
    for path in sorted(saved):
        old, new = saved[path], current.get(path)
        if new is None:
            lines.append(f"path {path!r} is not in these params")
        elif (old["shape"], old["dtype"]) != (new["shape"], new["dtype"]):
            lines.append(
                f"path {path!r} is {_show([new['shape'], new['dtype']])}, the checkpoint's residual "
                f"{_show([old['shape'], old['dtype']])}"
            )
        elif old["bits"] != new["bits"]:
            entries = list(zip(old["positions"], old["bits"], new["bits"], strict=True))
            changed = [(pos, was, now) for pos, was, now in entries if was != now]
            pos, was, now = changed[0]
            lines.append(
                f"path {path!r} differs: {len(changed)} of {len(entries)} sampled entries, e.g. flat entry {pos}: "
                f"checkpoint {_decoded(was, old['dtype'])}, now {_decoded(now, new['dtype'])}"
            )
    return lines


def nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a/b": x}`` as ``{"a": {"b": x}}``."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        tree = set_path(tree, path, value)
    return tree


def array_leaves(tree: Any, what: str, *, abstract: bool = False) -> dict[str, Any]:
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
            f"`{what}` has leaves whose paths collide once their keys are joined with '/': {clashes[:MAX_LISTED]}; "
            "use keys without '/'."
        )
    return flat


def _prefixes(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


# ------------------------------------------------------------------------------------------------ adapter nodes


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


def node_table(adapters: Any) -> dict[str, dict[str, Any]]:
    """``{path: {"type", "arrays": {field: [shape, dtype]}, "layout", "static"}}`` of an (abstract or concrete)
    adapter tree."""
    table = {}
    for path, node in sorted(adapter_items(adapters)):
        lay = node.layout
        table[path] = {
            "type": type(node).__name__,
            "arrays": shape_table(dict(leaves_with_paths(node))),
            "layout": {"stack": lay.stack, "fan_in": lay.fan_in, "fan_out": lay.fan_out, "kind": lay.kind},
            "static": _statics(node),
        }
    return table


def node_diff(
    old: Mapping[str, Any], new: Mapping[str, Any], free: Sequence[str], what: str, left: str, right: str
) -> tuple[list[str], list[str]]:
    """``(lines, static_lines)``: where two node tables differ in paths, types, arrays or layouts, then (only
    where those agree) in the static parts but the ``free`` fields; an entry saved without static parts (format
    version 2) compares none."""

    def shapes(table: Mapping[str, Any]) -> dict[str, Any]:
        return {p: {k: v for k, v in e.items() if k != "static"} for p, e in table.items()}

    def statics(table: Mapping[str, Any], other: Mapping[str, Any]) -> dict[str, Any]:
        return {
            p: {f" {k}": v for k, v in e["static"].items() if k not in free}  # labels as in diff_table
            for p, e in table.items()
            if "static" in e and "static" in other.get(p, {"static": None})
        }

    lines = diff_table(shapes(old), shapes(new), what, left, right)
    if lines:
        return lines, []
    return [], diff_table(statics(old, new), statics(new, old), f"{what} static part", left, right)


# ------------------------------------------------------------------------------------------------ diffs


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


def diff_table(
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


def config_diff(cfg: MethodConfig, saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Lines naming each config field (but the ``restore_free`` ones) whose saved value differs from the current."""
    keys = sorted((set(saved) | set(current)) - set(cfg.restore_free))
    return [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]
