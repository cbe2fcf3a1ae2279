"""LoHa tensors and config: PEFT's ``LoHaConfig``, both ways; and what LoHa and LoKr (``jaxpeft.hf.lokr``) share.

Tensors (no ``.weight``): ``<module>.hada_w1_a`` ``[out, r]``, ``.hada_w1_b`` ``[r, in]``, likewise ``hada_w2_*``,
with ``ΔW = (alpha/r)·(w1_a·w1_b) ⊙ (w2_a·w2_b)`` in torch's ``(out, in)`` layout: our ``b1ᵀ``, ``a1ᵀ``, ``b2ᵀ``,
``a2ᵀ``. Kernels with several fan-in or fan-out axes are flattened; a Conv's fan-in is flattened in torch's
``(in, *window)`` order (ours is ``(*window, in)``), as PEFT does without ``use_effective_conv2d``.
"""

from __future__ import annotations

import math
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
    exact_paths,
    export_targets,
    group_modules,
    hf_modules,
    import_layout,
    number,
    split_keys,
    target_modules_for,
)
from jaxpeft.hf._config import CONFIG_NAME, LycorisFields, check_selection, read_lycoris
from jaxpeft.hf.lora import _default_value, _Entry, _patterns
from jaxpeft.methods.loha import LohaConfig, LohaWeights, RankedConfig

__all__ = ["from_hf", "to_hf"]

_SUFFIXES = {
    ".hada_w1_a": "w1_a",
    ".hada_w1_b": "w1_b",
    ".hada_w2_a": "w2_a",
    ".hada_w2_b": "w2_b",
    ".hada_t1": "t1",
    ".hada_t2": "t2",
}

# ----------------------------------------------------------------------------------------------- shared


def check_against_cfg(target: Target, cfg: RankedConfig, rank: int, scale: float) -> _Entry:
    """The target's rank and alpha for the config, after checking the node was made with ``cfg``."""
    path = target.path
    if rank != cfg.rank_for(path):
        raise ValueError(
            f"adapter {path!r} has rank {rank} but `cfg` gives rank {cfg.rank_for(path)}; pass its config."
        )
    if not math.isclose(scale, cfg.scale_for(path), rel_tol=1e-6):
        raise ValueError(
            f"adapter {path!r} has scale {scale} but `cfg` gives {cfg.scale_for(path)}; pass the config the adapters "
            "were made with."
        )
    return _Entry(target, rank, cfg.alpha_for(path))


def ranked_config(cfg: RankedConfig, names: Mapping[str, _Entry], peft_type: str) -> dict[str, Any]:
    """The fields LoHa's and LoKr's HF configs share: ``r``, ``alpha`` and patterns giving each module its own."""
    rank = _default_value([e.rank for e in names.values()], cfg.rank)
    alpha = _default_value([e.alpha for e in names.values()], cfg.alpha)
    return {
        "alpha": number(alpha),
        "alpha_pattern": _patterns(names, "alpha", alpha),
        "auto_mapping": None,
        "exclude_modules": None,
        "inference_mode": True,
        "init_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "module_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": peft_type,
        "r": rank,
        "rank_dropout": 0.0,
        "rank_pattern": _patterns(names, "rank", rank),
        "revision": None,
        "use_effective_conv2d": False,
    }


def lycoris_groups(
    config: Mapping[str, Any],
    tensors: Mapping[str, Any],
    params: Any,
    module_name: Callable[[str], str],
    peft_type: str,
    what: str,
    base_weights: str,
) -> tuple[LycorisFields, list[Group]]:
    """The checked fields and the file's modules grouped by parameter (the first steps of a LoHa/LoKr import)."""
    fields = read_lycoris(config, peft_type)
    index = hf_modules(params, module_name)
    suffixes = _SUFFIXES if peft_type == "LOHA" else _LOKR_SUFFIXES
    modules = split_keys(check_tensors(tensors), suffixes, what)
    adapted = [n for n, entry in modules.items() if set(entry) != {"w"}]
    check_selection(fields.selection, adapted, list(index), fields.identity_init, "init_weights")
    groups = group_modules(modules, index, params, base_weights)
    if not groups:
        raise ValueError(f"the adapter file holds no {what}.")
    cp = next((n for g in groups for n, e in g.modules if {"t1", "t2"} & set(e)), None)
    if cp is not None:
        raise ValueError(
            f"HF module {cp!r} holds CP-decomposed convolution factors (`use_effective_conv2d`=true in "
            f"{CONFIG_NAME}), which jaxpeft does not implement; train the adapter with use_effective_conv2d=false."
        )
    return fields, groups


