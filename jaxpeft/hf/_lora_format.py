"""PEFT's ``LORA`` file format, shared by the methods that write it: LoRA, DoRA (``use_dora``) and LoRA-FA.

Tensors: ``<module>.lora_A.weight`` ``[r, in]`` and ``.lora_B.weight`` ``[out, r]`` (Conv: ``[r, in, *window]`` and
``[out, r, 1, ...]``), ``.lora_embedding_A`` ``[r, vocab]`` / ``.lora_embedding_B`` ``[dim, r]`` for embeddings; DoRA
adds ``.lora_magnitude_vector`` (no ``.weight``): ``[out]``, ``[1, out, 1, ...]`` for a Conv, ``[dim]`` for an
embedding. Kernels with several fan-in or fan-out axes are flattened to HF's 2-D shapes.

:func:`lora_codec` builds one method's codec over the format: the node class it writes, the config class it reads
into, and whether it is DoRA (magnitudes, ``use_dora``).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxpeft._paths import leaves_with_paths, set_path
from jaxpeft._select import Layout
from jaxpeft.hf import _parameters as parameters
from jaxpeft.hf._codec import Export, FieldTable, Import, PeftCodec
from jaxpeft.hf._common import (
    PREFIX,
    Entry,
    Group,
    Target,
    build_adapters,
    check_hf_name,
    check_rank_scale,
    conv_vector,
    hf_modules,
    hf_targets,
    import_layout,
    per_path_args,
    rank_alpha_fields,
    read_groups,
    short_names,
    target_modules,
    template,
    write_modules,
)
from jaxpeft.hf._config import (
    CONFIG_NAME,
    FAN_IN_FAN_OUT,
    HARMLESS_COMMON,
    SAVED,
    Selection,
    alpha_value,
    bool_field,
    check_bias_none,
    fail,
    pattern_rank_alpha,
    pattern_value,
    rank_value,
    rate_value,
    read_selection,
)
from jaxpeft.protocol import Adapter, adapter_items, check_fits

__all__ = ["FIELDS", "lora_codec"]

_SUFFIXES = {
    ".lora_A.weight": "a",
    ".lora_B.weight": "b",
    ".lora_embedding_A": "ea",
    ".lora_embedding_B": "eb",
    ".lora_magnitude_vector": "m",
    ".lora_magnitude_vector.weight": "m",  # the in-memory name, which PEFT's loader also accepts
}
_PARTS = frozenset(("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "base_layer"))
_TIED_DORA = (
    "HF PEFT cannot reproduce a DoRA embedding on a tied output head: jaxpeft applies the embedding's DoRA "
    "(a magnitude per feature) to `nn.Embed.attend`, while PEFT gives the tied head a DoRA of its own (a magnitude "
    "per vocabulary row)"
)
# init_lora_weights values that rewrite the base weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

#: Every field of PEFT 0.21.2's ``LoraConfig``, classified.
FIELDS = FieldTable(
    supported=(
        "peft_type",
        "r",
        "lora_alpha",
        "lora_dropout",
        "use_rslora",
        "use_dora",
        "rank_pattern",
        "alpha_pattern",
        "target_modules",
        "target_parameters",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "init_lora_weights",
        "ensure_weight_tying",
        "bias",
    ),
    harmless={
        **HARMLESS_COMMON,
        **FAN_IN_FAN_OUT,
        "megatron_core": "a module name, used only with megatron_config (refused)",
        "runtime_config": "ephemeral GPU offload, a placement option",
        "qalora_group_size": "used only with use_qalora (refused)",
        "eva_config": "EVA initialisation only; the saved factors replace it",
        "corda_config": "used only with init_lora_weights='corda' (refused)",
        "lora_ga_config": "used only with init_lora_weights='lora_ga' (refused)",
        "loftq_config": "used only with init_lora_weights='loftq' (refused); PEFT drops it otherwise",
    },
    refused={
        "lora_bias": "LoRA bias terms (`lora_bias`) are not supported",
        "modules_to_save": SAVED,
        "trainable_token_indices": "trainable tokens (`trainable_token_indices`) are not supported",
        "layer_replication": "layer replication (`layer_replication`) changes the base model",
        "use_qalora": "QA-LoRA (`use_qalora`) pools the adapter's input",
        "alora_invocation_tokens": "activated LoRA (`alora_invocation_tokens`) switches on after given tokens",
        "use_bdlora": "block-diagonal LoRA (`use_bdlora`) has other factor shapes",
        "arrow_config": "Arrow routing (`arrow_config`) mixes several adapters per token",
        "kasa_config": "KaSA (`kasa_config`) adds a singular-value adapter",
        "velora_config": "VeLoRA (`velora_config`) trains with compressed activations and saves extra buffers",
        "monteclora_config": "MonteCLoRA (`monteclora_config`) samples its factors in training and saves extra weights",
        "megatron_config": "Megatron parallel layers (`megatron_config`) are not supported",
    },
)


# ----------------------------------------------------------------------------------------------- fields


@dataclasses.dataclass(frozen=True)
class LoraFields:
    """The checked values of a PEFT ``LoraConfig`` file."""

    r: int
    alpha: float
    lora_dropout: float
    use_rslora: bool
    use_dora: bool
    rank_pattern: tuple[tuple[str, int], ...]
    alpha_pattern: tuple[tuple[str, float], ...]
    ensure_weight_tying: bool
    identity_init: bool  # a targeted module with no saved tensors is the identity in PEFT
    selection: Selection
    target_parameters: tuple[str, ...] = ()

    def rank_alpha(self, name: str) -> tuple[int, float]:
        """The rank and alpha PEFT gives module ``name`` (first matching pattern key, else ``r``/``lora_alpha``)."""
        return pattern_rank_alpha(self, name)


def _identity_init(config: Mapping[str, Any]) -> bool:
    """Whether PEFT makes a targeted module with no saved tensors the identity (``init_lora_weights``)."""
    init = config.get("init_lora_weights", True)
    if isinstance(init, bool):
        return init  # True: B = 0; False: random A and B
    if isinstance(init, str):
        if init.lower().startswith(_BASE_CHANGING_INITS):
            raise ValueError(
                f"{CONFIG_NAME} has `init_lora_weights`={init!r}: that initialisation rewrites the base weights, so "
                "the factors alone do not reproduce the model. Convert it in PEFT first "
                "(save_pretrained(..., path_initial_model_for_weight_conversion=...)) and import the converted adapter."
            )
        if init.lower() in ("gaussian", "mica") or init == "eva":  # B = 0 (MiCA: A = 0)
            return True
        if init == "orthogonal":  # random orthogonal A and B
            return False
    raise fail("init_lora_weights", init, "true, false, 'gaussian', 'eva', 'mica' or 'orthogonal'")


def read_lora(config: Mapping[str, Any]) -> LoraFields:
    """The checked fields of a ``peft_type: "LORA"`` config; missing fields take PEFT's defaults."""
    check_bias_none(config, "LoRA factors")
    targeted = parameters.read_target_parameters(config)
    return LoraFields(
        r=rank_value("r", config.get("r", 8)),
        alpha=alpha_value("lora_alpha", config.get("lora_alpha", 8)),
        lora_dropout=rate_value(config, "lora_dropout"),
        use_rslora=bool_field(config, "use_rslora", False),
        use_dora=bool_field(config, "use_dora", False),
        rank_pattern=pattern_value(config, "rank_pattern", rank_value),
        alpha_pattern=pattern_value(config, "alpha_pattern", alpha_value),
        ensure_weight_tying=bool_field(config, "ensure_weight_tying", False),
        identity_init=_identity_init(config),
        selection=read_selection(config, layers=True, empty_ok=bool(targeted)),
        target_parameters=targeted,
    )


