"""Flax NNX support: wrap targeted layers so they compute ``base(x) + s·(x·A)·B``, and convert to and from pytrees."""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpeft import ops
from jaxpeft._paths import set_path
from jaxpeft._select import Layout
from jaxpeft.methods.lora import LoraConfig, LoraWeights, Plan, adapter_items
from jaxpeft.methods.lora import init as lora_init
from jaxpeft.methods.lora import plan as lora_plan

__all__ = [
    "LoraLayer",
    "LoraParam",
    "adapters_of",
    "apply_lora",
    "attach",
    "base_params",
    "infer_layouts",
    "load_adapters",
    "merge",
    "plan",
    "remove",
    "unmerge",
]

M = TypeVar("M")
PathParts = tuple[Hashable, ...]

# Layer types jaxpeft.nnx can adapt (exact flax behaviour; subclasses that override ``__call__`` are refused).
_SUPPORTED = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv, nnx.Embed)
_BASE = "base"


class LoraParam(nnx.Variable):
    """The variable type of LoRA factors A and B: the filter that selects exactly the trainable adapters.

    It subclasses ``nnx.Variable``, **not** ``nnx.Param``, so ``nnx.state(model, nnx.Param)`` is the frozen base
    and ``nnx.state(model, LoraParam)`` the adapters. Use it wherever NNX takes a filter:
    ``nnx.split(model, LoraParam, ...)``, ``nnx.Optimizer(model, tx, wrt=LoraParam)``,
    ``nnx.grad(f, argnums=nnx.DiffState(0, LoraParam))``. (flax's own ``nnx.LoRAParam`` *is* an ``nnx.Param``,
    so a ``wrt=nnx.Param`` filter trains the whole base model along with it.)
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
            reason=f"its class {type(module).__name__} overrides nnx.{cls.__name__}.{overridden[0]}, so the LoRA "
            "branch would not match its forward.",
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
    """Maps NNX graph paths to canonical paths: the ``base`` hop under every ``LoraLayer`` is dropped."""

    def __init__(self, model: Any) -> None:
        self.nodes = list(nnx.iter_graph(model))
        self.wrappers = {p: n for p, n in self.nodes if isinstance(n, LoraLayer)}

    def __call__(self, parts: PathParts) -> PathParts:
        return tuple(k for i, k in enumerate(parts) if not (k == _BASE and parts[:i] in self.wrappers))

    def layers(self) -> Iterator[tuple[PathParts, Any]]:
        """``(canonical path of the weight, module)`` for each supported layer (wrapped or not)."""
        for parts, node in self.nodes:
            if isinstance(node, _SUPPORTED):
                yield (*self(parts), _weight_name(node)), node

    def adapted(self) -> list[tuple[str, LoraLayer]]:
        """``(canonical weight path, wrapper)`` for each ``LoraLayer``, sorted by path."""
        rows = [(_path_text((*self(p), _weight_name(w.base))), w) for p, w in self.wrappers.items()]
        return sorted(rows, key=lambda row: row[0])


class LoraLayer(nnx.Module):
    """A supported layer and its LoRA factors; calling it computes ``base(x) + scale·(dropout(x)·A)·B``.

    ``W + ΔW`` is never formed, so differentiating with respect to the ``LoraParam`` variables never computes a
    gradient for the base kernel. The branch computes in the base output's dtype (A and B are cast down to it).
    Inside ``nnx.scan``/``nnx.vmap`` stacks, A and B carry the kernel's leading stack axes and are sliced with it.

    Attributes:
      base: the wrapped ``nnx.Linear``/``LinearGeneral``/``Einsum``/``Conv``/``Embed``.
      lora_a: A, ``(*stack, *fan_in, r)``.
      lora_b: B, ``(*stack, r, *fan_out)``.
      scale: static ``alpha / rank``.
      dropout: static dropout rate of the branch input; active when ``rngs`` is set and not ``deterministic``.
      deterministic: disables dropout (``model.eval()``, ``nnx.view(model, deterministic=True)``).
      rngs: the dropout ``nnx.RngStream`` or ``None``.
    """

    def __init__(self, base: nnx.Module, lora: LoraWeights, *, rngs: nnx.RngStream | None = None) -> None:
        if not isinstance(base, _SUPPORTED):
            raise TypeError(
                f"LoraLayer wraps {', '.join('nnx.' + c.__name__ for c in _SUPPORTED)}; got {type(base).__name__}."
            )
        self.base = base
        self.lora_a = LoraParam(jnp.asarray(lora.a))
        self.lora_b = LoraParam(jnp.asarray(lora.b))
        self.scale = float(lora.scale)
        self.dropout = float(lora.dropout)
        self.deterministic = False
        self.rngs = nnx.data(rngs)

    def __getattr__(self, name: str) -> Any:
        base = self.__dict__.get("base")
        if name.startswith("_") or base is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        raise AttributeError(
            f"LoraLayer (wrapping nnx.{type(base).__name__}) has no attribute {name!r}. The wrapped layer is `.base`, "
            "but reading its weights directly skips the LoRA branch: call the layer, or jaxpeft.nnx.merge(model) "
            "first."
        )

    @property
    def weights(self) -> LoraWeights:
        """The current adapter as ``LoraWeights`` (the pure-pytree form)."""
        return LoraWeights(self.lora_a.get_value(), self.lora_b.get_value(), self.scale, self.dropout)

    def set_view(self, deterministic: bool | None = None) -> None:
        """Used by ``nnx.view``: ``deterministic=True`` disables LoRA dropout."""
        if deterministic is not None:
            self.deterministic = deterministic

    def _dropout_key(self) -> jax.Array | None:
        if self.dropout == 0.0 or self.deterministic or self.rngs is None:
            return None
        return self.rngs()

    def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        """``base(x, *args, **kwargs) + delta``; at init (B or A zero) the delta is exactly zero."""
        base = self.base
        y = base(x, *args, **kwargs)
        lora = self.weights
        dtype = y.dtype
        if isinstance(base, nnx.Embed):
            delta = ops.embed_delta(x, lora, dtype)
        elif isinstance(base, nnx.Linear):
            delta = ops.dense_delta(x.astype(dtype), lora, dropout_key=self._dropout_key(), precision=base.precision)
        elif isinstance(base, nnx.LinearGeneral):
            delta = ops.dense_delta(
                x.astype(dtype), lora, axes=base.axis, dropout_key=self._dropout_key(), precision=base.precision
            )
        elif isinstance(base, nnx.Einsum):
            subscripts = kwargs.get("einsum_str", args[0] if args else None) or base.einsum_str
            delta = ops.einsum_delta(
                subscripts, x.astype(dtype), lora, dropout_key=self._dropout_key(), precision=base.precision
            )
        else:
            delta = ops.conv_delta(x.astype(dtype), lora, _conv_branch(base, dtype), dropout_key=self._dropout_key())
        return y + delta.astype(dtype)

    def attend(self, query: jax.Array, **kwargs: Any) -> jax.Array:
        """``nnx.Embed.attend`` plus the branch ``scale·(q·Bᵀ)·Aᵀ`` (a tied output head); embeddings only."""
        if not isinstance(self.base, nnx.Embed):
            raise AttributeError(
                f"`attend` exists on wrapped nnx.Embed layers only; this wraps nnx.{type(self.base).__name__}."
            )
        y = self.base.attend(query, **kwargs)
        return y + ops.attend_delta(query.astype(y.dtype), self.weights).astype(y.dtype)


def _conv_branch(base: nnx.Conv, dtype: Any) -> Any:
    """``conv(x, A)`` with the base layer's window, strides, padding and dilations (no bias, no mask)."""

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
            dtype=dtype,
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


