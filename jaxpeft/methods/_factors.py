"""What several methods share: config field checks, rank/alpha fields and patterns, low-rank factor maths and nodes.

Not a method. ``RankFields`` holds the rank/alpha/pattern/dtype checks of LoRA, DoRA, LoRA-FA, LoHa and LoKr;
``RankedConfig`` the fields of every config with a rank and an alpha (LoHa, LoKr), ``LowRankConfig`` those of the
LoRA-shaped configs (LoRA, DoRA, LoRA-FA are siblings over it, none is another's subclass); ``LowRankNode`` the
rule ``base(x) + s·(x·A)·B`` and the factor helpers of nodes with ``a``, ``b`` and ``scale``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, cast

import jax
import jax.numpy as jnp

from jaxpeft._select import ALL_LINEAR, Layout, TargetSpec, compile_regex, match_pattern
from jaxpeft.api import fold_weight
from jaxpeft.protocol import LayerCall, MethodConfig, check_ndim

__all__ = [
    "LowRankConfig",
    "LowRankNode",
    "RankFields",
    "RankedConfig",
    "check_dtype",
    "check_factors",
    "check_kinds",
    "factor_axes",
    "factors_delta",
    "is_number",
    "uniform",
]

#: The LoRA inits that start B at zero (``ΔW = 0``); the base-adjusting ones are LoRA's own (``jaxpeft.LoraConfig``).
ZERO_INITS = ("kaiming", "gaussian")


def is_number(value: Any) -> bool:
    """A real number, not a bool or a string (``"0.1"`` and ``True`` are refused where a rate or scale is meant)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_dtype(value: str) -> str:
    """The canonical name of a floating adapter dtype that JAX can hold; ``ValueError`` otherwise."""
    try:
        dtype = jnp.dtype(value)
    except TypeError as err:
        raise ValueError(f"`dtype`={value!r} is not a dtype name; use e.g. 'float32'.") from err
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"`dtype`={value!r}; adapters need a floating dtype such as 'float32'.")
    if dtype.itemsize == 8 and not jax.config.read("jax_enable_x64"):
        raise ValueError(
            f"`dtype`={value!r} needs 64-bit JAX (jax.config.update('jax_enable_x64', True)); without it the arrays "
            "would silently be float32. Use 'float32'."
        )
    return dtype.name


def check_rate(name: str, value: Any) -> float:
    """A dropout rate in [0, 1) as a float; ``ValueError`` naming the field otherwise."""
    if not is_number(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}`={value!r}; expected a rate (a number) in [0, 1), e.g. 0.05.")
    return float(value)


def check_flag(name: str, value: Any) -> bool:
    """``value`` when it is a bool; ``ValueError`` naming the field otherwise (``"false"`` is not False)."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}`={value!r}; expected True or False (not a string).")
    return value


def check_kinds(method: str, kinds: Sequence[str], rows: Sequence[tuple[str, Any, Layout]]) -> None:
    """Raise naming the first target whose layer kind ``method`` does not adapt, and the fix."""
    for path, _, layout in rows:
        if layout.kind not in kinds:
            raise ValueError(
                f"{method} cannot adapt {path!r} (a {layout.kind} weight); it adapts {tuple(kinds)} layers. "
                f"Add {path!r} to `exclude`, or narrow `targets`."
            )


