"""optax glue: freeze non-trainable leaves so they get neither updates nor optimizer state."""

from __future__ import annotations

from typing import Any

import jax
import optax

from jaxpeft._partition import trainable_mask

__all__ = ["freeze"]


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
