"""The method protocol: adapter nodes of three hook kinds, the neutral layer call, and method configs.

A PEFT method is two small classes, nothing else:

- a **config**, a frozen dataclass subclassing :class:`MethodConfig`: its ``method`` name (for JSON), the
  ``targets``/``exclude`` selection fields, its hyper-parameters, and ``init_target(path, weight, layout, key)``
  that builds the adapter node of one selected weight; optionally its HF PEFT codec (``codec``);
- an **adapter node**, a frozen dataclass registered with ``jax.tree_util.register_dataclass`` that subclasses
  one of the three hook kinds:

  ================  ====================================================  ===========================================
  hook kind         what the frameworks do with it                        what the node defines
  ================  ====================================================  ===========================================
  LayerAdapter      intercept the adapted layer's call, hand it over      ``forward(call)``, optionally ``fold``
                    as one :class:`LayerCall`
  LeafAdapter       run the unchanged model on params whose leaf is       ``value(leaf)``, optionally ``fold``
                    replaced by ``value(leaf)`` (BitFit, LN tuning)
  InputAdapter      nothing: the model's own hook consumes the node       nothing (prompt and prefix tuning)
                    (``jaxpeft.prepend_prompt``, ``jaxpeft.prefix_kv``)
  ================  ====================================================  ===========================================

Array fields of a node are its leaves: trainable by default, **frozen** with ``field(metadata=FROZEN)`` (carried,
checkpointed and exported, but never differentiated, never in the optimizer state: LoRA-FA's A, a VeRA file's
projections). Static fields (``field(metadata=STATIC)``, JAX's own convention) carry the ``layout`` and any scale or
rate. Nothing here names a method: the node's class carries its rule, so a method in the user's own file works
through every framework, merge, checkpoints, sharding and (with a codec) HF PEFT files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxpeft import ops
from jaxpeft._paths import leaves_with_paths
from jaxpeft._select import Layout, LayoutEntry, TargetSpec, matcher, select_targets

__all__ = [
    "CALL_KINDS",
    "FROZEN",
    "STATIC",
    "Adapter",
    "InputAdapter",
    "LayerAdapter",
    "LayerCall",
    "LeafAdapter",
    "MethodConfig",
    "NotMergeableError",
    "adapter_items",
    "array_fields",
    "check_fits",
    "check_ndim",
    "frozen_fields",
    "hook_kind",
    "layouts_of",
    "probe_call",
]

#: ``dataclasses.field(metadata=STATIC)`` marks a static (non-array) field of an adapter node.
STATIC = types.MappingProxyType({"static": True})
#: ``dataclasses.field(metadata=FROZEN)`` marks an array field that is carried but never trained.
FROZEN = types.MappingProxyType({"frozen": True})
#: The kinds of layer call a forward rule can receive (``attend`` is a tied output head ``q·Eᵀ``).
CALL_KINDS = ("dense", "dense_general", "einsum", "conv", "embed", "attend")


class NotMergeableError(ValueError):
    """The adapter cannot be folded into (or out of) the base weight; the message says why and what to do."""


# ------------------------------------------------------------------------------------------------ nodes


class Adapter:
    """Base class of adapter nodes (one per adapted weight). Subclass one of its three hook kinds.

    Subclasses are frozen dataclasses registered with ``jax.tree_util.register_dataclass``. Their fields:

    - **array fields** (no metadata) are the trainable leaves: what ``jax.grad``, optax and checkpoints see;
    - **frozen array fields** (``field(metadata=FROZEN)``) are leaves too (checkpointed, sharded, exported, sliced by
      ``nn.scan``), but the frameworks stop their gradient, ``jaxpeft.partition``/``freeze``/``trainable_mask``
      always count them frozen, and NNX stores them as ``jaxpeft.nnx.AdapterFrozen`` (not ``AdapterParam``);
    - **static fields** (``field(metadata=STATIC)``) are hashable metadata, among them ``layout``.

    Arrays keep the weight's leading stack axes, so scanned/vmapped layers slice them like the kernel; inside such
    a layer the hook receives the sliced node, whose ``layout.stack`` counts only the axes that remain.

    Attributes:
      layout: required, static: the adapted weight's :class:`jaxpeft.Layout` (stack / fan-in / fan-out axes,
        kind). ``merge``, checkpoints, export and sharding read it; nothing re-derives it from shapes.
      dropout: the method's dropout rate (0 by default). The frameworks create a dropout key for a call only
        when it is positive (``LayerCall.dropout_key``), so a method without dropout consumes no rng.
      transforms_base: class-level; True when ``forward`` calls ``call.base`` inside a JAX transform
        (``jax.vmap``, as adapter banks do). The frameworks then give a ``base`` that runs a detached copy of the
        layer instead of the bound one (Flax forbids bound modules inside JAX transforms).
      b_factors: class-level; the array fields that are LoRA's "B" (the up-projection, zero at init), which
        ``jaxpeft.loraplus`` trains at its larger rate. Empty for methods without such a factor.
    """

    layout: Layout
    dropout: float = 0.0
    transforms_base: ClassVar[bool] = False
    b_factors: ClassVar[tuple[str, ...]] = ()

    def check(self, weight_shape: tuple[int, ...]) -> str | None:
        """Why this node does not fit a weight of ``weight_shape`` (None when it does).

        The default checks the layout's axis count and, where ``weight_axes`` says which weight axis an array axis
        runs along, that their sizes agree; override it for more (LoRA: the rank of A and B agree).
        """
        if problem := check_ndim(self.layout, weight_shape):
            return problem
        for field, axes in (self.weight_axes() or {}).items():
            value = getattr(self, field, None)
            if value is None:
                continue
            shape = tuple(value.shape)
            if len(shape) != len(axes):
                return f"`{field}` has {len(shape)} axes, expected {len(axes)}"
            for size, axis in zip(shape, axes, strict=True):
                if axis is not None and size != weight_shape[axis]:
                    want = tuple("r" if a is None else weight_shape[a] for a in axes)
                    return f"`{field}` {shape} does not run along the weight's axes: expected {want}"
        return None

    def describe(self) -> str:
        """A short summary of the hyper-parameters for ``plan`` tables (e.g. ``"r=8 scale=2"``)."""
        return ""

    def weight_axes(self) -> dict[str, tuple[int | None, ...]] | None:
        """For each array field, the weight axis each of its axes runs along (None: an axis of its own, e.g. rank).

        ``jaxpeft.sharding`` shards each adapter array like those axes of its base weight. None (the default)
        means: unknown, replicate the arrays.
        """
        return None

    @property
    def bank_size(self) -> int | None:
        """How many adapters ``adapter_ids`` chooses between in this node (an adapter bank), or None."""
        return None

    def at_call(self, n_sliced: int) -> Adapter:
        """This node with its first ``n_sliced`` stack axes sliced away (the leaves already are)."""
        if n_sliced == 0:
            return self
        layout = dataclasses.replace(self.layout, stack=self.layout.stack - n_sliced)
        new: Adapter = dataclasses.replace(self, layout=layout)  # type: ignore[type-var]
        return new

    def frozen_stopped(self) -> Adapter:
        """This node with ``jax.lax.stop_gradient`` on its frozen fields: what the hooks receive."""
        names = frozen_fields(self)
        if not names:
            return self
        stopped = {n: jax.tree.map(jax.lax.stop_gradient, getattr(self, n)) for n in names}
        new: Adapter = dataclasses.replace(self, **stopped)  # type: ignore[type-var]
        return new


class LayerAdapter(Adapter):
    """An adapter that rewrites one layer call: ``forward(call)`` returns the adapted output.

    The frameworks describe every call of the adapted layer as one :class:`LayerCall`; at init ``forward`` must
    return ``call.base(call.x)`` (``jaxpeft.init`` checks it on a probe call).

    ``grouped_rows = True`` declares that ``forward`` reads the node's arrays only through ``call.lowrank`` (a
    ``x·A·B``-shaped branch): an adapter bank of such nodes then runs a mixed batch by calling ``forward`` once on
    the whole bank with ``call.rows`` set (grouped matmuls) instead of gathering every array per example and
    ``vmap``-ping the rule (the reference path, which every other node takes).
    """

    grouped_rows: ClassVar[bool] = False

    def forward(self, call: LayerCall) -> jax.Array:
        """The adapted layer's output for ``call``; at init it must equal ``call.base(call.x)``."""
        raise NotImplementedError(f"{type(self).__name__} defines no forward rule.")

    def fold(self, weight: jax.Array, bias: jax.Array | None, sign: int) -> tuple[jax.Array, jax.Array | None]:
        """``(weight, bias)`` with the adapter merged in (``sign=+1``) or taken out (``sign=-1``).

        The default refuses (:class:`NotMergeableError`); ``jaxpeft.merge`` names the path. Compute in float32
        and return the weight's dtype (``jaxpeft.api.fold_weight``); the overflow, dtype and fit checks are the
        caller's.
        """
        raise NotMergeableError(f"{type(self).__name__} adapters cannot be merged into the base weights.")


