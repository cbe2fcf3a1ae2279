"""BitFit: train the biases, as a delta on each selected bias (a leaf method over ``LeafDelta``)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from jaxpeft._select import TargetSpec
from jaxpeft.methods.leaf import ALL, LeafConfig

__all__ = ["BitFitConfig"]


@dataclasses.dataclass(frozen=True)
class BitFitConfig(LeafConfig):
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
    hf_advice: ClassVar[str] = (
        "PEFT has no BitFit. Share the trained leaves as PEFT `modules_to_save` instead: merged = "
        "jaxpeft.merge(params, adapters), then modules_to_save={'<HF module>': <its subtree of merged>} (the layers "
        "whose biases you trained)."
    )
    _kinds: ClassVar[tuple[str, ...]] = ("bias", "norm")
    _all_kinds: ClassVar[tuple[str, ...]] = ("bias",)
    _names: ClassVar[tuple[str, ...]] = ("bias",)
    _what: ClassVar[str] = "bias"

    targets: TargetSpec = ALL
    exclude: TargetSpec = ()
    dtype: str = "float32"