# ----------------------------------------------------------------------------------------------- export


def _check_against_cfg(target: Target, cfg: Any) -> Entry:
    node = target.node
    entry = check_rank_scale(target, cfg, node.rank, node.scale)
    if node.dropout != cfg.dropout:
        raise ValueError(f"adapter {target.path!r} has dropout {node.dropout} but `cfg.dropout`={cfg.dropout}.")
    if target.kind == "embed" and (target.layout.fan_in != 1 or target.layout.fan_out != 1):
        raise ValueError(f"embedding adapter {target.path!r} must be 2-D per layer, got A {tuple(node.a.shape)}.")
    return entry


def _factor_tensors(target: Target, layer: int | None, dora: bool) -> dict[str, np.ndarray]:
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
    if dora:
        m = np.reshape(target.array("magnitude", layer), (-1,))
        out[".lora_magnitude_vector"] = conv_vector(m, target.layout) if target.kind == "conv" else m
    return out


def _tie(
    config: dict[str, Any],
    tensors: dict[str, np.ndarray],
    embeds: Sequence[Entry],
    dora: bool,
    ensure_weight_tying: bool | None,
    tied_head: str | None,
) -> None:
    """Write ``ensure_weight_tying`` (and the tied head's copy of the embedding adapter) into the files."""
    if ensure_weight_tying is not None and not isinstance(ensure_weight_tying, bool):
        raise TypeError(f"`ensure_weight_tying`={ensure_weight_tying!r}; expected True, False or None.")
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


