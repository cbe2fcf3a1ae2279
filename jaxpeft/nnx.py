"""Flax NNX support: wrap targeted layers so they run their adapter's forward rule, and convert to and from pytrees."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import Any, TypeVar, cast

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxpeft import _framework as core
from jaxpeft import quant
from jaxpeft._paths import leaves_with_paths, path_str, set_path
from jaxpeft._select import LayoutEntry, Unsupported
from jaxpeft.api import Plan, fold_target
from jaxpeft.api import init as method_init
from jaxpeft.api import init_adjusted as method_init_adjusted
from jaxpeft.api import plan as method_plan
from jaxpeft.optim import skip_unused_adapters
from jaxpeft.protocol import Adapter, LayerCall, LeafAdapter, MethodConfig, adapter_items, check_fits
from jaxpeft.sharding import adapter_specs

__all__ = [
    "AdapterFrozen",
    "AdapterIds",
    "AdapterLayer",
    "AdapterParam",
    "LeafAdapterLayer",
    "QuantizedLayer",
    "adapt",
    "adapters_of",
    "attach",
    "base_params",
    "infer_layouts",
    "load_adapters",
    "merge",
    "optimizer",
    "plan",
    "quantize",
    "remove",
    "set_adapter_ids",
    "unmerge",
]

M = TypeVar("M")
PathParts = tuple[Hashable, ...]

# Layer types jaxpeft.nnx can adapt (exact flax behaviour; subclasses that override ``__call__`` are refused).
_SUPPORTED = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv, nnx.Embed)
_BASE = "base"
_RESERVED = ("base", "stored", "deterministic", "rngs", "n_transform", "adapter_ids", "leaves")


class AdapterIds(nnx.Variable):
    """Which adapter of a bank each example uses (``set_adapter_ids``); data, neither trained nor part of the base."""


class AdapterParam(nnx.Variable):
    """The variable type of every adapter array (LoRA's A and B, DoRA's magnitude, IA3's vectors, yours).

    It subclasses ``nnx.Variable``, **not** ``nnx.Param``, so ``nnx.state(model, nnx.Param)`` is the frozen base
    and ``nnx.state(model, AdapterParam)`` the adapters. Use it wherever NNX takes a filter:
    ``nnx.split(model, AdapterParam, ...)``, ``nnx.grad(f, argnums=nnx.DiffState(0, AdapterParam))`` and, best,
    ``jaxpeft.nnx.optimizer(model, tx)``. (flax's own ``nnx.LoRAParam`` *is* an ``nnx.Param`` and is not what
    jaxpeft creates: ``wrt=nnx.LoRAParam`` trains nothing here, ``wrt=nnx.Param`` the whole base.)
    """


class AdapterFrozen(nnx.Variable):
    """The variable type of an adapter's frozen arrays (``jaxpeft.FROZEN`` fields: LoRA-FA's A, stored VeRA
    projections): part of the adapter (``adapters_of``, checkpoints, export) but neither ``nnx.Param`` (the base)
    nor ``AdapterParam`` (what trains), so ``jaxpeft.nnx.optimizer`` and ``nnx.DiffState(0, AdapterParam)`` leave
    them alone."""


def _weight_name(module: Any) -> str:
    return "embedding" if isinstance(module, nnx.Embed) else "kernel"


def _info(module: Any) -> core.LayerInfo:
    """The neutral description of a supported NNX layer, from its own configuration (no stack axes)."""
    cls = next(c for c in _SUPPORTED if isinstance(module, c))
    overridden = [
        m for m in ("__call__", "attend") if hasattr(cls, m) and getattr(type(module), m) is not getattr(cls, m)
    ]
    common: dict[str, Any] = {
        "overrides": f"nnx.{cls.__name__}.{overridden[0]}" if overridden else None,
        "class_name": type(module).__name__,
    }
    if isinstance(module, nnx.Embed):
        return core.LayerInfo("embed", **common)
    if isinstance(module, nnx.Linear):
        return core.LayerInfo("dense", **common)
    if isinstance(module, nnx.LinearGeneral):
        fan_in, fan_out = len(module.in_features), len(module.out_features)
        return core.LayerInfo("dense_general", fan_in, fan_out, batch_axes=bool(module.batch_axis), **common)
    if isinstance(module, nnx.Einsum):
        return core.LayerInfo("einsum", subscripts=module.einsum_str, **common)
    groups, masked = module.feature_group_count, module.mask is not None
    return core.LayerInfo("conv", len(module.kernel_size) + 1, groups=groups, masked=masked, **common)


def _kernel_layout(module: Any) -> LayoutEntry:
    """The layout of ``module``'s weight, its extra leading axes (``nnx.vmap``/``nnx.scan`` stacks) as stack."""
    try:
        own = core.layer_layout(_info(module))
    except ValueError as err:  # an einsum string that cannot even be parsed
        own = Unsupported(str(err))
    return core.stacked_layout(own, len(getattr(module, _weight_name(module)).shape))


def _path_text(parts: Sequence[Hashable]) -> str:
    return "/".join(str(p) for p in parts)


class _Canon:
    """Maps NNX graph paths to canonical paths: the ``base`` hop under every ``AdapterLayer`` is dropped."""

    def __init__(self, model: Any) -> None:
        self.nodes = list(nnx.iter_graph(model))
        self.wrappers = {p: n for p, n in self.nodes if isinstance(n, (AdapterLayer, QuantizedLayer, LeafAdapterLayer))}

    def __call__(self, parts: PathParts) -> PathParts:
        return tuple(k for i, k in enumerate(parts) if not (k == _BASE and parts[:i] in self.wrappers))

    def layers(self) -> Iterator[tuple[PathParts, Any]]:
        """``(canonical path of the weight, module)`` for each supported layer (wrapped or not)."""
        for parts, node in self.nodes:
            if isinstance(node, _SUPPORTED):
                yield (*self(parts), _weight_name(node)), node

    def adapted(self) -> list[tuple[str, AdapterLayer]]:
        """``(canonical weight path, wrapper)`` for each ``AdapterLayer``, and ``(leaf path, slot)`` for each leaf
        adapted by a ``LeafAdapterLayer`` (a slot has the same ``adapter``/``names``/``treedef`` interface), sorted
        by path."""
        rows = [
            (_path_text((*self(p), _weight_name(w.base))), w)
            for p, w in self.wrappers.items()
            if isinstance(w, AdapterLayer)
        ]
        rows += [
            (_path_text((*self(p), name)), cast(AdapterLayer, slot))
            for p, w in self.wrappers.items()
            if isinstance(w, LeafAdapterLayer)
            for name, slot in w.leaves.items()
        ]
        return sorted(rows, key=lambda row: row[0])


