"""jaxpeft.sharding.base_specs: FSDP × TP specs of a base model from its layouts; a sharded step equals one device."""

import json
import os
import re
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
from examples.models import bert, llama
from jaxpeft._paths import leaves_with_paths

WORKER = Path(__file__).with_name("_base_specs_worker.py")
ROOT = str(Path(__file__).resolve().parents[1])  # the worker imports examples.models
MESH = {"data": 2, "fsdp": 2, "tp": 2}  # only axis sizes: planning needs no devices
IDS = jax.ShapeDtypeStruct((1, 8), jnp.int32)
# tests/_tiny_llama.py's shapes: 2 scan-stacked layers, width 32, GQA 4/2 heads (k/v width 16), MLP 48, vocab 64
LLAMA = llama.LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def flat(specs):
    return dict(leaves_with_paths(specs, is_leaf=lambda x: isinstance(x, P)))


def abstract(model, *args):
    return jax.eval_shape(model.init, jax.random.key(0), *args)["params"]


@pytest.fixture(scope="module")
def tiny_llama():
    model = llama.LlamaForCausalLM(LLAMA)
    return abstract(model, IDS), jaxpeft.linen.infer_layouts(model, IDS)


def test_llama_q_k_v_gate_up_are_column_o_down_row_embedding_vocab_on_tp_norms_replicated(tiny_llama):
    params, layouts = tiny_llama
    column, row = P(None, "fsdp", "tp"), P(None, "tp", "fsdp")
    layer = "model/layers/"
    assert flat(jaxpeft.sharding.base_specs(params, layouts, mesh=MESH)) == {
        "lm_head/kernel": P("fsdp", "tp"),  # (hidden, vocab): a column-parallel Dense
        "model/embed_tokens/embedding": P("tp", "fsdp"),
        layer + "input_layernorm/scale": P(),
        layer + "mlp/down_proj/kernel": row,
        layer + "mlp/gate_proj/kernel": column,
        layer + "mlp/up_proj/kernel": column,
        layer + "post_attention_layernorm/scale": P(),
        layer + "self_attn/k_proj/kernel": column,
        layer + "self_attn/o_proj/kernel": row,
        layer + "self_attn/q_proj/kernel": column,
        layer + "self_attn/v_proj/kernel": column,
        "model/norm/scale": P(),
    }


def test_an_axis_the_mesh_does_not_divide_is_replicated_and_the_plan_says_so(tiny_llama):
    params, layouts = tiny_llama
    mesh = {"fsdp": 3, "tp": 4}  # 3 divides 48 (the MLP width) only; 4 divides everything
    specs = flat(jaxpeft.sharding.base_specs(params, layouts, mesh=mesh))
    assert specs["model/layers/self_attn/q_proj/kernel"] == P(None, None, "tp")
    assert specs["model/layers/mlp/down_proj/kernel"] == P(None, "tp", None)
    assert specs["model/layers/mlp/up_proj/kernel"] == P(None, None, "tp")
    assert specs["model/embed_tokens/embedding"] == P("tp", None)
    text = jaxpeft.sharding.describe_base_specs(params, layouts, mesh=mesh)
    assert re.search(
        r"q_proj/kernel +\(2, 32, 32\) +P\(None, None, 'tp'\) +column: fsdp=3 does not divide fan-in 32", text
    )
    assert re.search(r"P\('tp', None\) +embed: fsdp=3 does not divide features 32", text)


def test_a_mesh_without_tp_is_fsdp_only_and_a_data_only_mesh_replicates(tiny_llama):
    params, layouts = tiny_llama
    specs = flat(jaxpeft.sharding.base_specs(params, layouts, mesh={"data": 2, "fsdp": 4}))
    assert specs["model/layers/self_attn/q_proj/kernel"] == P(None, "fsdp", None)
    assert specs["model/layers/self_attn/o_proj/kernel"] == P(None, None, "fsdp")
    assert specs["model/embed_tokens/embedding"] == P(None, "fsdp")
    assert specs["lm_head/kernel"] == P("fsdp", None)
    text = jaxpeft.sharding.describe_base_specs(params, layouts, mesh={"data": 2, "fsdp": 4})
    assert text.endswith("not in the mesh, skipped: tp='tp'")

    data_only = flat(jaxpeft.sharding.base_specs(params, layouts, mesh={"data": 8}))
    assert set(data_only.values()) <= {P(), P(None, None), P(None, None, None)}
    none = flat(jaxpeft.sharding.base_specs(params, layouts, mesh=MESH, fsdp=None, tp=None))
    assert set(none.values()) <= {P(), P(None, None), P(None, None, None)}


