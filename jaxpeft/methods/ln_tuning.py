"""LayerNorm tuning: train the scale and bias of norm layers (a leaf method over ``LeafDelta``); and its PEFT
``LN_TUNING`` codec.

PEFT trains a copy of each targeted module and saves the copy's parameters themselves, not a difference:
``base_model.model.<module>.ln_tuning_layers.weight`` (and ``.bias``), the *tuned* values, for every parameter of
every tuned norm. A Flax norm's ``scale`` is torch's ``weight``; shapes are unchanged (a scanned norm is written
as one HF module per layer, ``{layer}``). So the export writes ``base + delta`` exactly as the model sees it
(``LeafDelta.value``: formed in float32, cast to the base leaf's dtype) and the import subtracts the base
(``saved - base`` in float32): both need the concrete base ``params``. A norm module's parameter that the adapters
leave untuned (``LNTuningConfig(targets=r"scale$")`` over a LayerNorm) is written as its base value, as PEFT writes
it; the import trains every parameter of each norm the file holds, as PEFT does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft._paths import leaves_with_paths
from jaxpeft._select import Layout, LayoutEntry, TargetSpec
from jaxpeft.hf import _saved
from jaxpeft.hf import codec as hfc
from jaxpeft.methods.leaf import ALL, LeafConfig, LeafDelta, vector_leaves
from jaxpeft.protocol import adapter_items, check_fits

__all__ = ["LNTuningConfig"]


@dataclasses.dataclass(frozen=True)
class LNTuningConfig(LeafConfig):
    """LayerNorm tuning (HF PEFT's ``LNTuningConfig``): train the scale and bias of the selected norm layers.

    A norm layer is a module with a ``scale`` and no kernel (``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm`` and
    their NNX twins); each of its ``scale``/``bias`` leaves gets a zero delta, so the model is unchanged at init
    and a merged model is exactly the tuned one (PEFT trains a copy of the layer; the function is the same).

    Args:
      targets: ``"all"`` (every norm layer), module names as HF's ``target_modules`` (``["input_layernorm",
        "post_attention_layernorm", "norm"]``: every norm whose path ends with a name), a regex over leaf paths
        (``r"ln_f/scale$"``) or a predicate ``fn(path, leaf) -> bool``.
      exclude: the same forms but ``"all"``.
      dtype: dtype of the deltas (float32 by default).

    References:
      Zhao et al., "Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM Finetuning", ICLR 2024.
    """

    method: ClassVar[str] = "ln_tuning"
    _kinds: ClassVar[tuple[str, ...]] = ("norm",)
    _all_kinds: ClassVar[tuple[str, ...]] = ("norm",)
    _what: ClassVar[str] = "norm"

    targets: TargetSpec = ALL
    exclude: TargetSpec = ()
    dtype: str = "float32"


# ----------------------------------------------------------------------------------------------- PEFT codec

#: Flax norm leaf -> torch parameter name.
_TORCH = {"scale": "weight", "bias": "bias"}
_SUFFIXES = {f".ln_tuning_layers.{t}": t for t in _TORCH.values()}
_WHAT = "LN tuning norm parameters (<module>.ln_tuning_layers.weight / .bias)"


@dataclasses.dataclass(frozen=True)
class _Norm:
    """One norm module of ``params``: its torch parameters (torch name -> our leaf path), the layout of its leaves
    and its number of stacked layers (None when unstacked)."""

    module: str
    leaves: Mapping[str, str]
    layout: Layout
    n_layers: int | None

    @property
    def first(self) -> str:
        return next(iter(self.leaves.values()))


def _norms(params: Any, layouts: Mapping[str, LayoutEntry] | None) -> dict[str, _Norm]:
    """Every norm module of ``params`` (a ``scale`` and no kernel; ``jaxpeft.methods.leaf.vector_leaves``), by path."""
    found: dict[str, dict[str, str]] = {}
    info: dict[str, tuple[Layout, int | None]] = {}
    for path, cand in sorted(vector_leaves(params, layouts).items()):
        if cand.kind != "norm" or cand.layout is None:
            continue
        module, leaf = hfc.module_of(path)
        found.setdefault(module, {})[_TORCH[leaf]] = path
        info[module] = (cand.layout, int(cand.leaf.shape[0]) if cand.layout.stack else None)
    return {m: _Norm(m, leaves, *info[m]) for m, leaves in found.items()}


def _flat_concrete(params: Any, what: str) -> dict[str, Any]:
    """``params`` flattened by path, refused when empty or abstract (the norm values are needed, not just shapes)."""
    flat = dict(leaves_with_paths(params))
    if not flat:
        raise ValueError(
            f"`params` is {type(params).__name__} with no arrays; {what} needs the concrete base params (the norms' "
            "values), e.g. the params the adapters were trained over."
        )
    for path, leaf in flat.items():
        if not isinstance(leaf, (jax.Array, np.ndarray)):
            raise ValueError(
                f"`params` hold {path!r} as a {type(leaf).__name__}; an LN_TUNING file holds the tuned norm values "
                f"themselves (base + delta), so {what} needs the concrete base params, not their shapes "
                "(jax.eval_shape)."
            )
    return flat


def _host(x: Any, layer: int | None) -> np.ndarray:
    value = np.asarray(jax.device_get(x))
    return value if layer is None else value[layer]


# ----------------------------------------------------------------------------------------------- export


def _tuned_norms(
    adapters: Any, flat: Mapping[str, Any], layouts: Mapping[str, LayoutEntry] | None
) -> dict[str, dict[str, LeafDelta]]:
    """``{norm module path: {leaf name: node}}`` of the adapters, checked against ``params`` and ``layouts``."""
    given = dict(layouts or {})
    tuned: dict[str, dict[str, LeafDelta]] = {}
    for path, node in adapter_items(adapters):
        if not isinstance(node, LeafDelta) or node.layout.kind != "norm":
            kind = getattr(getattr(node, "layout", None), "kind", None)
            raise ValueError(
                f"adapter {path!r} is a {type(node).__name__} (layout kind {kind!r}); an LNTuningConfig exports "
                "LeafDelta nodes on norm leaves only. Pass the config the adapters were made with."
            )
        if path not in flat:
            raise ValueError(f"adapter {path!r} has no parameter in `params`; were the adapters made for this model?")
        check_fits(path, node, tuple(flat[path].shape))
        if isinstance(given.get(path), Layout) and given[path] != node.layout:
            raise ValueError(
                f"`layouts`[{path!r}]={given[path]} disagrees with the adapter's own layout {node.layout}."
            )
        if node.layout.stack > 1:
            raise ValueError(
                f"adapter {path!r} has {node.layout.stack} stack axes; HF modules are indexed by one layer axis. "
                "Unstack the extra axes first."
            )
        module, leaf = hfc.module_of(path)
        tuned.setdefault(module, {})[leaf] = node
    if not tuned:
        raise ValueError("`adapters` holds no LeafDelta; pass the tree jaxpeft.init made with the LNTuningConfig.")
    return tuned


def _to_hf(req: hfc.Export) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The HF config and tensors of LN-tuning adapters: each tuned norm's parameters, ``base + delta``.

    Every parameter (``scale`` -> ``weight``, ``bias``) of a norm with an adapter is written, the untuned ones as
    their base values, so PEFT's ``from_pretrained`` finds every key it expects.
    """
    adapters, params, module_name, layouts = req.adapters, req.params, req.module_name, req.layouts
    assert module_name is not None
    flat = _flat_concrete(params, "exporting LN tuning")
    norms = _norms(params, layouts)
    tensors: dict[str, np.ndarray] = {}
    owner: dict[str, str] = {}
    for module, nodes in sorted(_tuned_norms(adapters, flat, layouts).items()):
        norm = norms.get(module)
        if norm is None:
            raise ValueError(
                f"the adapters of {module!r} sit on no norm layer of `params` (a module with a `scale` and no kernel)."
            )
        stack = next(iter(nodes.values())).layout.stack
        name = hfc.template(module_name, norm.first)
        if (hfc.LAYER in name) != (stack == 1):
            raise ValueError(
                f"`module_name` maps norm {module!r} ({stack} stack axes) to {name!r}: a scan-stacked norm needs "
                f"exactly one {hfc.LAYER} placeholder and an unstacked one none."
            )
        values = {}
        for torch_name, path in norm.leaves.items():
            node = nodes.get(hfc.module_of(path)[1])
            base = jnp.asarray(flat[path])
            values[torch_name] = _host(base if node is None else node.value(base), None)
        layers: list[int | None] = list(range(flat[norm.first].shape[0])) if stack else [None]
        for layer in layers:
            hf_name = name if layer is None else name.replace(hfc.LAYER, str(layer))
            if owner.setdefault(hf_name, module) != module:
                raise ValueError(
                    f"`module_name` maps both norms {owner[hf_name]!r} and {module!r} to HF module {hf_name!r}; each "
                    "tuned norm needs its own HF module name."
                )
            for torch_name, value in values.items():
                piece = value if layer is None else value[layer]
                tensors[f"{hfc.PREFIX}{hf_name}.ln_tuning_layers.{torch_name}"] = np.ascontiguousarray(piece)
    universe = _saved.module_universe(params, module_name)
    config = {
        "auto_mapping": None,
        "exclude_modules": None,
        "inference_mode": True,
        "modules_to_save": None,
        "peft_type": "LN_TUNING",
        "revision": None,
        "target_modules": hfc.target_modules_for(owner, universe, req.target_modules),
    }
    return config, tensors


