"""Subprocess side of tests/test_sharding.py: 8 CPU devices, meshes data x fsdp x tp, a sharded LoRA/DoRA step.

Prints one JSON line of results; the test asserts on it. Run as ``python tests/_sharding_worker.py``.
"""

import json
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxpeft  # noqa: E402
import jaxpeft.linen  # noqa: E402
import jaxpeft.sharding  # noqa: E402

D, F, V, L, B, T = 16, 32, 24, 2, 8, 6


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.LayerNorm(name="norm")(x)
        q, k, v = (nn.Dense(F, use_bias=False, name=n)(h) for n in ("q", "k", "v"))
        att = jax.nn.softmax(jnp.einsum("btf,bsf->bts", q, k) / np.sqrt(F), axis=-1) @ v
        x = x + nn.Dense(D, use_bias=False, name="o")(att)
        return x + nn.Dense(D, use_bias=False, name="down")(nn.gelu(nn.Dense(F, use_bias=False, name="up")(x))), None


class Net(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(V, D, name="embed")(ids)
        stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=L)
        x, _ = stack(name="layers")(x, None)
        return nn.Dense(V, use_bias=False, name="head")(x)


def base_spec(path: str, leaf) -> P:
    name = path.split("/")
    if path.startswith("layers/") and name[-1] == "kernel":
        return P(None, "fsdp", "tp") if name[-2] in ("q", "k", "v", "up") else P(None, "tp", "fsdp")
    if path == "head/kernel":
        return P("fsdp", "tp")
    if path == "embed/embedding":
        return P(None, "tp")
    return P()


MODEL = Net()
IDS = jnp.asarray(np.random.default_rng(0).integers(0, V, (B, T)))
SHAPES = jax.eval_shape(MODEL.init, jax.random.key(0), IDS)["params"]
RNG = np.random.default_rng(1)
PARAMS = jax.tree.map(lambda s: RNG.standard_normal(s.shape).astype(np.float32) * 0.3, SHAPES)
SPECS = jaxpeft._paths.map_with_paths(base_spec, SHAPES)
TX = optax.adamw(1e-2)


WHICH = jnp.asarray([0, 1, 2, 1, 0, 2, 2, 1], jnp.int32)  # a mixed batch over a bank of three adapters


def loss_fn(adapters, params, ids, which=None):
    logits = jaxpeft.linen.apply(MODEL, {"params": params}, adapters, ids, adapter_ids=which)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def start(cfg, params, init):
    """The adapters a run starts from: non-zero so every factor gets a gradient; a bank of three for ``bank:``."""
    adapters = jax.tree.map(lambda x: x + 0.05, init(cfg, params, key=jax.random.key(2), layouts=LAYOUTS))
    if not BANK:
        return adapters
    named = {f"a{i}": jax.tree.map(lambda x, i=i: x * (1 + 0.3 * i), adapters) for i in range(3)}
    return jaxpeft.stack_adapters(named, grouping=BANK)


def step(adapters, opt, params, ids):
    loss, grads = jax.value_and_grad(loss_fn)(adapters, params, ids, WHICH if BANK else None)
    updates, opt = TX.update(grads, opt, adapters)
    return optax.apply_updates(adapters, updates), opt, loss


def moments(opt):
    """The AdamW first moments, one per trainable adapter leaf (inside ``jaxpeft.freeze``'s partition if any)."""
    found = [s for s in jax.tree.leaves(opt, is_leaf=lambda s: hasattr(s, "mu")) if hasattr(s, "mu")]
    return jax.tree.leaves(found[0].mu)


def specs_of(tree):
    return [str(getattr(x, "sharding", x).spec) for x in jax.tree.leaves(tree)]


def run(cfg, shape):
    mesh = Mesh(np.array(jax.devices()).reshape(shape), ("data", "fsdp", "tp"))
    params = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), PARAMS, SPECS)
    ids = jax.device_put(IDS, NamedSharding(mesh, P("data")))
    adapters = start(cfg, params, jaxpeft.sharding.init)
    if BANK:  # a bank stacked from sharded adapters is placed with the shardings derived for it
        adapters = jax.device_put(adapters, jaxpeft.sharding.adapter_shardings(adapters, params))
    shardings = jaxpeft.sharding.adapter_shardings(adapters, params)
    opt = jaxpeft.sharding.init_optimizer(TX, adapters, shardings)
    opt_shardings = jax.tree.map(lambda x: x.sharding, opt)
    train = jax.jit(step, donate_argnums=(0, 1), out_shardings=(shardings, opt_shardings, None))
    compiled = train.lower(adapters, opt, params, ids).compile()
    hlo = compiled.as_text()
    gathers = [line.split("all-gather(")[0].split("=")[1].strip() for line in hlo.splitlines() if "all-gather(" in line]
    before = specs_of(adapters)
    new_adapters, new_opt, loss = compiled(adapters, opt, params, ids)
    return {
        "derived": specs_of(shardings) == before,
        "out_specs_kept": specs_of(new_adapters) == before,
        "opt_sharded_like_adapters": [str(m.sharding.spec) for m in moments(new_opt)]
        == specs_of(jaxpeft.partition(adapters, True)[0]),
        "all_gathers": gathers,
        "base_shapes": sorted(
            {f"f32[{','.join(map(str, x.shape[i:]))}]" for x in jax.tree.leaves(PARAMS) for i in (0, 1)}
        ),
        "loss": float(loss),
        "adapters": [np.asarray(x).tolist() for x in jax.tree.leaves(new_adapters)],
        "table": jaxpeft.sharding.describe(adapters),
    }