def _conv_fn(base: nnx.Conv) -> Any:
    """``conv(x, kernel)`` with the base layer's window, strides, padding and dilations (no bias, no mask)."""

    def conv(inp: jax.Array, kernel: jax.Array) -> jax.Array:
        branch = nnx.Conv(
            base.in_features,
            kernel.shape[-1],
            base.kernel_size,
            base.strides,
            padding=base.padding,
            input_dilation=base.input_dilation,
            kernel_dilation=base.kernel_dilation,
            use_bias=False,
            dtype=inp.dtype,
            param_dtype=kernel.dtype,
            precision=base.precision,
            kernel_init=lambda *_: kernel,
            conv_general_dilated=base.conv_general_dilated,
            promote_dtype=base.promote_dtype,
            preferred_element_type=base.preferred_element_type,
            rngs=nnx.Rngs(0),
        )
        return branch(inp)

    return conv


def _runner(base: Any, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[..., jax.Array]:
    """``run_with(weight, x)``: a copy of the layer holding ``weight`` (the layer's own code on another weight)."""

    def run_with(weight: jax.Array, inp: jax.Array) -> jax.Array:
        graphdef, state = nnx.split(base)
        layer = nnx.merge(graphdef, state, copy=True)
        getattr(layer, _weight_name(layer)).set_value(weight)
        fn = layer.attend if method == "attend" else layer
        out: jax.Array = fn(inp, *args, **kwargs)
        return out

    return run_with


def _layer_call(
    base: Any, method: str, x: Any, args: tuple[Any, ...], kwargs: dict[str, Any], key: Any, ids: Any = None
) -> LayerCall:
    """An NNX layer call, translated by the framework core (``jaxpeft._framework.layer_call``)."""
    fn = base.attend if method == "attend" else base

    def run(inp: jax.Array) -> jax.Array:
        out: jax.Array = fn(inp, *args, **kwargs)
        return out

    info = _info(base)
    kind = "attend" if method == "attend" else info.kind
    subscripts = None
    if kind == "einsum":
        subscripts = kwargs.get("einsum_str", args[0] if args else None) or base.einsum_str
    bias_var = getattr(base, "bias", None)
    return core.layer_call(
        kind,
        x,
        run,
        getattr(base, _weight_name(base)).get_value(),
        run_with=_runner(base, method, args, kwargs),
        bias=bias_var.get_value() if bias_var is not None else None,
        axes=tuple(base.axis) if kind == "dense_general" else None,
        subscripts=subscripts,
        conv=_conv_fn(base) if kind == "conv" else None,
        precision=getattr(base, "precision", None),
        dropout_key=key,
        adapter_ids=ids,
    )


def _missing(wrapper: Any, name: str, what: str, adapter: str) -> AttributeError:
    """The error for an attribute a wrapper does not have: it names the wrapped layer and why not to reach into it."""
    base = wrapper.__dict__.get("base")
    if name.startswith("_") or base is None:
        return AttributeError(f"{type(wrapper).__name__!r} object has no attribute {name!r}")
    return AttributeError(
        f"{type(wrapper).__name__} (wrapping {type(base).__name__}) has no attribute {name!r}. The wrapped layer is "
        f"`.base`, but reading its {what} directly skips the {adapter}: call the layer, or "
        "jaxpeft.nnx.merge(model) first."
    )


def _axis_names(spec: PartitionSpec) -> set[str]:
    return {n for e in spec for n in (e if isinstance(e, tuple) else (e,)) if isinstance(n, str)}


def _base_sharding(weight: nnx.Variable[Any], where: str) -> tuple[PartitionSpec, PartitionSpec, Mesh] | None:
    """How a base weight lies on a mesh, as ``(names, spec, mesh)``; None when it is on no mesh.

    The weight's NNX sharding metadata comes first (``nnx.with_partitioning``'s ``out_sharding``, logical names
    resolved by the rules in effect, as ``nnx.get_partition_spec`` does): it is where flax places the weight, and
    what an unplaced weight (eager sharding off) is meant to become. Otherwise the array's own ``NamedSharding``.
    ``mesh`` is the array's, else the one in the metadata, else the current one (``jax.set_mesh``); ``names`` are
    the metadata's own names (logical ones kept), or ``spec`` when it comes from the array.

    Raises:
      ValueError: the metadata names axes the mesh does not have and the array is not placed either.
    """
    value = weight.get_value()
    sharding = None if quant.is_quantized(value) else getattr(value, "sharding", None)
    placed = sharding if isinstance(sharding, NamedSharding) else None
    meshes = (placed.mesh if placed else None, weight.get_metadata("mesh", None), jax.sharding.get_mesh())
    mesh = next((m for m in meshes if isinstance(m, Mesh) and not m.empty), None)
    raw = weight.get_metadata("out_sharding", None)
    if mesh is None:  # one device, or an abstract mesh only (`nnx.eval_shape` under `jax.set_mesh`, used outside)
        return None
    if raw:
        resolved = nnx.get_partition_spec(weight).get_value()
        if _axis_names(resolved) <= set(mesh.axis_names):
            return PartitionSpec(*raw), resolved, mesh
        if placed is None:
            raise ValueError(
                f"{where} is annotated {tuple(raw)}, which resolves to {resolved}, naming axes "
                f"{sorted(_axis_names(resolved) - set(mesh.axis_names))} that the mesh {tuple(mesh.axis_names)} does "
                "not have. Logical axis names need their rules: call jaxpeft.nnx.adapt/attach inside "
                "`with nnx.logical_axis_rules(rules):`, or place the weights with NamedShardings first."
            )
    return (placed.spec, placed.spec, mesh) if placed is not None else None


def _placements(
    node: Adapter, weight: nnx.Variable[Any], where: str
) -> list[tuple[NamedSharding, dict[str, Any]]] | None:
    """Per array of ``node`` (flattening order), its ``NamedSharding`` and NNX sharding metadata, derived from its
    base weight's by ``jaxpeft.sharding.adapter_specs`` (an axis the mesh does not divide is replicated); None when
    the weight is on no mesh (one device: the arrays stay as they are, without metadata).

    The metadata (``out_sharding``, ``mesh``, and the weight's ``sharding_rules``) is what
    ``nnx.with_partitioning`` gives a weight, so ``nnx.get_partition_spec``, ``nnx.Optimizer`` (its state is created
    sharded like the adapters) and ``nnx.scan``/``nnx.vmap`` treat the adapters like the weights.
    """
    found = _base_sharding(weight, where)
    if found is None:
        return None
    names, spec, mesh = found

    def specs(base: PartitionSpec, on: Mesh | None) -> list[PartitionSpec]:
        tree = adapter_specs({where: node}, {where: base}, mesh=on)  # `on=None`: no divisibility fallback
        return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, PartitionSpec))

    rules = weight.get_metadata("sharding_rules", None)
    extra = {"sharding_rules": rules} if rules else {}
    out = []
    for placed, projected, named in zip(specs(spec, mesh), specs(spec, None), specs(names, None), strict=True):
        # an entry dropped for divisibility is dropped from the names too; the others keep the weight's own names
        out_sharding = tuple(n if p == q else None for n, p, q in zip(named, placed, projected, strict=True))
        out.append((NamedSharding(mesh, placed), {"out_sharding": out_sharding, "mesh": mesh, **extra}))
    return out


