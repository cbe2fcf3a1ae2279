"""IA3 tensors and config: PEFT's ``IA3Config``, both ways.

Tensors: ``<module>.ia3_l`` (no ``.weight``): ``[out, 1]`` for a Linear that scales its output, ``[1, in]`` for a
feed-forward Linear (``feedforward_modules``, which scales its input), ``[1, channels, 1, ...]`` for a Conv (output
channels, or input channels when feed-forward). Kernels with several fan-in or fan-out axes are flattened.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxpeft._select import Layout
from jaxpeft.hf._common import (
    PREFIX,
    Group,
    Target,
    adapter_dtype,
    build_adapters,
    check_tensors,
    conv_vector,
    exact_paths,
    export_targets,
    group_modules,
    hf_modules,
    import_layout,
    split_keys,
    target_modules_for,
)
from jaxpeft.hf._config import check_selection, hf_feedforward, read_ia3
from jaxpeft.methods.ia3 import IA3Config, IA3Weights

__all__ = ["from_hf", "to_hf"]

_SUFFIXES = {".ia3_l": "l"}

# ----------------------------------------------------------------------------------------------- export


def _vector_tensor(target: Target, layer: int | None) -> np.ndarray:
    """HF's ``ia3_l`` of one layer of an IA3 adapter."""
    v = np.reshape(target.array("vector", layer), (-1,))
    if target.kind == "conv":
        return conv_vector(v, target.layout)
    return v[None, :] if target.node.feedforward else v[:, None]


def _feedforward_modules(
    feedforward: Mapping[str, bool], targets: str | list[str], override: str | Sequence[str] | None
) -> tuple[str | list[str], str | list[str]]:
    """``(target_modules, feedforward_modules)`` with which PEFT marks exactly the feed-forward modules.

    PEFT tests a list by bare ``name.endswith(entry)`` and requires it to be a subset of a ``target_modules``
    list. Short names first, then full names (with full ``target_modules`` if ours were short), else a regex.
    """
    names = sorted(n for n, ff in feedforward.items() if ff)
    if not names:
        return targets, []
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    for candidate in (short, names):
        if not all(hf_feedforward(candidate, n) == ff for n, ff in feedforward.items()):
            continue
        if isinstance(targets, str) or set(candidate) <= set(targets):
            return targets, candidate
        if override is None and candidate is names:
            return sorted(feedforward), candidate
    return targets, "(?:" + "|".join(re.escape(n) for n in names) + ")"


def to_hf(
    adapters: Any,
    cfg: IA3Config,
    params: Any,
    module_name: Callable[[str], str],
    *,
    layouts: Mapping[str, Layout] | None,
    target_modules: str | Sequence[str] | None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The HF config and tensors of IA3 adapters."""
    tensors: dict[str, np.ndarray] = {}
    feedforward: dict[str, bool] = {}
    for target in export_targets(adapters, IA3Weights, cfg, params, module_name, layouts):
        if target.kind == "embed":
            raise ValueError(f"IA3 adapter {target.path!r} is on an embedding, which HF PEFT's IA3 does not support.")
        for name, layer in target.layers():
            tensors[f"{PREFIX}{name}.ia3_l"] = np.ascontiguousarray(_vector_tensor(target, layer))
            feedforward[name] = target.node.feedforward
    targets = target_modules_for(feedforward, hf_modules(params, module_name), target_modules)
    targets, ff_modules = _feedforward_modules(feedforward, targets, target_modules)
    config = {
        "auto_mapping": None,
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "feedforward_modules": ff_modules,
        "inference_mode": True,
        "init_ia3_weights": True,
        "modules_to_save": None,
        "peft_type": "IA3",
        "revision": None,
        "target_modules": targets,
    }
    return config, tensors


# ----------------------------------------------------------------------------------------------- import


def _vector(name: str, tensor: Any, kind: str, layout: Layout, group: Group, ff: bool) -> np.ndarray:
    """One module's ``ia3_l`` as our per-layer vector ``(*fan_out)``, or ``(*fan_in)`` when feed-forward."""
    _, fan_in, fan_out = layout.split(group.shape)
    ours = ((fan_in[-1],) if kind == "conv" else fan_in) if ff else fan_out
    if kind == "conv":
        want: tuple[int, ...] = (1, math.prod(ours), *([1] * (layout.fan_in - 1)))
    else:
        want = (1, math.prod(ours)) if ff else (math.prod(ours), 1)
    tensor = np.asarray(tensor)
    if tensor.shape != want:
        raise ValueError(
            f"HF module {name!r} has ia3_l of shape {tensor.shape}, but as a {'' if ff else 'non-'}feed-forward "
            f"module (by `feedforward_modules`) of {group.path!r} of shape {group.shape} it needs {want} per layer; "
            "do the config and tensors belong together, and to this base model?"
        )
    return np.reshape(tensor, ours)


def from_hf(
    config: Mapping[str, Any],
    tensors: Mapping[str, Any],
    params: Any,
    module_name: Callable[[str], str],
    *,
    layouts: Mapping[str, Layout] | None,
    dtype: Any,
    base_weights: str,
) -> tuple[IA3Config, dict[str, Any]]:
    """An ``IA3Config`` and adapter tree from a PEFT ``IA3`` adapter."""
    fields = read_ia3(config)
    index = hf_modules(params, module_name)
    modules = split_keys(check_tensors(tensors), _SUFFIXES, "IA3 vectors (ia3_l)")
    adapted = [n for n, entry in modules.items() if set(entry) != {"w"}]
    check_selection(fields.selection, adapted, list(index), fields.identity_init, "init_ia3_weights")
    groups = group_modules(modules, index, params, base_weights)
    if not groups:
        raise ValueError("the adapter file holds no IA3 vectors.")
    layouts = dict(layouts or {})
    arrays, used_layouts, feedforward = {}, {}, {}
    for group in groups:
        ffs = {fields.feedforward(name) for name, _ in group.modules}
        kinds = {"linear" if np.ndim(entry["l"]) == 2 else "conv" for _, entry in group.modules}
        if len(ffs) > 1 or len(kinds) > 1:
            raise ValueError(
                f"the HF modules stacked into {group.path!r} (e.g. {group.first!r}) are not all alike: some are "
                "feed-forward (or Conv) and some not; a stacked adapter is one kind of module."
            )
        ff, kind = ffs.pop(), kinds.pop()
        layout = import_layout(group, kind, layouts.get(group.path))
        vectors = [_vector(name, entry["l"], kind, layout, group, ff) for name, entry in group.modules]
        arrays[group.path] = {"vector": group.stack(vectors)}
        used_layouts[group.path], feedforward[group.path] = layout, ff
    ff_paths = [p for p, ff in feedforward.items() if ff]
    cfg = IA3Config(
        targets=exact_paths(arrays),
        feedforward=exact_paths(ff_paths) if ff_paths else (),
        dtype=adapter_dtype((f["vector"] for f in arrays.values()), dtype),
    )
    return cfg, build_adapters(cfg, params, used_layouts, arrays)
