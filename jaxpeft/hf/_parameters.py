"""PEFT's ``target_parameters``: LoRA on bare 3-D parameters, the stacked expert weights of MoE models.

PEFT 0.21.2 wraps each targeted ``nn.Parameter`` in a ``lora.ParamWrapper``. For a parameter stored
``(experts, out, in)`` (transformers' ``MixtralExperts.gate_up_proj``/``down_proj``) it keeps ``lora_A.weight``
``[r * E, in]`` whose row ``e * r + k`` is expert ``e``'s ``k``-th rank (expert-major) and ``lora_B.weight``
``[out, r * E]`` whose column ``k * E + e`` is the same rank (rank-major); expert ``e``'s update is
``scale · B_e A_e``. Several parameters of one module nest: the first one the torch module registers is the
innermost wrapper, so its keys carry one ``.base_layer`` per parameter registered after it.

jaxpeft's adapter of an einsum kernel ``(E, in, out)`` whose expert axis is a stack axis is A ``(E, in, r)`` and
B ``(E, r, out)``, the same update per expert; this module converts between the two and names the keys. The codec
in ``jaxpeft.hf._lora_format`` calls it.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxpeft._select import Layout
from jaxpeft.hf._common import LAYER, PREFIX, hf_modules
from jaxpeft.hf._config import CONFIG_NAME, Selection, fail, listed, show

__all__ = [
    "WithParameters",
    "from_peft",
    "is_parameter_target",
    "order_parameters",
    "parameter_layout",
    "read_target_parameters",
    "rename_wrapped_keys",
    "selects_parameter",
    "to_peft",
    "wrapper_name",
]

#: The key suffixes a ``ParamWrapper`` writes (``lora_A``/``lora_B``; PEFT has no DoRA there).
_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector", ".lora_magnitude_vector.weight")


def is_parameter_target(layout: Layout, template: str) -> bool:
    """Whether an adapter is written as a PEFT target parameter: an einsum kernel with one stack axis more than its
    ``{layer}`` template (the expert axis of an ``(experts, in, out)`` kernel). A scanned Dense whose template lacks
    ``{layer}`` is not one: the generic export refuses it, naming the missing placeholder."""
    return layout.kind == "einsum" and layout.stack == int(LAYER in template) + 1


def parameter_layout(shape: tuple[int, ...], stacked: bool, given: Layout | None, path: str) -> Layout:
    """The layout of an expert kernel ``(*layers, E, in, out)``: ``given`` (checked) or the einsum one it must be."""
    layout = given or Layout(stack=int(stacked) + 1, fan_in=1, fan_out=1, kind="einsum")
    if (layout.stack, layout.fan_in, layout.fan_out) != (int(stacked) + 1, 1, 1) or layout.ndim != len(shape):
        raise ValueError(
            f"`layouts`[{path!r}]={layout} does not fit a PEFT target parameter: {path!r} of shape {shape} must be "
            f"{'(layers, ' if stacked else '('}experts, in, out) (stack={int(stacked) + 1}, fan_in=1, fan_out=1)."
        )
    return layout


def to_peft(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Our A ``(E, in, r)``, B ``(E, r, out)`` as PEFT's ``lora_A.weight`` ``[r * E, in]`` and ``lora_B.weight``
    ``[out, r * E]``."""
    experts, fan_in, rank = a.shape
    return (
        np.transpose(a, (0, 2, 1)).reshape(experts * rank, fan_in),
        np.transpose(b, (2, 1, 0)).reshape(b.shape[2], rank * experts),
    )


