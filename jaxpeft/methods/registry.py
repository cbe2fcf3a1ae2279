"""The one list of built-in methods: what JSON (``config_from_dict``), checkpoints and ``jaxpeft.hf`` read.

A built-in method is one file in ``jaxpeft/methods/`` (its config, node and, where PEFT has a format, its codec) and
one line here. A method of your own needs no line: pass its config class where a lookup by name happens
(``jaxpeft.config_from_dict(..., configs=(MyConfig,))``, ``jaxpeft.checkpoint.read_config(..., configs=...)``,
``jaxpeft.hf.import_adapters(..., configs=...)``).
"""

from __future__ import annotations

from jaxpeft.methods.bitfit import BitFitConfig
from jaxpeft.methods.dora import DoraConfig
from jaxpeft.methods.ia3 import IA3Config
from jaxpeft.methods.ln_tuning import LNTuningConfig
from jaxpeft.methods.loha import LohaConfig
from jaxpeft.methods.lokr import LokrConfig
from jaxpeft.methods.lora import LoraConfig
from jaxpeft.methods.lora_fa import LoraFAConfig
from jaxpeft.methods.prompt import PrefixTuningConfig, PromptTuningConfig
from jaxpeft.methods.vera import VeraConfig
from jaxpeft.protocol import MethodConfig

__all__ = ["BUILTIN"]

#: Every built-in method's config class in lookup order. An HF file goes to the first whose codec accepts it
#: (LoRA before LoRA-FA: PEFT's LoRA files do not say which A was frozen).
BUILTIN: tuple[type[MethodConfig], ...] = (
    LoraConfig,
    DoraConfig,
    LoraFAConfig,
    IA3Config,
    LohaConfig,
    LokrConfig,
    VeraConfig,
    BitFitConfig,
    LNTuningConfig,
    PromptTuningConfig,
    PrefixTuningConfig,
)
