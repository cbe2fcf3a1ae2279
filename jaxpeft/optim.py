"""optax glue: freeze non-trainable leaves (no updates, no state), LoRA+'s larger learning rate for B, and banks whose
unused adapters stay bit-identical."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxpeft._partition import trainable_mask
from jaxpeft._paths import path_str
from jaxpeft.protocol import Adapter

__all__ = ["freeze", "loraplus", "skip_unused_adapters"]


def freeze(tx: optax.GradientTransformation, filter_spec: Any) -> optax.GradientTransformation:
    """``tx`` on the trainable leaves, zero updates and no state on the frozen ones.

    Built on ``optax.partition`` with ``optax.set_to_zero()`` for the frozen half. ``optax.masked`` alone is not
    enough: it passes the frozen leaves' updates through unchanged, so a frozen weight would still move by its
    raw gradient.

    Args:
      tx: the optimizer for the trainable leaves, e.g. ``optax.adamw(1e-3)``.
      filter_spec: which leaves train, as in ``jaxpeft.partition`` (True = train): a bool, a callable,
        ``jaxpeft.path_filter(...)``, a prefix tree of those, or a full tree of bools.

    Returns:
      A ``GradientTransformation`` over the whole tree.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jaxpeft
      >>> tree = {"body": {"kernel": jnp.ones((2, 2))}, "head": {"kernel": jnp.ones((2, 1))}}
      >>> tx = jaxpeft.freeze(optax.sgd(0.5), jaxpeft.path_filter("head/"))  # train the head only
      >>> state = tx.init(tree)
      >>> grads = jax.tree.map(jnp.ones_like, tree)
      >>> updates, state = tx.update(grads, state, tree)
      >>> new = optax.apply_updates(tree, updates)
      >>> new["body"]["kernel"][0].tolist(), new["head"]["kernel"][0].tolist()
      ([1.0, 1.0], [0.5])
    """

    def labels(params: Any) -> Any:
        return jax.tree.map(lambda t: "train" if t else "frozen", trainable_mask(params, filter_spec))

    return optax.partition({"train": tx, "frozen": optax.set_to_zero()}, labels)


def _is_adapter(x: Any) -> bool:
    return isinstance(x, Adapter)


def _node_labels(x: Adapter) -> Any:
    """``"b"`` on the node's B factors (the fields ``x.b_factors`` names), ``"rest"`` on its other leaves."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(x)
    b_factors = set(x.b_factors)
    labels = ["b" if path_str(kp[:1]) in b_factors else "rest" for kp, _ in flat]
    return jax.tree.unflatten(treedef, labels)


def loraplus_labels(tree: Any, b_filter: Any = None) -> Any:
    """``"b"`` for each B factor of the adapter nodes in ``tree`` (``Adapter.b_factors``: LoRA's, DoRA's and LoRA-FA's
    ``b``; a bank's inner B), ``"rest"`` for every other leaf.

    With ``b_filter`` (a filter spec as in ``jaxpeft.partition``, True = B) the leaves it selects are the B factors
    instead, for trees that hold no adapter nodes (an ``nnx.State`` of ``jaxpeft.nnx.AdapterParam``).
    """
    if b_filter is not None:
        return jax.tree.map(lambda t: "b" if t else "rest", trainable_mask(tree, b_filter))
    return jax.tree.map(lambda x: _node_labels(x) if _is_adapter(x) else "rest", tree, is_leaf=_is_adapter)


