"""The framework core: everything ``jaxpeft.linen`` and ``jaxpeft.nnx`` share, written once.

A framework adapter only answers "which Flax module is this, and how do I intercept its call": it describes each
supported module as a :class:`LayerInfo` and each intercepted call by the pieces below. The rest lives here:

- the **layer-kind table** (:func:`layer_layout`): which modules can be adapted, their layouts, and the refusals
  (with the same reasons in both frameworks);
- **building the** ``LayerCall`` (:func:`layer_call`): bias broadcasting (einsum biases), the dequantised base of
  a quantised weight under ``jax.checkpoint``, a detached base for nodes that transform it;
- **node storage** (:class:`Stored`): a node as named arrays (trainable or frozen) and back, at call level;
- **leaf substitution** (:func:`substitute`) for ``LeafAdapter`` nodes;
- the checks of a tree before it runs (:func:`layer_nodes`) and of ``adapter_ids`` (:func:`check_ids`).

The one fold every merge path uses is ``jaxpeft.api.fold_target``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft import ops, quant
from jaxpeft._paths import map_with_paths, path_str
from jaxpeft._select import Layout, LayoutEntry, Unsupported
from jaxpeft.methods.bank import name_order
from jaxpeft.protocol import Adapter, LayerCall, adapter_items, check_fits, frozen_fields, hook_kind

__all__ = [
    "LayerInfo",
    "Stored",
    "check_ids",
    "layer_call",
    "layer_layout",
    "layer_nodes",
    "stacked_layout",
    "substitute",
    "unsupported_leaf",
]


# ------------------------------------------------------------------------------------------------ layer kinds


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """What a framework says about one supported layer module, from its configuration.

    Attributes:
      kind: ``"dense"``, ``"dense_general"``, ``"einsum"``, ``"conv"`` or ``"embed"``.
      fan_in: contracted kernel axes (``dense_general``: its ``axis``; ``conv``: window axes + 1).
      fan_out: output kernel axes (``dense_general``: its ``features``).
      subscripts: ``einsum``: the einsum string, or None when only the call gives it.
      batch_axes: ``dense_general`` with batch axes (Linen ``batch_dims``, NNX ``batch_axis``).
      groups: ``conv``: ``feature_group_count``.
      masked: ``conv``: a ``mask`` on the kernel.
      overrides: ``"nnx.Linear.__call__"``-style name of a method of the Flax class that the module's own class
        overrides (the adapted forward would not match it), or None.
    """

    kind: str
    fan_in: int = 1
    fan_out: int = 1
    subscripts: str | None = None
    batch_axes: bool = False
    groups: int = 1
    masked: bool = False
    overrides: str | None = None
    class_name: str = ""


def layer_layout(info: LayerInfo) -> LayoutEntry:
    """The layer-kind table: the call-level layout of a supported module's weight, or why it cannot be adapted."""
    if info.overrides is not None:
        return Unsupported(
            f"its class {info.class_name} overrides {info.overrides}, so the adapted forward would not match it."
        )
    if info.kind in ("embed", "dense"):
        return Layout(kind=info.kind)
    if info.kind == "dense_general":
        if info.batch_axes:
            return Unsupported(
                "DenseGeneral/LinearGeneral with batch axes (Linen `batch_dims`, NNX `batch_axis`) is not supported."
            )
        return Layout(fan_in=info.fan_in, fan_out=info.fan_out, kind="dense_general")
    if info.kind == "einsum":
        if info.subscripts is None:
            return Unsupported("its `einsum_str` is given at call time; pass it to the nnx.Einsum constructor instead.")
        return ops.einsum_layout(info.subscripts)
    if info.groups != 1:
        return Unsupported("grouped convolutions (feature_group_count > 1) are not supported.")
    if info.masked:
        return Unsupported("masked convolution kernels (`mask`) are not supported.")
    return Layout(fan_in=info.fan_in, fan_out=1, kind="conv")


def stacked_layout(call: LayoutEntry, weight_ndim: int) -> LayoutEntry:
    """``call`` with the weight's extra leading axes (``nn.scan``/``nnx.vmap`` stacks) counted as stack axes."""
    if isinstance(call, Unsupported):
        return call
    extra = weight_ndim - call.ndim
    if extra < 0:
        return Unsupported(f"its weight has {weight_ndim} axes but the layer expects {call.ndim}.")
    return dataclasses.replace(call, stack=call.stack + extra)


