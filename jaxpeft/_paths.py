"""Canonical path strings for pytree leaves ("layers/q_proj/kernel") and small helpers over them."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax

__all__ = ["key_str", "leaves_with_paths", "map_with_paths", "path_str", "set_path"]


def key_str(key: Any) -> str:
    """One path entry as text: dict keys, attribute names and sequence indices alike."""
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return str(key.name)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    name = getattr(key, "key", None)
    if name is None:
        name = getattr(key, "name", key)
    return str(name)


def path_str(keypath: Iterable[Any]) -> str:
    """The canonical path string of a JAX key path: entries joined by "/"."""
    return "/".join(key_str(k) for k in keypath)


def leaves_with_paths(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> list[tuple[str, Any]]:
    """``[(path, leaf), ...]`` in the tree's flattening order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_str(kp), leaf) for kp, leaf in flat]


def map_with_paths(fn: Callable[[str, Any], Any], tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> Any:
    """``jax.tree.map`` whose function also receives each leaf's canonical path."""
    return jax.tree_util.tree_map_with_path(lambda kp, x: fn(path_str(kp), x), tree, is_leaf=is_leaf)


def set_path(tree: Mapping[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of nested mappings with ``path`` set to ``value`` (only the spine is copied)."""
    head, _, rest = path.partition("/")
    out = dict(tree)
    if rest:
        out[head] = set_path(tree.get(head, {}), rest, value)
    else:
        out[head] = value
    return out