class _NodeSlot(nnx.Module):
    """Holds one adapter node as variables named after its fields: ``AdapterParam`` for the trainable arrays,
    ``AdapterFrozen`` for the frozen ones, and its static part (``jaxpeft._framework.Stored``)."""

    def _store(self, adapter: Adapter, weight: nnx.Variable[Any], where: str) -> None:
        """Store ``adapter``'s arrays, each placed and annotated like ``weight`` (its base weight), see
        ``_placements``."""
        self.stored = core.Stored.of(adapter, reserved=_RESERVED)
        placements = _placements(adapter, weight, where)
        for i, (name, value) in enumerate(zip(self.stored.names, jax.tree.leaves(adapter), strict=True)):
            kind = AdapterFrozen if name in self.stored.frozen else AdapterParam
            if placements is None:
                setattr(self, name, kind(jnp.asarray(value)))
            else:
                sharding, metadata = placements[i]
                setattr(self, name, kind(jax.device_put(value, sharding), **metadata))

    def _leaves(self) -> list[Any]:
        return [getattr(self, n).get_value() for n in self.stored.names]

    @property
    def adapter(self) -> Adapter:
        """The current adapter node (the pure-pytree form; sliced inside ``nnx.scan``/``nnx.vmap``)."""
        return self.stored.node(self._leaves())

    def call_node(self) -> Adapter:
        """The node as the hooks receive it: sliced, with gradients stopped on its frozen fields."""
        return self.stored.node(self._leaves(), call=True)


class AdapterLayer(_NodeSlot):
    """A supported layer and its adapter; calling it runs the adapter's forward rule (``LoRA: base(x) + s·(x·A)·B``).

    The adapter's arrays are ``AdapterParam`` attributes named after its fields (``a``, ``b``, ``magnitude``,
    ``vector``, ...); its static part (class, scale, layout) is kept as graph metadata. Inside
    ``nnx.scan``/``nnx.vmap`` stacks the arrays carry the kernel's leading stack axes and are sliced with it.
    When the kernel is on a mesh, the arrays are placed and annotated like it (see ``attach``).

    Attributes:
      base: the wrapped ``nnx.Linear``/``LinearGeneral``/``Einsum``/``Conv``/``Embed``.
      deterministic: disables dropout (``model.eval()``, ``nnx.view(model, deterministic=True)``).
      rngs: the dropout ``nnx.RngStream`` or ``None``.
    """

    def __init__(self, base: nnx.Module, adapter: Adapter, *, rngs: nnx.RngStream | None = None) -> None:
        if not isinstance(base, _SUPPORTED):
            raise TypeError(
                f"AdapterLayer wraps {', '.join('nnx.' + c.__name__ for c in _SUPPORTED)}; got {type(base).__name__}."
            )
        self.base = base
        self.deterministic = False
        self.rngs = nnx.data(rngs)
        self.adapter_ids: AdapterIds | None = nnx.data(None)
        self._store(adapter, getattr(base, _weight_name(base)), f"the nnx.{type(base).__name__}'s weight")

    def __getattr__(self, name: str) -> Any:
        raise _missing(self, name, "weights", "adapter")

    def set_view(self, deterministic: bool | None = None) -> None:
        """Used by ``nnx.view``: ``deterministic=True`` disables dropout."""
        if deterministic is not None:
            self.deterministic = deterministic

    def _ids(self, node: Adapter) -> jax.Array | None:
        """The adapter ids set by ``set_adapter_ids``, with the stack axes that remain at this call indexed away."""
        if self.adapter_ids is None:
            return None
        ids: jax.Array = self.adapter_ids.get_value()
        return ids[(0,) * node.layout.stack] if node.bank_size is not None else ids

    def _dropout_key(self) -> jax.Array | None:
        if self.deterministic or self.rngs is None:
            return None
        return self.rngs()

    def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        """The adapted layer; at init every built-in method returns exactly ``base(x, *args, **kwargs)``."""
        node = self.call_node()
        call = _layer_call(self.base, "__call__", x, args, kwargs, self._dropout_key, self._ids(node))
        return node.forward(call)  # type: ignore[attr-defined]

    def attend(self, query: jax.Array, **kwargs: Any) -> jax.Array:
        """``nnx.Embed.attend`` with the adapter applied (a tied output head); embeddings only."""
        if not isinstance(self.base, nnx.Embed):
            raise AttributeError(
                f"`attend` exists on wrapped nnx.Embed layers only; this wraps nnx.{type(self.base).__name__}."
            )
        node = self.call_node()
        call = _layer_call(self.base, "attend", query, (), kwargs, self._dropout_key, self._ids(node))
        return node.forward(call)  # type: ignore[attr-defined]


