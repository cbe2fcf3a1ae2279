"""LoRA and DoRA tensors and config: PEFT's ``LoraConfig`` (``use_dora`` for DoRA), both ways.

Tensors: ``<module>.lora_A.weight`` ``[r, in]`` and ``.lora_B.weight`` ``[out, r]`` (Conv: ``[r, in, *window]`` and
``[out, r, 1, ...]``), ``.lora_embedding_A`` ``[r, vocab]`` / ``.lora_embedding_B`` ``[dim, r]`` for embeddings; DoRA
adds ``.lora_magnitude_vector`` (no ``.weight``): ``[out]``, ``[1, out, 1, ...]`` for a Conv, ``[dim]`` for an
embedding. Kernels with several fan-in or fan-out axes are flattened to HF's 2-D shapes.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxpeft._select import Layout
from jaxpeft.hf._common import (
    LAYER,
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
    hf_pattern_key,
    import_layout,
    listed,
    number,
    split_keys,
    target_modules_for,
)
from jaxpeft.hf._config import LoraFields, check_selection, read_lora
from jaxpeft.methods.dora import DoraConfig, DoraWeights
from jaxpeft.methods.lora import LoraConfig, LoraWeights

__all__ = ["from_hf", "to_hf"]

_SUFFIXES = {
    ".lora_A.weight": "a",
    ".lora_B.weight": "b",
    ".lora_embedding_A": "ea",
    ".lora_embedding_B": "eb",
    ".lora_magnitude_vector": "m",
    ".lora_magnitude_vector.weight": "m",  # the in-memory name, which PEFT's loader also accepts
}
_TIED_DORA = (
    "HF PEFT cannot reproduce a DoRA embedding on a tied output head: jaxpeft applies the embedding's DoRA "
    "(a magnitude per feature) to `nn.Embed.attend`, while PEFT gives the tied head a DoRA of its own (a magnitude "
    "per vocabulary row)"
)

# ----------------------------------------------------------------------------------------------- export


@dataclasses.dataclass(frozen=True)
class _Entry:
    """What the config needs to know about one exported adapter."""

    target: Target
    rank: int
    alpha: float


def _check_against_cfg(target: Target, cfg: LoraConfig) -> _Entry:
    path, node = target.path, target.node
    if node.rank != cfg.rank_for(path):
        raise ValueError(
            f"adapter {path!r} has rank {node.rank} but `cfg` gives rank {cfg.rank_for(path)}; pass its config."
        )
    if not math.isclose(node.scale, cfg.scale_for(path), rel_tol=1e-6):
        raise ValueError(
            f"adapter {path!r} has scale {node.scale} but `cfg` gives {cfg.scale_for(path)}; pass the config the "
            "adapters were made with."
        )
    if node.dropout != cfg.dropout:
        raise ValueError(f"adapter {path!r} has dropout {node.dropout} but `cfg.dropout`={cfg.dropout}.")
    if target.kind == "embed" and (target.layout.fan_in != 1 or target.layout.fan_out != 1):
        raise ValueError(f"embedding adapter {path!r} must be 2-D per layer, got A {tuple(node.a.shape)}.")
    return _Entry(target, node.rank, cfg.alpha_for(path))


def _factor_tensors(target: Target, layer: int | None) -> dict[str, np.ndarray]:
    """HF's tensors (key suffix -> array) of one layer of a LoRA or DoRA adapter."""
    a, b = target.array("a", layer), target.array("b", layer)
    r = a.shape[-1]
    if target.kind == "embed":
        out = {".lora_embedding_A": a.T, ".lora_embedding_B": b.T}
    elif target.kind == "conv":  # Flax A (*window, in, r) -> torch (r, in, *window); B (r, out) -> (out, r, 1, ...)
        n = a.ndim
        out = {
            ".lora_A.weight": np.transpose(a, (n - 1, n - 2, *range(n - 2))),
            ".lora_B.weight": np.reshape(b.T, (*b.T.shape, *([1] * (n - 2)))),
        }
    else:
        out = {".lora_A.weight": np.reshape(a, (-1, r)).T, ".lora_B.weight": np.reshape(b, (r, -1)).T}
    if isinstance(target.node, DoraWeights):
        m = np.reshape(target.array("magnitude", layer), (-1,))
        out[".lora_magnitude_vector"] = conv_vector(m, target.layout) if target.kind == "conv" else m
    return out


def _default_value(values: list[Any], preferred: Any) -> Any:
    counts = collections.Counter(values)
    if preferred in counts:
        return preferred
    return max(sorted(counts), key=lambda v: counts[v])


