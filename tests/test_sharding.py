"""jaxpeft.sharding: adapter specs derived from the base weights'; a sharded step on 8 CPU devices equals one device."""

import json
import re
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

import jaxpeft
import jaxpeft.linen
import jaxpeft.sharding

WORKER = Path(__file__).with_name("_sharding_worker.py")


@pytest.fixture(scope="module")
def results():
    proc = subprocess.run([sys.executable, str(WORKER)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


MESHES = [f"{m}-{s}" for m in ("lora", "dora") for s in ("8x1x1", "2x2x2", "1x2x4")]
FAMILY = ("ia3", "loha", "lokr", "vera", "bitfit", "ln_tuning", "lora_fa", "vera_stored")
BANKS = ("bank:lora", "bank:dora", "bank-ragged:lora", "bank-vmap:lora")  # mixed batches on each path of a bank
MESHES += [f"{m}-2x2x2" for m in (*FAMILY, *BANKS)]  # every method


@pytest.mark.parametrize("case", MESHES)
def test_sharded_step_equals_one_device_and_keeps_shardings(results, case):
    r = results[case]
    assert r["derived"], "adapters were not created with the derived shardings"
    assert r["out_specs_kept"] and r["opt_sharded_like_adapters"], "the step resharded adapters or optimizer state"
    # one AdamW step of lr 1e-2 moves each entry by about lr·g/|g|: a bank's per-adapter gradients sum fewer
    # examples, so reduction-order rounding of its smaller entries shows more in the step (the loss is exact)
    assert r["loss_diff"] < 1e-5 and r["adapter_diff"] < (1e-3 if case.startswith("bank") else 1e-4)
    assert not set(r["all_gathers"]) & set(r["base_shapes"]), f"the base was all-gathered: {r['all_gathers']}"
    if case.endswith("8x1x1"):  # data parallel: the base is replicated, nothing is gathered at all
        assert r["all_gathers"] == []


def test_describe_shows_fsdp_and_tp_specs(results):
    rows = [
        re.match(r"^(\S+)\s+(\(.*?\))\s+(.*)$", line).groups()
        for line in results["lora-2x2x2"]["table"].splitlines()[1:]
    ]
    assert ("layers/q/kernel/a", "(2, 16, 3)", "P(None, 'fsdp', None)") in rows
    assert ("layers/q/kernel/b", "(2, 3, 32)", "P(None, None, 'tp')") in rows


def test_adapters_are_created_sharded_on_an_explicit_sharding_mesh(results):
    assert results["explicit"] and results["explicit_a"] == "P(None, 'fsdp', None)"


def test_an_axis_the_mesh_does_not_divide_is_replicated(results):
    assert results["odd"] == ["P('fsdp', None)", "P(None, None)"]  # B's fan-out 6 on tp=4


PARAMS = {
    "dense": {"kernel": jnp.ones((8, 4)), "bias": jnp.ones(4)},
    "heads": {"kernel": jnp.ones((8, 2, 4))},
    "conv": {"kernel": jnp.ones((3, 8, 4))},
}
LAYOUTS = {
    "heads/kernel": jaxpeft.Layout(fan_in=1, fan_out=2, kind="dense_general"),
    "conv/kernel": jaxpeft.Layout(fan_in=2, kind="conv"),
}
SPECS = {
    "dense": {"kernel": P("fsdp", "tp"), "bias": P("tp")},
    "heads": {"kernel": P("fsdp", "tp", None)},
    "conv": {"kernel": P(None, "fsdp", "tp")},
}


def specs(cfg):
    adapters = jaxpeft.init(cfg, PARAMS, key=jax.random.key(0), layouts=LAYOUTS)
    return {
        f"{p}/{f}": s
        for p, node in jaxpeft.adapter_items(jaxpeft.sharding.adapter_specs(adapters, SPECS))
        for f, s in jaxpeft._paths.leaves_with_paths(node, is_leaf=lambda x: isinstance(x, P))
    }


def test_specs_per_method():
    assert specs(jaxpeft.LoraConfig(rank=2, targets=["dense", "heads"])) == {
        "dense/kernel/a": P("fsdp", None),
        "dense/kernel/b": P(None, "tp"),
        "heads/kernel/a": P("fsdp", None),
        "heads/kernel/b": P(None, "tp", None),
    }
    dora = specs(jaxpeft.DoraConfig(rank=2, targets=["dense", "conv"]))
    assert dora["dense/kernel/magnitude"] == P("tp") and dora["conv/kernel/a"] == P(None, "fsdp", None)
    ia3 = specs(jaxpeft.IA3Config(targets=["dense", "conv"], feedforward=["conv"]))
    assert ia3 == {"dense/kernel/vector": P("tp"), "conv/kernel/vector": P("fsdp")}


def test_flax_logical_axes_through_the_users_rules():
    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
            return nn.Dense(16, kernel_init=init, name="up")(x)

    x = jnp.ones((2, 8))
    variables = jax.eval_shape(Model().init, jax.random.key(0), x)
    rules = (("embed", "fsdp"), ("mlp", "tp"))
    mesh_specs = nn.logical_to_mesh(nn.get_partition_spec(variables), rules)["params"]
    params = nn.unbox(variables)["params"]
    adapters = jax.eval_shape(
        lambda: jaxpeft.linen.init(
            jaxpeft.LoraConfig(rank=2, targets=["up"]), Model(), params, x, key=jax.random.key(0)
        )
    )
    got = jaxpeft.sharding.adapter_specs(adapters, mesh_specs)["up"]["kernel"]
    assert (got.a, got.b) == (P("fsdp", None), P(None, "tp"))


def test_a_method_without_weight_axes_is_replicated_and_errors_name_the_path():
    import dataclasses

    from tests.test_methods import ScaleShift, ScaleShiftConfig

    @jax.tree_util.register_dataclass
    @dataclasses.dataclass(frozen=True)
    class Unsaid(ScaleShift):  # a method that does not say which weight axes its arrays run along
        def weight_axes(self):
            return None

    @dataclasses.dataclass(frozen=True)
    class UnsaidConfig(ScaleShiftConfig):
        def init_target(self, path, weight, layout, key):
            node = super().init_target(path, weight, layout, key)
            return Unsaid(node.scale, node.shift, node.layout)

    adapters = jaxpeft.init(UnsaidConfig(targets=["dense"]), PARAMS, key=jax.random.key(0))
    node = jaxpeft.sharding.adapter_specs(adapters, SPECS)["dense"]["kernel"]
    assert (node.scale, node.shift) == (P(None), P(None))
    with pytest.raises(ValueError, match=r"adapter 'dense/kernel' has no base weight in `params`"):
        jaxpeft.sharding.adapter_specs(adapters, {"other": {"kernel": P()}})
    with pytest.raises(ValueError, match=r"the base weight 'dense/kernel' has no PartitionSpec or NamedSharding"):
        jaxpeft.sharding.adapter_specs(adapters, {"dense": {"kernel": "fsdp"}})


def test_nnx_sharding_metadata():
    from flax import nnx

    import jaxpeft.nnx

    class Model(nnx.Module):
        def __init__(self, rngs):
            init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("fsdp", "tp"))
            self.up = nnx.Linear(8, 16, kernel_init=init, rngs=rngs)

    with jax.sharding.set_mesh(jax.make_mesh((1, 1), ("fsdp", "tp"))):
        model = nnx.eval_shape(lambda: Model(nnx.Rngs(0)))
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
    adapted = jaxpeft.nnx.adapt(model, jaxpeft.LoraConfig(rank=2, targets=["up"]), key=jax.random.key(0))
    got = jaxpeft.sharding.adapter_specs(jaxpeft.nnx.adapters_of(adapted), specs)["up"]["kernel"]
    assert (got.a, got.b) == (P("fsdp", None), P(None, "tp"))
