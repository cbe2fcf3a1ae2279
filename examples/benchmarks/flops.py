"""XLA cost-analysis FLOPs of one train step: full fine-tuning, the frozen floor, jaxpeft LoRA, merge-on-the-fly.

Deterministic (it compiles, it does not time), so it runs anywhere, CPU included:

    python examples/benchmarks/flops.py                 # width 1024, ffn 4096, 4 layers, 4096 tokens, rank 8
    python examples/benchmarks/flops.py --width 256 --ffn 1024 --tokens 1024

The frozen floor trains only the norms: backward still runs through every layer, but no weight gradient is
formed. It is the cheapest any PEFT method can be. A good LoRA step costs about the floor; merging adapters
into the weights inside the step costs about a full fine-tuning step, because the gradient then flows through
``W + ΔW`` and a full-size weight gradient is formed per kernel.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jaxpeft
import jaxpeft.linen


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """The benchmark model and step: a pre-norm transformer with unrolled layers."""

    width: int = 1024
    ffn: int = 4096
    layers: int = 4
    heads: int = 8
    tokens: int = 4096
    seq: int = 256
    vocab: int = 1024
    rank: int = 8

    @property
    def batch(self) -> int:
        return max(self.tokens // self.seq, 1)


class Block(nn.Module):
    width: int
    ffn: int
    heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        h = nn.LayerNorm(name="attn_norm")(x)
        q, k, v = (nn.Dense(d, use_bias=False, name=n)(h) for n in ("q_proj", "k_proj", "v_proj"))
        split = lambda a: a.reshape(b, t, self.heads, d // self.heads)  # noqa: E731
        mask = nn.make_causal_mask(jnp.ones((b, t)))
        att = nn.dot_product_attention(split(q), split(k), split(v), mask=mask).reshape(b, t, d)
        x = x + nn.Dense(d, use_bias=False, name="o_proj")(att)
        h = nn.LayerNorm(name="mlp_norm")(x)
        h = nn.Dense(self.ffn, use_bias=False, name="up_proj")(h)
        return x + nn.Dense(d, use_bias=False, name="down_proj")(nn.gelu(h))


class Transformer(nn.Module):
    cfg: BenchConfig

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        c = self.cfg
        x = nn.Embed(c.vocab, c.width, name="embed")(ids)
        for i in range(c.layers):
            x = Block(c.width, c.ffn, c.heads, name=f"layers_{i}")(x)
        return nn.Dense(c.vocab, use_bias=False, name="lm_head")(nn.LayerNorm(name="final_norm")(x))


def _xent(logits: jax.Array, ids: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def _flops(fn: Callable[..., Any], *args: Any) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost["flops"])


def step_flops(mode: str, cfg: BenchConfig) -> float:
    """FLOPs of one jitted AdamW train step in ``mode`` ("full", "floor", "lora", "merged"); nothing is allocated."""
    model = Transformer(cfg)
    ids = jax.ShapeDtypeStruct((cfg.batch, cfg.seq), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
    tx = optax.adamw(1e-4)

    def update(trainable: Any, grads: Any, opt: Any) -> tuple[Any, Any]:
        updates, opt = tx.update(grads, opt, trainable)
        return optax.apply_updates(trainable, updates), opt

    if mode == "full":

        def step(params: Any, opt: Any, ids: jax.Array) -> Any:
            grads = jax.grad(lambda p: _xent(model.apply({"params": p}, ids), ids))(params)
            return update(params, grads, opt)

        return _flops(step, params, jax.eval_shape(tx.init, params), ids)
    if mode == "floor":
        train, frozen = jaxpeft.partition(params, jaxpeft.path_filter(r"norm/"))

        def step(train: Any, frozen: Any, opt: Any, ids: jax.Array) -> Any:
            loss = lambda t: _xent(model.apply({"params": jaxpeft.combine(t, frozen)}, ids), ids)  # noqa: E731
            return update(train, jax.grad(loss)(train), opt)

        return _flops(step, train, frozen, jax.eval_shape(tx.init, train), ids)
    lora_cfg = jaxpeft.LoraConfig(rank=cfg.rank, alpha=2 * cfg.rank, targets="all-linear")
    adapters = jax.eval_shape(lambda: jaxpeft.linen.init(lora_cfg, model, params, ids, key=jax.random.key(1)))
    if mode == "lora":
        forward = lambda p, a, x: jaxpeft.linen.apply(model, {"params": p}, a, x)  # noqa: E731
    elif mode == "merged":
        forward = jaxpeft.merged(lambda p, x: model.apply({"params": p}, x))
    else:
        raise ValueError(f"`mode`={mode!r}; expected 'full', 'floor', 'lora' or 'merged'.")

    def step(adapters: Any, params: Any, opt: Any, ids: jax.Array) -> Any:
        grads = jax.grad(lambda a: _xent(forward(params, a, ids), ids))(adapters)
        return update(adapters, grads, opt)

    return _flops(step, adapters, params, jax.eval_shape(tx.init, adapters), ids)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for field in dataclasses.fields(BenchConfig):
        parser.add_argument(f"--{field.name}", type=int, default=field.default)
    parser.add_argument("--no-nnx", action="store_true", help="skip the NNX model")
    args = parser.parse_args(argv)
    cfg = BenchConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchConfig)})
    print(f"config: {cfg} (batch {cfg.batch} x seq {cfg.seq}), backend {jax.default_backend()}")
    flops = {mode: step_flops(mode, cfg) for mode in ("full", "floor", "lora", "merged")}
    for mode, value in flops.items():
        print(f"{mode:8s} {value / 1e9:10.2f} GFLOP")
    ratios = {
        "lora/full": flops["lora"] / flops["full"],
        "lora/floor": flops["lora"] / flops["floor"],
        "merged/full": flops["merged"] / flops["full"],
    }
    if not args.no_nnx:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from nnx_flops_model import nnx_lora_flops

        full, lora = nnx_lora_flops(
            width=cfg.width, ffn=cfg.ffn, layers=cfg.layers, tokens=cfg.tokens, rank=cfg.rank, seq=cfg.seq
        )
        print(f"nnx-full {full / 1e9:10.2f} GFLOP\nnnx-lora {lora / 1e9:10.2f} GFLOP")
        ratios["nnx-lora/full"] = lora / full
    for name, value in ratios.items():
        print(f"ratio {name} {value:.3f}")
    return ratios


if __name__ == "__main__":
    main()