def test_several_mesh_axes_shard_one_weight_axis_over_their_product(tiny_llama):
    params, layouts = tiny_llama
    specs = flat(jaxpeft.sharding.base_specs(params, layouts, mesh=MESH, fsdp=("data", "fsdp")))
    assert specs["model/layers/self_attn/q_proj/kernel"] == P(None, ("data", "fsdp"), "tp")
    assert specs["model/layers/mlp/down_proj/kernel"] == P(None, "tp", ("data", "fsdp"))
    # an axis the product (8) does not divide stays whole
    specs = flat(jaxpeft.sharding.base_specs(params, layouts, mesh={"data": 4, "fsdp": 3}, fsdp=("data", "fsdp")))
    assert specs["model/layers/mlp/gate_proj/kernel"] == P(None, None, None)


def test_row_parallel_is_overridable_by_regex_module_names_or_a_function(tiny_llama):
    params, layouts = tiny_llama
    q, o = "model/layers/self_attn/q_proj/kernel", "model/layers/self_attn/o_proj/kernel"
    for row_parallel in (r"/q_proj/kernel$", ["q_proj"], lambda path, leaf: "/q_proj/" in path):
        specs = flat(jaxpeft.sharding.base_specs(params, layouts, mesh=MESH, row_parallel=row_parallel))
        assert (specs[q], specs[o]) == (P(None, "tp", "fsdp"), P(None, "fsdp", "tp"))
    none = flat(jaxpeft.sharding.base_specs(params, layouts, mesh=MESH, row_parallel=()))
    assert none[o] == none["model/layers/mlp/down_proj/kernel"] == P(None, "fsdp", "tp")
    # embeddings are not kernels: row_parallel leaves them alone
    embed = flat(jaxpeft.sharding.base_specs(params, layouts, mesh=MESH, row_parallel="embed_tokens"))
    assert embed["model/embed_tokens/embedding"] == P("tp", "fsdp")


def test_the_printed_plan_lists_path_shape_spec_and_rule(tiny_llama):
    params, layouts = tiny_llama
    lines = jaxpeft.sharding.describe_base_specs(params, layouts, mesh=MESH).splitlines()
    assert lines[0].split() == ["path", "shape", "spec", "rule"]
    rows = {line.split()[0]: line for line in lines[1:-1]}
    assert rows["lm_head/kernel"].split("  ")[0] == "lm_head/kernel"
    assert [c.strip() for c in rows["model/layers/mlp/down_proj/kernel"].split("  ") if c.strip()] == [
        "model/layers/mlp/down_proj/kernel",
        "(2, 48, 32)",
        "P(None, 'tp', 'fsdp')",
        "row",
    ]
    assert rows["model/norm/scale"].endswith("P()                    replicated: no layout, under min_size")
    assert lines[1].index("(32, 64)") == lines[2].index("(64, 32)")  # aligned columns, as jaxpeft.plan prints
    # 19,456 float32 entries of kernels and embeddings, each in 4 pieces, and 160 entries of norms on every device
    assert lines[-1] == (
        "12 leaves on mesh data=2 × fsdp=2 × tp=2: 6 column, 2 row, 1 embed, 3 replicated; "
        "19.6 KiB of 76.6 KiB per device (26%)"
    )


def test_bert_query_key_value_intermediate_column_output_dense_row_biases_and_norms_replicated():
    config = bert.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=16,
        num_labels=3,
    )
    model = bert.BertForSequenceClassification(config)
    params, layouts = abstract(model, IDS), jaxpeft.linen.infer_layouts(model, IDS)
    specs = flat(jaxpeft.sharding.base_specs(params, layouts, mesh=MESH))
    layer = "bert/encoder/layer_1/"
    for name in ("attention/self/query", "attention/self/key", "attention/self/value", "intermediate/dense"):
        assert specs[layer + name + "/kernel"] == P("fsdp", "tp"), name
    for name in ("attention/output/dense", "output/dense"):
        assert specs[layer + name + "/kernel"] == P("tp", "fsdp"), name
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        assert specs[f"bert/embeddings/{name}/embedding"] == P("tp", "fsdp"), name
    assert specs["bert/pooler/dense/kernel"] == P("fsdp", "tp")
    assert specs["classifier/kernel"] == P("fsdp", None)  # 3 labels: tp=2 does not divide them
    rest = {p: s for p, s in specs.items() if not p.endswith(("/kernel", "/embedding"))}
    assert rest and all(s == P() for s in rest.values()), rest  # biases, LayerNorm scales and biases
    assert (
        sum(p.endswith("/bias") for p in rest) == 2 * 8 + 3
    )  # 6 Dense + 2 LayerNorm a layer; embeddings, pooler, head