class LeafAdapter(Adapter):
    """An adapter that trains an existing leaf in place (BitFit's biases, LN tuning's scales).

    The frameworks never intercept a call for it: they run the unchanged model on params whose leaf at the
    adapter's path is replaced by ``value(leaf)``.
    """

    def value(self, leaf: jax.Array) -> jax.Array:
        """What the model sees in place of ``leaf`` (at init exactly ``leaf``)."""
        raise NotImplementedError(f"{type(self).__name__} defines no value rule.")

    def fold(self, weight: jax.Array, bias: jax.Array | None, sign: int) -> tuple[jax.Array, jax.Array | None]:
        """``value(weight)`` for ``sign=+1`` (so merged and adapted models compute the same); override for ``-1``."""
        if sign > 0:
            return self.value(weight), None
        raise NotMergeableError(f"{type(self).__name__} defines no inverse of its value rule (unmerge).")


class InputAdapter(Adapter):
    """An adapter that is an extra model input, not a weight update (prompt tuning's virtual tokens, prefixes).

    It hangs on a weight (the input embedding table) for selection, checkpoints and HF files, but no framework
    runs it and nothing can be merged: the model's own hook consumes it (``jaxpeft.prepend_prompt``,
    ``jaxpeft.prefix_kv``).
    """


def hook_kind(node: Any) -> str:
    """``"layer"``, ``"leaf"`` or ``"input"``: which hook of the protocol ``node`` implements.

    A direct ``Adapter`` subclass with a ``forward`` method is a layer adapter (the protocol before the three kinds
    were named).

    Raises:
      TypeError: ``node`` implements none of them.
    """
    if isinstance(node, LeafAdapter):
        return "leaf"
    if isinstance(node, InputAdapter):
        return "input"
    if isinstance(node, LayerAdapter) or callable(getattr(node, "forward", None)):
        return "layer"
    raise TypeError(
        f"{type(node).__name__} is an adapter node with no hook: subclass jaxpeft.LayerAdapter (define forward), "
        "jaxpeft.LeafAdapter (define value) or jaxpeft.InputAdapter."
    )


