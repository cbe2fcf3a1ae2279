"""Adapter banks: several named adapters of one method stacked over one base, chosen per call or per example.

:func:`.stack_adapters` turns ``{name: adapter tree}`` into one tree whose nodes are :class:`AdapterBank`\\ s: each
holds the adapters of one weight stacked on an *adapter axis* (placed right after the weight's stack axes, so
``nn.scan``/``nnx.vmap`` stacks slice a bank like the kernel). Which adapter runs is **data**, an integer array
passed at call time (``jaxpeft.linen.apply(..., adapter_ids=ids)``, ``jaxpeft.nnx.set_adapter_ids(model, ids)``):

- ``ids`` of shape ``()``: the whole call uses adapter ``ids`` (switching adapters never recompiles);
- ``ids`` of shape ``(batch,)``: example ``i`` (along the leading axis of every adapted layer's input) uses
  adapter ``ids[i]``: a *mixed batch*; the output of each example equals running that example alone with its
  adapter, for every method, and the base layer runs once over the whole batch. LoRA-family nodes
  (``grouped_rows``) on dense calls run as grouped low-rank products (``grouping="rows"``: each row's factors
  gathered, ``batch·(fan_in + fan_out)·r`` floats, one batched product; ``"ragged"``: ``jax.lax.ragged_dot`` over
  tokens sorted by adapter); every other node and call kind gathers each example's adapter and runs the method's
  rule under ``jax.vmap`` (``"vmap"``, the reference). See :func:`choose_route`. Gradients reach each adapter from
  the examples that used it (training several adapters in one step).

To serve the base model to some examples, stack a fresh ``jaxpeft.init`` tree as one of the adapters: every built-in
method is the identity at init.

**Ids that name no adapter never run another one.** Outside ``jit`` an id out of ``[0, n)`` is a ``ValueError``.
Under ``jit`` (values unknown at trace time) the rows whose id is out of range, negative ids included, get NaN
outputs: the bad adapter is read as NaN (NaN rows on the ``ragged`` path), never clipped or wrapped to a
neighbour, so the loss turns NaN and the fault is loud. For an error naming the ids instead, run the jitted
function under ``jax.experimental.checkify``: ``checkify.checkify(step, errors=checkify.user_checks)`` reports
"`adapter_ids` [...] holds ids outside [0, n) ...". A tree of banks has one name order (checked wherever a tree
of banks is read), so an id means the same adapter in every layer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from jaxpeft._paths import path_str, set_path
from jaxpeft._select import Layout
from jaxpeft.methods.lora import LoraWeights
from jaxpeft.protocol import (
    STATIC,
    Adapter,
    LayerAdapter,
    LayerCall,
    NotMergeableError,
    adapter_items,
    frozen_fields,
    hook_kind,
)

#: How a bank runs a mixed batch (see ``AdapterBank.route_for``): ``"auto"``, ``"rows"``, ``"ragged"``, ``"vmap"``.
GROUPINGS = ("auto", "rows", "ragged", "vmap")

__all__ = ["AdapterBank", "adapter_ids", "choose_route", "select_adapter", "stack_adapters", "unstack_adapters"]


def _take(leaf: jax.Array, index: Any, axis: int) -> jax.Array:
    """Entries ``index`` of ``leaf`` along ``axis``; an index out of range (the caller maps negatives there) reads NaN
    for floating arrays, never a clipped or wrapped neighbour."""
    return jnp.take(leaf, index, axis=axis, mode="fill")


def name_order(banks: Mapping[str, Any]) -> tuple[str, ...]:
    """The one name order of the banks of a tree (``{path: AdapterBank}``); refuses banks that order names differently
    (an id would then run different adapters in different layers)."""
    orders = {path: tuple(bank.names) for path, bank in banks.items()}
    first_path, first = next(iter(orders.items()))
    for path, order in orders.items():
        if order != first:
            raise ValueError(
                f"the adapter banks of this tree order their adapters differently: {first_path!r} holds "
                f"{list(first)}, {path!r} holds {list(order)}, so one id would run different adapters in different "
                "layers. Stack every layer from one {name: adapter tree} mapping: jaxpeft.stack_adapters(named)."
            )
    return first


@dataclasses.dataclass(frozen=True)
class AdapterBank(LayerAdapter):
    """The adapters of one weight, stacked: each leaf of ``adapters`` is ``(*stack, n, ...)`` (n after the stack).

    ``adapters`` is one node of the stacked method (its static parts are shared by all ``n``); ``names`` are the
    adapters' names in stacking order and ``layout`` the weight's. The forward reads ``call.adapter_ids`` (see
    the module docstring). A bank is not mergeable: merge one adapter (:func:`select_adapter`).
    """

    transforms_base: ClassVar[bool] = True

    adapters: Any
    names: tuple[str, ...] = dataclasses.field(metadata=STATIC)
    layout: Layout = dataclasses.field(metadata=STATIC, kw_only=True)
    grouping: str = dataclasses.field(default="auto", metadata=STATIC, kw_only=True)

    def __post_init__(self) -> None:
        if self.grouping not in GROUPINGS:
            raise ValueError(f"`grouping`={self.grouping!r}; expected one of {GROUPINGS}.")

    @property
    def dropout(self) -> float:  # type: ignore[override]
        return float(getattr(self.adapters, "dropout", 0.0))

    @property
    def bank_size(self) -> int:
        return len(self.names)

    @property
    def b_factors(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(type(self.adapters).b_factors)

    @property
    def frozen_field_names(self) -> tuple[str, ...]:
        """The stacked method's frozen fields (the bank's children carry its field names)."""
        return frozen_fields(self.adapters)

    def frozen_stopped(self) -> AdapterBank:
        return dataclasses.replace(self, adapters=self.adapters.frozen_stopped())

    def at_call(self, n_sliced: int) -> AdapterBank:
        if n_sliced == 0:
            return self
        layout = dataclasses.replace(self.layout, stack=self.layout.stack - n_sliced)
        return AdapterBank(self.adapters.at_call(n_sliced), self.names, layout=layout, grouping=self.grouping)

    def pick(self, index: Any) -> Adapter:
        """The adapter at ``index`` (an int or a traced scalar) as a node of the stacked method."""
        node: Adapter = jax.tree.map(lambda leaf: _take(leaf, index, self.layout.stack), self.adapters)
        return node

    def describe(self) -> str:
        inner = self.adapters.describe() if isinstance(self.adapters, Adapter) else ""
        return f"{len(self.names)} adapters {inner}".rstrip()

    def check(self, weight_shape: tuple[int, ...]) -> str | None:
        n = len(self.names)
        for leaf in jax.tree.leaves(self.adapters):
            if leaf.ndim <= self.layout.stack or leaf.shape[self.layout.stack] != n:
                return f"an adapter bank of {n} expects each array to have {n} entries on axis {self.layout.stack}"
        problem: str | None = self.pick(0).check(weight_shape)
        return problem

    def weight_axes(self) -> dict[str, tuple[int | None, ...]] | None:
        inner = self.adapters.weight_axes()
        if inner is None:
            return None
        s = self.layout.stack
        return {k: (*v[:s], None, *v[s:]) for k, v in inner.items()}

    def fold(self, weight: jax.Array, bias: jax.Array | None, sign: int) -> tuple[jax.Array, jax.Array | None]:
        raise NotMergeableError(
            f"an adapter bank holds {len(self.names)} adapters {list(self.names)}; merge one of them: "
            "jaxpeft.merge(params, jaxpeft.select_adapter(bank, name))."
        )

    def forward(self, call: LayerCall) -> jax.Array:
        ids = call.adapter_ids
        if ids is None:
            raise ValueError(
                f"an adapter bank of {list(self.names)} needs `adapter_ids` (which adapter runs): pass "
                "jaxpeft.linen.apply(..., adapter_ids=ids) or call jaxpeft.nnx.set_adapter_ids(model, ids); ids of "
                "shape () pick one adapter for the call, shape (batch,) one per example."
            )
        ids = self._checked(jnp.asarray(ids))
        inner_call = dataclasses.replace(call, adapter_ids=None)
        if ids.ndim == 0:
            return cast(Any, self.pick(ids)).forward(inner_call)
        batch = call.x.shape[0] if call.x.ndim else None
        if ids.ndim != 1 or ids.shape[0] != batch:
            raise ValueError(
                f"`adapter_ids` has shape {ids.shape}; a mixed batch needs one id per example along the leading axis "
                f"of the layer input, shape ({batch},) here (or shape () for one adapter for the whole call)."
            )
        route = self.route_for(call)
        if route != "vmap":
            grouped = dataclasses.replace(inner_call, rows=ids, route=route)
            out: jax.Array = cast(Any, self.adapters).forward(grouped)
            if route == "ragged":  # rows of ids that name no adapter: NaN, as the gathered paths read them
                bad = jnp.reshape(ids == len(self.names), (-1,) + (1,) * (out.ndim - 1))
                out = jnp.where(bad, jnp.asarray(jnp.nan, out.dtype), out)
            return out
        picked = self.pick(ids)  # each leaf (*stack, batch, ...)
        key = call.dropout_key() if self.dropout > 0 else None

        def one(node: Any, x: jax.Array, i: jax.Array) -> jax.Array:
            one_key = None if key is None else jax.random.fold_in(key, i)
            c = dataclasses.replace(inner_call, x=x[None], dropout_key=lambda: one_key)
            return node.forward(c)[0]

        out = jax.vmap(one, in_axes=(self.layout.stack, 0, 0))(picked, call.x, jnp.arange(batch))
        return out

    def route_for(self, call: LayerCall) -> str:
        """Which path a mixed batch of ``call`` takes (:func:`.choose_route` with this bank's ``grouping``)."""
        grouped = bool(getattr(type(self.adapters), "grouped_rows", False)) and call.kind in ("dense", "dense_general")
        fan_in = math.prod(call.x.shape[ax] for ax in call.axes or ())
        per_row = call.x.size // max(1, call.x.shape[0] * fan_in)
        rank = int(getattr(self.adapters, "rank", 0) or 0)
        return choose_route(self.grouping, grouped, per_row, rank, jax.default_backend())

    def _checked(self, ids: jax.Array) -> jax.Array:
        """``ids`` with every id outside ``[0, n)`` (negatives included) mapped to ``n``, which reads NaN adapters; a
        ``checkify`` error names them when the caller runs under ``checkify.checkify``."""
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"`adapter_ids` has dtype {ids.dtype}; expected integers (jaxpeft.adapter_ids(...)).")
        n = len(self.names)
        valid = (ids >= 0) & (ids < n)
        shown = str(list(self.names)).replace("{", "{{").replace("}", "}}")  # the message is a format string
        message = (
            f"`adapter_ids` {{ids}} holds ids outside [0, {n}): the bank holds {n} adapters {shown}; those rows ran "
            "NaN adapters. Make ids with jaxpeft.adapter_ids(bank, names)."
        )
        checkify.debug_check(jnp.all(valid), message, ids=ids)
        return jnp.where(valid, ids, n)


