"""XLA cost-analysis FLOPs of one AdamW train step of an NNX transformer: full fine-tuning vs jaxpeft.nnx LoRA.

The model mirrors ``flops.py``'s Linen one (pre-norm, q/k/v/o and up/down ``nnx.Linear`` without bias, LayerNorm,
embedding and an untied head, layers unrolled in an ``nnx.List``). Everything is abstract (``nnx.eval_shape``):
the steps are compiled, never run, so this works on CPU in seconds::

    python examples/benchmarks/nnx_flops_model.py --width 256 --ffn 1024 --tokens 1024
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jaxpeft
import jaxpeft.nnx


class Block(nnx.Module):
    """Pre-norm attention + MLP block with separate q/k/v/o and up/down projections."""

    def __init__(self, width: int, ffn: int, heads: int, *, rngs: nnx.Rngs) -> None:
        self.heads = heads
        self.attn_norm = nnx.LayerNorm(width, rngs=rngs)
        self.q_proj = nnx.Linear(width, width, use_bias=False, rngs=rngs)
        self.k_proj = nnx.Linear(width, width, use_bias=False, rngs=rngs)
        self.v_proj = nnx.Linear(width, width, use_bias=False, rngs=rngs)
        self.o_proj = nnx.Linear(width, width, use_bias=False, rngs=rngs)
        self.mlp_norm = nnx.LayerNorm(width, rngs=rngs)
        self.up_proj = nnx.Linear(width, ffn, use_bias=False, rngs=rngs)
        self.down_proj = nnx.Linear(ffn, width, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        h = self.attn_norm(x)

        def split(a: jax.Array) -> jax.Array:
            return a.reshape(b, t, self.heads, d // self.heads)

        mask = nnx.make_causal_mask(jnp.ones((b, t)))
        att = nnx.dot_product_attention(split(self.q_proj(h)), split(self.k_proj(h)), split(self.v_proj(h)), mask=mask)
        x = x + self.o_proj(att.reshape(b, t, d))
        h = self.up_proj(self.mlp_norm(x))
        return x + self.down_proj(nnx.gelu(h))


class Transformer(nnx.Module):
    """Embedding, unrolled blocks, final norm and an untied ``lm_head``."""

    def __init__(self, vocab: int, width: int, ffn: int, layers: int, heads: int, *, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(vocab, width, rngs=rngs)
        self.layers = nnx.List([Block(width, ffn, heads, rngs=rngs) for _ in range(layers)])
        self.final_norm = nnx.LayerNorm(width, rngs=rngs)
        self.lm_head = nnx.Linear(width, vocab, use_bias=False, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.final_norm(x))


def _xent(logits: jax.Array, ids: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def _flops(fn: Callable[..., Any], *args: Any) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost["flops"])


def _step_flops(model: nnx.Module, wrt: Any, ids: jax.ShapeDtypeStruct, tx: optax.GradientTransformation) -> float:
    """FLOPs of ``loss -> grad wrt the ``wrt`` variables -> AdamW update`` for an (abstract) model."""
    graphdef, trainable, frozen = nnx.split(model, wrt, ...)

    def step(trainable: Any, frozen: Any, opt: Any, ids: jax.Array) -> Any:
        def loss(t: Any) -> jax.Array:
            return _xent(nnx.merge(graphdef, t, frozen, copy=True)(ids), ids)

        grads = jax.grad(loss)(trainable)
        updates, opt = tx.update(grads, opt, trainable)
        return optax.apply_updates(trainable, updates), opt

    return _flops(step, trainable, frozen, jax.eval_shape(tx.init, trainable), ids)


def nnx_lora_flops(
    width: int = 1024,
    ffn: int = 4096,
    layers: int = 4,
    tokens: int = 4096,
    rank: int = 8,
    seq: int = 256,
    heads: int = 8,
    vocab: int = 1024,
) -> tuple[float, float]:
    """``(full fine-tune FLOPs, NNX LoRA FLOPs)`` of one jitted AdamW train step, from XLA cost analysis.

    LoRA (rank ``rank``, alpha ``2·rank``) sits on every linear layer except the head (``"all-linear"``); the LoRA
    step differentiates only ``jaxpeft.nnx.LoraParam`` variables. Nothing is allocated: the model is built with
    ``nnx.eval_shape`` and the steps are lowered from shapes.

    Args:
      width: model width.
      ffn: MLP hidden width.
      layers: number of (unrolled) blocks.
      tokens: tokens per step (``batch = tokens // seq``).
      rank: LoRA rank.
      seq: sequence length.
      heads: attention heads.
      vocab: vocabulary size.
    """
    model = nnx.eval_shape(lambda: Transformer(vocab, width, ffn, layers, heads, rngs=nnx.Rngs(0)))
    ids = jax.ShapeDtypeStruct((max(tokens // seq, 1), seq), jnp.int32)
    tx = optax.adamw(1e-4)
    full = _step_flops(model, nnx.Param, ids, tx)
    cfg = jaxpeft.LoraConfig(rank=rank, alpha=2 * rank, targets="all-linear")
    lora_model = jaxpeft.nnx.apply_lora(model, cfg, key=jax.random.key(1))
    lora = _step_flops(lora_model, jaxpeft.nnx.LoraParam, ids, tx)
    return full, lora


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, default in (("width", 1024), ("ffn", 4096), ("layers", 4), ("tokens", 4096), ("rank", 8), ("seq", 256)):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args(argv)
    full, lora = nnx_lora_flops(**vars(args))
    print(f"nnx-full {full / 1e9:10.2f} GFLOP\nnnx-lora {lora / 1e9:10.2f} GFLOP")
    print(f"ratio nnx-lora/full {lora / full:.3f}")
    return lora / full


if __name__ == "__main__":
    main()