def loraplus(
    optimizer: Callable[[optax.ScalarOrSchedule], optax.GradientTransformation],
    learning_rate: optax.ScalarOrSchedule,
    *,
    ratio: float = 16.0,
    b_filter: Any = None,
) -> optax.GradientTransformation:
    """LoRA+: ``optimizer(learning_rate)`` for every leaf, but ``optimizer(ratio · learning_rate)`` for LoRA's B.

    The B factors are the fields each node names in ``Adapter.b_factors`` (the ``b`` of LoRA's, DoRA's and
    LoRA-FA's nodes, also inside a bank; a method of your own says which of its fields are B).
    DoRA's magnitude and A, and every other method's arrays, keep ``learning_rate``. Each half is a separate
    ``optimizer`` (``optax.partition``), so with Adam or SGD a B factor's update is exactly ``ratio`` times what
    ``optimizer(learning_rate)`` alone would give it, and A's is unchanged. Compose with ``freeze`` when the tree
    also holds frozen weights: ``jaxpeft.freeze(jaxpeft.loraplus(optax.adamw, 1e-4), spec)``.

    Args:
      optimizer: a factory taking the learning rate, e.g. ``optax.adamw`` or
        ``functools.partial(optax.adamw, weight_decay=0.0)``.
      learning_rate: A's learning rate: a number or an optax schedule (B's is ``ratio`` times it, step by step).
      ratio: ``lr_B / lr_A``; the paper recommends 16 (2⁴) for most tasks.
      b_filter: for trees without adapter nodes (``jaxpeft.nnx.optimizer``'s ``nnx.State``), which leaves are B, as a
        filter spec (True = B), e.g. ``jaxpeft.path_filter(r"(^|/)b$")``.

    Returns:
      A ``GradientTransformation``.

    References:
      Hayou, Ghosh and Yu, "LoRA+: Efficient Low Rank Adaptation of Large Models", 2024.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 0:
        raise ValueError(f"`ratio`={ratio!r}; expected a positive finite number, e.g. 16 (the paper's default).")
    if callable(learning_rate):
        schedule = learning_rate

        def b_rate(step: Any) -> Any:
            return ratio * schedule(step)

        lr_b: optax.ScalarOrSchedule = b_rate
    else:
        lr_b = ratio * learning_rate
    return optax.partition(
        {"rest": optimizer(learning_rate), "b": optimizer(lr_b)}, lambda tree: loraplus_labels(tree, b_filter)
    )


def bank_axes(tree: Any) -> dict[str, int]:
    """``{leaf path: adapter axis}`` for the trainable arrays of the adapter banks in ``tree`` (paths as
    ``jaxpeft`` prints them, e.g. ``"out/kernel/a"``)."""
    from jaxpeft.methods.bank import AdapterBank  # the bank module imports protocol-level code; keep optim light

    out: dict[str, int] = {}

    def visit(kp: Any, node: Any) -> Any:
        if isinstance(node, AdapterBank):
            frozen = set(node.frozen_field_names)
            for sub, _ in jax.tree_util.tree_flatten_with_path(node)[0]:
                if path_str(sub[:1]) not in frozen:
                    out[path_str((*kp, *sub))] = node.layout.stack
        return node

    jax.tree_util.tree_map_with_path(visit, tree, is_leaf=lambda x: isinstance(x, AdapterBank))
    return out


def _suffix_axis(path: str, axes: Mapping[str, int]) -> tuple[str, int] | None:
    """The bank leaf that the state or update leaf at ``path`` belongs to: ``path`` is it or ends with ``/`` + it."""
    parts = path.split("/")
    if parts[-1] == "value" and path not in axes:  # an nnx.Variable's array (nnx.State not made pure)
        parts = parts[:-1]
    for start in range(len(parts)):
        found = axes.get("/".join(parts[start:]))
        if found is not None:
            return "/".join(parts[start:]), found
    return None


def _used(updates: Any, axes: Mapping[str, int]) -> jax.Array | None:
    """Which adapters of the banks got any non-zero gradient: a bool ``(n,)`` over the banks' one adapter axis."""
    used = None
    for kp, leaf in jax.tree_util.tree_flatten_with_path(updates)[0]:
        found = _suffix_axis(path_str(kp), axes)
        if found is None or not hasattr(leaf, "ndim"):
            continue
        axis = found[1]
        others = tuple(i for i in range(leaf.ndim) if i != axis)
        mine = jnp.any(leaf != 0, axis=others)
        used = mine if used is None else used | mine
    return used


def _keep_unused(new: Any, old: Any, used: jax.Array, axes: Mapping[str, int], shapes: Mapping[str, Any]) -> Any:
    """``new`` with the entries of unused adapters taken from ``old`` in every leaf that mirrors a bank leaf (an
    update, Adam's moments, ...); every other leaf is ``new``'s."""

    def pick(kp: Any, n: Any, o: Any) -> Any:
        found = _suffix_axis(path_str(kp), axes)
        if found is None or getattr(n, "shape", None) != shapes.get(found[0]):
            return n
        axis = found[1]
        keep = jnp.reshape(used, [used.shape[0] if i == axis else 1 for i in range(n.ndim)])
        return jnp.where(keep, n, o)

    return jax.tree_util.tree_map_with_path(pick, new, old)


def skip_unused_adapters(
    tx: optax.GradientTransformation, axes: Callable[[Any], Mapping[str, int]] | None = None
) -> optax.GradientTransformationExtraArgs:
    """``tx`` for a tree of adapter banks, leaving every adapter that no example used bit-identical.

    A bank (``jaxpeft.stack_adapters``) trains several adapters in one step; an adapter with no example in the
    batch gets a gradient of exactly zero, yet ``optax.adamw`` would still move it (weight decay, and Adam's momentum
    once it was used in an earlier step). This wrapper finds, per step, the adapters whose gradient is exactly zero in
    every bank array (no example used them, or their examples' loss was masked out) and gives them a zero update and
    their previous optimizer state (Adam's moments etc.); the used adapters get exactly ``tx``'s update. Leaves outside
    banks pass through ``tx`` unchanged. Shared state such as Adam's step count still counts every step.

    Args:
      tx: the optimizer, e.g. ``optax.adamw(1e-3)`` (compose: ``jaxpeft.skip_unused_adapters(jaxpeft.freeze(tx,
        spec))``).
      axes: for trees that hold no ``AdapterBank`` nodes (an ``nnx.State``), a function of the update tree giving
        ``{leaf path: adapter axis}``; ``jaxpeft.nnx.optimizer`` passes it for you.

    Returns:
      A ``GradientTransformationExtraArgs`` (extra ``update`` arguments are passed on to ``tx``).
    """
    find = bank_axes if axes is None else axes
    inner = optax.with_extra_args_support(tx)

    def init(params: Any) -> Any:
        return inner.init(params)

    def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> tuple[Any, Any]:
        table = dict(find(updates))
        new_updates, new_state = inner.update(updates, state, params, **extra)
        used = _used(updates, table)
        if used is None:
            return new_updates, new_state
        shapes = {}
        for kp, x in jax.tree_util.tree_flatten_with_path(updates)[0]:
            found = _suffix_axis(path_str(kp), table)
            if found is not None:
                shapes[found[0]] = getattr(x, "shape", None)
        zeros = jax.tree.map(jnp.zeros_like, new_updates)
        kept_updates = _keep_unused(new_updates, zeros, used, table, shapes)
        return kept_updates, _keep_unused(new_state, state, used, table, shapes)

    return optax.GradientTransformationExtraArgs(init, update)
