"""LoKr tensors and config: PEFT's ``LoKrConfig``, both ways.

Tensors (no ``.weight``), in torch's ``(out, in)`` layout: ``<module>.lokr_w1`` ``[l, m]`` or its factors
``.lokr_w1_a`` ``[l, r]`` / ``.lokr_w1_b`` ``[r, m]``, and ``.lokr_w2`` ``[k, n]`` or ``.lokr_w2_a`` ``[k, r]`` /
``.lokr_w2_b`` ``[r, n]``, with ``ΔW = (alpha/r)·lokr_w1 ⊗ lokr_w2`` over the weight flattened to ``(out, in)`` =
``(l·k, m·n)``. Ours are the transposes: ``lokr_w1 = w1ᵀ``, ``lokr_w1_a = w1_bᵀ``, ``lokr_w1_b = w1_aᵀ`` (likewise
for ``w2``). Which of the factors exist follows from the rank, ``decompose_both`` and ``decompose_factor`` by PEFT's
rule (:meth:`jaxpeft.LokrConfig.shapes`), checked both ways.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxpeft._select import Layout
from jaxpeft.hf._common import PREFIX, Group, build_adapters, export_targets, hf_modules, target_modules_for
from jaxpeft.hf._config import CONFIG_NAME
from jaxpeft.hf.loha import check_against_cfg, check_rank, group_layout, lycoris_groups, ranked_cfg_args, ranked_config
from jaxpeft.hf.lora import _Entry
from jaxpeft.methods.lokr import LokrConfig, LokrWeights

__all__ = ["from_hf", "to_hf"]

#: Our factor field <-> the part of PEFT's tensor name after ``lokr_`` (each the other's transpose; A and B swap).
_SWAP = {"w1": "w1", "w1_a": "w1_b", "w1_b": "w1_a", "w2": "w2", "w2_a": "w2_b", "w2_b": "w2_a"}


def to_hf(
    adapters: Any,
    cfg: LokrConfig,
    params: Any,
    module_name: Callable[[str], str],
    *,
    layouts: Mapping[str, Layout] | None,
    target_modules: str | Sequence[str] | None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The HF config and tensors of LoKr adapters."""
    tensors: dict[str, np.ndarray] = {}
    names: dict[str, _Entry] = {}
    for target in export_targets(adapters, LokrWeights, cfg, params, module_name, layouts):
        node, path = target.node, target.path
        want = cfg.shapes(path, target.shape, target.layout)
        have = {f: tuple(getattr(node, f).shape) for f in _SWAP if getattr(node, f) is not None}
        if have != want:
            raise ValueError(
                f"adapter {path!r} has LoKr factors {have}, but `cfg` (rank {cfg.rank_for(path)}, decompose_both="
                f"{cfg.decompose_both}, decompose_factor={cfg.decompose_factor}) gives {want}; pass its config."
            )
        entry = check_against_cfg(target, cfg, cfg.rank_for(path), node.scale)
        for name, layer in target.layers():
            names[name] = entry
            for field in want:
                tensors[f"{PREFIX}{name}.lokr_{_SWAP[field]}"] = np.ascontiguousarray(target.array(field, layer).T)
    config = ranked_config(cfg, names, "LOKR")
    config |= {
        "decompose_both": cfg.decompose_both,
        "decompose_factor": cfg.decompose_factor,
        "rank_dropout_scale": False,
        "target_modules": target_modules_for(names, hf_modules(params, module_name), target_modules),
    }
    return config, tensors


def _lokr_group(group: Group, layout: Layout, cfg: LokrConfig) -> dict[str, np.ndarray]:
    """Our factor arrays at ``group.path`` from its HF modules (stacked when ``{layer}``), checked against ``cfg``."""
    want = {f: s[layout.stack :] for f, s in cfg.shapes(group.path, group.shape, layout).items()}
    out: dict[str, list[np.ndarray]] = {f: [] for f in want}
    for name, entry in group.modules:
        have = {f"lokr_{k}": np.shape(v) for k, v in entry.items()}
        expected = {f"lokr_{_SWAP[f]}": s[::-1] for f, s in want.items()}
        if have != expected:
            raise ValueError(
                f"HF module {name!r} has LoKr tensors {dict(sorted(have.items()))}; for {group.path!r} of shape "
                f"{group.shape} {CONFIG_NAME} (rank {cfg.rank_for(group.path)}, decompose_both={cfg.decompose_both},"
                f" decompose_factor={cfg.decompose_factor}) gives {dict(sorted(expected.items()))} (PEFT's rule). Do "
                "the config and tensors belong together, and to this base model?"
            )
        for k, v in entry.items():
            out[_SWAP[k]].append(np.asarray(v).T)
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
) -> tuple[LokrConfig, dict[str, Any]]:
    """A ``LokrConfig`` and adapter tree from a PEFT ``LOKR`` adapter."""
    what = "LoKr factors (lokr_w1, lokr_w1_a/b, lokr_w2, lokr_w2_a/b)"
    fields, groups = lycoris_groups(config, tensors, params, module_name, "LOKR", what, base_weights)
    layouts = dict(layouts or {})
    arrays, used_layouts, ranks, alphas = {}, {}, {}, {}
    for group in groups:
        ranks[group.path], alphas[group.path] = check_rank(fields, group, [None] * len(group.modules))
        layout = group_layout(group, layouts, fields)
        if layout.kind == "conv":
            raise ValueError(
                f"HF module {group.first!r} is a LoKr convolution ({group.path!r}); jaxpeft's LoKr adapts Dense, "
                "DenseGeneral and Einsum kernels only. Leave the convolution out of the adapter."
            )
        one = LokrConfig(
            rank=ranks[group.path], decompose_factor=fields.decompose_factor, decompose_both=fields.decompose_both
        )
        used_layouts[group.path] = layout
        arrays[group.path] = _lokr_group(group, layout, one)
    cfg = LokrConfig(
        **ranked_cfg_args(fields, ranks, alphas, arrays, dtype),
        decompose_factor=fields.decompose_factor,
        decompose_both=fields.decompose_both,
    )
    return cfg, build_adapters(cfg, params, used_layouts, arrays)
