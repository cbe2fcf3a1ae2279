"""The method protocol: adapter nodes, method configs, the neutral layer call, and the generic plan/init/merge.

A PEFT method is two small classes that follow this protocol, nothing else:

- a **config**, a frozen dataclass subclassing :class:`MethodConfig`: its ``method`` name (for JSON), the
  ``targets``/``exclude`` selection fields and whatever hyper-parameters it has, and
  ``init_target(path, weight, layout, key) -> Adapter`` that builds the adapter of one selected weight;
- an **adapter node**, a frozen dataclass subclassing :class:`Adapter` and registered with
  ``jax.tree_util.register_dataclass``: its array fields are the trainable leaves, its static fields
  (``field(metadata={"static": True})``) carry the ``layout`` and any scale or rate; ``forward(call)`` is the
  per-layer rule and ``fold(weight, bias, sign)`` merges it into (``sign=+1``) or out of (``sign=-1``) the base
  weight, or raises :class:`NotMergeableError`.

The framework adapters (``jaxpeft.linen``, ``jaxpeft.nnx``) translate each adapted layer call into one
:class:`LayerCall` and hand it to ``node.forward``; ``plan``/``init``/``merge``/``unmerge`` here, the checkpoints and
the HF interop dispatch on the config object and the node type. No registry: the config object *is* the method,
and a node's class carries its forward rule, so a method defined in the user's own file works everywhere.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxpeft import ops, quant
from jaxpeft._paths import leaves_with_paths, map_with_paths, set_path
from jaxpeft._select import Layout, TargetSpec, matcher, select_targets

__all__ = [
    "CALL_KINDS",
    "STATIC",
    "Adapter",
    "LayerCall",
    "MethodConfig",
    "NotMergeableError",
    "Plan",
    "TargetInfo",
    "adapter_items",
    "check_fits",
    "init",
    "init_adjusted",
    "layouts_of",
    "merge",
    "plan",
    "unmerge",
]

#: ``dataclasses.field(metadata=STATIC)`` marks a static (non-array) field of an adapter node.
STATIC = types.MappingProxyType({"static": True})
#: The kinds of layer call a forward rule can receive (``attend`` is a tied output head ``q·Eᵀ``).
CALL_KINDS = ("dense", "dense_general", "einsum", "conv", "embed", "attend")


class NotMergeableError(ValueError):
    """The adapter cannot be folded into (or out of) the base weight; the message says why and what to do."""


class Adapter:
    """Base class of adapter nodes (one per adapted weight).

    Subclasses are frozen dataclasses registered with ``jax.tree_util.register_dataclass``: array fields are the
    trainable leaves (what ``jax.grad``, optax and checkpoints see), static fields hold the ``layout``
    (:class:`jaxpeft.Layout`, required: stack / fan-in / fan-out axes and layer kind of the adapted weight) and
    any hyper-parameters. Arrays keep the weight's leading stack axes, so scanned/vmapped layers slice them
    like the kernel; inside such a layer ``forward`` receives the sliced node, whose ``layout.stack`` counts
    only the axes that remain.
    """

    layout: Layout
    #: Dropout rate of the method; the framework adapters only provide a dropout key when it is positive.
    dropout: float = 0.0
    #: Whether ``forward`` calls ``call.base`` inside a JAX transform (``jax.vmap``, as adapter banks do); the
    #: framework adapters then give a ``base`` that runs a detached copy of the layer instead of the bound one.
    transforms_base: ClassVar[bool] = False

    def forward(self, call: LayerCall) -> jax.Array:
        """The adapted layer's output for ``call``; at init it must equal ``call.base(call.x)``."""
        raise NotImplementedError(f"{type(self).__name__} defines no forward rule.")

    def fold(self, weight: jax.Array, bias: jax.Array | None, sign: int) -> tuple[jax.Array, jax.Array | None]:
        """``(weight, bias)`` with the adapter merged in (``sign=+1``) or taken out (``sign=-1``)."""
        raise NotMergeableError(f"{type(self).__name__} adapters cannot be merged into the base weights.")

    def check(self, weight_shape: tuple[int, ...]) -> str | None:
        """Why this node does not fit a weight of ``weight_shape`` (None when it does)."""
        return check_ndim(self.layout, weight_shape)

    def describe(self) -> str:
        """A short summary of the hyper-parameters for ``plan`` tables (e.g. ``"r=8 scale=2"``)."""
        return ""

    def weight_axes(self) -> dict[str, tuple[int | None, ...]] | None:
        """For each array field, the weight axis each of its axes runs along (None: an axis of its own, e.g. rank).

        ``jaxpeft.sharding`` shards each adapter array like those axes of its base weight. None (the default)
        means: unknown, replicate the arrays.
        """
        return None

    def at_call(self, n_sliced: int) -> Adapter:
        """This node with its first ``n_sliced`` stack axes sliced away (the leaves already are)."""
        if n_sliced == 0:
            return self
        lay = self.layout
        new: Adapter = dataclasses.replace(  # type: ignore[type-var]
            self, layout=Layout(lay.stack - n_sliced, lay.fan_in, lay.fan_out, lay.kind)
        )
        return new


