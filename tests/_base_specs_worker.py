"""Subprocess side of tests/test_base_specs.py: 8 CPU devices, a tiny Llama placed by base_specs, one LoRA step.

The base is placed on a (2, 2, 2) ``data × fsdp × tp`` mesh with ``jaxpeft.sharding.base_specs`` (no hand-written
table), the adapters are born sharded like it, and one AdamW step must equal the same step on one device. Prints one
JSON line of results; the test asserts on it. Run as ``python tests/_base_specs_worker.py``.
"""

import json
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxpeft  # noqa: E402
import jaxpeft.linen  # noqa: E402
import jaxpeft.sharding  # noqa: E402
from tests._mesh_llama import CFG, TX, make_step, mesh_llama, nonzero  # noqa: E402

CONFIG, MODEL, IDS, PARAMS, LAYOUTS = mesh_llama(hidden=32, mlp=48, std=0.2)


step = make_step(MODEL)


def reference():
    dev = jax.devices()[0]
    params = jax.device_put(PARAMS, dev)
    adapters = nonzero(jaxpeft.init(CFG, params, key=jax.random.key(2), layouts=LAYOUTS))
    new, _, loss = jax.jit(step)(adapters, jax.jit(TX.init)(adapters), params, jax.device_put(IDS, dev))
    return float(loss), jax.tree.leaves(new)


def sharded():
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tp"))
    specs = jaxpeft.sharding.base_specs(PARAMS, LAYOUTS, mesh=mesh)
    params = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), PARAMS, specs)
    ids = jax.device_put(IDS, NamedSharding(mesh, P(("data", "fsdp"))))
    adapters = nonzero(jaxpeft.sharding.init(CFG, params, key=jax.random.key(2), layouts=LAYOUTS))
    shardings = jaxpeft.sharding.adapter_shardings(adapters, params)
    opt = jaxpeft.sharding.init_optimizer(TX, adapters, shardings)
    train = jax.jit(step, out_shardings=(shardings, jax.tree.map(lambda x: x.sharding, opt), None))
    new, _, loss = train(adapters, opt, params, ids)
    layers = params["model"]["layers"]
    q = layers["self_attn"]["q_proj"]["kernel"]
    lora = adapters["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    return {
        "q_proj": str(q.sharding.spec),
        "q_proj_shard": list(q.addressable_shards[0].data.shape),
        "down_proj": str(layers["mlp"]["down_proj"]["kernel"].sharding.spec),
        "embedding": str(params["model"]["embed_tokens"]["embedding"].sharding.spec),
        "q_proj_a_b": [str(lora.a.sharding.spec), str(lora.b.sharding.spec)],
        "loss": float(loss),
        "adapters": jax.tree.leaves(new),
    }


if __name__ == "__main__":
    ref_loss, ref_adapters = reference()
    out = sharded()
    out["loss_diff"] = abs(out.pop("loss") - ref_loss)
    out["adapter_diff"] = max(
        float(jnp.max(jnp.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(out.pop("adapters"), ref_adapters, strict=True)
    )
    print(json.dumps(out))
    sys.stdout.flush()
