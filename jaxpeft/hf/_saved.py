"""PEFT's ``modules_to_save``: whole trained modules (a classifier head, norms) saved beside the adapters, both ways.

What PEFT 0.21.2 does, and so what these files mean: it wraps every torch module whose name ends with an entry of
``modules_to_save`` (a bare ``str.endswith``, so ``"classifier"`` also selects ``"head.classifier"``) in a
``ModulesToSaveWrapper`` that runs a trained copy; ``save_pretrained`` writes that copy's whole ``state_dict`` as
``base_model.model.<module>.<param>`` (``base_model.model.classifier.weight``: the in-memory
``.modules_to_save.default.`` infix is dropped) and ``from_pretrained`` needs every one of those keys back (a missing
one is a ``KeyError``). No adapter is injected into or under such a module. ``task_type`` ``SEQ_CLS`` and
``TOKEN_CLS`` add ``"classifier"`` and ``"score"`` to the list when the model is loaded, ``QUESTION_ANS``
``"qa_outputs"``.

jaxpeft gives each such module as a tree of Flax-named arrays: a ``Dense`` ``kernel`` ``[in, out]`` is torch's
``weight`` ``[out, in]``; an ``Embed`` ``embedding`` and a norm's ``scale`` are ``weight`` as they are; ``bias`` is
``bias``; a leaf already called ``weight`` is taken in torch layout, unchanged. Nested dicts are submodules:
``{"dense": {"kernel": ...}}`` under ``"head"`` is ``head.dense.weight``. Anything else is refused by name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft._paths import leaves_with_paths, map_with_paths
from jaxpeft.hf._common import LAYER, PREFIX, TORCH_NAME, check_tensors, module_of, template
from jaxpeft.hf._config import CONFIG_NAME, listed

#: The modules PEFT adds to ``modules_to_save`` when it loads an adapter of these task types.
TASK_MODULES = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}
_TORCH_LEAF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias", "weight": "weight"}
_NDIM = {"kernel": 2, "embedding": 2, "scale": 1, "bias": 1}
_LEAVES = (
    "Flax `kernel` (a 2-D Dense kernel [in, out]), `embedding`, `scale` and `bias`, or `weight` already in torch layout"
)


def _torch_key(path: str, what: str) -> tuple[str, str]:
    """``(torch key relative to the module, Flax leaf name)`` of a leaf path in a saved module's tree."""
    sub, leaf = module_of(path)
    if leaf not in _TORCH_LEAF:
        raise ValueError(
            f"{what} has a leaf {path!r}; jaxpeft converts the leaves {_LEAVES}. Rename it, or give that array in "
            "torch layout under the name `weight`."
        )
    if sub and not TORCH_NAME.fullmatch(sub.replace("/", ".")):
        raise ValueError(
            f"{what} has a leaf {path!r}: {sub!r} is not a torch submodule name (letters, digits and underscores)."
        )
    return ".".join(p for p in (sub.replace("/", "."), _TORCH_LEAF[leaf]) if p), leaf


def _tree_leaves(tree: Any, what: str) -> list[tuple[str, Any]]:
    if not isinstance(tree, Mapping):
        raise TypeError(
            f"{what} is a {type(tree).__name__}; expected the module's parameter tree, e.g. "
            "{'kernel': [in, out], 'bias': [out]}."
        )
    leaves = leaves_with_paths(tree)
    if not leaves:
        raise ValueError(f"{what} holds no arrays; pass the module's trained parameters.")
    for path, leaf in leaves:
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise TypeError(f"{what} leaf {path!r} is a {type(leaf).__name__}; expected an array.")
    return leaves


def _names(entries: Iterable[Any], what: str) -> list[str]:
    names = []
    for name in entries:
        if not isinstance(name, str) or not TORCH_NAME.fullmatch(name):
            raise ValueError(
                f"{what} {name!r} is not a torch module name: expected names of letters, digits and underscores "
                "joined by single dots, as PEFT names the module, e.g. 'classifier' or 'bert.pooler.dense'."
            )
        names.append(name)
    return names