def check_ndim(layout: Layout, weight_shape: tuple[int, ...]) -> str | None:
    """Why ``layout`` cannot describe a weight of ``weight_shape`` (None when the axis counts agree)."""
    if len(weight_shape) == layout.ndim:
        return None
    return (
        f"the adapter's layout has {layout.stack} stack, {layout.fan_in} fan-in and {layout.fan_out} fan-out axes "
        f"({layout.ndim} in all), the weight {len(weight_shape)}"
    )


def _is_adapter(x: Any) -> bool:
    return isinstance(x, Adapter)


def adapter_items(adapters: Any) -> Iterator[tuple[str, Adapter]]:
    """``(path, adapter node)`` for each adapter in an adapter tree, in flattening order."""
    for path, leaf in leaves_with_paths(adapters, is_leaf=_is_adapter):
        if not isinstance(leaf, Adapter):
            raise ValueError(
                f"adapter tree entry {path!r} is a {type(leaf).__name__}, not an adapter node (jaxpeft.Adapter); "
                "pass the tree returned by jaxpeft.init (or restored by jaxpeft.checkpoint)."
            )
        if not isinstance(getattr(leaf, "layout", None), Layout):
            raise ValueError(f"adapter {path!r} ({type(leaf).__name__}) has no `layout` (a jaxpeft.Layout).")
        yield path, leaf


def layouts_of(adapters: Any) -> dict[str, Layout]:
    """The layout each adapter node carries, by path."""
    return {path: node.layout for path, node in adapter_items(adapters)}


def _shapes(node: Any) -> dict[str, tuple[int, ...]]:
    return {path: tuple(leaf.shape) for path, leaf in leaves_with_paths(node)}


def check_fits(path: str, node: Adapter, weight_shape: Sequence[int]) -> None:
    """Raise a ``ValueError`` naming ``path`` and both shapes when ``node`` does not fit the weight."""
    problem = node.check(tuple(weight_shape))
    if problem is not None:
        shapes = ", ".join(f"{k} {v}" for k, v in _shapes(node).items())
        raise ValueError(
            f"adapter {path!r} ({type(node).__name__}: {shapes}) does not fit the weight of shape "
            f"{tuple(weight_shape)}: {problem}. Were the adapters made for this model?"
        )


# ------------------------------------------------------------------------------------------------ layer call


def _no_key() -> jax.Array | None:
    return None