def unsupported_leaf(owner: str | None, supported_owner: bool, weight: str, leaf: str) -> Unsupported:
    """Why a parameter that is no supported layer's weight cannot be adapted (``owner``: its module's class name)."""
    if supported_owner:
        return Unsupported(f"only the layer's `{weight}` is adapted, not its `{leaf}`.")
    return Unsupported(
        f"it belongs to a {owner or 'module'}, which jaxpeft cannot adapt (it adapts the weights of Dense, "
        "DenseGeneral, Einsum, Conv and Embed layers: Linen's nn.* and NNX's nnx.Linear, LinearGeneral, Einsum, "
        "Conv, Embed)."
    )


# ------------------------------------------------------------------------------------------------ layer call


def einsum_bias(bias: jax.Array, subscripts: str) -> jax.Array:
    """An einsum layer's bias ``(*stack, *fan_out)`` shaped to broadcast against its output."""
    p = ops.einsum_plan(subscripts)
    letters = "".join(c for c in p.out_spec if c in p.stack + p.fan_out)
    return ops.broadcast_to_spec(bias, letters, p.out_spec, len(p.out_spec.replace("...", "")))


def _dequantized(run_with: Callable[[jax.Array, jax.Array], jax.Array], q: Any) -> Callable[[jax.Array], jax.Array]:
    """``base(x)`` over a quantised weight: the layer's own code on its dequantised weight, under ``jax.checkpoint``.

    Only the codes and the input are saved for the backward pass; the full-precision weight is recomputed there,
    so it never lives across the step.
    """

    @jax.checkpoint
    def run(inp: jax.Array, codes: Any) -> jax.Array:
        return run_with(quant.dequantize(codes), inp)

    return lambda inp: run(inp, q)


def layer_call(
    kind: str,
    x: jax.Array,
    run: Callable[[jax.Array], jax.Array],
    kernel: Any,
    *,
    run_with: Callable[[jax.Array, jax.Array], jax.Array],
    detached: bool = False,
    bias: jax.Array | None = None,
    axes: Sequence[int] | None = None,
    subscripts: str | None = None,
    conv: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    precision: Any = None,
    dropout_key: Callable[[], jax.Array | None] | None = None,
    adapter_ids: jax.Array | None = None,
) -> LayerCall:
    """The one translation of an intercepted layer call into the neutral ``LayerCall``.

    Args:
      kind: the call kind (``"attend"`` for ``Embed.attend``).
      x: the call's input.
      run: ``run(x)``, the layer's own (bound) call on any input.
      kernel: the layer's weight as stored (possibly quantised).
      run_with: ``run_with(weight, x)``: the layer's own code on another weight value, detached from the module
        (usable inside JAX transforms).
      detached: the node transforms ``base`` (``Adapter.transforms_base``): base runs through ``run_with``.
      bias: the layer's bias as stored (an einsum's is reshaped to broadcast against the output here).
      axes: ``dense``/``dense_general``: the contracted input axes (Flax's raw ``axis``; normalised by ``LayerCall``).
      subscripts, conv, precision, dropout_key, adapter_ids: as in ``LayerCall``.

    Over a quantised weight ``base`` is the layer on its dequantised weight under ``jax.checkpoint`` and ``kernel``
    the dequantised weight (computed only if a method reads it).
    """
    base = run
    if quant.is_quantized(kernel):
        base = _dequantized(run_with, kernel)
        kernel = quant.dequantize(kernel)
    elif detached:
        weight = kernel
        base = lambda inp: run_with(weight, inp)  # noqa: E731
    if kind == "einsum" and bias is not None:
        bias = einsum_bias(bias, str(subscripts))
    if kind in ("embed", "attend"):
        bias = None
    return LayerCall(
        kind=kind,
        x=x,
        base=base,
        kernel=kernel,
        bias=bias,
        axes=None if axes is None else tuple(axes),
        subscripts=subscripts,
        conv=conv,
        precision=precision,
        dropout_key=dropout_key or (lambda: None),
        adapter_ids=adapter_ids,
    )


# ------------------------------------------------------------------------------------------------ node storage


