"""LoRA: config, the adapter leaf type, and pure ``plan`` / ``init`` / ``merge`` / ``unmerge``."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp

from jaxpeft._paths import leaves_with_paths, map_with_paths, set_path
from jaxpeft._select import ALL_LINEAR, Layout, TargetSpec, compile_regex, match_pattern, select_targets

__all__ = [
    "LoraConfig",
    "LoraWeights",
    "Plan",
    "TargetInfo",
    "adapter_items",
    "init",
    "merge",
    "plan",
    "unmerge",
]

_INITS = ("kaiming", "gaussian")


def _freeze_spec(value: Any, name: str) -> Any:
    if callable(value) or isinstance(value, str):
        return value
    if isinstance(value, Sequence):
        return tuple(value)
    raise ValueError(f"`{name}` must be 'all-linear', a regex, a list of module names or a predicate; got {value!r}.")


def _freeze_pattern(value: Any, name: str, kind: type) -> tuple[tuple[str, Any], ...]:
    items = tuple(value.items()) if isinstance(value, Mapping) else tuple(tuple(kv) for kv in value)
    for pattern, number in items:
        if not isinstance(pattern, str):
            raise ValueError(f"`{name}` keys must be path regexes, got {pattern!r}.")
        if not isinstance(number, (int, float)) or isinstance(number, bool) or number <= 0:
            raise ValueError(f"`{name}`[{pattern!r}]={number!r}; expected a positive number.")
        if kind is int and int(number) != number:
            raise ValueError(f"`{name}`[{pattern!r}]={number!r}; ranks are whole numbers.")
    return tuple((p, kind(n)) for p, n in items)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
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
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(f"`alpha`={self.alpha!r}; expected a positive number (HF's lora_alpha), e.g. 16.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout`={self.dropout!r}; expected a rate in [0, 1).")
        if self.init not in _INITS:
            raise ValueError(f"`init`={self.init!r}; expected one of {_INITS}.")
        try:
            dtype = jnp.dtype(self.dtype)
        except TypeError as err:
            raise ValueError(f"`dtype`={self.dtype!r} is not a dtype name; use e.g. 'float32'.") from err
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"`dtype`={self.dtype!r}; adapters need a floating dtype such as 'float32'.")
        object.__setattr__(self, "dtype", dtype.name)
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "targets", _freeze_spec(self.targets, "targets"))
        object.__setattr__(self, "exclude", _freeze_spec(self.exclude, "exclude"))
        object.__setattr__(self, "rank_pattern", _freeze_pattern(self.rank_pattern, "rank_pattern", int))
        object.__setattr__(self, "alpha_pattern", _freeze_pattern(self.alpha_pattern, "alpha_pattern", float))
        for field in ("targets", "exclude"):
            spec = getattr(self, field)
            if isinstance(spec, str) and spec != ALL_LINEAR:
                compile_regex(spec, field)
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

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; ``ValueError`` if a target is a predicate (code cannot be saved)."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if callable(value):
                raise ValueError(
                    f"`{field.name}` is a function and cannot be written to JSON; give module names or a regex."
                )
            if field.name in ("rank_pattern", "alpha_pattern"):
                value = dict(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[field.name] = value
        return {"method": "lora", **out}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoraConfig:
        data = dict(data)
        method = data.pop("method", "lora")
        if method != "lora":
            raise ValueError(f"config has method={method!r}; LoraConfig reads method='lora' only.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"LoraConfig got unknown fields {unknown}; known fields are {sorted(names)}.")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> LoraConfig:
        return cls.from_dict(json.loads(text))


@functools.partial(jax.tree_util.register_dataclass, data_fields=["a", "b"], meta_fields=["scale", "dropout"])
@dataclasses.dataclass(frozen=True)
class LoraWeights:
    """One LoRA adapter: ``ΔW = scale · A·B`` with A ``(*stack, *fan_in, r)`` and B ``(*stack, r, *fan_out)``.

    A pytree node whose leaves are ``a`` and ``b``; ``scale`` and ``dropout`` are static metadata, so
    gradients, optimizer updates and ``jax.jit`` see only the two arrays.
    """

    a: Any
    b: Any
    scale: float
    dropout: float = 0.0

    @property
    def rank(self) -> int:
        return int(self.a.shape[-1])

    def n_stack(self, kernel_ndim: int) -> int:
        """Leading stack axes, read off the shapes: ``a.ndim + b.ndim - 2 - kernel.ndim``."""
        return self.a.ndim + self.b.ndim - 2 - kernel_ndim

    def delta(self, kernel_shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        """``scale · A·B`` reshaped to ``kernel_shape`` (computed in float32, returned in ``dtype``)."""
        kernel_shape = tuple(kernel_shape)
        n_stack = self.n_stack(len(kernel_shape))
        stack = kernel_shape[:n_stack]
        s = math.prod(stack)
        a = jnp.reshape(self.a.astype(jnp.float32), (s, -1, self.rank))
        b = jnp.reshape(self.b.astype(jnp.float32), (s, self.rank, -1))
        d = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST) * self.scale
        return jnp.reshape(d, kernel_shape).astype(dtype)


def _is_lora(x: Any) -> bool:
    return isinstance(x, LoraWeights)


def adapter_items(adapters: Any) -> Iterator[tuple[str, LoraWeights]]:
    """``(path, LoraWeights)`` for each adapter in an adapter tree, in flattening order."""
    for path, leaf in leaves_with_paths(adapters, is_leaf=_is_lora):
        if not isinstance(leaf, LoraWeights):
            raise ValueError(
                f"adapter tree entry {path!r} is a {type(leaf).__name__}, not LoraWeights; "
                "pass the tree returned by jaxpeft.init (or restored by jaxpeft.checkpoint)."
            )
        yield path, leaf


@dataclasses.dataclass(frozen=True)
class TargetInfo:
    """One row of a dry run: which leaf is adapted, its layout and what the adapter costs."""

    path: str
    shape: tuple[int, ...]
    layout: Layout
    rank: int
    alpha: float
    scale: float

    @property
    def a_shape(self) -> tuple[int, ...]:
        stack, fan_in, _ = self.layout.split(self.shape)
        return (*stack, *fan_in, self.rank)

    @property
    def b_shape(self) -> tuple[int, ...]:
        stack, _, fan_out = self.layout.split(self.shape)
        return (*stack, self.rank, *fan_out)

    @property
    def n_params(self) -> int:
        return math.prod(self.a_shape) + math.prod(self.b_shape)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The dry run of a config over a params tree: the rows that ``init`` would create."""

    targets: tuple[TargetInfo, ...]

    @property
    def n_params(self) -> int:
        return sum(t.n_params for t in self.targets)

    def __str__(self) -> str:
        rows = [("path", "shape", "kind", "rank", "scale", "params")]
        rows += [
            (t.path, str(t.shape), t.layout.kind, str(t.rank), f"{t.scale:g}", f"{t.n_params:,}") for t in self.targets
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        lines.append(f"{len(self.targets)} targets, {self.n_params:,} adapter parameters")
        return "\n".join(lines)


def plan(cfg: LoraConfig, params: Any, *, layouts: Mapping[str, Layout] | None = None) -> Plan:
    """What ``init`` would adapt: path, shape, layout, rank, scale and parameter count per target.

    Raises:
      ValueError: as ``select_targets``; also when a ``rank_pattern``/``alpha_pattern`` entry matches no target.
    """
    chosen = select_targets(params, cfg.targets, cfg.exclude, layouts)
    paths = [p for p, _, _ in chosen]
    for field in ("rank_pattern", "alpha_pattern"):
        for pattern, _ in getattr(cfg, field):
            if not any(match_pattern(pattern, p) for p in paths):
                raise ValueError(
                    f"`{field}` key {pattern!r} matches none of the {len(paths)} targets (e.g. {paths[0]!r}); "
                    "fix the regex or drop the entry."
                )
    rows = tuple(
        TargetInfo(p, tuple(leaf.shape), layout, cfg.rank_for(p), cfg.alpha_for(p), cfg.scale_for(p))
        for p, leaf, layout in chosen
    )
    return Plan(rows)


def _init_one(cfg: LoraConfig, target: TargetInfo, key: jax.Array) -> LoraWeights:
    dtype = jnp.dtype(cfg.dtype)
    if target.layout.kind == "embed":
        a = jnp.zeros(target.a_shape, dtype)
        b = jax.random.normal(key, target.b_shape, dtype)
    else:
        if cfg.init == "kaiming":
            bound = 1.0 / math.sqrt(target.layout.fan_in_size(target.shape))
            a = jax.random.uniform(key, target.a_shape, dtype, -bound, bound)
        else:
            a = jax.random.normal(key, target.a_shape, dtype) / target.rank
        b = jnp.zeros(target.b_shape, dtype)
    return LoraWeights(a, b, target.scale, cfg.dropout)


def init(
    cfg: LoraConfig, params: Any, *, key: jax.Array, layouts: Mapping[str, Layout] | None = None
) -> dict[str, Any]:
    """LoRA adapters for the leaves of ``params`` that ``cfg`` selects.

    The result is a nested dict mirroring the adapted paths, with a ``LoraWeights`` where each adapted leaf is
    (e.g. ``adapters["layers"]["q_proj"]["kernel"].a``). ``ΔW = 0`` at init, so the adapted model's output
    equals the base model's exactly. Per-target keys are split from ``key`` in sorted path order, so the
    result does not depend on dict insertion order; the same key gives the same adapters.

    Args:
      cfg: the LoRA config.
      params: the base parameters (arrays or ``jax.ShapeDtypeStruct``; they are only read for shapes).
      key: a ``jax.random`` key.
      layouts: kernel layouts for leaves with more than 2 dims (``jaxpeft.linen.infer_layouts``).

    Returns:
      The adapter tree.
    """
    targets = plan(cfg, params, layouts=layouts).targets
    keys = jax.random.split(key, len(targets))
    adapters: dict[str, Any] = {}
    for target, k in zip(targets, keys, strict=True):
        adapters = set_path(adapters, target.path, _init_one(cfg, target, k))
    return adapters


def _fold(params: Any, adapters: Any, sign: float) -> Any:
    table = dict(adapter_items(adapters))
    seen: set[str] = set()

    def fold(path: str, w: Any) -> Any:
        lora = table.get(path)
        if lora is None:
            return w
        seen.add(path)
        expected = (lora.a.shape[:-1], lora.b.shape[1:])
        n_stack = lora.n_stack(w.ndim)
        if n_stack < 0 or w.shape != (*lora.a.shape[:-1], *lora.b.shape[1 + n_stack :]):
            raise ValueError(
                f"adapter {path!r} (A {lora.a.shape}, B {lora.b.shape}) does not fit the parameter's shape "
                f"{w.shape} (expected stack+fan_in {expected[0]} and fan_out); were the adapters made for this model?"
            )
        delta = lora.delta(w.shape)
        return (w.astype(jnp.float32) + sign * delta).astype(w.dtype)

    out = map_with_paths(fold, params)
    missing = sorted(set(table) - seen)
    if missing:
        raise ValueError(
            f"adapters {missing[:4]} have no matching parameter; were the adapters made for this model's params?"
        )
    return out


def merge(params: Any, adapters: Any) -> Any:
    """``W + scale·A·B`` at every adapted path; other leaves are returned as they are.

    Pure: returns new params and leaves the inputs untouched. The sum is formed in float32 and cast back to
    each weight's dtype, so ``unmerge(merge(p, a), a) ≈ p`` up to that dtype's rounding.
    """
    return _fold(params, adapters, 1.0)


def unmerge(params: Any, adapters: Any) -> Any:
    """``W - scale·A·B`` at every adapted path: the inverse of ``merge`` up to float rounding."""
    return _fold(params, adapters, -1.0)
