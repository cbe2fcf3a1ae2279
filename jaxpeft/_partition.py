"""Split any pytree into trainable and frozen halves and put it back together (equinox semantics)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from jaxpeft._paths import leaves_with_paths, path_str
from jaxpeft._select import compile_regex

__all__ = ["PathFilter", "combine", "frozen_paths", "partition", "path_filter", "trainable_mask"]


@dataclasses.dataclass(frozen=True)
class PathFilter:
    """A filter that sees each leaf's canonical path: True where any regex matches (``re.search``)."""

    patterns: tuple[str, ...]

    def __post_init__(self) -> None:
        for p in self.patterns:
            compile_regex(p, "path_filter")

    def __call__(self, path: str, leaf: Any) -> bool:
        return any(compile_regex(p, "path_filter").search(path) is not None for p in self.patterns)


def path_filter(*patterns: str) -> PathFilter:
    """A path-aware filter spec: ``partition(tree, path_filter(r"norm", r"head/"))`` trains matching leaves.

    Example:
      >>> import jax.numpy as jnp, jaxpeft
      >>> tree = {"dense": {"kernel": jnp.ones((2, 2))}, "norm": {"scale": jnp.ones(2)}}
      >>> jaxpeft.trainable_mask(tree, jaxpeft.path_filter(r"norm/scale$"))
      {'dense': {'kernel': False}, 'norm': {'scale': True}}
    """
    if not patterns:
        raise ValueError("path_filter() needs at least one regex, e.g. path_filter(r'norm/scale$').")
    return PathFilter(tuple(patterns))


def _is_spec(x: Any) -> bool:
    return isinstance(x, (bool, PathFilter)) or callable(x)


def _decide(spec: Any, path: str, leaf: Any) -> bool:
    if isinstance(spec, bool):
        return spec
    if isinstance(spec, PathFilter):
        return bool(spec(path, leaf))
    return bool(spec(leaf))


def frozen_paths(tree: Any) -> set[str]:
    """The paths of every leaf that is a frozen field of an adapter node in ``tree`` (``jaxpeft.FROZEN``)."""
    from jaxpeft.protocol import Adapter, frozen_fields

    out: set[str] = set()
    for path, node in leaves_with_paths(tree, is_leaf=lambda x: isinstance(x, Adapter)):
        if not isinstance(node, Adapter):
            continue
        inner = getattr(node, "adapters", None)
        holder = inner if isinstance(inner, Adapter) else node  # an adapter bank's fields live on its stacked node
        for field in frozen_fields(node):
            base = f"{path}/{field}" if path else field
            out.update(f"{base}/{p}" if p else base for p, _ in leaves_with_paths(getattr(holder, field)))
    return out


def trainable_mask(tree: Any, filter_spec: Any, *, is_leaf: Callable[[Any], bool] | None = None) -> Any:
    """A tree of bools like ``tree``: True = train, False = frozen (one polarity everywhere).

    The frozen array fields of adapter nodes (``jaxpeft.FROZEN``: LoRA-FA's A, stored VeRA projections) are always
    False, whatever ``filter_spec`` says: they are carried, never trained.

    Do not hand it to ``optax.masked`` to freeze the base: ``optax.masked(tx, mask)`` passes the *unmasked*
    leaves' raw gradients through as updates, so a frozen weight moves by its gradient (one step of that turns a
    base model into NaN/inf). Use ``jaxpeft.freeze(tx, spec)``, which gives frozen leaves zero updates and no
    state, or differentiate only the trainable half from ``partition``.

    Args:
      tree: any pytree.
      filter_spec: a bool, a callable ``leaf -> bool``, ``jaxpeft.path_filter(...)`` (sees the path), or a
        pytree prefix of ``tree`` whose leaves are those (``{"params": False, "adapters": True}``).
      is_leaf: optional ``is_leaf`` for ``tree``.

    Raises:
      ValueError: a spec leaf is none of the accepted forms, or the spec tree is not a prefix of ``tree``.
    """
    specs: dict[tuple[str, ...], Any] = {}
    for kp, spec in jax.tree_util.tree_flatten_with_path(filter_spec, is_leaf=_is_spec)[0]:
        if not _is_spec(spec):
            raise ValueError(
                f"filter spec at {path_str(kp) or '<root>'!r} is {spec!r}; expected a bool, a callable "
                "leaf -> bool, jaxpeft.path_filter(...), or a prefix tree of those."
            )
        specs[tuple(path_str([k]) for k in kp)] = spec
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    frozen = frozen_paths(tree)
    used: set[tuple[str, ...]] = set()
    mask = []
    for kp, leaf in flat:
        parts = tuple(path_str([k]) for k in kp)
        prefix = next((parts[:n] for n in range(len(parts), -1, -1) if parts[:n] in specs), None)
        if prefix is None:
            raise ValueError(
                f"`filter_spec` is not a prefix of the tree: no entry covers {'/'.join(parts)!r}. Give one entry "
                "per top-level key, e.g. {'params': False, 'adapters': True}."
            )
        used.add(prefix)
        mask.append("/".join(parts) not in frozen and _decide(specs[prefix], "/".join(parts), leaf))
    unused = sorted("/".join(p) for p in set(specs) - used if p)
    if unused and flat:
        raise ValueError(f"`filter_spec` entries {unused[:4]} match nothing in the tree; check their keys.")
    return jax.tree.unflatten(treedef, mask)


def partition(tree: Any, filter_spec: Any, *, is_leaf: Callable[[Any], bool] | None = None) -> tuple[Any, Any]:
    """``(trainable, frozen)``: two trees like ``tree`` with ``None`` where a leaf belongs to the other half.

    ``combine(trainable, frozen)`` gives ``tree`` back. Differentiate a loss with respect to ``trainable`` only
    (``jax.grad(lambda t: loss(combine(t, frozen)))``) and no gradient of a frozen leaf is computed. Frozen fields
    of adapter nodes always go to ``frozen``: ``partition(adapters, True)`` splits LoRA-FA's A (or a VeRA node's
    stored projections) from what trains.

    Example:
      >>> import jax.numpy as jnp, jaxpeft
      >>> tree = {"body": {"kernel": jnp.ones((2, 2))}, "head": {"kernel": jnp.zeros((2, 1))}}
      >>> trainable, frozen = jaxpeft.partition(tree, jaxpeft.path_filter("head/"))
      >>> trainable["body"]["kernel"] is None, trainable["head"]["kernel"].shape
      (True, (2, 1))
      >>> jaxpeft.combine(trainable, frozen)["body"]["kernel"].shape
      (2, 2)
    """
    flat, treedef = jax.tree.flatten(tree, is_leaf=is_leaf)
    keep = jax.tree.leaves(trainable_mask(tree, filter_spec, is_leaf=is_leaf))
    trainable = [x if k else None for x, k in zip(flat, keep, strict=True)]
    frozen = [None if k else x for x, k in zip(flat, keep, strict=True)]
    return jax.tree.unflatten(treedef, trainable), jax.tree.unflatten(treedef, frozen)


def combine(*trees: Any) -> Any:
    """Leaf-wise first non-``None`` of trees with ``None`` placeholders: the inverse of ``partition``.

    Example:
      >>> import jaxpeft
      >>> jaxpeft.combine({"a": 1, "b": None}, {"a": None, "b": 2})
      {'a': 1, 'b': 2}
    """
    if not trees:
        raise ValueError("combine() needs at least one tree.")

    def first(*leaves: Any) -> Any:
        return next((x for x in leaves if x is not None), None)

    return jax.tree.map(first, *trees, is_leaf=lambda x: x is None)