def module_universe(params: Any, module_name: Callable[[str], str]) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """``{HF module name: [(Flax leaf name, per-module shape), ...]}`` for every module of ``params`` that
    ``module_name`` names (``{layer}`` stacks expanded), with every dotted ancestor present (empty list)."""
    out: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for path, leaf in leaves_with_paths(params):
        shape = tuple(getattr(leaf, "shape", ()))
        try:
            name = template(module_name, path)
        except (ValueError, KeyError, TypeError):  # a module module_name does not name
            continue
        stacked = LAYER in name and len(shape) > 0
        for layer in range(shape[0]) if stacked else [None]:
            hf_name = name if layer is None else name.replace(LAYER, str(layer))
            out.setdefault(hf_name, []).append((module_of(path)[1], shape[1:] if stacked else shape))
            parts = hf_name.split(".")
            for i in range(1, len(parts)):
                out.setdefault(".".join(parts[:i]), [])
    return out


def _excluded(entry: str, name: str) -> bool:
    """PEFT's rule that keeps adapters off ``modules_to_save`` modules (``check_target_module_exists``)."""
    return re.match(rf"(^|.*\.){entry}($|\..*)", name) is not None


def _check_selected(
    saved: Iterable[str], entries: Mapping[str, str], universe: Iterable[str], why_missing: Callable[[str, str], str]
) -> None:
    """Refuse when PEFT would wrap a module of ``universe`` (``name.endswith(entry)``) that ``saved`` lacks.

    ``entries`` maps each entry to where it comes from (for the message).
    """
    saved = set(saved)
    for name in sorted(universe):
        if name in saved or any(name.startswith(s + ".") for s in saved):
            continue
        entry = next((e for e in entries if name.endswith(e)), None)
        if entry is not None:
            raise ValueError(why_missing(name, entry))


# ----------------------------------------------------------------------------------------------- export


def to_hf(
    modules: Any,
    adapter_tensors: Mapping[str, Any],
    universe: Mapping[str, list[tuple[str, tuple[int, ...]]]],
    task_type: str | None,
    parts: frozenset[str],
) -> tuple[list[str], dict[str, np.ndarray]]:
    """``(modules_to_save names, tensors)`` of the trained modules ``{HF module name: Flax tree}``, checked.

    ``adapter_tensors`` are the method's tensors (their module names must stay out of every saved module),
    ``universe`` the modules of the base params (:func:`module_universe`), ``parts`` the key components of every
    method's tensors (the codecs' ``tensor_parts``).
    """
    if not isinstance(modules, Mapping):
        raise TypeError(
            f"`modules_to_save` is a {type(modules).__name__}; expected {{HF module name: its trained parameter "
            "tree}, e.g. {'classifier': {'kernel': ..., 'bias': ...}}."
        )
    names = _names(modules, "`modules_to_save` key")
    for a in names:
        for b in names:
            if b.startswith(a + "."):
                raise ValueError(f"`modules_to_save` names {a!r} and {b!r} inside it; give the outer module only.")
    adapted = sorted({_adapted_module(k, parts) for k in adapter_tensors})
    for name in names:
        inside = [m for m in adapted if _excluded(name, m)]
        if inside:
            raise ValueError(
                f"`modules_to_save` module {name!r} would hold the adapted modules {listed(inside)}: PEFT adapts no "
                "module inside (or named like) a module to save, so it would drop those adapters. Leave them out of "
                "the adapter `targets`, or save the whole module instead."
            )
    tensors: dict[str, np.ndarray] = {}
    for name in sorted(names):
        what = f"`modules_to_save`[{name!r}]"
        ours: dict[str, np.ndarray] = {}
        for path, leaf in _tree_leaves(modules[name], what):
            key, flax_leaf = _torch_key(path, what)
            value = np.asarray(jax.device_get(leaf))
            if flax_leaf in _NDIM and value.ndim != _NDIM[flax_leaf]:
                raise ValueError(
                    f"{what} leaf {path!r} has shape {value.shape}; a `{flax_leaf}` converts to torch only with "
                    f"{_NDIM[flax_leaf]} dimension(s). Give the array in torch layout under the name `weight` instead."
                )
            if key in ours:
                raise ValueError(f"{what} has two leaves for torch parameter {name}.{key}; keep one.")
            ours[key] = np.ascontiguousarray(value.T if flax_leaf == "kernel" else value)
        _check_against_params(name, ours, universe)
        tensors.update({f"{PREFIX}{name}.{k}": v for k, v in check_tensors(ours).items()})
    entries = {n: "modules_to_save" for n in names}
    entries.update({m: f"task_type={task_type!r}" for m in TASK_MODULES.get(task_type or "", ()) if m not in entries})

    def why_missing(module: str, entry: str) -> str:
        if entries[entry] != "modules_to_save":
            return (
                f"`task_type`={task_type!r} makes PEFT treat modules named like {entry!r} as modules to save, so it "
                f"would wrap HF module {module!r} of `params` and fail to load the adapter without its weights. Pass "
                f"`modules_to_save={{{module!r}: <its trained tree>}}`, or another `task_type`."
            )
        return (
            f"PEFT selects modules to save by name suffix (`str.endswith`), so `modules_to_save` entry {entry!r} "
            f"would also wrap HF module {module!r} of `params`, and loading would fail without its weights. Name the "
            "module so that no other module's name ends with it, or save that one too."
        )

    _check_selected(names, entries, list(universe) + adapted, why_missing)
    return sorted(names), tensors


