"""Subprocess side of tests/test_moe.py's mesh test: 8 CPU devices, the example MoE on a ``data × expert`` mesh.

The expert kernels ``(layers, experts, in, out)`` are sharded along an ``expert`` mesh axis (the rest of the base
replicated, batch on ``data``); the LoRA adapters are born sharded from them (``jaxpeft.sharding.init``: one expert's
A and B on the device that holds its kernel), and two AdamW steps must equal the same steps on one device. Prints one
JSON line of results; the test asserts on it. Run as ``python tests/_moe_mesh_worker.py``.
"""

import json
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxpeft  # noqa: E402
import jaxpeft.linen  # noqa: E402
import jaxpeft.sharding  # noqa: E402
from examples.models import moe  # noqa: E402

CONFIG = moe.MoeConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=4,
    num_experts_per_tok=2,
)
MODEL = moe.MoeForCausalLM(CONFIG)
IDS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (4, 8)).astype(np.int32)
_shapes = jax.eval_shape(MODEL.init, jax.random.key(0), IDS)["params"]
_rng = np.random.default_rng(1)
PARAMS = jax.tree.map(lambda s: (_rng.standard_normal(s.shape) * 0.2).astype(np.float32), _shapes)
LAYOUTS = jaxpeft.linen.infer_layouts(MODEL, IDS)
CFG = jaxpeft.LoraConfig(rank=2, alpha=4, targets=["q_proj", "v_proj", "gate", "gate_up_proj", "down_proj"])
TX = optax.adamw(1e-2)
EXPERTS = ("gate_up_proj", "down_proj")


def loss_fn(adapters, params, ids):
    logits = jaxpeft.linen.apply(MODEL, {"params": params}, adapters, ids)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def step(adapters, opt, params, ids):
    loss, grads = jax.value_and_grad(loss_fn)(adapters, params, ids)
    updates, opt = TX.update(grads, opt, adapters)
    return optax.apply_updates(adapters, updates), opt, loss


def nonzero(adapters):
    return jax.tree.map(lambda x: x + 0.05, adapters)


def train(adapters, opt, params, ids, jitted):
    losses = []
    for _ in range(2):
        adapters, opt, loss = jitted(adapters, opt, params, ids)
        losses.append(float(loss))
    return adapters, losses


def reference():
    dev = jax.devices()[0]
    params = jax.device_put(PARAMS, dev)
    adapters = nonzero(jaxpeft.init(CFG, params, key=jax.random.key(2), layouts=LAYOUTS))
    new, losses = train(adapters, jax.jit(TX.init)(adapters), params, jax.device_put(IDS, dev), jax.jit(step))
    return losses, jax.tree.leaves(new)


def sharded():
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "expert"))
    specs = jaxpeft.sharding.base_specs(PARAMS, LAYOUTS, mesh=mesh)  # no fsdp/tp axes: replicated
    experts = specs["model"]["layers"]["mlp"]["experts"]
    for name in EXPERTS:  # (layers, experts, in, out): the expert axis on the `expert` mesh axis
        experts[name]["kernel"] = P(None, "expert", None, None)
    params = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), PARAMS, specs)
    ids = jax.device_put(IDS, NamedSharding(mesh, P("data")))
    adapters = nonzero(jaxpeft.sharding.init(CFG, params, key=jax.random.key(2), layouts=LAYOUTS))
    shardings = jaxpeft.sharding.adapter_shardings(adapters, params)
    opt = jaxpeft.sharding.init_optimizer(TX, adapters, shardings)
    jitted = jax.jit(step, out_shardings=(shardings, jax.tree.map(lambda x: x.sharding, opt), None))
    new, losses = train(adapters, opt, params, ids, jitted)
    kernel = params["model"]["layers"]["mlp"]["experts"]["gate_up_proj"]["kernel"]
    lora = new["model"]["layers"]["mlp"]["experts"]["gate_up_proj"]["kernel"]
    return {
        "kernel": str(kernel.sharding.spec),
        "kernel_shard": list(kernel.addressable_shards[0].data.shape),
        "a_b": [str(lora.a.sharding.spec), str(lora.b.sharding.spec)],
        "a_shard": list(lora.a.addressable_shards[0].data.shape),
        "losses": losses,
        "adapters": jax.tree.leaves(new),
    }


if __name__ == "__main__":
    ref_losses, ref_adapters = reference()
    out = sharded()
    out["ref_losses"] = ref_losses
    out["loss_diff"] = max(abs(a - b) for a, b in zip(out["losses"], ref_losses, strict=True))
    out["adapter_diff"] = max(
        float(jnp.max(jnp.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(out.pop("adapters"), ref_adapters, strict=True)
    )
    print(json.dumps(out))
    sys.stdout.flush()