class QuantizedLayer(nnx.Module):
    """A supported layer whose weight is quantised (``jaxpeft.quant``) and that has no adapter.

    Calling it runs the layer on its dequantised weight (a per-call transient under ``jax.checkpoint``), so the
    output equals the layer with the dequantised weight. ``jaxpeft.nnx.quantize`` creates these;
    ``adapt``/``attach`` replace a targeted one by an ``AdapterLayer`` over the same quantised layer, and
    ``remove``/``merge`` put it back. Like ``AdapterLayer`` it adds no level to canonical paths.

    Attributes:
      base: the wrapped ``nnx.Linear``/``LinearGeneral``/``Einsum``/``Conv`` holding a ``QuantizedArray``.
    """

    def __init__(self, base: nnx.Module) -> None:
        if not isinstance(base, _SUPPORTED):
            raise TypeError(
                f"QuantizedLayer wraps {', '.join('nnx.' + c.__name__ for c in _SUPPORTED)}; got {type(base).__name__}."
            )
        self.base = base

    def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        """The layer's own forward on its dequantised weight."""
        return _layer_call(self.base, "__call__", x, args, kwargs, None).base(x)


class _LeafSlot(_NodeSlot):
    """The variables and static part of one leaf adapter (a slot of a ``LeafAdapterLayer``)."""

    def __init__(self, adapter: Adapter, leaf: nnx.Variable[Any], where: str) -> None:
        self._store(adapter, leaf, where)


class LeafAdapterLayer(nnx.Module):
    """A module whose own leaves (a bias, a norm's scale and bias) are trained in place (BitFit, LN tuning).

    Calling it runs the wrapped module's own code on a copy of its state in which each adapted leaf is
    ``adapter.value(leaf)`` (``leaf + delta``, see ``jaxpeft.LeafAdapter``): the wrapped module is never changed, so
    ``nnx.state(model, nnx.Param)`` stays the frozen base, and the adapter arrays are ``AdapterParam`` variables
    under ``leaves[name]``. Inside ``nnx.scan``/``nnx.vmap`` stacks they carry the leaves' stack axes and are
    sliced with them. Like ``AdapterLayer`` it adds no level to canonical paths.

    Attributes:
      base: the wrapped module (whose adapted leaves are ``nnx.Param`` attributes it reads in ``__call__``).
      leaves: ``nnx.Dict`` from leaf name (``"bias"``, ``"scale"``) to the slot holding its adapter.
    """

    def __init__(self, base: nnx.Module, adapters: Mapping[str, LeafAdapter]) -> None:
        self.base = base
        self.leaves = nnx.Dict(
            {
                name: _LeafSlot(node, getattr(base, name), f"the {type(base).__name__}'s {name!r}")
                for name, node in sorted(adapters.items())
            }
        )

    def __getattr__(self, name: str) -> Any:
        raise _missing(self, name, "leaves", "adapters")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped module's output with its adapted leaves substituted; at init exactly ``base(*args)``."""
        graphdef, state = nnx.split(self.base)
        layer = nnx.merge(graphdef, state, copy=True)  # own variables: `base` is not touched
        for name, slot in self.leaves.items():
            var = getattr(layer, name)
            var.set_value(cast(LeafAdapter, slot.call_node()).value(var.get_value()))
        return layer(*args, **kwargs)


def _leaf_params(model: Any, table: Mapping[str, Adapter]) -> dict[str, nnx.Param]:
    """The ``nnx.Param`` under each leaf adapter's path (canonical), after checking that the adapter fits."""
    leaf_table = {p: n for p, n in table.items() if isinstance(n, LeafAdapter)}
    if not leaf_table:
        return {}
    canon = _Canon(model)
    wrappers = (AdapterLayer, QuantizedLayer, LeafAdapterLayer)
    modules = {
        _path_text(canon(p)): n for p, n in canon.nodes if isinstance(n, nnx.Module) and not isinstance(n, wrappers)
    }
    out: dict[str, nnx.Param] = {}
    for path, node in sorted(leaf_table.items()):
        module_path, _, name = path.rpartition("/")
        var = getattr(modules.get(module_path), name, None)
        if not isinstance(var, nnx.Param):
            owner = modules.get(module_path)
            where = f"a {type(owner).__name__} without an nnx.Param `{name}`" if owner is not None else "no module"
            raise ValueError(
                f"adapter {path!r} ({type(node).__name__}) names a leaf of {where} at {module_path!r}; were the "
                "adapters made for this model?"
            )
        if any(p.rpartition("/")[0] == module_path for p, n in table.items() if not isinstance(n, LeafAdapter)):
            raise ValueError(
                f"adapter {path!r} trains a leaf of a layer that also has a kernel adapter; jaxpeft.nnx wraps a layer "
                "once. Use one kind of method per layer (jaxpeft.linen.apply runs both)."
            )
        check_fits(path, node, tuple(var.shape))
        out[path] = var
    return out


def _leaf_owners(model: Any, table: Mapping[str, Adapter]) -> dict[str, dict[str, LeafAdapter]]:
    """``{module path: {leaf name: adapter}}`` for the leaf adapters of ``table`` (validated)."""
    owners: dict[str, dict[str, LeafAdapter]] = {}
    for path in _leaf_params(model, table):
        module_path, _, name = path.rpartition("/")
        node = table[path]
        assert isinstance(node, LeafAdapter)
        owners.setdefault(module_path, {})[name] = node
    return owners


def _quantized(module: Any) -> bool:
    return quant.is_quantized(getattr(module, _weight_name(module)).get_value())


