"""What an ``adapter_config.json`` means: PEFT 0.21.2's fields (supported, harmless or refused), checked values, and
PEFT's own rule for which modules a config adapts.

Every field of PEFT's ``LoraConfig``, ``IA3Config``, ``LoHaConfig``, ``LoKrConfig``, ``VeraConfig`` and
``LNTuningConfig`` is classified below. *Supported* fields are read and their values checked (type, range, regex);
*harmless* ones do not change what the saved tensors compute (metadata, or options that only act at initialisation
or on layer types jaxpeft does not import); *refused* ones are refused by name whenever they are set. A key PEFT
does not know either (a newer PEFT's field, or a typo) is ignored when it is unset (``null``, ``false``, empty) and
refused by name otherwise: jaxpeft cannot know whether it changes the forward. Errors name the file, the field, the
value, what was expected and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

CONFIG_NAME = "adapter_config.json"

# Fields that do not change what the saved tensors compute, by PEFT type (value: why).
_HARMLESS_COMMON = {
    "task_type": "metadata",
    "auto_mapping": "metadata",
    "peft_version": "metadata",
    "base_model_name_or_path": "metadata",
    "revision": "metadata",
    "inference_mode": "training flag",
    "fan_in_fan_out": "says how a GPT-2 Conv1D stores its weight; the adapter factors are [r, in] and [out, r] either "
    "way, and PEFT corrects the flag per layer type",
}
_HARMLESS_LORA = {
    **_HARMLESS_COMMON,
    "megatron_core": "a module name, used only with megatron_config (refused)",
    "runtime_config": "ephemeral GPU offload, a placement option",
    "qalora_group_size": "used only with use_qalora (refused)",
    "eva_config": "EVA initialisation only; the saved factors replace it",
    "corda_config": "used only with init_lora_weights='corda' (refused)",
    "lora_ga_config": "used only with init_lora_weights='lora_ga' (refused)",
    "loftq_config": "used only with init_lora_weights='loftq' (refused); PEFT drops it otherwise",
}
_HARMLESS_IA3 = dict(_HARMLESS_COMMON)
# Fields that change the forward, add trained weights or train differently: refused whenever set. The method
# readers refuse `modules_to_save` too: jaxpeft.hf.from_state_dict reads it (jaxpeft.hf._saved) and hands them
# the rest of the file.
_SAVED = "fully trained modules (`modules_to_save`) are read by jaxpeft.hf.from_state_dict, not by a method's reader"
_REFUSED_LORA = {
    "lora_bias": "LoRA bias terms (`lora_bias`) are not supported",
    "modules_to_save": _SAVED,
    "trainable_token_indices": "trainable tokens (`trainable_token_indices`) are not supported",
    "target_parameters": "LoRA on bare parameters (`target_parameters`) is not supported",
    "layer_replication": "layer replication (`layer_replication`) changes the base model",
    "use_qalora": "QA-LoRA (`use_qalora`) pools the adapter's input",
    "alora_invocation_tokens": "activated LoRA (`alora_invocation_tokens`) switches on after given tokens",
    "use_bdlora": "block-diagonal LoRA (`use_bdlora`) has other factor shapes",
    "arrow_config": "Arrow routing (`arrow_config`) mixes several adapters per token",
    "kasa_config": "KaSA (`kasa_config`) adds a singular-value adapter",
    "velora_config": "VeLoRA (`velora_config`) trains with compressed activations and saves extra buffers",
    "monteclora_config": "MonteCLoRA (`monteclora_config`) samples its factors in training and saves extra weights",
    "megatron_config": "Megatron parallel layers (`megatron_config`) are not supported",
}
_REFUSED_IA3 = {"modules_to_save": _SAVED}
_HARMLESS_LYCORIS = {k: v for k, v in _HARMLESS_COMMON.items() if k != "fan_in_fan_out"}  # LoHa/LoKr lack it
_HARMLESS_LOKR = {**_HARMLESS_LYCORIS, "rank_dropout_scale": "used only with a non-zero rank_dropout (refused)"}
_HARMLESS_VERA = dict(_HARMLESS_COMMON)
_HARMLESS_LN_TUNING = {k: v for k, v in _HARMLESS_COMMON.items() if k != "fan_in_fan_out"}  # it lacks it
_SUPPORTED_LN_TUNING = ("peft_type", "target_modules", "exclude_modules")
_SUPPORTED_LOHA = (
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
_SUPPORTED_LOKR = (*_SUPPORTED_LOHA, "decompose_both", "decompose_factor")
_SUPPORTED_VERA = (
    "peft_type",
    "r",
    "target_modules",
    "layers_to_transform",
    "layers_pattern",
    "projection_prng_key",
    "save_projection",
    "vera_dropout",
    "d_initial",
    "init_weights",
    "bias",
)
#: Fields refused whenever set, by ``peft_type``.
_REFUSED = {"LORA": _REFUSED_LORA, **dict.fromkeys(("IA3", "LOHA", "LOKR", "VERA", "LN_TUNING"), _REFUSED_IA3)}
#: PEFT's config class of each ``peft_type``, for messages.
CONFIG_CLASSES = {
    "LORA": "LoraConfig",
    "IA3": "IA3Config",
    "LOHA": "LoHaConfig",
    "LOKR": "LoKrConfig",
    "VERA": "VeraConfig",
    "LN_TUNING": "LNTuningConfig",
}
_SUPPORTED_LORA = (
    "peft_type",
    "r",
    "lora_alpha",
    "lora_dropout",
    "use_rslora",
    "use_dora",
    "rank_pattern",
    "alpha_pattern",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "init_lora_weights",
    "ensure_weight_tying",
    "bias",
)
_SUPPORTED_IA3 = ("peft_type", "target_modules", "exclude_modules", "feedforward_modules", "init_ia3_weights")
#: Every field of PEFT 0.21.2's configs, by ``peft_type`` (the interop tests compare them with PEFT's dataclasses).
KNOWN_FIELDS = {
    "LORA": frozenset((*_SUPPORTED_LORA, *_HARMLESS_LORA, *_REFUSED_LORA)),
    "IA3": frozenset((*_SUPPORTED_IA3, *_HARMLESS_IA3, *_REFUSED_IA3)),
    "LOHA": frozenset((*_SUPPORTED_LOHA, *_HARMLESS_LYCORIS, *_REFUSED_IA3)),
    "LOKR": frozenset((*_SUPPORTED_LOKR, *_HARMLESS_LOKR, *_REFUSED_IA3)),
    "VERA": frozenset((*_SUPPORTED_VERA, *_HARMLESS_VERA, *_REFUSED_IA3)),
    "LN_TUNING": frozenset((*_SUPPORTED_LN_TUNING, *_HARMLESS_LN_TUNING, *_REFUSED_IA3)),
}
# init_lora_weights values that rewrite the base weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


_MAX_LISTED = 6


def listed(items: Iterable[str]) -> str:
    """Up to six items, sorted and quoted, with a count of the rest."""
    items = sorted(items)
    shown = ", ".join(repr(i) for i in items[:_MAX_LISTED])
    return shown + (f" (and {len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def _fail(field: str, value: Any, expected: str, fix: str = "") -> ValueError:
    return ValueError(f"{CONFIG_NAME} has `{field}`={_show(value)}; expected {expected}.{' ' + fix if fix else ''}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_set(value: Any) -> bool:
    if value is None or value is False:
        return False
    return not (isinstance(value, (str, list, dict)) and len(value) == 0)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _regex(field: str, pattern: str, wrapped: str | None = None) -> None:
    """Refuse ``pattern`` when it (or PEFT's ``wrapped`` use of it) is not a valid regular expression."""
    try:
        re.compile(pattern if wrapped is None else wrapped)
    except (re.error, RecursionError, OverflowError) as err:
        raise _fail(field, pattern, f"a valid regular expression ({err})", "Fix or remove that entry.") from None


def _names(field: str, value: Any, *, regex_ok: bool = True) -> str | tuple[str, ...]:
    """A module-name list (as a tuple) or a full-match regex string."""
    if isinstance(value, str):
        if not regex_ok:
            raise _fail(field, value, "a list of module names")
        _regex(field, value)
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise _fail(field, value, "a list of module names or a regular expression string")


def _bool(config: Mapping[str, Any], field: str, default: bool) -> bool:
    value = config.get(field, default)
    if not isinstance(value, bool):
        raise _fail(
            field,
            value,
            "true or false",
            'PEFT would treat any non-empty string (even "false") as true; write a JSON boolean.',
        )
    return value


def check_fields(config: Any, peft_type: str) -> dict[str, Any]:
    """``config`` as a dict after refusing unknown-and-set and refused-and-set fields (``peft_type`` is known)."""
    if not isinstance(config, Mapping):
        raise TypeError(f"the {CONFIG_NAME} contents are a {type(config).__name__}; expected a JSON object (a dict).")
    bad_keys = [k for k in config if not isinstance(k, str)]
    if bad_keys:
        raise ValueError(f"{CONFIG_NAME} has non-string keys {bad_keys[:3]!r}; JSON object keys are strings.")
    refused = _REFUSED[peft_type]
    for field, why in refused.items():
        if _is_set(config.get(field)):
            raise ValueError(
                f"{CONFIG_NAME} sets `{field}`={_show(config[field])}: {why} in jaxpeft, so the adapter cannot be "
                "imported as PEFT runs it; refusing it."
            )
    unknown = sorted(k for k in config if k not in KNOWN_FIELDS[peft_type] and _is_set(config[k]))
    if unknown:
        raise ValueError(
            f"{CONFIG_NAME} sets {', '.join(f'`{k}`={_show(config[k])}' for k in unknown[:3])}, which PEFT 0.21.2's "
            f"{CONFIG_CLASSES[peft_type]} does not have; jaxpeft cannot tell whether "
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

        def show(value: Any) -> str:
            return _show(list(value) if isinstance(value, tuple) else value)

        parts = [f"target_modules={show(self.target_modules)}"]
        if self.exclude_modules:
            parts.append(f"exclude_modules={show(self.exclude_modules)}")
        if self.layers_to_transform is not None:
            parts.append(f"layers_to_transform={show(self.layers_to_transform)}")
        if self.layers_pattern:
            parts.append(f"layers_pattern={show(self.layers_pattern)}")
        return ", ".join(parts)


def read_selection(config: Mapping[str, Any], layers: bool) -> Selection:
    """The checked :class:`Selection` of ``config`` (``layers``: the config type has ``layers_to_transform``)."""
    targets = config.get("target_modules")
    if targets is None:
        raise _fail(
            "target_modules",
            None,
            "the adapted module names",
            "PEFT then takes its defaults for the model type, which jaxpeft does not know; write the names into "
            'the file (e.g. ["q_proj", "v_proj"] for Llama).',
        )
    if isinstance(targets, str) and targets.lower() == "all-linear":
        raise _fail(
            "target_modules",
            targets,
            "module names",
            "PEFT expands 'all-linear' from the torch model's layer types when it loads; write the module names.",
        )
    target_modules = _names("target_modules", targets)
    if not target_modules:
        raise _fail("target_modules", targets, "at least one module name (PEFT refuses an empty list)")
    excluded = config.get("exclude_modules")
    exclude_modules = None if excluded is None else _names("exclude_modules", excluded)
    indexes, patterns = (config.get("layers_to_transform"), config.get("layers_pattern")) if layers else (None, None)
    if indexes is not None and not _is_int(indexes):
        if not (isinstance(indexes, list) and all(_is_int(i) for i in indexes)):
            raise _fail("layers_to_transform", indexes, "a layer index or a list of layer indexes")
        indexes = tuple(indexes)
    if patterns is not None:
        patterns = (patterns,) if isinstance(patterns, str) else patterns
        if not (isinstance(patterns, list | tuple) and all(isinstance(p, str) for p in patterns)):
            raise _fail("layers_pattern", config.get("layers_pattern"), "a name (or list of names) such as 'layers'")
        for pattern in patterns:
            _regex("layers_pattern", pattern, rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.")
        patterns = tuple(patterns)
    if isinstance(target_modules, str) and (indexes is not None or patterns is not None):
        raise ValueError(
            f"{CONFIG_NAME} has a regex `target_modules`={_show(target_modules)} together with `layers_to_transform`"
            " or `layers_pattern`, which PEFT refuses; fold the layers into the regex."
        )
    if patterns and indexes is None:
        raise ValueError(f"{CONFIG_NAME} has `layers_pattern` without `layers_to_transform`, which PEFT refuses.")
    return Selection(target_modules, exclude_modules, indexes, patterns)


# ----------------------------------------------------------------------------------------------- LoRA / IA3 fields


@dataclasses.dataclass(frozen=True)
class LoraFields:
    """The checked values of a PEFT ``LoraConfig`` file."""

    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool
    use_dora: bool
    rank_pattern: tuple[tuple[str, int], ...]
    alpha_pattern: tuple[tuple[str, float], ...]
    ensure_weight_tying: bool
    identity_init: bool  # a targeted module with no saved tensors is the identity in PEFT
    init: Any
    selection: Selection

    def rank_alpha(self, name: str) -> tuple[int, float]:
        """The rank and alpha PEFT gives module ``name`` (first matching pattern key, else ``r``/``lora_alpha``)."""
        rank = next((v for k, v in self.rank_pattern if hf_pattern_match(k, name)), self.r)
        alpha = next((v for k, v in self.alpha_pattern if hf_pattern_match(k, name)), self.lora_alpha)
        return rank, alpha


def hf_pattern_match(key: str, name: str) -> bool:
    """PEFT's ``rank_pattern``/``alpha_pattern`` rule: ``re.match(rf"(.*\\.)?({key})$", name)``."""
    return re.match(rf"(.*\.)?({key})$", name) is not None


def _rank(field: str, value: Any) -> int:
    if not _is_int(value) or value < 1:
        raise _fail(field, value, "a positive whole number (a rank)", "Ranks are never rounded.")
    return value


def _alpha(field: str, value: Any) -> float:
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise _fail(
            field,
            value,
            "a positive finite number (LoRA's alpha; scale = alpha / r)",
            "jaxpeft refuses NaN, infinite, zero and negative alphas.",
        )
    return float(value)


def _pattern(config: Mapping[str, Any], field: str, check: Any) -> tuple[tuple[str, Any], ...]:
    value = config.get(field, {})
    if not isinstance(value, Mapping):
        raise _fail(field, value, 'an object {module-name regex: value}, e.g. {"down_proj": 4}')
    out = []
    for key, number in value.items():
        _regex(f"{field}` key `{key}", key, rf"(.*\.)?({key})$")
        out.append((key, check(f"{field}[{key!r}]", number)))
    return tuple(out)


def _init(config: Mapping[str, Any]) -> tuple[Any, bool]:
    """``init_lora_weights`` and whether PEFT makes a targeted module with no saved tensors the identity."""
    init = config.get("init_lora_weights", True)
    if isinstance(init, bool):
        return init, init  # True: B = 0; False: random A and B
    if isinstance(init, str):
        if init.lower().startswith(_BASE_CHANGING_INITS):
            raise ValueError(
                f"{CONFIG_NAME} has `init_lora_weights`={init!r}: that initialisation rewrites the base weights, so "
                "the factors alone do not reproduce the model. Convert it in PEFT first "
                "(save_pretrained(..., path_initial_model_for_weight_conversion=...)) and import the converted adapter."
            )
        if init.lower() in ("gaussian", "mica") or init == "eva":  # B = 0 (MiCA: A = 0)
            return init, True
        if init == "orthogonal":  # random orthogonal A and B
            return init, False
    raise _fail("init_lora_weights", init, "true, false, 'gaussian', 'eva', 'mica' or 'orthogonal'")


def read_lora(config: Mapping[str, Any]) -> LoraFields:
    """The checked fields of a ``peft_type: "LORA"`` config; missing fields take PEFT's defaults."""
    config = check_fields(config, "LORA")
    bias = config.get("bias", "none")
    if bias != "none":
        raise ValueError(
            f"{CONFIG_NAME} has `bias`={_show(bias)}: trained biases are not LoRA factors; refusing to import it "
            "(only 'none' is supported)."
        )
    dropout = config.get("lora_dropout", 0.0)
    if not _is_number(dropout) or not 0.0 <= dropout < 1.0:
        raise _fail("lora_dropout", dropout, "a rate in [0, 1), e.g. 0.05")
    init, identity = _init(config)
    return LoraFields(
        r=_rank("r", config.get("r", 8)),
        lora_alpha=_alpha("lora_alpha", config.get("lora_alpha", 8)),
        lora_dropout=float(dropout),
        use_rslora=_bool(config, "use_rslora", False),
        use_dora=_bool(config, "use_dora", False),
        rank_pattern=_pattern(config, "rank_pattern", _rank),
        alpha_pattern=_pattern(config, "alpha_pattern", _alpha),
        ensure_weight_tying=_bool(config, "ensure_weight_tying", False),
        identity_init=identity,
        init=init,
        selection=read_selection(config, layers=True),
    )


@dataclasses.dataclass(frozen=True)
class IA3Fields:
    """The checked values of a PEFT ``IA3Config`` file."""

    feedforward_modules: str | tuple[str, ...]
    identity_init: bool
    selection: Selection

    def feedforward(self, name: str) -> bool:
        """Whether PEFT's IA3 treats module ``name`` as feed-forward."""
        return hf_feedforward(self.feedforward_modules, name)


def hf_feedforward(feedforward_modules: str | Sequence[str], name: str) -> bool:
    """PEFT IA3's ``feedforward_modules`` rule: a regex string full-matches; a list entry matches by bare
    ``endswith`` (no dot, so ``"proj"`` also marks ``q_proj``)."""
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, name) is not None
    return any(name.endswith(f) for f in feedforward_modules)


def read_ia3(config: Mapping[str, Any]) -> IA3Fields:
    """The checked fields of a ``peft_type: "IA3"`` config."""
    config = check_fields(config, "IA3")
    spec = config.get("feedforward_modules")
    if spec is None:
        raise _fail(
            "feedforward_modules",
            None,
            "the feed-forward module names",
            "PEFT then takes them from its defaults for the model type, which jaxpeft does not know. Write the "
            'list into the file (e.g. ["down_proj"] for Llama).',
        )
    feedforward = _names("feedforward_modules", spec)
    selection = read_selection(config, layers=False)
    targets = selection.target_modules
    if isinstance(feedforward, tuple) and isinstance(targets, tuple) and not set(feedforward) <= set(targets):
        raise ValueError(
            f"{CONFIG_NAME} has `feedforward_modules`={_show(list(feedforward))} that are not all in "
            f"`target_modules`={_show(list(targets))}; PEFT's IA3Config refuses that. Add them to target_modules."
        )
    init = config.get("init_ia3_weights", True)
    if not isinstance(init, bool):
        raise _fail("init_ia3_weights", init, "true or false")
    return IA3Fields(feedforward, init, selection)


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


# ----------------------------------------------------------------------------------------------- LoHa / LoKr / VeRA


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
        rank = next((v for k, v in self.rank_pattern if hf_pattern_match(k, name)), self.r)
        alpha = next((v for k, v in self.alpha_pattern if hf_pattern_match(k, name)), self.alpha)
        return rank, alpha


def _training_dropout(config: Mapping[str, Any], field: str, what: str) -> None:
    """Refuse a non-zero LyCORIS ``rank_dropout``/``module_dropout`` (jaxpeft has neither), naming the fix."""
    value = config.get(field, 0.0)
    if not _is_number(value) or not 0.0 <= value < 1.0:
        raise _fail(field, value, "a rate in [0, 1), e.g. 0.0")
    if value:
        raise ValueError(
            f"{CONFIG_NAME} has `{field}`={_show(value)}: {what} is not implemented in jaxpeft, so the adapter cannot "
            "be trained on as PEFT trains it. It acts only in training (the outputs at inference do not depend on "
            f"it): set `{field}` to 0 in the file to import the adapter."
        )


def read_lycoris(config: Mapping[str, Any], peft_type: str) -> LycorisFields:
    """The checked fields of a ``peft_type: "LOHA"`` or ``"LOKR"`` config; missing fields take PEFT's defaults."""
    config = check_fields(config, peft_type)
    _training_dropout(config, "rank_dropout", "rank dropout (dropping rows of the weight update)")
    _training_dropout(config, "module_dropout", "module dropout (skipping the whole adapter at random)")
    init = config.get("init_weights", True)
    if not (isinstance(init, bool) or (peft_type == "LOKR" and init == "lycoris")):
        raise _fail("init_weights", init, "true or false" + (" or 'lycoris'" if peft_type == "LOKR" else ""))
    factor = config.get("decompose_factor", -1)
    if not _is_int(factor) or (factor < 1 and factor != -1):
        raise _fail("decompose_factor", factor, "-1 or a positive whole number, e.g. 4")
    return LycorisFields(
        r=_rank("r", config.get("r", 8)),
        alpha=_alpha("alpha", config.get("alpha", 8)),
        rank_pattern=_pattern(config, "rank_pattern", _rank),
        alpha_pattern=_pattern(config, "alpha_pattern", _alpha),
        identity_init=init is not False,  # True: W2 (LoHa) or W1 (LoKr) zeros; 'lycoris': LoKr's W2 zeros
        use_effective_conv2d=_bool(config, "use_effective_conv2d", False),
        decompose_both=_bool(config, "decompose_both", False),
        decompose_factor=factor,
        selection=read_selection(config, layers=True),
    )


@dataclasses.dataclass(frozen=True)
class VeraFields:
    """The checked values of a PEFT ``VeraConfig`` file."""

    r: int
    projection_prng_key: int
    d_initial: float
    vera_dropout: float
    identity_init: bool
    selection: Selection


def read_vera(config: Mapping[str, Any]) -> VeraFields:
    """The checked fields of a ``peft_type: "VERA"`` config; missing fields take PEFT's defaults."""
    config = check_fields(config, "VERA")
    bias = config.get("bias", "none")
    if bias != "none":
        raise ValueError(
            f"{CONFIG_NAME} has `bias`={_show(bias)}: trained biases are not VeRA vectors; refusing to import it "
            "(only 'none' is supported)."
        )
    if _bool(config, "save_projection", True) is not True:
        raise ValueError(
            f"{CONFIG_NAME} has `save_projection`=false: the file lacks VeRA's shared projections vera_A/vera_B, "
            "and PEFT regenerates them from torch's random generator (projection_prng_key), which jaxpeft cannot "
            "reproduce. jaxpeft imports VeRA files that hold its own projections (written by jaxpeft.hf's export, "
            "with save_projection=true): train the adapter with jaxpeft.VeraConfig, or export it from jaxpeft."
        )
    key = config.get("projection_prng_key", 0)
    if not _is_int(key) or not 0 <= key < 2**32:
        raise _fail("projection_prng_key", key, "a whole number in [0, 2**32)")
    dropout = config.get("vera_dropout", 0.0)
    if not _is_number(dropout) or not 0.0 <= dropout < 1.0:
        raise _fail("vera_dropout", dropout, "a rate in [0, 1), e.g. 0.05")
    d_initial = config.get("d_initial", 0.1)
    if not _is_number(d_initial) or not math.isfinite(d_initial):
        raise _fail("d_initial", d_initial, "a finite number, e.g. 0.1")
    return VeraFields(
        r=_rank("r", config.get("r", 256)),
        projection_prng_key=key,
        d_initial=float(d_initial),
        vera_dropout=float(dropout),
        identity_init=_bool(config, "init_weights", True),  # True: lambda_b zeros
        selection=read_selection(config, layers=True),
    )


def read_ln_tuning(config: Mapping[str, Any]) -> Selection:
    """The checked selection of a ``peft_type: "LN_TUNING"`` config (PEFT's ``LNTuningConfig`` has no
    ``layers_to_transform``; every other field is metadata or ``modules_to_save``)."""
    return read_selection(check_fields(config, "LN_TUNING"), layers=False)
