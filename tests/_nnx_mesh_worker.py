"""Subprocess side of tests/test_nnx_mesh.py: 8 CPU devices, NNX models on a data x fsdp x tp mesh.

Runs the README's NNX mesh example verbatim (the ``README`` text), then, per method, adapts an NNX model
whose kernels are sharded by ``nnx.with_partitioning`` and takes one ``nnx.jit`` AdamW step through
``jaxpeft.nnx.optimizer`` on the mesh and on one device. Prints one JSON line of results; the test asserts on it.
Run as ``python tests/_nnx_mesh_worker.py``.
"""

import json
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxpeft  # noqa: E402
import jaxpeft.nnx  # noqa: E402
import jaxpeft.sharding  # noqa: E402

#: The NNX mesh example of docs/guides/scaling.md, run verbatim by ``readme_example``; test_nnx_mesh.py checks that
#: the guide's block equals this text.
README = """\
import jax, optax, jaxpeft, jaxpeft.nnx
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 3)

class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        column = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("fsdp", "tp"))   # FSDP + TP
        row = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("tp", "fsdp"))
        self.up = nnx.Linear(16, 64, kernel_init=column, rngs=rngs)
        self.down = nnx.Linear(64, 16, kernel_init=row, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))

with jax.set_mesh(mesh):
    model = MLP(nnx.Rngs(0))                                                    # kernels placed on the mesh
cfg = jaxpeft.LoraConfig(rank=4, alpha=8, targets=["up", "down"])
model = jaxpeft.nnx.adapt(model, cfg, key=jax.random.key(1))                   # adapters placed like their kernels
optimizer = jaxpeft.nnx.optimizer(model, optax.adamw(1e-2))                    # mu and nu sharded like the adapters
specs = nnx.get_partition_spec(nnx.state(model, jaxpeft.nnx.AdapterParam))     # e.g. for nnx.jit in_shardings
print(specs["up"]["a"].get_value(), specs["up"]["b"].get_value())              # P('fsdp', None) P(None, 'tp')

@nnx.jit
def train_step(model, optimizer, x, y):
    def loss_fn(model):
        return ((model(x) - y) ** 2).mean()
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, jaxpeft.nnx.AdapterParam))(model)
    optimizer.update(model, grads)
    return loss

batch = NamedSharding(mesh, P("data"))                                         # the batch split over `data`
x = jax.device_put(jax.random.normal(jax.random.key(2), (8, 16)), batch)
y = jax.device_put(jax.random.normal(jax.random.key(3), (8, 16)), batch)
loss = train_step(model, optimizer, x, y)                                      # adapters, mu, nu keep their shardings
"""


def readme_example() -> dict:
    """Runs ``README`` as it is and reports what it printed, its loss and the shardings after its step."""
    ns: dict = {}
    exec(README, ns)
    model, optimizer, specs = ns["model"], ns["optimizer"], ns["specs"]
    return {
        "printed": [str(specs["up"]["a"].get_value()), str(specs["up"]["b"].get_value())],
        "loss": float(ns["loss"]),
        "specs_after": {path: spec_of(value) for path, value in adapter_arrays(model).items()},
        "opt_specs_after": opt_specs(optimizer),
    }


def spec_of(x) -> str:
    """The array's spec padded to its rank (``P('fsdp',)`` and ``P('fsdp', None)`` are one sharding), or the name
    of a sharding that is not a ``NamedSharding``."""
    sharding = x.sharding
    if not isinstance(sharding, NamedSharding):
        return type(sharding).__name__
    spec = tuple(sharding.spec)
    return str(P(*spec, *([None] * (x.ndim - len(spec)))))


def adapter_arrays(model) -> dict:
    """``{"path/field": array}`` over the model's adapter variables (``AdapterParam`` and ``AdapterFrozen``)."""
    state = nnx.state(model, nnx.Any(jaxpeft.nnx.AdapterParam, jaxpeft.nnx.AdapterFrozen))
    return {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}


def opt_specs(optimizer) -> dict:
    """The sharding spec of each optimizer-state array that is not a scalar (``mu``/``nu``), by path."""
    flat = nnx.to_flat_state(nnx.state(optimizer, nnx.OptState))
    return {"/".join(map(str, p)): spec_of(v.get_value()) for p, v in flat if np.ndim(v.get_value()) > 0}


D, H, F, V, B, T = 16, 4, 32, 24, 8, 6
INIT = nnx.initializers.normal(0.3)


def part(init, *names):
    return nnx.with_partitioning(init, names)