def _adapted_module(key: str, adapter_parts: frozenset[str]) -> str:
    """The HF module of an adapter tensor key (``...q_proj.lora_A.weight`` -> ``...q_proj``)."""
    parts = key.removeprefix(PREFIX).split(".")
    cut = next((i for i, p in enumerate(parts) if p in adapter_parts), len(parts) - 1)
    return ".".join(parts[:cut])


def _check_against_params(
    name: str, tensors: Mapping[str, np.ndarray], universe: Mapping[str, list[tuple[str, tuple[int, ...]]]]
) -> None:
    """When ``params`` hold module ``name``, the saved tensors must be exactly its parameters, in its shapes."""
    expected: dict[str, tuple[int, ...]] = {}
    for module, leaves in universe.items():
        if module != name and not module.startswith(name + "."):
            continue
        sub = module[len(name) + 1 :]
        for leaf, shape in leaves:
            if leaf in _TORCH_LEAF:
                key = ".".join(p for p in (sub, _TORCH_LEAF[leaf]) if p)
                expected[key] = shape[::-1] if leaf == "kernel" and len(shape) == 2 else shape
    if not expected:
        return
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        raise ValueError(
            f"`modules_to_save`[{name!r}] gives torch parameters {_shapes(got)}, but `params` hold that module with "
            f"{_shapes(expected)}; PEFT loads the whole module, so pass its complete trained tree."
        )


def _shapes(table: Mapping[str, tuple[int, ...]]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in sorted(table.items())) + "}"


# ----------------------------------------------------------------------------------------------- import


def read_entries(config: Mapping[str, Any]) -> dict[str, str]:
    """``{entry: where from}``: the file's ``modules_to_save`` and those its ``task_type`` adds when PEFT loads it."""
    value = config.get("modules_to_save")
    if value is None:
        value = []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(
            f"{CONFIG_NAME} has `modules_to_save`={value!r:.80}; expected a list of module names, e.g. ['classifier']."
        )
    entries = dict.fromkeys(value, "modules_to_save")
    task = config.get("task_type")
    for name in TASK_MODULES.get(task if isinstance(task, str) else "", ()):
        entries.setdefault(name, f"task_type={task!r}")
    return entries


