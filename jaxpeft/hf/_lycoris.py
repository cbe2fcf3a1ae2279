"""What PEFT's LyCORIS-family formats share (``LOHA`` for LoHa, ``LOKR`` for LoKr): the field tables, the checked
fields, the rank/alpha config and layout helpers. Each method's tensors live beside it (``jaxpeft.methods.loha``,
``jaxpeft.methods.lokr``)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from jaxpeft._select import Layout
from jaxpeft.hf._codec import Export, FieldTable, Import
from jaxpeft.hf._common import Entry, Group, import_layout, rank_alpha_fields, read_groups
from jaxpeft.hf._config import (
    CONFIG_NAME,
    HARMLESS_COMMON,
    REFUSED_SAVED,
    Selection,
    alpha_value,
    bool_field,
    fail,
    is_int,
    pattern_rank_alpha,
    pattern_value,
    rank_value,
    rate_value,
    read_selection,
    show,
)

__all__ = ["LOHA_FIELDS", "LOKR_FIELDS", "LycorisFields", "config_fields", "groups", "layout_of"]

_SUPPORTED = (
    "peft_type",
    "r",
    "alpha",
    "rank_pattern",
    "alpha_pattern",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "init_weights",
    "rank_dropout",
    "module_dropout",
    "use_effective_conv2d",
)
#: Every field of PEFT 0.21.2's ``LoHaConfig``, classified (LoHa has no ``fan_in_fan_out``).
LOHA_FIELDS = FieldTable(_SUPPORTED, dict(HARMLESS_COMMON), REFUSED_SAVED)
#: Every field of PEFT 0.21.2's ``LoKrConfig``, classified.
LOKR_FIELDS = FieldTable(
    (*_SUPPORTED, "decompose_both", "decompose_factor"),
    {**HARMLESS_COMMON, "rank_dropout_scale": "used only with a non-zero rank_dropout (refused)"},
    REFUSED_SAVED,
)


@dataclasses.dataclass(frozen=True)
class LycorisFields:
    """The checked values of a PEFT ``LoHaConfig`` or ``LoKrConfig`` file (the LoKr-only fields at their defaults
    for LoHa)."""

    r: int
    alpha: float
    rank_pattern: tuple[tuple[str, int], ...]
    alpha_pattern: tuple[tuple[str, float], ...]
    identity_init: bool  # a targeted module with no saved tensors is the identity in PEFT
    use_effective_conv2d: bool
    decompose_both: bool
    decompose_factor: int
    selection: Selection

    def rank_alpha(self, name: str) -> tuple[int, float]:
        """The rank and alpha PEFT gives module ``name`` (first matching pattern key, else ``r``/``alpha``)."""
        return pattern_rank_alpha(self, name)


def _training_dropout(config: Mapping[str, Any], field: str, what: str) -> None:
    """Refuse a non-zero LyCORIS ``rank_dropout``/``module_dropout`` (jaxpeft has neither), naming the fix."""
    value = rate_value(config, field)
    if value:
        raise ValueError(
            f"{CONFIG_NAME} has `{field}`={show(value)}: {what} is not implemented in jaxpeft, so the adapter cannot "
            "be trained on as PEFT trains it. It acts only in training (the outputs at inference do not depend on "
            f"it): set `{field}` to 0 in the file to import the adapter."
        )


def read_lycoris(config: Mapping[str, Any], peft_type: str) -> LycorisFields:
    """The checked fields of a ``peft_type: "LOHA"`` or ``"LOKR"`` config; missing fields take PEFT's defaults."""
    _training_dropout(config, "rank_dropout", "rank dropout (dropping rows of the weight update)")
    _training_dropout(config, "module_dropout", "module dropout (skipping the whole adapter at random)")
    init = config.get("init_weights", True)
    if not (isinstance(init, bool) or (peft_type == "LOKR" and init == "lycoris")):
        raise fail("init_weights", init, "true or false" + (" or 'lycoris'" if peft_type == "LOKR" else ""))
    factor = config.get("decompose_factor", -1)
    if not is_int(factor) or (factor < 1 and factor != -1):
        raise fail("decompose_factor", factor, "-1 or a positive whole number, e.g. 4")
    return LycorisFields(
        r=rank_value("r", config.get("r", 8)),
        alpha=alpha_value("alpha", config.get("alpha", 8)),
        rank_pattern=pattern_value(config, "rank_pattern", rank_value),
        alpha_pattern=pattern_value(config, "alpha_pattern", alpha_value),
        identity_init=init is not False,  # True: W2 (LoHa) or W1 (LoKr) zeros; 'lycoris': LoKr's W2 zeros
        use_effective_conv2d=bool_field(config, "use_effective_conv2d", False),
        decompose_both=bool_field(config, "decompose_both", False),
        decompose_factor=factor,
        selection=read_selection(config, layers=True),
    )


def config_fields(req: Export, names: Mapping[str, Entry], peft_type: str) -> dict[str, Any]:
    """The fields LoHa's and LoKr's HF configs share: ``r``, ``alpha`` and patterns giving each module its own."""
    return {
        **rank_alpha_fields(req.cfg, names, "r", "alpha"),
        "auto_mapping": None,
        "exclude_modules": None,
        "inference_mode": True,
        "init_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "module_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": peft_type,
        "rank_dropout": 0.0,
        "revision": None,
        "use_effective_conv2d": False,
    }


def groups(req: Import, peft_type: str, suffixes: Mapping[str, str], what: str) -> tuple[LycorisFields, list[Group]]:
    """The checked fields and the file's modules grouped by parameter (the first steps of a LoHa/LoKr import)."""
    fields = read_lycoris(req.config, peft_type)
    found = read_groups(req, fields.selection, suffixes, what, fields.identity_init, "init_weights")
    cp = next((n for g in found for n, e in g.modules if {"t1", "t2"} & set(e)), None)
    if cp is not None:
        raise ValueError(
            f"HF module {cp!r} holds CP-decomposed convolution factors (`use_effective_conv2d`=true in "
            f"{CONFIG_NAME}), which jaxpeft does not implement; train the adapter with use_effective_conv2d=false."
        )
    return fields, found


def layout_of(group: Group, layouts: Mapping[str, Layout], fields: LycorisFields) -> Layout:
    """The layout of ``group``'s weight (given, or a 2-D Dense kernel); refuses PEFT's CP convolutions."""
    given = layouts.get(group.path)
    layout = import_layout(group, "conv" if given is not None and given.kind == "conv" else "linear", given)
    window = layout.split(group.shape)[1][:-1] if layout.kind == "conv" else ()
    if fields.use_effective_conv2d and math.prod(window) > 1:
        raise ValueError(
            f"{CONFIG_NAME} has `use_effective_conv2d`=true and {group.path!r} is a convolution with a {window} "
            "window: PEFT then decomposes it with CP factors (hada_t1/lokr_t2), which jaxpeft does not implement. "
            "Train the adapter with use_effective_conv2d=false."
        )
    return layout