def choose_route(grouping: str, grouped: bool, tokens_per_row: int, rank: int, backend: str) -> str:
    """The path of a bank's mixed batch: ``"vmap"``, ``"rows"`` or ``"ragged"``.

    ``"vmap"`` (each example's adapter gathered, the method's rule ``vmap``-ped) runs any method and call kind;
    it is the only path where the node is not ``grouped`` (a ``grouped_rows`` node on a ``dense``/
    ``dense_general`` call) and wherever ``grouping="vmap"``. Otherwise ``grouping`` names the path, and
    ``"auto"`` picks ``"ragged"`` (``jax.lax.ragged_dot`` over tokens sorted by adapter) where ``backend`` lowers
    ``ragged_dot`` to a native grouped matmul (``"tpu"``, ``"gpu"``) and a row holds fewer tokens than the rank
    (decoding: permuting the tokens moves less than gathering each row's factors), else ``"rows"`` (each row's
    factors gathered, one batched product: FLOP-optimal on every backend, no activation moved).
    """
    if grouping == "vmap" or not grouped:
        return "vmap"
    if grouping != "auto":
        return grouping
    return "ragged" if backend in ("tpu", "gpu") and tokens_per_row < rank else "rows"


def _flatten(bank: AdapterBank) -> tuple[list[tuple[Any, Any]], tuple[Any, ...]]:
    """The stacked node's fields as the bank's children under their own names (``a``, ``b``, ...).

    One level only (everything below the node counts as a child), so the aux data is the node's class and static
    fields whatever the children are (arrays, ``None``, optax's masked nodes, shardings).
    """
    inner = bank.adapters
    flat, treedef = jax.tree_util.tree_flatten_with_path(inner, is_leaf=lambda x: x is not inner)
    children = [(jax.tree_util.GetAttrKey(path_str(kp).replace("/", "_")), child) for kp, child in flat]
    return children, (treedef, bank.names, bank.layout, bank.grouping)


