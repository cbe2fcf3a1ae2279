"""What tests/test_multihost.py and its two worker processes share: model, data, config and the train step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

import jaxpeft
import jaxpeft.linen

D, F, V, B, T, STEPS = 8, 16, 12, 4, 5, 3


class Net(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(V, D, name="embed")(ids)
        x = x + nn.Dense(D, use_bias=False, name="down")(jnp.tanh(nn.Dense(F, use_bias=False, name="up")(x)))
        return nn.Dense(V, use_bias=False, name="head")(x)


MODEL = Net()
IDS = np.zeros((B, T), np.int32)
CFG = jaxpeft.LoraConfig(rank=2, alpha=4, targets=["up", "down"])
TX = optax.adam(1e-2)
LAYOUTS = jaxpeft.linen.infer_layouts(MODEL, jax.ShapeDtypeStruct(IDS.shape, jnp.int32))


def host_params() -> dict:
    shapes = jax.eval_shape(MODEL.init, jax.random.key(0), jax.ShapeDtypeStruct(IDS.shape, jnp.int32))["params"]
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: (0.5 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def specs() -> dict:
    return {
        "embed": {"embedding": P()},
        "up": {"kernel": P(None, "tp")},
        "down": {"kernel": P("tp", None)},
        "head": {"kernel": P()},
    }


def batches() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.integers(0, V, (B, T)).astype(np.int32) for _ in range(STEPS)]


def step(adapters, opt, params, ids):
    def loss_fn(a):
        logits = jaxpeft.linen.apply(MODEL, {"params": params}, a, ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(adapters)
    updates, opt = TX.update(grads, opt, adapters)
    return optax.apply_updates(adapters, updates), opt, loss