def from_peft(a_hf: np.ndarray, b_hf: np.ndarray, experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`to_peft` (shapes checked by the caller)."""
    rank = a_hf.shape[0] // experts
    a = np.transpose(np.reshape(a_hf, (experts, rank, a_hf.shape[1])), (0, 2, 1))
    b = np.transpose(np.reshape(b_hf, (b_hf.shape[0], rank, experts)), (2, 1, 0))
    return a, b


def wrapper_name(module: str, index: int, count: int) -> str:
    """The HF name PEFT gives the ``index``-th (registration order) of ``count`` wrapped parameters of ``module``."""
    return module + ".base_layer" * (count - 1 - index)


def order_parameters(module: str, names: Sequence[str], order: Sequence[str] | None) -> list[str]:
    """The parameter names (last components) of one HF module in registration order, from ``parameter_order``.

    Raises:
      ValueError: several names and no (or an incomplete) ``parameter_order``.
    """
    names = sorted(names)
    if len(names) == 1:
        return names
    if order is None or isinstance(order, str) or not all(isinstance(o, str) for o in order):
        raise ValueError(
            f"LoRA adapts the parameters {names} of HF module {module!r} (PEFT `target_parameters`); PEFT nests one "
            "ParamWrapper per parameter in the order the torch module registers them, which decides their tensor "
            f"keys. Pass `parameter_order` with that order, e.g. parameter_order={tuple(reversed(names))!r} "
            "(examples/models/moe.py: moe.PARAMETER_ORDER)."
        )
    missing = [n for n in names if n not in order]
    if missing:
        raise ValueError(
            f"`parameter_order`={tuple(order)!r} does not list {missing} of HF module {module!r}; list every "
            "adapted parameter of the module in its registration order."
        )
    return sorted(names, key=list(order).index)


# ----------------------------------------------------------------------------------------------- import


def read_target_parameters(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The checked ``target_parameters`` of a LoRA config (a list of names; ``()`` when unset)."""
    value = config.get("target_parameters")
    if value is None or value == []:
        return ()
    if not (isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)):
        raise fail("target_parameters", value, "a list of parameter names such as ['mlp.experts.gate_up_proj']")
    if config.get("use_dora") is True:
        raise ValueError(
            f"{CONFIG_NAME} sets `target_parameters` with use_dora=true, which PEFT's ParamWrapper refuses; the file "
            "was not written by PEFT."
        )
    if config.get("lora_dropout"):
        raise ValueError(
            f"{CONFIG_NAME} sets `target_parameters` with `lora_dropout`={show(config['lora_dropout'])}, which PEFT's "
            "ParamWrapper refuses; the file was not written by PEFT."
        )
    return tuple(value)


def selects_parameter(targets: Sequence[str], name: str) -> bool:
    """PEFT's ``target_parameters`` rule: the parameter key equals a target or ends with ``"." + target``."""
    return name in targets or any(name.endswith("." + t) for t in targets)


@dataclasses.dataclass(frozen=True)
class WithParameters(Selection):
    """A :class:`Selection` of modules that also applies ``target_parameters`` to the params' expert kernels
    (``candidates``: their HF parameter names, judged by the parameter rule only)."""

    parameters: tuple[str, ...] = ()
    candidates: frozenset[str] = frozenset()

    def selects(self, name: str) -> bool:
        """Whether PEFT adapts the module or (for a candidate) the parameter called ``name``."""
        if name in self.candidates:
            return selects_parameter(self.parameters, name)
        # a 2-D `<module>.weight` PEFT wraps alone: the same tensors and update as a Linear LoRA on the module (PEFT
        # itself moves a `target_modules` entry whose module is no nn.Linear, e.g. Mixtral's router, there)
        return super().selects(name) or selects_parameter(self.parameters, name + ".weight")

    def describe(self) -> str:
        """The selecting fields, as the file writes them."""
        return f"{super().describe()}, target_parameters={show(list(self.parameters))}"


def _candidates(params: Any, module_name: Any) -> dict[str, tuple[str, int | None]]:
    """HF names of the params' 3-D weights per layer (expert kernels ``(E, in, out)``): what ``target_parameters``
    can name."""
    out = {}
    shapes = {p: tuple(getattr(x, "shape", ())) for p, x in _leaves(params)}
    for name, (path, layer) in hf_modules(params, module_name).items():
        if len(shapes[path]) - (layer is not None) == 3:
            out[name] = (path, layer)
    return out


def _leaves(params: Any) -> list[tuple[str, Any]]:
    from jaxpeft._paths import leaves_with_paths

    return list(leaves_with_paths(params))