_LOKR_SUFFIXES = {
    ".lokr_w1": "w1",
    ".lokr_w1_a": "w1_a",
    ".lokr_w1_b": "w1_b",
    ".lokr_w2": "w2",
    ".lokr_w2_a": "w2_a",
    ".lokr_w2_b": "w2_b",
    ".lokr_t2": "t2",
}


def group_layout(group: Group, layouts: Mapping[str, Layout], fields: LycorisFields) -> Layout:
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


def check_rank(fields: LycorisFields, group: Group, ranks: Sequence[int | None]) -> tuple[int, float]:
    """The rank and alpha of ``group``'s HF modules: the config's, equal to the tensors' ``ranks`` (one per module;
    None where the tensors do not show it)."""
    pairs = {fields.rank_alpha(name) for name, _ in group.modules}
    if len(pairs) > 1:
        raise ValueError(
            f"the HF modules stacked into {group.path!r} (e.g. {group.first!r}) have different ranks or alphas "
            f"{sorted(pairs)}; a stacked adapter needs one rank and one alpha."
        )
    rank, alpha = pairs.pop()
    for (name, _), got in zip(group.modules, ranks, strict=True):
        if got is not None and got != rank:
            raise ValueError(
                f"HF module {name!r} has rank {got} in the tensors but {rank} in {CONFIG_NAME}; the files do not "
                "belong together."
            )
    return rank, alpha


def ranked_cfg_args(
    fields: LycorisFields, ranks: Mapping[str, int], alphas: Mapping[str, float], arrays: Mapping[str, Any], dtype: Any
) -> dict[str, Any]:
    """The ``RankedConfig`` arguments that target exactly ``arrays``' paths with their ranks and alphas."""
    return dict(
        rank=fields.r,
        alpha=fields.alpha,
        targets=exact_paths(arrays),
        rank_pattern={exact_paths([p]): ranks[p] for p in sorted(arrays) if ranks[p] != fields.r},
        alpha_pattern={exact_paths([p]): alphas[p] for p in sorted(arrays) if alphas[p] != fields.alpha},
        dtype=adapter_dtype((v for f in arrays.values() for v in f.values()), dtype),
    )


# ----------------------------------------------------------------------------------------------- LoHa


def _torch_in(a: np.ndarray, layout: Layout) -> np.ndarray:
    """A fan-in factor ``(*fan_in, r)`` as torch's ``[r, in]`` (a Conv's ``(*window, in)`` as ``in``-major)."""
    if layout.kind == "conv":
        n = a.ndim
        a = np.transpose(a, (n - 1, n - 2, *range(n - 2)))
        return np.reshape(a, (a.shape[0], -1))
    return np.reshape(a, (-1, a.shape[-1])).T


def _ours_in(t: np.ndarray, layout: Layout, fan_in: tuple[int, ...]) -> np.ndarray:
    """Torch's ``[r, in]`` as our fan-in factor ``(*fan_in, r)`` (inverse of :func:`_torch_in`)."""
    if layout.kind == "conv":
        t = np.reshape(t, (t.shape[0], fan_in[-1], *fan_in[:-1]))
        return np.transpose(t, (*range(2, t.ndim), 1, 0))
    return np.reshape(t.T, (*fan_in, t.shape[0]))


