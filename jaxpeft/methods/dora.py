"""DoRA: LoRA's direction update with a learned per-output magnitude, ``m ⊙ (W + s·A·B) / ‖W + s·A·B‖``."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxpeft._select import Layout
from jaxpeft.hf._lora_format import lora_codec
from jaxpeft.methods._factors import LowRankConfig, LowRankNode, check_factors, factor_axes, factors_delta
from jaxpeft.protocol import STATIC, LayerAdapter, LayerCall, NotMergeableError

__all__ = ["DoraConfig", "DoraWeights", "weight_norm"]


def weight_norm(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float, layout: Layout) -> jax.Array:
    """``‖W + scale·A·B‖`` over the fan-in axes, per stack and fan-out index, in float32; ``A·B`` is never formed.

    Expands ``‖w + s·A·b‖² = ‖w‖² + 2s·⟨Aᵀw, b⟩ + s²·bᵀ(AᵀA)b`` column by column, so the largest temporaries
    are ``(r, fan_out)`` and ``(r, r)``: no weight-sized array besides the kernel itself.

    Returns:
      ``(*stack, *fan_out)`` float32.
    """
    stack, fan_in, fan_out = layout.split(kernel.shape)
    s, i, o = math.prod(stack), math.prod(fan_in), math.prod(fan_out)
    rank = a.shape[-1]
    hi = jax.lax.Precision.HIGHEST
    w = jnp.reshape(kernel, (s, i, o))
    a32 = jnp.reshape(a, (s, i, rank)).astype(jnp.float32)
    b32 = jnp.reshape(b, (s, rank, o)).astype(jnp.float32)
    w2 = jnp.sum(jnp.square(w.astype(jnp.float32)), axis=1)
    atw = jnp.einsum("sir,sio->sro", a32.astype(w.dtype), w, precision=hi, preferred_element_type=jnp.float32)
    gram = jnp.einsum("sir,sik->srk", a32, a32, precision=hi)
    cross = jnp.sum(b32 * atw, axis=1)
    quad = jnp.sum(b32 * jnp.einsum("srk,sko->sro", gram, b32, precision=hi), axis=1)
    n2 = w2 + (2.0 * scale) * cross + (scale * scale) * quad
    return jnp.reshape(jnp.sqrt(jnp.maximum(n2, 0.0)), (*stack, *fan_out))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DoraWeights(LowRankNode, LayerAdapter):
    """One DoRA adapter: LoRA factors A, B and a magnitude ``(*stack, *fan_out)``.

    The adapted weight is ``W' = magnitude ⊙ (W + s·A·B) / ‖W + s·A·B‖`` (norm over the fan-in axes, per output).
    As in the paper and HF PEFT the norm is treated as a constant (``stop_gradient``), and the forward never forms
    ``W'``: ``y = base(x) + (f - 1)·(base(x) - bias) + f·s·(x·A)·B`` with ``f = magnitude / norm``; the norm itself
    is computed without any weight-sized temporary (see :func:`.weight_norm`).
    """

    a: Any
    b: Any
    magnitude: Any
    scale: float = dataclasses.field(metadata=STATIC)
    dropout: float = dataclasses.field(default=0.0, metadata=STATIC)
    layout: Layout = dataclasses.field(metadata=STATIC, kw_only=True)

    def weight_axes(self) -> dict[str, tuple[int | None, ...]]:
        stack, _, fan_out = self.layout.axes()
        return {**factor_axes(self.layout), "magnitude": (*stack, *fan_out)}

    def check(self, weight_shape: tuple[int, ...]) -> str | None:
        problem = check_factors(self.a, self.b, self.layout, weight_shape)
        if problem is None:
            stack, _, fan_out = self.layout.split(weight_shape)
            if tuple(self.magnitude.shape) != (*stack, *fan_out):
                problem = f"expected magnitude {(*stack, *fan_out)}"
        return problem

    def factor(self, kernel: jax.Array) -> jax.Array:
        """``magnitude / ‖W + s·A·B‖`` (float32, no gradient through the norm)."""
        norm = jax.lax.stop_gradient(weight_norm(kernel, self.a, self.b, self.scale, self.layout))
        return self.magnitude.astype(jnp.float32) / norm

    def fold(self, weight: jax.Array, bias: jax.Array | None, sign: int) -> tuple[jax.Array, jax.Array | None]:
        if sign < 0:
            raise NotMergeableError(
                "a DoRA merge cannot be undone from the merged weight (the norm of W + ΔW it divided by is lost); "
                "jaxpeft.merge is pure, so keep the params you merged into and use those instead of unmerge"
            )
        stack, fan_in, fan_out = self.layout.split(weight.shape)
        f = jnp.reshape(self.factor(weight), (*stack, *([1] * len(fan_in)), *fan_out))
        w = weight.astype(jnp.float32) + factors_delta(self.a, self.b, self.scale, self.layout, weight.shape)
        return (w * f).astype(weight.dtype), None

    def row_factors(self, kernel: jax.Array, ids: jax.Array) -> jax.Array:
        """For a bank (this node's arrays with the adapter axis first): row ``i``'s ``magnitude / ‖W + s·A·B‖`` of
        adapter ``ids[i]``, ``(rows, *fan_out)``; the norms are computed once per adapter, or once per row when the
        bank holds more adapters than there are rows."""
        per_row = self.a.shape[0] > ids.shape[0]
        node = jax.tree.map(lambda t: jnp.take(t, ids, axis=0, mode="fill"), self) if per_row else self
        factors: jax.Array = jax.vmap(lambda one: one.factor(kernel))(node)
        return factors if per_row else jnp.take(factors, ids, axis=0, mode="fill")

    def forward(self, call: LayerCall) -> jax.Array:
        if call.rows is not None:  # a grouped mixed batch of a bank (dense calls): one factor per row
            y = call.base(call.x)
            rows = self.row_factors(call.kernel, call.rows).astype(y.dtype)
            f = jnp.reshape(rows, (rows.shape[0],) + (1,) * (y.ndim - rows.ndim) + rows.shape[1:])
            return self._rescaled(call, y, f)
        factor = self.factor(call.kernel)
        if call.kind == "attend":  # q·(f ⊙ (E + s·A·B))ᵀ = (q ⊙ f)·(E + s·A·B)ᵀ
            q = call.x * factor.astype(call.x.dtype)
            y = call.base(q)
            return y + call.lowrank(q.astype(y.dtype), self.a, self.b, self.scale).astype(y.dtype)
        y = call.base(call.x)
        f = call.output_vector(factor.astype(y.dtype), y.ndim)
        return self._rescaled(call, y, f)

    def _rescaled(self, call: LayerCall, y: jax.Array, f: jax.Array) -> jax.Array:
        """``f·(x·W + s·x·A·B) + bias`` from the base output ``y`` and the factor ``f`` broadcast against it."""
        if call.kind == "embed":
            return f * (y + call.lowrank(call.x, self.a, self.b, self.scale, dtype=y.dtype).astype(y.dtype))
        x = call.x.astype(y.dtype)
        dropped = call.dropout(x, self.dropout)
        lora = call.lowrank(dropped, self.a, self.b, self.scale).astype(y.dtype)
        bias = None if call.bias is None else call.bias.astype(y.dtype)
        if dropped is x:  # f·(x·W + s·x·A·B) + bias: one activation-sized residual (the sum) for the backward pass
            return f * (y + lora) if bias is None else f * (y - bias + lora) + bias
        plain = call.base(dropped)  # HF: with dropout the base runs again on dropout(x)
        if bias is not None:
            plain = plain - bias
        return y + (f - 1) * plain + f * lora


@dataclasses.dataclass(frozen=True)
class DoraConfig(LowRankConfig):
    """DoRA hyper-parameters: the fields of :class:`jaxpeft.LoraConfig` (rank, alpha, patterns, dropout, rsLoRA,
    init ``"kaiming"``/``"gaussian"``, dtype); a sibling of it over the shared ``LowRankConfig``, not a subclass.

    The magnitude starts at the base weight's column norms, so the adapted model equals the base at init; that
    needs the base weights' values (``init`` on ``jax.ShapeDtypeStruct`` params is refused, except under
    ``jax.eval_shape``). HF PEFT calls this ``LoraConfig(use_dora=True)``.

    References:
      Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", 2024.
    """

    method: ClassVar[str] = "dora"
    reads_weight_values: ClassVar[bool] = True  # the magnitude starts at the weight's column norms

    def init_target(self, path: str, weight: Any, layout: Layout, key: jax.Array) -> DoraWeights:
        if isinstance(weight, jax.ShapeDtypeStruct):
            raise ValueError(
                f"DoRA starts the magnitude of {path!r} at the base weight's column norms, so `params` must hold "
                "arrays, not jax.ShapeDtypeStruct (wrap the whole init in jax.eval_shape for shapes only)."
            )
        a, b = self.init_factors(path, weight.shape, layout, key)
        magnitude = weight_norm(weight, a, jnp.zeros_like(b), 1.0, layout).astype(self.dtype)
        return DoraWeights(a, b, magnitude, self.scale_for(path), self.dropout, layout=layout)


DoraConfig.codec = lora_codec(DoraWeights, DoraConfig, dora=True)
