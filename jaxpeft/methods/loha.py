"""LoHa: a weight update that is the Hadamard product of two low-rank products, ``s·(A₁·B₁) ⊙ (A₂·B₂)``.

Also home of what LoHa and LoKr (``lokr.py``) share: the rank/alpha config fields and patterns, and
:func:`delta_output`, the contraction of a layer's input with a weight-sized update ``ΔW``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxpeft._select import ALL_LINEAR, Layout, TargetSpec
from jaxpeft.methods.base import STATIC, Adapter, LayerCall, MethodConfig, check_ndim, fold_weight
from jaxpeft.methods.lora import RankFields, check_factors, factor_axes, factors_delta

__all__ = ["LohaConfig", "LohaWeights", "delta_output"]

#: The layer kinds LoHa adapts (its update is weight-sized, so any layer linear in its kernel would do).
LOHA_KINDS = ("dense", "dense_general", "einsum", "conv")


def delta_output(call: LayerCall, delta: jax.Array, layout: Layout) -> jax.Array:
    """The layer's contraction of ``call.x`` with ``delta`` (a call-level, kernel-shaped update), without bias.

    ``x·ΔW`` for ``dense``/``dense_general`` (the same axes as the kernel), the layer's einsum for ``einsum`` and its
    convolution for ``conv``; ``delta``'s dtype is the computation's (cast it to the activation dtype first).

    Raises:
      ValueError: for ``embed``/``attend`` calls, which no weight-sized method here adapts.
    """
    x = call.x
    if call.kind in ("dense", "dense_general"):
        n_in = layout.fan_in
        axes = tuple(range(x.ndim - n_in, x.ndim)) if call.axes is None else tuple(ax % x.ndim for ax in call.axes)
        fan_in = tuple(range(layout.stack, layout.stack + n_in))
        return jax.lax.dot_general(x, delta, ((axes, fan_in), ((), ())), precision=call.precision)
    if call.kind == "einsum":
        if call.subscripts is None:
            raise ValueError("LayerCall of kind 'einsum' needs its `subscripts`.")
        return jnp.einsum(call.subscripts, x, delta, precision=call.precision)
    if call.kind == "conv":
        if call.conv is None:
            raise ValueError("LayerCall of kind 'conv' needs its `conv` function.")
        return call.conv(x, delta)
    raise ValueError(f"a weight-sized update cannot adapt a `{call.kind}` call; it adapts {LOHA_KINDS} layers.")


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


@dataclasses.dataclass(frozen=True)
class RankedConfig(RankFields, MethodConfig):
    """The fields LoHa and LoKr share: ``rank``, ``alpha`` (``scale = alpha / rank``), patterns, dtype.

    Not a method itself (no ``method`` name); :class:`LohaConfig` and :class:`jaxpeft.LokrConfig` subclass it.
    """

    json_mappings: ClassVar[tuple[str, ...]] = ("rank_pattern", "alpha_pattern")
    reads_weight_values: ClassVar[bool] = False
    #: The layer kinds the method adapts (checked, by path, before any array is made).
    kinds: ClassVar[tuple[str, ...]] = LOHA_KINDS
    #: The method's name in error messages.
    title: ClassVar[str] = ""

    rank: int = 8
    alpha: float = 8.0
    targets: TargetSpec = ALL_LINEAR
    exclude: TargetSpec = ()
    rank_pattern: Mapping[str, int] | tuple[tuple[str, int], ...] = ()
    alpha_pattern: Mapping[str, float] | tuple[tuple[str, float], ...] = ()
    dtype: str = "float32"

    def __post_init__(self) -> None:
        self.check_rank_alpha("HF's alpha), e.g. 8")
        super().__post_init__()

    def scale_for(self, path: str) -> float:
        """``alpha / rank`` at ``path``, as in HF PEFT."""
        return self.alpha_for(path) / self.rank_for(path)

    def check_targets(self, rows: Sequence[tuple[str, Any, Layout]]) -> None:
        check_kinds(self.title, self.kinds, rows)
        self.check_patterns(rows)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LohaWeights(Adapter):
    """One LoHa adapter: ``ΔW = scale · (A₁·B₁) ⊙ (A₂·B₂)``, A ``(*stack, *fan_in, r)``, B ``(*stack, r, *fan_out)``.

    Leaves ``a1, b1, a2, b2``; ``scale`` and ``layout`` are static. HF PEFT's ``hada_w1_a``/``hada_w1_b`` (its
    ``(out, in)`` layout) are ``b1ᵀ``/``a1ᵀ`` here, likewise for pair 2. The Hadamard product of two rank-r
    products has rank up to r², but it exists only as a whole matrix: the forward forms ``ΔW`` (weight-sized, in
    float32 then cast to the activation dtype) and adds ``x·ΔW`` to ``base(x)``; it never forms ``W + ΔW`` and no
    gradient reaches ``W``. The price over LoRA is one weight-sized temporary (and its gradient) per adapted layer.
    """

    a1: Any
    b1: Any
    a2: Any
    b2: Any
    scale: float = dataclasses.field(metadata=STATIC)
    layout: Layout = dataclasses.field(default=Layout(), metadata=STATIC)

    @property
    def rank(self) -> int:
        return int(self.a1.shape[-1])

    def describe(self) -> str:
        return f"r={self.rank} scale={self.scale:g}"

    def weight_axes(self) -> dict[str, tuple[int | None, ...]]:
        axes = factor_axes(self.layout)
        return {"a1": axes["a"], "b1": axes["b"], "a2": axes["a"], "b2": axes["b"]}

    def check(self, weight_shape: tuple[int, ...]) -> str | None:
        return check_factors(self.a1, self.b1, self.layout, weight_shape) or check_factors(
            self.a2, self.b2, self.layout, weight_shape
        )

    def delta(self, kernel_shape: Sequence[int]) -> jax.Array:
        """``scale · (A₁·B₁) ⊙ (A₂·B₂)`` reshaped to ``kernel_shape``, in float32."""
        first = factors_delta(self.a1, self.b1, 1.0, self.layout, kernel_shape)
        return first * factors_delta(self.a2, self.b2, self.scale, self.layout, kernel_shape)

    def fold(self, weight: jax.Array, bias: jax.Array | None, sign: int) -> tuple[jax.Array, jax.Array | None]:
        return fold_weight(weight, self.delta(weight.shape), sign), None

    def forward(self, call: LayerCall) -> jax.Array:
        y = call.base(call.x)
        shape = (*self.a1.shape[:-1], *self.b1.shape[self.layout.stack + 1 :])
        delta = self.delta(shape).astype(y.dtype)
        out = delta_output(dataclasses.replace(call, x=call.x.astype(y.dtype)), delta, self.layout)
        return y + out.astype(y.dtype)


@dataclasses.dataclass(frozen=True)
class LohaConfig(RankedConfig):
    """LoHa hyper-parameters (HF PEFT's ``LoHaConfig``); frozen, hashable and JSON round-trippable.

    Args:
      rank: the rank r of each of the two products (``ΔW`` has rank up to r²).
      alpha: ``scale = alpha / rank``.
      targets: ``"all-linear"``, a regex over leaf paths, module names, or a predicate (as for ``LoraConfig``).
      exclude: removed from the selection.
      rank_pattern: ``{path regex: rank}``; the first matching entry overrides ``rank``.
      alpha_pattern: ``{path regex: alpha}``, likewise.
      dtype: dtype of the factors.

    HF PEFT's initialisation: A₁, B₁ and B₂ kaiming-uniform (``U(±1/√fan_in)`` with PyTorch's fan-in: the fan-in
    size for A, r for B) and A₂ zeros, so ``ΔW = 0`` at init. Dense, DenseGeneral (fan-in × fan-out flattened),
    Einsum and Conv kernels; ``rank_dropout``/``module_dropout`` and the CP decomposition of convolutions
    (``use_effective_conv2d``) are not implemented.

    References:
      Hyeon-Woo et al., "FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated Learning", 2022.
      Yeh et al., "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model Evaluation", 2024.
    """

    method: ClassVar[str] = "loha"
    title: ClassVar[str] = "LoHa"

    def init_target(self, path: str, weight: Any, layout: Layout, key: jax.Array) -> LohaWeights:
        problem = check_ndim(layout, tuple(weight.shape))
        if problem is not None:
            raise ValueError(f"LoHa cannot adapt {path!r}: {problem}.")
        stack, fan_in, fan_out = layout.split(weight.shape)
        rank, dtype = self.rank_for(path), jnp.dtype(self.dtype)
        a_shape, b_shape = (*stack, *fan_in, rank), (*stack, rank, *fan_out)
        k1, k2, k3 = jax.random.split(key, 3)
        a1 = uniform(k1, a_shape, dtype, math.prod(fan_in))
        b1 = uniform(k2, b_shape, dtype, rank)
        b2 = uniform(k3, b_shape, dtype, rank)
        return LohaWeights(a1, b1, jnp.zeros(a_shape, dtype), b2, self.scale_for(path), layout)