def to_hf(
    adapters: Any,
    cfg: LohaConfig,
    params: Any,
    module_name: Callable[[str], str],
    *,
    layouts: Mapping[str, Layout] | None,
    target_modules: str | Sequence[str] | None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The HF config and tensors of LoHa adapters."""
    tensors: dict[str, np.ndarray] = {}
    names: dict[str, _Entry] = {}
    for target in export_targets(adapters, LohaWeights, cfg, params, module_name, layouts):
        entry = check_against_cfg(target, cfg, target.node.rank, target.node.scale)
        for name, layer in target.layers():
            names[name] = entry
            for i in (1, 2):
                a, b = target.array(f"a{i}", layer), target.array(f"b{i}", layer)
                tensors[f"{PREFIX}{name}.hada_w{i}_a"] = np.ascontiguousarray(np.reshape(b, (b.shape[0], -1)).T)
                tensors[f"{PREFIX}{name}.hada_w{i}_b"] = np.ascontiguousarray(_torch_in(a, target.layout))
    config = ranked_config(cfg, names, "LOHA")
    config["target_modules"] = target_modules_for(names, hf_modules(params, module_name), target_modules)
    return config, tensors


def _loha_group(group: Group, layout: Layout, rank: int) -> dict[str, np.ndarray]:
    """Our ``{a1, b1, a2, b2}`` at ``group.path`` from its HF modules (stacked when ``{layer}``)."""
    _, fan_in, fan_out = layout.split(group.shape)
    n_in, n_out = math.prod(fan_in), math.prod(fan_out)
    out: dict[str, list[np.ndarray]] = {"a1": [], "b1": [], "a2": [], "b2": []}
    for name, entry in group.modules:
        for i in (1, 2):
            w_a, w_b = np.asarray(entry[f"w{i}_a"]), np.asarray(entry[f"w{i}_b"])
            if w_a.shape != (n_out, rank) or w_b.shape != (rank, n_in):
                raise ValueError(
                    f"HF module {name!r} has hada_w{i}_a {w_a.shape} and hada_w{i}_b {w_b.shape}; {group.path!r} of "
                    f"shape {group.shape} needs {(n_out, rank)} and {(rank, n_in)} per layer (rank {rank}). Does the "
                    "adapter belong to this base model?"
                )
            out[f"a{i}"].append(_ours_in(w_b, layout, fan_in))
            out[f"b{i}"].append(np.reshape(w_a.T, (rank, *fan_out)))
    return {k: group.stack(v) for k, v in out.items()}


def from_hf(
    config: Mapping[str, Any],
    tensors: Mapping[str, Any],
    params: Any,
    module_name: Callable[[str], str],
    *,
    layouts: Mapping[str, Layout] | None,
    dtype: Any,
    base_weights: str,
) -> tuple[LohaConfig, dict[str, Any]]:
    """A ``LohaConfig`` and adapter tree from a PEFT ``LOHA`` adapter."""
    what = "LoHa factors (hada_w1_a/b, hada_w2_a/b)"
    fields, groups = lycoris_groups(config, tensors, params, module_name, "LOHA", what, base_weights)
    layouts = dict(layouts or {})
    arrays, used_layouts, ranks, alphas = {}, {}, {}, {}
    for group in groups:
        for name, entry in group.modules:
            missing = sorted({"w1_a", "w1_b", "w2_a", "w2_b"} - set(entry))
            if missing:
                hf_names = [f"hada_{m}" for m in missing]
                raise ValueError(f"HF module {name!r} lacks LoHa tensors {hf_names}; the file is incomplete.")
        tensor_ranks = [int(np.shape(e["w1_b"])[0]) if np.ndim(e["w1_b"]) == 2 else None for _, e in group.modules]
        ranks[group.path], alphas[group.path] = check_rank(fields, group, tensor_ranks)
        used_layouts[group.path] = group_layout(group, layouts, fields)
        arrays[group.path] = _loha_group(group, used_layouts[group.path], ranks[group.path])
    cfg = LohaConfig(**ranked_cfg_args(fields, ranks, alphas, arrays, dtype))
    return cfg, build_adapters(cfg, params, used_layouts, arrays)
