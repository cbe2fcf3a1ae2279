"""Target selection: which parameter leaves a method adapts, and how each kernel's axes are laid out."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jaxpeft._paths import leaves_with_paths

__all__ = [
    "ALL_LINEAR",
    "LINEAR_KINDS",
    "OUTPUT_HEAD_NAMES",
    "VECTOR_KINDS",
    "WEIGHT_NAMES",
    "Layout",
    "TargetSpec",
    "Unsupported",
    "compile_regex",
    "default_layout",
    "match_pattern",
    "matcher",
    "select_targets",
]

ALL_LINEAR = "all-linear"
#: Leaf names that hold a layer's weight; module-name targets adapt these and skip biases/scales.
WEIGHT_NAMES = ("kernel", "embedding", "weight")
#: Kinds of layer that ``"all-linear"`` adapts (when layouts were inferred from the model).
LINEAR_KINDS = ("dense", "dense_general", "einsum")
#: Module names treated as the output head, which ``"all-linear"`` leaves alone (as HF PEFT does).
OUTPUT_HEAD_NAMES = ("lm_head", "head", "logits", "output_head")
#: Kinds of a vector leaf trained in place (``jaxpeft.BitFitConfig``, ``jaxpeft.LNTuningConfig``): a layer's bias and
#: a norm layer's scale or bias. Their layouts have no fan-in axes: ``(*stack, *features)`` with ``fan_out`` features.
VECTOR_KINDS = ("bias", "norm")
#: The layer kinds a ``Layout`` describes.
LAYER_KINDS = ("dense", "dense_general", "einsum", "conv", "embed")
KINDS = (*LAYER_KINDS, *VECTOR_KINDS)

TargetSpec = str | Sequence[str] | Callable[[str, Any], bool]


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a kernel's axes split into leading stack axes, fan-in axes and fan-out axes, in that order.

    A plain ``(in, out)`` Dense kernel is ``Layout(stack=0, fan_in=1, fan_out=1)``; the same Dense inside
    ``nn.scan`` has a ``(layers, in, out)`` kernel and ``stack=1``; a Conv kernel ``(kh, kw, in, out)`` has
    ``fan_in=3``. Adapters follow it: A is ``(*stack, *fan_in, rank)`` and B is ``(*stack, rank, *fan_out)``.

    Args:
      stack: number of leading axes that index independent layers (scan/vmap stacks, einsum batch axes).
      fan_in: number of axes contracted with the input.
      fan_out: number of axes that appear in the output.
      kind: the layer kind ("dense", "dense_general", "einsum", "conv" or "embed"), or for a vector leaf
        (``VECTOR_KINDS``: "bias", "norm") what it is; a vector has ``fan_in=0`` and its feature axes as fan-out.

    A layer that cannot be adapted has no layout: the layout tables hold :class:`Unsupported` with the reason there.
    """

    stack: int = 0
    fan_in: int = 1
    fan_out: int = 1
    kind: str = "dense"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"`kind`={self.kind!r} is not one of {KINDS}.")
        min_fan_in = 0 if self.kind in VECTOR_KINDS else 1
        if min(self.stack, self.fan_in, self.fan_out) < 0 or self.fan_in < min_fan_in or self.fan_out < 1:
            raise ValueError(
                f"Layout(stack={self.stack}, fan_in={self.fan_in}, fan_out={self.fan_out}) is invalid: "
                "stack must be >= 0, fan_in and fan_out >= 1 (fan_in >= 0 for the vector kinds 'bias', 'norm')."
            )

    @property
    def ndim(self) -> int:
        return self.stack + self.fan_in + self.fan_out

    def split(self, shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """``(stack_shape, fan_in_shape, fan_out_shape)`` of a kernel of this layout."""
        shape = tuple(shape)
        s, i = self.stack, self.stack + self.fan_in
        return shape[:s], shape[s:i], shape[i:]

    def axes(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """The weight-axis indices of the ``(stack, fan_in, fan_out)`` groups."""
        s, i = self.stack, self.stack + self.fan_in
        return tuple(range(s)), tuple(range(s, i)), tuple(range(i, self.ndim))

    def fan_in_size(self, shape: Sequence[int]) -> int:
        return math.prod(self.split(shape)[1])


@dataclasses.dataclass(frozen=True)
class Unsupported:
    """Why a weight cannot be adapted, where a layout table (``infer_layouts``) would hold its :class:`Layout`.

    Selecting such a weight is a ``ValueError`` that gives ``reason`` and the fix (``exclude`` it).
    """

    reason: str


#: What a layout table maps a weight path to.
LayoutEntry = Layout | Unsupported


def default_layout(path: str, shape: Sequence[int]) -> Layout | None:
    """The layout of a 2-D leaf when nothing else is known: ``(in, out)``; ``(vocab, features)`` for embeddings."""
    if len(shape) != 2:
        return None
    return Layout(kind="embed" if path.rsplit("/", 1)[-1] == "embedding" else "dense")


def _module_path(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


def compile_regex(pattern: str, what: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"`{what}` entry {pattern!r} is not a valid regular expression: {err}.") from err


def match_pattern(pattern: str, path: str) -> bool:
    """Whether a path regex (``re.search`` semantics) matches ``path``."""
    return re.search(pattern, path) is not None


def matcher(spec: TargetSpec, what: str) -> Callable[[str, Any, LayoutEntry | None], bool]:
    """A predicate over ``(path, leaf, layout)`` for one target or exclude spec."""
    if callable(spec):
        return lambda path, leaf, layout: bool(spec(path, leaf))
    if isinstance(spec, str):
        if spec == ALL_LINEAR:
            if what == "exclude":
                raise ValueError('`exclude`="all-linear" is not allowed; list module names or give a regex.')

            def all_linear(path: str, leaf: Any, layout: LayoutEntry | None) -> bool:
                module = _module_path(path)
                if module.rsplit("/", 1)[-1] in OUTPUT_HEAD_NAMES:
                    return False
                if layout is not None:
                    return isinstance(layout, Layout) and layout.kind in LINEAR_KINDS
                return path.rsplit("/", 1)[-1] == "kernel" and len(getattr(leaf, "shape", ())) == 2

            return all_linear
        regex = compile_regex(spec, what)
        return lambda path, leaf, layout: regex.search(path) is not None
    names = tuple(spec)
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"`{what}` entries must be non-empty module names, got {name!r}.")

    def suffix(path: str, leaf: Any, layout: LayoutEntry | None) -> bool:
        if path.rsplit("/", 1)[-1] not in WEIGHT_NAMES:
            return False
        module = _module_path(path)
        return any(module == n or module.endswith("/" + n) for n in names)

    return suffix


def _examples(candidates: list[tuple[str, Any]], limit: int = 4) -> str:
    weights = [p for p, leaf in candidates if len(getattr(leaf, "shape", ())) >= 2] or [p for p, _ in candidates]
    return ", ".join(repr(p) for p in weights[:limit])


def select_targets(
    params: Any,
    targets: TargetSpec,
    exclude: TargetSpec = (),
    layouts: Mapping[str, LayoutEntry] | None = None,
) -> list[tuple[str, Any, Layout]]:
    """The leaves of ``params`` that ``targets`` selects and ``exclude`` does not, sorted by path.

    Args:
      params: any pytree of arrays (or ``jax.ShapeDtypeStruct``).
      targets: ``"all-linear"``; a regex over leaf paths (``re.search``); a sequence of module-name suffixes
        (HF style: ``["q_proj", "v_proj"]`` adapts ``.../q_proj/kernel``); or ``fn(path, leaf) -> bool``.
      exclude: the same forms (but not ``"all-linear"``), removed from the selection.
      layouts: per-path kernel layouts, e.g. from ``jaxpeft.linen.infer_layouts``. Leaves without one must be 2-D.

    Returns:
      ``[(path, leaf, layout), ...]`` sorted by path.

    Raises:
      ValueError: nothing matched; a selected leaf has fewer than 2 dims; a kernel's layout is unknown or its
        layer cannot be adapted (``Unsupported``).
    """
    layouts = dict(layouts or {})
    candidates = leaves_with_paths(params)
    take = matcher(targets, "targets")
    drop = matcher(exclude, "exclude") if (callable(exclude) or isinstance(exclude, str) or exclude) else None
    chosen: list[tuple[str, Any, Layout]] = []
    excluded: list[str] = []
    for path, leaf in sorted(candidates, key=lambda item: item[0]):
        entry = layouts.get(path)
        if not take(path, leaf, entry):
            continue
        if drop is not None and drop(path, leaf, entry):
            excluded.append(path)
            continue
        if isinstance(entry, Unsupported):
            raise ValueError(f"{path!r} cannot be adapted: {entry.reason} Add it to `exclude`.")
        layout = entry
        if layout is not None and layout.kind in VECTOR_KINDS:
            raise ValueError(
                f"{path!r} is a {layout.kind} vector; this method adapts kernels. Add it to `exclude`, or train it "
                "with jaxpeft.BitFitConfig / jaxpeft.LNTuningConfig."
            )
        shape = tuple(getattr(leaf, "shape", ()))
        if len(shape) < 2:
            raise ValueError(
                f"`targets`={targets!r} selected {path!r} of shape {shape}; only leaves with at least 2 dims "
                "(kernels, embeddings) can be adapted. Narrow the pattern, e.g. end it with 'kernel$'."
            )
        if layout is None:
            layout = default_layout(path, shape)
        if layout is None:
            raise ValueError(
                f"{path!r} has shape {shape}; from a params tree alone jaxpeft cannot tell which axes are "
                "stacked layers, fan-in or fan-out. Pass `layouts=jaxpeft.linen.infer_layouts(model, *args)` "
                f"(or jaxpeft.nnx.infer_layouts(model)), or layouts={{{path!r}: jaxpeft.Layout(stack=..., "
                "fan_in=..., fan_out=...)}."
            )
        if layout.ndim != len(shape):
            raise ValueError(
                f"{path!r} has shape {shape} but its layout {layout} describes {layout.ndim} axes; "
                "re-infer the layouts from the same model."
            )
        chosen.append((path, leaf, layout))
    if not chosen and excluded:
        raise ValueError(
            f"`exclude`={exclude!r} removed all {len(excluded)} parameters that `targets`={targets!r} matched "
            f"(e.g. {excluded[0]!r}); narrow `exclude` or widen `targets`."
        )
    if not chosen:
        raise ValueError(
            f"`targets`={targets!r} matched no parameter. Paths look like {_examples(candidates)}; "
            "give module names (['q_proj']), a regex over paths (r'attn/.*/kernel$') or 'all-linear'."
        )
    return chosen