def quantize(model: M, targets: Any, *, kind: str = "nf4") -> M:
    """A copy of ``model`` whose selected weights are stored quantised (QLoRA's frozen base).

    The selection is that of ``jaxpeft.quant.quantize(base_params(model), targets, ...)`` (the method config you
    will train with, or a target spec); each quantised layer is wrapped in a
    ``QuantizedLayer`` that runs it on its dequantised weight. Then ``adapt``/``attach`` as usual: the
    adapted layers dequantise inside their forward, and ``merge`` requantises (see ``jaxpeft.merge`` for the
    bound). ``model`` is left untouched; the copy shares its other arrays.

    Args:
      model: an NNX module without adapters.
      targets: a method config or a target spec (see ``jaxpeft.quant.quantize``).
      kind: ``"nf4"`` or ``"int8"``.

    Raises:
      ValueError: the model already has adapters; and as ``jaxpeft.quant.quantize``.
    """
    _check_unadapted(model, "jaxpeft.nnx.quantize")
    params = base_params(model)
    quantized = quant.quantize(params, targets, kind=kind, layouts=infer_layouts(model))
    table = {
        path: leaf
        for path, leaf in leaves_with_paths(quantized, is_leaf=quant.is_quantized)
        if quant.is_quantized(leaf)
    }
    copy = nnx.clone(model)
    for parts, module in _Canon(copy).layers():
        leaf = table.get(_path_text(parts))
        if leaf is not None and not _quantized(module):
            getattr(module, _weight_name(module)).set_value(leaf)

    def wrap(parts: PathParts, node: Any) -> Any:
        if isinstance(node, _SUPPORTED) and _quantized(node):
            return QuantizedLayer(node)
        return node

    return nnx.recursive_map(wrap, copy)


def infer_layouts(model: Any) -> dict[str, LayoutEntry]:
    """The layout of every ``nnx.Param`` leaf, read from the modules' own configuration (no tracing).

    Weights of ``nnx.Linear``, ``LinearGeneral``, ``Einsum``, ``Conv`` and ``Embed`` get their kind, fan-in and
    fan-out; extra leading axes (stacks built with ``nnx.vmap``/``nnx.scan``) count as ``stack``. Every other
    parameter gets ``jaxpeft.Unsupported(reason)``, so a target that selects it fails loudly (the same reasons as
    ``jaxpeft.linen.infer_layouts``).
    Paths are canonical: ``"layers/0/attn/q_proj/kernel"`` (an ``AdapterLayer`` adds no path level).

    Args:
      model: an NNX module (real or abstract, e.g. from ``nnx.eval_shape``), adapted or not.

    Returns:
      ``{"path/to/kernel": Layout | Unsupported}`` for every ``nnx.Param`` of the model, sorted by path.
    """
    canon = _Canon(model)
    layouts: dict[str, LayoutEntry] = {}
    for parts, module in canon.layers():
        layouts[_path_text(parts)] = _kernel_layout(module)
    owners = dict(canon.nodes)
    for parts, node in canon.nodes:
        path = _path_text(canon(parts))
        if not isinstance(node, nnx.Param) or path in layouts:
            continue
        owner = owners.get(parts[:-1])
        supported = isinstance(owner, _SUPPORTED)
        weight = _weight_name(owner) if supported else "kernel"
        layouts[path] = core.unsupported_leaf(type(owner).__name__, supported, weight, str(parts[-1]))
    return dict(sorted(layouts.items()))


def _nested_set(tree: dict[Hashable, Any], parts: PathParts, value: Any) -> None:
    for key in parts[:-1]:
        tree = tree.setdefault(key, {})
    tree[parts[-1]] = value


def base_params(model: Any) -> dict[Hashable, Any]:
    """The frozen parameters as a pure nested dict with canonical paths (adapters and wrapper levels left out).

    On an unadapted model this equals ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``; on an adapted one it is
    the same dict as before ``adapt`` (integer keys of ``nnx.List`` stay integers). Arrays are shared, not
    copied. Pass it to ``jaxpeft.init``/``plan``/``summary`` together with ``infer_layouts(model)``.
    """
    canon = _Canon(model)
    out: dict[Hashable, Any] = {}
    for parts, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        _nested_set(out, canon(tuple(parts)), var.get_value())
    return out


def plan(cfg: MethodConfig, model: Any) -> Plan:
    """The dry run of ``adapt(model, cfg)``: one row per target with path, shape, layout and adapter cost."""
    return method_plan(cfg, base_params(model), layouts=infer_layouts(model))


def adapters_of(model: Any) -> dict[str, Any]:
    """The adapters of an adapted model as the framework-neutral pytree: nested dicts with adapter nodes.

    The layout is exactly that of ``jaxpeft.init`` on ``base_params(model)`` (string keys, e.g.
    ``adapters["layers"]["0"]["q_proj"]["kernel"]``), so it can be saved with ``jaxpeft.checkpoint``, merged
    with ``jaxpeft.merge``, or applied to a Linen model whose parameter paths agree. Arrays are shared.

    Raises:
      ValueError: the model has no ``AdapterLayer``.
    """
    rows = _Canon(model).adapted()
    if not rows:
        raise ValueError(
            f"`model` ({type(model).__name__}) has no adapters; call jaxpeft.nnx.adapt(model, cfg, key=key) first."
        )
    out: dict[str, Any] = {}
    for path, wrapper in rows:
        out = set_path(out, path, wrapper.adapter)
    return out


def _check_unadapted(model: Any, what: str) -> None:
    rows = _Canon(model).adapted()
    if rows:
        raise ValueError(
            f"`model` already has adapters (e.g. at {rows[0][0]!r}); {what} takes a plain model. Call "
            "jaxpeft.nnx.merge(model) or jaxpeft.nnx.remove(model) first, or jaxpeft.nnx.load_adapters(model, "
            "adapters) to replace the adapter values."
        )


