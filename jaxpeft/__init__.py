"""jaxpeft: parameter-efficient fine-tuning as pure functions over JAX parameter pytrees."""

from jaxpeft._partition import combine, partition, path_filter, trainable_mask
from jaxpeft._paths import path_str
from jaxpeft._select import Layout
from jaxpeft.analysis import Summary, summary, update_spectrum
from jaxpeft.functional import merged
from jaxpeft.methods import (
    Adapter,
    DoraConfig,
    DoraWeights,
    IA3Config,
    IA3Weights,
    LayerCall,
    LohaConfig,
    LohaWeights,
    LokrConfig,
    LokrWeights,
    LoraConfig,
    LoraWeights,
    MethodConfig,
    NotMergeableError,
    Plan,
    TargetInfo,
    VeraConfig,
    VeraWeights,
    adapter_items,
    config_from_dict,
    init,
    layouts_of,
    merge,
    plan,
    unmerge,
)
from jaxpeft.optim import freeze, loraplus
from jaxpeft.quant import QuantizedArray, dequantize, quantize

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "DoraConfig",
    "DoraWeights",
    "IA3Config",
    "IA3Weights",
    "LayerCall",
    "Layout",
    "LohaConfig",
    "LohaWeights",
    "LokrConfig",
    "LokrWeights",
    "LoraConfig",
    "LoraWeights",
    "MethodConfig",
    "NotMergeableError",
    "Plan",
    "QuantizedArray",
    "Summary",
    "TargetInfo",
    "VeraConfig",
    "VeraWeights",
    "adapter_items",
    "combine",
    "config_from_dict",
    "dequantize",
    "freeze",
    "init",
    "layouts_of",
    "loraplus",
    "merge",
    "merged",
    "partition",
    "path_filter",
    "path_str",
    "plan",
    "quantize",
    "summary",
    "trainable_mask",
    "unmerge",
    "update_spectrum",
]

_SUBMODULES = ("checkpoint", "hf", "linen", "nnx", "ops", "quant", "sharding")


def __getattr__(name: str):  # PEP 562: heavy submodules load on first use, so `import jaxpeft` stays light
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"jaxpeft.{name}")
    raise AttributeError(f"module 'jaxpeft' has no attribute {name!r}")