def infer_layouts(model: Any) -> dict[str, Layout]:
    """The layout of every ``nnx.Param`` leaf, read from the modules' own configuration (no tracing).

    Weights of ``nnx.Linear``, ``LinearGeneral``, ``Einsum``, ``Conv`` and ``Embed`` get their kind, fan-in and
    fan-out; extra leading axes (stacks built with ``nnx.vmap``/``nnx.scan``) count as ``stack``. Every other
    parameter gets ``kind="unsupported"`` with the reason, so a target that selects it fails loudly.
    Paths are canonical: ``"layers/0/attn/q_proj/kernel"`` (a ``LoraLayer`` adds no path level).

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
    the same dict as before ``apply_lora`` (integer keys of ``nnx.List`` stay integers). Arrays are shared, not
    copied. Pass it to ``jaxpeft.init``/``plan``/``summary`` together with ``infer_layouts(model)``.
    """
    canon = _Canon(model)
    out: dict[Hashable, Any] = {}
    for parts, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        _nested_set(out, canon(tuple(parts)), var.get_value())
    return out


def plan(cfg: LoraConfig, model: Any) -> Plan:
    """The dry run of ``apply_lora(model, cfg)``: one row per target with path, shape, layout, rank and cost."""
    return lora_plan(cfg, base_params(model), layouts=infer_layouts(model))