def test_nnx_model_through_base_params_and_infer_layouts():
    from flax import nnx

    import jaxpeft.nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.q_proj = nnx.Linear(16, 32, rngs=rngs)
            self.heads = nnx.LinearGeneral(16, (4, 8), rngs=rngs)  # fan-out (heads, head_dim)
            self.o_proj = nnx.Linear(32, 16, use_bias=False, rngs=rngs)
            self.norm = nnx.LayerNorm(16, rngs=rngs)
            self.conv = nnx.Conv(16, 8, (2, 2), rngs=rngs)  # (2, 2, 16, 8): the window stays whole

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(64, 16, rngs=rngs)
            self.layers = nnx.List([Block(rngs), Block(rngs)])

    model = nnx.eval_shape(lambda: Model(nnx.Rngs(0)))
    specs = jaxpeft.sharding.base_specs(jaxpeft.nnx.base_params(model), jaxpeft.nnx.infer_layouts(model), mesh=MESH)
    got = flat(specs)
    assert got["embed/embedding"] == P("tp", "fsdp")
    assert got["layers/1/q_proj/kernel"] == P("fsdp", "tp")
    assert got["layers/1/heads/kernel"] == P("fsdp", "tp", None)  # tp on the heads, the first fan-out axis
    assert got["layers/1/o_proj/kernel"] == P("tp", "fsdp")
    assert got["layers/1/conv/kernel"] == P(None, None, "fsdp", "tp")
    assert got["layers/1/q_proj/bias"] == got["layers/1/norm/scale"] == P()

    # an nnx.State takes the specs through flax's pure-dict round trip, and places the real model
    real = Model(nnx.Rngs(0))
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tp"))
    spec_state = nnx.state(real, nnx.Param)
    nnx.replace_by_pure_dict(spec_state, specs)  # in place, in a copy of the model's state
    placed = jax.device_put(nnx.state(real, nnx.Param), jax.tree.map(lambda s: jax.NamedSharding(mesh, s), spec_state))
    nnx.update(real, placed)
    assert real.layers[1].o_proj.kernel.get_value().sharding.spec == P("tp", "fsdp")


def test_leaves_without_a_layout_replicated_when_small_fsdp_on_their_largest_axis_when_large():
    params = {
        "table": jax.ShapeDtypeStruct((6, 1024), jnp.float32),  # a custom module's self.param
        "odd": jax.ShapeDtypeStruct((3, 5), jnp.float32),
        "dense": {
            "kernel": jax.ShapeDtypeStruct((16, 8), jnp.float32),
            "bias": jax.ShapeDtypeStruct((8,), jnp.float32),
        },
        "embed": {"embedding": jax.ShapeDtypeStruct((9, 16), jnp.float32)},
    }
    # without layouts, a 2-D kernel/embedding gets the default (in, out)/(vocab, features) layout
    assert flat(jaxpeft.sharding.base_specs(params, mesh=MESH)) == {
        "table": P(),  # 6,144 entries, under MIN_SIZE
        "odd": P(),
        "dense/kernel": P("fsdp", "tp"),
        "dense/bias": P(),
        "embed/embedding": P(None, "fsdp"),  # tp=2 does not divide a vocab of 9
    }
    small = flat(jaxpeft.sharding.base_specs(params, mesh=MESH, min_size=8))
    assert (small["table"], small["odd"], small["dense/bias"]) == (P(None, "fsdp"), P(), P("fsdp"))
    text = jaxpeft.sharding.describe_base_specs(params, mesh=MESH, min_size=8)
    assert "P(None, 'fsdp')  fsdp: no layout, largest axis it divides" in text
    assert "P()              replicated: no layout, fsdp=2 does not divide any axis of (3, 5)" in text
    # a layout says Unsupported (a custom module's param): the same no-layout rule
    unsupported = {"dense/kernel": jaxpeft.Unsupported("a custom layer")}
    assert jaxpeft.sharding.base_specs(params, unsupported, mesh=MESH)["dense"]["kernel"] == P()