def _split_parameter_targets(req: Export) -> tuple[Any, list[tuple[str, Any, str]]]:
    """The adapter tree without the adapters written as PEFT target parameters, and those as
    ``(path, node, HF parameter-name template)``."""
    assert req.module_name is not None
    rest: Any = {}
    found: list[tuple[str, Any, str]] = []
    for path, node in adapter_items(req.adapters):
        layout = getattr(node, "layout", None)
        name = template(req.module_name, path) if isinstance(layout, Layout) else ""
        if isinstance(layout, Layout) and parameters.is_parameter_target(layout, name):
            found.append((path, node, name))
        else:
            rest = set_path(rest, path, node)
    return (rest if found else req.adapters), found


def _parameter_tensors(
    req: Export, found: Sequence[tuple[str, Any, str]], node_type: type[Adapter], dora: bool
) -> tuple[dict[str, np.ndarray], dict[str, Entry]]:
    """PEFT ``ParamWrapper`` tensors of the expert adapters, and ``{HF parameter name: Entry}`` (per layer)."""
    shapes = {p: tuple(leaf.shape) for p, leaf in leaves_with_paths(req.params)}
    per_module: dict[str, dict[str, tuple[Target, int | None]]] = {}
    names: dict[str, Entry] = {}
    for path, node, name in found:
        if not isinstance(node, node_type):
            raise ValueError(
                f"adapter {path!r} is a {type(node).__name__}; a {type(req.cfg).__name__} exports "
                f"{node_type.__name__} only. Pass the config the adapters were made with."
            )
        if dora:
            raise ValueError(
                f"adapter {path!r} is a DoRA adapter of the expert weight {name!r}, which HF PEFT adapts as a bare "
                "parameter (`target_parameters`), and PEFT's ParamWrapper refuses use_dora. Export DoRA on module "
                "weights only, or train LoRA on the experts."
            )
        if req.cfg.dropout:
            raise ValueError(
                f"adapter {path!r} adapts the expert weight {name!r} (PEFT `target_parameters`) and `cfg.dropout`="
                f"{req.cfg.dropout}; PEFT's ParamWrapper refuses any lora_dropout (dropout acts on the input, which a "
                "parameter wrapper never sees). Export with a config of dropout=0.0 (the factors are the same)."
            )
        if path not in shapes:
            raise ValueError(f"adapter {path!r} has no parameter in `params`; were the adapters made for this model?")
        check_fits(path, node, shapes[path])
        if node.layout.fan_in != 1 or node.layout.fan_out != 1:
            raise ValueError(
                f"adapter {path!r} has {node.layout.fan_in} fan-in and {node.layout.fan_out} fan-out axes; a PEFT "
                "target parameter is (experts, out, in): one of each."
            )
        arrays = {f: np.asarray(jax.device_get(getattr(node, f))) for f in ("a", "b")}
        target = Target(path, node, shapes[path], name, arrays)
        entry = _check_against_cfg(target, req.cfg)
        for hf_name, layer in target.layers():
            module, _, param = hf_name.rpartition(".")
            if not module:
                raise ValueError(
                    f"`module_name` maps the expert weight {path!r} to {name!r}; a PEFT target parameter is named "
                    "'<module>.<parameter>', e.g. 'model.layers.{layer}.mlp.experts.gate_up_proj'."
                )
            per_module.setdefault(module, {})[param] = (target, layer)
            names[hf_name] = entry
    tensors: dict[str, np.ndarray] = {}
    for module, params in per_module.items():
        order = parameters.order_parameters(module, list(params), req.options.get("parameter_order"))
        for index, param in enumerate(order):
            target, layer = params[param]
            a, b = parameters.to_peft(target.array("a", layer), target.array("b", layer))
            stem = PREFIX + parameters.wrapper_name(module, index, len(order))
            tensors[stem + ".lora_A.weight"] = np.ascontiguousarray(a)
            tensors[stem + ".lora_B.weight"] = np.ascontiguousarray(b)
    return tensors, names