def _validated(model: Any, adapters: Any, where: str) -> dict[str, Adapter]:
    """The adapter table, after checking that every node fits a weight of ``model`` it can run on."""
    layers, leaves = core.layer_nodes(adapters, where)
    shapes: dict[str, tuple[tuple[int, ...], LayoutEntry]] = {}
    for parts, module in _Canon(model).layers():
        shapes[_path_text(parts)] = (tuple(getattr(module, _weight_name(module)).shape), _kernel_layout(module))
    layouts = infer_layouts(model)
    _leaf_params(model, {**layers, **leaves})  # leaf adapters (BitFit, LN tuning) sit on a module's own leaves
    for path, node in sorted(layers.items()):
        if path not in shapes:
            known = [p for p, (_, lay) in shapes.items() if not isinstance(lay, Unsupported)][:4]
            entry = layouts.get(path)
            why = f" {entry.reason}" if isinstance(entry, Unsupported) else ""
            raise ValueError(
                f"adapter {path!r} names no nnx.Linear/LinearGeneral/Einsum/Conv/Embed weight of `model`.{why} "
                f"Adaptable weights look like {', '.join(map(repr, known)) or 'none'}; were the adapters made for "
                "this model?"
            )
        shape, layout = shapes[path]
        if isinstance(layout, Unsupported):
            raise ValueError(f"{path!r} cannot be adapted: {layout.reason} Add it to `exclude`.")
        check_fits(path, node, shape)
    return {**layers, **leaves}


def _dropout_streams(table: Mapping[str, Adapter], model: Any, rngs: nnx.Rngs | None) -> dict[str, nnx.RngStream]:
    """One dropout stream per adapter with a positive rate, split over the ``nnx.vmap``/``nnx.scan`` axes only."""
    if rngs is None:
        return {}
    modules = {_path_text(parts): module for parts, module in _Canon(model).layers()}
    streams: dict[str, nnx.RngStream] = {}
    for path in sorted(table):
        if table[path].dropout <= 0.0:
            continue
        module = modules[path]
        weight_shape = tuple(getattr(module, _weight_name(module)).shape)
        own = core.layer_layout(_info(module))
        transformed = weight_shape[: len(weight_shape) - (own.ndim if not isinstance(own, Unsupported) else 0)]
        try:
            source = rngs["dropout"]
        except (AttributeError, KeyError) as err:
            raise ValueError(
                f"`rngs` has no 'dropout' (or 'default') stream for the dropout of {path!r}; pass "
                "nnx.Rngs(dropout=seed)."
            ) from err
        streams[path] = source.split(transformed) if transformed else source.fork()
    return streams


def attach(model: M, adapters: Any, *, rngs: nnx.Rngs | None = None) -> M:
    """A copy of ``model`` whose layers at the adapters' paths are wrapped in ``AdapterLayer`` with these values.

    Takes any adapter tree in the pure form: from ``jaxpeft.init``, ``adapters_of``, a checkpoint, or one trained
    on a Linen model whose parameter paths agree. ``model`` is left untouched; the copy shares its base arrays
    (no memory is copied) and gets its own variables.

    On a mesh, each adapter array is placed like its base weight (the specs of ``jaxpeft.sharding.adapter_specs``:
    LoRA's A along the weight's fan-in axes, B along its fan-out axes, the rank replicated, an axis the mesh does
    not divide replicated) and annotated with that spec (``out_sharding`` and ``mesh`` metadata, as
    ``nnx.with_partitioning`` annotates a weight), so ``nnx.get_partition_spec(nnx.state(model, AdapterParam))``
    gives the adapters' specs and ``jaxpeft.nnx.optimizer`` creates its state sharded alike. The weight's spec is
    its ``out_sharding`` metadata (logical names resolved by the rules in effect, ``nnx.logical_axis_rules``) on
    the array's mesh, the metadata's or the current one (``jax.set_mesh``), else its array's ``NamedSharding``. A
    weight on no mesh leaves its adapters as before: unannotated, where ``jax`` puts them.

    Args:
      model: an NNX module without adapters.
      adapters: nested dicts with an adapter node at each adapted weight path.
      rngs: ``nnx.Rngs`` whose ``"dropout"`` stream feeds the adapters' dropout (each layer forks its own stream,
        split along the ``nnx.vmap``/``nnx.scan`` axes for stacked layers). Without it, dropout is off.

    Returns:
      The adapted model.

    Raises:
      ValueError: the model is already adapted; an adapter path names no supported layer; shapes do not fit; a
        weight's sharding metadata names axes the mesh does not have (logical names outside their rules) and its
        array is not placed on the mesh either.
    """
    _check_unadapted(model, "jaxpeft.nnx.attach")
    table = _validated(model, adapters, "jaxpeft.nnx.attach")
    weights = {_path_text(parts): getattr(m, _weight_name(m)) for parts, m in _Canon(model).layers()}
    for path, var in sorted({**weights, **_leaf_params(model, table)}.items()):
        if path in table:
            _base_sharding(var, f"the base weight {path!r}")  # refuse here, by path, what the wrappers would
    streams = _dropout_streams(table, model, rngs)
    owners = _leaf_owners(model, table)

    def wrap(parts: PathParts, node: Any) -> Any:
        layer = node.base if isinstance(node, QuantizedLayer) else node
        if isinstance(layer, _SUPPORTED):
            path = _path_text((*parts, _weight_name(layer)))
            if path in table:
                return AdapterLayer(layer, table[path], rngs=streams.get(path))
        owned = owners.get(_path_text(parts))
        if owned is not None and isinstance(node, nnx.Module):
            return LeafAdapterLayer(node, owned)
        return node

    return nnx.recursive_map(wrap, nnx.clone(model))