def _unflatten(aux: tuple[Any, ...], children: Any) -> AdapterBank:
    treedef, names, layout, grouping = aux
    return AdapterBank(jax.tree_util.tree_unflatten(treedef, list(children)), names, layout=layout, grouping=grouping)


jax.tree_util.register_pytree_with_keys(AdapterBank, _flatten, _unflatten)


def _is_bank(x: Any) -> bool:
    return isinstance(x, AdapterBank)


def _lora_common(nodes: Sequence[Any]) -> list[Any] | None:
    """LoRA nodes of different ranks or scales made stackable exactly: rank padded with zeros, scale folded into B."""
    if not all(type(n) is LoraWeights for n in nodes):
        return None
    if len({(n.dropout, n.layout) for n in nodes}) != 1:
        return None
    rank = max(n.rank for n in nodes)
    s = nodes[0].layout.stack
    out = []
    for n in nodes:
        pad = rank - n.rank
        a = jnp.pad(n.a, [(0, 0)] * (n.a.ndim - 1) + [(0, pad)])
        b = jnp.pad(n.b * jnp.asarray(n.scale, n.b.dtype), [(0, 0)] * s + [(0, pad)] + [(0, 0)] * (n.b.ndim - s - 1))
        out.append(LoraWeights(a, b, 1.0, n.dropout, layout=n.layout))
    return out


