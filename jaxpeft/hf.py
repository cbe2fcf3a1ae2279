"""Hugging Face PEFT interop: LoRA adapters as ``adapter_config.json`` + ``adapter_model.safetensors``, both ways.

The files are the ones ``PeftModel.save_pretrained`` writes and ``PeftModel.from_pretrained`` reads: tensors named
``base_model.model.<module>.lora_A.weight`` (``[r, in]``) and ``.lora_B.weight`` (``[out, r]``),
``.lora_embedding_A`` (``[r, vocab]``) / ``.lora_embedding_B`` (``[dim, r]``) for embeddings, and Conv LoRA as two
convolutions (``[r, in, *window]``, ``[out, r, 1, ...]``); safetensors metadata ``{"format": "pt"}``.

Which HF module a parameter belongs to is decided by a ``module_name`` function from our module path (the
parameter path without its leaf, e.g. ``"model/layers/self_attn/q_proj"``) to the HF module name. A template
with ``{layer}`` marks a leading stack axis (``nn.scan``): such an adapter is written as one HF module per layer
and re-stacked on import. ``module_name_map`` builds such a function from a few rules; any callable (or a dict)
works. Flax kernels are ``[in, out]``, PyTorch weights ``[out, in]``: factors are transposed both ways, and kernels
with several fan-in or fan-out axes (``DenseGeneral``, ``Einsum``) are flattened to HF's 2-D shapes.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft._paths import leaves_with_paths, set_path
from jaxpeft._select import WEIGHT_NAMES, Layout
from jaxpeft.methods.lora import LoraConfig, LoraWeights, plan

__all__ = [
    "CONFIG_NAME",
    "LAYER",
    "WEIGHTS_NAME",
    "export_adapters",
    "from_state_dict",
    "import_adapters",
    "module_name_map",
    "to_state_dict",
]

#: File names that ``PeftModel.save_pretrained`` writes.
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: Placeholder for the layer index of a scan-stacked parameter in a module-name template.
LAYER = "{layer}"
_PREFIX = "base_model.model."
_SUFFIXES = {
    ".lora_A.weight": ("linear", "a"),
    ".lora_B.weight": ("linear", "b"),
    ".lora_embedding_A": ("embed", "a"),
    ".lora_embedding_B": ("embed", "b"),
    ".base_layer.weight": ("base", "w"),
}
_KNOWN_CONFIG_FIELDS = {
    "method",
    "rank",
    "alpha",
    "targets",
    "exclude",
    "rank_pattern",
    "alpha_pattern",
    "dropout",
    "use_rslora",
    "init",
    "dtype",
}
# HF LoraConfig fields that change what the adapter computes or stores beyond plain LoRA factors; an import refuses
# a file that sets any of them (value -> why), instead of silently dropping the feature.
_UNSUPPORTED_HF = {
    "use_dora": "DoRA (weight-decomposed LoRA) has no jaxpeft equivalent yet",
    "lora_bias": "LoRA bias terms (`lora_bias=True`) are not supported",
    "modules_to_save": "fully trained modules (`modules_to_save`) are not LoRA factors and cannot be imported",
    "trainable_token_indices": "trainable tokens (`trainable_token_indices`) are not supported",
    "target_parameters": "LoRA on bare parameters (`target_parameters`) is not supported",
    "layer_replication": "layer replication (`layer_replication`) is not supported",
    "use_qalora": "QA-LoRA (`use_qalora`) is not supported",
    "alora_invocation_tokens": "activated LoRA (`alora_invocation_tokens`) is not supported",
    "use_bdlora": "block-diagonal LoRA (`use_bdlora`) is not supported",
}
# HF initialisations that also rewrite the base weights (a plain LoRA only after PEFT's conversion).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
_MAX_LISTED = 6


def _listed(items: Iterable[str]) -> str:
    items = sorted(items)
    shown = ", ".join(repr(i) for i in items[:_MAX_LISTED])
    return shown + (f" (and {len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


# ----------------------------------------------------------------------------------------------- module names


def module_name_map(
    rules: Sequence[tuple[str, str]] | Mapping[str, str] = (),
    *,
    stacked: str | Sequence[str] = (),
    prefix: str = "",
    split_indices: bool = True,
) -> Callable[[str], str]:
    """A rule-based ``module_name`` function: our module path -> HF module-name template.

    The steps, in order: each ``(regex, replacement)`` of ``rules`` is applied with ``re.sub`` to the slash
    path; a path equal to, or under, an entry of ``stacked`` gets ``{layer}`` inserted after that entry (its
    parameters carry a leading ``nn.scan`` axis); with ``split_indices`` a component ``name_N`` becomes
    ``name.N`` (Flax's ``layer_3`` -> HF's ``layer.3``); ``/`` becomes ``.``; ``prefix`` is prepended.

    ``module_name_map(stacked="model/layers")`` maps ``"model/layers/self_attn/q_proj"`` to
    ``"model.layers.{layer}.self_attn.q_proj"``; ``module_name_map()`` maps
    ``"encoder/layer_3/attention/self/query"`` to ``"encoder.layer.3.attention.self.query"``.

    Args:
      rules: ``(regex, replacement)`` pairs (or a dict), applied first, in order.
      stacked: module path(s) (after ``rules``) whose parameters are stacked along a leading layer axis.
      prefix: prepended to every name, e.g. ``"bert."``.
      split_indices: turn ``name_N`` components into ``name.N``.

    Returns:
      ``fn(module_path) -> str``.
    """
    pairs = tuple(rules.items()) if isinstance(rules, Mapping) else tuple(tuple(r) for r in rules)
    compiled = []
    for pair in pairs:
        if len(pair) != 2 or not all(isinstance(p, str) for p in pair):
            raise ValueError(f"`rules` entries must be (regex, replacement) string pairs, got {pair!r}.")
        try:
            compiled.append((re.compile(pair[0]), pair[1]))
        except re.error as err:
            raise ValueError(f"`rules` entry {pair[0]!r} is not a valid regular expression: {err}.") from err
    stacks = (stacked,) if isinstance(stacked, str) else tuple(stacked)
    stacks = tuple(s.strip("/") for s in stacks)

    def module_name(path: str) -> str:
        path = path.strip("/")
        for regex, repl in compiled:
            path = regex.sub(repl, path)
        for stack in stacks:
            if path == stack or path.startswith(stack + "/"):
                path = stack + "/" + LAYER + path[len(stack) :]
                break
        parts = path.split("/")
        if split_indices:
            parts = [re.sub(r"^(.+?)_(\d+)$", r"\1/\2", p) for p in parts]
        return prefix + ".".join("/".join(parts).split("/"))

    return module_name


def _as_fn(module_name: Callable[[str], str] | Mapping[str, str]) -> Callable[[str], str]:
    if isinstance(module_name, Mapping):
        table = dict(module_name)

        def lookup(path: str) -> str:
            if path not in table:
                raise KeyError(f"`module_name` has no entry for module {path!r}")
            return table[path]

        return lookup
    if not callable(module_name):
        raise TypeError(
            f"`module_name` must be a function from module path to HF module name (or a dict), got "
            f"{type(module_name).__name__}; try jaxpeft.hf.module_name_map(stacked='model/layers')."
        )
    return module_name


def _module_of(path: str) -> tuple[str, str]:
    module, _, leaf = path.rpartition("/")
    return module, leaf


def _template(module_name: Callable[[str], str], path: str) -> str:
    module, _ = _module_of(path)
    name = module_name(module)
    if not isinstance(name, str) or not name:
        raise ValueError(f"`module_name`({module!r}) returned {name!r}; expected a dotted HF module name.")
    if name.count(LAYER) > 1:
        raise ValueError(f"`module_name`({module!r}) returned {name!r}; use at most one {LAYER} placeholder.")
    return name


def _hf_modules(params: Any, module_name: Callable[[str], str]) -> dict[str, tuple[str, int | None]]:
    """``{hf module name: (our weight path, layer index or None)}`` for every weight leaf the mapping accepts."""
    out: dict[str, tuple[str, int | None]] = {}
    for path, leaf in leaves_with_paths(params):
        shape = tuple(getattr(leaf, "shape", ()))
        if _module_of(path)[1] not in WEIGHT_NAMES or len(shape) < 2:
            continue
        try:
            name = _template(module_name, path)
        except (ValueError, KeyError):
            continue
        layers: list[int | None] = list(range(shape[0])) if LAYER in name else [None]
        entries = [(name if i is None else name.replace(LAYER, str(i)), i) for i in layers]
        for hf_name, layer in entries:
            if hf_name in out and out[hf_name][0] != path:
                raise ValueError(
                    f"`module_name` maps both {out[hf_name][0]!r} and {path!r} to HF module {hf_name!r}; each "
                    "adapted weight needs its own HF module name."
                )
            out[hf_name] = (path, layer)
    return out


# ----------------------------------------------------------------------------------------------- HF matching


def _hf_pattern_key(patterns: Sequence[str], name: str) -> str | None:
    """The first ``rank_pattern``/``alpha_pattern`` key that HF PEFT would apply to module ``name``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def _hf_targets(target_modules: str | Sequence[str], name: str) -> bool:
    """Whether HF PEFT's ``target_modules`` selects module ``name`` (list: suffix match; str: full regex)."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


# ----------------------------------------------------------------------------------------------- export


@dataclasses.dataclass(frozen=True)
class _Entry:
    path: str
    template: str
    kind: str  # "linear", "embed" or "conv"
    rank: int
    alpha: float
    n_layers: int | None


def _check_exportable(cfg: LoraConfig, adapters: Any) -> list[tuple[str, LoraWeights]]:
    if not isinstance(cfg, LoraConfig):
        raise TypeError(
            f"`cfg` is a {type(cfg).__name__}; Hugging Face export supports LoRA (jaxpeft.LoraConfig) only."
        )
    defaults = {f.name: f.default for f in dataclasses.fields(LoraConfig)}
    for field in dataclasses.fields(cfg):
        if field.name in _KNOWN_CONFIG_FIELDS:
            continue
        value = getattr(cfg, field.name)
        if value != defaults.get(field.name, dataclasses.MISSING):
            raise ValueError(
                f"`cfg.{field.name}`={value!r} has no Hugging Face PEFT equivalent that jaxpeft.hf writes; "
                "refusing to export an adapter that HF would run differently. Export a plain LoRA config."
            )
    items: list[tuple[str, LoraWeights]] = []
    for path, leaf in leaves_with_paths(adapters, is_leaf=lambda x: isinstance(x, LoraWeights)):
        if type(leaf) is not LoraWeights:
            raise ValueError(
                f"adapter {path!r} is a {type(leaf).__name__}; jaxpeft.hf exports plain LoRA (LoraWeights) only "
                "(DoRA and other variants are refused rather than exported wrongly)."
            )
        items.append((path, leaf))
    if not items:
        raise ValueError("`adapters` holds no LoraWeights; pass the tree returned by jaxpeft.init.")
    return items


def _export_kind(path: str, lora: LoraWeights, shape: tuple[int, ...], layout: Layout | None) -> tuple[str, int]:
    n_stack = lora.n_stack(len(shape))
    fan_in = lora.a.ndim - 1 - n_stack
    fan_out = lora.b.ndim - 1 - n_stack
    if n_stack < 0 or fan_in < 1 or fan_out < 1 or shape != (*lora.a.shape[:-1], *lora.b.shape[1 + n_stack :]):
        raise ValueError(
            f"adapter {path!r} (A {tuple(lora.a.shape)}, B {tuple(lora.b.shape)}) does not fit the parameter of "
            f"shape {shape}; were the adapters made for these params?"
        )
    if layout is not None and (layout.stack, layout.fan_in, layout.fan_out) != (n_stack, fan_in, fan_out):
        raise ValueError(f"`layouts`[{path!r}]={layout} disagrees with the adapter shapes; re-infer the layouts.")
    if layout is not None and layout.kind == "conv":
        return "conv", n_stack
    if _module_of(path)[1] == "embedding" or (layout is not None and layout.kind == "embed"):
        if fan_in != 1 or fan_out != 1:
            raise ValueError(f"embedding adapter {path!r} must be 2-D per layer, got A {tuple(lora.a.shape)}.")
        return "embed", n_stack
    if layout is None and fan_in > 1 and fan_out == 1:
        raise ValueError(
            f"adapter {path!r} has {fan_in} fan-in axes and one fan-out axis: it may belong to a convolution "
            "(HF Conv LoRA) or to a DenseGeneral (HF Linear); pass "
            "`layouts=jaxpeft.linen.infer_layouts(model, *sample_args)` to tell them apart."
        )
    return "linear", n_stack


def _linear_factors(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r = a.shape[-1]
    return np.reshape(a, (-1, r)).T, np.reshape(b, (r, -1)).T


def _conv_factors(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Flax conv A (*window, in, r) -> torch (r, in, *window); B (r, out) -> torch (out, r, 1, ...).
    n = a.ndim
    a_hf = np.transpose(a, (n - 1, n - 2, *range(n - 2)))
    b_hf = np.reshape(b.T, (*b.T.shape, *([1] * (n - 2))))
    return a_hf, b_hf


def to_state_dict(
    adapters: Any,
    cfg: LoraConfig,
    params: Any,
    module_name: Callable[[str], str] | Mapping[str, str],
    *,
    layouts: Mapping[str, Layout] | None = None,
    task_type: str | None = None,
    base_model_name_or_path: str | None = None,
    target_modules: str | Sequence[str] | None = None,
    ensure_weight_tying: bool | None = None,
    tied_head: str | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The HF PEFT ``adapter_config.json`` contents and ``adapter_model.safetensors`` tensors of ``adapters``.

    ``PeftModel.from_pretrained`` on the result computes the same outputs as ``jaxpeft`` (the interop tests
    compare logits to 1e-4). Per-path ranks and alphas become HF ``rank_pattern``/``alpha_pattern``; every pattern
    is checked against HF's matching rule before it is written.

    Args:
      adapters: the adapter tree (``jaxpeft.init``, trained or restored).
      cfg: the ``LoraConfig`` the adapters were made with (gives alpha, rsLoRA and dropout).
      params: the base params (arrays or ``jax.ShapeDtypeStruct``), read for shapes and module names.
      module_name: our module path -> HF module name (``{layer}`` for a scan axis); a callable or a dict.
      layouts: kernel layouts (``jaxpeft.linen.infer_layouts``); needed to tell a convolution from a
        ``DenseGeneral`` with several fan-in axes, optional otherwise.
      task_type: HF ``task_type`` (e.g. ``"CAUSAL_LM"``, ``"SEQ_CLS"``, ``"FEATURE_EXTRACTION"``).
      base_model_name_or_path: recorded as HF does (e.g. the hub id of the base model).
      target_modules: overrides the written ``target_modules``; it must select every exported module. By default
        the short module names (``["q_proj", "v_proj"]``) when they select exactly the adapted modules of
        ``params``, else the full module names.
      ensure_weight_tying: HF's flag that makes an embedding adapter also act on a tied output head, as
        ``jaxpeft.linen`` does (through ``nn.Embed.attend``). By default it is written as True when an embedding
        is adapted (PEFT then only warns if the model turns out untied) and left out otherwise.
      tied_head: the HF module name of an output head tied to the adapted embedding (e.g. ``"lm_head"``): its
        copy of the embedding adapter is written too, as PEFT does with ``ensure_weight_tying`` (without it, PEFT
        still ties the head on load but warns about the missing keys).

    Returns:
      ``(config_dict, {key: numpy array})``.

    Raises:
      ValueError: the adapters do not fit ``params`` or ``cfg``; a feature HF would run differently (refused,
        never exported wrongly); a stack of more than one axis; two parameters map to one HF module.
    """
    fn = _as_fn(module_name)
    layouts = dict(layouts or {})
    items = _check_exportable(cfg, adapters)
    shapes = {p: tuple(leaf.shape) for p, leaf in leaves_with_paths(params)}
    entries: list[_Entry] = []
    tensors: dict[str, np.ndarray] = {}
    owner: dict[str, str] = {}
    for path, lora in items:
        if path not in shapes:
            raise ValueError(f"adapter {path!r} has no parameter in `params`; were the adapters made for this model?")
        shape = shapes[path]
        kind, n_stack = _export_kind(path, lora, shape, layouts.get(path))
        rank, want_rank = lora.rank, cfg.rank_for(path)
        if rank != want_rank:
            raise ValueError(f"adapter {path!r} has rank {rank} but `cfg` gives rank {want_rank}; pass its config.")
        if not math.isclose(lora.scale, cfg.scale_for(path), rel_tol=1e-6):
            raise ValueError(
                f"adapter {path!r} has scale {lora.scale} but `cfg` gives {cfg.scale_for(path)}; pass the config "
                "the adapters were made with."
            )
        if lora.dropout != cfg.dropout:
            raise ValueError(f"adapter {path!r} has dropout {lora.dropout} but `cfg.dropout`={cfg.dropout}.")
        template = _template(fn, path)
        if n_stack > 1:
            raise ValueError(
                f"adapter {path!r} has {n_stack} stack axes; HF modules are indexed by one layer axis. "
                "Unstack the extra axes first."
            )
        if (LAYER in template) != (n_stack == 1):
            raise ValueError(
                f"`module_name` maps {path!r} (shape {shape}, {n_stack} stack axes) to {template!r}: a "
                f"scan-stacked parameter needs exactly one {LAYER} placeholder and an unstacked one none."
            )
        a = np.asarray(jax.device_get(lora.a))
        b = np.asarray(jax.device_get(lora.b))
        layers = range(a.shape[0]) if n_stack else [None]
        for i in layers:
            ai, bi = (a, b) if i is None else (a[i], b[i])
            name = template if i is None else template.replace(LAYER, str(i))
            if owner.setdefault(name, path) != path:
                raise ValueError(
                    f"`module_name` maps both {owner[name]!r} and {path!r} to HF module {name!r}; each adapted "
                    "weight needs its own HF module name."
                )
            if kind == "embed":
                tensors[f"{_PREFIX}{name}.lora_embedding_A"] = np.ascontiguousarray(ai.T)
                tensors[f"{_PREFIX}{name}.lora_embedding_B"] = np.ascontiguousarray(bi.T)
            else:
                a_hf, b_hf = _conv_factors(ai, bi) if kind == "conv" else _linear_factors(ai, bi)
                tensors[f"{_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a_hf)
                tensors[f"{_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b_hf)
        entries.append(_Entry(path, template, kind, rank, cfg.alpha_for(path), a.shape[0] if n_stack else None))

    names = {
        (e.template.replace(LAYER, str(i)) if e.n_layers else e.template): e
        for e in entries
        for i in range(e.n_layers or 1)
    }
    config = _hf_config(cfg, names, _hf_modules(params, fn), task_type, base_model_name_or_path, target_modules)
    embeds = [e for e in entries if e.kind == "embed"]
    if tied_head is not None:
        if len(embeds) != 1 or embeds[0].n_layers or ensure_weight_tying is False:
            raise ValueError(
                f"`tied_head`={tied_head!r} needs exactly one adapted, unstacked embedding and "
                f"ensure_weight_tying not False; got {len(embeds)} embedding adapters."
            )
        name = embeds[0].template
        tensors[f"{_PREFIX}{tied_head}.lora_A.weight"] = tensors[f"{_PREFIX}{name}.lora_embedding_B"].T.copy()
        tensors[f"{_PREFIX}{tied_head}.lora_B.weight"] = tensors[f"{_PREFIX}{name}.lora_embedding_A"].T.copy()
    if ensure_weight_tying is None and embeds:
        ensure_weight_tying = True
    if ensure_weight_tying is not None:
        config["ensure_weight_tying"] = bool(ensure_weight_tying)
    return config, tensors


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
            key = _hf_pattern_key(list(patterns), n)
            if (patterns[key] if key is not None else default) != getattr(e, attr):
                return False
        return True

    # Compact form first: one key per module template, with `{layer}` as a digit wildcard.
    compact: dict[str, Any] = {}
    for e in differing.values():
        compact[e.template.replace(LAYER, r"\d+") if e.n_layers else e.template] = _number(getattr(e, attr))
    if works(compact):
        return compact
    exact = {re.escape(n): _number(getattr(e, attr)) for n, e in sorted(differing.items())}
    if works(exact):
        return exact
    raise ValueError(  # pragma: no cover - escaped full names always match exactly
        f"could not express per-module `{attr}` values as HF patterns for {_listed(differing)}."
    )


def _short_targets(names: Iterable[str], hf_names: Iterable[str]) -> list[str] | None:
    names = set(names)
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    selected = {n for n in set(hf_names) | names if _hf_targets(short, n)}
    return short if selected == names else None


def _hf_config(
    cfg: LoraConfig,
    names: Mapping[str, _Entry],
    hf_modules: Mapping[str, tuple[str, int | None]],
    task_type: str | None,
    base_model_name_or_path: str | None,
    target_modules: str | Sequence[str] | None,
) -> dict[str, Any]:
    if target_modules is None:
        targets: str | list[str] = _short_targets(names, hf_modules) or sorted(names)
    else:
        targets = target_modules if isinstance(target_modules, str) else list(target_modules)
        missed = [n for n in names if not _hf_targets(targets, n)]
        if missed:
            raise ValueError(
                f"`target_modules`={target_modules!r} does not select the exported modules {_listed(missed)}; "
                "HF PEFT would not load their weights."
            )
    rank = _default_value([e.rank for e in names.values()], cfg.rank)
    alpha = _default_value([e.alpha for e in names.values()], cfg.alpha)
    return {
        "alpha_pattern": _patterns(names, "alpha", alpha),
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": _number(alpha),
        "lora_dropout": cfg.dropout,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": _patterns(names, "rank", rank),
        "revision": None,
        "target_modules": targets,
        "task_type": task_type,
        "use_dora": False,
        "use_rslora": cfg.use_rslora,
    }


def _write_atomic(path: str, write: Callable[[str], None]) -> None:
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def export_adapters(
    directory: str | os.PathLike[str],
    adapters: Any,
    cfg: LoraConfig,
    params: Any,
    module_name: Callable[[str], str] | Mapping[str, str],
    **kwargs: Any,
) -> str:
    """Write ``adapters`` as a HF PEFT adapter directory that ``PeftModel.from_pretrained`` loads.

    Writes ``adapter_config.json`` and ``adapter_model.safetensors`` (metadata ``{"format": "pt"}``), each
    atomically (a temporary file renamed into place). Keyword arguments are those of :func:`to_state_dict`.

    Returns:
      The absolute directory path.
    """
    from safetensors.numpy import save_file

    config, tensors = to_state_dict(adapters, cfg, params, module_name, **kwargs)
    directory = os.path.abspath(os.fspath(directory))
    os.makedirs(directory, exist_ok=True)

    def write_config(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")

    _write_atomic(os.path.join(directory, WEIGHTS_NAME), lambda tmp: save_file(tensors, tmp, {"format": "pt"}))
    _write_atomic(os.path.join(directory, CONFIG_NAME), write_config)
    return directory


# ----------------------------------------------------------------------------------------------- import


def _check_importable(config: Mapping[str, Any]) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"adapter_config.json has peft_type={peft_type!r}; jaxpeft.hf imports 'LORA' adapters only.")
    for field, why in _UNSUPPORTED_HF.items():
        value = config.get(field)
        if value not in (None, False, [], {}, ""):
            raise ValueError(f"adapter_config.json sets {field}={value!r}: {why}; refusing to import it.")
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(_BASE_CHANGING_INITS) or config.get("loftq_config"):
        raise ValueError(
            f"adapter_config.json has init_lora_weights={config.get('init_lora_weights')!r}: that initialisation "
            "rewrites the base weights, so the factors alone do not reproduce the model. Convert it in PEFT first "
            "(save_pretrained(..., path_initial_model_for_weight_conversion=...)) and import the converted adapter."
        )
    bias = config.get("bias", "none")
    if bias != "none":
        raise ValueError(
            f"adapter_config.json has bias={bias!r}: trained biases are not LoRA factors; refusing to import."
        )
    if "r" not in config or "lora_alpha" not in config:
        raise ValueError("adapter_config.json lacks `r` or `lora_alpha`; is it a LoRA adapter config?")


def _parse_keys(tensors: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{hf module: {"a"|"b"|"w": tensor, "kind": ...}}`` from safetensors keys; unknown keys are refused."""
    strip = all(k.startswith(_PREFIX) for k in tensors)
    modules: dict[str, dict[str, Any]] = {}
    unknown = []
    for key, value in tensors.items():
        name = key[len(_PREFIX) :] if strip else key
        for suffix, (kind, part) in _SUFFIXES.items():
            if name.endswith(suffix):
                entry = modules.setdefault(name[: -len(suffix)], {})
                if part != "w" and entry.setdefault("kind", kind) != kind:
                    unknown.append(key)
                entry[part] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"the adapter file holds tensors that are not plain LoRA factors: {_listed(unknown)}; jaxpeft.hf "
            "imports `lora_A.weight`/`lora_B.weight` and `lora_embedding_A`/`lora_embedding_B` only."
        )
    return modules


def _check_base_weight(
    name: str, w: np.ndarray, where: tuple[str, int | None], params_flat: Mapping[str, Any], policy: str
) -> None:
    if policy == "ignore":
        return
    path, layer = where
    ours = params_flat[path]
    if not isinstance(ours, (jax.Array, np.ndarray)):
        raise ValueError(
            f"the adapter file carries base weight {name + '.base_layer.weight'!r} (HF saves embeddings it "
            "adapts); `params` are abstract, so it cannot be checked. Pass concrete params, or "
            "`base_weights='ignore'` if that weight was neither trained nor resized."
        )
    ours = np.asarray(jax.device_get(ours if layer is None else ours[layer]), np.float32)
    theirs = np.asarray(w, np.float32)
    if _module_of(path)[1] == "kernel":
        theirs = theirs.T
    tol = 4 * float(jnp.finfo(params_flat[path].dtype).eps) * max(1.0, float(np.max(np.abs(ours), initial=0.0)))
    if ours.shape != theirs.shape or not np.allclose(ours, theirs, rtol=0.0, atol=tol):
        raise ValueError(
            f"the adapter file carries base weight {name + '.base_layer.weight'!r} that differs from `params` at "
            f"{path!r} (resized or trained in HF?). jaxpeft adapters hold only LoRA factors: load that weight into "
            "your params first, or pass `base_weights='ignore'` to skip the check."
        )


def _import_factors(
    path: str,
    shape: tuple[int, ...],
    factors: list[tuple[str, dict[str, Any], int, float]],
    layout: Layout | None,
    *,
    stacked: bool,
) -> tuple[np.ndarray, np.ndarray, Layout]:
    """Our ``(A, B, layout)`` at ``path`` from its HF modules' factors (one per layer when ``stacked``)."""
    first = factors[0][0]
    if len({(r, alpha) for _, _, r, alpha in factors}) > 1:
        raise ValueError(
            f"the HF modules stacked into {path!r} (e.g. {first!r}) have different ranks or alphas "
            f"{sorted({(r, alpha) for _, _, r, alpha in factors})}; a stacked adapter needs one rank and one alpha."
        )
    kinds = {"conv" if e["kind"] == "linear" and np.ndim(e["a"]) > 2 else e["kind"] for _, e, _, _ in factors}
    if len(kinds) > 1:
        raise ValueError(f"the HF modules stacked into {path!r} (e.g. {first!r}) mix LoRA kinds {sorted(kinds)}.")
    kind = kinds.pop()
    per_layer = shape[1:] if stacked else shape
    if layout is None:
        if kind == "conv":
            layout = Layout(stack=int(stacked), fan_in=len(per_layer) - 1, fan_out=1, kind="conv")
        elif len(per_layer) == 2:
            is_embed = kind == "embed" or _module_of(path)[1] == "embedding"
            layout = Layout(stack=int(stacked), kind="embed" if is_embed else "dense")
        else:
            raise ValueError(
                f"{path!r} has shape {shape}: which axes are fan-in and fan-out is unknown; pass "
                "`layouts=jaxpeft.linen.infer_layouts(model, *sample_args)`."
            )
    if layout.stack != int(stacked) or layout.ndim != len(shape):
        raise ValueError(
            f"`layouts`[{path!r}]={layout} does not fit {path!r} of shape {shape} with "
            f"{'a' if stacked else 'no'} {LAYER} axis from `module_name`."
        )
    if (kind == "embed") != (layout.kind == "embed") or (kind == "conv") != (layout.kind == "conv"):
        raise ValueError(
            f"HF module {first!r} holds {kind} LoRA factors but {path!r} is a {layout.kind} parameter; "
            "fix `module_name`."
        )
    _, fan_in, fan_out = layout.split(shape)
    rank = factors[0][2]
    a_shape, b_shape = (*fan_in, rank), (rank, *fan_out)
    a_list, b_list = [], []
    for name, entry, _, _ in factors:
        a_hf, b_hf = np.asarray(entry["a"]), np.asarray(entry["b"])
        if kind == "conv":
            a = np.transpose(a_hf, (*range(2, a_hf.ndim), 1, 0))
            b = np.reshape(b_hf, b_hf.shape[:2]).T
        else:
            a, b = a_hf.T, b_hf.T
        fits = a.shape[-1] == rank and b.shape[0] == rank and (kind != "conv" or b_hf.size == b.size)
        if not fits or a.size != math.prod(a_shape) or b.size != math.prod(b_shape):
            raise ValueError(
                f"HF module {name!r} has LoRA factors A {a_hf.shape}, B {b_hf.shape} that do not fit {path!r} of "
                f"shape {shape} (A {a_shape}, B {b_shape} per layer); does the adapter belong to this base model?"
            )
        a_list.append(np.reshape(a, a_shape))
        b_list.append(np.reshape(b, b_shape))
    if stacked:
        return np.stack(a_list), np.stack(b_list), layout
    return a_list[0], b_list[0], layout


def _drop_tied_copies(modules: dict[str, dict[str, Any]], index: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Without the HF modules that only mirror an embedding adapter onto a tied output head.

    With ``ensure_weight_tying`` PEFT saves the tied head's LoRA as a Linear adapter whose factors are the
    embedding's, transposed. A model without such a parameter (its head *is* the embedding, ``nn.Embed.attend``)
    gets the same effect from the embedding adapter in ``jaxpeft.linen``, so exact copies are dropped.
    """
    embeds = [e for e in modules.values() if e.get("kind") == "embed" and "a" in e and "b" in e]
    out = {}
    for name, entry in modules.items():
        tied = (
            name not in index
            and entry.get("kind") == "linear"
            and "a" in entry
            and "b" in entry
            and any(
                np.shape(entry["a"]) == np.shape(e["b"])[::-1]
                and np.shape(entry["b"]) == np.shape(e["a"])[::-1]
                and np.array_equal(entry["a"], np.transpose(e["b"]))
                and np.array_equal(entry["b"], np.transpose(e["a"]))
                for e in embeds
            )
        )
        if not tied:
            out[name] = entry
    return out


def from_state_dict(
    config: Mapping[str, Any],
    tensors: Mapping[str, Any],
    params: Any,
    module_name: Callable[[str], str] | Mapping[str, str],
    *,
    layouts: Mapping[str, Layout] | None = None,
    dtype: Any = None,
    base_weights: str = "check",
) -> tuple[LoraConfig, dict[str, Any]]:
    """A ``LoraConfig`` and adapter tree from HF PEFT adapter config contents and tensors.

    The returned config targets exactly the imported parameters (an anchored regex of their paths), with HF's
    per-module ranks and alphas as ``rank_pattern``/``alpha_pattern``, so ``jaxpeft.plan(cfg, params,
    layouts=...)`` reproduces the adapter shapes and ``jaxpeft.checkpoint`` can save them. HF modules of a
    ``{layer}`` template are stacked along the leading axis; every layer must be present. With
    ``ensure_weight_tying``, the tied output head's copy of an embedding adapter is dropped when ``params`` have no
    such head (``jaxpeft.linen`` applies embedding adapters to ``nn.Embed.attend`` already).

    Args:
      config: the parsed ``adapter_config.json``.
      tensors: ``{key: array}`` from ``adapter_model.safetensors``.
      params: the base params (arrays or ``jax.ShapeDtypeStruct``).
      module_name: our module path -> HF module name, as for :func:`to_state_dict`.
      layouts: kernel layouts; only needed for kernels with several fan-in or fan-out axes.
      dtype: adapter dtype; by default the file's (float32 for HF-trained adapters).
      base_weights: for the base embedding copy HF saves when it adapts an embedding
        (``...base_layer.weight``): ``"check"`` that it equals ``params`` (needs concrete params), or
        ``"ignore"`` it.

    Returns:
      ``(cfg, adapters)``.

    Raises:
      ValueError: a HF feature jaxpeft cannot represent (DoRA, bias, modules_to_save, ...); tensors with no
        matching parameter; missing layers of a stacked module; ranks or shapes that disagree.
    """
    if base_weights not in ("check", "ignore"):
        raise ValueError(f"`base_weights`={base_weights!r}; expected 'check' or 'ignore'.")
    _check_importable(config)
    fn = _as_fn(module_name)
    layouts = dict(layouts or {})
    params_flat = dict(leaves_with_paths(params))
    index = _hf_modules(params, fn)
    modules = _parse_keys(tensors)
    if config.get("ensure_weight_tying"):
        modules = _drop_tied_copies(modules, index)
    unmatched = [n for n in modules if n not in index]
    if unmatched:
        examples = _listed(list(index)[:3])
        raise ValueError(
            f"HF modules {_listed(unmatched)} match no parameter through `module_name` (it maps this model's "
            f"weights to e.g. {examples}); fix `module_name` or pass the params of the adapter's base model."
        )
    r_default = int(config["r"])
    alpha_default = float(config["lora_alpha"])
    rank_pattern = dict(config.get("rank_pattern") or {})
    alpha_pattern = dict(config.get("alpha_pattern") or {})
    use_rslora = bool(config.get("use_rslora", False))
    dropout = float(config.get("lora_dropout") or 0.0)

    grouped: dict[str, dict[int | None, tuple[str, dict[str, Any]]]] = {}
    for name, entry in modules.items():
        path, layer = index[name]
        if "a" not in entry and "b" not in entry:
            _check_base_weight(name, entry["w"], (path, layer), params_flat, base_weights)
            continue
        if "w" in entry:
            _check_base_weight(name, entry["w"], (path, layer), params_flat, base_weights)
        if "a" not in entry or "b" not in entry:
            raise ValueError(f"HF module {name!r} has only one of its two LoRA factors; the file is incomplete.")
        grouped.setdefault(path, {})[layer] = (name, entry)
    if not grouped:
        raise ValueError("the adapter file holds no LoRA factors.")

    adapters: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    effective_layouts: dict[str, Layout] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for path in sorted(grouped):
        shape = tuple(params_flat[path].shape)
        layers = grouped[path]
        stacked = None not in layers
        order: list[int | None] = [*sorted(i for i in layers if i is not None)] if stacked else [None]
        if stacked:
            missing = sorted(set(range(shape[0])) - set(order))
            if missing:
                raise ValueError(
                    f"HF modules like {layers[order[0]][0]!r} stack into {path!r} ({shape[0]} layers), but the "
                    f"file has no adapter for layers {missing}; a jaxpeft stack needs every layer."
                )
        factors = []
        for layer in order:
            name, entry = layers[layer]
            rank = int(np.shape(entry["a"])[0])
            key = _hf_pattern_key(list(rank_pattern), name)
            want = int(rank_pattern[key]) if key is not None else r_default
            if rank != want:
                raise ValueError(
                    f"HF module {name!r} has rank {rank} in the tensors but {want} in adapter_config.json; "
                    "the files do not belong together."
                )
            key = _hf_pattern_key(list(alpha_pattern), name)
            alpha = float(alpha_pattern[key]) if key is not None else alpha_default
            factors.append((name, entry, rank, alpha))
        a, b, layout = _import_factors(path, shape, factors, layouts.get(path), stacked=stacked)
        adapters[path] = (a, b)
        effective_layouts[path] = layout
        ranks[path] = factors[0][2]
        alphas[path] = factors[0][3]

    dtypes = {np.dtype(a.dtype) for a, _ in adapters.values()}
    out_dtype = jnp.dtype(dtype) if dtype is not None else (dtypes.pop() if len(dtypes) == 1 else jnp.float32)
    paths = sorted(adapters)
    cfg = LoraConfig(
        rank=r_default,
        alpha=alpha_default,
        targets="^(?:" + "|".join(re.escape(p) for p in paths) + ")$",
        rank_pattern={"^" + re.escape(p) + "$": ranks[p] for p in paths if ranks[p] != r_default},
        alpha_pattern={"^" + re.escape(p) + "$": alphas[p] for p in paths if alphas[p] != alpha_default},
        dropout=dropout,
        use_rslora=use_rslora,
        dtype=jnp.dtype(out_dtype).name,
    )
    rows = {t.path: t for t in plan(cfg, params, layouts=effective_layouts).targets}
    tree: dict[str, Any] = {}
    for path in paths:
        a, b = adapters[path]
        row = rows[path]
        if (row.a_shape, row.b_shape) != (a.shape, b.shape):  # pragma: no cover - internal consistency
            raise AssertionError(f"{path!r}: planned {row.a_shape}/{row.b_shape}, built {a.shape}/{b.shape}")
        lora = LoraWeights(jnp.asarray(a, cfg.dtype), jnp.asarray(b, cfg.dtype), row.scale, cfg.dropout)
        tree = set_path(tree, path, lora)
    return cfg, tree


def import_adapters(
    directory: str | os.PathLike[str],
    params: Any,
    module_name: Callable[[str], str] | Mapping[str, str],
    **kwargs: Any,
) -> tuple[LoraConfig, dict[str, Any]]:
    """Read a HF PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).

    Keyword arguments are those of :func:`from_state_dict`. Legacy ``adapter_model.bin`` files (pickle) are
    refused: convert them with PEFT (``save_pretrained(..., safe_serialization=True)``) first.

    Returns:
      ``(cfg, adapters)``; run them with ``jaxpeft.linen.apply(model, {"params": params}, adapters, ...)``.
    """
    from safetensors import safe_open

    directory = os.path.abspath(os.fspath(directory))
    config_file = os.path.join(directory, CONFIG_NAME)
    weights_file = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!r}; expected a PeftModel.save_pretrained directory.")
    if not os.path.isfile(weights_file):
        legacy = os.path.isfile(os.path.join(directory, "adapter_model.bin"))
        hint = (
            " It has a pickled adapter_model.bin, which jaxpeft does not read; re-save it with safe_serialization=True."
            if legacy
            else ""
        )
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory!r}.{hint}")
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    if not isinstance(config, dict):
        raise ValueError(f"{config_file!r} does not hold a JSON object.")
    with safe_open(weights_file, framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a Mapping
    return from_state_dict(config, tensors, params, module_name, **kwargs)
