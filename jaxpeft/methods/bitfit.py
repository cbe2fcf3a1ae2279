"""BitFit (train the biases) and LayerNorm tuning (train the norms' scale and bias): configs over ``LeafDelta``."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax

from jaxpeft._select import Layout, TargetSpec
from jaxpeft.methods.base import Adapter, MethodConfig
from jaxpeft.methods.leaf import ALL, LeafDelta, select_leaves, zeros_like_leaf
from jaxpeft.methods.lora import check_dtype

__all__ = ["BitFitConfig", "LNTuningConfig"]


class _LeafConfig(MethodConfig):
    """Shared by the leaf methods: a zero ``LeafDelta`` of the leaf's shape per selected leaf."""

    reads_weight_values: ClassVar[bool] = False
    _kinds: ClassVar[tuple[str, ...]] = ()
    _all_kinds: ClassVar[tuple[str, ...]] = ()
    _names: ClassVar[tuple[str, ...]] = ("scale", "bias")
    _what: ClassVar[str] = ""

    dtype: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", check_dtype(self.dtype))
        super().__post_init__()

    def select(self, params: Any, layouts: Mapping[str, Layout] | None) -> list[tuple[str, Any, Layout]]:
        rows = select_leaves(
            params,
            self.targets,
            self.exclude,
            layouts,
            kinds=self._kinds,
            all_kinds=self._all_kinds,
            names=self._names,
            what=self._what,
        )
        self.check_targets(rows)
        return rows

    def init_target(self, path: str, weight: Any, layout: Layout, key: jax.Array) -> Adapter:
        return LeafDelta(zeros_like_leaf(weight, self.dtype), layout)


@dataclasses.dataclass(frozen=True)
class BitFitConfig(_LeafConfig):
    """BitFit: train only bias terms, as a delta on each selected bias (zero at init: the model is unchanged).

    Args:
      targets: ``"all"`` (every bias of a Dense, DenseGeneral, Einsum or Conv layer, Linen or NNX), module names
        (``["query", "value"]`` trains those layers' biases; a norm's name trains the norm's bias), a regex over
        leaf paths (``r"bias$"`` trains every bias, norms included, as in the paper's full setting) or a predicate
        ``fn(path, leaf) -> bool`` over the candidate bias leaves.
      exclude: the same forms but ``"all"``, removed from the selection.
      dtype: dtype of the deltas (float32 by default, also over a bf16 base; the model sees ``bias + delta`` cast
        to the bias's dtype).

    Layers without a bias have nothing to train: create them with ``use_bias=True``. HF PEFT has no BitFit; to
    share with PyTorch, ``jaxpeft.merge`` and save the full biases.

    References:
      Ben Zaken, Ravfogel, Goldberg, "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked
      Language-models", ACL 2022.
    """

    method: ClassVar[str] = "bitfit"
    _kinds: ClassVar[tuple[str, ...]] = ("bias", "norm")
    _all_kinds: ClassVar[tuple[str, ...]] = ("bias",)
    _names: ClassVar[tuple[str, ...]] = ("bias",)
    _what: ClassVar[str] = "bias"

    targets: TargetSpec = ALL
    exclude: TargetSpec = ()
    dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class LNTuningConfig(_LeafConfig):
    """LayerNorm tuning (HF PEFT's ``LNTuningConfig``): train the scale and bias of the selected norm layers.

    A norm layer is a module with a ``scale`` and no kernel (``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm`` and
    their NNX twins); each of its ``scale``/``bias`` leaves gets a zero delta, so the model is unchanged at init
    and a merged model is exactly the tuned one (PEFT trains a copy of the layer; the function is the same).

    Args:
      targets: ``"all"`` (every norm layer), module names as HF's ``target_modules`` (``["input_layernorm",
        "post_attention_layernorm", "norm"]``: every norm whose path ends with a name), a regex over leaf paths
        (``r"ln_f/scale$"``) or a predicate ``fn(path, leaf) -> bool``.
      exclude: the same forms but ``"all"``.
      dtype: dtype of the deltas (float32 by default).

    References:
      Zhao et al., "Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM Finetuning", ICLR 2024.
    """

    method: ClassVar[str] = "ln_tuning"
    _kinds: ClassVar[tuple[str, ...]] = ("norm",)
    _all_kinds: ClassVar[tuple[str, ...]] = ("norm",)
    _what: ClassVar[str] = "norm"

    targets: TargetSpec = ALL
    exclude: TargetSpec = ()
    dtype: str = "float32"