def test_quantised_weights_shard_their_codes_and_scales_like_the_float_weight(tiny_llama):
    params, layouts = tiny_llama
    cfg = jaxpeft.LoraConfig(rank=2, targets=["q_proj", "down_proj"])
    quantised = jax.eval_shape(lambda p: jaxpeft.quantize(p, cfg, kind="int8", layouts=layouts), params)
    specs = jaxpeft.sharding.base_specs(quantised, layouts, mesh=MESH)
    q = specs["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(q, jaxpeft.QuantizedArray) and (q.codes, q.scales) == (P(None, "fsdp", "tp"), P(None, "tp"))
    assert jax.tree.structure(specs) == jax.tree.structure(quantised)  # placeable with one jax.tree.map
    assert specs["model"]["layers"]["self_attn"]["k_proj"]["kernel"] == P(None, "fsdp", "tp")
    text = jaxpeft.sharding.describe_base_specs(quantised, layouts, mesh=MESH)
    assert "column: quantised int8, codes P(None, 'fsdp', 'tp')" in text
    # NF4 blocks of 32 along q_proj's fan-in of 32: one a column, so fsdp cannot split them (tests/test_qlora_mesh.py)
    nf4 = jax.eval_shape(lambda p: jaxpeft.quantize(p, cfg, kind="nf4", layouts=layouts), params)
    q4 = jaxpeft.sharding.base_specs(nf4, layouts, mesh=MESH)["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert (q4.codes, q4.scales, q4.group_scales) == (P(None, None, "tp"), P(None, None, "tp"), P(None, None, None))


def test_errors_name_the_argument_and_the_fix(tiny_llama):
    params, layouts = tiny_llama
    with pytest.raises(ValueError, match=r"`fsdp`='tp' and `tp`='tp' share the mesh axis 'tp'"):
        jaxpeft.sharding.base_specs(params, layouts, mesh=MESH, fsdp="tp")
    with pytest.raises(ValueError, match=r"`layouts` names no leaf of `params`: params paths look like 'params/"):
        jaxpeft.sharding.base_specs({"params": params}, layouts, mesh=MESH)
    bad = {**layouts, "lm_head/kernel": jaxpeft.Layout(stack=1)}
    with pytest.raises(ValueError, match=r"'lm_head/kernel' has shape \(32, 64\) but its layout .* describes 3 axes"):
        jaxpeft.sharding.base_specs(params, bad, mesh=MESH)
    with pytest.raises(ValueError, match=r"`min_size`=-1 is not an int >= 0"):
        jaxpeft.sharding.base_specs(params, layouts, mesh=MESH, min_size=-1)
    with pytest.raises(ValueError, match=r"`tp`=\('tp', 3\): expected a mesh axis name, several, or None; got 3"):
        jaxpeft.sharding.base_specs(params, layouts, mesh=MESH, tp=("tp", 3))
    with pytest.raises(ValueError, match=r"`mesh`=8 is not a Mesh or a mapping of axis sizes"):
        jaxpeft.sharding.base_specs(params, layouts, mesh=8)


def test_specs_from_a_real_mesh_place_host_arrays(tiny_llama):
    params, layouts = tiny_llama
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tp"))
    specs = jaxpeft.sharding.base_specs(params, layouts, mesh=mesh)
    host = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), params)
    placed = jax.device_put(host, jax.tree.map(lambda s: jax.NamedSharding(mesh, s), specs))
    assert placed["model"]["layers"]["self_attn"]["o_proj"]["kernel"].sharding.spec == P(None, "tp", "fsdp")


@pytest.fixture(scope="module")
def worker():
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(WORKER)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_lora_step_on_a_2x2x2_mesh_with_base_specs_equals_one_device(worker):
    assert worker["q_proj"] == "P(None, 'fsdp', 'tp')" and worker["q_proj_shard"] == [2, 16, 16]
    assert worker["down_proj"] == "P(None, 'tp', 'fsdp')" and worker["embedding"] == "P('tp', 'fsdp')"
    # the adapters are born sharded like the base weights base_specs gave: A along fan-in, B along fan-out
    assert worker["q_proj_a_b"] == ["P(None, 'fsdp', None)", "P(None, None, 'tp')"]
    assert worker["loss_diff"] < 1e-5 and worker["adapter_diff"] < 1e-4, worker
