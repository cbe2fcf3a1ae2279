"""What tests/test_multihost.py and its two worker processes share: model, data, config and the train step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

import jaxpeft
import jaxpeft.linen
import jaxpeft.nnx

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


class NnxNet(nnx.Module):
    """``Net`` in NNX: the same parameter paths, each weight annotated with its spec of ``specs()``."""

    def __init__(self, rngs: nnx.Rngs):
        def part(*names):
            return nnx.with_partitioning(nnx.initializers.normal(0.5), names)

        self.embed = nnx.Embed(V, D, embedding_init=part(None, None), rngs=rngs)
        self.up = nnx.Linear(D, F, use_bias=False, kernel_init=part(None, "tp"), rngs=rngs)
        self.down = nnx.Linear(F, D, use_bias=False, kernel_init=part("tp", None), rngs=rngs)
        self.head = nnx.Linear(D, V, use_bias=False, kernel_init=part(None, None), rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids)
        x = x + self.down(jnp.tanh(self.up(x)))
        return self.head(x)


def nnx_model(params: dict) -> NnxNet:
    """``NnxNet`` holding ``params`` (the ``host_params()`` tree, as given: placed on a mesh or not)."""
    with nnx.use_eager_sharding(False):  # no throwaway random init placed on the mesh; the values come next
        model = NnxNet(nnx.Rngs(0))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        var.set_value(params[path[0]][path[1]])
    return model


@nnx.jit
def nnx_step(model, opt, ids):
    def loss_fn(m):
        logits = m(ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, jaxpeft.nnx.AdapterParam))(model)
    opt.update(model, grads)
    return loss