def array_fields(node: Any) -> tuple[str, ...]:
    """The names of a node's array fields (trainable and frozen), in field order."""
    if not dataclasses.is_dataclass(node):
        return tuple(name for name in getattr(node, "array_field_names", ()))
    return tuple(f.name for f in dataclasses.fields(node) if not f.metadata.get("static"))


def frozen_fields(node: Any) -> tuple[str, ...]:
    """The names of a node's frozen array fields (``field(metadata=FROZEN)``), in field order."""
    own = getattr(node, "frozen_field_names", None)
    if own is not None:
        return tuple(own)
    if not dataclasses.is_dataclass(node):
        return ()
    return tuple(f.name for f in dataclasses.fields(node) if f.metadata.get("frozen") and not f.metadata.get("static"))


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


def node_shapes(node: Any) -> dict[str, tuple[int, ...]]:
    """The shapes of a node's arrays by leaf path (``a``, ``b``, ...)."""
    return {path: tuple(leaf.shape) for path, leaf in leaves_with_paths(node)}


def check_fits(path: str, node: Adapter, weight_shape: Sequence[int]) -> None:
    """Raise a ``ValueError`` naming ``path`` and both shapes when ``node`` does not fit the weight."""
    problem = node.check(tuple(weight_shape))
    if problem is not None:
        shapes = ", ".join(f"{k} {v}" for k, v in node_shapes(node).items())
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
      axes: ``dense``/``dense_general``: the axes of ``x`` contracted with the kernel's fan-in axes, in kernel
        order, as non-negative indices (Flax's negative or default ``axis`` is normalised when the call is made:
        ``dense`` contracts ``(x.ndim - 1,)``). None for the other kinds.
      subscripts: ``einsum``: the einsum string.
      conv: ``conv``: ``conv(x, kernel)``, the layer's convolution (window, strides, padding, dilation) with
        another kernel of the same window and no bias.
      precision: the layer's precision.
      dropout_key: returns a fresh dropout key, or None when the caller asked for no dropout.
      adapter_ids: for an adapter bank (``jaxpeft.stack_adapters``), which of its adapters runs: an integer
        array of shape ``(batch,)`` (one per example along ``x``'s leading axis; a mixed batch) or ``()`` (the
        whole call), or None when the caller gave none. Other methods ignore it.
      rows: set by an adapter bank running a mixed batch on the grouped path (a node whose class sets
        ``grouped_rows = True``): the ``(batch,)`` adapter id of each row of ``x``. The node then holds the whole
        bank (factors with the adapter axis first) and :meth:`lowrank` contracts each row with its own adapter's
        factors (``route``: ``"rows"``, factors gathered per row, or ``"ragged"``, grouped matmuls over the
        whole bank). None otherwise.
      route: ``"rows"`` or ``"ragged"``, see ``rows``.
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
    rows: jax.Array | None = None
    route: str = "rows"

    def __post_init__(self) -> None:
        if self.kind not in CALL_KINDS:
            raise ValueError(f"LayerCall `kind`={self.kind!r}; expected one of {CALL_KINDS}.")
        if self.kind in ("dense", "dense_general"):
            ndim = jnp.ndim(self.x)
            axes = (-1,) if self.axes is None else tuple(self.axes)
            object.__setattr__(self, "axes", tuple(int(ax) % ndim for ax in axes))
        if self.kind == "einsum" and self.subscripts is None:
            raise ValueError("LayerCall of kind 'einsum' needs its `subscripts`.")
        if self.kind == "conv" and self.conv is None:
            raise ValueError("LayerCall of kind 'conv' needs its `conv` function.")

    def dropout(self, x: jax.Array, rate: float) -> jax.Array:
        """Inverted dropout of ``x`` at ``rate`` when the caller provided a dropout key, else ``x``."""
        if rate <= 0.0:
            return x
        return ops.dropout(x, rate, self.dropout_key())

    def lowrank(self, x: jax.Array, a: jax.Array, b: jax.Array, scale: float, dtype: Any = None) -> jax.Array:
        """``scale · x·(A·B)`` in this layer's output space, never forming ``A·B``.

        A ``(*stack, *fan_in, r)`` and B ``(*stack, r, *fan_out)`` are call-level factors laid out like the
        kernel. Computes in ``x``'s dtype (``dtype`` for ``embed``, whose input is ids). On a grouped mixed-batch
        call (``rows`` set; ``dense``/``dense_general`` only) A and B are the bank's, adapter axis first, and row
        ``i`` of ``x`` runs adapter ``rows[i]``.
        """
        if self.rows is not None:
            if self.kind not in ("dense", "dense_general"):
                raise ValueError(f"a grouped mixed batch runs `dense`/`dense_general` calls, not `{self.kind}`.")
            if self.route == "ragged":
                return ops.dense_lowrank_grouped(x, self.rows, a, b, scale, axes=self.axes, precision=self.precision)
            return ops.dense_lowrank_rows(x, self.rows, a, b, scale, axes=self.axes, precision=self.precision)
        if self.kind == "embed":
            return ops.embed_lowrank(x, a, b, scale, dtype if dtype is not None else b.dtype)
        if self.kind == "attend":
            return ops.attend_lowrank(x, a, b, scale, precision=self.precision)
        if self.kind == "einsum":
            return ops.einsum_lowrank(str(self.subscripts), x, a, b, scale, precision=self.precision)
        if self.kind == "conv":
            assert self.conv is not None
            return ops.conv_lowrank(x, a, b, scale, self.conv)
        return ops.dense_lowrank(x, a, b, scale, axes=self.axes, precision=self.precision)

    def contract(self, w: jax.Array, x: jax.Array | None = None) -> jax.Array:
        """The layer's own contraction of ``x`` (default ``self.x``) with a kernel-shaped array ``w``, no bias.

        The public way to apply a weight-sized update ``ΔW`` (LoHa's, LoKr's, a Householder product's) to any
        call kind: ``x·W`` over ``axes`` for ``dense``/``dense_general``, the layer's einsum for ``einsum``, its
        convolution for ``conv``, the rows ``W[ids]`` for ``embed`` and ``q·Wᵀ`` for ``attend``. ``w`` is
        call-level (no scan stack axes) and computes in its own dtype: cast it to the activations' first.
        """
        x = self.x if x is None else x
        if self.kind in ("dense", "dense_general"):
            assert self.axes is not None
            fan_in = tuple(range(len(self.axes)))  # a call-level dense kernel is (*fan_in, *fan_out)
            return jax.lax.dot_general(x, w, ((self.axes, fan_in), ((), ())), precision=self.precision)
        if self.kind == "einsum":
            return jnp.einsum(str(self.subscripts), x, w, precision=self.precision)
        if self.kind == "conv":
            assert self.conv is not None
            return self.conv(x, w)
        if self.kind == "embed":
            return jnp.take(w, x, axis=0)
        return jnp.einsum("...f,vf->...v", x, w, precision=self.precision)

    def output_vector(self, v: jax.Array, ndim: int) -> jax.Array:
        """``v`` of shape ``(*stack, *fan_out)`` (kernel order) reshaped to broadcast against the output."""
        if self.kind == "einsum":
            p = ops.einsum_plan(str(self.subscripts))
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
            p = ops.einsum_plan(str(self.subscripts))
            return ops.broadcast_to_spec(v, p.stack + p.fan_in, p.x_spec, x.ndim)
        if self.kind == "dense_general":
            assert self.axes is not None
            letters = "".join(chr(ord("a") + ax) for ax in self.axes)
            spec = "".join(chr(ord("a") + i) for i in range(x.ndim))
            return ops.broadcast_to_spec(v, letters, spec, x.ndim)
        if self.kind in ("embed", "attend"):
            raise ValueError(f"input_vector is not defined for `{self.kind}` calls.")
        return v


