"""jaxpeft: parameter-efficient fine-tuning as pure functions over JAX parameter pytrees."""

from jaxpeft._partition import combine, partition, path_filter, trainable_mask
from jaxpeft._paths import path_str
from jaxpeft._select import Layout
from jaxpeft.analysis import Summary, summary, update_spectrum
from jaxpeft.functional import merged
from jaxpeft.methods.lora import (
    LoraConfig,
    LoraWeights,
    Plan,
    TargetInfo,
    adapter_items,
    init,
    merge,
    plan,
    unmerge,
)
from jaxpeft.optim import freeze

__version__ = "0.1.0"

__all__ = [
    "Layout",
    "LoraConfig",
    "LoraWeights",
    "Plan",
    "Summary",
    "TargetInfo",
    "adapter_items",
    "combine",
    "freeze",
    "init",
    "merge",
    "merged",
    "partition",
    "path_filter",
    "path_str",
    "plan",
    "summary",
    "trainable_mask",
    "unmerge",
    "update_spectrum",
]

_SUBMODULES = ("checkpoint", "hf", "linen", "nnx", "ops")


def __getattr__(name: str):  # PEP 562: heavy submodules load on first use, so `import jaxpeft` stays light
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"jaxpeft.{name}")
    raise AttributeError(f"module 'jaxpeft' has no attribute {name!r}")