def adapters_of(model: Any) -> dict[str, Any]:
    """The adapters of an adapted model as the framework-neutral pytree: nested dicts with ``LoraWeights`` leaves.

    The layout is exactly that of ``jaxpeft.init`` on ``base_params(model)`` (string keys, e.g.
    ``adapters["layers"]["0"]["q_proj"]["kernel"]``), so it can be saved with ``jaxpeft.checkpoint``, merged
    with ``jaxpeft.merge``, or applied to a Linen model whose parameter paths agree. Arrays are shared.

    Raises:
      ValueError: the model has no ``LoraLayer``.
    """
    rows = _Canon(model).adapted()
    if not rows:
        raise ValueError(
            f"`model` ({type(model).__name__}) has no LoRA adapters; call jaxpeft.nnx.apply_lora(model, cfg, "
            "key=key) first."
        )
    out: dict[str, Any] = {}
    for path, wrapper in rows:
        out = set_path(out, path, wrapper.weights)
    return out


def _check_unadapted(model: Any, what: str) -> None:
    rows = _Canon(model).adapted()
    if rows:
        raise ValueError(
            f"`model` already has LoRA adapters (e.g. at {rows[0][0]!r}); {what} takes a plain model. Call "
            "jaxpeft.nnx.merge(model) or jaxpeft.nnx.remove(model) first, or jaxpeft.nnx.load_adapters(model, "
            "adapters) to replace the adapter values."
        )


def _check_fits(path: str, lora: LoraWeights, shape: tuple[int, ...], layout: Layout) -> None:
    stack, fan_in, fan_out = layout.split(shape)
    rank = lora.a.shape[-1] if lora.a.ndim else 0
    want_a, want_b = (*stack, *fan_in, rank), (*stack, rank, *fan_out)
    if tuple(lora.a.shape) != want_a or tuple(lora.b.shape) != want_b:
        raise ValueError(
            f"adapter {path!r} has A {tuple(lora.a.shape)} and B {tuple(lora.b.shape)}, but the layer's weight "
            f"{shape} ({layout.kind}, stack {layout.stack}) needs A {want_a} and B {want_b}; were the adapters made "
            "for this model?"
        )


