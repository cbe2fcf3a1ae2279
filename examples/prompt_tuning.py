"""Prompt tuning or prefix tuning of a tiny Llama on synthetic data: only the virtual tokens train (CPU, seconds).

python examples/prompt_tuning.py --method prompt|prefix [--projection] [--steps 80]

The frozen base is a randomly initialised 2-layer Llama (``examples/models/llama.py``, whose ``prompt=`` and
``prefix=`` arguments are the ~10-line hook of ``jaxpeft.methods.prompt``). The task: predict ``(t + 1) mod V``
after each token ``t``. The adapters are the only thing ``jax.grad`` sees; the base params are closed over.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxpeft

if __package__ in (None, ""):  # run as `python examples/prompt_tuning.py`: put the clone root on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from examples.models import llama

CONFIG = llama.LlamaConfig(
    vocab_size=32,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.2,  # a random base with some structure to steer
)
SEQ, BATCH, VIRTUAL = 12, 16, 8


def batches(seed: int) -> Any:
    """Endless batches ``(ids, mask, labels)``: random tokens, labels ``(t + 1) mod V``, some right padding."""
    rng = np.random.default_rng(seed)
    while True:
        ids = rng.integers(0, CONFIG.vocab_size, (BATCH, SEQ))
        lengths = rng.integers(SEQ // 2, SEQ + 1, BATCH)
        mask = (np.arange(SEQ)[None] < lengths[:, None]).astype(np.int32)
        yield jnp.asarray(ids), jnp.asarray(mask), jnp.asarray((ids + 1) % CONFIG.vocab_size)


def make_config(method: str, projection: bool = False) -> jaxpeft.MethodConfig:
    """The method's config for ``CONFIG`` (prefix tuning needs the model's attention shape)."""
    if method == "prompt":
        return jaxpeft.PromptTuningConfig(VIRTUAL, init="sample_vocab")
    return jaxpeft.PrefixTuningConfig(
        VIRTUAL,
        num_layers=CONFIG.num_hidden_layers,
        num_kv_heads=CONFIG.num_key_value_heads,
        head_dim=CONFIG.head_dim,  # type: ignore[arg-type]
        prefix_projection=projection,
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", choices=("prompt", "prefix"), default="prompt")
    parser.add_argument("--projection", action="store_true", help="prefix tuning through HF's 2-layer MLP")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--lr", type=float, default=3e-2)
    args = parser.parse_args(argv)
    if args.projection and args.method != "prefix":
        parser.error("`--projection` reparameterises prefix tuning only; use it with `--method prefix`.")
    t0 = time.perf_counter()
    model = llama.LlamaForCausalLM(CONFIG)
    params = model.init(jax.random.key(0), jnp.zeros((1, SEQ), jnp.int32))["params"]
    cfg = make_config(args.method, args.projection)
    adapters = jaxpeft.init(cfg, params, key=jax.random.key(1))
    print(jaxpeft.plan(cfg, params))
    tx = optax.adam(args.lr)
    opt_state = tx.init(adapters)

    def loss_fn(adapters: Any, ids: jax.Array, mask: jax.Array, labels: jax.Array) -> jax.Array:
        if args.method == "prompt":
            logits = model.apply({"params": params}, ids, mask, prompt=adapters)
        else:
            logits = model.apply({"params": params}, ids, mask, prefix=jaxpeft.prefix_kv(adapters, ids.shape[0]))
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.sum(nll * mask) / jnp.sum(mask)

    @jax.jit
    def step(adapters: Any, opt_state: Any, ids: jax.Array, mask: jax.Array, labels: jax.Array) -> Any:
        loss, grads = jax.value_and_grad(loss_fn)(adapters, ids, mask, labels)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    data = batches(0)
    losses = []
    for i in range(args.steps):
        adapters, opt_state, loss = step(adapters, opt_state, *next(data))
        losses.append(float(loss))
        if i % 20 == 0 or i == args.steps - 1:
            print(f"step {i:3d}  loss {losses[-1]:.3f}")
    result = {"first": float(np.mean(losses[:5])), "last": float(np.mean(losses[-5:])), "seconds": 0.0}
    result["seconds"] = time.perf_counter() - t0
    print(f"{args.method}: loss {result['first']:.3f} -> {result['last']:.3f} in {result['seconds']:.1f} s")
    return result


if __name__ == "__main__":
    main()
