"""Flax Linen support: learn kernel layouts from the model, then run it with adapters in the forward.

``apply`` places the adapters beside their kernels in the ``params`` collection (so ``nn.scan``, ``nn.vmap``
and ``nn.remat`` slice them exactly like the kernel) and, for the dynamic extent of that one call, intercepts
``nn.Dense``, ``nn.DenseGeneral``, ``nn.Einsum``, ``nn.Conv`` and ``nn.Embed`` to add ``s·(x·A)·B`` to the
base output. ``W + ΔW`` is never formed and no gradient of a frozen kernel is ever computed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax

from jaxpeft import ops
from jaxpeft._paths import leaves_with_paths, set_path
from jaxpeft._select import Layout
from jaxpeft.methods.lora import LoraConfig, LoraWeights, adapter_items
from jaxpeft.methods.lora import init as lora_init

__all__ = ["apply", "infer_layouts", "init"]

_A = "lora_a::"
_B = "lora_b::"
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


def init(
    cfg: LoraConfig,
    model: nn.Module,
    params: Any,
    *args: Any,
    key: jax.Array,
    method: Any = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """``jaxpeft.init`` with layouts inferred from ``model`` on the sample inputs ``args``."""
    layouts = infer_layouts(model, *args, method=method, **kwargs)
    return lora_init(cfg, params, key=key, layouts=layouts)


def _augment(params: Any, adapters: Any) -> tuple[Any, dict[tuple[str, ...], dict[str, LoraWeights]]]:
    """Params with each adapter's A and B stored beside its kernel, and the static per-module table."""
    table: dict[tuple[str, ...], dict[str, LoraWeights]] = {}
    for path, lora in adapter_items(adapters):
        module_path, _, leaf = path.rpartition("/")
        params = set_path(params, f"{module_path}/{_A}{leaf}" if module_path else f"{_A}{leaf}", lora.a)
        params = set_path(params, f"{module_path}/{_B}{leaf}" if module_path else f"{_B}{leaf}", lora.b)
        table.setdefault(tuple(module_path.split("/")) if module_path else (), {})[leaf] = lora
    return params, table


def _interceptor(table: Mapping[tuple[str, ...], Mapping[str, LoraWeights]], used: set[str]) -> Any:
    def intercept(next_fun: Any, args: tuple[Any, ...], kwargs: dict[str, Any], context: Any) -> Any:
        module = context.module
        entry = table.get(module.path) if isinstance(module, _SUPPORTED) and module.scope is not None else None
        method = context.method_name
        if entry is None or method not in ("__call__", "attend"):
            return next_fun(*args, **kwargs)
        leaf = _weight_name(module)
        meta = entry.get(leaf)
        if meta is None or (method == "attend" and not isinstance(module, nn.Embed)):
            return next_fun(*args, **kwargs)
        used.add("/".join((*module.path, leaf)))
        lora = LoraWeights(
            module.get_variable("params", _A + leaf),
            module.get_variable("params", _B + leaf),
            meta.scale,
            meta.dropout,
        )
        y = next_fun(*args, **kwargs)
        x = args[0] if args else next(iter(kwargs.values()))
        key = None
        if lora.dropout > 0.0 and not isinstance(module, nn.Embed) and module.scope.has_rng("dropout"):
            key = module.make_rng("dropout")
        if isinstance(module, nn.Embed):
            delta = (
                ops.embed_delta(x, lora, y.dtype) if method == "__call__" else ops.attend_delta(x.astype(y.dtype), lora)
            )
        elif isinstance(module, nn.Dense):
            delta = ops.dense_delta(x.astype(y.dtype), lora, dropout_key=key, precision=module.precision)
        elif isinstance(module, nn.DenseGeneral):
            axes = _as_tuple(module.axis)
            delta = ops.dense_delta(x.astype(y.dtype), lora, axes=axes, dropout_key=key, precision=module.precision)
        elif isinstance(module, nn.Einsum):
            subscripts = _einsum_str(module, args, kwargs)
            delta = ops.einsum_delta(subscripts, x.astype(y.dtype), lora, dropout_key=key, precision=module.precision)
        else:
            branch = module.clone(parent=None, name=None, features=lora.rank, use_bias=False, dtype=y.dtype)

            def conv(inp: jax.Array, k: jax.Array) -> jax.Array:
                return branch.apply({"params": {"kernel": k}}, inp)

            delta = ops.conv_delta(x.astype(y.dtype), lora, conv, dropout_key=key)
        return y + delta.astype(y.dtype)

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
    **kwargs: Any,
) -> Any:
    """``model.apply(variables, *args)`` with every adapted layer computing ``base(x) + s·(x·A)·B``.

    Differentiate with respect to ``adapters`` only (close over ``variables``): the gradient then contains the
    adapters alone, and no kernel gradient is ever computed. Works under ``jax.jit`` and inside ``nn.scan``,
    ``nn.vmap`` and ``nn.remat`` stacks. LoRA dropout runs when ``rngs`` has a ``"dropout"`` key and the
    config's dropout rate is positive (a scanned stack should split the ``"dropout"`` rng, as usual).

    Args:
      model: the Linen module.
      variables: its variables, e.g. ``{"params": params}`` (other collections pass through).
      adapters: the tree from ``jaxpeft.init`` / ``jaxpeft.linen.init``.
      *args: the call's inputs.
      rngs: optional rngs for ``model.apply`` (``{"dropout": key}`` enables dropout).
      method: optional method to call instead of ``__call__``.
      mutable: as in ``model.apply``.
      strict: raise if an adapter was not used by the call (a silent no-op otherwise).
      **kwargs: keyword arguments for the call.

    Returns:
      Whatever ``model.apply`` returns.
    """
    if "params" not in variables:
        raise ValueError(
            f"`variables` has collections {sorted(variables)}; expected a 'params' collection, "
            "e.g. jaxpeft.linen.apply(model, {'params': params}, adapters, x)."
        )
    params, table = _augment(variables["params"], adapters)
    used: set[str] = set()
    with nn.intercept_methods(_interceptor(table, used)):
        out = model.apply({**variables, "params": params}, *args, rngs=rngs, method=method, mutable=mutable, **kwargs)
    unused = sorted({p for p, _ in adapter_items(adapters)} - used)
    if strict and unused:
        raise ValueError(
            f"adapters {unused[:4]} were not used by this forward: no Dense/DenseGeneral/Einsum/Conv/Embed at that "
            "path was called. Were the adapters made for this model? For a method that runs only part of the "
            "model, pass strict=False."
        )
    return out
