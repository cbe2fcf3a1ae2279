"""Abstract restore targets: each array's shape, dtype and sharding, and the tree it is rebuilt into.

A restored leaf takes, in this order: the sharding of its leaf in the ``*_like`` tree; ``sharding=``; the sharding
derived from the base params' ``NamedSharding``s (when they carry any); the first local device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from jaxpeft import quant
from jaxpeft._paths import leaves_with_paths, map_with_paths
from jaxpeft.checkpoint._meta import ADAPTERS, EXTRA, OPT
from jaxpeft.checkpoint._tables import MAX_LISTED, abstract, array_leaves, diff_table, listed, shape_table
from jaxpeft.sharding import adapter_shardings, optimizer_shardings

ShardingSpec = Sharding | Callable[[str, jax.ShapeDtypeStruct], Sharding] | None

#: How to restore an optional item that a step holds (for the error when neither a target nor ``skip`` is given).
HOW = {
    OPT: "opt_state_like=jax.eval_shape(tx.init, trainable) (the same optimizer over the same trees, e.g. "
    "`adapters` or `(adapters, extra)`)",
    EXTRA: "extra_like=<the tree you saved as `extra`, or its jax.eval_shape>",
}


# ------------------------------------------------------------------------------------------------ shardings


def placed_params(params: Any) -> dict[str, jax.ShapeDtypeStruct] | None:
    """``{path: ShapeDtypeStruct}`` of the params with each leaf's ``NamedSharding`` (None where a leaf has
    none), or None when no leaf has one: the base that default restore shardings derive from."""

    def named(leaf: Any) -> NamedSharding | None:
        sharding = getattr(leaf, "sharding", None)
        return sharding if isinstance(sharding, NamedSharding) else None

    flat = leaves_with_paths(params, is_leaf=quant.is_quantized)  # a quantised weight counts as replicated
    if not any(named(x) is not None for _, x in flat):
        return None
    return {p: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=named(x)) for p, x in flat}


def derive(base: Mapping[str, jax.ShapeDtypeStruct], expected: Any, likes: Mapping[str, Any]) -> dict[str, Any]:
    """``{item: {path: NamedSharding}}`` derived from the base params' shardings (a param without one counts as
    replicated): each adapter array's from its base weight's (``jaxpeft.sharding.adapter_shardings``), each
    ``extra`` leaf the sharding of the param at its path when it has that param's shape (else replicated), and the
    optimizer state's following both (``jaxpeft.sharding.optimizer_shardings``)."""
    specs = {p: x.sharding if x.sharding is not None else PartitionSpec() for p, x in base.items()}
    derived = {ADAPTERS: dict(leaves_with_paths(adapter_shardings(expected, specs)))}
    replicated = NamedSharding(next(s.mesh for s in specs.values() if isinstance(s, NamedSharding)), PartitionSpec())

    def extra_sharding(path: str, leaf: Any) -> Sharding:
        param = base.get(path)
        if param is not None and param.sharding is not None and param.shape == tuple(leaf.shape):
            return param.sharding
        return replicated

    if likes.get(EXTRA) is not None:
        flat = array_leaves(likes[EXTRA], "extra_like", abstract=True)
        derived[EXTRA] = {p: extra_sharding(p, x) for p, x in flat.items()}
    if likes.get(OPT) is not None:
        trainable = {**derived[ADAPTERS], **derived.get(EXTRA, {})}
        derived[OPT] = dict(leaves_with_paths(optimizer_shardings(likes[OPT], trainable)))
    return derived


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a restored array that no ``*_like`` leaf places goes: ``sharding`` when given, else its derived
    sharding (``{item: {path: sharding}}``), else the first local device."""

    sharding: ShardingSpec
    derived: Mapping[str, Mapping[str, Sharding]]

    def __call__(self, item: str, path: str, leaf: jax.ShapeDtypeStruct) -> Sharding:
        if isinstance(self.sharding, Sharding):
            return self.sharding
        if self.sharding is not None:
            return self.sharding(path, leaf)
        found = self.derived.get(item, {}).get(path)
        return found if found is not None else SingleDeviceSharding(jax.local_devices()[0])


# ------------------------------------------------------------------------------------------------ targets


@dataclasses.dataclass(frozen=True)
class Target:
    """How one item is restored: the sharded abstract array per path, and a tree of the structure to rebuild."""

    arrays: dict[str, jax.ShapeDtypeStruct]
    like: Any

    @classmethod
    def build(
        cls, item: str, arrays: Mapping[str, Any], likes: Mapping[str, Any], like: Any, place: Placement
    ) -> Target:
        """The target of ``arrays`` (``{path: array or ShapeDtypeStruct}``), each sharded as its leaf in ``likes``
        or, without one, by ``place``; rebuilt into ``like``."""
        targets = {}
        for path, leaf in arrays.items():
            plain = abstract(leaf)
            found = getattr(likes.get(path), "sharding", None)
            found = found if found is not None else place(item, path, plain)
            targets[path] = jax.ShapeDtypeStruct(plain.shape, plain.dtype, sharding=found)
        return cls(targets, like)

    def rebuild(self, restored: Any, item: str, step: int) -> Any:
        """``like`` filled with the restored arrays; raises if any leaf would stay missing or abstract."""
        found = dict(leaves_with_paths(restored))
        missing = sorted(set(self.arrays) - set(found))
        unfilled = sorted(p for p, x in found.items() if not isinstance(x, jax.Array))
        if missing or unfilled:
            raise ValueError(
                f"restoring step {step} would leave {item} leaves unfilled: missing {missing[:MAX_LISTED]}, "
                f"abstract {unfilled[:MAX_LISTED]}; the checkpoint is incomplete."
            )
        return map_with_paths(lambda path, _: found[path], self.like)


def adapter_target(expected: Any, adapters_like: Any, place: Placement) -> Target:
    """The target of the adapters: ``expected`` (the method's abstract init), sharded as ``adapters_like``."""
    planned = dict(leaves_with_paths(expected))
    like = dict(leaves_with_paths(adapters_like)) if adapters_like is not None else {}
    if adapters_like is not None:
        shapes = {p: list(x.shape) for p, x in planned.items()}
        diff = diff_table(
            shapes, {p: list(x.shape) for p, x in like.items()}, "adapter array", right="in `adapters_like`"
        )
        if diff:
            raise ValueError(f"`adapters_like` does not match the adapters in the checkpoint: {listed(diff)}.")
    return Target.build(ADAPTERS, planned, like, expected, place)


def aux_target(item: str, like: Any, saved: Mapping[str, Any] | None, where: str, place: Placement) -> Target:
    """The target of an optional item (``opt_state``, ``extra``) from its ``*_like`` tree, checked against ``saved``."""
    if saved is None:
        raise ValueError(f"{where} has no `{item}` (it was saved without one); pass {item}_like=None.")
    flat = array_leaves(like, f"{item}_like", abstract=True)
    diff = diff_table(saved, shape_table(flat), f"{item} leaf", right=f"in `{item}_like`")
    if diff:
        raise ValueError(
            f"`{item}_like` does not match the `{item}` saved in {where}: {listed(diff)}. Pass {HOW[item]}."
        )
    return Target.build(item, flat, flat, like, place)


def check_skip(skip: Sequence[str], likes: Mapping[str, Any]) -> None:
    """Raise when ``skip`` is a string, names an unknown item, or one whose ``*_like`` is given too."""
    if isinstance(skip, str):
        raise ValueError(f"`skip`={skip!r} is a string; pass a tuple of item names, e.g. skip=({skip!r},).")
    unknown = sorted(set(skip) - set(likes))
    if unknown:
        raise ValueError(f"`skip`={tuple(skip)!r}: unknown items {unknown}; expected 'opt_state' and/or 'extra'.")
    both = [item for item in skip if likes[item] is not None]
    if both:
        raise ValueError(f"`skip` names {both[0]!r} but `{both[0]}_like` is given too; pass one or the other.")
