"""Flax Linen support: learn kernel layouts from the model, then run it with any method's adapters in the forward.

``apply`` places each adapter's arrays beside their kernel in the ``params`` collection (so ``nn.scan``,
``nn.vmap`` and ``nn.remat`` slice them exactly like the kernel) and, for the dynamic extent of that one call,
intercepts ``nn.Dense``, ``nn.DenseGeneral``, ``nn.Einsum``, ``nn.Conv`` and ``nn.Embed``: each adapted call is
described once as a framework-neutral ``jaxpeft.LayerCall`` and handed to the adapter's own forward rule. The
built-in rules never form ``W + ΔW`` and no gradient of a frozen kernel is ever computed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax

from jaxpeft import _framework as core
from jaxpeft import quant
from jaxpeft._paths import leaves_with_paths, set_path
from jaxpeft._select import LayoutEntry, Unsupported
from jaxpeft.api import Plan
from jaxpeft.api import init as method_init
from jaxpeft.api import init_adjusted as method_init_adjusted
from jaxpeft.api import plan as method_plan
from jaxpeft.protocol import Adapter, MethodConfig, adapter_items, check_fits

__all__ = ["apply", "infer_layouts", "init", "init_adjusted", "plan", "quantize"]

_PREFIX = "peft::"
_SUPPORTED = (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv, nn.Embed)


def _weight_name(module: nn.Module) -> str:
    return "embedding" if isinstance(module, nn.Embed) else "kernel"


def _as_tuple(v: Any) -> tuple[Any, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


def _overrides(module: nn.Module) -> str | None:
    """``"nn.Dense.__call__"`` when ``module``'s class overrides that method of its Flax layer class, else None."""
    cls = next(c for c in _SUPPORTED if isinstance(module, c))
    for method in ("__call__", "attend"):
        if hasattr(cls, method) and getattr(type(module), method) is not getattr(cls, method):
            return f"nn.{cls.__name__}.{method}"
    return None