def split(
    entries: Mapping[str, str], tensors: Mapping[str, Any], parts: frozenset[str]
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """``({saved module: {torch key: tensor}}, other tensors)``: the tensors PEFT loads into modules to save.

    A tensor belongs to the outermost module of its key that ends with an entry (PEFT's ``str.endswith``).
    Adapter tensors (a key component in ``parts``) inside such a module, and modules to save inside one another,
    are refused.
    """
    strip = all(k.startswith(PREFIX) for k in tensors)
    groups: dict[str, dict[str, Any]] = {}
    rest: dict[str, Any] = {}
    for key, value in tensors.items():
        pieces = (key[len(PREFIX) :] if strip else key).split(".")
        owners = [
            ".".join(pieces[:i])
            for i in range(1, len(pieces))
            if any(".".join(pieces[:i]).endswith(e) for e in entries)
        ]
        if not owners:
            rest[key] = value
            continue
        owner, inner = owners[0], pieces[owners[0].count(".") + 1 :]
        if parts.intersection(inner):
            raise ValueError(
                f"the adapter file holds adapter tensor {key!r} inside {owner!r}, a module to save by {CONFIG_NAME}'s "
                f"`modules_to_save`/`task_type` ({listed(entries)}); PEFT adapts no module inside one it saves, so "
                "it would ignore that tensor. Fix the config or delete the tensor."
            )
        if len(owners) > 1:
            raise ValueError(
                f"the adapter file's tensor {key!r} lies in modules to save {owners[0]!r} and {owners[1]!r} nested in "
                "one another; jaxpeft imports one module to save per tensor."
            )
        groups.setdefault(owner, {})[".".join(inner)] = value
    return groups, rest


def from_hf(
    groups: Mapping[str, Mapping[str, Any]],
    entries: Mapping[str, str],
    like: Any,
    universe: Mapping[str, Any],
) -> dict[str, Any]:
    """``{module: tree}`` shaped like ``like``'s trees from the file's saved modules (``groups``), checked."""
    found = {n: sorted(g) for n, g in groups.items()}

    def why_missing(module: str, entry: str) -> str:
        return (
            f"{CONFIG_NAME} (`{entries[entry]}`, entry {entry!r}) makes PEFT wrap HF module {module!r} of `params` as "
            "a module to save, but the file holds no tensors for it; PEFT's from_pretrained fails on such a file "
            "(KeyError). Add its tensors or fix `modules_to_save`."
        )

    _check_selected(groups, entries, universe, why_missing)
    if like is None:
        if groups:
            example = next(iter(sorted(groups)))
            raise ValueError(
                f"the adapter file holds fully trained modules (`modules_to_save`): "
                f"{', '.join(f'{n!r} ({listed(k)})' for n, k in sorted(found.items()))}. Pass "
                f"`modules_to_save={{{example!r}: <a tree like it, e.g. {{'kernel': ..., 'bias': ...}} or its "
                "jax.eval_shape>}` to import them too (a third result)."
            )
        return {}
    if not isinstance(like, Mapping):
        raise TypeError(
            f"`modules_to_save` is a {type(like).__name__}; expected {{HF module name: a tree like the saved module}}."
        )
    names = _names(like, "`modules_to_save` key")
    missing = sorted(set(names) - set(groups))
    if missing:
        raise ValueError(
            f"`modules_to_save` asks for {listed(missing)}, but the adapter file saves "
            f"{listed(groups) if groups else 'no module'}."
        )
    extra = sorted(set(groups) - set(names))
    if extra:
        each = "them to `modules_to_save`, each" if len(extra) > 1 else "it to `modules_to_save`"
        raise ValueError(
            f"the adapter file also saves {listed(extra)} ({CONFIG_NAME}'s `modules_to_save`); add {each} with a "
            "tree like it."
        )
    return {name: _restore(name, groups[name], like[name]) for name in names}


def _restore(name: str, group: Mapping[str, Any], like: Any) -> Any:
    what = f"`modules_to_save`[{name!r}]"
    tensors = check_tensors(group)
    used: set[str] = set()

    def convert(path: str, leaf: Any) -> jax.Array:
        key, flax_leaf = _torch_key(path, what)
        if key not in tensors:
            raise ValueError(
                f"{what} has {path!r}, but the adapter file has no tensor {name}.{key} (it holds {listed(tensors)})."
            )
        value = tensors[key]
        want = tuple(leaf.shape)[::-1] if flax_leaf == "kernel" and len(leaf.shape) == 2 else tuple(leaf.shape)
        if flax_leaf in _NDIM and len(leaf.shape) != _NDIM[flax_leaf]:
            raise ValueError(
                f"{what} leaf {path!r} has shape {tuple(leaf.shape)}; a `{flax_leaf}` converts from torch only with "
                f"{_NDIM[flax_leaf]} dimension(s)."
            )
        if value.shape != want:
            raise ValueError(
                f"the adapter file's {name}.{key} has shape {value.shape}; {what} leaf {path!r} of shape "
                f"{tuple(leaf.shape)} needs {want}. Does the file belong to this model?"
            )
        used.add(key)
        return jnp.asarray(value.T if flax_leaf == "kernel" else value, leaf.dtype)

    _tree_leaves(like, what)
    out = map_with_paths(convert, like)
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(
            f"the adapter file's module to save {name!r} also holds {listed(unused)}, which {what} lacks; PEFT "
            "loads the whole module, so give a tree with every parameter."
        )
    return out