def _patterns(names: Mapping[str, _Entry], attr: str, default: Any) -> dict[str, int | float]:
    """HF pattern keys giving every exported module its rank/alpha, verified with HF's matching rule."""
    differing = {n: e for n, e in names.items() if getattr(e, attr) != default}
    if not differing:
        return {}

    def works(patterns: dict[str, Any]) -> bool:
        for n, e in names.items():
            key = hf_pattern_key(list(patterns), n)
            if (patterns[key] if key is not None else default) != getattr(e, attr):
                return False
        return True

    # Compact form first: one key per module template, with `{layer}` as a digit wildcard.
    compact = {e.target.template.replace(LAYER, r"\d+"): number(getattr(e, attr)) for e in differing.values()}
    if works(compact):
        return compact
    exact = {re.escape(n): number(getattr(e, attr)) for n, e in sorted(differing.items())}
    if works(exact):
        return exact
    raise ValueError(  # pragma: no cover - escaped full names always match exactly
        f"could not express per-module `{attr}` values as HF patterns for {listed(differing)}."
    )


def _hf_config(cfg: LoraConfig, names: Mapping[str, _Entry], targets: str | list[str]) -> dict[str, Any]:
    rank = _default_value([e.rank for e in names.values()], cfg.rank)
    alpha = _default_value([e.alpha for e in names.values()], cfg.alpha)
    return {
        "alpha_pattern": _patterns(names, "alpha", alpha),
        "auto_mapping": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": number(alpha),
        "lora_dropout": cfg.dropout,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": _patterns(names, "rank", rank),
        "revision": None,
        "target_modules": targets,
        "use_dora": isinstance(cfg, DoraConfig),
        "use_rslora": cfg.use_rslora,
    }


def _tie(
    config: dict[str, Any],
    tensors: dict[str, np.ndarray],
    embeds: Sequence[_Entry],
    dora: bool,
    ensure_weight_tying: bool | None,
    tied_head: str | None,
) -> None:
    """Write ``ensure_weight_tying`` (and the tied head's copy of the embedding adapter) into the files."""
    if dora and embeds and (tied_head is not None or ensure_weight_tying is not False):
        raise ValueError(
            f"adapter {embeds[0].target.path!r} is a DoRA embedding. {_TIED_DORA}. If this model's output head is "
            "not tied to the embedding, pass `ensure_weight_tying=False`; otherwise leave the embedding out of "
            "`targets`."
        )
    if tied_head is not None:
        if len(embeds) != 1 or embeds[0].target.n_layers or ensure_weight_tying is False:
            raise ValueError(
                f"`tied_head`={tied_head!r} needs exactly one adapted, unstacked embedding and "
                f"ensure_weight_tying not False; got {len(embeds)} embedding adapters."
            )
        name = embeds[0].target.template
        tensors[f"{PREFIX}{tied_head}.lora_A.weight"] = tensors[f"{PREFIX}{name}.lora_embedding_B"].T.copy()
        tensors[f"{PREFIX}{tied_head}.lora_B.weight"] = tensors[f"{PREFIX}{name}.lora_embedding_A"].T.copy()
    if ensure_weight_tying is None and embeds:
        ensure_weight_tying = True
    if ensure_weight_tying is not None:
        config["ensure_weight_tying"] = bool(ensure_weight_tying)