def _info(module: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> core.LayerInfo:
    """The neutral description of a supported Linen layer as the call sees it (scan stacks already sliced)."""
    common: dict[str, Any] = {"overrides": _overrides(module), "class_name": type(module).__name__}
    if isinstance(module, nn.Embed):
        return core.LayerInfo("embed", **common)
    if isinstance(module, nn.Dense):
        return core.LayerInfo("dense", **common)
    if isinstance(module, nn.DenseGeneral):
        fan_in, fan_out = len(_as_tuple(module.axis)), len(_as_tuple(module.features))
        return core.LayerInfo("dense_general", fan_in, fan_out, batch_axes=bool(_as_tuple(module.batch_dims)), **common)
    if isinstance(module, nn.Einsum):
        return core.LayerInfo("einsum", subscripts=_einsum_str(module, args, kwargs), **common)
    kernel: Any = module.get_variable("params", "kernel")
    masked = module.mask is not None
    return core.LayerInfo("conv", kernel.ndim - 1, groups=module.feature_group_count, masked=masked, **common)


def _einsum_str(module: nn.Einsum, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    given = kwargs.get("einsum_str", args[1] if len(args) > 1 else None)
    subscripts = given if given is not None else module.einsum_str
    if not isinstance(subscripts, str):
        raise ValueError(f"nn.Einsum at {'/'.join(module.path)!r} has no einsum string; pass `einsum_str`.")
    return subscripts


def infer_layouts(model: nn.Module, *args: Any, method: Any = None, **kwargs: Any) -> dict[str, LayoutEntry]:
    """Learn the layout of every Dense/DenseGeneral/Einsum/Conv/Embed kernel by tracing ``model.init``.

    The trace is abstract (``jax.eval_shape``): no FLOPs, no memory. Kernels stacked by ``nn.scan``/``nn.vmap``
    get their extra leading axes counted as ``stack``.

    Args:
      model: the Linen module.
      *args: sample inputs (arrays or ``jax.ShapeDtypeStruct``) as for ``model.init``.
      method: optional method to trace instead of ``__call__``.
      **kwargs: keyword arguments for the call.

    Returns:
      ``{"path/to/leaf": Layout}`` for every supported layer's weight, and ``jaxpeft.Unsupported(reason)`` for each
      other parameter (a layer that cannot be adapted, a bias, a parameter of another module), so a target that
      selects one fails with the reason, as in ``jaxpeft.nnx.infer_layouts``.
    """
    seen: dict[str, LayoutEntry] = {}
    owners: dict[tuple[str, ...], tuple[str, bool, str]] = {}

    def record(next_fun: Any, a: tuple[Any, ...], kw: dict[str, Any], context: Any) -> Any:
        out = next_fun(*a, **kw)
        module = context.module
        if module.scope is None:
            return out
        supported = isinstance(module, _SUPPORTED)
        owners.setdefault(tuple(module.path), (type(module).__name__, supported, _weight_name(module)))
        if supported and context.method_name == "__call__":
            seen["/".join((*module.path, _weight_name(module)))] = core.layer_layout(_info(module, a, kw))
        return out

    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    with nn.intercept_methods(record):
        variables = jax.eval_shape(lambda: model.init(rngs, *args, method=method, **kwargs))
    layouts: dict[str, LayoutEntry] = {}
    for path, leaf in leaves_with_paths(variables.get("params", {})):
        if path in seen:
            layouts[path] = core.stacked_layout(seen[path], len(leaf.shape))
            continue
        module, _, name = path.rpartition("/")
        owner = owners.get(tuple(module.split("/")) if module else ())
        cls, supported, weight = owner if owner is not None else (None, False, "kernel")
        layouts[path] = core.unsupported_leaf(cls, supported, weight, name)
    return layouts


def _layouts(
    model: nn.Module, params: Any, args: tuple[Any, ...], method: Any, kwargs: Mapping[str, Any]
) -> dict[str, LayoutEntry]:
    """``infer_layouts`` on the sample inputs, after refusing a whole variables dict passed as ``params``."""
    layouts = infer_layouts(model, *args, method=method, **kwargs)
    if isinstance(params, Mapping) and "params" in params and not any(p.startswith("params/") for p in layouts):
        raise ValueError(
            f"`params` has the top-level keys {sorted(params)[:4]}: it looks like the whole variables dict. Pass "
            "its 'params' collection, e.g. jaxpeft.linen.init(cfg, model, variables['params'], x, key=key)."
        )
    return layouts


def plan(cfg: MethodConfig, model: nn.Module, params: Any, *args: Any, method: Any = None, **kwargs: Any) -> Plan:
    """``jaxpeft.plan`` with layouts inferred from ``model`` on the sample inputs ``args`` (a dry run)."""
    return method_plan(cfg, params, layouts=_layouts(model, params, args, method, kwargs))


def init(
    cfg: MethodConfig,
    model: nn.Module,
    params: Any,
    *args: Any,
    key: jax.Array,
    method: Any = None,
    check_identity: bool = True,
    **kwargs: Any,
) -> dict[str, Any]:
    """``jaxpeft.init`` with layouts inferred from ``model`` on the sample inputs ``args``.

    Raises:
      ValueError: ``params`` is the whole ``{"params": ...}`` variables dict; and as ``jaxpeft.init``.
    """
    layouts = _layouts(model, params, args, method, kwargs)
    return method_init(cfg, params, key=key, layouts=layouts, check_identity=check_identity)


def init_adjusted(
    cfg: MethodConfig,
    model: nn.Module,
    params: Any,
    *args: Any,
    key: jax.Array,
    method: Any = None,
    check_identity: bool = True,
    **kwargs: Any,
) -> tuple[Any, dict[str, Any]]:
    """``jaxpeft.init_adjusted`` with layouts inferred from ``model``: ``(new_params, adapters)``.

    For a base-adjusting config (PiSSA/OLoRA: ``cfg.adjusts_base``) run the model as
    ``apply(model, {"params": new_params}, adapters, ...)``: at init it computes the original model's outputs up
    to float rounding, and ``jaxpeft.merge(new_params, trained)`` is the original weights plus the trained update.

    Raises:
      ValueError: ``params`` is the whole ``{"params": ...}`` variables dict; and as ``jaxpeft.init_adjusted``.
    """
    return method_init_adjusted(
        cfg, params, key=key, layouts=_layouts(model, params, args, method, kwargs), check_identity=check_identity
    )


def quantize(
    targets: Any, model: nn.Module, params: Any, *args: Any, kind: str = "nf4", method: Any = None, **kwargs: Any
) -> Any:
    """``jaxpeft.quantize`` (QLoRA's frozen base) with layouts inferred from ``model`` on the sample inputs ``args``.

    ``targets`` is the method config you will train with (its selection) or a target spec. Run the result with
    :func:`apply` (``model.apply`` cannot consume quantised weights).

    Raises:
      ValueError: ``params`` is the whole ``{"params": ...}`` variables dict; and as ``jaxpeft.quantize``.
    """
    return quant.quantize(params, targets, kind=kind, layouts=_layouts(model, params, args, method, kwargs))


def _augment(params: Any, nodes: Mapping[str, Adapter]) -> tuple[Any, dict[tuple[str, ...], dict[str, core.Stored]]]:
    """Params with each layer node's arrays stored beside its kernel, and the static per-module table."""
    table: dict[tuple[str, ...], dict[str, core.Stored]] = {}
    shapes = {p: tuple(leaf.shape) for p, leaf in leaves_with_paths(params, is_leaf=quant.is_quantized)}
    for path, node in nodes.items():
        if path in shapes:
            check_fits(path, node, shapes[path])
        module_path, _, leaf = path.rpartition("/")
        stored = core.Stored.of(node)
        for name, value in zip(stored.names, jax.tree.leaves(node), strict=True):
            key = f"{_PREFIX}{leaf}::{name}"
            params = set_path(params, f"{module_path}/{key}" if module_path else key, value)
        table.setdefault(tuple(module_path.split("/")) if module_path else (), {})[leaf] = stored
    return params, table


class _Guard:
    """Marks the dynamic extent of a detached base call, whose own layer call must not be intercepted again."""

    def __init__(self) -> None:
        self.depth = 0

    def __enter__(self) -> None:
        self.depth += 1

    def __exit__(self, *exc: object) -> None:
        self.depth -= 1


def _runner(
    module: nn.Module, method: str, bind: Callable[[jax.Array], tuple[tuple[Any, ...], dict[str, Any]]], guard: _Guard
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``run_with(weight, x)``: the layer's own code on another weight, in a detached clone (inside JAX transforms
    and ``jax.checkpoint``, where the bound module cannot run)."""
    others: dict[str, Any] = {}
    if module.has_variable("params", "bias"):
        others["bias"] = module.get_variable("params", "bias")
    clone = module.clone(parent=None, name=None)
    name = None if method == "__call__" else method
    weight_name = _weight_name(module)

    def run_with(weight: jax.Array, inp: jax.Array) -> jax.Array:
        a, kw = bind(inp)
        with guard:
            out: jax.Array = clone.apply({"params": {weight_name: weight, **others}}, *a, method=name, **kw)  # type: ignore[assignment]
        return out

    return run_with


def _layer_call(
    module: nn.Module,
    method: str,
    next_fun: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    guard: _Guard,
    *,
    detached: bool = False,
    adapter_ids: Any = None,
) -> Any:
    """A Linen layer call, translated by the framework core (``jaxpeft._framework.layer_call``)."""
    bind: Callable[[jax.Array], tuple[tuple[Any, ...], dict[str, Any]]]
    if args:
        x, rest = args[0], args[1:]

        def bind(inp: jax.Array) -> tuple[tuple[Any, ...], dict[str, Any]]:
            return (inp, *rest), kwargs
    else:
        name = next(iter(kwargs))
        x = kwargs[name]

        def bind(inp: jax.Array) -> tuple[tuple[Any, ...], dict[str, Any]]:
            return (), {**kwargs, name: inp}

    def run(inp: jax.Array) -> jax.Array:
        a, kw = bind(inp)
        out: jax.Array = next_fun(*a, **kw)
        return out

    def dropout_key() -> jax.Array | None:
        scope = module.scope
        return module.make_rng("dropout") if scope is not None and scope.has_rng("dropout") else None

    def conv(inp: jax.Array, k: jax.Array) -> jax.Array:
        branch = module.clone(parent=None, name=None, features=k.shape[-1], use_bias=False, dtype=inp.dtype)
        with guard:
            out: jax.Array = branch.apply({"params": {"kernel": k}}, inp)  # type: ignore[assignment]
        return out

    info = _info(module, args, kwargs)
    layout = core.layer_layout(info)
    if isinstance(layout, Unsupported):
        path = "/".join((*module.path, _weight_name(module)))
        raise ValueError(f"{path!r} cannot be adapted: {layout.reason} Add it to `exclude`.")
    kind = "attend" if method == "attend" else info.kind
    return core.layer_call(
        kind,
        x,
        run,
        module.get_variable("params", _weight_name(module)),
        run_with=_runner(module, method, bind, guard),
        detached=detached,
        bias=module.get_variable("params", "bias") if module.has_variable("params", "bias") else None,
        axes=_as_tuple(module.axis) if kind == "dense_general" else None,
        subscripts=info.subscripts,
        conv=conv if kind == "conv" else None,
        precision=getattr(module, "precision", None),
        dropout_key=dropout_key,
        adapter_ids=adapter_ids,
    )


def _holds_quantized(module: nn.Module, leaf: str) -> bool:
    return module.has_variable("params", leaf) and quant.is_quantized(module.get_variable("params", leaf))


def _interceptor(
    table: Mapping[tuple[str, ...], Mapping[str, core.Stored]], used: set[str], quantized: bool, adapter_ids: Any
) -> Any:
    guard = _Guard()

    def intercept(next_fun: Any, args: tuple[Any, ...], kwargs: dict[str, Any], context: Any) -> Any:
        module = context.module
        method = context.method_name
        if guard.depth or not isinstance(module, _SUPPORTED) or module.scope is None:
            return next_fun(*args, **kwargs)
        if method not in ("__call__", "attend") or (method == "attend" and not isinstance(module, nn.Embed)):
            return next_fun(*args, **kwargs)
        leaf = _weight_name(module)
        entry = table.get(module.path)
        stored = entry.get(leaf) if entry is not None else None
        if stored is None and not (quantized and _holds_quantized(module, leaf)):
            return next_fun(*args, **kwargs)
        detached = stored is not None and stored.cls.transforms_base
        call = _layer_call(module, method, next_fun, args, kwargs, guard, detached=detached, adapter_ids=adapter_ids)
        if stored is None:  # a quantised weight without an adapter: the layer on its dequantised weight
            return call.base(call.x)
        used.add("/".join((*module.path, leaf)))
        arrays = [module.get_variable("params", f"{_PREFIX}{leaf}::{name}") for name in stored.names]
        return stored.node(arrays, call=True).forward(call)  # type: ignore[attr-defined]

    return intercept


def apply(
    model: nn.Module,
    variables: Mapping[str, Any],
    adapters: Any,
    *args: Any,
    rngs: Any = None,
    method: Any = None,
    mutable: Any = False,
    strict: bool = True,
    adapter_ids: Any = None,
    **kwargs: Any,
) -> Any:
    """``model.apply(variables, *args)`` with every adapted layer running its adapter's forward rule.

    For LoRA that is ``base(x) + s·(x·A)·B``; for DoRA and IA3 see their adapter classes. Differentiate with
    respect to ``adapters`` only (close over ``variables``): the gradient then contains the adapters alone, and
    no kernel gradient is ever computed. Works under ``jax.jit`` and inside ``nn.scan``, ``nn.vmap`` and
    ``nn.remat`` stacks. Dropout runs when ``rngs`` has a ``"dropout"`` key and the method's dropout rate is
    positive (a scanned stack should split the ``"dropout"`` rng, as usual).

    Leaf methods (``jaxpeft.LeafAdapter``: BitFit, LN tuning) intercept nothing: each adapted leaf is replaced by
    ``node.value(leaf)`` (``leaf + delta``) in the params before ``model.apply``, so the model's own code runs.

    Params may hold quantised weights (``jaxpeft.quantize``, QLoRA): each layer whose weight is quantised runs
    its own code on the dequantised weight inside ``jax.checkpoint`` (adapted or not), so the full-precision
    weight is a per-call transient, recomputed in the backward pass. ``model.apply`` itself cannot run
    quantised params; use this function (``adapters`` may be ``{}``).

    Args:
      model: the Linen module.
      variables: its variables, e.g. ``{"params": params}`` (other collections pass through).
      adapters: the tree from ``jaxpeft.init`` / ``jaxpeft.linen.init`` (any method).
      *args: the call's inputs.
      rngs: optional rngs for ``model.apply`` (``{"dropout": key}`` enables dropout).
      method: optional method to call instead of ``__call__``.
      mutable: as in ``model.apply``.
      strict: raise if an adapter was not used by the call (a silent no-op otherwise).
      adapter_ids: for adapter banks (``jaxpeft.stack_adapters``): an integer array, shape ``()`` (one adapter for
        the call) or ``(batch,)`` (one per example: a mixed batch); ``jaxpeft.adapter_ids`` makes it from names.
        Data, not a Python branch: new ids never recompile.
      **kwargs: keyword arguments for the call.

    Returns:
      Whatever ``model.apply`` returns.

    Raises:
      ValueError: no ``params`` collection; an adapter that does not fit its weight (names the path and both
        shapes); with ``strict``, an adapter the call never used.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxpeft, jaxpeft.linen
      >>> model, x = nn.Dense(3), jnp.ones((2, 4))
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> cfg = jaxpeft.LoraConfig(rank=2, targets="all-linear")
      >>> adapters = jaxpeft.linen.init(cfg, model, params, x, key=jax.random.key(1))
      >>> y = jaxpeft.linen.apply(model, {"params": params}, adapters, x)
      >>> y.shape, bool(jnp.allclose(y, model.apply({"params": params}, x)))  # the identity at init
      ((2, 3), True)
    """
    if "params" not in variables:
        raise ValueError(
            f"`variables` has collections {sorted(variables)}; expected a 'params' collection, "
            "e.g. jaxpeft.linen.apply(model, {'params': params}, adapters, x)."
        )
    layers, leaves = core.layer_nodes(adapters, "jaxpeft.linen.apply")
    params, substituted = core.substitute(variables["params"], leaves)  # leaf methods: the model sees leaf + delta
    params, table = _augment(params, layers)
    quantized = any(quant.is_quantized(x) for x in jax.tree.leaves(params, is_leaf=quant.is_quantized))
    used: set[str] = set(substituted)
    if adapter_ids is not None:
        banks = {p: n for p, n in layers.items() if n.bank_size is not None}
        adapter_ids = core.check_ids(adapter_ids, banks)
    with nn.intercept_methods(_interceptor(table, used, quantized, adapter_ids)):
        out = model.apply({**variables, "params": params}, *args, rngs=rngs, method=method, mutable=mutable, **kwargs)
    unused = sorted({p for p, _ in adapter_items(adapters)} - used)
    if strict and unused:
        raise ValueError(
            f"adapters {unused[:4]} were not used by this forward: no Dense/DenseGeneral/Einsum/Conv/Embed at that "
            "path was called. Were the adapters made for this model? For a method that runs only part of the "
            "model, pass strict=False."
        )
    return out
