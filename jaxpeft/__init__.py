"""jaxpeft: parameter-efficient fine-tuning as pure functions over JAX parameter pytrees."""

from jaxpeft._partition import combine, partition, path_filter, trainable_mask
from jaxpeft._paths import path_str
from jaxpeft._select import Layout
from jaxpeft.analysis import Summary, summary, update_spectrum
from jaxpeft.functional import merged
from jaxpeft.methods import (
    Adapter,
    AdapterBank,
    BitFitConfig,
    DoraConfig,
    DoraWeights,
    IA3Config,
    IA3Weights,
    LayerCall,
    LeafAdapter,
    LeafDelta,
    LNTuningConfig,
    LohaConfig,
    LohaWeights,
    LokrConfig,
    LokrWeights,
    LoraConfig,
    LoraWeights,
    MethodConfig,
    NotMergeableError,
    Plan,
    PrefixTuningConfig,
    PrefixWeights,
    PromptTuningConfig,
    PromptWeights,
    TargetInfo,
    VeraConfig,
    VeraWeights,
    adapter_ids,
    adapter_items,
    add_weighted_adapter,
    bank_names,
    config_from_dict,
    extend_attention_mask,
    init,
    init_adjusted,
    layouts_of,
    merge,
    plan,
    prefix_kv,
    prepend_prompt,
    select_adapter,
    stack_adapters,
    to_plain_lora,
    unmerge,
    unstack_adapters,
)
from jaxpeft.optim import freeze, loraplus
from jaxpeft.quant import QuantizedArray, dequantize, quantize

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterBank",
    "BitFitConfig",
    "DoraConfig",
    "DoraWeights",
    "IA3Config",
    "IA3Weights",
    "LNTuningConfig",
    "LayerCall",
    "Layout",
    "LeafAdapter",
    "LeafDelta",
    "LohaConfig",
    "LohaWeights",
    "LokrConfig",
    "LokrWeights",
    "LoraConfig",
    "LoraWeights",
    "MethodConfig",
    "NotMergeableError",
    "Plan",
    "PrefixTuningConfig",
    "PrefixWeights",
    "PromptTuningConfig",
    "PromptWeights",
    "QuantizedArray",
    "Summary",
    "TargetInfo",
    "VeraConfig",
    "VeraWeights",
    "adapter_ids",
    "adapter_items",
    "add_weighted_adapter",
    "bank_names",
    "combine",
    "config_from_dict",
    "dequantize",
    "extend_attention_mask",
    "freeze",
    "init",
    "init_adjusted",
    "layouts_of",
    "loraplus",
    "merge",
    "merged",
    "partition",
    "path_filter",
    "path_str",
    "plan",
    "prefix_kv",
    "prepend_prompt",
    "quantize",
    "select_adapter",
    "stack_adapters",
    "summary",
    "to_plain_lora",
    "trainable_mask",
    "unmerge",
    "unstack_adapters",
    "update_spectrum",
]

_SUBMODULES = ("adapter_sets", "checkpoint", "hf", "linen", "nnx", "ops", "quant", "sharding")


def __getattr__(name: str):  # PEP 562: heavy submodules load on first use, so `import jaxpeft` stays light
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"jaxpeft.{name}")
    raise AttributeError(f"module 'jaxpeft' has no attribute {name!r}")
