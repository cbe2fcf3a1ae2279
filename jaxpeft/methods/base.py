"""Deprecated: the protocol is ``jaxpeft.protocol`` and plan/init/merge are ``jaxpeft.api`` (this module re-exports
their names for code written against 0.2's ``jaxpeft.methods.base``)."""

from jaxpeft.api import (
    Plan,
    TargetInfo,
    config_from_dict,
    fold_weight,
    init,
    init_adjusted,
    merge,
    plan,
    unmerge,
)
from jaxpeft.protocol import (
    CALL_KINDS,
    STATIC,
    Adapter,
    LayerCall,
    MethodConfig,
    NotMergeableError,
    adapter_items,
    check_fits,
    check_ndim,
    layouts_of,
)

__all__ = [
    "CALL_KINDS",
    "STATIC",
    "Adapter",
    "LayerCall",
    "MethodConfig",
    "NotMergeableError",
    "Plan",
    "TargetInfo",
    "adapter_items",
    "check_fits",
    "check_ndim",
    "config_from_dict",
    "fold_weight",
    "init",
    "init_adjusted",
    "layouts_of",
    "merge",
    "plan",
    "unmerge",
]
