"""Quickstart: LoRA on a small Flax NNX transformer — adapt, train only the adapters, merge, check (CPU, seconds).

PYTHONPATH=. python examples/nnx_quickstart.py
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jaxpeft
import jaxpeft.nnx

VOCAB, WIDTH, FFN, HEADS, LAYERS, SEQ, BATCH = 32, 64, 128, 4, 2, 16, 16


class Block(nnx.Module):
    """Pre-norm causal self-attention and MLP."""

    def __init__(self, *, rngs: nnx.Rngs) -> None:
        self.attn_norm = nnx.RMSNorm(WIDTH, rngs=rngs)
        self.q_proj = nnx.Linear(WIDTH, WIDTH, use_bias=False, rngs=rngs)
        self.k_proj = nnx.Linear(WIDTH, WIDTH, use_bias=False, rngs=rngs)
        self.v_proj = nnx.Linear(WIDTH, WIDTH, use_bias=False, rngs=rngs)
        self.o_proj = nnx.Linear(WIDTH, WIDTH, use_bias=False, rngs=rngs)
        self.mlp_norm = nnx.RMSNorm(WIDTH, rngs=rngs)
        self.up_proj = nnx.Linear(WIDTH, FFN, use_bias=False, rngs=rngs)
        self.down_proj = nnx.Linear(FFN, WIDTH, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        h = self.attn_norm(x)
        q, k, v = (p(h).reshape(b, t, HEADS, WIDTH // HEADS) for p in (self.q_proj, self.k_proj, self.v_proj))
        att = nnx.dot_product_attention(q, k, v, mask=nnx.make_causal_mask(jnp.ones((b, t))))
        x = x + self.o_proj(att.reshape(b, t, WIDTH))
        return x + self.down_proj(nnx.silu(self.up_proj(self.mlp_norm(x))))


class TinyLM(nnx.Module):
    """Token embedding, a list of blocks, final norm and an untied head."""

    def __init__(self, *, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
        self.layers = nnx.List([Block(rngs=rngs) for _ in range(LAYERS)])
        self.norm = nnx.RMSNorm(WIDTH, rngs=rngs)
        self.lm_head = nnx.Linear(WIDTH, VOCAB, use_bias=False, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def make_batch(key: jax.Array) -> jax.Array:
    """Counting sequences ``s, s+3, s+6, ... (mod VOCAB)``: the task the adapters learn."""
    start = jax.random.randint(key, (BATCH, 1), 0, VOCAB)
    return (start + 3 * jnp.arange(SEQ)) % VOCAB


def main() -> None:
    t0 = time.perf_counter()
    model = TinyLM(rngs=nnx.Rngs(0))  # stands in for a pretrained model
    cfg = jaxpeft.LoraConfig(rank=8, alpha=16, targets="all-linear")  # q/k/v/o/up/down; the head stays frozen
    print(jaxpeft.nnx.plan(cfg, model), "\n")

    model = jaxpeft.nnx.adapt(model, cfg, key=jax.random.key(1))  # output equals the base output here
    tx = optax.adamw(1e-2)
    print(jaxpeft.summary(jaxpeft.nnx.base_params(model), jaxpeft.nnx.adapters_of(model), tx), "\n")

    # The functional view: graph, trainable adapters, frozen base. Only the adapters are differentiated.
    graphdef, lora, frozen = nnx.split(model, jaxpeft.nnx.AdapterParam, ...)
    opt_state = tx.init(lora)

    def loss_fn(lora: nnx.State, frozen: nnx.State, ids: jax.Array) -> jax.Array:
        logits = nnx.merge(graphdef, lora, frozen, copy=True)(ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    @jax.jit
    def train_step(lora: nnx.State, opt_state: optax.OptState, frozen: nnx.State, ids: jax.Array) -> tuple:
        loss, grads = jax.value_and_grad(loss_fn)(lora, frozen, ids)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    key = jax.random.key(2)
    for step in range(151):
        key, sub = jax.random.split(key)
        lora, opt_state, loss = train_step(lora, opt_state, frozen, make_batch(sub))
        if step % 25 == 0:
            print(f"step {step:3d}  loss {float(loss):.4f}")

    nnx.update(model, lora)  # write the trained adapters back into the NNX model
    ids = make_batch(jax.random.key(3))
    merged = jaxpeft.nnx.merge(model)  # a plain TinyLM: W + s·A·B folded in, no LoRA layers left
    with jax.default_matmul_precision("float32"):  # full f32 matmuls on every backend (TF32 on GPUs otherwise)
        diff = float(jnp.abs(merged(ids) - model(ids)).max())
    print(f"\nmax |merged - unmerged| = {diff:.2e}")
    adapters = jaxpeft.nnx.adapters_of(model)  # framework-neutral pytree, e.g. for jaxpeft.checkpoint
    print(f"adapter tree: {len(jax.tree.leaves(adapters))} arrays under {sorted(adapters)}")
    print(f"done in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
