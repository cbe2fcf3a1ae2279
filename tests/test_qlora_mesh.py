"""QLoRA on a mesh: quantised codes and scales sharded along the weight's axes (``QuantizedArray.array_specs``,
``jaxpeft.sharding.base_specs``), adapter specs from a quantised base, and a sharded quantised base in 8 devices."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxpeft
import jaxpeft.linen
import jaxpeft.sharding
from examples.models import llama
from jaxpeft import quant

WORKER = Path(__file__).with_name("_qlora_mesh_worker.py")
ROOT = str(Path(__file__).resolve().parents[1])  # the worker imports examples.models
MESH = {"data": 2, "fsdp": 2, "tp": 2}
ROWS = P(None, "fsdp", "tp")


def quantised(shape, kind, stack=1, fan_in=1):
    return jax.eval_shape(
        lambda: quant.quantize_array(jnp.zeros(shape), jaxpeft.Layout(stack=stack, fan_in=fan_in), kind)
    )


def test_nf4_codes_and_scales_take_the_weights_spec_and_groups_shard_only_whole():
    q = quantised((2, 128, 256), "nf4")  # blocks of 64 along fan-in: 2 per column, 1 on each fsdp shard
    specs = q.array_specs(ROWS, MESH)
    assert (specs.codes, specs.scales, specs.group_scales) == (ROWS, ROWS, P(None, "fsdp", None))
    assert jax.tree.structure(specs, is_leaf=lambda x: isinstance(x, P)) == jax.tree.structure(q)
    wide = quantised((128, 1024), "nf4", stack=0)  # 512 block scales a tp shard: two whole groups of 256
    assert wide.array_specs(P("fsdp", "tp"), MESH).group_scales == P("fsdp", "tp")


def test_a_block_axis_whose_blocks_would_straddle_shards_stays_whole():
    q = quantised((64, 96), "nf4", stack=0)  # one block of 64 along fan-in: fsdp cannot split it
    specs = q.array_specs(P("fsdp", "tp"), MESH)
    assert (specs.codes, specs.scales) == (P(None, "tp"), P(None, "tp"))
    # an entry that does not divide the weight's axis is dropped as for a float weight
    odd = quantised((128, 6), "nf4", stack=0).array_specs(P("fsdp", ("tp", "data")), MESH)
    assert odd.codes == P("fsdp", None)


def test_int8_scales_follow_the_fan_out_axes():
    specs = quantised((2, 4, 6, 10), "int8", fan_in=2).array_specs(P(None, "fsdp", None, "tp"), MESH)
    assert (specs.codes, specs.scales, specs.group_scales) == (P(None, "fsdp", None, "tp"), P(None, "tp"), None)


def test_array_specs_errors_name_the_argument():
    q = quantised((2, 128, 256), "nf4")
    with pytest.raises(ValueError, match=r"`weight_spec`=.* has more entries than the quantised weight's 3 axes"):
        q.array_specs(P(None, None, "fsdp", "tp"), MESH)
    with pytest.raises(ValueError, match=r"`mesh`=8 is not a Mesh or a mapping of axis sizes"):
        q.array_specs(ROWS, 8)


@pytest.mark.parametrize("kind", quant.KINDS)
def test_base_specs_shard_quantised_weights_and_adapter_specs_read_them(kind):
    config = llama.LlamaConfig(
        vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4
    )
    model, ids = llama.LlamaForCausalLM(config), jax.ShapeDtypeStruct((1, 8), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
    layouts = jaxpeft.linen.infer_layouts(model, ids)
    cfg = jaxpeft.LoraConfig(rank=4, targets="all-linear")
    qp = jax.eval_shape(lambda p: jaxpeft.quantize(p, cfg, kind=kind, layouts=layouts), params)
    specs = jaxpeft.sharding.base_specs(qp, layouts, mesh=MESH)
    floats = jaxpeft.sharding.base_specs(params, layouts, mesh=MESH)
    down = specs["model"]["layers"]["mlp"]["down_proj"]["kernel"]
    assert isinstance(down, jaxpeft.QuantizedArray) and down.codes == P(None, "tp", "fsdp")
    text = jaxpeft.sharding.describe_base_specs(qp, layouts, mesh=MESH)
    line = next(x for x in text.splitlines() if x.startswith("model/layers/mlp/down_proj/kernel"))
    assert f"row: quantised {kind}, codes P(None, 'tp', 'fsdp')" in line
    share = float(text.splitlines()[-1].rsplit("(", 1)[1].rstrip("%)"))
    assert share <= 30, text  # not replicated: a quarter of the bytes on each device, as the float base
    # the spec tree goes to adapter_specs as it is, and gives the float base's adapter specs
    adapters = jax.eval_shape(lambda p: jaxpeft.init(cfg, p, key=jax.random.key(0), layouts=layouts), qp)
    mesh = jax.sharding.AbstractMesh((2, 2, 2), ("data", "fsdp", "tp"))
    from_quantised = jaxpeft.sharding.adapter_specs(adapters, specs, mesh=mesh)
    assert from_quantised == jaxpeft.sharding.adapter_specs(adapters, floats, mesh=mesh)
    assert from_quantised["model"]["layers"]["mlp"]["down_proj"]["kernel"].a == P(None, "tp", None)


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu"}
    directory = str(tmp_path_factory.mktemp("qlora_mesh"))
    proc = subprocess.run(
        [sys.executable, str(WORKER), directory], capture_output=True, text=True, timeout=900, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_nf4_base_on_a_2x2x2_mesh_holds_at_most_0_30_of_the_bf16_bytes_per_device(worker, capsys):
    nf4, int8 = worker["nf4"], worker["int8"]
    with capsys.disabled():
        print(
            f"\nper-device base bytes vs bf16 on (2,2,2): nf4 {nf4['device_ratio']:.3f}, "
            f"int8 {int8['device_ratio']:.3f}"
        )
    assert nf4["device_ratio"] <= 0.30  # measured 0.286 (0.283 in total: the shards are as even as the weights')
    assert int8["device_ratio"] <= 0.56  # measured 0.543
    assert nf4["q_proj_arrays"] == ["P(None, 'fsdp', 'tp')", "P(None, 'fsdp', 'tp')", "P(None, 'fsdp', None)"]
    assert nf4["q_proj_codes_shard"] == [2, 32, 64]  # (2 layers, 128 / 2 nibbles / fsdp 2, 128 / tp 2)
    assert int8["q_proj_arrays"] == ["P(None, 'fsdp', 'tp')", "P(None, 'tp')"]


@pytest.mark.parametrize("kind", quant.KINDS)
def test_a_qlora_step_on_the_sharded_quantised_base_equals_one_device(worker, kind):
    out = worker[kind]
    assert out["q_proj_a_b"] == ["P(None, 'fsdp', None)", "P(None, None, 'tp')"]  # as over the float base
    assert out["loss_diff"] < 1e-5 and out["adapter_diff"] < 1e-4, out


@pytest.mark.parametrize("kind", quant.KINDS)
def test_the_sharded_qlora_step_gathers_no_codes_and_no_dequantised_weight(worker, kind):
    """Each device dequantises its own shard: the step all-gathers activations only (as the float step does), never
    a code or scale array (integer types) nor a weight's logical shape (whole or one layer)."""
    gathers = worker[kind]["all_gathers"]
    assert gathers and not [g for g in gathers if g.startswith(("u8", "s8"))], gathers
    shapes = {s.replace(" ", "") for s in worker[kind]["weight_shapes"]}
    assert not [g for g in gathers if g.split("[")[1].rstrip("]") in {s.strip("[]") for s in shapes}], gathers


@pytest.mark.parametrize("kind", quant.KINDS)
def test_restore_over_a_sharded_quantised_base_keeps_the_adapter_specs(worker, kind):
    out = worker[kind]
    assert out["restored_equal"]
    assert out["restored_specs_kept"] == out["restored_specs_total"] == out["restored_sharded"] == 14, out


def test_the_quantised_weights_sharding_is_its_codes():
    """On one device: an unplaced quantised weight reads as replicated, as a float one does."""
    q = quant.quantize_array(jnp.asarray(np.ones((128, 64), np.float32)), jaxpeft.Layout(), "nf4")
    assert q.sharding == q.codes.sharding
    assert jaxpeft.sharding.adapter_specs(
        jaxpeft.init(jaxpeft.LoraConfig(rank=2, targets=r"^w$"), {"w": q}, key=jax.random.key(0)), {"w": q}
    )["w"].a == P(None, None)
