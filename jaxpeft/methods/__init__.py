"""PEFT methods: each a config (``MethodConfig``) and an adapter node (``Adapter``) behind one protocol (``base``)."""

from jaxpeft.methods.base import (
    Adapter,
    LayerCall,
    MethodConfig,
    NotMergeableError,
    Plan,
    TargetInfo,
    adapter_items,
    config_from_dict,
    init,
    layouts_of,
    merge,
    plan,
    unmerge,
)
from jaxpeft.methods.dora import DoraConfig, DoraWeights
from jaxpeft.methods.ia3 import IA3Config, IA3Weights
from jaxpeft.methods.loha import LohaConfig, LohaWeights
from jaxpeft.methods.lokr import LokrConfig, LokrWeights
from jaxpeft.methods.lora import LoraConfig, LoraWeights
from jaxpeft.methods.vera import VeraConfig, VeraWeights

#: The configs ``config_from_dict`` (and ``jaxpeft.checkpoint.read_config``) know by their ``method`` name.
BUILTIN_CONFIGS: tuple[type[MethodConfig], ...] = (
    LoraConfig,
    DoraConfig,
    IA3Config,
    LohaConfig,
    LokrConfig,
    VeraConfig,
)

__all__ = [
    "BUILTIN_CONFIGS",
    "Adapter",
    "DoraConfig",
    "DoraWeights",
    "IA3Config",
    "IA3Weights",
    "LayerCall",
    "LohaConfig",
    "LohaWeights",
    "LokrConfig",
    "LokrWeights",
    "LoraConfig",
    "LoraWeights",
    "MethodConfig",
    "NotMergeableError",
    "Plan",
    "TargetInfo",
    "VeraConfig",
    "VeraWeights",
    "adapter_items",
    "config_from_dict",
    "init",
    "layouts_of",
    "merge",
    "plan",
    "unmerge",
]
