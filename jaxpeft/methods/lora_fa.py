"""LoRA-FA: LoRA with a frozen random down-projection A; only B (and so ``ΔW = s·A·B``) is trained.

The adapter holds A as a frozen array field (``jaxpeft.FROZEN``): it is saved, sharded and exported like B, but no
gradient ever reaches it and no optimizer state is kept for it, so the backward pass computes only B's gradient (no
``xᵀ·(g·Bᵀ)`` for A) and the optimizer state is half LoRA's. The files are PEFT's ``LORA`` format: a LoRA-FA adapter
exports as (and PEFT loads it as) a plain LoRA; ``jaxpeft.hf`` imports such a file as LoRA-FA when you pass
``configs=(jaxpeft.LoraFAConfig,)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxpeft._select import Layout
from jaxpeft.hf._lora_format import lora_codec
from jaxpeft.methods._factors import LowRankConfig, LowRankNode
from jaxpeft.protocol import FROZEN, STATIC, LayerAdapter

__all__ = ["LoraFAConfig", "LoraFAWeights"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraFAWeights(LowRankNode, LayerAdapter):
    """One LoRA-FA adapter: ``ΔW = scale · A·B``, A ``(*stack, *fan_in, r)`` frozen, B ``(*stack, r, *fan_out)``
    trained; forward, fold and layouts are LoRA's (:class:`jaxpeft.LoraWeights`)."""

    a: Any = dataclasses.field(metadata=FROZEN)
    b: Any = dataclasses.field()
    scale: float = dataclasses.field(metadata=STATIC)
    dropout: float = dataclasses.field(default=0.0, metadata=STATIC)
    layout: Layout = dataclasses.field(metadata=STATIC, kw_only=True)


@dataclasses.dataclass(frozen=True)
class LoraFAConfig(LowRankConfig):
    """LoRA-FA hyper-parameters: the fields of :class:`jaxpeft.LoraConfig` (rank, alpha, patterns, dropout, rsLoRA,
    init ``"kaiming"``/``"gaussian"`` for the frozen A, dtype); frozen, hashable, JSON round-trippable.

    A is drawn as LoRA's (kaiming-uniform by default; ``N(0, 1)`` for embeddings, whose LoRA A starts at zero) and
    stays fixed; B starts at zero, so the adapted model equals
    the base at init. PEFT has LoRA-FA as an optimizer (``create_lorafa_optimizer``) over ordinary LoRA files, which
    also rescales B's gradient; jaxpeft's is the paper's method (frozen A, plain B), with any optax optimizer.

    References:
      Zhang et al., "LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language Models Fine-tuning", 2023.
    """

    method: ClassVar[str] = "lora_fa"

    def init_target(self, path: str, weight: Any, layout: Layout, key: jax.Array) -> LoraFAWeights:
        if layout.kind == "embed":  # LoRA's embedding init (A = 0) would freeze a zero update forever
            a_shape, b_shape = self.factor_shapes(path, weight.shape, layout)
            a, b = jax.random.normal(key, a_shape, self.dtype), jnp.zeros(b_shape, self.dtype)
        else:
            a, b = self.init_factors(path, weight.shape, layout, key)
        return LoraFAWeights(a, b, self.scale_for(path), self.dropout, layout=layout)


LoraFAConfig.codec = lora_codec(LoraFAWeights, LoraFAConfig, dora=False)
