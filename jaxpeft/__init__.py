"""jaxpeft: parameter-efficient fine-tuning as pure functions over JAX parameter pytrees.

The package, layer by layer (each imports only from the layers above it):

- core: ``_paths`` (canonical paths), ``_select`` (selection, ``Layout``, ``Unsupported``), ``_partition``
  (partition/combine), ``ops`` (the adapted contractions), ``quant`` (QLoRA's quantised base);
- protocol: ``protocol`` (adapter nodes of three hook kinds, ``LayerCall``, ``MethodConfig``);
- api: ``api`` (``plan``, ``init``, ``init_adjusted``, ``merge``, ``unmerge``: the one fold);
- methods: ``methods/`` (one file per method with its HF codec; ``registry`` is the one list of built-ins);
- frameworks: ``_framework`` (the shared core), ``linen``, ``nnx``, ``functional``, ``optim``;
- I/O: ``checkpoint/``, ``hf/`` (PEFT files; generic readers, dispatch through codecs), ``adapter_sets``;
- scale-out: ``sharding``; insight: ``analysis``.
"""

from jaxpeft._partition import combine, partition, path_filter, trainable_mask
from jaxpeft._paths import path_str
from jaxpeft._select import Layout, Unsupported
from jaxpeft.analysis import Summary, summary, update_spectrum
from jaxpeft.api import Plan, TargetInfo, config_from_dict, init, init_adjusted, merge, plan, unmerge
from jaxpeft.functional import merged
from jaxpeft.methods.bank import (
    AdapterBank,
    adapter_ids,
    bank_names,
    select_adapter,
    stack_adapters,
    unstack_adapters,
)
from jaxpeft.methods.bitfit import BitFitConfig
from jaxpeft.methods.combine import add_weighted_adapter
from jaxpeft.methods.dora import DoraConfig, DoraWeights
from jaxpeft.methods.ia3 import IA3Config, IA3Weights
from jaxpeft.methods.leaf import LeafDelta
from jaxpeft.methods.ln_tuning import LNTuningConfig
from jaxpeft.methods.loha import LohaConfig, LohaWeights
from jaxpeft.methods.lokr import LokrConfig, LokrWeights
from jaxpeft.methods.lora import LoraConfig, LoraWeights, to_plain_lora
from jaxpeft.methods.lora_fa import LoraFAConfig, LoraFAWeights
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
from jaxpeft.optim import freeze, loraplus, skip_unused_adapters
from jaxpeft.protocol import (
    FROZEN,
    STATIC,
    Adapter,
    InputAdapter,
    LayerAdapter,
    LayerCall,
    LeafAdapter,
    MethodConfig,
    NotMergeableError,
    adapter_items,
    layouts_of,
)
from jaxpeft.quant import QuantizedArray, dequantize, quantize

__version__ = "0.2.0"

__all__ = [  # noqa: RUF022 - plainly sorted (tests/test_api.py)
    "Adapter",
    "AdapterBank",
    "BitFitConfig",
    "DoraConfig",
    "DoraWeights",
    "FROZEN",
    "IA3Config",
    "IA3Weights",
    "InputAdapter",
    "LNTuningConfig",
    "LayerAdapter",
    "LayerCall",
    "Layout",
    "LeafAdapter",
    "LeafDelta",
    "LohaConfig",
    "LohaWeights",
    "LokrConfig",
    "LokrWeights",
    "LoraConfig",
    "LoraFAConfig",
    "LoraFAWeights",
    "LoraWeights",
    "MethodConfig",
    "NotMergeableError",
    "Plan",
    "PrefixTuningConfig",
    "PrefixWeights",
    "PromptTuningConfig",
    "PromptWeights",
    "QuantizedArray",
    "STATIC",
    "Summary",
    "TargetInfo",
    "Unsupported",
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
    "skip_unused_adapters",
    "stack_adapters",
    "summary",
    "to_plain_lora",
    "trainable_mask",
    "unmerge",
    "unstack_adapters",
    "update_spectrum",
]

_SUBMODULES = ("adapter_sets", "api", "checkpoint", "hf", "linen", "nnx", "ops", "protocol", "quant", "sharding")


def __getattr__(name: str):  # PEP 562: heavy submodules load on first use, so `import jaxpeft` stays light
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"jaxpeft.{name}")
    raise AttributeError(f"module 'jaxpeft' has no attribute {name!r}")
