"""A method's HF PEFT codec: its ``peft_type``, its field table and two pure functions, like an optax transformation.

A method config names its codec in the class attribute ``codec`` (``jaxpeft.MethodConfig.codec``);
``jaxpeft.hf.to_state_dict``/``from_state_dict`` dispatch only through it. The generic parts (argument checks,
``modules_to_save``, the tensor checks, the field table, file I/O) are done before a codec is called, so
``to_hf``/``from_hf`` only translate tensors and fields.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

__all__ = ["Export", "FieldTable", "Import", "PeftCodec"]


class FieldTable(NamedTuple):
    """Every field of PEFT's config class for a ``peft_type``, classified.

    Attributes:
      supported: fields the codec reads (their values are checked by it).
      harmless: ``{field: why}``: fields that do not change what the saved tensors compute (metadata, options that
        act only at initialisation or on layer types jaxpeft does not import).
      refused: ``{field: why}``: fields that change the forward or train differently; a file that sets one is
        refused by name. A key in none of the three is refused when set (``jaxpeft.hf`` cannot know what it does)
        and ignored when unset (null, false, empty).
    """

    supported: tuple[str, ...]
    harmless: Mapping[str, str]
    refused: Mapping[str, str]

    @property
    def known(self) -> frozenset[str]:
        """Every field the table classifies."""
        return frozenset((*self.supported, *self.harmless, *self.refused))


class Export(NamedTuple):
    """What a codec's ``to_hf`` receives (already checked by ``jaxpeft.hf.to_state_dict``).

    Attributes:
      adapters: the adapter tree.
      cfg: its config (the codec's config class).
      params: the base params (arrays or ``jax.ShapeDtypeStruct``).
      module_name: our module path -> HF module-name template (``{layer}`` for a scan axis); None for a codec
        without modules (``PeftCodec.modules`` False).
      layouts: the caller's layouts (checked against the nodes' own), or None.
      target_modules: the caller's ``target_modules`` override, or None.
      options: the codec's own options (``PeftCodec.options``) the caller set.
    """

    adapters: Any
    cfg: Any
    params: Any
    module_name: Callable[[str], str] | None
    layouts: Mapping[str, Any] | None
    target_modules: Any
    options: Mapping[str, Any]


class Import(NamedTuple):
    """What a codec's ``from_hf`` receives (already checked by ``jaxpeft.hf.from_state_dict``).

    Attributes:
      config: the ``adapter_config.json`` contents; every set field is in the codec's table and none is refused;
        ``modules_to_save`` is already handled (None).
      tensors: ``{key: host array}``, finite floats, without the modules to save' tensors.
      params: the base params.
      module_name: as in :class:`Export`.
      layouts: the caller's kernel layouts, or None.
      dtype: the adapter dtype the caller asked for, or None (the file's).
      base_weights: ``"check"`` or ``"ignore"``: what to do with PEFT's copies of base weights.
      options: the codec's own import options (``PeftCodec.options``) the caller set, or None.
    """

    config: Mapping[str, Any]
    tensors: Mapping[str, np.ndarray]
    params: Any
    module_name: Callable[[str], str] | None
    layouts: Mapping[str, Any] | None
    dtype: Any
    base_weights: str
    options: Mapping[str, Any] | None = None


class PeftCodec(NamedTuple):
    """How a method reads and writes HF PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``.

    Attributes:
      peft_type: PEFT's ``peft_type`` (``"LORA"``, ``"HRA"``, ...).
      peft_config: PEFT's config class name for that type (``"LoraConfig"``): messages, and the tests that compare
        ``fields`` with PEFT's own dataclass.
      fields: the :class:`FieldTable` of that class.
      to_hf: ``to_hf(Export) -> (config fields, {key: numpy array})``. The config needs no ``task_type``,
        ``base_model_name_or_path`` or ``modules_to_save`` (added by the caller).
      from_hf: ``from_hf(Import) -> (config, adapter tree)``; the returned config reproduces the adapters
        (``jaxpeft.plan`` gives their shapes).
      accepts: ``accepts(config) -> bool`` when several codecs share a ``peft_type`` (LoRA and DoRA both read
        ``"LORA"``): the first codec whose ``accepts`` is true imports the file. None accepts every file.
      tensor_parts: the key components of the method's tensors (``{"lora_A", "lora_B"}``): a saved module must
        not hold one.
      shared_keys: tensor keys outside ``base_model.model.`` that the method reads (VeRA's shared projections).
      options: names of options only this codec takes (LoRA's ``ensure_weight_tying``, ``tied_head`` on export;
        ``parameter_order`` both ways).
      modules: False for a method with no HF modules (prompt learning): ``module_name``, ``layouts`` and
        ``modules_to_save`` do not apply.
    """

    peft_type: str
    peft_config: str
    fields: FieldTable
    to_hf: Callable[[Export], tuple[dict[str, Any], dict[str, np.ndarray]]]
    from_hf: Callable[[Import], tuple[Any, dict[str, Any]]]
    accepts: Callable[[Mapping[str, Any]], bool] | None = None
    tensor_parts: frozenset[str] = frozenset()
    shared_keys: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    modules: bool = True