@dataclasses.dataclass(frozen=True)
class LayerCall:
    """One call of an adapted layer, described independently of the framework (what a forward rule sees).

    The kernel and all factors are call-level: stack axes added by ``nn.scan``/``nnx.vmap`` are already sliced.

    Attributes:
      kind: one of ``CALL_KINDS``.
      x: the input (token ids for ``embed``; the query for ``attend``).
      base: ``base(x)`` runs the unadapted layer (bias included) on any input of ``x``'s shape.
      kernel: the base weight (``embedding`` for ``embed``/``attend``), laid out as ``(*stack, *fan_in, *fan_out)``;
        over a quantised weight (QLoRA) its dequantised values, computed only if the rule reads them.
      bias: the base bias shaped to broadcast against the output, or None.
      axes: ``dense_general``: the input axes contracted with the fan-in axes, in kernel order.
      subscripts: ``einsum``: the einsum string.
      conv: ``conv``: ``conv(x, kernel)``, the layer's convolution (window, strides, padding, dilation) with
        another kernel of the same window and no bias.
      precision: the layer's precision.
      dropout_key: returns a fresh dropout key, or None when the caller asked for no dropout.
      adapter_ids: for an adapter bank (``jaxpeft.stack_adapters``), which of its adapters runs: an integer
        array of shape ``(batch,)`` (one per example along ``x``'s leading axis; a mixed batch) or ``()`` (the
        whole call), or None when the caller gave none. Other methods ignore it.
    """

    kind: str
    x: jax.Array
    base: Callable[[jax.Array], jax.Array]
    kernel: jax.Array
    bias: jax.Array | None = None
    axes: tuple[int, ...] | None = None
    subscripts: str | None = None
    conv: Callable[[jax.Array, jax.Array], jax.Array] | None = None
    precision: Any = None
    dropout_key: Callable[[], jax.Array | None] = _no_key
    adapter_ids: jax.Array | None = None

    def __post_init__(self) -> None:
        if self.kind not in CALL_KINDS:
            raise ValueError(f"LayerCall `kind`={self.kind!r}; expected one of {CALL_KINDS}.")

    def dropout(self, x: jax.Array, rate: float) -> jax.Array:
        """Inverted dropout of ``x`` at ``rate`` when the caller provided a dropout key, else ``x``."""
        if rate <= 0.0:
            return x
        return ops.dropout(x, rate, self.dropout_key())

    def lowrank(self, x: jax.Array, a: jax.Array, b: jax.Array, scale: float, dtype: Any = None) -> jax.Array:
        """``scale · x·(A·B)`` in this layer's output space, never forming ``A·B``.

        A ``(*stack, *fan_in, r)`` and B ``(*stack, r, *fan_out)`` are call-level factors laid out like the
        kernel. Computes in ``x``'s dtype (``dtype`` for ``embed``, whose input is ids).
        """
        if self.kind == "embed":
            return ops.embed_lowrank(x, a, b, scale, dtype if dtype is not None else b.dtype)
        if self.kind == "attend":
            return ops.attend_lowrank(x, a, b, scale, precision=self.precision)
        if self.kind == "einsum":
            return ops.einsum_lowrank(self._subscripts(), x, a, b, scale, precision=self.precision)
        if self.kind == "conv":
            if self.conv is None:
                raise ValueError("LayerCall of kind 'conv' needs its `conv` function.")
            return ops.conv_lowrank(x, a, b, scale, self.conv)
        return ops.dense_lowrank(x, a, b, scale, axes=self.axes, precision=self.precision)

    def _subscripts(self) -> str:
        if self.subscripts is None:
            raise ValueError("LayerCall of kind 'einsum' needs its `subscripts`.")
        return self.subscripts

    def output_vector(self, v: jax.Array, ndim: int) -> jax.Array:
        """``v`` of shape ``(*stack, *fan_out)`` (kernel order) reshaped to broadcast against the output."""
        if self.kind == "einsum":
            p = ops.einsum_plan(self._subscripts())
            return ops.broadcast_to_spec(v, p.stack + p.fan_out, p.out_spec, ndim)
        if self.kind == "attend":
            raise ValueError("output_vector is not defined for a tied head (`attend`): its output axis is the vocab.")
        return v

    def input_vector(self, v: jax.Array) -> jax.Array:
        """``v`` over the contracted input axes reshaped to broadcast against ``x``.

        ``v`` is ``(*stack, *fan_in)`` in kernel order; for ``conv`` it is ``(in_channels,)`` only (the window
        axes do not map onto input axes).
        """
        x = self.x
        if self.kind == "einsum":
            p = ops.einsum_plan(self._subscripts())
            return ops.broadcast_to_spec(v, p.stack + p.fan_in, p.x_spec, x.ndim)
        if self.kind == "dense_general" and self.axes is not None:
            axes = tuple(ax % x.ndim for ax in self.axes)
            letters = "".join(chr(ord("a") + ax) for ax in axes)
            spec = "".join(chr(ord("a") + i) for i in range(x.ndim))
            return ops.broadcast_to_spec(v, letters, spec, x.ndim)
        if self.kind in ("embed", "attend"):
            raise ValueError(f"input_vector is not defined for `{self.kind}` calls.")
        return v