def uniform(key: jax.Array, shape: Sequence[int], dtype: Any, fan_in: int) -> jax.Array:
    """PyTorch's ``kaiming_uniform_(a=√5)`` as HF PEFT initialises factors: ``U(±1/√fan_in)``."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, tuple(shape), dtype, -bound, bound)


# ------------------------------------------------------------------------------------------------ rank fields


def _freeze_pattern(value: Any, name: str, kind: type) -> tuple[tuple[str, Any], ...]:
    if isinstance(value, Mapping):
        items = tuple(value.items())
    elif (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and all(isinstance(kv, Sequence) and not isinstance(kv, str) and len(kv) == 2 for kv in value)
    ):
        items = tuple((kv[0], kv[1]) for kv in value)
    else:
        raise ValueError(f"`{name}`={value!r}; expected a mapping {{path regex: number}}, e.g. {{'q_proj': 16}}.")
    for pattern, number in items:
        if not isinstance(pattern, str):
            raise ValueError(f"`{name}` keys must be path regexes, got {pattern!r}.")
        if not is_number(number) or not math.isfinite(number) or number <= 0:
            raise ValueError(f"`{name}`[{pattern!r}]={number!r}; expected a positive finite number.")
        if kind is int and int(number) != number:
            raise ValueError(f"`{name}`[{pattern!r}]={number!r}; ranks are whole numbers.")
    return tuple((p, kind(n)) for p, n in items)


class RankFields:
    """What configs with ``rank``, ``alpha``, ``rank_pattern``/``alpha_pattern`` and ``dtype`` fields share.

    A mixin for frozen dataclass configs: the checks of those fields, their per-path lookups and the check that
    every pattern matches a target. Its ``__post_init__`` freezes the patterns and the selection
    (``MethodConfig.__post_init__``), after the subclass has run ``check_rank_alpha`` and its own checks.
    """

    json_mappings: ClassVar[tuple[str, ...]] = ("rank_pattern", "alpha_pattern")

    rank: int
    alpha: float
    rank_pattern: Mapping[str, int] | tuple[tuple[str, int], ...]
    alpha_pattern: Mapping[str, float] | tuple[tuple[str, float], ...]
    dtype: str

    def check_rank_alpha(self, alpha_hint: str) -> None:
        """Validate ``rank``, ``alpha`` (its error ends with ``alpha_hint``) and ``dtype``; store them canonically."""
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"`rank`={self.rank!r}; expected a positive integer such as 8.")
        if not is_number(self.alpha) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"`alpha`={self.alpha!r}; expected a positive finite number ({alpha_hint}.")
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dtype", check_dtype(self.dtype))

    def __post_init__(self) -> None:
        super().__post_init__()  # type: ignore[misc]  # MethodConfig's: the selection fields
        object.__setattr__(self, "rank_pattern", _freeze_pattern(self.rank_pattern, "rank_pattern", int))
        object.__setattr__(self, "alpha_pattern", _freeze_pattern(self.alpha_pattern, "alpha_pattern", float))
        for field in ("rank_pattern", "alpha_pattern"):
            for pattern, _ in getattr(self, field):
                compile_regex(pattern, field)

    def rank_for(self, path: str) -> int:
        """The rank at ``path`` (``rank_pattern`` first, then ``rank``)."""
        items = cast(tuple[tuple[str, int], ...], self.rank_pattern)
        return next((r for p, r in items if match_pattern(p, path)), self.rank)

    def alpha_for(self, path: str) -> float:
        """The alpha at ``path`` (``alpha_pattern`` first, then ``alpha``)."""
        items = cast(tuple[tuple[str, float], ...], self.alpha_pattern)
        return next((a for p, a in items if match_pattern(p, path)), self.alpha)

    def scale_for(self, path: str) -> float:
        """``alpha / rank`` at ``path`` (HF PEFT's scale)."""
        return self.alpha_for(path) / self.rank_for(path)

    def check_patterns(self, rows: Sequence[tuple[str, Any, Layout]]) -> None:
        """Raise when a ``rank_pattern``/``alpha_pattern`` key matches none of the selected targets."""
        paths = [p for p, _, _ in rows]
        for field in ("rank_pattern", "alpha_pattern"):
            for pattern, _ in getattr(self, field):
                if not any(match_pattern(pattern, p) for p in paths):
                    raise ValueError(
                        f"`{field}` key {pattern!r} matches none of the {len(paths)} targets (e.g. {paths[0]!r}); "
                        "fix the regex or drop the entry."
                    )


@dataclasses.dataclass(frozen=True)
class RankedConfig(RankFields, MethodConfig):
    """The fields of every config with a rank and an alpha: ``rank``, ``alpha``, the selection, the per-path
    patterns and ``dtype``. Not a method itself (no ``method`` name).

    ``kinds`` (the layer kinds the method adapts, checked by path before any array is made) and ``title`` (its name
    in messages) are class-level.
    """

    reads_weight_values: ClassVar[bool] = False
    kinds: ClassVar[tuple[str, ...]] = ("dense", "dense_general", "einsum", "conv", "embed")
    title: ClassVar[str] = ""

    rank: int = 8
    alpha: float = 8.0
    targets: TargetSpec = ALL_LINEAR
    exclude: TargetSpec = ()
    rank_pattern: Mapping[str, int] | tuple[tuple[str, int], ...] = ()
    alpha_pattern: Mapping[str, float] | tuple[tuple[str, float], ...] = ()
    dtype: str = "float32"

    def __post_init__(self) -> None:
        self.check_rank_alpha("HF's lora_alpha), e.g. 16" if isinstance(self, LowRankConfig) else "HF's alpha), e.g. 8")
        super().__post_init__()

    def check_targets(self, rows: Sequence[tuple[str, Any, Layout]]) -> None:
        check_kinds(self.title or type(self).__name__, self.kinds, rows)
        self.check_patterns(rows)

    def check_weight(self, path: str, weight: Any, layout: Layout) -> None:
        """Raise naming ``path`` when ``layout`` does not describe ``weight``."""
        problem = check_ndim(layout, tuple(weight.shape))
        if problem is not None:
            raise ValueError(f"{self.title} cannot adapt {path!r}: {problem}.")


@dataclasses.dataclass(frozen=True)
class LowRankConfig(RankedConfig):
    """The fields of the LoRA-shaped configs (LoRA, DoRA, LoRA-FA; siblings, none is another's subclass): those of
    ``RankedConfig`` and ``dropout``, ``use_rslora``, ``init``. Not a method itself. See :class:`jaxpeft.LoraConfig`.

    ``inits`` are the ``init`` values the config accepts; the base-adjusting inits (PiSSA, OLoRA) are LoRA's only.
    """

    restore_free: ClassVar[tuple[str, ...]] = ("dropout", "init")
    #: The ``init`` values this config accepts.
    inits: ClassVar[tuple[str, ...]] = ZERO_INITS

    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "kaiming"

    def __post_init__(self) -> None:
        object.__setattr__(self, "dropout", check_rate("dropout", self.dropout))
        check_flag("use_rslora", self.use_rslora)
        self.check_init()
        super().__post_init__()

    def check_init(self) -> None:
        """Refuse an ``init`` this config does not accept, naming the ones it does."""
        if self.init in self.inits:
            return
        if isinstance(self.init, str) and (self.init in ("pissa", "olora") or self.init.startswith("pissa_niter_")):
            raise ValueError(
                f"`init`={self.init!r} is not supported by {type(self).__name__}: jaxpeft implements the "
                "base-adjusting inits (PiSSA, OLoRA) for plain LoRA only. Use LoraConfig(init=...), or "
                f"{type(self).__name__} with init='kaiming'."
            )
        raise ValueError(f"`init`={self.init!r}; expected one of {self.inits}.")

    def scale_for(self, path: str) -> float:
        """``alpha / rank`` (or ``alpha / sqrt(rank)`` with ``use_rslora``) for the adapter at ``path``."""
        rank = self.rank_for(path)
        return self.alpha_for(path) / (math.sqrt(rank) if self.use_rslora else rank)

    def check_targets(self, rows: Sequence[tuple[str, Any, Layout]]) -> None:
        self.check_patterns(rows)

    def factor_shapes(self, path: str, shape: Sequence[int], layout: Layout) -> tuple[tuple[int, ...], ...]:
        """``(A shape, B shape)`` of the adapter at ``path`` on a weight of ``shape``."""
        stack, fan_in, fan_out = layout.split(shape)
        rank = self.rank_for(path)
        return (*stack, *fan_in, rank), (*stack, rank, *fan_out)

    def init_factors(self, path: str, shape: Sequence[int], layout: Layout, key: jax.Array) -> tuple[Any, Any]:
        """HF PEFT's initial ``(A, B)``: ``A·B = 0``.

        A kaiming-uniform ``U(±1/√fan_in)`` (``init="kaiming"``) or ``N(0, 1/r²)`` (``"gaussian"``), B zeros;
        embeddings A zeros and B ``N(0, 1)``.
        """
        dtype = jnp.dtype(self.dtype)
        a_shape, b_shape = self.factor_shapes(path, shape, layout)
        if layout.kind == "embed":
            return jnp.zeros(a_shape, dtype), jax.random.normal(key, b_shape, dtype)
        if self.init == "gaussian":
            a = jax.random.normal(key, a_shape, dtype) / self.rank_for(path)
        else:
            a = uniform(key, a_shape, dtype, layout.fan_in_size(shape))
        return a, jnp.zeros(b_shape, dtype)


# ------------------------------------------------------------------------------------------------ factor maths


def factors_delta(a: jax.Array, b: jax.Array, scale: float, layout: Layout, shape: Sequence[int]) -> jax.Array:
    """``scale · A·B`` as a float32 array of the weight's ``shape`` (stack axes batched)."""
    shape = tuple(shape)
    stack = math.prod(layout.split(shape)[0])
    rank = a.shape[-1]
    a2 = jnp.reshape(a.astype(jnp.float32), (stack, -1, rank))
    b2 = jnp.reshape(b.astype(jnp.float32), (stack, rank, -1))
    return jnp.reshape(jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST) * scale, shape)