@dataclasses.dataclass(frozen=True)
class Stored:
    """How one adapter node travels as named arrays beside its weight, and how it comes back at call level.

    Hashable (a static attribute of an NNX module, a static table entry in Linen). ``names`` are the node's leaf
    paths (``a``, ``b``, ``w1_a``, ...) in flattening order; ``frozen`` those that are frozen fields
    (``jaxpeft.FROZEN``); ``ndim`` the rank of the first array as stored.
    """

    treedef: Any
    names: tuple[str, ...]
    frozen: tuple[str, ...]
    ndim: int
    cls: type[Adapter]

    @classmethod
    def of(cls, node: Adapter, reserved: Iterable[str] = ()) -> Stored:
        """The storage of ``node``; with ``reserved`` (NNX attribute names), names must be identifiers not in it."""
        flat, treedef = jax.tree_util.tree_flatten_with_path(node)
        names = tuple(path_str(kp) for kp, _ in flat)
        frozen_names = set(frozen_fields(node))
        reserved = tuple(reserved)
        if reserved:
            clash = [n for n in names if n in reserved or not n.isidentifier()]
            if clash:
                raise ValueError(
                    f"{type(node).__name__} has array fields {clash} that jaxpeft.nnx cannot store as attributes; "
                    f"rename them (reserved: {reserved})."
                )
        frozen = tuple(n for n in names if n.split("/")[0] in frozen_names)
        return cls(treedef, names, frozen, flat[0][1].ndim if flat else 0, type(node))

    def node(self, leaves: Sequence[Any], *, call: bool = False) -> Adapter:
        """The node from its arrays in ``names`` order. With ``call``: at call level (stack axes sliced away where
        the leaves are) and with gradients stopped on its frozen fields, as the hooks receive it."""
        node: Adapter = jax.tree_util.tree_unflatten(self.treedef, list(leaves))
        if leaves:
            node = node.at_call(self.ndim - leaves[0].ndim)
        return node.frozen_stopped() if call else node


# ------------------------------------------------------------------------------------------------ trees


def layer_nodes(adapters: Any, where: str) -> tuple[dict[str, Adapter], dict[str, Adapter]]:
    """``({path: layer node}, {path: leaf node})`` of an adapter tree a framework is about to run.

    Raises:
      ValueError: a model-input node (``InputAdapter``: prompt/prefix tuning), which no framework runs.
      TypeError: a node with no hook.
    """
    layers: dict[str, Adapter] = {}
    leaves: dict[str, Adapter] = {}
    for path, node in adapter_items(adapters):
        kind = hook_kind(node)
        if kind == "input":
            hook = getattr(type(node), "hook", "its model hook")
            raise ValueError(
                f"adapter {path!r} is a {type(node).__name__}, a model input (virtual tokens): it adapts no layer "
                f"call, so {where} does not run it. Pass it to your model's hook instead ({hook}, see "
                "jaxpeft.methods.prompt)."
            )
        (leaves if kind == "leaf" else layers)[path] = node
    return layers, leaves


def substitute(params: Any, nodes: Mapping[str, Adapter]) -> tuple[Any, set[str]]:
    """``params`` with each leaf that has a leaf node replaced by ``node.value(leaf)``, and those paths.

    Pure: the inputs are untouched.

    Raises:
      ValueError: a node does not fit its leaf (names the path and both shapes).
    """
    if not nodes:
        return params, set()
    done: set[str] = set()

    def swap(path: str, leaf: Any) -> Any:
        node = nodes.get(path)
        if node is None:
            return leaf
        check_fits(path, node, tuple(leaf.shape))
        done.add(path)
        return node.frozen_stopped().value(leaf)  # type: ignore[attr-defined]

    return map_with_paths(swap, params, is_leaf=quant.is_quantized), done


def check_ids(ids: Any, banks: Mapping[str, Adapter], what: str = "`adapter_ids`") -> jax.Array:
    """``ids`` as an integer array, range-checked against the banks (``{path: bank node}``) when its values are known
    (under ``jit`` the banks' forward turns out-of-range rows into NaN: ``jaxpeft.methods.bank``).

    Raises:
      ValueError: names instead of integers, another dtype or shape, no bank, banks with different name orders,
        or (outside ``jit``) an id out of range.
    """
    if isinstance(ids, str) or (isinstance(ids, (list, tuple)) and any(isinstance(i, str) for i in ids)):
        raise ValueError(f"{what}={ids!r} holds names; pass integer ids: jaxpeft.adapter_ids(bank, {ids!r}).")
    ids = jnp.asarray(ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer) or ids.ndim > 1:
        raise ValueError(
            f"{what} has dtype {ids.dtype} and shape {ids.shape}; expected integers of shape () or (batch,), "
            "e.g. jaxpeft.adapter_ids(bank, ['fr', 'de'])."
        )
    if not banks:
        raise ValueError(f"{what} was given but `adapters` holds no adapter bank (see jaxpeft.stack_adapters).")
    n = len(name_order(banks))
    if isinstance(ids, jax.core.Tracer):
        return ids
    values = np.asarray(ids)  # concrete (a constant inside a traced function too): check on the host
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= n:
        raise ValueError(f"{what} ranges over [{low}, {high}]; the bank holds {n} adapters (ids 0..{n - 1}).")
    return ids