# ------------------------------------------------------------------------------------------------ configs


def _freeze_spec(value: Any, name: str) -> Any:
    if callable(value) or isinstance(value, str):
        return value
    if isinstance(value, Sequence):
        return tuple(value)
    raise ValueError(f"`{name}` must be 'all-linear', a regex, a list of module names or a predicate; got {value!r}.")


class MethodConfig:
    """Base class of method configs: frozen dataclasses, hashable, validated, JSON round-trippable.

    Subclasses define ``method`` (the JSON name), the fields ``targets`` and ``exclude`` (the selection, see
    :func:`jaxpeft.plan`) and ``init_target``. A subclass with its own ``__post_init__`` calls
    ``super().__post_init__()`` (it freezes and checks the selection fields).
    """

    #: The method's name in JSON (``{"method": "lora", ...}``), checkpoints and plan tables.
    method: ClassVar[str] = ""
    #: Fields that do not shape the adapters: a checkpoint restore may change them (e.g. a new dropout rate).
    restore_free: ClassVar[tuple[str, ...]] = ()
    #: Whether ``init_target`` reads the weight's values (not just its shape and dtype); over a quantised base such
    #: a method gets the dequantised weight. True unless a method says otherwise.
    reads_weight_values: ClassVar[bool] = True
    #: Fields stored as ``((key, value), ...)`` pairs but written to JSON as objects.
    json_mappings: ClassVar[tuple[str, ...]] = ()

    targets: TargetSpec
    exclude: TargetSpec

    def __post_init__(self) -> None:
        for field in ("targets", "exclude"):
            spec = _freeze_spec(getattr(self, field), field)
            object.__setattr__(self, field, spec)
            if field == "targets" or callable(spec) or isinstance(spec, str) or spec:
                matcher(spec, field)  # validates entries and regexes now, not at the first init

    def select(self, params: Any, layouts: Mapping[str, Layout] | None) -> list[tuple[str, Any, Layout]]:
        """``[(path, leaf, layout)]`` of the weights this config adapts, sorted by path (see ``select_targets``).

        A quantised weight (``jaxpeft.quant.QuantizedArray``) is selected as one weight of its logical shape; a
        predicate target sees it as a ``jax.ShapeDtypeStruct``, and its row holds the quantised array.
        """
        view, quantized = quant.selection_view(params)
        rows = select_targets(view, self.targets, self.exclude, layouts)
        if quantized:
            rows = [(path, quantized.get(path, leaf), layout) for path, leaf, layout in rows]
        self.check_targets(rows)
        return rows

    def check_targets(self, rows: Sequence[tuple[str, Any, Layout]]) -> None:
        """Method-specific checks of the selection (e.g. a pattern that matches no target); raise ValueError."""

    def for_targets(self, rows: Sequence[tuple[str, Any, Layout]]) -> MethodConfig:
        """The config whose ``init_target`` builds the adapters of ``rows``, the whole selection (default: ``self``).

        ``plan`` and ``init`` call it once, after ``select``. A method whose adapters depend on every target at
        once returns a copy carrying what it needs (VeRA: the largest fan-in, which sizes its shared projection);
        it must compare equal to ``self`` in every JSON field.
        """
        return self

    def init_target(self, path: str, weight: Any, layout: Layout, key: jax.Array) -> Adapter:
        """The adapter of one selected weight (``weight`` may be abstract under ``jax.eval_shape``)."""
        raise NotImplementedError(f"{type(self).__name__} defines no init_target.")

    @property
    def base_adjustment(self) -> str | None:
        """What makes this config change the base weights at init (e.g. ``"init='pissa'"``), or None (default).

        Such a config's adapters are the identity only over the weights ``adjust_base`` returns (PiSSA, OLoRA move
        ``s·A·B`` out of the weight), so ``init`` refuses it and ``init_adjusted`` returns both.
        """
        return None

    @property
    def adjusts_base(self) -> bool:
        """Whether ``init`` needs the base weights changed (``base_adjustment`` is not None)."""
        return self.base_adjustment is not None

    def adjust_base(self, path: str, weight: Any, node: Adapter) -> jax.Array:
        """The base weight at ``path`` that ``node`` (fresh from ``init_target``) is the identity over."""
        raise NotImplementedError(f"{type(self).__name__} does not adjust base weights.")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with the ``method`` name; ``ValueError`` if a field holds a function."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            if callable(value):
                raise ValueError(
                    f"`{field.name}` is a function and cannot be written to JSON; give module names or a regex."
                )
            if field.name in self.json_mappings:
                value = dict(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[field.name] = value
        return {"method": self.method, **out}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        data = dict(data)
        method = data.pop("method", cls.method)
        if method != cls.method:
            raise ValueError(f"config has method={method!r}; {cls.__name__} reads method={cls.method!r} only.")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls.__name__} got unknown fields {unknown}; known fields are {sorted(names)}.")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> Any:
        return cls.from_dict(json.loads(text))