# The probe letters of a synthetic einsum: batch, stack, fan-in, fan-out.
_PROBE_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def probe_call(layout: Layout, kernel: jax.Array, key: jax.Array, batch: int = 2) -> LayerCall:
    """A synthetic call of a layer of ``layout`` over ``kernel`` (call-level for every kind but ``einsum``).

    ``x`` is a small standard-normal input (ids for ``embed``); ``base`` is the plain contraction with ``kernel``.
    An ``einsum`` layout gets the einsum ``"B<stack><fan-in>,<stack><fan-in><fan-out>->B<stack><fan-out>"``, so its
    stack axes are einsum batch axes. ``jaxpeft.init`` runs each new node's hook on such a call to check that the
    adapted output equals the base output; it also serves tests of a method's forward rule.

    Raises:
      ValueError: a layout this probe cannot build (a convolution with more than three window axes).
    """
    shape = tuple(kernel.shape)
    kind = layout.kind
    if kind == "embed":
        ids = jax.random.randint(key, (batch, 3), 0, shape[0])
        return LayerCall(kind="embed", x=ids, base=lambda i: jnp.take(kernel, i, axis=0), kernel=kernel)
    stack, fan_in, fan_out = layout.split(shape)
    if kind == "einsum":
        letters = iter(_PROBE_LETTERS[1:])
        s, i, o = ("".join(next(letters) for _ in group) for group in (stack, fan_in, fan_out))
        subscripts = f"a{s}{i},{s}{i}{o}->a{s}{o}"
        x = jax.random.normal(key, (batch, *stack, *fan_in), kernel.dtype)
        return LayerCall(
            kind="einsum",
            x=x,
            base=lambda inp: jnp.einsum(subscripts, inp, kernel),
            kernel=kernel,
            subscripts=subscripts,
        )
    if kind == "conv":
        window = fan_in[:-1]
        if len(window) > 3:
            raise ValueError(f"probe_call builds convolutions of up to 3 window axes, not {len(window)}.")
        spatial = "DHW"[3 - len(window) :]
        numbers = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")

        def conv(inp: jax.Array, k: jax.Array) -> jax.Array:
            return jax.lax.conv_general_dilated(inp, k, (1,) * len(window), "SAME", dimension_numbers=numbers)

        x = jax.random.normal(key, (batch, *([4] * len(window)), fan_in[-1]), kernel.dtype)
        return LayerCall(kind="conv", x=x, base=lambda inp: conv(inp, kernel), kernel=kernel, conv=conv)
    x = jax.random.normal(key, (batch, *fan_in), kernel.dtype)
    axes = tuple(range(1, 1 + len(fan_in)))

    def dense(inp: jax.Array) -> jax.Array:
        return jax.lax.dot_general(inp, kernel, ((axes, tuple(range(len(fan_in)))), ((), ())))

    return LayerCall(kind=kind, x=x, base=dense, kernel=kernel, axes=axes)


