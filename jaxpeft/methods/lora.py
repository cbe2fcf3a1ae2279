"""LoRA: the config, the adapter node ``LoraWeights`` and its forward rule ``base(x) + s·(x·A)·B``."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, cast

import jax
import jax.numpy as jnp

from jaxpeft._select import ALL_LINEAR, Layout, TargetSpec, compile_regex, match_pattern
from jaxpeft.methods.base import STATIC, Adapter, LayerCall, MethodConfig, check_ndim, fold_weight

__all__ = ["LoraConfig", "LoraWeights"]

_INITS = ("kaiming", "gaussian")


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


@dataclasses.dataclass(frozen=True)
class LoraConfig(MethodConfig):
    """LoRA hyper-parameters; frozen, hashable (static under ``jax.jit``) and JSON round-trippable.

    Args:
      rank: the rank r of ``ΔW = A·B``.
      alpha: scaling numerator: ``scale = alpha / rank`` (``alpha / sqrt(rank)`` with ``use_rslora``).
      targets: ``"all-linear"``, a regex over leaf paths, a list of module names (HF ``target_modules``), or a
        predicate ``fn(path, leaf) -> bool``.
      exclude: the same forms (not ``"all-linear"``), removed from the selection.
      rank_pattern: ``{path regex: rank}``; the first matching entry overrides ``rank`` for that leaf.
      alpha_pattern: ``{path regex: alpha}``, likewise.
      dropout: dropout rate on the adapter branch's input, applied only when a dropout key is given.
      use_rslora: rank-stabilised scaling ``alpha / sqrt(rank)``.
      init: ``"kaiming"`` (HF default: A kaiming-uniform, B zeros) or ``"gaussian"`` (A ~ N(0, 1/r²), B zeros).
        Embeddings always start with A zeros and B ~ N(0, 1), as in HF PEFT. Either way ΔW = 0 at init.
      dtype: dtype of the adapter arrays (float32 by default, also over a bf16 base). The adapted contraction
        casts A and B to the activation dtype; activations are never cast up.

    References:
      Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021.
      Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", 2023.
    """

    method: ClassVar[str] = "lora"
    reads_weight_values: ClassVar[bool] = False
    restore_free: ClassVar[tuple[str, ...]] = ("dropout", "init")
    json_mappings: ClassVar[tuple[str, ...]] = ("rank_pattern", "alpha_pattern")

    rank: int = 8
    alpha: float = 8.0
    targets: TargetSpec = ALL_LINEAR
    exclude: TargetSpec = ()
    rank_pattern: Mapping[str, int] | tuple[tuple[str, int], ...] = ()
    alpha_pattern: Mapping[str, float] | tuple[tuple[str, float], ...] = ()
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "kaiming"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"`rank`={self.rank!r}; expected a positive integer such as 8.")
        if not is_number(self.alpha) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"`alpha`={self.alpha!r}; expected a positive finite number (HF's lora_alpha), e.g. 16.")
        if not is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout`={self.dropout!r}; expected a rate (a number) in [0, 1), e.g. 0.05.")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"`use_rslora`={self.use_rslora!r}; expected True or False (not a string).")
        if self.init not in _INITS:
            raise ValueError(f"`init`={self.init!r}; expected one of {_INITS}.")
        object.__setattr__(self, "dropout", float(self.dropout))
        object.__setattr__(self, "dtype", check_dtype(self.dtype))
        object.__setattr__(self, "alpha", float(self.alpha))
        super().__post_init__()
        object.__setattr__(self, "rank_pattern", _freeze_pattern(self.rank_pattern, "rank_pattern", int))
        object.__setattr__(self, "alpha_pattern", _freeze_pattern(self.alpha_pattern, "alpha_pattern", float))
        for field in ("rank_pattern", "alpha_pattern"):
            for pattern, _ in getattr(self, field):
                compile_regex(pattern, field)

    def rank_for(self, path: str) -> int:
        """The rank of the adapter at ``path`` (``rank_pattern`` first, then ``rank``)."""
        items = cast(tuple[tuple[str, int], ...], self.rank_pattern)
        return next((r for p, r in items if match_pattern(p, path)), self.rank)

    def alpha_for(self, path: str) -> float:
        """The alpha of the adapter at ``path`` (``alpha_pattern`` first, then ``alpha``)."""
        items = cast(tuple[tuple[str, float], ...], self.alpha_pattern)
        return next((a for p, a in items if match_pattern(p, path)), self.alpha)

    def scale_for(self, path: str) -> float:
        """``alpha / rank`` (or ``alpha / sqrt(rank)`` with ``use_rslora``) for the adapter at ``path``."""
        rank = self.rank_for(path)
        return self.alpha_for(path) / (math.sqrt(rank) if self.use_rslora else rank)

    def check_targets(self, rows: Sequence[tuple[str, Any, Layout]]) -> None:
        paths = [p for p, _, _ in rows]
        for field in ("rank_pattern", "alpha_pattern"):
            for pattern, _ in getattr(self, field):
                if not any(match_pattern(pattern, p) for p in paths):
                    raise ValueError(
                        f"`{field}` key {pattern!r} matches none of the {len(paths)} targets (e.g. {paths[0]!r}); "
                        "fix the regex or drop the entry."
                    )

    def factor_shapes(self, path: str, shape: Sequence[int], layout: Layout) -> tuple[tuple[int, ...], ...]:
        """``(A shape, B shape)`` of the adapter at ``path`` on a weight of ``shape``."""
        stack, fan_in, fan_out = layout.split(shape)
        rank = self.rank_for(path)
        return (*stack, *fan_in, rank), (*stack, rank, *fan_out)

    def init_factors(self, path: str, shape: Sequence[int], layout: Layout, key: jax.Array) -> tuple[Any, Any]:
        """HF PEFT's initial ``(A, B)``: ``A·B = 0``."""
        dtype = jnp.dtype(self.dtype)
        a_shape, b_shape = self.factor_shapes(path, shape, layout)
        if layout.kind == "embed":
            return jnp.zeros(a_shape, dtype), jax.random.normal(key, b_shape, dtype)
        if self.init == "kaiming":
            bound = 1.0 / math.sqrt(layout.fan_in_size(shape))
            a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
        else:
            a = jax.random.normal(key, a_shape, dtype) / self.rank_for(path)
        return a, jnp.zeros(b_shape, dtype)

    def init_target(self, path: str, weight: Any, layout: Layout, key: jax.Array) -> Adapter:
        a, b = self.init_factors(path, weight.shape, layout, key)
        return LoraWeights(a, b, self.scale_for(path), self.dropout, layout)


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


@functools.partial(jax.tree_util.register_dataclass)
@dataclasses.dataclass(frozen=True)
class LoraWeights(Adapter):
    """One LoRA adapter: ``ΔW = scale · A·B`` with A ``(*stack, *fan_in, r)`` and B ``(*stack, r, *fan_out)``.

    A pytree node whose leaves are ``a`` and ``b``; ``scale``, ``dropout`` and ``layout`` are static metadata,
    so gradients, optimizer updates and ``jax.jit`` see only the two arrays. Its forward never forms
    ``W + ΔW``: the adapted layer computes ``base(x) + scale·(dropout(x)·A)·B``.
    """

    a: Any
    b: Any
    scale: float = dataclasses.field(metadata=STATIC)
    dropout: float = dataclasses.field(default=0.0, metadata=STATIC)
    layout: Layout = dataclasses.field(default=Layout(), metadata=STATIC)

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