def _dropout_streams(
    table: Mapping[str, LoraWeights], shapes: Mapping[str, tuple[tuple[int, ...], Layout]], rngs: nnx.Rngs | None
) -> dict[str, nnx.RngStream]:
    if rngs is None:
        return {}
    streams: dict[str, nnx.RngStream] = {}
    for path in sorted(table):
        if table[path].dropout == 0.0:
            continue
        shape, layout = shapes[path]
        stack = layout.split(shape)[0]
        try:
            source = rngs["dropout"]
        except (AttributeError, KeyError) as err:
            raise ValueError(
                f"`rngs` has no 'dropout' (or 'default') stream for the LoRA dropout of {path!r}; pass "
                "nnx.Rngs(dropout=seed)."
            ) from err
        streams[path] = source.split(stack) if stack else source.fork()
    return streams


def _validated(model: Any, adapters: Any) -> tuple[dict[str, LoraWeights], dict[str, tuple[tuple[int, ...], Layout]]]:
    """The adapter table and each supported layer's ``(weight shape, layout)``, after checking that they fit."""
    table = dict(adapter_items(adapters))
    shapes: dict[str, tuple[tuple[int, ...], Layout]] = {}
    for parts, module in _Canon(model).layers():
        shapes[_path_text(parts)] = (tuple(getattr(module, _weight_name(module)).shape), _kernel_layout(module))
    layouts = infer_layouts(model)
    for path, lora in sorted(table.items()):
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
        _check_fits(path, lora, shape, layout)
    return table, shapes


def attach(model: M, adapters: Any, *, rngs: nnx.Rngs | None = None) -> M:
    """A copy of ``model`` whose layers at the adapters' paths are wrapped in ``LoraLayer`` with these values.

    Takes any adapter tree in the pure form: from ``jaxpeft.init``, ``adapters_of``, a checkpoint, or one trained
    on a Linen model whose parameter paths agree. ``model`` is left untouched; the copy shares its base arrays
    (no memory is copied) and gets its own variables.

    Args:
      model: an NNX module without adapters.
      adapters: nested dicts with a ``LoraWeights`` at each adapted weight path.
      rngs: ``nnx.Rngs`` whose ``"dropout"`` stream feeds LoRA dropout (each layer forks its own stream, split
        along the stack axes for stacked layers). Without it, dropout is off.

    Returns:
      The adapted model.

    Raises:
      ValueError: the model is already adapted; an adapter path names no supported layer; shapes do not fit.
    """
    _check_unadapted(model, "jaxpeft.nnx.attach")
    table, shapes = _validated(model, adapters)
    streams = _dropout_streams(table, shapes, rngs)

    def wrap(parts: PathParts, node: Any) -> Any:
        if isinstance(node, _SUPPORTED):
            path = _path_text((*parts, _weight_name(node)))
            if path in table:
                return LoraLayer(node, table[path], rngs=streams.get(path))
        return node

    return nnx.recursive_map(wrap, nnx.clone(model))


def apply_lora(model: M, cfg: LoraConfig, *, key: jax.Array, rngs: nnx.Rngs | None = None) -> M:
    """A copy of ``model`` with LoRA on the layers ``cfg`` selects; its output equals the base output at init.

    Selection, ranks, scales and initial values are exactly those of ``jaxpeft.init(cfg, base_params(model),
    key=key, layouts=infer_layouts(model))`` (same key, same adapters). Each targeted layer is wrapped in a
    ``LoraLayer`` computing ``base(x) + s·(x·A)·B``. ``model`` is left untouched; base arrays are shared.

    The functional view is a three-way split::

        graphdef, lora, frozen = nnx.split(model, jaxpeft.nnx.LoraParam, ...)
        grads = jax.grad(lambda l: loss(nnx.merge(graphdef, l, frozen)))(lora)   # adapters only

    and ``nnx.Optimizer(model, tx, wrt=jaxpeft.nnx.LoraParam)`` trains the adapters alone (never ``wrt=nnx.Param``:
    that trains the base). With dropout, split ``nnx.RngState`` out as a fourth part and carry it between steps.

    Args:
      model: an NNX module without adapters (real, or abstract from ``nnx.eval_shape``).
      cfg: the LoRA config; ``"all-linear"`` adapts Linear/LinearGeneral/Einsum layers except output heads.
      key: ``jax.random`` key for the adapter init.
      rngs: optional ``nnx.Rngs`` with a ``"dropout"`` stream; LoRA dropout runs only when given.

    Returns:
      The adapted model.

    Raises:
      ValueError: as ``jaxpeft.plan`` (nothing matched, unsupported layer selected, ...) or the model already has
        adapters.
    """
    _check_unadapted(model, "jaxpeft.nnx.apply_lora")
    adapters = lora_init(cfg, base_params(model), key=key, layouts=infer_layouts(model))
    return attach(model, adapters, rngs=rngs)


