"""What every HF PEFT codec shares: module names, HF's matching rules, per-layer targets, tensor checks, and the
export and import loops of methods whose tensors live on HF modules (``write_modules``, ``read_groups``)."""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft._paths import leaves_with_paths, set_path
from jaxpeft._select import WEIGHT_NAMES, Layout
from jaxpeft.api import plan
from jaxpeft.hf._codec import Export, Import
from jaxpeft.hf._config import Selection, check_selection, hf_pattern_match, listed
from jaxpeft.hf._files import WEIGHTS_NAME
from jaxpeft.protocol import Adapter, MethodConfig, adapter_items, array_fields, check_fits

#: Placeholder for the layer index of a scan-stacked parameter in a module-name template.
LAYER = "{layer}"
PREFIX = "base_model.model."
#: The key suffix of the base weight copy PEFT saves for an embedding it adapts.
BASE_SUFFIX = ".base_layer.weight"
ModuleName = Callable[[str], str] | Mapping[str, str]


def number(x: float) -> int | float:
    """``x`` as JSON writes it in HF configs: ``8`` rather than ``8.0``."""
    return int(x) if float(x).is_integer() else float(x)


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


def as_fn(module_name: ModuleName) -> Callable[[str], str]:
    """``module_name`` as a function (a dict becomes a lookup that names the missing module)."""
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


def module_of(path: str) -> tuple[str, str]:
    """``(module path, leaf name)`` of a parameter path."""
    module, _, leaf = path.rpartition("/")
    return module, leaf


# A torch module path: dot-separated names of letters, digits and underscores (ModuleList indexes are digits).
TORCH_NAME = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")


def check_hf_name(name: Any, what: str) -> str:
    """``name`` when it is a torch module path (``{layer}`` allowed where ``what`` says so); else refuse it."""
    if not isinstance(name, str):
        raise TypeError(
            f"{what} is {name!r} ({type(name).__name__}); expected a dotted HF module name such as "
            "'model.layers.0.self_attn.q_proj'."
        )
    if name.count(LAYER) > 1:
        raise ValueError(f"{what} is {name!r}; use at most one {LAYER} placeholder.")
    if not TORCH_NAME.fullmatch(name.replace(LAYER, "0")):
        raise ValueError(
            f"{what} is {name!r}, which is not a torch module path: expected names of letters, digits and underscores "
            "joined by single dots (e.g. 'model.layers.{layer}.self_attn.q_proj'), with no empty part, '..', '/', "
            "space or other character. Fix `module_name`."
        )
    return name


def template(module_name: Callable[[str], str], path: str) -> str:
    """The HF module-name template of the parameter at ``path`` (at most one ``{layer}``), checked."""
    module, _ = module_of(path)
    return check_hf_name(module_name(module), f"`module_name`({module!r})")


def hf_modules(params: Any, module_name: Callable[[str], str]) -> dict[str, tuple[str, int | None]]:
    """``{hf module name: (our weight path, layer index or None)}`` for every weight leaf the mapping accepts."""
    out: dict[str, tuple[str, int | None]] = {}
    for path, leaf in leaves_with_paths(params):
        shape = tuple(getattr(leaf, "shape", ()))
        if module_of(path)[1] not in WEIGHT_NAMES or len(shape) < 2:
            continue
        try:
            name = template(module_name, path)
        except (ValueError, KeyError, TypeError):  # a weight module_name does not name: not an HF module
            continue
        layers: list[int | None] = list(range(shape[0])) if LAYER in name else [None]
        for layer in layers:
            hf_name = name if layer is None else name.replace(LAYER, str(layer))
            if hf_name in out and out[hf_name][0] != path:
                raise ValueError(
                    f"`module_name` maps both {out[hf_name][0]!r} and {path!r} to HF module {hf_name!r}; each "
                    "adapted weight needs its own HF module name."
                )
            out[hf_name] = (path, layer)
    return out


# ----------------------------------------------------------------------------------------------- HF matching


def hf_pattern_key(patterns: Sequence[str], name: str) -> str | None:
    """The first ``rank_pattern``/``alpha_pattern`` key that HF PEFT would apply to module ``name``."""
    return next((key for key in patterns if hf_pattern_match(key, name)), None)