# ----------------------------------------------------------------------------------------------- import


def _index(norms: Mapping[str, _Norm], module_name: Any) -> dict[str, tuple[_Norm, int | None]]:
    """``{HF module name: (norm, layer index or None)}`` for every norm ``module_name`` names."""
    out: dict[str, tuple[_Norm, int | None]] = {}
    for norm in norms.values():
        try:
            name = hfc.template(module_name, norm.first)
        except (ValueError, KeyError, TypeError):  # a norm module_name does not name: not an HF module
            continue
        if hfc.LAYER not in name:
            out[name] = (norm, None)
        elif norm.layout.stack == 1 and norm.n_layers is not None:
            out.update({name.replace(hfc.LAYER, str(i)): (norm, i) for i in range(norm.n_layers)})
    return out


def _check_modules(
    modules: Mapping[str, Mapping[str, Any]],
    index: Mapping[str, tuple[_Norm, int | None]],
    universe: Mapping[str, list[tuple[str, tuple[int, ...]]]],
) -> None:
    """Refuse a file module that is no norm of ``params``, or that lacks or adds parameters of its norm."""
    for name in sorted(modules):
        parts = modules[name]
        if "w" in parts:
            raise ValueError(
                f"the adapter file holds tensors that are not {_WHAT}: {name + '.base_layer.weight'!r}; is this an "
                "LN_TUNING file?"
            )
        if name not in index:
            leaves = sorted({leaf for leaf, _ in universe.get(name, [])})
            if leaves:
                raise ValueError(
                    f"the adapter file tunes HF module {name!r}, which in `params` is not a norm layer (its leaves: "
                    f"{hfc.listed(leaves)}); jaxpeft.LNTuningConfig tunes norm layers only (a module with a `scale` "
                    "and no kernel). PEFT's LN tuning trains a copy of any module it targets; share such a module as "
                    "PEFT `modules_to_save` instead, or fix `module_name`."
                )
            raise ValueError(
                f"HF module {name!r} matches no norm of `params` through `module_name` (it maps this model's norms "
                f"to e.g. {hfc.listed(list(index)[:3]) or 'nothing'}); fix `module_name` or pass the params of the "
                "adapter's base model."
            )
        norm, _ = index[name]
        missing, extra = sorted(set(norm.leaves) - set(parts)), sorted(set(parts) - set(norm.leaves))
        if missing or extra:
            raise ValueError(
                f"the adapter file holds {hfc.listed(parts)} for HF module {name!r}, but its norm {norm.module!r} in "
                f"`params` has the torch parameters {hfc.listed(norm.leaves)}; PEFT saves every parameter of a tuned "
                "module. Does the file belong to this base model?"
            )