def adapt(
    model: M, cfg: MethodConfig, *, key: jax.Array, rngs: nnx.Rngs | None = None, check_identity: bool = True
) -> M:
    """A copy of ``model`` with the method of ``cfg`` on the layers it selects; its output equals the base at init.

    Selection and initial values are exactly those of ``jaxpeft.init(cfg, base_params(model), key=key,
    layouts=infer_layouts(model))`` (same key, same adapters). Each targeted layer is wrapped in an
    ``AdapterLayer``. ``model`` is left untouched; base arrays are shared. On a mesh (weights placed with
    ``NamedSharding`` objects or annotated by ``nnx.with_partitioning``) the adapters are placed and annotated like
    their weights, as ``attach`` says; they are computed eagerly first (the identity check runs on concrete values),
    then placed: ``attach(model, jaxpeft.sharding.init(...))`` creates them sharded under ``jit`` instead.

    Train the adapters with ``jaxpeft.nnx.optimizer(model, tx)``, or functionally with a three-way split::

        graphdef, adapters, frozen = nnx.split(model, jaxpeft.nnx.AdapterParam, ...)
        grads = jax.grad(lambda t: loss(nnx.merge(graphdef, t, frozen, copy=True)))(adapters)   # adapters only

    With dropout, split ``nnx.RngState`` out as a fourth part and carry it between steps.

    Args:
      model: an NNX module without adapters (real, or abstract from ``nnx.eval_shape``).
      cfg: the method config; ``"all-linear"`` adapts Linear/LinearGeneral/Einsum layers except output heads.
      key: ``jax.random`` key for the adapter init.
      rngs: optional ``nnx.Rngs`` with a ``"dropout"`` stream; dropout runs only when given.
      check_identity: as in ``jaxpeft.init``: refuse a method whose fresh adapters change the outputs.

    Returns:
      The adapted model.

    A config that adjusts the base (PiSSA/OLoRA, ``cfg.adjusts_base``) follows ``jaxpeft.init_adjusted``
    instead: the copy's adapted layers get the residual weights (``W - s·A·B``) as their base kernels, so its
    output equals the original model's up to float rounding, and ``merge`` gives the original weights plus the
    trained update. ``model`` keeps its weights.

    Raises:
      ValueError: as ``jaxpeft.plan`` (nothing matched, unsupported layer selected, ...) or the model already has
        adapters; as ``jaxpeft.init_adjusted`` for a base-adjusting config.

    Example:
      >>> import jax, jax.numpy as jnp, jaxpeft, jaxpeft.nnx
      >>> from flax import nnx
      >>> class Net(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.proj = nnx.Linear(4, 3, rngs=rngs)
      ...     def __call__(self, x):
      ...         return self.proj(x)
      >>> net, x = Net(nnx.Rngs(0)), jnp.ones((2, 4))
      >>> adapted = jaxpeft.nnx.adapt(net, jaxpeft.LoraConfig(rank=2, targets=["proj"]), key=jax.random.key(1))
      >>> type(adapted.proj).__name__, bool(jnp.allclose(adapted(x), net(x)))
      ('AdapterLayer', True)
      >>> jaxpeft.nnx.adapters_of(adapted)["proj"]["kernel"].a.shape
      (4, 2)
    """
    _check_unadapted(model, "jaxpeft.nnx.adapt")
    params, layouts = base_params(model), infer_layouts(model)
    if not (isinstance(cfg, MethodConfig) and cfg.adjusts_base):  # (method_init reports a wrong `cfg`)
        adapters = method_init(cfg, params, key=key, layouts=layouts, check_identity=check_identity)
        return attach(model, adapters, rngs=rngs)
    residual, adapters = method_init_adjusted(cfg, params, key=key, layouts=layouts, check_identity=check_identity)
    adapted = attach(model, adapters, rngs=rngs)
    weights = dict(leaves_with_paths(residual, is_leaf=quant.is_quantized))
    for path, wrapper in _Canon(adapted).adapted():  # the copy's own variables: `model` is not touched
        var = getattr(wrapper.base, _weight_name(wrapper.base))
        old = var.get_value()
        sharding = None if quant.is_quantized(old) else getattr(old, "sharding", None)
        placed = isinstance(sharding, NamedSharding) and not quant.is_quantized(weights[path])  # stays where it was
        var.set_value(jax.device_put(weights[path], sharding) if placed else weights[path])
    return adapted


def set_adapter_ids(model: Any, ids: Any) -> None:
    """Choose which adapter of each bank runs (``jaxpeft.stack_adapters``; the NNX form of ``adapter_ids``).

    ``ids`` of shape ``()`` picks one adapter for every call, ``(batch,)`` one per example (a mixed batch), None
    clears them. The ids are an ``AdapterIds`` variable of each bank layer (broadcast over its stack axes, so
    ``nnx.scan``/``nnx.vmap`` stacks slice them like the adapters): new values never recompile an ``nnx.jit``
    function, a new shape does.

    Raises:
      ValueError: ``ids`` not integers of shape ``()``/``(batch,)``, out of range, or no bank in ``model``.
    """
    banks = [(p, layer) for p, layer in _Canon(model).adapted() if layer.adapter.bank_size is not None]
    if not banks:
        raise ValueError("the model holds no adapter bank; attach one first: jaxpeft.nnx.attach(model, bank).")
    if ids is None:
        for _, layer in banks:
            layer.adapter_ids = None
        return
    value = core.check_ids(ids, {p: layer.adapter for p, layer in banks}, "`ids`")
    for _, layer in banks:
        node = layer.adapter
        stack = tuple(jax.tree.leaves(node)[0].shape[: node.layout.stack])
        layer.adapter_ids = AdapterIds(jnp.broadcast_to(value, (*stack, *value.shape)))


def _bank_axes(model: Any) -> dict[str, int]:
    """``{path in nnx.state(model, AdapterParam): adapter axis}`` for the trainable arrays of the model's banks."""
    out: dict[str, int] = {}
    for parts, node in nnx.iter_graph(model):
        if isinstance(node, _NodeSlot) and getattr(node, "stored", None) is not None:
            adapter = node.adapter
            if adapter.bank_size is None:
                continue
            for name in node.stored.names:
                if name not in node.stored.frozen:
                    out["/".join(str(p) for p in (*parts, name))] = adapter.layout.stack
    return out


