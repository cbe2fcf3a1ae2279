"""VeRA tensors and config: PEFT's ``VeraConfig`` (``save_projection=True``), both ways.

Tensors: ``<module>.vera_lambda_d`` ``[r]`` and ``.vera_lambda_b`` ``[out]`` (no ``.weight``; kernels with several
fan-out axes flattened), and the projections every module shares, ``base_model.vera_A`` ``[r, max_in]`` and
``base_model.vera_B`` ``[max_out, r]`` (``max_in``/``max_out``: the largest in/out features of the adapted modules),
which PEFT slices per module as ``vera_A[:, :in]`` and ``vera_B[:out, :]``. jaxpeft regenerates its projections
from ``projection_prng_key`` (``jaxpeft.methods.vera.shared_projections``) and never stores them: the export writes
them, and the import accepts only files whose projections are exactly those (files jaxpeft exported). Files made by
PEFT hold projections from torch's random generator, which jaxpeft cannot run; they are refused, naming the fix.
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
    listed,
    split_keys,
    target_modules_for,
)
from jaxpeft.hf._config import CONFIG_NAME, check_selection, read_vera
from jaxpeft.hf._files import WEIGHTS_NAME
from jaxpeft.methods.vera import VeraConfig, VeraWeights, shared_projections

__all__ = ["SHARED_KEYS", "from_hf", "to_hf"]

#: The keys of the projections all modules share (outside ``base_model.model.``).
SHARED_KEYS = ("base_model.vera_A", "base_model.vera_B")
_SUFFIXES = {".vera_lambda_d": "d", ".vera_lambda_b": "b"}


def _projections(seed: int, rank: int, max_in: int, max_out: int) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's ``vera_A`` ``[r, max_in]`` and ``vera_B`` ``[max_out, r]`` of jaxpeft's projections (float32)."""
    a, b = shared_projections(seed, rank, max_in, max_out, max_in)
    return np.ascontiguousarray(np.asarray(a).T), np.ascontiguousarray(np.asarray(b).T)


# ----------------------------------------------------------------------------------------------- export


def _check_node(target: Target, cfg: VeraConfig, max_in: int) -> None:
    node, path = target.node, target.path
    if (node.rank, node.seed, node.dropout) != (cfg.rank, cfg.projection_prng_key, cfg.dropout):
        raise ValueError(
            f"adapter {path!r} has rank {node.rank}, projection_prng_key {node.seed} and dropout {node.dropout}, but "
            f"`cfg` gives {cfg.rank}, {cfg.projection_prng_key} and {cfg.dropout}; pass the config the adapters were "
            "made with."
        )
    if node.bound_fan_in != max_in:
        raise ValueError(
            f"adapter {path!r} scales its projection A for a largest fan-in of {node.bound_fan_in}, but the largest "
            f"fan-in of the exported adapters is {max_in}. PEFT sizes its one shared vera_A (and A's bound) to the "
            "largest fan-in of the adapted modules, so the file would compute another model. Export the whole "
            "adapter tree jaxpeft.init made with this config."
        )