def reference(cfg):
    dev = jax.devices()[0]
    params = jax.device_put(PARAMS, dev)
    adapters = start(cfg, params, jaxpeft.init)
    new_adapters, _, loss = jax.jit(step)(adapters, jax.jit(TX.init)(adapters), params, jax.device_put(IDS, dev))
    return float(loss), [np.asarray(x).tolist() for x in jax.tree.leaves(new_adapters)]


LAYOUTS = jaxpeft.linen.infer_layouts(MODEL, IDS)
BANK: str | None = None  # the grouping of a ``bank:`` case, None for one adapter
# every method on one mesh; ``bank:`` a mixed batch over three adapters, ids sharded along ``data``, on the bank's
# default (grouped rows) path, ``bank-ragged:`` on grouped matmuls (jax.lax.ragged_dot), ``bank-vmap:`` the reference
FAMILY = {
    "ia3": jaxpeft.IA3Config(targets=["k", "v", "down"], feedforward=["down"]),
    "loha": jaxpeft.LohaConfig(rank=2, alpha=4, targets=["q", "v", "up", "down"]),
    "lokr": jaxpeft.LokrConfig(rank=2, alpha=4, targets=["q", "v", "up", "down"]),
    "vera": jaxpeft.VeraConfig(rank=4, targets=["q", "v", "up"]),
    "bitfit": jaxpeft.BitFitConfig(targets=r"bias$"),  # the norms' biases (the model's Dense layers have none)
    "ln_tuning": jaxpeft.LNTuningConfig(),
    "lora_fa": jaxpeft.LoraFAConfig(rank=3, alpha=6, targets="all-linear"),  # a frozen field: A
    "vera_stored": jaxpeft.VeraConfig(rank=4, targets=["q", "v", "up"], store_projections=True),
    "bank:lora": jaxpeft.LoraConfig(rank=3, alpha=6, targets="all-linear"),
    "bank:dora": jaxpeft.DoraConfig(rank=3, alpha=6, targets=["q", "v", "up", "down"]),
    "bank-ragged:lora": jaxpeft.LoraConfig(rank=3, alpha=6, targets="all-linear"),
    "bank-vmap:lora": jaxpeft.LoraConfig(rank=3, alpha=6, targets="all-linear"),
}
#: Methods with frozen fields train through jaxpeft.freeze: no update and no optimizer state for those fields.
FROZEN_FIELDS = ("lora_fa", "vera_stored")

if __name__ == "__main__":
    out = {}
    for name, cfg in {
        "lora": jaxpeft.LoraConfig(rank=3, alpha=6, targets="all-linear"),
        "dora": jaxpeft.DoraConfig(rank=3, alpha=6, targets=["q", "v", "up", "down"]),
        **FAMILY,
    }.items():
        BANK = {"bank": "auto", "bank-ragged": "ragged", "bank-vmap": "vmap"}.get(name.split(":")[0])
        TX = jaxpeft.freeze(optax.adamw(1e-2), True) if name in FROZEN_FIELDS else optax.adamw(1e-2)
        ref_loss, ref_adapters = reference(cfg)
        for shape in ((8, 1, 1), (2, 2, 2), (1, 2, 4)) if name in ("lora", "dora") else ((2, 2, 2),):
            res = run(cfg, shape)
            res["loss_diff"] = abs(res["loss"] - ref_loss)
            res["adapter_diff"] = max(
                float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(res.pop("adapters"), ref_adapters, strict=True)
            )
            out[f"{name}-{'x'.join(map(str, shape))}"] = res
    explicit = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tp"), axis_types=(jax.sharding.AxisType.Explicit,) * 3)
    with jax.sharding.set_mesh(explicit):
        params = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(explicit, s)), PARAMS, SPECS)
        lora = jaxpeft.LoraConfig(rank=3, alpha=6, targets="all-linear")
        adapters = jaxpeft.sharding.init(lora, params, key=jax.random.key(2), layouts=LAYOUTS)
        out["explicit"] = specs_of(adapters) == specs_of(jaxpeft.sharding.adapter_shardings(adapters, params))
        out["explicit_a"] = str(adapters["layers"]["q"]["kernel"].a.sharding.spec)
    mesh = Mesh(np.array(jax.devices()).reshape(1, 2, 4), ("data", "fsdp", "tp"))
    odd = {"w": {"kernel": jax.ShapeDtypeStruct((16, 6), jnp.float32)}}
    odd_adapters = jax.eval_shape(
        lambda: jaxpeft.init(jaxpeft.LoraConfig(rank=3, targets=["w"]), odd, key=jax.random.key(0))
    )
    specs = jaxpeft.sharding.adapter_specs(odd_adapters, {"w": {"kernel": P("fsdp", "tp")}}, mesh=mesh)
    out["odd"] = [str(s) for s in jax.tree.leaves(specs)]
    print(json.dumps(out))
    sys.stdout.flush()