def optimizer(model: Any, tx: optax.GradientTransformation) -> nnx.Optimizer:
    """``nnx.Optimizer`` over exactly the adapters of ``model`` (``wrt=AdapterParam``): the base stays frozen.

    When the model holds adapter banks, ``tx`` is wrapped in ``jaxpeft.skip_unused_adapters`` so an adapter that no
    example of the batch used stays bit-identical (no weight decay, no momentum step).

    On a mesh the optimizer state is sharded like the adapters (``mu``/``nu`` take each adapter variable's
    ``out_sharding`` and ``mesh`` metadata, which ``adapt``/``attach`` set, and flax places them accordingly).

    The filter is the one place where a typo trains the wrong thing silently (``wrt=nnx.LoRAParam`` holds no
    state here, ``wrt=nnx.Param`` trains the base), so this builds it for you and checks the result.

    Raises:
      ValueError: ``model`` has no adapters, or the optimizer would hold no adapter state.
    """
    adapters_of(model)  # raises with the fix when there are none
    axes = _bank_axes(model)
    if axes:
        tx = skip_unused_adapters(tx, axes=lambda _: axes)
    opt = nnx.Optimizer(model, tx, wrt=AdapterParam)
    if not jax.tree.leaves(nnx.state(model, AdapterParam)):
        raise ValueError("the optimizer would train nothing: `model` holds no AdapterParam arrays.")
    return opt


def load_adapters(model: Any, adapters: Any) -> None:
    """Set the adapters of an adapted model in place (values and static parts), from the pure form.

    A variable whose array is placed with a ``NamedSharding`` (an adapter on a mesh) keeps that sharding: the new
    values are put there, wherever they come from (a checkpoint restored on one device, another mesh).

    Raises:
      ValueError: the adapter paths differ from the model's adapted layers, or a node's type or shapes differ.
    """
    table = dict(adapter_items(adapters))
    rows = dict(_Canon(model).adapted())
    missing, extra = sorted(set(rows) - set(table)), sorted(set(table) - set(rows))
    if missing or extra:
        raise ValueError(
            f"`adapters` do not match the model's adapted layers: missing {missing[:4]}, unknown {extra[:4]}. "
            "Load the adapters the model was adapted with, or use jaxpeft.nnx.attach(jaxpeft.nnx.remove(model), "
            "adapters) to adapt a different set of layers."
        )
    for path, wrapper in rows.items():
        old, new = wrapper.adapter, table[path]
        old_shapes = {n: tuple(x.shape) for n, x in zip(wrapper.stored.names, jax.tree.leaves(old), strict=True)}
        flat, _ = jax.tree_util.tree_flatten_with_path(new)
        new_shapes = {path_str(kp): tuple(x.shape) for kp, x in flat}
        if type(old) is not type(new) or old_shapes != new_shapes:
            raise ValueError(
                f"adapter {path!r} is a {type(new).__name__} with {new_shapes}; the model's layer holds a "
                f"{type(old).__name__} with {old_shapes}. Use adapters of the same method and shapes."
            )
    for path, wrapper in rows.items():
        node = table[path]
        wrapper.stored = core.Stored.of(node, reserved=_RESERVED)
        for name, value in zip(wrapper.stored.names, jax.tree.leaves(node), strict=True):
            var = getattr(wrapper, name)
            sharding = getattr(var.get_value(), "sharding", None)  # keep a sharded adapter where it is
            placed = isinstance(sharding, NamedSharding)
            var.set_value(jax.device_put(value, sharding) if placed else jnp.asarray(value))


def remove(model: M) -> M:
    """A copy of ``model`` with every ``AdapterLayer`` replaced by its base layer: the plain model, unchanged.

    A layer whose weight is quantised goes back into a ``QuantizedLayer``, as ``quantize`` left it.
    """

    def unwrap(_: PathParts, node: Any) -> Any:
        if isinstance(node, LeafAdapterLayer):
            return node.base
        if not isinstance(node, AdapterLayer):
            return node
        return QuantizedLayer(node.base) if _quantized(node.base) else node.base

    return nnx.recursive_map(unwrap, nnx.clone(model))


def _fold_into(plain: M, adapters: Any, sign: int, where: str) -> M:
    """Fold each adapter into (or out of) the weights of a plain model, in place (its variables are not shared),
    through the one fold of ``jaxpeft.api.fold_target``."""
    table = _validated(plain, adapters, where)
    for parts, module in _Canon(plain).layers():
        path = _path_text(parts)
        node = table.get(path)
        if node is None:
            continue
        weight = getattr(module, _weight_name(module))
        bias_var = getattr(module, "bias", None)
        bias = bias_var.get_value() if bias_var is not None else None
        bias_path = f"{path.rpartition('/')[0]}/bias"
        new_w, new_b = fold_target(path, node, weight.get_value(), bias, sign, bias_path)
        weight.set_value(new_w)
        if new_b is not None and bias_var is not None:
            bias_var.set_value(new_b)
    for path, var in _leaf_params(plain, table).items():  # leaf adapters: the leaf itself, e.g. bias + delta
        var.set_value(fold_target(path, table[path], var.get_value(), None, sign)[0])
    return plain


def merge(model: M) -> M:
    """A plain copy of an adapted model with each adapter folded into its weight (and bias, where it scales it).

    The result has no ``AdapterLayer``: its forward is exactly the base model's code, and its outputs match the
    adapted model's up to float rounding (folds are formed in float32, then cast to the weight's dtype).
    A quantised weight is dequantised, folded and requantised (its layer stays a ``QuantizedLayer``; the error
    bound is ``jaxpeft.merge``'s). ``model`` is left untouched.

    Raises:
      NotMergeableError: a method that cannot be merged.
    """
    adapters = adapters_of(model)
    return _fold_into(remove(model), adapters, 1, "jaxpeft.nnx.merge")


def unmerge(model: M, adapters: Any, *, rngs: nnx.Rngs | None = None) -> M:
    """The inverse of ``merge``: each adapter taken back out of its weight, with the adapters attached again.

    ``unmerge(merge(m), adapters_of(m))`` equals ``m`` up to float rounding. ``model`` is left untouched.

    Raises:
      NotMergeableError: a method whose merge cannot be undone (DoRA: keep the model you merged instead).
    """
    _check_unadapted(model, "jaxpeft.nnx.unmerge")
    plain = _fold_into(nnx.clone(model), adapters, -1, "jaxpeft.nnx.unmerge")
    return attach(plain, adapters, rngs=rngs)