# ------------------------------------------------------------------------------------------------ configs


def freeze_spec(value: Any, name: str) -> Any:
    """A target spec in its hashable form (sequences become tuples); ``ValueError`` for anything else."""
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

    Class attributes a method may set:

    - ``method``: the method's name in JSON (``{"method": "lora", ...}``), checkpoints and plan tables.
    - ``restore_free``: fields that do not shape the adapters, so a checkpoint restore may change them (a new
      dropout rate, an init that only decided the starting values). Every other field must equal the saved
      config's, or the restore is refused: an init-only field left out of this tuple blocks every restore.
    - ``reads_weight_values``: whether ``init_target`` reads the weight's values, not only its shape and dtype
      (True by default). Over a quantised base such a method gets the dequantised weight (computed under ``jit``);
      under ``jax.eval_shape`` params may be abstract only for methods that say False.
    - ``json_mappings``: fields stored as ``((key, value), ...)`` pairs (hashable) but written to JSON as objects
      (``rank_pattern``).
    - ``codec``: the method's HF PEFT codec (``jaxpeft.hf.PeftCodec``: its ``peft_type``, field table, ``to_hf``
      and ``from_hf``), or None when PEFT has no format for it. ``jaxpeft.hf`` dispatches only through it.
    - ``hf_advice``: for a method without a codec, what to do instead (shown when an export is refused).
    """

    method: ClassVar[str] = ""
    restore_free: ClassVar[tuple[str, ...]] = ()
    reads_weight_values: ClassVar[bool] = True
    json_mappings: ClassVar[tuple[str, ...]] = ()
    codec: ClassVar[Any] = None
    hf_advice: ClassVar[str] = ""

    targets: TargetSpec
    exclude: TargetSpec

    def __post_init__(self) -> None:
        for field in ("targets", "exclude"):
            spec = freeze_spec(getattr(self, field), field)
            object.__setattr__(self, field, spec)
            if field == "targets" or callable(spec) or isinstance(spec, str) or spec:
                matcher(spec, field)  # validates entries and regexes now, not at the first init

    def select(self, params: Any, layouts: Mapping[str, LayoutEntry] | None) -> list[tuple[str, Any, Layout]]:
        """``[(path, leaf, layout)]`` of the weights this config adapts, sorted by path (see ``select_targets``).

        A quantised weight (``jaxpeft.quant.QuantizedArray``) is selected as one weight of its logical shape; a
        predicate target sees it as a ``jax.ShapeDtypeStruct``, and its row holds the quantised array.
        """
        from jaxpeft import quant

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
    def identity_at_init(self) -> bool:
        """Whether this config's fresh adapters leave the model unchanged (True by default).

        ``jaxpeft.init`` checks it on a probe of each new kind of node and refuses a config that claims it and
        is not (an init that moves the outputs is a bug that training would silently build on). Return False
        for a config that is deliberately not the identity (``IA3Config(init_ones=False)``).
        """
        return True

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
            if not field.init:
                continue
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
        names = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls.__name__} got unknown fields {unknown}; known fields are {sorted(names)}.")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> Any:
        return cls.from_dict(json.loads(text))


def check_config(cfg: Any) -> MethodConfig:
    """``cfg`` when it is a method config; a ``TypeError`` naming the built-in configs otherwise."""
    if not isinstance(cfg, MethodConfig):
        raise TypeError(
            f"`cfg` is a {type(cfg).__name__}; expected a method config such as jaxpeft.LoraConfig, "
            "jaxpeft.DoraConfig or jaxpeft.IA3Config (a subclass of jaxpeft.MethodConfig)."
        )
    return cfg


def n_params(node: Any) -> int:
    """The number of array entries of a node (trainable and frozen)."""
    return sum(math.prod(s) for s in node_shapes(node).values())