def _to_hf(req: Export, node_type: type, dora: bool) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    tied_head = req.options.get("tied_head")
    if tied_head is not None:
        check_hf_name(tied_head, "`tied_head`")
        if "{layer}" in tied_head:
            raise ValueError(f"`tied_head`={tied_head!r}; a tied output head is one module, without {{layer}}.")
    cfg = req.cfg
    rest, found = _split_parameter_targets(req)
    tensors: dict[str, np.ndarray] = {}
    names: dict[str, Entry] = {}
    if not found or list(adapter_items(rest)):
        tensors, names = write_modules(
            req._replace(adapters=rest),
            node_type,
            lambda t, layer: _factor_tensors(t, layer, dora),
            lambda t: _check_against_cfg(t, cfg),
        )
    param_tensors, param_names = _parameter_tensors(req, found, node_type, dora) if found else ({}, {})
    config = {
        **rank_alpha_fields(cfg, {**names, **param_names}, "r", "lora_alpha"),
        "auto_mapping": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_dropout": cfg.dropout,
        "modules_to_save": None,
        "peft_type": "LORA",
        "revision": None,
        "target_modules": target_modules(req, names) if names else None,
        "use_dora": dora,
        "use_rslora": cfg.use_rslora,
    }
    if param_names:
        assert req.module_name is not None
        universe = hf_modules(req.params, req.module_name)
        config["target_parameters"] = short_names(param_names, universe, hf_targets) or sorted(param_names)
        tensors.update(param_tensors)
    embeds = list({id(e): e for e in names.values() if e.target.kind == "embed"}.values())
    _tie(config, tensors, embeds, dora, req.options.get("ensure_weight_tying"), tied_head)
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
    tensors: Mapping[str, Any], req: Import, fields: LoraFields
) -> tuple[Mapping[str, Any], Selection]:
    """The tensors without the HF modules that only mirror an embedding adapter onto a tied output head, and the
    selection PEFT adapts with the tied heads the model holds as parameters of their own.

    With ``ensure_weight_tying`` PEFT saves the tied head's LoRA as a Linear adapter whose factors are the
    embedding's, transposed. A model without such a parameter (its head *is* the embedding, ``nn.Embed.attend``)
    gets the same effect from the embedding adapter in ``jaxpeft.linen``, so exact copies are dropped. For DoRA the
    two differ, so such a file is refused. A model with the head as a parameter (an untied copy of a tied model)
    imports it as that head's adapter, as PEFT runs it: PEFT adds tied heads to its targets itself, so the
    selection is widened to them.
    """
    from jaxpeft.hf._common import hf_modules, split_keys

    if not fields.ensure_weight_tying:
        return tensors, fields.selection
    assert req.module_name is not None
    index = hf_modules(req.params, req.module_name)
    modules = split_keys(tensors, _SUFFIXES, "LoRA or DoRA tensors (lora_A/lora_B, lora_embedding_A/B, magnitudes)")
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
    if copies and fields.use_dora:
        raise ValueError(f"HF module {copies[0]!r} is a tied output head's copy of a DoRA embedding; {_TIED_DORA}.")
    keep = {k: v for k, v in tensors.items() if not any(k.removeprefix(PREFIX).startswith(c + ".") for c in copies)}
    heads = [n for n, e in modules.items() if n in index and is_copy(e) and not fields.selection.selects(n)]
    return keep, _also_selecting(fields.selection, heads)


def _also_selecting(selection: Selection, names: Sequence[str]) -> Selection:
    """``selection`` that also selects the HF modules ``names``."""
    if not names:
        return selection
    targets = selection.target_modules
    if isinstance(targets, str):
        return dataclasses.replace(selection, target_modules="|".join([f"(?:{targets})", *map(re.escape, names)]))
    return dataclasses.replace(selection, target_modules=(*targets, *names))


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
    from jaxpeft.hf._common import group_rank_alpha

    kinds = {_check_parts(name, entry, fields.use_dora) for name, entry in group.modules}
    if len(kinds) > 1:
        raise ValueError(
            f"the HF modules stacked into {group.path!r} (e.g. {group.first!r}) mix LoRA kinds {sorted(kinds)}."
        )
    ranks = [int(np.shape(e["ea"] if "ea" in e else e["a"])[0]) for _, e in group.modules]
    rank, alpha = group_rank_alpha(fields.rank_alpha, group, ranks)
    return kinds.pop(), rank, alpha


