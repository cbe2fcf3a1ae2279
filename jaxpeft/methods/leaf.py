"""What the leaf methods (BitFit, LN tuning) share: the node :class:`LeafDelta` and the selection of vector leaves.

A leaf method's node is a ``jaxpeft.LeafAdapter`` (the protocol's leaf hook): its ``value(leaf)`` replaces the leaf
it sits on. The framework adapters run the **unchanged** model on params in which each adapted leaf is substituted
(``jaxpeft.linen.apply`` before ``model.apply``, so ``nn.scan`` slices it like any parameter; ``jaxpeft.nnx`` in a
``LeafAdapterLayer`` around the module that owns the leaf), so no layer call is intercepted and gradients reach
only the adapters. :class:`LeafDelta` is the built-in node: ``leaf + delta`` with ``delta = 0`` at init.

Selection sees vector leaves of two kinds (``jaxpeft.Layout.kind``, see ``jaxpeft._select.VECTOR_KINDS``):

- ``"bias"``: the ``bias`` of a module that has a ``kernel`` (Dense, DenseGeneral, Einsum, Conv, and their NNX
  twins). Its stack axes are its kernel's (from ``layouts``, or ``(in, out)`` for a 2-D kernel without one), the
  rest are features: a scanned Dense bias is ``(*stack, features)``.
- ``"norm"``: the ``scale`` and ``bias`` of a module that has a ``scale`` and no kernel/embedding (LayerNorm,
  RMSNorm, GroupNorm, BatchNorm, Linen and NNX alike). The params alone cannot say which axes are stacked, so the
  last axis is the feature axis (flax's default ``feature_axes=-1``) and leading axes are stack axes; a norm with
  several feature axes passes its layout, e.g. ``layouts={"ln/scale": Layout(0, 0, 2, "norm")}``.

A layout given for the leaf itself with a vector kind always wins (a checkpoint restores with the saved ones).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxpeft import quant
from jaxpeft._paths import leaves_with_paths
from jaxpeft._select import VECTOR_KINDS, WEIGHT_NAMES, Layout, LayoutEntry, TargetSpec, compile_regex, default_layout
from jaxpeft.api import fold_weight
from jaxpeft.methods._factors import check_dtype
from jaxpeft.protocol import STATIC, LeafAdapter, MethodConfig

__all__ = ["ALL", "LeafAdapter", "LeafConfig", "LeafDelta", "select_leaves", "vector_leaves"]

#: The ``targets`` value that selects every candidate leaf of a leaf method.
ALL = "all"


@functools.partial(jax.tree_util.register_dataclass)
@dataclasses.dataclass(frozen=True)
class LeafDelta(LeafAdapter):
    """A trained delta on one existing leaf: the model sees ``leaf + delta`` (formed in float32, cast to the leaf).

    ``delta`` has the leaf's shape (``(*stack, *features)``) and is zero at init, so the adapted model equals the
    base exactly. ``merge`` writes ``leaf + delta`` into the params with the same arithmetic as the forward (merged
    and adapted outputs agree bit for bit); ``unmerge`` subtracts it (exact up to one float rounding).
    """

    delta: Any
    layout: Layout = dataclasses.field(metadata=STATIC)

    def value(self, leaf: jax.Array) -> jax.Array:
        return fold_weight(leaf, self.delta, 1)

    def fold(self, weight: jax.Array, bias: jax.Array | None, sign: int) -> tuple[jax.Array, jax.Array | None]:
        return fold_weight(weight, self.delta, sign), None

    def check(self, weight_shape: tuple[int, ...]) -> str | None:
        if tuple(self.delta.shape) != tuple(weight_shape):
            return f"expected a delta of the leaf's shape {tuple(weight_shape)}, got {tuple(self.delta.shape)}"
        return None

    def describe(self) -> str:
        return "delta"

    def weight_axes(self) -> dict[str, tuple[int | None, ...]]:
        return {"delta": tuple(range(self.layout.ndim))}


# ------------------------------------------------------------------------------------------------ selection


@dataclasses.dataclass(frozen=True)
class _Candidate:
    leaf: Any
    kind: str
    layout: Layout | None
    problem: str = ""


def _module_of(path: str) -> tuple[str, str]:
    module, _, name = path.rpartition("/")
    return module, name


def _join(module: str, name: str) -> str:
    return f"{module}/{name}" if module else name


def _vector_layout(kind: str, ndim: int, stack: int) -> Layout | None:
    if ndim - stack < 1 or stack < 0:
        return None
    return Layout(stack=stack, fan_in=0, fan_out=ndim - stack, kind=kind)


def vector_leaves(params: Any, layouts: Mapping[str, LayoutEntry] | None = None) -> dict[str, _Candidate]:
    """Every layer bias (kind ``"bias"``) and norm scale/bias (kind ``"norm"``) of ``params``, by path.

    Each candidate has its layout, or None and the reason when its stack axes cannot be known.
    """
    layouts = dict(layouts or {})
    view, _ = quant.selection_view(params)
    flat = dict(leaves_with_paths(view))
    modules: dict[str, dict[str, Any]] = {}
    for path, leaf in flat.items():
        module, name = _module_of(path)
        modules.setdefault(module, {})[name] = leaf
    out: dict[str, _Candidate] = {}
    for module, leaves in modules.items():
        weight = next((n for n in WEIGHT_NAMES if n in leaves), None)
        if weight is not None and "bias" in leaves:
            path, leaf = _join(module, "bias"), leaves["bias"]
            out[path] = _bias_candidate(path, leaf, _join(module, weight), leaves[weight], layouts)
        elif weight is None and "scale" in leaves:
            for name in ("scale", "bias"):
                if name in leaves:
                    path = _join(module, name)
                    out[path] = _norm_candidate(path, leaves[name], layouts)
    return out


def _given(path: str, layouts: Mapping[str, LayoutEntry], kind: str) -> Layout | None:
    layout = layouts.get(path)
    return layout if isinstance(layout, Layout) and layout.kind == kind else None


def _bias_candidate(
    path: str, leaf: Any, kernel_path: str, kernel: Any, layouts: Mapping[str, LayoutEntry]
) -> _Candidate:
    ndim = len(leaf.shape)
    own = _given(path, layouts, "bias")
    if own is not None:
        return _Candidate(leaf, "bias", own)
    kernel_layout = layouts.get(kernel_path) or default_layout(kernel_path, tuple(kernel.shape))
    if isinstance(kernel_layout, Layout):
        layout = _vector_layout("bias", ndim, kernel_layout.stack)
        if layout is not None:
            return _Candidate(leaf, "bias", layout)
    if ndim == 1:
        return _Candidate(leaf, "bias", _vector_layout("bias", 1, 0))
    return _Candidate(
        leaf,
        "bias",
        None,
        f"the stack axes of {path!r} {tuple(leaf.shape)} are those of {kernel_path!r}, whose layout is unknown; pass "
        "`layouts=jaxpeft.linen.infer_layouts(model, *args)` (or jaxpeft.nnx.infer_layouts(model)), or "
        f"layouts={{{path!r}: jaxpeft.Layout(stack=..., fan_in=0, fan_out=..., kind='bias')}}",
    )


def _norm_candidate(path: str, leaf: Any, layouts: Mapping[str, LayoutEntry]) -> _Candidate:
    own = _given(path, layouts, "norm")
    ndim = len(leaf.shape)
    layout = own if own is not None else _vector_layout("norm", ndim, ndim - 1)
    if layout is None:
        return _Candidate(leaf, "norm", None, f"{path!r} is a scalar; only vectors can be tuned")
    return _Candidate(leaf, "norm", layout)


def _leaf_matcher(spec: TargetSpec, what: str) -> Callable[[str, Any], bool]:
    """A predicate over ``(path, leaf)``: ``"all"``, a path regex, module names (HF style) or a function."""
    if callable(spec):
        return lambda path, leaf: bool(spec(path, leaf))
    if isinstance(spec, str):
        if spec == ALL:
            if what == "exclude":
                raise ValueError('`exclude`="all" is not allowed; list module names or give a regex.')
            return lambda path, leaf: True
        regex = compile_regex(spec, what)
        return lambda path, leaf: regex.search(path) is not None
    names = tuple(spec)

    def suffix(path: str, leaf: Any) -> bool:
        module = _module_of(path)[0]
        return any(module == n or module.endswith("/" + n) for n in names)

    return suffix


def select_leaves(
    params: Any,
    targets: TargetSpec,
    exclude: TargetSpec,
    layouts: Mapping[str, LayoutEntry] | None,
    *,
    kinds: Sequence[str],
    all_kinds: Sequence[str],
    names: Sequence[str] = ("scale", "bias"),
    what: str,
) -> list[tuple[str, Any, Layout]]:
    """``[(path, leaf, layout)]`` of the vector leaves ``targets`` selects and ``exclude`` does not, sorted by path.

    Args:
      params: the base params (a quantised weight is never a candidate).
      targets: ``"all"`` (the candidates of ``all_kinds``), a path regex (``re.search``), module names (HF
        ``target_modules``: every candidate leaf of a module whose path ends with a name) or ``fn(path, leaf)``.
      exclude: the same forms but ``"all"``.
      layouts: kernel layouts (they give each bias its stack axes) and/or vector layouts for the leaves.
      kinds: the kinds (``VECTOR_KINDS``) this method may train; ``all_kinds``: those ``"all"`` takes.
      names: the leaf names it may train (BitFit: ``("bias",)``).
      what: the leaves' description for error messages, e.g. "bias".

    Raises:
      ValueError: nothing matched (the message lists candidate paths); a selected leaf's stack axes are unknown.
    """
    unknown = sorted(set(kinds) - set(VECTOR_KINDS))
    if unknown:
        raise ValueError(f"`kinds` has {unknown}; leaf methods train the kinds {VECTOR_KINDS}.")
    candidates = {
        p: c for p, c in vector_leaves(params, layouts).items() if c.kind in kinds and _module_of(p)[1] in names
    }
    if targets == ALL:
        candidates = {p: c for p, c in candidates.items() if c.kind in all_kinds}
    take = _leaf_matcher(targets, "targets")
    has_exclude = callable(exclude) or isinstance(exclude, str) or bool(exclude)
    drop = _leaf_matcher(exclude, "exclude") if has_exclude else None
    chosen: list[tuple[str, Any, Layout]] = []
    excluded: list[str] = []
    for path in sorted(candidates):
        cand = candidates[path]
        if not take(path, cand.leaf):
            continue
        if drop is not None and drop(path, cand.leaf):
            excluded.append(path)
            continue
        if cand.layout is None:
            raise ValueError(f"`targets`={targets!r} selected {path!r}, but {cand.problem}.")
        chosen.append((path, cand.leaf, cand.layout))
    if not chosen and excluded:
        raise ValueError(
            f"`exclude`={exclude!r} removed all {len(excluded)} {what} leaves that `targets`={targets!r} matched "
            f"(e.g. {excluded[0]!r}); narrow `exclude` or widen `targets`."
        )
    if not chosen:
        found = ", ".join(repr(p) for p in sorted(candidates)[:4]) or "none"
        raise ValueError(
            f"`targets`={targets!r} matched no {what} leaf. The model's {what} leaves look like {found}; give module "
            f"names (['q_proj']), a regex over paths (r'attn/.*/bias$') or {ALL!r}."
        )
    return chosen


def zeros_like_leaf(weight: Any, dtype: str) -> jax.Array:
    """The zero delta of a leaf of ``weight``'s shape (``weight`` may be abstract)."""
    return jnp.zeros(tuple(weight.shape), jnp.dtype(dtype))


class LeafConfig(MethodConfig):
    """What the leaf methods' configs share: a zero ``LeafDelta`` of the leaf's shape per selected leaf.

    Not a method itself; ``_kinds``/``_all_kinds``/``_names``/``_what`` say which vector leaves a subclass trains.
    """

    reads_weight_values: ClassVar[bool] = False
    _kinds: ClassVar[tuple[str, ...]] = ()
    _all_kinds: ClassVar[tuple[str, ...]] = ()
    _names: ClassVar[tuple[str, ...]] = ("scale", "bias")
    _what: ClassVar[str] = ""

    dtype: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", check_dtype(self.dtype))
        super().__post_init__()

    def select(self, params: Any, layouts: Mapping[str, LayoutEntry] | None) -> list[tuple[str, Any, Layout]]:
        rows = select_leaves(
            params,
            self.targets,
            self.exclude,
            layouts,
            kinds=self._kinds,
            all_kinds=self._all_kinds,
            names=self._names,
            what=self._what,
        )
        self.check_targets(rows)
        return rows

    def init_target(self, path: str, weight: Any, layout: Layout, key: jax.Array) -> LeafDelta:
        return LeafDelta(zeros_like_leaf(weight, self.dtype), layout=layout)