def _from_hf(req: hfc.Import) -> tuple[LNTuningConfig, dict[str, Any]]:
    """An ``LNTuningConfig`` and adapter tree from a PEFT ``LN_TUNING`` adapter: deltas ``saved - base``."""
    params, module_name, base_weights, dtype = req.params, req.module_name, req.base_weights, req.dtype
    assert module_name is not None
    selection = hfc.read_selection(req.config, layers=False)  # PEFT's LNTuningConfig has no layers_to_transform
    if base_weights not in ("check", "ignore"):
        raise ValueError(f"`base_weights`={base_weights!r}; expected 'check' or 'ignore'.")
    modules = hfc.split_keys(req.tensors, _SUFFIXES, _WHAT)
    flat = _flat_concrete(params, "importing LN tuning")
    norms = _norms(params, req.layouts)
    index = _index(norms, module_name)
    _check_modules(modules, index, _saved.module_universe(params, module_name))
    # A selected norm without tensors keeps PEFT's copy of the base norm: the identity, left unadapted here.
    hfc.check_selection(selection, list(modules), list(index), True, "target_modules")
    if not modules:
        raise ValueError("the adapter file holds no LN tuning tensors.")
    deltas: dict[str, dict[int | None, np.ndarray]] = {}
    for name, parts in modules.items():
        norm, layer = index[name]
        for torch_name, tensor in parts.items():
            path = norm.leaves[torch_name]
            base = _host(flat[path], layer)
            saved = np.asarray(tensor)
            if saved.shape != base.shape:
                raise ValueError(
                    f"the adapter file's {name}.ln_tuning_layers.{torch_name} has shape {saved.shape}, but "
                    f"{path!r} holds {base.shape} per module; does the file belong to this base model?"
                )
            deltas.setdefault(path, {})[layer] = saved.astype(np.float32) - base.astype(np.float32)
    arrays, used_layouts = {}, {}
    for path, layers in sorted(deltas.items()):
        if None in layers:
            arrays[path] = {"delta": layers[None]}
        else:
            n_layers = flat[path].shape[0]
            missing = sorted(set(range(n_layers)) - set(layers))
            if missing:
                raise ValueError(
                    f"the adapter file tunes the norm {path!r} of {n_layers} stacked layers, but not in layers "
                    f"{missing}; a jaxpeft stack needs every layer. Tune every layer's norm, or unstack the model."
                )
            arrays[path] = {"delta": np.stack([layers[i] for i in range(n_layers)])}
        used_layouts[path] = norms[hfc.module_of(path)[0]].layout
    try:
        dtype_name = "float32" if dtype is None else jnp.dtype(dtype).name
    except TypeError:
        raise ValueError(f"`dtype`={dtype!r} is not a dtype; use e.g. 'float32'.") from None
    cfg = LNTuningConfig(targets=hfc.exact_paths(arrays), dtype=dtype_name)
    return cfg, hfc.build_adapters(cfg, params, used_layouts, arrays)


LNTuningConfig.codec = hfc.PeftCodec(
    "LN_TUNING",
    "LNTuningConfig",
    hfc.FieldTable(("peft_type", "target_modules", "exclude_modules"), dict(hfc.HARMLESS_COMMON), hfc.REFUSED_SAVED),
    _to_hf,
    _from_hf,
    tensor_parts=frozenset(("ln_tuning_layers",)),
)