class Net(nnx.Module):
    """Embedding, a pre-norm attention block over LinearGeneral heads, an MLP and an output head: FSDP + TP."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(V, D, embedding_init=part(INIT, None, "tp"), rngs=rngs)
        self.norm = nnx.LayerNorm(
            D, scale_init=part(nnx.initializers.ones, "tp"), bias_init=part(INIT, "tp"), rngs=rngs
        )
        heads = {"kernel_init": part(INIT, "fsdp", "tp", None), "bias_init": part(INIT, "tp", None)}
        self.q, self.k, self.v = (nnx.LinearGeneral(D, (H, D // H), **heads, rngs=rngs) for _ in range(3))
        self.o = nnx.LinearGeneral(
            (H, D // H), D, axis=(-2, -1), kernel_init=part(INIT, "tp", None, "fsdp"), use_bias=False, rngs=rngs
        )
        self.up = nnx.Linear(D, F, kernel_init=part(INIT, "fsdp", "tp"), bias_init=part(INIT, "tp"), rngs=rngs)
        self.down = nnx.Linear(F, D, kernel_init=part(INIT, "tp", "fsdp"), use_bias=False, rngs=rngs)
        self.head = nnx.Linear(D, V, kernel_init=part(INIT, "fsdp", "tp"), use_bias=False, rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids)
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        att = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(D // H), axis=-1)
        x = x + self.o(jnp.einsum("bhts,bshd->bthd", att, v))
        x = x + self.down(jax.nn.gelu(self.up(x)))
        return self.head(x)


def build(mesh):
    """The same model (same values) on ``mesh``, or on one device for ``None`` (partition metadata unused)."""
    if mesh is None:
        with nnx.use_eager_sharding(False):
            return Net(nnx.Rngs(0))
    with jax.set_mesh(mesh):
        return Net(nnx.Rngs(0))


IDS = np.random.default_rng(0).integers(0, V, (B, T)).astype(np.int32)
WHICH = np.asarray([0, 1, 2, 1, 0, 2, 2, 1], np.int32)  # a mixed batch over a bank of three adapters


def adapted(cfg, mesh, bank):
    """The model with non-zero adapters (every factor gets a gradient); a bank of three through ``attach``."""
    model = build(mesh)
    if not bank:
        model = jaxpeft.nnx.adapt(model, cfg, key=jax.random.key(1))
        jaxpeft.nnx.load_adapters(model, jax.tree.map(lambda x: x + 0.05, jaxpeft.nnx.adapters_of(model)))
        return model
    single = jaxpeft.nnx.adapters_of(jaxpeft.nnx.adapt(model, cfg, key=jax.random.key(1)))
    named = {f"a{i}": jax.tree.map(lambda x, i=i: (x + 0.05) * (1 + 0.3 * i), single) for i in range(3)}
    model = jaxpeft.nnx.attach(model, jaxpeft.stack_adapters(named))
    jaxpeft.nnx.set_adapter_ids(model, WHICH)
    return model


@nnx.jit
def train_step(model, optimizer, ids):
    def loss_fn(model):
        logits = model(ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, jaxpeft.nnx.AdapterParam))(model)
    optimizer.update(model, grads)
    return loss


def variable_specs(model) -> dict:
    """``{state path: (array spec, nnx.get_partition_spec)}`` of every adapter variable: the metadata users build
    shardings from must say where the array is."""
    state = nnx.state(model, nnx.Any(jaxpeft.nnx.AdapterParam, jaxpeft.nnx.AdapterFrozen))
    metadata = dict(nnx.to_flat_state(nnx.get_partition_spec(state)))
    return {
        "/".join(map(str, p)): (spec_of(v.get_value()), padded(metadata[p].get_value(), v.get_value().ndim))
        for p, v in nnx.to_flat_state(state)
    }


def canonical_specs(model) -> tuple[dict, dict]:
    """The adapters' specs and those ``jaxpeft.sharding.adapter_specs`` derives from the base params' own
    shardings, both keyed ``canonical/weight/path/field``."""
    adapters = jaxpeft.nnx.adapters_of(model)
    derived = jaxpeft.sharding.adapter_specs(adapters, jaxpeft.nnx.base_params(model))
    got, want = {}, {}
    for (path, node), (_, specs) in zip(jaxpeft.adapter_items(adapters), jaxpeft.adapter_items(derived), strict=True):
        arrays = dict(jaxpeft._paths.leaves_with_paths(node))
        for field, spec in jaxpeft._paths.leaves_with_paths(specs, is_leaf=lambda x: isinstance(x, P)):
            got[f"{path}/{field}"] = spec_of(arrays[field])
            want[f"{path}/{field}"] = padded(spec, arrays[field].ndim)
    return got, want


def padded(spec, ndim) -> str:
    return str(P(*tuple(spec), *([None] * (ndim - len(spec)))))


def case(cfg, bank=False) -> dict:
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    model = adapted(cfg, mesh, bank)
    got, want = canonical_specs(model)
    variables = variable_specs(model)
    before = {p: spec for p, (spec, _) in variables.items()}
    optimizer = jaxpeft.nnx.optimizer(model, optax.adamw(1e-2))
    opt_before = opt_specs(optimizer)
    loss = train_step(model, optimizer, jax.device_put(IDS, NamedSharding(mesh, P("data"))))
    after = adapter_arrays(model)

    ref = adapted(cfg, None, bank)
    ref_loss = train_step(ref, jaxpeft.nnx.optimizer(ref, optax.adamw(1e-2)), IDS)
    ref_after = adapter_arrays(ref)

    def follows(opt_path: str, spec: str) -> bool:  # the moments of adapter `path` sit at .../mu/<path>
        owners = [p for p in before if opt_path.endswith("/" + p)]
        return len(owners) == 1 and before[owners[0]] == spec

    return {
        "specs": got,
        "expected": want,
        "metadata_is_placement": all(spec == meta for spec, meta in variables.values()),
        "opt_sharded_like_adapters": len(opt_before) >= 2 and all(follows(p, s) for p, s in opt_before.items()),
        "kept": {p: spec_of(x) for p, x in after.items()} == before,
        "opt_kept": opt_specs(optimizer) == opt_before,
        "loss_diff": abs(float(loss) - float(ref_loss)),
        "adapter_diff": max(float(np.max(np.abs(np.asarray(after[p]) - np.asarray(ref_after[p])))) for p in after),
        "ref_unsharded": all(not isinstance(x.sharding, NamedSharding) for x in ref_after.values()),
    }


CASES = {
    "lora": jaxpeft.LoraConfig(rank=3, alpha=6, targets="all-linear"),
    "dora": jaxpeft.DoraConfig(rank=3, alpha=6, targets=["q", "v", "up", "down"]),
    "ia3": jaxpeft.IA3Config(targets=["k", "v", "down"], feedforward=["down"]),
    # not k/bias: softmax ignores a key bias, so its gradient is 0 up to rounding, which Adam's first step amplifies
    "bitfit": jaxpeft.BitFitConfig(targets=r"(norm|q|v|up)/bias$"),
    "bank:lora": jaxpeft.LoraConfig(rank=3, alpha=6, targets=["q", "v", "up", "down"]),
}


class Pair(nnx.Module):
    """Two Linear layers whose kernels carry the partition names given (mesh axes or logical names)."""

    def __init__(self, up: tuple, down: tuple, rngs: nnx.Rngs, features: int = F):
        self.up = nnx.Linear(D, features, kernel_init=part(INIT, *up), use_bias=False, rngs=rngs)
        self.down = nnx.Linear(features, D, kernel_init=part(INIT, *down), use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


class Stack(nnx.Module):
    """Three Linear layers stacked by ``nnx.vmap`` (kernel ``(3, D, D)``, P(None, fsdp, tp)), run by ``nnx.scan``."""

    def __init__(self, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
        def make(rngs):
            return nnx.Linear(D, D, kernel_init=part(INIT, "fsdp", "tp"), use_bias=False, rngs=rngs)

        self.layers = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata={nnx.PARTITION_NAME: None})
        def body(x, layer):
            return jnp.tanh(layer(x))

        return body(x, self.layers)


LORA = jaxpeft.LoraConfig(rank=2, targets=["up", "down"])
KEY = jax.random.key(1)


def lora_specs(model) -> dict:
    """``{"up/a": (array spec, out_sharding metadata), ...}`` of a ``Pair``/``Stack`` model's LoRA arrays."""
    flat = nnx.to_flat_state(nnx.state(model, jaxpeft.nnx.AdapterParam))
    return {"/".join(map(str, p)): (spec_of(v.get_value()), str(v.get_metadata("out_sharding", None))) for p, v in flat}