def to_hf(
    adapters: Any,
    cfg: VeraConfig,
    params: Any,
    module_name: Callable[[str], str],
    *,
    layouts: Mapping[str, Layout] | None,
    target_modules: str | Sequence[str] | None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The HF config and tensors of VeRA adapters, with the shared projections (``save_projection=True``)."""
    targets = export_targets(adapters, VeraWeights, cfg, params, module_name, layouts)
    max_in = max(math.prod(t.layout.split(t.shape)[1]) for t in targets)
    max_out = max(math.prod(t.layout.split(t.shape)[2]) for t in targets)
    tensors: dict[str, np.ndarray] = {}
    names = []
    for target in targets:
        _check_node(target, cfg, max_in)
        for name, layer in target.layers():
            names.append(name)
            d, b = target.array("lambda_d", layer), target.array("lambda_b", layer)
            tensors[f"{PREFIX}{name}.vera_lambda_d"] = np.ascontiguousarray(d)
            tensors[f"{PREFIX}{name}.vera_lambda_b"] = np.ascontiguousarray(np.reshape(b, (-1,)))
    tensors[SHARED_KEYS[0]], tensors[SHARED_KEYS[1]] = _projections(cfg.projection_prng_key, cfg.rank, max_in, max_out)
    config = {
        "auto_mapping": None,
        "bias": "none",
        "d_initial": cfg.d_initial,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "modules_to_save": None,
        "peft_type": "VERA",
        "projection_prng_key": cfg.projection_prng_key,
        "r": cfg.rank,
        "revision": None,
        "save_projection": True,
        "target_modules": target_modules_for(names, hf_modules(params, module_name), target_modules),
        "vera_dropout": cfg.dropout,
    }
    return config, tensors


# ----------------------------------------------------------------------------------------------- import


def _vectors(group: Group, layout: Layout, rank: int) -> dict[str, np.ndarray]:
    """Our ``{lambda_d, lambda_b}`` at ``group.path`` from its HF modules (stacked when ``{layer}``)."""
    fan_out = layout.split(group.shape)[2]
    ds, bs = [], []
    for name, entry in group.modules:
        if set(entry) != {"d", "b"}:
            raise ValueError(f"HF module {name!r} has only one of vera_lambda_d and vera_lambda_b; it is incomplete.")
        d, b = np.asarray(entry["d"]), np.asarray(entry["b"])
        if d.shape != (rank,) or b.shape != (math.prod(fan_out),):
            raise ValueError(
                f"HF module {name!r} has vera_lambda_d {d.shape} and vera_lambda_b {b.shape}; {group.path!r} of shape "
                f"{group.shape} with r={rank} needs {(rank,)} and {(math.prod(fan_out),)} per layer. Does the adapter "
                "belong to this base model?"
            )
        ds.append(d)
        bs.append(np.reshape(b, fan_out))
    return {"lambda_d": group.stack(ds), "lambda_b": group.stack(bs)}


def _check_projections(shared: Mapping[str, np.ndarray], seed: int, rank: int, max_in: int, max_out: int) -> None:
    """Refuse projections that are not jaxpeft's for ``seed`` at these sizes (e.g. PEFT's, from torch's RNG)."""
    ours = _projections(seed, rank, max_in, max_out)
    for key, want in zip(SHARED_KEYS, ours, strict=True):
        if shared[key].shape != want.shape:
            raise ValueError(
                f"the adapter file's {key!r} has shape {shared[key].shape}, but PEFT sizes it {want.shape} for r={rank}"
                f" and the adapted modules' largest in/out features ({max_in}, {max_out}); the file does not belong "
                "to this base model, or it adapts modules this import does not."
            )
    if not all(np.allclose(shared[k], w, rtol=1e-6, atol=1e-7) for k, w in zip(SHARED_KEYS, ours, strict=True)):
        raise ValueError(
            f"{WEIGHTS_NAME}'s VeRA projections {listed(SHARED_KEYS)} are not jaxpeft's for projection_prng_key="
            f"{seed}: the adapter was trained by HF PEFT (or another tool), whose projections are drawn from torch's "
            "random generator. jaxpeft regenerates its projections from the key with its own hash instead of storing "
            "them, so it cannot run these. jaxpeft imports the VeRA files it exports: train the adapter with "
            "jaxpeft.VeraConfig (or use a method whose weights are all in the file, such as LoRA)."
        )


def from_hf(
    config: Mapping[str, Any],
    tensors: Mapping[str, Any],
    params: Any,
    module_name: Callable[[str], str],
    *,
    layouts: Mapping[str, Layout] | None,
    dtype: Any,
    base_weights: str,
) -> tuple[VeraConfig, dict[str, Any]]:
    """A ``VeraConfig`` and adapter tree from a PEFT ``VERA`` adapter that jaxpeft exported."""
    fields = read_vera(config)
    checked = check_tensors(tensors)
    missing = [k for k in SHARED_KEYS if k not in checked]
    if missing:
        raise ValueError(
            f"the adapter file has no {listed(missing)}, although {CONFIG_NAME} has save_projection=true (PEFT "
            "refuses it too); the file is incomplete."
        )
    shared = {k: checked.pop(k) for k in SHARED_KEYS}
    index = hf_modules(params, module_name)
    modules = split_keys(checked, _SUFFIXES, "VeRA vectors (vera_lambda_d, vera_lambda_b) or projections")
    adapted = [n for n, entry in modules.items() if set(entry) != {"w"}]
    check_selection(fields.selection, adapted, list(index), fields.identity_init, "init_weights")
    groups = group_modules(modules, index, params, base_weights)
    if not groups:
        raise ValueError("the adapter file holds no VeRA vectors.")
    layouts = dict(layouts or {})
    arrays, used_layouts = {}, {}
    for group in groups:
        used_layouts[group.path] = import_layout(group, "linear", layouts.get(group.path))
        arrays[group.path] = _vectors(group, used_layouts[group.path], fields.r)
    sizes = [used_layouts[g.path].split(g.shape)[1:] for g in groups]
    max_in = max(math.prod(fan_in) for fan_in, _ in sizes)
    max_out = max(math.prod(fan_out) for _, fan_out in sizes)
    _check_projections(shared, fields.projection_prng_key, fields.r, max_in, max_out)
    cfg = VeraConfig(
        rank=fields.r,
        targets=exact_paths(arrays),
        projection_prng_key=fields.projection_prng_key,
        d_initial=fields.d_initial,
        dropout=fields.vera_dropout,
        dtype=adapter_dtype((v for f in arrays.values() for v in f.values()), dtype),
    )
    return cfg, build_adapters(cfg, params, used_layouts, arrays)
