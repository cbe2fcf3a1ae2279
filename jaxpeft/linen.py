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
import jax.numpy as jnp

from jaxpeft import ops, quant
from jaxpeft._paths import leaves_with_paths, path_str, set_path
from jaxpeft._select import Layout
from jaxpeft.methods.bank import AdapterBank
from jaxpeft.methods.base import Adapter, LayerCall, MethodConfig, Plan, adapter_items, check_fits
from jaxpeft.methods.base import init as method_init
from jaxpeft.methods.base import init_adjusted as method_init_adjusted
from jaxpeft.methods.base import plan as method_plan
from jaxpeft.methods.leaf import LeafAdapter, substitute

__all__ = ["apply", "infer_layouts", "init", "init_adjusted", "plan", "quantize"]

_PREFIX = "peft::"
_SUPPORTED = (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv, nn.Embed)


def _weight_name(module: nn.Module) -> str:
    return "embedding" if isinstance(module, nn.Embed) else "kernel"


def _as_tuple(v: Any) -> tuple[Any, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


def _call_layout(module: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Layout:
    """The layout of ``module``'s kernel as the call sees it (scan stacks already sliced away)."""
    if isinstance(module, nn.Embed):
        return Layout(kind="embed")
    if isinstance(module, nn.Dense):
        return Layout(kind="dense")
    if isinstance(module, nn.DenseGeneral):
        if _as_tuple(module.batch_dims):
            return Layout(kind="unsupported", reason="nn.DenseGeneral with `batch_dims` is not supported.")
        return Layout(fan_in=len(_as_tuple(module.axis)), fan_out=len(_as_tuple(module.features)), kind="dense_general")
    if isinstance(module, nn.Einsum):
        return ops.einsum_plan(_einsum_str(module, args, kwargs)).layout
    if isinstance(module, nn.Conv):
        if module.feature_group_count != 1:
            return Layout(
                kind="unsupported", reason="grouped convolutions (feature_group_count > 1) are not supported."
            )
        kernel: Any = module.get_variable("params", "kernel")
        return Layout(fan_in=kernel.ndim - 1, fan_out=1, kind="conv")
    raise TypeError(type(module))  # pragma: no cover - guarded by _SUPPORTED


def _einsum_str(module: nn.Einsum, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    given = kwargs.get("einsum_str", args[1] if len(args) > 1 else None)
    subscripts = given if given is not None else module.einsum_str
    if not isinstance(subscripts, str):
        raise ValueError(f"nn.Einsum at {'/'.join(module.path)!r} has no einsum string; pass `einsum_str`.")
    return subscripts


def infer_layouts(model: nn.Module, *args: Any, method: Any = None, **kwargs: Any) -> dict[str, Layout]:
    """Learn the layout of every Dense/DenseGeneral/Einsum/Conv/Embed kernel by tracing ``model.init``.

    The trace is abstract (``jax.eval_shape``): no FLOPs, no memory. Kernels stacked by ``nn.scan``/``nn.vmap``
    get their extra leading axes counted as ``stack``.

    Args:
      model: the Linen module.
      *args: sample inputs (arrays or ``jax.ShapeDtypeStruct``) as for ``model.init``.
      method: optional method to trace instead of ``__call__``.
      **kwargs: keyword arguments for the call.

    Returns:
      ``{"path/to/kernel": Layout}`` for every supported layer (unsupported ones have ``kind="unsupported"``).
    """
    seen: dict[str, Layout] = {}

    def record(next_fun: Any, a: tuple[Any, ...], kw: dict[str, Any], context: Any) -> Any:
        out = next_fun(*a, **kw)
        module = context.module
        if isinstance(module, _SUPPORTED) and context.method_name == "__call__" and module.scope is not None:
            path = "/".join((*module.path, _weight_name(module)))
            seen[path] = _call_layout(module, a, kw)
        return out

    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    with nn.intercept_methods(record):
        variables = jax.eval_shape(lambda: model.init(rngs, *args, method=method, **kwargs))
    shapes = dict(leaves_with_paths(variables.get("params", {})))
    layouts: dict[str, Layout] = {}
    for path, call in seen.items():
        if path not in shapes:
            continue
        extra = len(shapes[path].shape) - call.ndim
        if call.kind == "unsupported" or extra < 0:
            layouts[path] = call
        else:
            layouts[path] = Layout(call.stack + extra, call.fan_in, call.fan_out, call.kind)
    return layouts


def _check_params(params: Any, layouts: Mapping[str, Layout]) -> None:
    if isinstance(params, Mapping) and "params" in params and not any(p.startswith("params/") for p in layouts):
        raise ValueError(
            f"`params` has the top-level keys {sorted(params)[:4]}: it looks like the whole variables dict. Pass "
            "its 'params' collection, e.g. jaxpeft.linen.init(cfg, model, variables['params'], x, key=key)."
        )


def plan(cfg: MethodConfig, model: nn.Module, params: Any, *args: Any, method: Any = None, **kwargs: Any) -> Plan:
    """``jaxpeft.plan`` with layouts inferred from ``model`` on the sample inputs ``args`` (a dry run)."""
    layouts = infer_layouts(model, *args, method=method, **kwargs)
    _check_params(params, layouts)
    return method_plan(cfg, params, layouts=layouts)


def init(
    cfg: MethodConfig,
    model: nn.Module,
    params: Any,
    *args: Any,
    key: jax.Array,
    method: Any = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """``jaxpeft.init`` with layouts inferred from ``model`` on the sample inputs ``args``.

    Raises:
      ValueError: ``params`` is the whole ``{"params": ...}`` variables dict; and as ``jaxpeft.init``.
    """
    layouts = infer_layouts(model, *args, method=method, **kwargs)
    _check_params(params, layouts)
    return method_init(cfg, params, key=key, layouts=layouts)


def init_adjusted(
    cfg: MethodConfig,
    model: nn.Module,
    params: Any,
    *args: Any,
    key: jax.Array,
    method: Any = None,
    **kwargs: Any,
) -> tuple[Any, dict[str, Any]]:
    """``jaxpeft.init_adjusted`` with layouts inferred from ``model``: ``(new_params, adapters)``.

    For PiSSA/OLoRA (``LoraConfig(init="pissa" | "pissa_niter_<n>" | "olora")``) run the model as
    ``apply(model, {"params": new_params}, adapters, ...)``: at init it computes the original model's outputs up
    to float rounding, and ``jaxpeft.merge(new_params, trained)`` is the original weights plus the trained update.

    Raises:
      ValueError: ``params`` is the whole ``{"params": ...}`` variables dict; and as ``jaxpeft.init_adjusted``.
    """
    layouts = infer_layouts(model, *args, method=method, **kwargs)
    _check_params(params, layouts)
    return method_init_adjusted(cfg, params, key=key, layouts=layouts)


def quantize(
    targets: Any, model: nn.Module, params: Any, *args: Any, kind: str = "nf4", method: Any = None, **kwargs: Any
) -> Any:
    """``jaxpeft.quantize`` (QLoRA's frozen base) with layouts inferred from ``model`` on the sample inputs ``args``.

    ``targets`` is the method config you will train with (its selection) or a target spec. Run the result with
    :func:`apply` (``model.apply`` cannot consume quantised weights).

    Raises:
      ValueError: ``params`` is the whole ``{"params": ...}`` variables dict; and as ``jaxpeft.quantize``.
    """
    layouts = infer_layouts(model, *args, method=method, **kwargs)
    _check_params(params, layouts)
    return quant.quantize(params, targets, kind=kind, layouts=layouts)


class _Stored:
    """How one adapter node travels through ``params``: its treedef, leaf names and stored rank."""

    def __init__(self, node: Adapter) -> None:
        flat, self.treedef = jax.tree_util.tree_flatten_with_path(node)
        self.names = tuple(path_str(kp) for kp, _ in flat)
        self.ndim = flat[0][1].ndim if flat else 0
        self.node = node

    def rebuild(self, module: nn.Module, leaf: str) -> Adapter:
        """The call-level node from the (possibly scan-sliced) arrays stored beside the kernel."""
        leaves: list[Any] = [module.get_variable("params", f"{_PREFIX}{leaf}::{name}") for name in self.names]
        node: Adapter = jax.tree_util.tree_unflatten(self.treedef, leaves)
        return node.at_call(self.ndim - leaves[0].ndim) if leaves else node


def _augment(params: Any, adapters: Any) -> tuple[Any, dict[tuple[str, ...], dict[str, _Stored]]]:
    """Params with each adapter's arrays stored beside its kernel, and the static per-module table."""
    table: dict[tuple[str, ...], dict[str, _Stored]] = {}
    shapes = {p: tuple(leaf.shape) for p, leaf in leaves_with_paths(params, is_leaf=quant.is_quantized)}
    for path, node in adapter_items(adapters):
        if isinstance(node, LeafAdapter):  # substituted into the params instead (see `substitute`)
            continue
        if path in shapes:
            check_fits(path, node, shapes[path])
        module_path, _, leaf = path.rpartition("/")
        stored = _Stored(node)
        for name, value in zip(stored.names, jax.tree.leaves(node), strict=True):
            key = f"{_PREFIX}{leaf}::{name}"
            params = set_path(params, f"{module_path}/{key}" if module_path else key, value)
        table.setdefault(tuple(module_path.split("/")) if module_path else (), {})[leaf] = stored
    return params, table


def _bias(module: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any], y_ndim: int) -> Any:
    """The layer's bias shaped to broadcast against its output (None without one)."""
    if not module.has_variable("params", "bias"):
        return None
    bias: Any = module.get_variable("params", "bias")
    if isinstance(module, nn.Einsum):
        p = ops.einsum_plan(_einsum_str(module, args, kwargs))
        return ops.broadcast_to_spec(
            bias, "".join(c for c in p.out_spec if c in p.stack + p.fan_out), p.out_spec, y_ndim
        )
    return bias


class _Guard:
    """Marks the dynamic extent of a dequantised base call, whose own layer call must not be intercepted again."""

    def __init__(self) -> None:
        self.depth = 0

    def __enter__(self) -> None:
        self.depth += 1

    def __exit__(self, *exc: object) -> None:
        self.depth -= 1


def _dequantized_base(
    module: nn.Module,
    method: str,
    q: quant.QuantizedArray,
    bind: Callable[[jax.Array], tuple[tuple[Any, ...], dict[str, Any]]],
    guard: _Guard,
) -> Callable[[jax.Array], jax.Array]:
    """``base(x)``: the layer's own code (a detached clone) run on its dequantised weight, under ``jax.checkpoint``.

    Only the codes and the input are saved for the backward pass; the full-precision weight is recomputed there,
    so it never lives across the step.
    """
    weight = _weight_name(module)
    others: dict[str, Any] = {}
    if module.has_variable("params", "bias"):
        others["bias"] = module.get_variable("params", "bias")
    clone = module.clone(parent=None, name=None)
    name = None if method == "__call__" else method

    @jax.checkpoint
    def run(inp: jax.Array, q: quant.QuantizedArray, others: dict[str, Any]) -> jax.Array:
        args, kwargs = bind(inp)
        with guard:
            out: jax.Array = clone.apply(  # type: ignore[assignment]
                {"params": {weight: quant.dequantize(q), **others}}, *args, method=name, **kwargs
            )
        return out

    return lambda inp: run(inp, q, others)


def _detached_base(
    module: nn.Module,
    method: str,
    kernel: jax.Array,
    bind: Callable[[jax.Array], tuple[tuple[Any, ...], dict[str, Any]]],
    guard: _Guard,
) -> Callable[[jax.Array], jax.Array]:
    """``base(x)``: a detached clone of the layer applied to its current (call-level) weights."""
    variables = {_weight_name(module): kernel}
    if module.has_variable("params", "bias"):
        variables["bias"] = module.get_variable("params", "bias")
    clone = module.clone(parent=None, name=None)
    name = None if method == "__call__" else method

    def run(inp: jax.Array) -> jax.Array:
        a, kw = bind(inp)
        with guard:
            out: jax.Array = clone.apply({"params": variables}, *a, method=name, **kw)  # type: ignore[assignment]
        return out

    return run


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
) -> LayerCall:
    """The one place that translates a Linen layer call into the neutral ``LayerCall``.

    Over a quantised weight, ``base`` runs the layer on its dequantised weight (see ``_dequantized_base``) and
    ``kernel`` is the dequantised weight (read only by methods that need it, e.g. DoRA's norm; unused, it is
    never computed). With ``detached`` (an adapter whose forward runs ``base`` under ``jax.vmap``), ``base`` runs
    a detached copy of the layer on its current weights, which Flax allows inside JAX transforms.
    """
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

    def dropout_key() -> jax.Array | None:
        scope = module.scope
        return module.make_rng("dropout") if scope is not None and scope.has_rng("dropout") else None

    kernel: Any = module.get_variable("params", _weight_name(module))
    base: Callable[[jax.Array], jax.Array]
    if quant.is_quantized(kernel):
        base = _dequantized_base(module, method, kernel, bind, guard)
        kernel = quant.dequantize(kernel)
    elif detached:
        base = _detached_base(module, method, kernel, bind, guard)
    else:

        def base(inp: jax.Array) -> jax.Array:
            a, kw = bind(inp)
            out: jax.Array = next_fun(*a, **kw)
            return out

    precision = getattr(module, "precision", None)
    common = {
        "x": x,
        "base": base,
        "kernel": kernel,
        "precision": precision,
        "dropout_key": dropout_key,
        "adapter_ids": adapter_ids,
    }
    if isinstance(module, nn.Embed):
        return LayerCall(kind="attend" if method == "attend" else "embed", **common)
    bias = _bias(module, args, kwargs, jnp.ndim(x)) if not isinstance(module, nn.Einsum) else None
    if isinstance(module, nn.Dense):
        return LayerCall(kind="dense", bias=bias, **common)
    if isinstance(module, nn.DenseGeneral):
        return LayerCall(kind="dense_general", bias=bias, axes=_as_tuple(module.axis), **common)
    if isinstance(module, nn.Einsum):
        subscripts = _einsum_str(module, args, kwargs)
        out_ndim = len(subscripts.replace(" ", "").split("->")[1])
        return LayerCall(kind="einsum", bias=_bias(module, args, kwargs, out_ndim), subscripts=subscripts, **common)

    def conv(inp: jax.Array, k: jax.Array) -> jax.Array:
        branch = module.clone(parent=None, name=None, features=k.shape[-1], use_bias=False, dtype=inp.dtype)
        with guard:
            out: jax.Array = branch.apply({"params": {"kernel": k}}, inp)  # type: ignore[assignment]
        return out

    return LayerCall(kind="conv", bias=bias, conv=conv, **common)


def _holds_quantized(module: nn.Module, leaf: str) -> bool:
    return module.has_variable("params", leaf) and quant.is_quantized(module.get_variable("params", leaf))


def _interceptor(
    table: Mapping[tuple[str, ...], Mapping[str, _Stored]], used: set[str], quantized: bool, adapter_ids: Any
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
        detached = stored is not None and type(stored.node).transforms_base
        call = _layer_call(module, method, next_fun, args, kwargs, guard, detached=detached, adapter_ids=adapter_ids)
        if stored is None:  # a quantised weight without an adapter: the layer on its dequantised weight
            return call.base(call.x)
        used.add("/".join((*module.path, leaf)))
        return stored.rebuild(module, leaf).forward(call)

    return intercept


def _check_ids(ids: Any, adapters: Any) -> jax.Array:
    """``ids`` as an integer array, range-checked against the banks when its values are known (outside ``jit``)."""
    if isinstance(ids, str) or (isinstance(ids, (list, tuple)) and any(isinstance(i, str) for i in ids)):
        raise ValueError(f"`adapter_ids`={ids!r} holds names; pass integer ids: jaxpeft.adapter_ids(bank, {ids!r}).")
    ids = jnp.asarray(ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer) or ids.ndim > 1:
        raise ValueError(
            f"`adapter_ids` has dtype {ids.dtype} and shape {ids.shape}; expected integers of shape () or (batch,), "
            "e.g. jaxpeft.adapter_ids(bank, ['fr', 'de'])."
        )
    sizes = {len(n.names) for _, n in adapter_items(adapters) if isinstance(n, AdapterBank)}
    if not sizes:
        raise ValueError("`adapter_ids` was given but `adapters` holds no adapter bank (see jaxpeft.stack_adapters).")
    try:
        low, high = int(jnp.min(ids)), int(jnp.max(ids))
    except jax.errors.ConcretizationTypeError:
        return ids
    n = min(sizes)
    if low < 0 or high >= n:
        raise ValueError(f"`adapter_ids` ranges over [{low}, {high}]; the bank holds {n} adapters (ids 0..{n - 1}).")
    return ids


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
    """
    if "params" not in variables:
        raise ValueError(
            f"`variables` has collections {sorted(variables)}; expected a 'params' collection, "
            "e.g. jaxpeft.linen.apply(model, {'params': params}, adapters, x)."
        )
    params, substituted = substitute(variables["params"], adapters)  # leaf methods: the model sees leaf + delta
    params, table = _augment(params, adapters)
    quantized = any(quant.is_quantized(x) for x in jax.tree.leaves(params, is_leaf=quant.is_quantized))
    used: set[str] = set(substituted)
    if adapter_ids is not None:
        adapter_ids = _check_ids(adapter_ids, adapters)
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