def factor_axes(layout: Layout) -> dict[str, tuple[int | None, ...]]:
    """A runs along the stack and fan-in axes, B along the stack and fan-out axes; the rank axis is their own."""
    stack, fan_in, fan_out = layout.axes()
    return {"a": (*stack, *fan_in, None), "b": (*stack, None, *fan_out)}


def check_factors(a: Any, b: Any, layout: Layout, weight_shape: tuple[int, ...]) -> str | None:
    """Why factors A, B do not fit a weight of ``weight_shape`` under ``layout`` (None when they do)."""
    if problem := check_ndim(layout, weight_shape):
        return problem
    stack, fan_in, fan_out = layout.split(weight_shape)
    rank = a.shape[-1] if a.ndim else 0
    want_a, want_b = (*stack, *fan_in, rank), (*stack, rank, *fan_out)
    if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
        return f"expected A {want_a} and B {want_b} (rank {rank})"
    return None


class LowRankNode:
    """The rule and helpers of nodes with factors ``a`` ``(*stack, *fan_in, r)``, ``b`` ``(*stack, r, *fan_out)``
    and a ``scale``: ``ΔW = scale · A·B``, forward ``base(x) + scale·(dropout(x)·A)·B``, never ``W + ΔW``."""

    b_factors: ClassVar[tuple[str, ...]] = ("b",)
    grouped_rows: ClassVar[bool] = True  # the branch is x·A·B: banks run mixed batches as grouped matmuls

    a: Any
    b: Any
    scale: float
    dropout: float
    layout: Layout

    @property
    def rank(self) -> int:
        return int(self.a.shape[-1])

    def describe(self) -> str:
        return f"r={self.rank} scale={self.scale:g}"

    def weight_axes(self) -> dict[str, tuple[int | None, ...]]:
        return factor_axes(self.layout)

    def delta(self, kernel_shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        """``scale · A·B`` reshaped to ``kernel_shape`` (computed in float32, returned in ``dtype``)."""
        return factors_delta(self.a, self.b, self.scale, self.layout, kernel_shape).astype(dtype)

    def check(self, weight_shape: tuple[int, ...]) -> str | None:
        return check_factors(self.a, self.b, self.layout, weight_shape)

    def fold(self, weight: jax.Array, bias: jax.Array | None, sign: int) -> tuple[jax.Array, jax.Array | None]:
        return fold_weight(weight, self.delta(weight.shape), sign), None

    def forward(self, call: LayerCall) -> jax.Array:
        y = call.base(call.x)
        if call.kind == "embed":
            delta = call.lowrank(call.x, self.a, self.b, self.scale, dtype=y.dtype)
        elif call.kind == "attend":
            delta = call.lowrank(call.x.astype(y.dtype), self.a, self.b, self.scale)
        else:
            x = call.dropout(call.x.astype(y.dtype), self.dropout)
            delta = call.lowrank(x, self.a, self.b, self.scale)
        return y + delta.astype(y.dtype)
