"""Plain-JAX fallback: run any function on merged weights (correct for anything, but pays for it)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from jaxpeft.api import merge

__all__ = ["merged"]


def merged(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``merged(fn)(params, adapters, *args) == fn(merge(params, adapters), *args)``.

    Correct for any ``fn(params, ...)``, since it never looks inside ``fn``. The cost: every call forms
    ``W + ΔW`` for each adapted kernel, and differentiating with respect to the adapters backpropagates through
    that sum, i.e. XLA computes a full-size weight gradient ``dL/dW`` per adapted kernel per step and then
    projects it onto A and B. Train steps therefore cost about as much as full fine-tuning (the FLOPs benchmark
    prints ``ratio merged/full`` near 1.0). Use ``jaxpeft.linen.apply`` or the ``jaxpeft.ops`` helpers to train.
    """

    @functools.wraps(fn)
    def wrapped(params: Any, adapters: Any, *args: Any, **kwargs: Any) -> Any:
        return fn(merge(params, adapters), *args, **kwargs)

    return wrapped