def rename_wrapped_keys(
    tensors: Mapping[str, Any],
    params: Any,
    module_name: Any,
    selection: Selection,
    parameters: tuple[str, ...],
    order: Sequence[str] | None,
) -> tuple[dict[str, Any], Selection, dict[str, Any]]:
    """PEFT's wrapper keys (``<module>[.base_layer...].lora_A.weight``) renamed to ``<module>.<parameter>...``, so
    the generic readers group them by our expert kernel; the selection that also applies ``target_parameters``; and
    ``{our path: its shape}`` of the selected 3-D parameters. A selected 2-D ``<module>.weight`` keeps its keys: PEFT
    writes it like a Linear LoRA of ``<module>``.

    Raises:
      ValueError: ``target_parameters`` selects no 3-D parameter of ``params`` (PEFT refuses that config too); the
        nesting of several parameters of one module cannot be told (pass ``parameter_order``).
    """
    if not parameters:
        return dict(tensors), selection, {}
    candidates = _candidates(params, module_name)
    selected = sorted(n for n in candidates if selects_parameter(parameters, n))
    weights = [n for n in hf_modules(params, module_name) if selects_parameter(parameters, n + ".weight")]
    if not selected and not weights:
        known = listed(sorted(candidates)[:3]) or "none"
        raise ValueError(
            f"{CONFIG_NAME} sets `target_parameters`={show(list(parameters))}, but that selects no parameter of "
            f"`params` through `module_name` (its 3-D expert kernels map to {known}); "
            "PEFT refuses such a config too ('no parameter was matched'), so refusing it. Map each expert kernel to "
            "its HF parameter name, e.g. 'model.layers.{layer}.mlp.experts.gate_up_proj'."
        )
    by_module: dict[str, list[str]] = {}
    for name in selected:
        module, _, param = name.rpartition(".")
        by_module.setdefault(module, []).append(param)
    prefix = PREFIX if all(k.startswith(PREFIX) for k in tensors) else ""
    renames: dict[str, str] = {}
    for module, names in by_module.items():
        if len(names) > 1 and order is None:
            names = _order_by_shapes(module, names, tensors, prefix, params, candidates)
        else:
            names = order_parameters(module, names, order)
        for index, param in enumerate(names):
            wrapped = prefix + wrapper_name(module, index, len(names))
            for suffix in _SUFFIXES:
                if wrapped + suffix in tensors:
                    renames[wrapped + suffix] = f"{prefix}{module}.{param}{suffix}"
    out = {renames.get(k, k): v for k, v in tensors.items()}
    shapes = {p: tuple(s.shape) for p, s in _leaves(params)}
    paths = {candidates[n][0]: shapes[candidates[n][0]] for n in selected}
    fields = (selection.target_modules, selection.exclude_modules, selection.layers_to_transform)
    return out, WithParameters(*fields, selection.layers_pattern, parameters, frozenset(candidates)), paths


def _order_by_shapes(
    module: str,
    names: Sequence[str],
    tensors: Mapping[str, Any],
    prefix: str,
    params: Any,
    candidates: Mapping[str, tuple[str, int | None]],
) -> list[str]:
    """The one registration order of ``names`` under which every nesting level's factors fit its parameter."""
    shapes = dict((p, tuple(x.shape)) for p, x in _leaves(params))
    per_layer = {n: shapes[candidates[f"{module}.{n}"][0]][-3:] for n in names}

    def fits(order: Sequence[str]) -> bool:
        for index, name in enumerate(order):
            stem = prefix + wrapper_name(module, index, len(order))
            a, b = tensors.get(stem + ".lora_A.weight"), tensors.get(stem + ".lora_B.weight")
            if a is None or b is None:
                continue
            experts, fan_in, fan_out = per_layer[name]
            if np.ndim(a) != 2 or np.ndim(b) != 2 or np.shape(a)[1] != fan_in or np.shape(b)[0] != fan_out:
                return False
            if np.shape(a)[0] % experts:
                return False
        return True

    orders = [list(p) for p in itertools.permutations(sorted(names)) if fits(p)]
    if len(orders) != 1:
        raise ValueError(
            f"the adapter file adapts the parameters {sorted(names)} of HF module {module!r} (PEFT "
            f"`target_parameters`), and their factor shapes {'fit no' if not orders else 'fit more than one'} "
            "nesting order. Pass `parameter_order` with the order the torch module registers them (e.g. "
            "examples/models/moe.py's moe.PARAMETER_ORDER)."
        )
    return orders[0]
