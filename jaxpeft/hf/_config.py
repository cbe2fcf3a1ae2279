"""What an ``adapter_config.json`` means, for every method: the field-table check, checked values, and PEFT's own
rule for which modules a config adapts.

Each codec classifies every field of its PEFT config class (``jaxpeft.hf.FieldTable``, beside the method).
*Supported* fields are read and their values checked (type, range, regex) by the codec; *harmless* ones do not
change what the saved tensors compute (metadata, or options that only act at initialisation or on layer types
jaxpeft does not import); *refused* ones are refused by name whenever they are set. A key PEFT does not know either
(a newer PEFT's field, or a typo) is ignored when it is unset (``null``, ``false``, empty) and refused by name
otherwise: jaxpeft cannot know whether it changes the forward. Errors name the file, the field, the value, what was
expected and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

CONFIG_NAME = "adapter_config.json"

#: Fields every PEFT config class has that do not change what the saved tensors compute (value: why).
HARMLESS_COMMON = {
    "task_type": "metadata",
    "auto_mapping": "metadata",
    "peft_version": "metadata",
    "base_model_name_or_path": "metadata",
    "revision": "metadata",
    "inference_mode": "training flag",
}
#: PEFT's ``fan_in_fan_out`` (LoRA, IA3, VeRA), harmless for every codec that has it.
FAN_IN_FAN_OUT = {
    "fan_in_fan_out": "says how a GPT-2 Conv1D stores its weight; the adapter factors are [r, in] and [out, r] either "
    "way, and PEFT corrects the flag per layer type",
}
#: Why a method's reader refuses ``modules_to_save``: ``jaxpeft.hf.from_state_dict`` reads them (``jaxpeft.hf._saved``)
#: and hands the codec the rest of the file.
SAVED = "fully trained modules (`modules_to_save`) are read by jaxpeft.hf.from_state_dict, not by a method's reader"
#: The refused fields of every codec with HF modules.
REFUSED_SAVED = {"modules_to_save": SAVED}


_MAX_LISTED = 6


def listed(items: Iterable[str]) -> str:
    """Up to six items, sorted and quoted, with a count of the rest."""
    items = sorted(items)
    shown = ", ".join(repr(i) for i in items[:_MAX_LISTED])
    return shown + (f" (and {len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def fail(field: str, value: Any, expected: str, fix: str = "") -> ValueError:
    return ValueError(f"{CONFIG_NAME} has `{field}`={show(value)}; expected {expected}.{' ' + fix if fix else ''}")


def show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def is_set(value: Any) -> bool:
    if value is None or value is False:
        return False
    return not (isinstance(value, (str, list, dict)) and len(value) == 0)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _regex(field: str, pattern: str, wrapped: str | None = None) -> None:
    """Refuse ``pattern`` when it (or PEFT's ``wrapped`` use of it) is not a valid regular expression."""
    try:
        re.compile(pattern if wrapped is None else wrapped)
    except (re.error, RecursionError, OverflowError) as err:
        raise fail(field, pattern, f"a valid regular expression ({err})", "Fix or remove that entry.") from None


def names_value(field: str, value: Any, *, regex_ok: bool = True) -> str | tuple[str, ...]:
    """A module-name list (as a tuple) or a full-match regex string."""
    if isinstance(value, str):
        if not regex_ok:
            raise fail(field, value, "a list of module names")
        _regex(field, value)
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise fail(field, value, "a list of module names or a regular expression string")


def bool_field(config: Mapping[str, Any], field: str, default: bool) -> bool:
    value = config.get(field, default)
    if not isinstance(value, bool):
        raise fail(
            field,
            value,
            "true or false",
            'PEFT would treat any non-empty string (even "false") as true; write a JSON boolean.',
        )
    return value


def check_fields(config: Any, codec: Any) -> dict[str, Any]:
    """``config`` as a dict after refusing the codec's refused fields and unknown ones that are set.

    ``codec`` is a ``jaxpeft.hf.PeftCodec``: its ``fields`` table says what PEFT's ``peft_config`` class has.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"the {CONFIG_NAME} contents are a {type(config).__name__}; expected a JSON object (a dict).")
    bad_keys = [k for k in config if not isinstance(k, str)]
    if bad_keys:
        raise ValueError(f"{CONFIG_NAME} has non-string keys {bad_keys[:3]!r}; JSON object keys are strings.")
    for field, why in codec.fields.refused.items():
        if is_set(config.get(field)):
            raise ValueError(
                f"{CONFIG_NAME} sets `{field}`={show(config[field])}: {why} in jaxpeft, so the adapter cannot be "
                "imported as PEFT runs it; refusing it."
            )
    known = codec.fields.known
    unknown = sorted(k for k in config if k not in known and is_set(config[k]))
    if unknown:
        raise ValueError(
            f"{CONFIG_NAME} sets {', '.join(f'`{k}`={show(config[k])}' for k in unknown[:3])}, which PEFT 0.21.2's "
            f"{codec.peft_config} does not have; jaxpeft cannot tell whether "
            "it changes the adapter's output, so it refuses the file. If it does not, delete the key from the config "
            "and import with jaxpeft.hf.from_state_dict."
        )
    return dict(config)


# ----------------------------------------------------------------------------------------------- which modules


@dataclasses.dataclass(frozen=True)
class Selection:
    """The modules a PEFT config adapts: ``target_modules``, ``exclude_modules`` and, for a list of target names,
    ``layers_to_transform``/``layers_pattern``, checked and matched exactly as PEFT's ``check_target_module_exists``.
    """

    target_modules: str | tuple[str, ...]
    exclude_modules: str | tuple[str, ...] | None = None
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None

    def selects(self, name: str) -> bool:
        """Whether PEFT adapts the module called ``name`` (without ``base_model.model.``)."""
        excluded = self.exclude_modules
        if excluded:
            if isinstance(excluded, str):
                if re.fullmatch(excluded, name):
                    return False
            elif name in excluded or any(name.endswith("." + e) for e in excluded):
                return False
        targets = self.target_modules
        if isinstance(targets, str):
            return re.fullmatch(targets, name) is not None
        if name in targets:
            return True
        found = any(name.endswith("." + t) for t in targets)
        indexes = self.layers_to_transform
        if not found or indexes is None or (isinstance(indexes, tuple) and not indexes):
            return found
        match = None
        if not self.layers_pattern:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
        else:
            for pattern in self.layers_pattern:
                match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
                if match is not None:
                    break
        if match is None:
            return False
        index = int(match.group("idx"))
        return index == indexes if isinstance(indexes, int) else index in indexes

    def describe(self) -> str:
        """The selecting fields, as the file writes them."""

        def written(value: Any) -> str:
            return show(list(value) if isinstance(value, tuple) else value)

        parts = [f"target_modules={written(self.target_modules)}"]
        if self.exclude_modules:
            parts.append(f"exclude_modules={written(self.exclude_modules)}")
        if self.layers_to_transform is not None:
            parts.append(f"layers_to_transform={written(self.layers_to_transform)}")
        if self.layers_pattern:
            parts.append(f"layers_pattern={written(self.layers_pattern)}")
        return ", ".join(parts)


def read_selection(config: Mapping[str, Any], layers: bool, *, empty_ok: bool = False) -> Selection:
    """The checked ``Selection`` of ``config`` (``layers``: the config type has ``layers_to_transform``).

    ``empty_ok``: a missing or empty ``target_modules`` selects no module (LoRA with ``target_parameters`` only,
    which PEFT accepts) instead of being refused.
    """
    targets = config.get("target_modules")
    if empty_ok and (targets is None or targets == []):
        return dataclasses.replace(read_selection({**config, "target_modules": ["_"]}, layers), target_modules=())
    if targets is None:
        raise fail(
            "target_modules",
            None,
            "the adapted module names",
            "PEFT then takes its defaults for the model type, which jaxpeft does not know; write the names into "
            'the file (e.g. ["q_proj", "v_proj"] for Llama).',
        )
    if isinstance(targets, str) and targets.lower() == "all-linear":
        raise fail(
            "target_modules",
            targets,
            "module names",
            "PEFT expands 'all-linear' from the torch model's layer types when it loads; write the module names.",
        )
    target_modules = names_value("target_modules", targets)
    if not target_modules:
        raise fail("target_modules", targets, "at least one module name (PEFT refuses an empty list)")
    excluded = config.get("exclude_modules")
    exclude_modules = None if excluded is None else names_value("exclude_modules", excluded)
    indexes, patterns = (config.get("layers_to_transform"), config.get("layers_pattern")) if layers else (None, None)
    if indexes is not None and not is_int(indexes):
        if not (isinstance(indexes, list) and all(is_int(i) for i in indexes)):
            raise fail("layers_to_transform", indexes, "a layer index or a list of layer indexes")
        indexes = tuple(indexes)
    if patterns is not None:
        patterns = (patterns,) if isinstance(patterns, str) else patterns
        if not (isinstance(patterns, list | tuple) and all(isinstance(p, str) for p in patterns)):
            raise fail("layers_pattern", config.get("layers_pattern"), "a name (or list of names) such as 'layers'")
        for pattern in patterns:
            _regex("layers_pattern", pattern, rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.")
        patterns = tuple(patterns)
    if isinstance(target_modules, str) and (indexes is not None or patterns is not None):
        raise ValueError(
            f"{CONFIG_NAME} has a regex `target_modules`={show(target_modules)} together with `layers_to_transform`"
            " or `layers_pattern`, which PEFT refuses; fold the layers into the regex."
        )
    if patterns and indexes is None:
        raise ValueError(f"{CONFIG_NAME} has `layers_pattern` without `layers_to_transform`, which PEFT refuses.")
    return Selection(target_modules, exclude_modules, indexes, patterns)


# ----------------------------------------------------------------------------------------------- values


def hf_pattern_match(key: str, name: str) -> bool:
    """PEFT's ``rank_pattern``/``alpha_pattern`` rule: ``re.match(rf"(.*\\.)?({key})$", name)``."""
    return re.match(rf"(.*\.)?({key})$", name) is not None


def pattern_rank_alpha(fields: Any, name: str) -> tuple[int, float]:
    """The rank and alpha PEFT gives module ``name``: the first matching key of ``fields.rank_pattern`` /
    ``fields.alpha_pattern`` (PEFT's :func:`hf_pattern_match`), else ``fields.r`` and ``fields.alpha``."""
    rank = next((v for k, v in fields.rank_pattern if hf_pattern_match(k, name)), fields.r)
    alpha = next((v for k, v in fields.alpha_pattern if hf_pattern_match(k, name)), fields.alpha)
    return rank, alpha


def rank_value(field: str, value: Any) -> int:
    """A rank: a positive whole number (never rounded)."""
    if not is_int(value) or value < 1:
        raise fail(field, value, "a positive whole number (a rank)", "Ranks are never rounded.")
    return value


def alpha_value(field: str, value: Any) -> float:
    """An alpha: a positive finite number."""
    if not is_number(value) or not math.isfinite(value) or value <= 0:
        raise fail(
            field,
            value,
            "a positive finite number (LoRA's alpha; scale = alpha / r)",
            "jaxpeft refuses NaN, infinite, zero and negative alphas.",
        )
    return float(value)


def pattern_value(config: Mapping[str, Any], field: str, check: Any) -> tuple[tuple[str, Any], ...]:
    """A ``rank_pattern``/``alpha_pattern`` object as ``((regex, value), ...)``, each key and value checked."""
    value = config.get(field, {})
    if not isinstance(value, Mapping):
        raise fail(field, value, 'an object {module-name regex: value}, e.g. {"down_proj": 4}')
    out = []
    for key, number in value.items():
        _regex(f"{field}` key `{key}", key, rf"(.*\.)?({key})$")
        out.append((key, check(f"{field}[{key!r}]", number)))
    return tuple(out)


def rate_value(config: Mapping[str, Any], field: str, default: float = 0.0) -> float:
    """A dropout rate in [0, 1) (PEFT's default when the field is missing)."""
    value = config.get(field, default)
    if not is_number(value) or not 0.0 <= value < 1.0:
        raise fail(field, value, "a rate in [0, 1), e.g. 0.05")
    return float(value)


def check_bias_none(config: Mapping[str, Any], what: str) -> None:
    """Refuse a ``bias`` other than ``"none"``: trained biases are not ``what`` (LoRA factors, VeRA vectors)."""
    bias = config.get("bias", "none")
    if bias != "none":
        raise ValueError(
            f"{CONFIG_NAME} has `bias`={show(bias)}: trained biases are not {what}; refusing to import it "
            "(only 'none' is supported)."
        )


def check_selection(
    selection: Selection, modules: Sequence[str], universe: Sequence[str], identity_init: bool, init_field: str
) -> None:
    """Refuse a file whose tensors and config disagree on which modules PEFT adapts.

    ``modules``: the HF modules the file has adapter tensors for; ``universe``: every HF module of the params.
    A module with tensors that the config does not select is refused: PEFT's ``from_pretrained`` silently ignores
    such tensors. A selected module of the params with no tensors is accepted only when PEFT initialises it as the
    identity (``init_field`` true); otherwise PEFT would give it random weights.
    """
    ignored = [n for n in modules if not selection.selects(n)]
    if ignored:
        raise ValueError(
            f"the adapter file holds tensors for HF modules {listed(ignored)}, but {CONFIG_NAME} "
            f"({selection.describe()}) does not select them. PEFT's from_pretrained silently ignores such tensors, "
            "so the adapter PEFT runs is not the one in the file; jaxpeft refuses rather than guess. Fix the "
            "config so it selects exactly those modules, or delete their tensors."
        )
    present = set(modules)
    missing = [n for n in universe if n not in present and selection.selects(n)]
    if missing and not identity_init:
        raise ValueError(
            f"{CONFIG_NAME} ({selection.describe()}) selects HF modules {listed(missing)} that have no tensors in the "
            f"adapter file, and its `{init_field}` makes PEFT give them random weights (it warns 'Found missing "
            "adapter keys'). jaxpeft cannot reproduce that: add their tensors or narrow `target_modules`."
        )