def hf_targets(target_modules: str | Sequence[str], name: str) -> bool:
    """Whether HF PEFT's ``target_modules`` selects module ``name`` (list: suffix match; str: full regex)."""
    spec = target_modules if isinstance(target_modules, str) else tuple(target_modules)
    return Selection(spec).selects(name)


def short_names(names: Iterable[str], universe: Iterable[str], rule: Callable[[Sequence[str], str], bool]) -> list[str]:
    """The last components of ``names`` when ``rule`` with them selects exactly ``names`` in ``universe``; else []."""
    names = set(names)
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    selected = {n for n in set(universe) | names if rule(short, n)}
    return short if selected == names else []


def target_modules_for(
    names: Iterable[str], universe: Iterable[str], override: str | Sequence[str] | None
) -> str | list[str]:
    """HF ``target_modules`` selecting exactly ``names``: short names when exact, else full names; or ``override``
    after checking that it selects every one of ``names``."""
    names = sorted(names)
    if override is None:
        return short_names(names, universe, hf_targets) or names
    if isinstance(override, str):
        try:
            re.compile(override)
        except re.error as err:
            raise ValueError(f"`target_modules`={override!r} is not a valid regular expression: {err}.") from None
        targets: str | list[str] = override
    elif isinstance(override, Sequence) and override and all(isinstance(t, str) for t in override):
        targets = list(override)
    else:
        raise TypeError(f"`target_modules`={override!r}; expected a regex string or a non-empty list of module names.")
    missed = [n for n in names if not hf_targets(targets, n)]
    if missed:
        raise ValueError(
            f"`target_modules`={override!r} does not select the exported modules {listed(missed)}; "
            "HF PEFT would not load their weights."
        )
    return targets


# ----------------------------------------------------------------------------------------------- export


def hf_kind(layout: Layout) -> str:
    """The HF layer type of an adapted weight: ``"conv"``, ``"embed"`` or ``"linear"`` (dense, DenseGeneral, einsum)."""
    return layout.kind if layout.kind in ("conv", "embed") else "linear"


@dataclasses.dataclass(frozen=True)
class Target:
    """One exported adapter: where it sits, its node (arrays fetched to numpy once), the weight's shape and its HF
    module-name template."""

    path: str
    node: Any
    shape: tuple[int, ...]
    template: str
    arrays: Mapping[str, np.ndarray]

    @property
    def layout(self) -> Layout:
        return self.node.layout

    @property
    def kind(self) -> str:
        return hf_kind(self.node.layout)

    @property
    def n_layers(self) -> int | None:
        return self.shape[0] if self.layout.stack else None

    def layers(self) -> list[tuple[str, int | None]]:
        """``(HF module name, layer index or None)`` of each HF module this adapter is written as."""
        if self.n_layers is None:
            return [(self.template, None)]
        return [(self.template.replace(LAYER, str(i)), i) for i in range(self.n_layers)]

    def array(self, field: str, layer: int | None) -> np.ndarray:
        """The node's array ``field``, sliced at ``layer`` (the whole array when None)."""
        value = self.arrays[field]
        return value if layer is None else value[layer]


def _host_arrays(node: Adapter) -> dict[str, np.ndarray]:
    fields = [f for f in array_fields(node) if getattr(node, f) is not None]
    return {k: np.asarray(v) for k, v in jax.device_get({k: getattr(node, k) for k in fields}).items()}


def _check_layout(path: str, node: Adapter, layout: Any) -> None:
    lay = node.layout
    if isinstance(layout, Layout) and (layout.stack, layout.fan_in, layout.fan_out, layout.kind) != (
        lay.stack,
        lay.fan_in,
        lay.fan_out,
        lay.kind,
    ):
        raise ValueError(f"`layouts`[{path!r}]={layout} disagrees with the adapter's own layout {lay}.")
    if lay.stack > 1:
        raise ValueError(
            f"adapter {path!r} has {lay.stack} stack axes; HF modules are indexed by one layer axis. "
            "Unstack the extra axes first."
        )


