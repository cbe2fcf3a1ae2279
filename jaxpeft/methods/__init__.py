"""PEFT methods: each a config (``MethodConfig``) and an adapter node (``Adapter``) behind one protocol (``base``)."""

from jaxpeft.methods.bank import (
    AdapterBank,
    adapter_ids,
    bank_names,
    select_adapter,
    stack_adapters,
    unstack_adapters,
)
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
    init_adjusted,
    layouts_of,
    merge,
    plan,
    unmerge,
)
from jaxpeft.methods.bitfit import BitFitConfig, LNTuningConfig
from jaxpeft.methods.combine import add_weighted_adapter
from jaxpeft.methods.dora import DoraConfig, DoraWeights
from jaxpeft.methods.ia3 import IA3Config, IA3Weights
from jaxpeft.methods.leaf import LeafAdapter, LeafDelta
from jaxpeft.methods.loha import LohaConfig, LohaWeights
from jaxpeft.methods.lokr import LokrConfig, LokrWeights
from jaxpeft.methods.lora import LoraConfig, LoraWeights, to_plain_lora
from jaxpeft.methods.prompt import (
    PrefixTuningConfig,
    PrefixWeights,
    PromptTuningConfig,
    PromptWeights,
    extend_attention_mask,
    prefix_kv,
    prepend_prompt,
)
from jaxpeft.methods.vera import VeraConfig, VeraWeights

#: The configs ``config_from_dict`` (and ``jaxpeft.checkpoint.read_config``) know by their ``method`` name.
BUILTIN_CONFIGS: tuple[type[MethodConfig], ...] = (
    LoraConfig,
    DoraConfig,
    IA3Config,
    LohaConfig,
    LokrConfig,
    VeraConfig,
    BitFitConfig,
    LNTuningConfig,
    PromptTuningConfig,
    PrefixTuningConfig,
)

__all__ = [
    "BUILTIN_CONFIGS",
    "Adapter",
    "AdapterBank",
    "BitFitConfig",
    "DoraConfig",
    "DoraWeights",
    "IA3Config",
    "IA3Weights",
    "LNTuningConfig",
    "LayerCall",
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
    "TargetInfo",
    "VeraConfig",
    "VeraWeights",
    "adapter_ids",
    "adapter_items",
    "add_weighted_adapter",
    "bank_names",
    "config_from_dict",
    "extend_attention_mask",
    "init",
    "init_adjusted",
    "layouts_of",
    "merge",
    "plan",
    "prefix_kv",
    "prepend_prompt",
    "select_adapter",
    "stack_adapters",
    "to_plain_lora",
    "unmerge",
    "unstack_adapters",
]