def to_hf(
    adapters: Any,
    cfg: LoraConfig,
    params: Any,
    module_name: Callable[[str], str],
    *,
    layouts: Mapping[str, Layout] | None,
    target_modules: str | Sequence[str] | None,
    ensure_weight_tying: bool | None,
    tied_head: str | None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The HF config and tensors of LoRA (``LoraConfig``) or DoRA (``DoraConfig``) adapters."""
    dora = isinstance(cfg, DoraConfig)
    targets = export_targets(adapters, DoraWeights if dora else LoraWeights, cfg, params, module_name, layouts)
    entries = [_check_against_cfg(t, cfg) for t in targets]
    tensors: dict[str, np.ndarray] = {}
    names: dict[str, _Entry] = {}
    for entry in entries:
        for name, layer in entry.target.layers():
            names[name] = entry
            for suffix, value in _factor_tensors(entry.target, layer).items():
                tensors[f"{PREFIX}{name}{suffix}"] = np.ascontiguousarray(value)
    hf_names = target_modules_for(names, hf_modules(params, module_name), target_modules)
    config = _hf_config(cfg, names, hf_names)
    embeds = [e for e in entries if e.target.kind == "embed"]
    _tie(config, tensors, embeds, dora, ensure_weight_tying, tied_head)
    return config, tensors


# ----------------------------------------------------------------------------------------------- import


def _check_parts(name: str, entry: Mapping[str, Any], dora: bool) -> str:
    """The HF layer type of a module's tensors (``linear``, ``conv``, ``embed``), after checking they are complete."""
    embed = "ea" in entry or "eb" in entry
    if embed and ("a" in entry or "b" in entry):
        raise ValueError(f"HF module {name!r} holds both Linear and Embedding LoRA factors; the file is corrupt.")
    a, b = ("ea", "eb") if embed else ("a", "b")
    if a not in entry or b not in entry:
        raise ValueError(f"HF module {name!r} has only one of its two LoRA factors; the file is incomplete.")
    if "m" in entry and not dora:
        raise ValueError(
            f"HF module {name!r} holds a DoRA `lora_magnitude_vector` but adapter_config.json has no use_dora=true; "
            "the files do not belong together."
        )
    if dora and "m" not in entry:
        raise ValueError(
            f"HF module {name!r} has no `lora_magnitude_vector` although adapter_config.json sets use_dora=true; "
            "the file is incomplete."
        )
    ndim_a, ndim_b = np.ndim(entry[a]), np.ndim(entry[b])
    kind = "embed" if embed else "conv" if ndim_a > 2 else "linear"
    if ndim_a < 2 or ndim_b != ndim_a or (embed and ndim_a != 2):
        want = {
            "embed": "[r, vocab] and [dim, r]",
            "linear": "[r, in] and [out, r]",
            "conv": "[r, in, *window] and [out, r, 1, ...]",
        }
        raise ValueError(
            f"HF module {name!r} has LoRA factors of shapes {np.shape(entry[a])} and {np.shape(entry[b])}; a "
            f"{kind} LoRA has {want[kind]}. The file is corrupt or not a LoRA adapter."
        )
    return kind


def _drop_tied_copies(
    modules: dict[str, dict[str, Any]], index: Mapping[str, Any], dora: bool
) -> dict[str, dict[str, Any]]:
    """Without the HF modules that only mirror an embedding adapter onto a tied output head.

    With ``ensure_weight_tying`` PEFT saves the tied head's LoRA as a Linear adapter whose factors are the
    embedding's, transposed. A model without such a parameter (its head *is* the embedding, ``nn.Embed.attend``)
    gets the same effect from the embedding adapter in ``jaxpeft.linen``, so exact copies are dropped. For DoRA the
    two differ, so such a file is refused.
    """
    embeds = [e for e in modules.values() if "ea" in e and "eb" in e]

    def is_copy(entry: Mapping[str, Any]) -> bool:
        if "a" not in entry or "b" not in entry:
            return False
        return any(
            np.shape(entry["a"]) == np.shape(e["eb"])[::-1]
            and np.shape(entry["b"]) == np.shape(e["ea"])[::-1]
            and np.array_equal(entry["a"], np.transpose(e["eb"]))
            and np.array_equal(entry["b"], np.transpose(e["ea"]))
            for e in embeds
        )

    copies = [n for n, e in modules.items() if n not in index and is_copy(e)]
    if copies and dora:
        raise ValueError(f"HF module {copies[0]!r} is a tied output head's copy of a DoRA embedding; {_TIED_DORA}.")
    return {n: e for n, e in modules.items() if n not in copies}


def _rank_alpha(fields: LoraFields, name: str, entry: Mapping[str, Any]) -> tuple[int, float]:
    """The module's rank (checked against PEFT's ``rank_pattern`` rule) and alpha."""
    rank = int(np.shape(entry["ea"] if "ea" in entry else entry["a"])[0])
    want, alpha = fields.rank_alpha(name)
    if rank != want:
        raise ValueError(
            f"HF module {name!r} has rank {rank} in the tensors but {want} in adapter_config.json; "
            "the files do not belong together."
        )
    return rank, alpha


def _to_ours(name: str, entry: Mapping[str, Any], kind: str) -> dict[str, np.ndarray]:
    """One module's tensors in our per-layer orientation (not yet reshaped to the kernel's axes)."""
    if kind == "embed":
        return {"a": np.asarray(entry["ea"]).T, "b": np.asarray(entry["eb"]).T}
    a_hf, b_hf = np.asarray(entry["a"]), np.asarray(entry["b"])
    if kind == "linear":
        return {"a": a_hf.T, "b": b_hf.T}
    if b_hf.ndim != a_hf.ndim or any(d != 1 for d in b_hf.shape[2:]):
        raise ValueError(f"HF module {name!r} has a Conv LoRA B of shape {b_hf.shape}; expected (out, r, 1, ...).")
    return {"a": np.transpose(a_hf, (*range(2, a_hf.ndim), 1, 0)), "b": np.reshape(b_hf, b_hf.shape[:2]).T}


def _magnitude(name: str, m: Any, kind: str, window: int, out: tuple[int, ...]) -> np.ndarray:
    """A DoRA magnitude ``[out]`` (Conv: ``[1, out, 1, ...]``) as our ``(*fan_out)``."""
    m = np.asarray(m)
    want = (1, math.prod(out), *([1] * window)) if kind == "conv" else (math.prod(out),)
    if m.shape != want:
        raise ValueError(
            f"HF module {name!r} has a lora_magnitude_vector of shape {m.shape}; the parameter it adapts needs "
            f"{want}. Does the adapter belong to this base model?"
        )
    return np.reshape(m, out)


def _import_group(group: Group, kind: str, layout: Layout, rank: int) -> dict[str, np.ndarray]:
    """Our ``{a, b[, magnitude]}`` arrays at ``group.path`` from its HF modules (stacked when ``{layer}``)."""
    _, fan_in, fan_out = layout.split(group.shape)
    a_shape, b_shape = (*fan_in, rank), (rank, *fan_out)
    per_layer: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    for name, entry in group.modules:
        ours = _to_ours(name, entry, kind)
        a, b = ours["a"], ours["b"]
        fits = a.shape[-1] == rank and b.shape[0] == rank
        if not fits or a.size != math.prod(a_shape) or b.size != math.prod(b_shape):
            a_hf, b_hf = (entry["ea"], entry["eb"]) if kind == "embed" else (entry["a"], entry["b"])
            raise ValueError(
                f"HF module {name!r} has LoRA factors A {np.shape(a_hf)}, B {np.shape(b_hf)} that do not fit "
                f"{group.path!r} of shape {group.shape} (A {a_shape}, B {b_shape} per layer); does the adapter "
                "belong to this base model?"
            )
        per_layer["a"].append(np.reshape(a, a_shape))
        per_layer["b"].append(np.reshape(b, b_shape))
        if "m" in entry:
            per_layer["magnitude"].append(_magnitude(name, entry["m"], kind, layout.fan_in - 1, fan_out))
    return {k: group.stack(v) for k, v in per_layer.items()}


def _kind_rank_alpha(fields: LoraFields, group: Group) -> tuple[str, int, float]:
    """The HF layer type, rank and alpha shared by all HF modules of ``group`` (checked)."""
    kinds = {_check_parts(name, entry, fields.use_dora) for name, entry in group.modules}
    if len(kinds) > 1:
        raise ValueError(
            f"the HF modules stacked into {group.path!r} (e.g. {group.first!r}) mix LoRA kinds {sorted(kinds)}."
        )
    pairs = {_rank_alpha(fields, name, entry) for name, entry in group.modules}
    if len(pairs) > 1:
        raise ValueError(
            f"the HF modules stacked into {group.path!r} (e.g. {group.first!r}) have different ranks or alphas "
            f"{sorted(pairs)}; a stacked adapter needs one rank and one alpha."
        )
    (rank, alpha), kind = pairs.pop(), kinds.pop()
    return kind, rank, alpha


def from_hf(
    config: Mapping[str, Any],
    tensors: Mapping[str, Any],
    params: Any,
    module_name: Callable[[str], str],
    *,
    layouts: Mapping[str, Layout] | None,
    dtype: Any,
    base_weights: str,
) -> tuple[LoraConfig, dict[str, Any]]:
    """A ``LoraConfig`` (``DoraConfig`` when ``use_dora``) and adapter tree from a PEFT ``LORA`` adapter."""
    fields = read_lora(config)
    dora = fields.use_dora
    index = hf_modules(params, module_name)
    modules = split_keys(
        check_tensors(tensors), _SUFFIXES, "LoRA or DoRA tensors (lora_A/lora_B, lora_embedding_A/B, magnitudes)"
    )
    if fields.ensure_weight_tying:
        modules = _drop_tied_copies(modules, index, dora)
    adapted = [n for n, entry in modules.items() if set(entry) != {"w"}]
    check_selection(fields.selection, adapted, list(index), fields.identity_init, "init_lora_weights")
    groups = group_modules(modules, index, params, base_weights)
    if not groups:
        raise ValueError("the adapter file holds no LoRA factors.")
    layouts = dict(layouts or {})
    arrays, used_layouts, ranks, alphas = {}, {}, {}, {}
    for group in groups:
        kind, ranks[group.path], alphas[group.path] = _kind_rank_alpha(fields, group)
        used_layouts[group.path] = import_layout(group, kind, layouts.get(group.path))
        arrays[group.path] = _import_group(group, kind, used_layouts[group.path], ranks[group.path])
    r, alpha = fields.r, fields.lora_alpha
    cfg = (DoraConfig if dora else LoraConfig)(
        rank=r,
        alpha=alpha,
        targets=exact_paths(arrays),
        rank_pattern={exact_paths([p]): ranks[p] for p in sorted(arrays) if ranks[p] != r},
        alpha_pattern={exact_paths([p]): alphas[p] for p in sorted(arrays) if alphas[p] != alpha},
        dropout=fields.lora_dropout,
        use_rslora=fields.use_rslora,
        dtype=adapter_dtype((v for fields_ in arrays.values() for v in fields_.values()), dtype),
    )
    return cfg, build_adapters(cfg, params, used_layouts, arrays)