def export_targets(
    adapters: Any,
    node_type: type[Adapter],
    cfg: MethodConfig,
    params: Any,
    module_name: Callable[[str], str],
    layouts: Mapping[str, Layout] | None,
) -> list[Target]:
    """The adapters as export targets, checked: all ``node_type`` (a subclass too), fitting ``params``, named one HF
    module each."""
    shapes = {p: tuple(leaf.shape) for p, leaf in leaves_with_paths(params)}
    layouts = dict(layouts or {})
    targets: list[Target] = []
    owner: dict[str, str] = {}
    for path, node in adapter_items(adapters):
        if not isinstance(node, node_type):
            raise ValueError(
                f"adapter {path!r} is a {type(node).__name__}; a {type(cfg).__name__} exports {node_type.__name__} "
                "only. Pass the config the adapters were made with."
            )
        if path not in shapes:
            raise ValueError(f"adapter {path!r} has no parameter in `params`; were the adapters made for this model?")
        check_fits(path, node, shapes[path])
        _check_layout(path, node, layouts.get(path))
        target = Target(path, node, shapes[path], template(module_name, path), _host_arrays(node))
        if (LAYER in target.template) != (node.layout.stack == 1):
            raise ValueError(
                f"`module_name` maps {path!r} (shape {target.shape}, {node.layout.stack} stack axes) to "
                f"{target.template!r}: a scan-stacked parameter needs exactly one {LAYER} placeholder and an "
                "unstacked one none."
            )
        for name, _ in target.layers():
            if owner.setdefault(name, path) != path:
                raise ValueError(
                    f"`module_name` maps both {owner[name]!r} and {path!r} to HF module {name!r}; each adapted "
                    "weight needs its own HF module name."
                )
        targets.append(target)
    if not targets:
        raise ValueError(f"`adapters` holds no {node_type.__name__}; pass the tree returned by jaxpeft.init.")
    return targets


def conv_vector(v: np.ndarray, layout: Layout) -> np.ndarray:
    """A per-channel vector ``(C,)`` as a torch ConvNd buffer ``(1, C, 1, ...)`` (one 1 per window axis)."""
    return np.reshape(v, (1, -1, *([1] * (layout.fan_in - 1))))


# ----------------------------------------------------------------------------------------------- import


_FLOATS = ("float16", "bfloat16", "float32", "float64")


def check_tensors(tensors: Any) -> dict[str, np.ndarray]:
    """``tensors`` as host arrays; refused unless string keys map to finite float16/bfloat16/float32/float64 arrays."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"`tensors` is a {type(tensors).__name__}; expected {{key: array}} as in {WEIGHTS_NAME}.")
    out = {}
    for key, value in tensors.items():
        if not isinstance(key, str):
            raise TypeError(f"adapter tensor key {key!r} is a {type(key).__name__}; safetensors keys are strings.")
        if not isinstance(value, (np.ndarray, np.generic, jax.Array)):
            raise TypeError(f"adapter tensor {key!r} is a {type(value).__name__}; expected a numpy or JAX array.")
        array = np.asarray(jax.device_get(value))
        if array.dtype.name not in _FLOATS:
            raise ValueError(
                f"adapter tensor {key!r} has dtype {array.dtype.name}; adapter tensors are float16, bfloat16, "
                "float32 or float64. Is this the adapter of a float model?"
            )
        if not np.all(np.isfinite(array)):
            raise ValueError(
                f"adapter tensor {key!r} holds NaN or infinite values; an adapter that can run is finite (did "
                "training diverge?). Export it again from a good step."
            )
        out[key] = array
    return out


def split_keys(tensors: Mapping[str, Any], suffixes: Mapping[str, str], what: str) -> dict[str, dict[str, Any]]:
    """``{hf module: {part: tensor}}`` from safetensors keys, by key suffix (longest first); ``"w"`` is the base
    weight copy. Keys with no known suffix are refused, naming ``what`` the method imports."""
    strip = all(k.startswith(PREFIX) for k in tensors)
    table = sorted({**suffixes, BASE_SUFFIX: "w"}.items(), key=lambda kv: -len(kv[0]))
    modules: dict[str, dict[str, Any]] = {}
    unknown = []
    for key, value in tensors.items():
        name = key[len(PREFIX) :] if strip else key
        match = next(((s, part) for s, part in table if name.endswith(s)), None)
        if match is None or match[1] in modules.get(name[: -len(match[0])], {}):
            unknown.append(key)
            continue
        modules.setdefault(name[: -len(match[0])], {})[match[1]] = value
    if unknown:
        raise ValueError(f"the adapter file holds tensors that are not {what}: {listed(unknown)}.")
    return modules


def check_matched(modules: Mapping[str, Any], index: Mapping[str, tuple[str, int | None]]) -> None:
    """Raise when a HF module of the file has no parameter through ``module_name``."""
    unmatched = [n for n in modules if n not in index]
    if unmatched:
        raise ValueError(
            f"HF modules {listed(unmatched)} match no parameter through `module_name` (it maps this model's "
            f"weights to e.g. {listed(list(index)[:3])}); fix `module_name` or pass the params of the adapter's "
            "base model."
        )


def check_base_weight(
    name: str, w: np.ndarray, where: tuple[str, int | None], params_flat: Mapping[str, Any], policy: str
) -> None:
    """Check PEFT's saved copy of a base weight against ``params`` (``policy`` ``"check"`` or ``"ignore"``)."""
    if policy == "ignore":
        return
    path, layer = where
    ours = params_flat[path]
    if not isinstance(ours, (jax.Array, np.ndarray)):
        raise ValueError(
            f"the adapter file carries base weight {name + BASE_SUFFIX!r} (HF saves embeddings it adapts); "
            "`params` are abstract, so it cannot be checked. Pass concrete params, or `base_weights='ignore'` if "
            "that weight was neither trained nor resized."
        )
    ours = np.asarray(jax.device_get(ours if layer is None else ours[layer]), np.float32)
    theirs = np.asarray(w, np.float32)
    if module_of(path)[1] == "kernel":
        theirs = theirs.T
    tol = 4 * float(jnp.finfo(params_flat[path].dtype).eps) * max(1.0, float(np.max(np.abs(ours), initial=0.0)))
    if ours.shape != theirs.shape or not np.allclose(ours, theirs, rtol=0.0, atol=tol):
        raise ValueError(
            f"the adapter file carries base weight {name + BASE_SUFFIX!r} that differs from `params` at {path!r} "
            "(resized or trained in HF?). jaxpeft adapters hold only the adapter's own weights: load that weight "
            "into your params first, or pass `base_weights='ignore'` to skip the check."
        )


