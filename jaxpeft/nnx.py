"""Flax NNX support: wrap targeted layers so they run their adapter's forward rule, and convert to and from pytrees."""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any, TypeVar, cast

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxpeft import ops, quant
from jaxpeft._paths import leaves_with_paths, path_str, set_path
from jaxpeft._select import Layout
from jaxpeft.methods.bank import AdapterBank
from jaxpeft.methods.base import Adapter, LayerCall, MethodConfig, Plan, adapter_items, check_fits, fold_target
from jaxpeft.methods.base import init as method_init
from jaxpeft.methods.base import init_adjusted as method_init_adjusted
from jaxpeft.methods.base import plan as method_plan
from jaxpeft.methods.leaf import LeafAdapter

__all__ = [
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
_RESERVED = ("base", "treedef", "names", "stored_ndim", "deterministic", "rngs", "n_transform", "adapter_ids")


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


def _weight_name(module: Any) -> str:
    return "embedding" if isinstance(module, nnx.Embed) else "kernel"


def _own_layout(module: Any) -> Layout:
    """The layout of ``module``'s kernel without stack axes, from the module's own configuration."""
    cls = next(c for c in _SUPPORTED if isinstance(module, c))
    overridden = [
        m for m in ("__call__", "attend") if hasattr(cls, m) and getattr(type(module), m) is not getattr(cls, m)
    ]
    if overridden:
        return Layout(
            kind="unsupported",
            reason=f"its class {type(module).__name__} overrides nnx.{cls.__name__}.{overridden[0]}, so the adapted "
            "forward would not match it.",
        )
    if isinstance(module, nnx.Embed):
        return Layout(kind="embed")
    if isinstance(module, nnx.Linear):
        return Layout(kind="dense")
    if isinstance(module, nnx.LinearGeneral):
        if module.batch_axis:
            return Layout(kind="unsupported", reason="nnx.LinearGeneral with `batch_axis` is not supported.")
        return Layout(fan_in=len(module.in_features), fan_out=len(module.out_features), kind="dense_general")
    if isinstance(module, nnx.Einsum):
        if module.einsum_str is None:
            return Layout(
                kind="unsupported",
                reason="its `einsum_str` is given at call time; pass it to the nnx.Einsum constructor instead.",
            )
        try:
            return ops.einsum_plan(module.einsum_str).layout
        except ValueError as err:
            return Layout(kind="unsupported", reason=str(err))
    if module.feature_group_count != 1:
        return Layout(kind="unsupported", reason="grouped convolutions (feature_group_count > 1) are not supported.")
    if module.mask is not None:
        return Layout(kind="unsupported", reason="masked convolution kernels (`mask`) are not supported.")
    return Layout(fan_in=len(module.kernel_size) + 1, fan_out=1, kind="conv")


def _kernel_layout(module: Any) -> Layout:
    """``_own_layout`` with the kernel's extra leading axes (``nnx.vmap``/``nnx.scan`` stacks) counted as stack."""
    own = _own_layout(module)
    if own.kind == "unsupported":
        return own
    ndim = len(getattr(module, _weight_name(module)).shape)
    extra = ndim - own.ndim
    if extra < 0:
        return Layout(kind="unsupported", reason=f"its weight has {ndim} axes but the layer expects {own.ndim}.")
    return Layout(own.stack + extra, own.fan_in, own.fan_out, own.kind)


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


def _dequantized_run(base: Any, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``base(x)`` over a quantised weight: a copy of the layer holding the dequantised weight, under
    ``jax.checkpoint`` (only the codes and the input are saved for the backward pass, the full-precision weight is
    recomputed there)."""
    graphdef, state = nnx.split(base)
    weight = _weight_name(base)

    @jax.checkpoint
    def run(inp: jax.Array, state: Any) -> jax.Array:
        layer = nnx.merge(graphdef, state)
        var = getattr(layer, weight)
        var.set_value(quant.dequantize(var.get_value()))
        fn = layer.attend if method == "attend" else layer
        out: jax.Array = fn(inp, *args, **kwargs)
        return out

    return lambda inp: run(inp, state)


def _layer_call(
    base: Any, method: str, x: Any, args: tuple[Any, ...], kwargs: dict[str, Any], key: Any, ids: Any = None
) -> LayerCall:
    """The one place that translates an NNX layer call into the neutral ``LayerCall``.

    Over a quantised weight, ``base`` runs the layer on its dequantised weight (see ``_dequantized_run``) and
    ``kernel`` is the dequantised weight (computed only when a method reads it, e.g. DoRA's norm).
    """
    fn = base.attend if method == "attend" else base

    def run(inp: jax.Array) -> jax.Array:
        return fn(inp, *args, **kwargs)

    kernel = getattr(base, _weight_name(base)).get_value()
    if quant.is_quantized(kernel):
        run = _dequantized_run(base, method, args, kwargs)
        kernel = quant.dequantize(kernel)
    common = {
        "x": x,
        "base": run,
        "kernel": kernel,
        "precision": getattr(base, "precision", None),
        "dropout_key": key,
        "adapter_ids": ids,
    }
    if isinstance(base, nnx.Embed):
        return LayerCall(kind="attend" if method == "attend" else "embed", **common)
    bias_var = getattr(base, "bias", None)
    bias = bias_var.get_value() if bias_var is not None else None
    if isinstance(base, nnx.Linear):
        return LayerCall(kind="dense", bias=bias, **common)
    if isinstance(base, nnx.LinearGeneral):
        return LayerCall(kind="dense_general", bias=bias, axes=tuple(base.axis), **common)
    if isinstance(base, nnx.Einsum):
        subscripts = kwargs.get("einsum_str", args[0] if args else None) or base.einsum_str
        if bias is not None:
            p = ops.einsum_plan(subscripts)
            letters = "".join(c for c in p.out_spec if c in p.stack + p.fan_out)
            bias = ops.broadcast_to_spec(bias, letters, p.out_spec, len(p.out_spec))
        return LayerCall(kind="einsum", bias=bias, subscripts=subscripts, **common)
    return LayerCall(kind="conv", bias=bias, conv=_conv_fn(base), **common)


class AdapterLayer(nnx.Module):
    """A supported layer and its adapter; calling it runs the adapter's forward rule (``LoRA: base(x) + s·(x·A)·B``).

    The adapter's arrays are ``AdapterParam`` attributes named after its fields (``a``, ``b``, ``magnitude``,
    ``vector``, ...); its static part (class, scale, layout) is kept as graph metadata. Inside
    ``nnx.scan``/``nnx.vmap`` stacks the arrays carry the kernel's leading stack axes and are sliced with it.

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
        self._store(adapter)

    def _store(self, adapter: Adapter) -> None:
        flat, treedef = jax.tree_util.tree_flatten_with_path(adapter)
        names = tuple(path_str(kp) for kp, _ in flat)
        clash = [n for n in names if n in _RESERVED or not n.isidentifier()]
        if clash:
            raise ValueError(
                f"{type(adapter).__name__} has array fields {clash} that jaxpeft.nnx cannot store as attributes; "
                f"rename them (reserved: {_RESERVED})."
            )
        self.treedef = treedef
        self.names = names
        self.stored_ndim = flat[0][1].ndim if flat else 0
        for name, (_, value) in zip(names, flat, strict=True):
            setattr(self, name, AdapterParam(jnp.asarray(value)))

    def __getattr__(self, name: str) -> Any:
        base = self.__dict__.get("base")
        if name.startswith("_") or base is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        raise AttributeError(
            f"AdapterLayer (wrapping nnx.{type(base).__name__}) has no attribute {name!r}. The wrapped layer is "
            "`.base`, but reading its weights directly skips the adapter: call the layer, or "
            "jaxpeft.nnx.merge(model) first."
        )

    @property
    def adapter(self) -> Adapter:
        """The current adapter node (the pure-pytree form; sliced inside ``nnx.scan``/``nnx.vmap``)."""
        leaves = [getattr(self, n).get_value() for n in self.names]
        node: Adapter = jax.tree_util.tree_unflatten(self.treedef, leaves)
        return node.at_call(self.stored_ndim - leaves[0].ndim) if leaves else node

    def set_view(self, deterministic: bool | None = None) -> None:
        """Used by ``nnx.view``: ``deterministic=True`` disables dropout."""
        if deterministic is not None:
            self.deterministic = deterministic

    def _ids(self, node: Adapter) -> jax.Array | None:
        """The adapter ids set by ``set_adapter_ids``, with the stack axes that remain at this call indexed away."""
        if self.adapter_ids is None:
            return None
        ids: jax.Array = self.adapter_ids.get_value()
        return ids[(0,) * node.layout.stack] if isinstance(node, AdapterBank) else ids

    def _dropout_key(self) -> jax.Array | None:
        if self.deterministic or self.rngs is None:
            return None
        return self.rngs()

    def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        """The adapted layer; at init every built-in method returns exactly ``base(x, *args, **kwargs)``."""
        node = self.adapter
        call = _layer_call(self.base, "__call__", x, args, kwargs, self._dropout_key, self._ids(node))
        return node.forward(call)

    def attend(self, query: jax.Array, **kwargs: Any) -> jax.Array:
        """``nnx.Embed.attend`` with the adapter applied (a tied output head); embeddings only."""
        if not isinstance(self.base, nnx.Embed):
            raise AttributeError(
                f"`attend` exists on wrapped nnx.Embed layers only; this wraps nnx.{type(self.base).__name__}."
            )
        node = self.adapter
        return node.forward(_layer_call(self.base, "attend", query, (), kwargs, self._dropout_key, self._ids(node)))


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
        return _dequantized_run(self.base, "__call__", args, kwargs)(x)


class _LeafSlot(nnx.Module):
    """The ``AdapterParam`` arrays and static parts of one leaf adapter (a slot of a ``LeafAdapterLayer``)."""

    def __init__(self, adapter: Adapter) -> None:
        flat, treedef = jax.tree_util.tree_flatten_with_path(adapter)
        names = tuple(path_str(kp) for kp, _ in flat)
        clash = [n for n in names if n in _RESERVED or not n.isidentifier()]
        if clash:
            raise ValueError(
                f"{type(adapter).__name__} has array fields {clash} that jaxpeft.nnx cannot store as attributes; "
                f"rename them (reserved: {_RESERVED})."
            )
        self.treedef = treedef
        self.names = names
        self.stored_ndim = flat[0][1].ndim if flat else 0
        for name, (_, value) in zip(names, flat, strict=True):
            setattr(self, name, AdapterParam(jnp.asarray(value)))

    @property
    def adapter(self) -> Adapter:
        """The current adapter node (sliced inside ``nnx.scan``/``nnx.vmap``)."""
        leaves = [getattr(self, n).get_value() for n in self.names]
        node: Adapter = jax.tree_util.tree_unflatten(self.treedef, leaves)
        return node.at_call(self.stored_ndim - leaves[0].ndim) if leaves else node


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
        self.leaves = nnx.Dict({name: _LeafSlot(node) for name, node in sorted(adapters.items())})

    def __getattr__(self, name: str) -> Any:
        base = self.__dict__.get("base")
        if name.startswith("_") or base is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        raise AttributeError(
            f"LeafAdapterLayer (wrapping {type(base).__name__}) has no attribute {name!r}. The wrapped module is "
            "`.base`, but reading its leaves directly skips the adapters: call the layer, or jaxpeft.nnx.merge(model)."
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped module's output with its adapted leaves substituted; at init exactly ``base(*args)``."""
        graphdef, state = nnx.split(self.base)
        layer = nnx.merge(graphdef, state, copy=True)  # own variables: `base` is not touched
        for name, slot in self.leaves.items():
            var = getattr(layer, name)
            var.set_value(cast(LeafAdapter, slot.adapter).value(var.get_value()))
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

    The selection is that of ``jaxpeft.quant.quantize(base_params(model), targets, ...)`` (a method config, e.g.
    the ``LoraConfig`` you will train with, or a target spec); each quantised layer is wrapped in a
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


def infer_layouts(model: Any) -> dict[str, Layout]:
    """The layout of every ``nnx.Param`` leaf, read from the modules' own configuration (no tracing).

    Weights of ``nnx.Linear``, ``LinearGeneral``, ``Einsum``, ``Conv`` and ``Embed`` get their kind, fan-in and
    fan-out; extra leading axes (stacks built with ``nnx.vmap``/``nnx.scan``) count as ``stack``. Every other
    parameter gets ``kind="unsupported"`` with the reason, so a target that selects it fails loudly.
    Paths are canonical: ``"layers/0/attn/q_proj/kernel"`` (an ``AdapterLayer`` adds no path level).

    Args:
      model: an NNX module (real or abstract, e.g. from ``nnx.eval_shape``), adapted or not.

    Returns:
      ``{"path/to/kernel": Layout}`` for every ``nnx.Param`` of the model, sorted by path.
    """
    canon = _Canon(model)
    layouts: dict[str, Layout] = {}
    for parts, module in canon.layers():
        layouts[_path_text(parts)] = _kernel_layout(module)
    owners = dict(canon.nodes)
    for parts, node in canon.nodes:
        path = _path_text(canon(parts))
        if not isinstance(node, nnx.Param) or path in layouts:
            continue
        owner = owners.get(parts[:-1])
        if isinstance(owner, _SUPPORTED):
            reason = f"only the layer's `{_weight_name(owner)}` is adapted, not its `{parts[-1]}`."
        else:
            reason = (
                f"it belongs to a {type(owner).__name__}, which jaxpeft.nnx cannot adapt (it adapts the weights of "
                f"{', '.join('nnx.' + c.__name__ for c in _SUPPORTED)})."
            )
        layouts[path] = Layout(kind="unsupported", reason=reason)
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


def _validated(model: Any, adapters: Any) -> tuple[dict[str, Adapter], dict[str, tuple[tuple[int, ...], Layout]]]:
    """The adapter table and each supported layer's ``(weight shape, layout)``, after checking that they fit."""
    table = dict(adapter_items(adapters))
    shapes: dict[str, tuple[tuple[int, ...], Layout]] = {}
    for parts, module in _Canon(model).layers():
        shapes[_path_text(parts)] = (tuple(getattr(module, _weight_name(module)).shape), _kernel_layout(module))
    layouts = infer_layouts(model)
    _leaf_params(model, table)  # leaf adapters (BitFit, LN tuning) sit on a module's own leaves
    for path, node in sorted(table.items()):
        if isinstance(node, LeafAdapter):
            continue
        if path not in shapes:
            known = [p for p, (_, lay) in shapes.items() if lay.kind != "unsupported"][:4]
            why = f" {layouts[path].reason}" if path in layouts else ""
            raise ValueError(
                f"adapter {path!r} names no nnx.Linear/LinearGeneral/Einsum/Conv/Embed weight of `model`.{why} "
                f"Adaptable weights look like {', '.join(map(repr, known)) or 'none'}; were the adapters made for "
                "this model?"
            )
        shape, layout = shapes[path]
        if layout.kind == "unsupported":
            raise ValueError(f"adapter {path!r}: the layer cannot be adapted: {layout.reason}")
        check_fits(path, node, shape)
    return table, shapes


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
        transformed = weight_shape[: len(weight_shape) - _own_layout(module).ndim]
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

    Args:
      model: an NNX module without adapters.
      adapters: nested dicts with an adapter node at each adapted weight path.
      rngs: ``nnx.Rngs`` whose ``"dropout"`` stream feeds the adapters' dropout (each layer forks its own stream,
        split along the ``nnx.vmap``/``nnx.scan`` axes for stacked layers). Without it, dropout is off.

    Returns:
      The adapted model.

    Raises:
      ValueError: the model is already adapted; an adapter path names no supported layer; shapes do not fit.
    """
    _check_unadapted(model, "jaxpeft.nnx.attach")
    table, _ = _validated(model, adapters)
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


def adapt(model: M, cfg: MethodConfig, *, key: jax.Array, rngs: nnx.Rngs | None = None) -> M:
    """A copy of ``model`` with the method of ``cfg`` on the layers it selects; its output equals the base at init.

    Selection and initial values are exactly those of ``jaxpeft.init(cfg, base_params(model), key=key,
    layouts=infer_layouts(model))`` (same key, same adapters). Each targeted layer is wrapped in an
    ``AdapterLayer``. ``model`` is left untouched; base arrays are shared.

    Train the adapters with ``jaxpeft.nnx.optimizer(model, tx)``, or functionally with a three-way split::

        graphdef, adapters, frozen = nnx.split(model, jaxpeft.nnx.AdapterParam, ...)
        grads = jax.grad(lambda t: loss(nnx.merge(graphdef, t, frozen, copy=True)))(adapters)   # adapters only

    With dropout, split ``nnx.RngState`` out as a fourth part and carry it between steps.

    Args:
      model: an NNX module without adapters (real, or abstract from ``nnx.eval_shape``).
      cfg: the method config; ``"all-linear"`` adapts Linear/LinearGeneral/Einsum layers except output heads.
      key: ``jax.random`` key for the adapter init.
      rngs: optional ``nnx.Rngs`` with a ``"dropout"`` stream; dropout runs only when given.

    Returns:
      The adapted model.

    A config that adjusts the base (PiSSA/OLoRA, ``cfg.adjusts_base``) follows ``jaxpeft.init_adjusted``
    instead: the copy's adapted layers get the residual weights (``W - s·A·B``) as their base kernels, so its
    output equals the original model's up to float rounding, and ``merge`` gives the original weights plus the
    trained update. ``model`` keeps its weights.

    Raises:
      ValueError: as ``jaxpeft.plan`` (nothing matched, unsupported layer selected, ...) or the model already has
        adapters; as ``jaxpeft.init_adjusted`` for a base-adjusting config.
    """
    _check_unadapted(model, "jaxpeft.nnx.adapt")
    params, layouts = base_params(model), infer_layouts(model)
    if not (isinstance(cfg, MethodConfig) and cfg.adjusts_base):  # (method_init reports a wrong `cfg`)
        return attach(model, method_init(cfg, params, key=key, layouts=layouts), rngs=rngs)
    residual, adapters = method_init_adjusted(cfg, params, key=key, layouts=layouts)
    adapted = attach(model, adapters, rngs=rngs)
    weights = dict(leaves_with_paths(residual, is_leaf=quant.is_quantized))
    for path, wrapper in _Canon(adapted).adapted():  # the copy's own variables: `model` is not touched
        getattr(wrapper.base, _weight_name(wrapper.base)).set_value(weights[path])
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
    banks = [(p, layer) for p, layer in _Canon(model).adapted() if isinstance(layer.adapter, AdapterBank)]
    if not banks:
        raise ValueError("the model holds no adapter bank; attach one first: jaxpeft.nnx.attach(model, bank).")
    if ids is None:
        for _, layer in banks:
            layer.adapter_ids = None
        return
    if isinstance(ids, str) or (isinstance(ids, (list, tuple)) and any(isinstance(i, str) for i in ids)):
        raise ValueError(f"`ids`={ids!r} holds names; pass integer ids: jaxpeft.adapter_ids(bank, {ids!r}).")
    value = jnp.asarray(ids)
    n = min(len(layer.adapter.names) for _, layer in banks)  # type: ignore[attr-defined]
    if not jnp.issubdtype(value.dtype, jnp.integer) or value.ndim > 1:
        raise ValueError(
            f"`ids` has dtype {value.dtype} and shape {value.shape}; expected integers of shape () or (batch,)."
        )
    if int(jnp.min(value)) < 0 or int(jnp.max(value)) >= n:
        raise ValueError(
            f"`ids` ranges over [{int(jnp.min(value))}, {int(jnp.max(value))}]; the bank holds {n} adapters."
        )
    for _, layer in banks:
        node = layer.adapter
        stack = tuple(jax.tree.leaves(node)[0].shape[: node.layout.stack])
        layer.adapter_ids = AdapterIds(jnp.broadcast_to(value, (*stack, *value.shape)))


def optimizer(model: Any, tx: optax.GradientTransformation) -> nnx.Optimizer:
    """``nnx.Optimizer`` over exactly the adapters of ``model`` (``wrt=AdapterParam``): the base stays frozen.

    The filter is the one place where a typo trains the wrong thing silently (``wrt=nnx.LoRAParam`` holds no
    state here, ``wrt=nnx.Param`` trains the base), so this builds it for you and checks the result.

    Raises:
      ValueError: ``model`` has no adapters, or the optimizer would hold no adapter state.
    """
    adapters_of(model)  # raises with the fix when there are none
    opt = nnx.Optimizer(model, tx, wrt=AdapterParam)
    if not jax.tree.leaves(nnx.state(model, AdapterParam)):
        raise ValueError("the optimizer would train nothing: `model` holds no AdapterParam arrays.")
    return opt


def load_adapters(model: Any, adapters: Any) -> None:
    """Set the adapters of an adapted model in place (values and static parts), from the pure form.

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
        old_shapes = {n: tuple(x.shape) for n, x in zip(wrapper.names, jax.tree.leaves(old), strict=True)}
        flat, _ = jax.tree_util.tree_flatten_with_path(new)
        new_shapes = {path_str(kp): tuple(x.shape) for kp, x in flat}
        if type(old) is not type(new) or old_shapes != new_shapes:
            raise ValueError(
                f"adapter {path!r} is a {type(new).__name__} with {new_shapes}; the model's layer holds a "
                f"{type(old).__name__} with {old_shapes}. Use adapters of the same method and shapes."
            )
    for path, wrapper in rows.items():
        node = table[path]
        flat, treedef = jax.tree_util.tree_flatten_with_path(node)
        wrapper.treedef = treedef
        for name, (_, value) in zip(wrapper.names, flat, strict=True):
            getattr(wrapper, name).set_value(jnp.asarray(value))


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


def _fold_fn(weight: Any, bias: jax.Array | None, node: Adapter, sign: int) -> Any:
    new_weight, new_bias, _, _ = fold_target(node, weight, bias, sign)
    return new_weight, new_bias


# One compilation per weight shape and node type; `sign` is static.
_fold_jit = jax.jit(_fold_fn, static_argnums=3)


def _fold_into(plain: M, adapters: Any, sign: int) -> M:
    """Fold each adapter into (or out of) the weights of a plain model, in place (its variables are not shared)."""
    table, _ = _validated(plain, adapters)
    for parts, module in _Canon(plain).layers():
        path = _path_text(parts)
        node = table.get(path)
        if node is None:
            continue
        weight = getattr(module, _weight_name(module))
        bias_var = getattr(module, "bias", None)
        bias = bias_var.get_value() if bias_var is not None else None
        new_w, new_b = _fold_jit(weight.get_value(), bias, node, sign)
        weight.set_value(new_w)
        if new_b is not None and bias_var is not None:
            bias_var.set_value(new_b)
    for path, var in _leaf_params(plain, table).items():  # leaf adapters: the leaf itself, e.g. bias + delta
        var.set_value(_fold_jit(var.get_value(), None, table[path], sign)[0])
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
    return _fold_into(remove(model), adapters, 1)


def unmerge(model: M, adapters: Any, *, rngs: nnx.Rngs | None = None) -> M:
    """The inverse of ``merge``: each adapter taken back out of its weight, with the adapters attached again.

    ``unmerge(merge(m), adapters_of(m))`` equals ``m`` up to float rounding. ``model`` is left untouched.

    Raises:
      NotMergeableError: a method whose merge cannot be undone (DoRA: keep the model you merged instead).
    """
    _check_unadapted(model, "jaxpeft.nnx.unmerge")
    plain = _fold_into(nnx.clone(model), adapters, -1)
    return attach(plain, adapters, rngs=rngs)
