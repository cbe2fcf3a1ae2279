"""XLA cost-analysis FLOPs of one train step: full fine-tuning, the frozen floor, LoRA, DoRA, IA3, merge-on-the-fly,
QLoRA (LoRA over an NF4 or int8 base).

The same transformer is built in Flax Linen and in Flax NNX (``nnx-full``, ``nnx-lora``).

Deterministic (it compiles, it does not time), so it runs anywhere, CPU included:

    .venv/bin/python examples/benchmarks/flops.py                 # width 1024, ffn 4096, 4 layers, 4096 tokens, rank 8
    .venv/bin/python examples/benchmarks/flops.py --width 256 --ffn 1024 --tokens 1024

The frozen floor trains only the norms: backward still runs through every layer, but no weight gradient is
formed. It is a yardstick, not a lower bound: a method that trains no norm (LoRA, IA3) forms no norm
gradient and can come in slightly under it. A good LoRA step costs about the floor; merging adapters
into the weights inside the step costs about a full fine-tuning step, because the gradient then flows through
``W + ΔW`` and a full-size weight gradient is formed per kernel. QLoRA adds the dequantisation of each adapted
kernel, twice (forward, and again in the backward pass instead of keeping the full-precision weight): a few
elementwise operations per weight, reported as the ratio to LoRA.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jaxpeft
import jaxpeft.linen
import jaxpeft.nnx


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


class NnxBlock(nnx.Module):
    """The NNX twin of ``Block``."""

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


class NnxTransformer(nnx.Module):
    """The NNX twin of ``Transformer``: embedding, unrolled blocks, final norm, untied ``lm_head``."""

    def __init__(self, vocab: int, width: int, ffn: int, layers: int, heads: int, *, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(vocab, width, rngs=rngs)
        self.layers = nnx.List([NnxBlock(width, ffn, heads, rngs=rngs) for _ in range(layers)])
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


def _nnx_step_flops(model: nnx.Module, wrt: Any, ids: jax.ShapeDtypeStruct, tx: optax.GradientTransformation) -> float:
    """FLOPs of ``loss -> grad wrt the ``wrt`` variables -> AdamW update`` for an (abstract) model."""
    graphdef, trainable, frozen = nnx.split(model, wrt, ...)

    def step(trainable: Any, frozen: Any, opt: Any, ids: jax.Array) -> Any:
        def loss(t: Any) -> jax.Array:
            return _xent(nnx.merge(graphdef, t, frozen, copy=True)(ids), ids)

        grads = jax.grad(loss)(trainable)
        updates, opt = tx.update(grads, opt, trainable)
        return optax.apply_updates(trainable, updates), opt

    return _flops(step, trainable, frozen, jax.eval_shape(tx.init, trainable), ids)


MODES = (
    "full",
    "floor",
    "lora",
    "lora-fa",
    "dora",
    "ia3",
    "merged",
    "nnx-full",
    "nnx-lora",
    "qlora-nf4",
    "qlora-int8",
)


def step_flops(mode: str, cfg: BenchConfig) -> float:
    """FLOPs of one jitted AdamW train step in ``mode`` (one of ``MODES``); nothing is allocated.

    The ``nnx-*`` modes use ``NnxTransformer``, the NNX twin of the Linen model, through ``jaxpeft.nnx``. The
    ``qlora-*`` modes are the ``lora`` step over a base whose adapted kernels are quantised (``jaxpeft.quantize``).
    """
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
    method_cfg: jaxpeft.MethodConfig = lora_cfg
    if mode == "dora":
        method_cfg = jaxpeft.DoraConfig(rank=cfg.rank, alpha=2 * cfg.rank, targets="all-linear")
    elif mode == "lora-fa":  # A frozen: no gradient of A, no optimizer state for it
        method_cfg = jaxpeft.LoraFAConfig(rank=cfg.rank, alpha=2 * cfg.rank, targets="all-linear")
    elif mode == "ia3":  # HF's defaults for this naming: keys, values and the FFN down projection (its input)
        method_cfg = jaxpeft.IA3Config(targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"])
    if mode.startswith("nnx-"):
        nnx_model = nnx.eval_shape(
            lambda: NnxTransformer(cfg.vocab, cfg.width, cfg.ffn, cfg.layers, cfg.heads, rngs=nnx.Rngs(0))
        )
        if mode == "nnx-full":
            return _nnx_step_flops(nnx_model, nnx.Param, ids, tx)
        if mode == "nnx-lora":
            lora_model = jaxpeft.nnx.adapt(nnx_model, lora_cfg, key=jax.random.key(1))
            return _nnx_step_flops(lora_model, jaxpeft.nnx.AdapterParam, ids, tx)
    if mode.startswith("qlora-"):
        kind = mode.removeprefix("qlora-")
        params = jax.eval_shape(lambda p: jaxpeft.quantize(p, lora_cfg, kind=kind), params)
    adapters = jax.eval_shape(lambda p: jaxpeft.linen.init(method_cfg, model, p, ids, key=jax.random.key(1)), params)
    if mode in ("lora", "lora-fa", "dora", "ia3", "qlora-nf4", "qlora-int8"):
        forward = lambda p, a, x: jaxpeft.linen.apply(model, {"params": p}, a, x)  # noqa: E731
    elif mode == "merged":
        forward = jaxpeft.merged(lambda p, x: model.apply({"params": p}, x))
    else:
        raise ValueError(f"`mode`={mode!r}; expected one of {MODES}.")

    trainable, frozen = jaxpeft.partition(adapters, True)  # frozen fields of the nodes (LoRA-FA's A), if any

    def step(trainable: Any, frozen: Any, params: Any, opt: Any, ids: jax.Array) -> Any:
        loss = lambda t: _xent(forward(params, jaxpeft.combine(t, frozen), ids), ids)  # noqa: E731
        return update(trainable, jax.grad(loss)(trainable), opt)

    return _flops(step, trainable, frozen, params, jax.eval_shape(tx.init, trainable), ids)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for field in dataclasses.fields(BenchConfig):
        parser.add_argument(f"--{field.name}", type=int, default=field.default)
    parser.add_argument("--no-nnx", action="store_true", help="skip the NNX model")
    args = parser.parse_args(argv)
    cfg = BenchConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchConfig)})
    print(f"config: {cfg} (batch {cfg.batch} x seq {cfg.seq}), backend {jax.default_backend()}")
    modes = tuple(m for m in MODES if not (args.no_nnx and m.startswith("nnx-")))
    flops = {mode: step_flops(mode, cfg) for mode in modes}
    for mode, value in flops.items():
        print(f"{mode:10s} {value / 1e9:10.2f} GFLOP")
    ratios = {
        "lora/full": flops["lora"] / flops["full"],
        "lora/floor": flops["lora"] / flops["floor"],
        "dora/lora": flops["dora"] / flops["lora"],
        "ia3/floor": flops["ia3"] / flops["floor"],
        "merged/full": flops["merged"] / flops["full"],
        "qlora-nf4/lora": flops["qlora-nf4"] / flops["lora"],
        "qlora-int8/lora": flops["qlora-int8"] / flops["lora"],
    }
    if not args.no_nnx:
        ratios["nnx-lora/full"] = flops["nnx-lora"] / flops["nnx-full"]
    for name, value in ratios.items():
        print(f"ratio {name} {value:.3f}")
    return ratios


if __name__ == "__main__":
    main()