@dataclasses.dataclass(frozen=True)
class Group:
    """The HF modules of one of our parameters: one per layer of a ``{layer}`` stack, else one."""

    path: str
    shape: tuple[int, ...]
    stacked: bool
    modules: tuple[tuple[str, dict[str, Any]], ...]  # (HF name, {part: tensor}) in layer order

    @property
    def first(self) -> str:
        return self.modules[0][0]

    def stack(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """Per-module arrays (in ``modules`` order) as our array: stacked along a new leading axis if stacked."""
        return np.stack(arrays) if self.stacked else arrays[0]


def group_modules(
    modules: Mapping[str, dict[str, Any]],
    index: Mapping[str, tuple[str, int | None]],
    params: Any,
    base_weights: str,
) -> list[Group]:
    """The file's HF modules grouped by our parameter path (sorted), base weight copies checked and dropped.

    Raises when a module has no parameter, or a ``{layer}`` stack misses layers.
    """
    if base_weights not in ("check", "ignore"):
        raise ValueError(f"`base_weights`={base_weights!r}; expected 'check' or 'ignore'.")
    check_matched(modules, index)
    params_flat = dict(leaves_with_paths(params))
    by_path: dict[str, dict[int | None, tuple[str, dict[str, Any]]]] = {}
    for name, entry in modules.items():
        path, layer = index[name]
        if "w" in entry:
            check_base_weight(name, entry["w"], (path, layer), params_flat, base_weights)
        parts = {k: v for k, v in entry.items() if k != "w"}
        if parts:
            by_path.setdefault(path, {})[layer] = (name, parts)
    groups = []
    for path in sorted(by_path):
        layers, shape = by_path[path], tuple(params_flat[path].shape)
        stacked = None not in layers
        order: list[int | None] = [*sorted(i for i in layers if i is not None)] if stacked else [None]
        missing = sorted(set(range(shape[0])) - set(order)) if stacked else []
        if missing:
            raise ValueError(
                f"HF modules like {layers[order[0]][0]!r} stack into {path!r} ({shape[0]} layers), but the "
                f"file has no adapter for layers {missing}; a jaxpeft stack needs every layer."
            )
        groups.append(Group(path, shape, stacked, tuple(layers[i] for i in order)))
    return groups


def import_layout(group: Group, kind: str, layout: Layout | None) -> Layout:
    """The layout of ``group``'s weight: ``layout`` (checked against the file), or derived for 2-D kernels, convs
    and embeddings. ``kind`` is the HF layer type the file's tensors show (``linear``, ``conv`` or ``embed``)."""
    path, shape, stacked = group.path, group.shape, group.stacked
    per_layer = shape[1:] if stacked else shape
    if layout is None:
        if kind == "conv":
            if len(per_layer) < 3:
                raise ValueError(
                    f"HF module {group.first!r} holds Conv adapter weights but {path!r} of shape {shape} is not a "
                    "convolution kernel; fix `module_name` (or the file is not for this model)."
                )
            layout = Layout(stack=int(stacked), fan_in=len(per_layer) - 1, fan_out=1, kind="conv")
        elif len(per_layer) == 2:
            is_embed = kind == "embed" or module_of(path)[1] == "embedding"
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
    if kind != hf_kind(layout):
        raise ValueError(
            f"HF module {group.first!r} holds {kind} adapter weights but {path!r} is a {layout.kind} parameter; "
            "fix `module_name`."
        )
    return layout


def adapter_dtype(arrays: Iterable[np.ndarray], dtype: Any) -> str:
    """``dtype``'s name, or the one dtype of the file's arrays (float32 when they differ)."""
    if dtype is not None:
        try:
            return jnp.dtype(dtype).name
        except TypeError:
            raise ValueError(f"`dtype`={dtype!r} is not a dtype; use e.g. 'float32'.") from None
    dtypes = {np.dtype(a.dtype) for a in arrays}
    name = jnp.dtype(dtypes.pop() if len(dtypes) == 1 else jnp.float32).name
    if name == "float64" and not jax.config.read("jax_enable_x64"):
        raise ValueError(
            "the adapter file holds float64 tensors, which JAX without 64-bit mode would silently make float32; "
            "pass `dtype='float32'` to import them as float32 (or enable jax_enable_x64)."
        )
    return name


def exact_paths(paths: Iterable[str]) -> str:
    """An anchored regex selecting exactly ``paths`` (``re.search`` semantics)."""
    return "^(?:" + "|".join(re.escape(p) for p in sorted(paths)) + ")$"


def build_adapters(
    cfg: MethodConfig, params: Any, layouts: Mapping[str, Layout], arrays: Mapping[str, Mapping[str, np.ndarray]]
) -> dict[str, Any]:
    """The adapter tree of ``cfg`` over ``params`` with ``arrays[path][field]`` as each node's arrays.

    The nodes are ``jaxpeft.plan``'s (so scale, dropout, layout and other static fields are the config's), and
    every array must have the planned shape: the config reproduces exactly the imported adapters.
    """
    rows = {t.path: t for t in plan(cfg, params, layouts=layouts).targets}
    if set(rows) != set(arrays):  # pragma: no cover - internal consistency
        raise AssertionError(f"planned {sorted(rows)}, imported {sorted(arrays)}")
    dtype = jnp.dtype(getattr(cfg, "dtype", "float32"))
    tree: dict[str, Any] = {}
    for path, fields in sorted(arrays.items()):
        row = rows[path]
        built = {k: tuple(v.shape) for k, v in fields.items()}
        if built != row.shapes:  # pragma: no cover - internal consistency
            raise AssertionError(f"{path!r}: planned {row.shapes}, built {built}")
        node = dataclasses.replace(row.node, **{k: jnp.asarray(v, dtype) for k, v in fields.items()})
        tree = set_path(tree, path, node)
    return tree


# ----------------------------------------------------------------------------------------------- codec loops


def write_modules(
    req: Export,
    node_type: type[Adapter],
    tensors_of: Callable[[Target, int | None], Mapping[str, np.ndarray]],
    check: Callable[[Target], Any] = lambda target: None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The tensors of every adapted HF module and ``{HF module name: check(target)}``.

    ``tensors_of(target, layer)`` gives one HF module's ``{key suffix: array}`` (``layer`` indexes a ``{layer}``
    stack, None when unstacked); ``check`` validates a target against the config (raising) and returns what the
    codec's config fields need of it.
    """
    assert req.module_name is not None
    tensors: dict[str, np.ndarray] = {}
    names: dict[str, Any] = {}
    for target in export_targets(req.adapters, node_type, req.cfg, req.params, req.module_name, req.layouts):
        info = check(target)
        for name, layer in target.layers():
            names[name] = info
            for suffix, value in tensors_of(target, layer).items():
                tensors[f"{PREFIX}{name}{suffix}"] = np.ascontiguousarray(value)
    return tensors, names


def target_modules(req: Export, names: Iterable[str]) -> str | list[str]:
    """The ``target_modules`` that select exactly ``names`` among the HF modules of the params (or the override)."""
    assert req.module_name is not None
    return target_modules_for(names, hf_modules(req.params, req.module_name), req.target_modules)


def read_groups(
    req: Import,
    selection: Selection,
    suffixes: Mapping[str, str],
    what: str,
    identity_init: bool,
    init_field: str,
    tensors: Mapping[str, Any] | None = None,
) -> list[Group]:
    """The file's HF modules grouped by our parameter (the first steps of every module import), checked.

    The tensors (``req.tensors`` unless given) are split by key suffix, the modules they adapt checked against
    PEFT's selection (``selection``; ``identity_init``/``init_field`` say whether a selected module without
    tensors is PEFT's identity) and grouped per parameter; base weight copies are checked (``req.base_weights``).
    """
    assert req.module_name is not None
    index = hf_modules(req.params, req.module_name)
    modules = split_keys(req.tensors if tensors is None else tensors, suffixes, what)
    adapted = [n for n, entry in modules.items() if set(entry) != {"w"}]
    check_selection(selection, adapted, list(index), identity_init, init_field)
    groups = group_modules(modules, index, req.params, req.base_weights)
    if not groups:
        raise ValueError(f"the adapter file holds no {what}.")
    return groups


# ----------------------------------------------------------------------------------------------- ranks and alphas


@dataclasses.dataclass(frozen=True)
class Entry:
    """What a rank/alpha config needs to know about one exported adapter."""

    target: Target
    rank: int
    alpha: float


def check_rank_scale(target: Target, cfg: Any, rank: int, scale: float) -> Entry:
    """The target's rank and alpha under ``cfg`` (a ``RankFields`` config), after checking the node was made with it."""
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
    return Entry(target, rank, cfg.alpha_for(path))


def _default_value(values: list[Any], preferred: Any) -> Any:
    counts = collections.Counter(values)
    if preferred in counts:
        return preferred
    return max(sorted(counts), key=lambda v: counts[v])


def _patterns(names: Mapping[str, Entry], attr: str, default: Any) -> dict[str, int | float]:
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


def rank_alpha_fields(cfg: Any, names: Mapping[str, Entry], rank_key: str, alpha_key: str) -> dict[str, Any]:
    """HF's ``r``, alpha (under ``alpha_key``) and ``rank_pattern``/``alpha_pattern`` giving each module its own."""
    rank = _default_value([e.rank for e in names.values()], cfg.rank)
    alpha = _default_value([e.alpha for e in names.values()], cfg.alpha)
    return {
        rank_key: rank,
        alpha_key: number(alpha),
        "rank_pattern": _patterns(names, "rank", rank),
        "alpha_pattern": _patterns(names, "alpha", alpha),
    }


def group_rank_alpha(
    rank_alpha: Callable[[str], tuple[int, float]], group: Group, ranks: Sequence[int | None]
) -> tuple[int, float]:
    """The rank and alpha PEFT gives ``group``'s HF modules (``rank_alpha(name)``), equal for all of them and to the
    tensors' ``ranks`` (one per module; None where the tensors do not show it)."""
    pairs = {rank_alpha(name) for name, _ in group.modules}
    if len(pairs) > 1:
        raise ValueError(
            f"the HF modules stacked into {group.path!r} (e.g. {group.first!r}) have different ranks or alphas "
            f"{sorted(pairs)}; a stacked adapter needs one rank and one alpha."
        )
    rank, alpha = pairs.pop()
    for (name, _), got in zip(group.modules, ranks, strict=True):
        if got is not None and got != rank:
            raise ValueError(
                f"HF module {name!r} has rank {got} in the tensors but {rank} in adapter_config.json; the files do "
                "not belong together."
            )
    return rank, alpha


def per_path_args(
    r: int, alpha: float, ranks: Mapping[str, int], alphas: Mapping[str, float], arrays: Mapping[str, Any], dtype: Any
) -> dict[str, Any]:
    """The ``RankFields`` config arguments that target exactly ``arrays``' paths with their ranks and alphas."""
    return dict(
        rank=r,
        alpha=alpha,
        targets=exact_paths(arrays),
        rank_pattern={exact_paths([p]): ranks[p] for p in sorted(arrays) if ranks[p] != r},
        alpha_pattern={exact_paths([p]): alphas[p] for p in sorted(arrays) if alphas[p] != alpha},
        dtype=adapter_dtype((v for f in arrays.values() for v in f.values()), dtype),
    )


# ----------------------------------------------------------------------------------------------- tied embeddings

#: PEFT task types whose models have a language-model head over the vocabulary.
LM_TASKS = ("CAUSAL_LM", "SEQ_2_SEQ_LM")


def word_embedding(params: Any) -> tuple[str, int] | None:
    """``(path, vocabulary size)`` of the params' word-embedding table: the 2-D ``embedding`` leaf with the most
    rows (a position or token-type table has fewer); None without one."""
    tables = [(path, int(leaf.shape[0])) for path, leaf in leaves_with_paths(params) if _is_table(path, leaf)]
    return max(tables, key=lambda t: t[1]) if tables else None


def _is_table(path: str, leaf: Any) -> bool:
    return module_of(path)[1] == "embedding" and len(getattr(leaf, "shape", ())) == 2


def _has_own_head(params: Any, table: str, vocab: int) -> bool:
    """Whether a parameter other than ``table`` has an axis of the vocabulary's size (an output head of its own)."""
    return any(p != table and vocab in tuple(getattr(x, "shape", ())) for p, x in leaves_with_paths(params))


def check_tied_head(
    config: Mapping[str, Any],
    adapted: Iterable[str],
    saved: Iterable[str],
    params: Any,
    module_name: Callable[[str], str],
    tie_word_embeddings: bool | None,
) -> None:
    """Refuse a file that changes the word embedding of a model whose output head is that table, where PEFT did not.

    Without ``ensure_weight_tying`` PEFT adapts (or swaps in the saved copy of, ``modules_to_save``) the embedding
    lookup only, and a head tied to the table keeps the original weight. ``jaxpeft.linen`` applies an embedding's
    adapter to ``nn.Embed.attend`` as well, and a saved table replaces the head's too, so on a tied model such a file
    would change the logits PEFT computes. ``tie_word_embeddings`` None infers the tie: the file's ``task_type`` has
    a vocabulary head (:data:`LM_TASKS`) and no parameter besides the table has the vocabulary's size.
    """
    if tie_word_embeddings is False or config.get("ensure_weight_tying") is True:
        return  # untied, or PEFT applied the embedding's adapter to the tied head too, as jaxpeft does
    table = word_embedding(params)
    if table is None:
        return
    path, vocab = table
    try:
        name = module_name(module_of(path)[0])
    except (ValueError, KeyError, TypeError):
        return  # the table has no HF module: the file cannot touch it
    by_adapter = path in set(adapted)
    if not by_adapter and not any(name.endswith(entry) for entry in saved):  # PEFT's suffix rule for saved modules
        return
    task = config.get("task_type")
    if tie_word_embeddings is None:
        if task not in LM_TASKS or _has_own_head(params, path, vocab):
            return
        why = (
            f"tied, inferred from `task_type`={task!r} and no other parameter spanning the vocabulary of {vocab}: "
            "pass tie_word_embeddings=False if the head is not this table"
        )
    else:
        why = "`tie_word_embeddings`=True"
    what = "adapts" if by_adapter else "saves a trained copy (modules_to_save) of"
    raise ValueError(
        f"the adapter file {what} the word embedding {name!r} without `ensure_weight_tying`: PEFT applied it to the "
        "embedding lookup only, and the output head tied to that table kept the original weight. This model "
        f"computes its logits with the same table ({path!r}; {why}), so jaxpeft would change the head too and the "
        "logits would differ from PEFT's. Fix: load the base model with an untied head holding its own copy of the "
        "table (examples/models: llama.load_hf_checkpoint(..., untie_embeddings=True) or "
        "gguf.load_gguf(..., untie_embeddings=True)) and import into those params."
    )
