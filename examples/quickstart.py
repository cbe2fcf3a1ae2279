"""jaxpeft quickstart: pre-train a small Flax Linen transformer, then adapt it to a shifted task (CPU, <1 min).

Task A: sequences follow a fixed random permutation (next token = perm[token]). Task B, the shift: a quarter of the
tokens get a new successor. The model is pre-trained on A with full fine-tuning, then adapted to B by training only
the adapters of one PEFT method (default LoRA, rank 4 on every linear layer of the scanned stack); the base weights
stay frozen.

    .venv/bin/python examples/quickstart.py                  # LoRA
    .venv/bin/python examples/quickstart.py --method dora    # or lora_fa, ia3, loha, lokr, vera, bitfit, ln_tuning
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxpeft
import jaxpeft.linen

VOCAB, WIDTH, HEADS, LAYERS, SEQ, BATCH = 64, 64, 4, 2, 16, 64
#: The methods the quickstart can run, with the learning rate each trains at.
METHODS: dict[str, tuple[jaxpeft.MethodConfig, float]] = {
    "lora": (jaxpeft.LoraConfig(rank=4, alpha=8, targets="all-linear"), 1e-2),
    "dora": (jaxpeft.DoraConfig(rank=4, alpha=8, targets="all-linear"), 1e-2),
    "lora_fa": (jaxpeft.LoraFAConfig(rank=4, alpha=8, targets="all-linear"), 1e-2),  # A frozen, B trained
    "ia3": (jaxpeft.IA3Config(targets=["key", "value", "down"], feedforward=["down"]), 5e-2),
    "loha": (jaxpeft.LohaConfig(rank=2, alpha=4, targets="all-linear"), 1e-2),
    "lokr": (jaxpeft.LokrConfig(rank=4, alpha=8, targets="all-linear"), 1e-2),
    "vera": (jaxpeft.VeraConfig(rank=64, targets="all-linear"), 2e-2),
    # PiSSA / OLoRA: A, B from the SVD / QR of each weight, the base keeps the residual (jaxpeft.init_adjusted)
    "pissa": (jaxpeft.LoraConfig(rank=4, alpha=8, targets="all-linear", init="pissa"), 3e-3),
    "olora": (jaxpeft.LoraConfig(rank=4, alpha=8, targets="all-linear", init="olora"), 3e-3),
    "bitfit": (jaxpeft.BitFitConfig(), 2e-2),  # every Dense/DenseGeneral bias
    "ln_tuning": (jaxpeft.LNTuningConfig(), 2e-2),  # every LayerNorm's scale and bias
}


class Block(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, _: None = None) -> tuple[jax.Array, None]:
        b, t, d = x.shape
        h = nn.LayerNorm(name="attn_norm")(x)
        q, k, v = (nn.DenseGeneral((HEADS, d // HEADS), name=n)(h) for n in ("query", "key", "value"))
        att = nn.dot_product_attention(q, k, v, mask=nn.make_causal_mask(jnp.ones((b, t))))
        x = x + nn.DenseGeneral(d, axis=(-2, -1), name="out")(att)
        h = nn.Dense(4 * d, name="up")(nn.LayerNorm(name="mlp_norm")(x))
        return x + nn.Dense(d, name="down")(nn.gelu(h)), None


class TinyLM(nn.Module):
    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        x = nn.Embed(VOCAB, WIDTH, name="embed")(ids) + self.param("pos", nn.initializers.normal(0.02), (SEQ, WIDTH))
        stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS)
        x, _ = stack(name="layers")(x, None)
        return nn.Dense(VOCAB, name="lm_head")(nn.LayerNorm(name="final_norm")(x))


def sampler(perm: np.ndarray):
    def sample(key: jax.Array) -> jax.Array:
        start = jax.random.randint(key, (BATCH,), 0, VOCAB)
        cols = [start]
        for _ in range(SEQ - 1):
            cols.append(jnp.asarray(perm)[cols[-1]])
        return jnp.stack(cols, axis=1)

    return jax.jit(sample)


def xent(logits: jax.Array, ids: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def train(loss_fn, trainable, sample, steps: int, lr: float, label: str, key: jax.Array):
    tx = optax.adam(lr)
    opt = tx.init(trainable)

    @jax.jit
    def step(trainable, opt, key):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, sample(key))
        updates, opt = tx.update(grads, opt, trainable)
        return optax.apply_updates(trainable, updates), opt, loss

    for i, k in enumerate(jax.random.split(key, steps)):
        trainable, opt, loss = step(trainable, opt, k)
        if i % (steps // 5) == 0 or i == steps - 1:
            print(f"  [{label}] step {i:4d}  loss {float(loss):.4f}")
    return trainable


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", choices=sorted(METHODS), default="lora")
    method = parser.parse_args(argv).method
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    perm_a = rng.permutation(VOCAB)
    perm_b = perm_a.copy()
    moved = rng.choice(VOCAB, VOCAB // 4, replace=False)
    perm_b[moved] = rng.permutation(perm_a[moved])
    task_a, task_b = sampler(perm_a), sampler(perm_b)
    model = TinyLM()
    ids = task_a(jax.random.key(0))
    params = jax.jit(model.init)(jax.random.key(1), ids)["params"]  # jitted: one compile instead of one per op

    print("1) pre-train the base model on task A (full fine-tuning)")
    full_loss = lambda p, batch: xent(model.apply({"params": p}, batch), batch)  # noqa: E731
    params = train(full_loss, params, task_a, 100, 3e-3, "base", jax.random.key(2))
    print(
        f"  base model on the shifted task B: loss {float(jax.jit(full_loss)(params, task_b(jax.random.key(3)))):.4f}"
    )

    print(f"\n2) {method} on task B: only the adapters train; the base weights are frozen")
    cfg, lr = METHODS[method]
    layouts = jaxpeft.linen.infer_layouts(model, ids)  # abstract trace: which kernel axes are stack/fan-in/fan-out
    print(jaxpeft.plan(cfg, params, layouts=layouts))  # the dry run
    # init_adjusted = init for every method but PiSSA/OLoRA, whose base weights become the residual W - s·A·B
    init = jax.jit(lambda p, k: jaxpeft.init_adjusted(cfg, p, key=k, layouts=layouts))
    frozen, adapters = init(params, jax.random.key(4))
    print()
    print(jaxpeft.summary(frozen, adapters, tx=optax.adam(1e-3)))

    trainable, fixed = jaxpeft.partition(adapters, True)  # frozen fields of a method (LoRA-FA's A) stay out

    def peft_loss(trainable, batch):  # differentiate only the adapters: no gradient of a frozen weight exists
        adapters = jaxpeft.combine(trainable, fixed)
        return xent(jaxpeft.linen.apply(model, {"params": frozen}, adapters, batch), batch)

    adapters = jaxpeft.combine(train(peft_loss, trainable, task_b, 100, lr, method, jax.random.key(5)), fixed)

    print("\n   how low-rank is the update that full fine-tuning makes? Fully fine-tune a copy on task B and look")
    tuned = train(full_loss, params, task_b, 60, 3e-3, "full", jax.random.key(7))
    rank = 4
    energy = jaxpeft.update_spectrum(params, tuned, rank=rank)
    kernels = {p: e for p, e in energy.items() if p.startswith("layers/") and p.endswith("kernel")}
    print(f"  share of each full-fine-tuning update ΔW in its top-{rank} directions (1.0 = exactly rank {rank}):")
    for path, e in kernels.items():
        print(f"    {path:22s} {e:.2f}")

    print("\n3) ship it: merge the adapters into plain params (zero inference overhead)")
    merged = jax.jit(jaxpeft.merge)(frozen, adapters)
    batch = task_b(jax.random.key(6))
    unmerged_out = jax.jit(lambda a, x: jaxpeft.linen.apply(model, {"params": frozen}, a, x))(adapters, batch)
    merged_out = jax.jit(model.apply)({"params": merged}, batch)
    diff = float(jnp.abs(merged_out - unmerged_out).max())
    acc = float((merged_out[:, :-1].argmax(-1) == batch[:, 1:]).mean())
    print(f"  merged model on task B: loss {float(xent(merged_out, batch)):.4f}, next-token accuracy {acc:.3f}")
    print(f"  max |merged - unmerged| = {diff:.3e}")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return diff


if __name__ == "__main__":
    main()