def config_from_dict(data: Mapping[str, Any], configs: Sequence[type[MethodConfig]] = ()) -> MethodConfig:
    """The config a ``to_dict`` came from, found by its ``method`` field among the built-ins and ``configs``."""
    from jaxpeft.methods import BUILTIN_CONFIGS

    table = {c.method: c for c in (*BUILTIN_CONFIGS, *configs)}
    method = data.get("method")
    if method not in table:
        raise ValueError(
            f"config has method={method!r}; known methods are {sorted(table)}. For a method of your own, pass its "
            "config class, e.g. configs=(MyConfig,)."
        )
    return table[method].from_dict(data)


# ------------------------------------------------------------------------------------------------ plan / init


@dataclasses.dataclass(frozen=True)
class TargetInfo:
    """One row of a dry run: which weight is adapted, its layout, and the (abstract) adapter node."""

    path: str
    shape: tuple[int, ...]
    layout: Layout
    node: Any

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The adapter's array shapes by field name."""
        return _shapes(self.node)

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())

    def __getattr__(self, name: str) -> Any:  # rank, scale, ... of the node, for convenience
        if name.startswith("_") or name == "node":
            raise AttributeError(name)
        return getattr(self.node, name)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The dry run of a config over a params tree: the rows that ``init`` would create."""

    targets: tuple[TargetInfo, ...]
    method: str = ""

    @property
    def n_params(self) -> int:
        return sum(t.n_params for t in self.targets)

    def __str__(self) -> str:
        rows = [("path", "shape", "kind", self.method or "adapter", "params")]
        rows += [(t.path, str(t.shape), t.layout.kind, t.node.describe(), f"{t.n_params:,}") for t in self.targets]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        lines.append(f"{len(self.targets)} targets, {self.n_params:,} adapter parameters")
        return "\n".join(lines)


def _check_config(cfg: Any) -> MethodConfig:
    if not isinstance(cfg, MethodConfig):
        raise TypeError(
            f"`cfg` is a {type(cfg).__name__}; expected a method config such as jaxpeft.LoraConfig, "
            "jaxpeft.DoraConfig or jaxpeft.IA3Config (a subclass of jaxpeft.MethodConfig)."
        )
    return cfg


def _abstract(leaf: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype)


def plan(cfg: MethodConfig, params: Any, *, layouts: Mapping[str, Layout] | None = None) -> Plan:
    """What ``init`` would adapt: path, shape, layout and the abstract adapter (shapes, parameter count) per target.

    Nothing is allocated: each target's adapter is built under ``jax.eval_shape``.

    Raises:
      ValueError: as ``select_targets`` (nothing matched, unknown or unsupported layout, ...) and the method's
        own checks (e.g. a ``rank_pattern`` entry that matches no target).
    """
    cfg = _check_config(cfg)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    rows = []
    selected = cfg.select(params, layouts)
    cfg = cfg.for_targets(selected)
    for path, leaf, layout in selected:
        node = jax.eval_shape(
            lambda w, k, path=path, layout=layout: cfg.init_target(path, w, layout, k), _abstract(leaf), key
        )
        rows.append(TargetInfo(path, tuple(leaf.shape), layout, node))
    return Plan(tuple(rows), cfg.method)


def init(cfg: MethodConfig, params: Any, *, key: jax.Array, layouts: Mapping[str, Layout] | None = None) -> dict:
    """The adapters of ``cfg`` for the weights of ``params`` it selects.

    The result is a nested dict mirroring the adapted paths, with an adapter node where each adapted weight is
    (e.g. ``adapters["layers"]["q_proj"]["kernel"].a`` for LoRA). Every built-in method starts as the identity:
    the adapted model's output equals the base model's. Per-target keys are split from ``key`` in sorted path
    order, so the result does not depend on dict insertion order; the same key gives the same adapters.

    Args:
      cfg: the method config (``LoraConfig``, ``DoraConfig``, ``IA3Config`` or your own ``MethodConfig``).
      params: the base parameters (arrays, or ``jax.ShapeDtypeStruct`` for methods that only read shapes); a
        quantised weight (``jaxpeft.quantize``) is dequantised only for a method that reads its values (DoRA).
      key: a ``jax.random`` key.
      layouts: kernel layouts for weights with more than 2 dims (``jaxpeft.linen.infer_layouts``).

    Returns:
      The adapter tree.

    Raises:
      ValueError: a config that changes the base weights at init (``cfg.adjusts_base``: PiSSA, OLoRA): use
        :func:`init_adjusted`.
    """
    cfg = _check_config(cfg)
    if cfg.adjusts_base:
        raise ValueError(
            f"`cfg` ({type(cfg).__name__} with {cfg.base_adjustment}) changes the base weights at init: its "
            "adapters are the identity only over the residual weights, so jaxpeft.init alone would change the "
            "model. Use `params, adapters = jaxpeft.init_adjusted(cfg, params, key=key)` (jaxpeft.linen."
            "init_adjusted for a Linen model; jaxpeft.nnx.adapt adjusts the model itself) and train over those "
            "params."
        )
    rows = cfg.select(params, layouts)
    cfg = cfg.for_targets(rows)
    keys = jax.random.split(key, len(rows))
    adapters: dict[str, Any] = {}
    for (path, leaf, layout), k in zip(rows, keys, strict=True):
        adapters = set_path(adapters, path, _init_target(cfg, path, leaf, layout, k))
    return adapters


def init_adjusted(
    cfg: MethodConfig, params: Any, *, key: jax.Array, layouts: Mapping[str, Layout] | None = None
) -> tuple[Any, dict]:
    """``(new_params, adapters)``: the adapters of ``cfg`` and the base params they are the identity over.

    For a config that adjusts the base (``cfg.adjusts_base``: ``LoraConfig(init="pissa" | "pissa_niter_<n>" |
    "olora")``) each selected weight is replaced by ``cfg.adjust_base`` (PiSSA/OLoRA: the residual
    ``W - s·A·B`` formed in float32 and cast back to the weight's dtype); every other leaf of ``params`` is
    returned as is (same arrays, same tree structure). For any other config the result is
    ``(params, init(cfg, params, ...))``. Keys, selection and ordering are those of ``init``.

    Guarantees: at init the adapted model over ``new_params`` computes the original model's outputs up to the
    rounding of the residual (not bit-exact); ``merge(new_params, adapters)`` is the original weights up to that
    rounding, and after training ``merge(new_params, trained)`` is ``W + ΔW_trained`` (PEFT's PiSSA/OLoRA merge).
    Keep ``new_params`` as the base: the adapters mean nothing over the original weights until converted
    (``jaxpeft.to_plain_lora``).

    Raises:
      ValueError: as ``init``; a base-adjusting config over a quantised weight, a ``jax.ShapeDtypeStruct``
        (values are needed) or a non-floating weight.
    """
    cfg = _check_config(cfg)
    if not cfg.adjusts_base:
        return params, init(cfg, params, key=key, layouts=layouts)
    rows = cfg.select(params, layouts)
    cfg = cfg.for_targets(rows)
    for path, leaf, _ in rows:
        if (problem := _not_adjustable(leaf)) is not None:
            raise ValueError(f"{cfg.base_adjustment} adjusts the base weight {path!r}, which {problem}.")
    keys = jax.random.split(key, len(rows))
    adapters: dict[str, Any] = {}
    new: dict[str, Any] = {}
    for (path, leaf, layout), k in zip(rows, keys, strict=True):
        node = cfg.init_target(path, leaf, layout, k)
        adapters = set_path(adapters, path, node)
        new[path] = cfg.adjust_base(path, leaf, node)
    return map_with_paths(lambda path, w: new.get(path, w), params, is_leaf=quant.is_quantized), adapters


def _not_adjustable(leaf: Any) -> str | None:
    """Why a base-adjusting init cannot replace ``leaf`` (None when it can)."""
    if quant.is_quantized(leaf):
        return "is quantised (initialise on the float params, then quantise the returned params)"
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return "is a jax.ShapeDtypeStruct (its values are needed; wrap the call in jax.eval_shape for shapes only)"
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
        return f"is {jnp.dtype(leaf.dtype).name}, not floating"
    return None


def _init_target(cfg: MethodConfig, path: str, weight: Any, layout: Layout, key: jax.Array) -> Adapter:
    """``cfg.init_target``; a quantised weight is dequantised only for a method that reads weight values.

    A ``QuantizedArray`` has the logical shape and dtype, which is all a method with
    ``reads_weight_values = False`` (LoRA, IA3) reads. Others (DoRA's magnitude, a user's method by default) get
    the dequantised weight inside ``jit``, a transient that XLA may fuse into the method's reductions.
    """
    if quant.is_quantized(weight) and cfg.reads_weight_values:
        return _init_dequantized(cfg, path, weight, layout, key)
    return cfg.init_target(path, weight, layout, key)


@functools.partial(jax.jit, static_argnums=(0, 1, 3))
def _init_dequantized(cfg: MethodConfig, path: str, weight: Any, layout: Layout, key: jax.Array) -> Adapter:
    return cfg.init_target(path, quant.dequantize(weight), layout, key)


# ------------------------------------------------------------------------------------------------ merge


def fold_target(
    node: Adapter, weight: Any, bias: jax.Array | None, sign: int
) -> tuple[Any, jax.Array | None, jax.Array, jax.Array]:
    """``node.fold`` on one weight, through its dequantised values when it is quantised (then requantised alike).

    Returns ``(new weight, new bias or None, the weight's values before, after)``; the last two are float arrays
    for the overflow check (for a quantised weight: before requantising).
    """
    if quant.is_quantized(weight):
        before = quant.dequantize(weight, jnp.float32)
        after, new_bias = node.fold(before, bias, sign)
        return quant.requantize(after, weight), new_bias, before, after
    new_weight, new_bias = node.fold(weight, bias, sign)
    return new_weight, new_bias, weight, new_weight


def _fold(params: Any, adapters: Any, sign: int) -> Any:
    table = dict(adapter_items(adapters))
    flat = dict(leaves_with_paths(params, is_leaf=quant.is_quantized))
    biases: dict[str, Any] = {}
    for path, node in table.items():
        if path not in flat:
            continue
        check_fits(path, node, flat[path].shape)
        if not jnp.issubdtype(flat[path].dtype, jnp.floating):
            raise NotMergeableError(
                f"adapter {path!r}: the weight is {jnp.dtype(flat[path].dtype).name}, not floating; folding into it "
                "would truncate. Keep the adapters separate (jaxpeft.linen.apply) or dequantise the weight first."
            )
        module = path.rpartition("/")[0]
        bias_path = f"{module}/bias" if module else "bias"
        try:
            weight, bias, before, after = fold_target(node, flat[path], flat.get(bias_path), sign)
        except NotMergeableError as err:
            raise NotMergeableError(f"adapter {path!r}: {err}") from None
        _check_finite(path, before, after)
        flat[path] = weight
        if bias is not None:
            _check_finite(bias_path, flat[bias_path], bias)
            biases[bias_path] = bias
    missing = sorted(p for p in table if p not in flat)
    if missing:
        raise ValueError(
            f"adapters {missing[:4]} have no matching parameter; were the adapters made for this model's params?"
        )
    folded = {**{p: flat[p] for p in table}, **biases}
    return map_with_paths(lambda path, w: folded.get(path, w), params, is_leaf=quant.is_quantized)


def _check_finite(path: str, before: jax.Array, after: jax.Array) -> None:
    """Raise when folding made a finite entry inf/NaN (e.g. float16 overflow); values under ``jit`` are unknown."""
    try:
        overflow = bool(jnp.any(jnp.isfinite(before) & ~jnp.isfinite(after)))
    except jax.errors.ConcretizationTypeError:
        return
    if overflow:
        dtype = jnp.dtype(after.dtype)
        raise ValueError(
            f"folding the adapter into {path!r} overflows {dtype.name} (largest finite {float(jnp.finfo(dtype).max):g})"
            "; the result would hold inf and could not be unmerged. Merge into float32 (or bfloat16) params instead."
        )


def merge(params: Any, adapters: Any) -> Any:
    """The params with every adapter folded into its weight (and bias, for methods that scale outputs).

    Pure: returns new params and leaves the inputs untouched. The fold is computed in float32 and cast back to
    each weight's dtype, so the merged model's outputs match the adapted model's up to that rounding.

    A quantised weight (``jaxpeft.quant``, QLoRA) is dequantised, folded in float32 and requantised with the
    same kind and blocks, so the result is quantised again and the merged weight is ``Q(Ŵ + ΔW)`` rather than
    ``Ŵ + ΔW``. Per element the difference is at most one rounding of the new weight (``quant.quantize_array``):
    int8 ``m / 254`` with ``m`` the absolute maximum of the element's merged output channel; NF4
    ``0.152 · m̂`` with ``m̂ < m + M / 255`` (``m`` the merged block's absmax, ``M`` its group's largest). A zero
    update requantises to the same codes. ``unmerge(merge(p))`` differs from ``p`` by at most two such roundings.
    Requantising rounds, so a merge into a quantised weight has no useful gradient: train with the adapters
    separate (``jaxpeft.linen.apply``, ``jaxpeft.nnx``), not through ``jaxpeft.merged``.

    With a base-adjusting init (PiSSA/OLoRA, ``init_adjusted``) pass the residual params the adapters were made
    over: ``merge(residual, trained)`` is the original weights plus the trained update (``W - s·A0·B0 + s·A·B``),
    as PEFT's merge of such an adapter; over the original params it would count the initial ``s·A0·B0`` twice.

    Raises:
      NotMergeableError: a method that cannot be merged, or a non-floating (e.g. int8) weight (the message names
        the path and why).
      ValueError: outside ``jit``, a fold that overflows the weight's dtype (float16 beyond 65504).
    """
    return _fold(params, adapters, 1)


def unmerge(params: Any, adapters: Any) -> Any:
    """The inverse of ``merge`` up to float rounding: each adapter taken back out of its weight.

    Raises:
      NotMergeableError: a method whose merge cannot be undone from the merged weights (e.g. DoRA: keep the
        params you merged into instead, ``merge`` never changes them).
    """
    return _fold(params, adapters, -1)


def fold_weight(w: jax.Array, delta: jax.Array, sign: int) -> jax.Array:
    """``w ± delta`` formed in float32 and cast back to ``w.dtype`` (a helper for ``Adapter.fold``)."""
    return (w.astype(jnp.float32) + sign * delta.astype(jnp.float32)).astype(w.dtype)