def _stack_path(path: str, names: Sequence[str], nodes: Sequence[Any], grouping: str) -> AdapterBank:
    keys = [(str(jax.tree.structure(n)), [leaf.shape for leaf in jax.tree.leaves(n)]) for n in nodes]
    odd = next((i for i, k in enumerate(keys) if k != keys[0]), None)
    if odd is not None:
        normalised = _lora_common(nodes)
        if normalised is None:
            raise ValueError(
                f"adapters {names[0]!r} and {names[odd]!r} differ at {path!r}: {_difference(nodes[0], nodes[odd])}; "
                "a bank stacks adapters of one method with equal hyper-parameters and shapes (LoRA ranks and scales "
                "may differ). Make them with the same config."
            )
        nodes = normalised
    axis = nodes[0].layout.stack
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves, axis=axis), *nodes)
    return AdapterBank(stacked, tuple(names), layout=nodes[0].layout, grouping=grouping)


def _difference(a: Any, b: Any) -> str:
    """What differs between two nodes: their types, else each differing field (array shapes, static values)."""
    if type(a) is not type(b):
        return f"{type(a).__name__} vs {type(b).__name__}"
    parts = []
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if hasattr(x, "shape") or hasattr(y, "shape"):
            x, y = getattr(x, "shape", x), getattr(y, "shape", y)
            label = f"{field.name}.shape"
        else:
            label = field.name
        if x != y:
            parts.append(f"{label} {x!r} vs {y!r}")
    return f"{type(a).__name__} " + (", ".join(parts) or "(equal fields, different structure)")