def _import_parameter_group(fields: LoraFields, group: Group) -> tuple[dict[str, np.ndarray], int, float]:
    """Our ``{a, b}`` of an expert kernel ``(*layers, E, in, out)`` from PEFT ``ParamWrapper`` tensors, its rank
    and alpha."""
    from jaxpeft.hf._common import group_rank_alpha

    experts, fan_in, fan_out = group.shape[-3:]
    ranks = []
    for name, entry in group.modules:
        if set(entry) != {"a", "b"}:
            raise ValueError(
                f"HF parameter {name!r} (PEFT `target_parameters`) holds {sorted(entry)} tensors; a ParamWrapper "
                "has exactly lora_A and lora_B. The file is incomplete or not PEFT's."
            )
        a_hf, b_hf = np.shape(entry["a"]), np.shape(entry["b"])
        if (
            len(a_hf) != 2
            or len(b_hf) != 2
            or a_hf[0] != b_hf[1]
            or a_hf[0] % experts
            or a_hf[1:] != (fan_in,)
            or (b_hf[0] != fan_out)
        ):
            raise ValueError(
                f"HF parameter {name!r} has LoRA factors A {a_hf}, B {b_hf}; for {group.path!r} of shape "
                f"{group.shape} ({experts} experts, in {fan_in}, out {fan_out}) PEFT's ParamWrapper has A "
                f"[r * {experts}, {fan_in}] and B [{fan_out}, r * {experts}]. Does the adapter belong to this model?"
            )
        ranks.append(a_hf[0] // experts)
    rank, alpha = group_rank_alpha(fields.rank_alpha, group, ranks)
    per_layer = [parameters.from_peft(np.asarray(e["a"]), np.asarray(e["b"]), experts) for _, e in group.modules]
    return {"a": group.stack([a for a, _ in per_layer]), "b": group.stack([b for _, b in per_layer])}, rank, alpha


def _from_hf(req: Import, config_cls: type) -> tuple[Any, dict[str, Any]]:
    fields = read_lora(req.config)
    tensors, selection = _drop_tied_copies(req.tensors, req, fields)
    order = (req.options or {}).get("parameter_order")
    tensors, selection, expert_paths = parameters.rename_wrapped_keys(
        tensors, req.params, req.module_name, selection, fields.target_parameters, order
    )
    what = "LoRA or DoRA tensors (lora_A/lora_B, lora_embedding_A/B, magnitudes)"
    groups = read_groups(req, selection, _SUFFIXES, what, fields.identity_init, "init_lora_weights", tensors)
    layouts = dict(req.layouts or {})
    arrays, used_layouts, ranks, alphas = {}, {}, {}, {}
    for group in groups:
        if group.path in expert_paths:
            given = layouts.get(group.path)
            used_layouts[group.path] = parameters.parameter_layout(group.shape, group.stacked, given, group.path)
            arrays[group.path], ranks[group.path], alphas[group.path] = _import_parameter_group(fields, group)
            continue
        kind, ranks[group.path], alphas[group.path] = _kind_rank_alpha(fields, group)
        used_layouts[group.path] = import_layout(group, kind, layouts.get(group.path))
        arrays[group.path] = _import_group(group, kind, used_layouts[group.path], ranks[group.path])
    args = per_path_args(fields.r, fields.alpha, ranks, alphas, arrays, req.dtype)
    cfg = config_cls(**args, dropout=fields.lora_dropout, use_rslora=fields.use_rslora)
    return cfg, build_adapters(cfg, req.params, used_layouts, arrays)


def lora_codec(node_type: type, config_cls: type, *, dora: bool) -> PeftCodec:
    """The codec of a method that writes PEFT's ``LORA`` format.

    Several methods share the format; an import takes the first codec that accepts the file (``use_dora`` true:
    DoRA's, else the first of LoRA's and LoRA-FA's in registry order, unless the caller passes a config class).

    Args:
      node_type: the node class it exports (a subclass too).
      config_cls: the config class an import builds (with the file's rank, alpha, patterns, dropout, rsLoRA).
      dora: whether the method is DoRA: magnitudes are written and read, ``use_dora`` is true.
    """
    return PeftCodec(
        peft_type="LORA",
        peft_config="LoraConfig",
        fields=FIELDS,
        to_hf=lambda req: _to_hf(req, node_type, dora),
        from_hf=lambda req: _from_hf(req, config_cls),
        accepts=lambda config: (config.get("use_dora", False) is True) == dora,
        tensor_parts=_PARTS,
        options=("ensure_weight_tying", "tied_head", "parameter_order"),
    )
