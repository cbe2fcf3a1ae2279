"""optax glue: freeze non-trainable leaves (no updates, no state), and LoRA+'s larger learning rate for B."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import optax

from jaxpeft._partition import trainable_mask
from jaxpeft._paths import path_str
from jaxpeft.protocol import Adapter

__all__ = ["freeze", "loraplus"]


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