def load_adapters(model: Any, adapters: Any) -> None:
    """Set the adapter values (and their static scale/dropout) of an adapted model in place, from the pure form.

    Raises:
      ValueError: the adapter paths differ from the model's adapted layers, or a shape does not fit.
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
        lora = table[path]
        if lora.a.shape != wrapper.lora_a.shape or lora.b.shape != wrapper.lora_b.shape:
            raise ValueError(
                f"adapter {path!r} has A {tuple(lora.a.shape)} and B {tuple(lora.b.shape)}; the model's layer holds "
                f"A {tuple(wrapper.lora_a.shape)} and B {tuple(wrapper.lora_b.shape)}. Use adapters of the same ranks."
            )
    for path, wrapper in rows.items():
        lora = table[path]
        wrapper.lora_a.set_value(jnp.asarray(lora.a))
        wrapper.lora_b.set_value(jnp.asarray(lora.b))
        wrapper.scale = float(lora.scale)
        wrapper.dropout = float(lora.dropout)


def remove(model: M) -> M:
    """A copy of ``model`` with every ``LoraLayer`` replaced by its base layer: the plain model, weights unchanged."""
    return nnx.recursive_map(lambda _, node: node.base if isinstance(node, LoraLayer) else node, nnx.clone(model))


@jax.jit
def _fold_weight(w: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array, sign: jax.Array) -> jax.Array:
    """``W ± scale·A·B`` in float32, cast back to ``W``'s dtype; one compilation per weight shape."""
    delta = LoraWeights(a, b, 1.0).delta(w.shape) * scale
    return (w.astype(jnp.float32) + sign * delta).astype(w.dtype)


def _fold_into(plain: M, adapters: Any, sign: float) -> M:
    """Fold ``sign·ΔW`` into the weights of a plain model, in place (its variables must not be shared)."""
    table, _ = _validated(plain, adapters)
    for parts, module in _Canon(plain).layers():
        lora = table.get(_path_text(parts))
        if lora is not None:
            weight = getattr(module, _weight_name(module))
            s, f = jnp.float32(lora.scale), jnp.float32(sign)
            weight.set_value(_fold_weight(weight.get_value(), jnp.asarray(lora.a), jnp.asarray(lora.b), s, f))
    return plain


def merge(model: M) -> M:
    """A plain copy of an adapted model with ``W + scale·A·B`` folded into each adapted weight.

    The result has no ``LoraLayer``: its forward is exactly the base model's code, and its outputs match the
    adapted model's up to float rounding (the sum is formed in float32, then cast to the weight's dtype).
    ``model`` is left untouched.
    """
    adapters = adapters_of(model)
    return _fold_into(remove(model), adapters, 1.0)


def unmerge(model: M, adapters: Any, *, rngs: nnx.Rngs | None = None) -> M:
    """The inverse of ``merge``: ``W - scale·A·B`` at each adapted weight, with the adapters attached again.

    ``unmerge(merge(m), adapters_of(m))`` equals ``m`` up to float rounding. ``model`` is left untouched.
    """
    _check_unadapted(model, "jaxpeft.nnx.unmerge")
    plain = _fold_into(nnx.clone(model), adapters, -1.0)
    return attach(plain, adapters, rngs=rngs)