def stack_adapters(named: Mapping[str, Any], *, grouping: str = "auto") -> dict[str, Any]:
    """One adapter tree holding every adapter of ``named`` (``{name: adapter tree}``), to pick from at call time.

    The trees must adapt the same paths with the same method and shapes; LoRA adapters may differ in rank and
    scale (ranks are zero-padded to the largest and each scale folded into its B, which is exact; the banked LoRA
    nodes have scale 1). Run the result with ``adapter_ids`` (see the module docstring); it trains like any
    adapter tree (each adapter gets the gradient of the examples that used it; wrap the optimizer in
    ``jaxpeft.skip_unused_adapters`` so an adapter no example used stays bit-identical). On disk a bank is a set,
    one checkpoint per adapter: ``jaxpeft.adapter_sets.save_adapter_set(dir, jaxpeft.unstack_adapters(bank), cfg,
    params, step=n)`` (``jaxpeft.checkpoint`` refuses a bank with that fix).

    ``grouping`` says how a mixed batch runs (``AdapterBank.route_for``): ``"auto"`` (default), ``"rows"``
    (LoRA-family factors gathered per row, one batched low-rank product per layer), ``"ragged"``
    (``jax.lax.ragged_dot`` over tokens sorted by adapter) or ``"vmap"`` (each example's adapter gathered and the
    method's rule ``vmap``-ped: the reference, and the path of every non-LoRA-family method). All four compute
    the same outputs and gradients.

    Raises:
      ValueError: fewer than one adapter, a name that is not a string, adapters over different paths (names the
        paths), stacked adapters that differ (names the path and both adapters), an unknown ``grouping``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxpeft
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> cfg = jaxpeft.LoraConfig(rank=2, targets=["dense"])
      >>> named = {name: jaxpeft.init(cfg, params, key=jax.random.key(i)) for i, name in enumerate(["fr", "de"])}
      >>> bank = jaxpeft.stack_adapters(named)
      >>> jaxpeft.bank_names(bank), bank["dense"]["kernel"].adapters.a.shape  # adapter axis first
      (('fr', 'de'), (2, 4, 2))
      >>> jaxpeft.adapter_ids(bank, ["fr", "de", "fr"]).tolist()  # a mixed batch of three examples
      [0, 1, 0]
    """
    if grouping not in GROUPINGS:
        raise ValueError(f"`grouping`={grouping!r}; expected one of {GROUPINGS}.")
    if not isinstance(named, Mapping) or not named:
        raise ValueError("`named` must be a non-empty mapping {name: adapter tree}, e.g. {'fr': fr, 'de': de}.")
    names = list(named)
    if not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"adapter names must be non-empty strings; got {names!r}.")
    tables = {n: dict(adapter_items(named[n])) for n in names}
    for name in names:
        leaf = next((p for p, node in tables[name].items() if hook_kind(node) != "layer"), None)
        if leaf is not None:
            raise ValueError(
                f"adapter {name!r} at {leaf!r} is a {type(tables[name][leaf]).__name__} (a leaf or model-input "
                "adapter: BitFit, LN tuning, prompts), which applies to the whole call; a bank switches adapters of "
                "layer calls (LoRA, DoRA, IA3, LoHa, LoKr, VeRA). Keep such adapters in separate trees and switch "
                "trees instead."
            )
        if any(_is_bank(node) for node in tables[name].values()):
            raise ValueError(f"adapter {name!r} is already a bank; unstack it first (jaxpeft.unstack_adapters).")
        if set(tables[name]) != set(tables[names[0]]):
            diff = sorted(set(tables[name]) ^ set(tables[names[0]]))
            raise ValueError(
                f"adapters {names[0]!r} and {name!r} adapt different paths (e.g. {diff[:3]}); a bank needs the same "
                "targets in every adapter. Make them with the same config's `targets`."
            )
    out: dict[str, Any] = {}
    for path in sorted(tables[names[0]]):
        out = set_path(out, path, _stack_path(path, names, [tables[n][path] for n in names], grouping))
    return out


def _banks(bank: Any) -> dict[str, AdapterBank]:
    table = dict(adapter_items(bank))
    if not table or not all(_is_bank(n) for n in table.values()):
        raise ValueError("expected an adapter tree of banks (from jaxpeft.stack_adapters).")
    name_order(table)
    return table  # type: ignore[return-value]


def bank_names(bank: Any) -> tuple[str, ...]:
    """The adapters' names in a bank tree, in stacking order (their ids are their positions).

    Raises:
      ValueError: not a tree of banks; banks that order the names differently.
    """
    return name_order(_banks(bank))


def adapter_ids(bank: Any, names: str | Sequence[str]) -> jax.Array:
    """The ids of ``names`` in ``bank``: an int32 scalar for one name, shape ``(len(names),)`` for a mixed batch.

    Raises:
      ValueError: a name the bank does not hold (lists the names it holds).
    """
    known = bank_names(bank)
    wanted = [names] if isinstance(names, str) else list(names)
    unknown = sorted({n for n in wanted if n not in known})
    if unknown:
        raise ValueError(f"adapters {unknown} are not in the bank; it holds {list(known)}.")
    ids = np.asarray([known.index(n) for n in wanted], np.int32)
    return jnp.asarray(ids[0] if isinstance(names, str) else ids)


def select_adapter(bank: Any, name: str) -> dict[str, Any]:
    """The adapter tree of ``name`` from a bank tree (banked LoRA: scale 1, B carrying the scale, rank padded)."""
    index = int(adapter_ids(bank, name))
    out: dict[str, Any] = {}
    for path, node in _banks(bank).items():
        out = set_path(out, path, node.pick(index))
    return out


def unstack_adapters(bank: Any) -> dict[str, dict[str, Any]]:
    """``{name: adapter tree}`` from a bank tree: the inverse of :func:`stack_adapters` (see ``select_adapter``)."""
    return {name: select_adapter(bank, name) for name in bank_names(bank)}