def extras() -> dict:
    """Where the specs come from when the arrays do not say, logical names, divisibility, explicit meshes, stacks."""
    out = {}
    auto = (jax.sharding.AxisType.Auto,) * 3
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tp"), axis_types=auto)
    mesh_names = (("fsdp", "tp"), ("tp", "fsdp"))

    # kernels not placed (eager sharding off) but annotated: the specs come from the metadata on the current mesh
    with jax.set_mesh(mesh), nnx.use_eager_sharding(False):
        plain = Pair(*mesh_names, rngs=nnx.Rngs(0))
        model = jaxpeft.nnx.adapt(plain, LORA, key=KEY)
    annotated = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(plain, nnx.Param)))
    derived = jaxpeft.sharding.adapter_specs(jaxpeft.nnx.adapters_of(model), annotated)
    out["metadata_only"] = {
        "kernel": spec_of(plain.up.kernel.get_value()),
        "specs": lora_specs(model),
        "derived": [padded(s, 2) for s in jax.tree.leaves(derived, is_leaf=lambda x: isinstance(x, P))],
    }
    # no mesh anywhere: unsharded as before, and no sharding metadata
    with nnx.use_eager_sharding(False):
        model = jaxpeft.nnx.adapt(Pair(*mesh_names, rngs=nnx.Rngs(0)), LORA, key=KEY)
    out["no_mesh"] = {"specs": lora_specs(model), "metadata": [str(s) for s in metadata_of(model)]}

    # logical names: the adapters keep the kernel's own names where the rules resolve them, mesh names otherwise
    rules = (("embed", "fsdp"), ("mlp", "tp"))
    logical = (("embed", "mlp"), ("mlp", "embed"))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        plain = Pair(*logical, rngs=nnx.Rngs(0))
        inside = jaxpeft.nnx.adapt(plain, LORA, key=KEY)
        resolved = [str(s) for s in metadata_of(inside)]
    outside = jaxpeft.nnx.adapt(plain, LORA, key=KEY)
    out["logical"] = {"inside": lora_specs(inside), "resolved": resolved, "outside": lora_specs(outside)}
    with nnx.use_eager_sharding(False):  # not placed, and no rules to resolve the names on the mesh: refused
        plain = Pair(*logical, rngs=nnx.Rngs(0))
    with jax.set_mesh(mesh):
        try:
            jaxpeft.nnx.adapt(plain, LORA, key=KEY)
            out["unresolved_error"] = None
        except ValueError as err:
            out["unresolved_error"] = str(err)

    # an axis the mesh does not divide (B's fan-out 6 on tp=4) is replicated, in the placement and the metadata
    narrow = jax.make_mesh((1, 2, 4), ("data", "fsdp", "tp"), axis_types=auto)
    with jax.set_mesh(narrow), nnx.use_eager_sharding(False):
        out["odd"] = lora_specs(jaxpeft.nnx.adapt(Pair(*mesh_names, rngs=nnx.Rngs(0), features=6), LORA, key=KEY))

    # PiSSA: the residual kernels stay where the kernels were, the adapters are placed like them
    with jax.set_mesh(mesh):
        plain = Pair(*mesh_names, rngs=nnx.Rngs(0))
    model = jaxpeft.nnx.adapt(plain, jaxpeft.LoraConfig(rank=2, targets=["up", "down"], init="pissa"), key=KEY)
    kernels = {name: getattr(model, name).base.kernel.get_value() for name in ("up", "down")}
    out["pissa"] = {
        "kernels": {name: spec_of(k) for name, k in kernels.items()},
        "changed": bool(jnp.any(kernels["up"] != plain.up.kernel.get_value())),
        "specs": lora_specs(model),
    }

    # an Explicit-axes mesh (jax.make_mesh's default)
    explicit = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tp"))
    with jax.set_mesh(explicit):
        plain = Pair(*mesh_names, rngs=nnx.Rngs(0))
    out["explicit"] = lora_specs(jaxpeft.nnx.adapt(plain, LORA, key=KEY))

    # nnx.vmap stacks: the stack axis follows the kernel's; nnx.scan slices the adapters with their metadata
    with jax.set_mesh(mesh):
        plain = Stack(nnx.Rngs(0))
    model = jaxpeft.nnx.adapt(plain, jaxpeft.LoraConfig(rank=2, targets=["layers"]), key=KEY)
    x = jax.random.normal(jax.random.key(4), (B, D))
    out["stack"] = {
        "specs": {p: spec_of(x) for p, x in adapter_arrays(model).items()},
        "metadata": [str(s) for s in metadata_of(model)],
        "identity": float(jnp.max(jnp.abs(nnx.jit(lambda m, x: m(x))(model, x) - plain(x)))),
    }
    return out


def metadata_of(model) -> list:
    """``nnx.get_partition_spec`` of each adapter variable, in state order."""
    state = nnx.state(model, jaxpeft.nnx.AdapterParam)
    return [v.get_value() for _, v in nnx.to_flat_state(nnx.get_partition_spec(state))]


if __name__ == "__main__":
    out = {"readme": readme_example(), "extras": extras()}
    for name, cfg in CASES.items():
        out[name] = case(cfg, bank=name.startswith("bank:"))
    print(json.dumps(out))
    sys.stdout.flush()
