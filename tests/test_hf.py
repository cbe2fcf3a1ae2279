"""jaxpeft.hf without torch: file format, module-name rules, round trips of every layer kind, refusals."""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

import jaxpeft
import jaxpeft.hf as hf
import jaxpeft.linen
from examples.models import bert, llama

LLAMA = llama.LlamaConfig(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=1,
)
BERT = bert.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24)


def _randomise(adapters, seed=0):
    """Non-zero arrays (B starts at zero), drawn with numpy so no per-shape JAX compile is needed."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape).astype(np.float32) * 0.3), adapters)


def _random_adapters(cfg, params, layouts=None, seed=0):
    """Adapters of ``cfg``'s shapes with random arrays (shapes from an abstract ``jaxpeft.init``)."""
    shapes = jax.eval_shape(lambda p: jaxpeft.init(cfg, p, key=jax.random.key(0), layouts=layouts), params)
    return _randomise(shapes, seed)


def _flat(tree):
    return {jaxpeft.path_str(kp): np.asarray(x) for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _static(node):
    return {f.name: getattr(node, f.name) for f in dataclasses.fields(node) if f.metadata.get("static")}


def _assert_adapters_equal(a, b):
    """Same arrays bit for bit, same node types and the same static fields (scale, dropout, layout, ...)."""
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)
    na, nb = dict(jaxpeft.adapter_items(a)), dict(jaxpeft.adapter_items(b))
    assert na.keys() == nb.keys()
    for k in na:
        assert type(na[k]) is type(nb[k]), k
        sa, sb = _static(na[k]), _static(nb[k])
        assert sa.pop("scale", 1.0) == pytest.approx(sb.pop("scale", 1.0), rel=1e-9), k
        assert sa == sb, k


def _assert_same_outputs(model, params, x, y, args):
    y0 = jaxpeft.linen.apply(model, {"params": params}, x, *args)
    y1 = jaxpeft.linen.apply(model, {"params": params}, y, *args)
    jax.tree.map(lambda u, v: np.testing.assert_array_equal(np.asarray(u), np.asarray(v)), y0, y1)


def _tensor_shapes(directory):
    with safe_open(os.path.join(directory, hf.WEIGHTS_NAME), "numpy") as f:
        return {k.removeprefix("base_model.model."): f.get_tensor(k).shape for k in f.keys()}  # noqa: SIM118


@pytest.fixture(scope="module")
def llama_setup():
    ids = jnp.zeros((1, 4), jnp.int32)
    model = llama.LlamaForCausalLM(LLAMA)
    params = llama.abstract_params(LLAMA)
    layouts = jaxpeft.linen.infer_layouts(model, ids)
    return model, params, layouts


def _llama_adapters(cfg, llama_setup, seed=0):
    _, params, layouts = llama_setup
    return _random_adapters(cfg, params, layouts, seed)


# ----------------------------------------------------------------------------------------------- module names


def test_module_name_map_reproduces_the_example_models():
    llama_modules = {p.rpartition("/")[0] for p in _flat(llama.abstract_params(LLAMA))}
    fn = hf.module_name_map(stacked="model/layers")
    for module in llama_modules:
        assert fn(module) == llama.hf_module_name(module), module
    assert fn("model/layers/self_attn/q_proj") == "model.layers.{layer}.self_attn.q_proj"
    bert_modules = {p.rpartition("/")[0] for p in _flat(bert.abstract_params(BERT))}
    fn = hf.module_name_map()
    for module in bert_modules:
        assert fn(module) == bert.hf_module_name(module), module
    assert fn("encoder/layer_3/attention/self/query") == "encoder.layer.3.attention.self.query"
    prefixed = hf.module_name_map([(r"^backbone/", "")], prefix="bert.")
    assert prefixed("backbone/encoder/layer_0/output/dense") == "bert.encoder.layer.0.output.dense"
    with pytest.raises(ValueError, match="`rules` entry '\\(' is not a valid regular expression"):
        hf.module_name_map([("(", "")])


# ----------------------------------------------------------------------------------------------- format


def test_llama_export_writes_the_hf_peft_format(llama_setup, tmp_path):
    _, params, _ = llama_setup
    cfg = jaxpeft.LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj", "embed_tokens"], dropout=0.05)
    adapters = _llama_adapters(cfg, llama_setup)
    out = hf.export_adapters(
        tmp_path / "a", adapters, cfg, params, llama.hf_module_name, task_type="CAUSAL_LM", base_model_name_or_path="x"
    )
    assert os.path.isabs(out) and sorted(os.listdir(out)) == [hf.CONFIG_NAME, hf.WEIGHTS_NAME]
    with open(os.path.join(out, hf.CONFIG_NAME)) as f:
        config = json.load(f)
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["lora_dropout"] == 0.05
    assert config["target_modules"] == ["embed_tokens", "q_proj", "v_proj"]
    assert config["use_rslora"] is False and config["use_dora"] is False
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    assert config["base_model_name_or_path"] == "x"
    assert config["ensure_weight_tying"] is True  # an adapted embedding also acts on a tied head, as in jaxpeft
    with safe_open(os.path.join(out, hf.WEIGHTS_NAME), "numpy") as f:
        assert f.metadata() == {"format": "pt"}
        shapes = {k: f.get_tensor(k).shape for k in f.keys()}  # noqa: SIM118
        q_a = f.get_tensor("base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight")
    assert len(shapes) == 2 + 2 * 2 * LLAMA.num_hidden_layers
    assert shapes["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] == (4, 16)  # [r, in]
    assert shapes["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] == (16, 4)  # [out, r]
    assert shapes["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"] == (8, 4)
    assert shapes["base_model.model.model.embed_tokens.lora_embedding_A"] == (4, 32)  # [r, vocab]
    assert shapes["base_model.model.model.embed_tokens.lora_embedding_B"] == (16, 4)  # [dim, r]
    # Flax (layer, in, r) -> HF layer 2, [r, in]: transposed.
    np.testing.assert_array_equal(q_a, np.asarray(adapters["model"]["layers"]["self_attn"]["q_proj"]["kernel"].a[2]).T)
    cfg2, back = hf.import_adapters(out, params, llama.hf_module_name)
    _assert_adapters_equal(back, adapters)
    assert cfg2.rank == 4 and cfg2.alpha == 8 and cfg2.dropout == 0.05 and cfg2.dtype == "float32"


def test_per_module_rank_alpha_and_rslora_follow_hf_matching(llama_setup, tmp_path):
    _, params, layouts = llama_setup
    cfg = jaxpeft.LoraConfig(
        rank=4,
        alpha=8,
        targets=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"down_proj": 2},
        alpha_pattern={"v_proj": 3.5},
        use_rslora=True,
    )
    adapters = _llama_adapters(cfg, llama_setup)
    config, tensors = hf.to_state_dict(adapters, cfg, params, llama.hf_module_name)
    assert config["use_rslora"] is True
    assert config["rank_pattern"] == {r"model.layers.\d+.mlp.down_proj": 2}
    assert config["alpha_pattern"] == {r"model.layers.\d+.self_attn.v_proj": 3.5}
    for i in range(LLAMA.num_hidden_layers):  # HF's rule: re.match(rf"(.*\.)?({key})$", module name)
        assert hf._common.hf_pattern_key(list(config["rank_pattern"]), f"model.layers.{i}.mlp.down_proj") is not None
        assert hf._common.hf_pattern_key(list(config["rank_pattern"]), f"model.layers.{i}.self_attn.q_proj") is None
    cfg2, back = hf.from_state_dict(config, tensors, params, llama.hf_module_name, layouts=layouts)
    _assert_adapters_equal(back, adapters)
    for path in ("model/layers/mlp/down_proj/kernel", "model/layers/self_attn/v_proj/kernel"):
        assert cfg2.rank_for(path) == cfg.rank_for(path) and cfg2.scale_for(path) == pytest.approx(cfg.scale_for(path))
    # The imported config plans exactly the imported adapters (so it can be checkpointed and re-initialised).
    rows = jaxpeft.plan(cfg2, params, layouts=layouts).targets
    assert {t.path: t.shapes for t in rows} == {
        p: {"a": w.a.shape, "b": w.b.shape} for p, w in jaxpeft.adapter_items(back)
    }


def test_target_modules_are_short_names_only_when_exact():
    params = bert.abstract_params(BERT)
    fn = hf.module_name_map()
    some = jaxpeft.LoraConfig(rank=2, targets=["query", "value"])
    config, _ = hf.to_state_dict(_random_adapters(some, params), some, params, fn)
    assert config["target_modules"] == ["query", "value"]
    # "dense" also names the intermediate, output and pooler layers: write full names instead.
    narrow = jaxpeft.LoraConfig(rank=2, targets=r"attention/output/dense/kernel$")
    config, _ = hf.to_state_dict(_random_adapters(narrow, params), narrow, params, fn)
    assert config["target_modules"] == [f"encoder.layer.{i}.attention.output.dense" for i in range(2)]
    config, _ = hf.to_state_dict(
        _random_adapters(narrow, params),
        narrow,
        params,
        fn,
        target_modules=r".*\.attention\.output\.dense",
    )
    assert config["target_modules"] == r".*\.attention\.output\.dense"
    with pytest.raises(ValueError, match="`target_modules`=\\['query'\\] does not select the exported modules"):
        hf.to_state_dict(
            _random_adapters(narrow, params),
            narrow,
            params,
            fn,
            target_modules=["query"],
        )


# ----------------------------------------------------------------------------------------------- every layer kind


class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _=None):
        return h + nn.Dense(8, name="up")(h), None


class Zoo(nn.Module):
    """Embed, DenseGeneral with two fan-out and two fan-in axes, a scanned Dense, an Einsum and a Conv."""

    @nn.compact
    def __call__(self, ids, img):
        h = nn.Embed(10, 8, name="embed")(ids)
        h = nn.DenseGeneral((2, 4), name="split")(h)
        h = nn.DenseGeneral(8, axis=(-2, -1), name="merge")(h)
        h, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)(name="layers")(h)
        h = nn.Einsum((8, 2, 4), "btd,dhk->bthk", name="heads")(h)
        return h, nn.Conv(3, (3, 3), name="conv")(img)


@pytest.fixture(scope="module")
def zoo():
    model = Zoo()
    ids, img = jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 5, 5, 2))
    params = _randomise(jax.eval_shape(model.init, jax.random.key(0), ids, img)["params"], seed=1)
    layouts = jaxpeft.linen.infer_layouts(model, ids, img)
    cfg = jaxpeft.LoraConfig(rank=2, alpha=6, targets=["embed", "split", "merge", "up", "heads", "conv"])
    adapters = _random_adapters(cfg, params, layouts)
    return model, params, layouts, cfg, adapters, (ids, img)


ZOO_LORA_SHAPES = {
    "embed.lora_embedding_A": (2, 10),
    "embed.lora_embedding_B": (8, 2),
    "split.lora_A.weight": (2, 8),
    "split.lora_B.weight": (8, 2),  # fan-out (2, 4) flattened to 8
    "merge.lora_A.weight": (2, 8),  # fan-in (2, 4) flattened to 8
    "merge.lora_B.weight": (8, 2),
    "layers.0.up.lora_A.weight": (2, 8),
    "layers.0.up.lora_B.weight": (8, 2),
    "layers.1.up.lora_A.weight": (2, 8),
    "layers.1.up.lora_B.weight": (8, 2),
    "heads.lora_A.weight": (2, 8),
    "heads.lora_B.weight": (8, 2),  # einsum fan-out (h, k) = (2, 4) flattened
    "conv.lora_A.weight": (2, 2, 3, 3),  # torch Conv2d [r, in, kh, kw]
    "conv.lora_B.weight": (3, 2, 1, 1),  # 1x1 conv [out, r, 1, 1]
}


def test_lora_file_layout_on_every_layer_kind(zoo, tmp_path):
    """PEFT's LoRA tensor names and shapes per layer kind (round trips: tests/test_hf_codecs.py)."""
    _, params, layouts, cfg, adapters, _ = zoo
    fn = hf.module_name_map(stacked="layers")
    hf.export_adapters(tmp_path, adapters, cfg, params, fn, layouts=layouts)
    assert _tensor_shapes(tmp_path) == ZOO_LORA_SHAPES
    _, back = hf.import_adapters(tmp_path, params, fn, layouts=layouts)
    # Kernels with one axis per side need no layouts on import (the conv and embed factors say what they are).
    sub = {k: v for k, v in back.items() if k in ("embed", "layers", "conv")}
    sub_cfg = jaxpeft.LoraConfig(rank=2, alpha=6, targets=["embed", "up", "conv"])
    _, again = hf.from_state_dict(*hf.to_state_dict(sub, sub_cfg, params, fn), params, fn)
    _assert_adapters_equal(again, sub)


def test_dora_file_layout_on_every_layer_kind(zoo, tmp_path):
    _, params, layouts, _, _, _ = zoo
    fn = hf.module_name_map(stacked="layers")
    cfg = jaxpeft.DoraConfig(rank=2, alpha=6, targets=["embed", "split", "merge", "up", "heads", "conv"], dropout=0.1)
    adapters = _random_adapters(cfg, params, layouts, seed=2)
    hf.export_adapters(tmp_path, adapters, cfg, params, fn, layouts=layouts, ensure_weight_tying=False)
    with open(os.path.join(tmp_path, hf.CONFIG_NAME)) as f:
        config = json.load(f)
    assert config["peft_type"] == "LORA" and config["use_dora"] is True and config["ensure_weight_tying"] is False
    assert _tensor_shapes(tmp_path) == {
        **ZOO_LORA_SHAPES,
        "embed.lora_magnitude_vector": (8,),  # one per feature: the norm runs over the vocabulary
        "split.lora_magnitude_vector": (8,),  # fan-out (2, 4) flattened
        "merge.lora_magnitude_vector": (8,),
        "layers.0.up.lora_magnitude_vector": (8,),
        "layers.1.up.lora_magnitude_vector": (8,),
        "heads.lora_magnitude_vector": (8,),
        "conv.lora_magnitude_vector": (1, 3, 1, 1),  # torch's (1, out, 1, 1)
    }
    cfg2, back = hf.import_adapters(tmp_path, params, fn, layouts=layouts)
    assert type(cfg2) is jaxpeft.DoraConfig and cfg2.dropout == 0.1
    _assert_adapters_equal(back, adapters)
    # PEFT's loader also accepts the in-memory name `lora_magnitude_vector.weight`.
    config, tensors = hf.to_state_dict(adapters, cfg, params, fn, ensure_weight_tying=False)
    renamed = {k + ".weight" if k.endswith("magnitude_vector") else k: v for k, v in tensors.items()}
    _, again = hf.from_state_dict(config, renamed, params, fn, layouts=layouts)
    _assert_adapters_equal(again, adapters)


def test_ia3_file_layout_on_every_layer_kind(zoo, tmp_path):
    _, params, layouts, _, _, _ = zoo
    fn = hf.module_name_map(stacked="layers")
    cfg = jaxpeft.IA3Config(targets=["split", "merge", "up", "heads", "conv"], feedforward=["merge", "heads", "conv"])
    adapters = _random_adapters(cfg, params, layouts, seed=3)
    hf.export_adapters(tmp_path, adapters, cfg, params, fn, layouts=layouts, task_type="FEATURE_EXTRACTION")
    with open(os.path.join(tmp_path, hf.CONFIG_NAME)) as f:
        config = json.load(f)
    assert config["peft_type"] == "IA3" and config["task_type"] == "FEATURE_EXTRACTION"
    assert config["target_modules"] == ["conv", "heads", "merge", "split", "up"]
    assert config["feedforward_modules"] == ["conv", "heads", "merge"]
    assert _tensor_shapes(tmp_path) == {
        "split.ia3_l": (8, 1),  # scales the output: (out, 1), fan-out (2, 4) flattened
        "merge.ia3_l": (1, 8),  # feed-forward, scales the input: (1, in), fan-in (2, 4) flattened
        "layers.0.up.ia3_l": (8, 1),
        "layers.1.up.ia3_l": (8, 1),
        "heads.ia3_l": (1, 8),  # feed-forward einsum: (1, d)
        "conv.ia3_l": (1, 2, 1, 1),  # feed-forward Conv: (1, in_channels, 1, 1)
    }
    cfg2, back = hf.import_adapters(tmp_path, params, fn, layouts=layouts)
    assert type(cfg2) is jaxpeft.IA3Config
    _assert_adapters_equal(back, adapters)
    rows = jaxpeft.plan(cfg2, params, layouts=layouts).targets  # the config selects exactly the feed-forward ones
    assert {t.path: t.node.feedforward for t in rows} == {p: n.feedforward for p, n in jaxpeft.adapter_items(back)}
    # A conv that scales its output: (1, out_channels, 1, 1).
    out_cfg = jaxpeft.IA3Config(targets=["conv"], feedforward=())
    out = _random_adapters(out_cfg, params, layouts, seed=4)
    config, tensors = hf.to_state_dict(out, out_cfg, params, fn)
    assert config["feedforward_modules"] == [] and tensors["base_model.model.conv.ia3_l"].shape == (1, 3, 1, 1)
    _assert_adapters_equal(hf.from_state_dict(config, tensors, params, fn)[1], out)


def _ia3_files(params, fn, targets, feedforward, layouts=None):
    cfg = jaxpeft.IA3Config(targets=targets, feedforward=feedforward)
    adapters = _random_adapters(cfg, params, layouts)
    config, tensors = hf.to_state_dict(adapters, cfg, params, fn)
    modules = {k.removeprefix("base_model.model.").removesuffix(".ia3_l") for k in tensors}
    ff_paths = {p for p, n in jaxpeft.adapter_items(adapters) if n.feedforward}
    ff = {name for name, (path, _) in hf._common.hf_modules(params, fn).items() if path in ff_paths}
    # PEFT's rule (bare `endswith` for a list, full match for a str) marks exactly our feed-forward modules.
    assert {m for m in modules if jaxpeft.methods.ia3.hf_feedforward(config["feedforward_modules"], m)} == ff
    ff_list, targets_list = config["feedforward_modules"], config["target_modules"]
    if isinstance(ff_list, list) and isinstance(targets_list, list):
        assert set(ff_list) <= set(targets_list)  # PEFT's IA3Config requires it
    _, back = hf.from_state_dict(config, tensors, params, fn, layouts=layouts)
    _assert_adapters_equal(back, adapters)
    return config


def test_ia3_feedforward_modules_reproduce_hf_matching(llama_setup):
    _, params, layouts = llama_setup
    config = _ia3_files(params, llama.hf_module_name, ["k_proj", "v_proj", "down_proj"], ["down_proj"], layouts)
    assert config["target_modules"] == ["down_proj", "k_proj", "v_proj"]
    assert config["feedforward_modules"] == ["down_proj"]
    # BERT: "dense" names four kinds of layer, so both lists hold full names.
    bert_params = bert.abstract_params(BERT)
    config = _ia3_files(bert_params, hf.module_name_map(), ["key", "value", "output/dense"], ["output/dense"])
    assert config["feedforward_modules"] == [
        f"encoder.layer.{i}.{m}.dense" for i in range(2) for m in ("attention.output", "output")
    ]
    # PEFT tests feed-forward names by bare `endswith`: "proj" would also mark "q_proj" ...
    toy = {m: {"kernel": jax.ShapeDtypeStruct((4, 4), jnp.float32)} for m in ("proj", "q_proj")}
    config = _ia3_files(toy, hf.module_name_map(), ["proj", "q_proj"], r"^proj/")
    assert config["feedforward_modules"] == "(?:proj)"  # ... so it becomes a full-match regex
    nested = {"mlp": {"proj": toy["proj"]}, "attn": {"q_proj": toy["q_proj"]}}
    config = _ia3_files(nested, hf.module_name_map(), ["proj", "q_proj"], ["mlp/proj"])
    assert config == {**config, "target_modules": ["attn.q_proj", "mlp.proj"], "feedforward_modules": ["mlp.proj"]}


def test_export_refuses_what_it_cannot_write_exactly(zoo):
    _, params, layouts, cfg, adapters, _ = zoo
    fn = hf.module_name_map(stacked="layers")
    wrong = {"merge/kernel": jaxpeft.Layout(fan_in=1, fan_out=2, kind="dense_general")}
    with pytest.raises(ValueError, match=r"`layouts`\['merge/kernel'\]=.* disagrees with the adapter's own layout"):
        hf.to_state_dict(adapters, cfg, params, fn, layouts=wrong)
    with pytest.raises(ValueError, match=r"maps 'layers/up/kernel' .* to 'layers.up': a scan-stacked parameter"):
        hf.to_state_dict(adapters, cfg, params, hf.module_name_map(), layouts=layouts)
    with pytest.raises(ValueError, match=r"adapter 'conv/kernel' has rank 2 but `cfg` gives rank 3"):
        hf.to_state_dict(adapters, jaxpeft.LoraConfig(rank=3, targets=["embed"]), params, fn, layouts=layouts)
    with pytest.raises(ValueError, match=r"has scale 3.0 but `cfg` gives 1.0"):
        hf.to_state_dict(adapters, jaxpeft.LoraConfig(rank=2, alpha=2), params, fn, layouts=layouts)

    @jax.tree_util.register_dataclass
    @dataclasses.dataclass(frozen=True)
    class OtherWeights(jaxpeft.LoraWeights):  # a user's subclass is a LoraWeights: exported as LoRA
        pass

    node = adapters["embed"]["embedding"]
    other = {**adapters, "embed": {"embedding": OtherWeights(node.a, node.b, node.scale, layout=node.layout)}}
    assert (
        hf.to_state_dict(other, cfg, params, fn, layouts=layouts)[1].keys()
        == hf.to_state_dict(adapters, cfg, params, fn, layouts=layouts)[1].keys()
    )
    with pytest.raises(ValueError, match=r"is a LoraWeights; a DoraConfig exports DoraWeights only"):
        hf.to_state_dict(adapters, jaxpeft.DoraConfig(rank=2, alpha=6), params, fn)
    no_embed = {k: v for k, v in adapters.items() if k != "embed"}
    with pytest.raises(ValueError, match=r"`tied_head`='head' needs exactly one adapted, unstacked embedding"):
        hf.to_state_dict(no_embed, cfg, params, fn, layouts=layouts, tied_head="head")
    with pytest.raises(TypeError, match=r"`cfg` is a dict; expected the method config .*jaxpeft.MethodConfig subclass"):
        hf.to_state_dict(adapters, {"rank": 2}, params, fn)

    @dataclasses.dataclass(frozen=True)
    class MyLora(jaxpeft.LoraConfig):  # a user's subclass keeps LoRA's codec
        method = "mylora"

    assert hf.to_state_dict(adapters, MyLora(rank=2, alpha=6), params, fn, layouts=layouts)[0]["peft_type"] == "LORA"
    with pytest.raises(ValueError, match="maps both 'a/kernel' and 'b/kernel' to HF module 'x'"):
        two = {"a": {"kernel": jnp.zeros((4, 4))}, "b": {"kernel": jnp.zeros((4, 4))}}
        small = jaxpeft.LoraConfig(rank=1)
        hf.to_state_dict(jaxpeft.init(small, two, key=jax.random.key(0)), small, two, lambda m: "x")


def test_dora_and_ia3_export_refusals(zoo):
    _, params, layouts, _, _, _ = zoo
    fn = hf.module_name_map(stacked="layers")
    dora_cfg = jaxpeft.DoraConfig(rank=2, alpha=6, targets=["embed", "up"])
    dora = _random_adapters(dora_cfg, params, layouts)
    for kwargs in ({}, {"ensure_weight_tying": True}, {"tied_head": "head"}):
        with pytest.raises(
            ValueError,
            match=r"'embed/embedding' is a DoRA embedding. HF PEFT cannot reproduce .* "
            r"tied output head.* pass `ensure_weight_tying=False`",
        ):
            hf.to_state_dict(dora, dora_cfg, params, fn, **kwargs)
    no_embed = {"layers": dora["layers"]}
    config, _ = hf.to_state_dict(no_embed, dora_cfg, params, fn)  # no embedding: nothing to tie
    assert "ensure_weight_tying" not in config
    ia3_cfg = jaxpeft.IA3Config(targets=["up"], feedforward=())
    ia3 = _random_adapters(ia3_cfg, params, layouts)
    with pytest.raises(ValueError, match=r"\['tied_head'\] do not apply to IA3Config adapters"):
        hf.to_state_dict(ia3, ia3_cfg, params, fn, tied_head="head")
    with pytest.raises(ValueError, match=r"is a IA3Weights; a LoraConfig exports LoraWeights only"):
        hf.to_state_dict(ia3, jaxpeft.LoraConfig(), params, fn)


# ----------------------------------------------------------------------------------------------- import refusals


def _llama_files(llama_setup):
    _, params, _ = llama_setup
    cfg = jaxpeft.LoraConfig(rank=2, targets=["q_proj"])
    return hf.to_state_dict(_llama_adapters(cfg, llama_setup), cfg, params, llama.hf_module_name)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use_dora": True}, r"q_proj' has no `lora_magnitude_vector` although adapter_config.json sets use_dora"),
        ({"lora_bias": True}, r"sets `lora_bias`=True: LoRA bias terms"),
        ({"modules_to_save": ["lm_head"]}, r"entry 'lm_head'\) makes PEFT wrap HF module 'lm_head' .* no tensors"),
        ({"bias": "all"}, r"has `bias`='all': trained biases are not LoRA factors"),
        ({"peft_type": "BOFT"}, r"`peft_type`='BOFT'; jaxpeft.hf imports 'IA3', .*'LORA'.* configs=\(MyConfig,\)"),
        ({"init_lora_weights": "pissa_niter_4"}, r"rewrites the base weights, so the factors alone"),
        ({"r": 3}, r"'model.layers.0.self_attn.q_proj' has rank 2 in the tensors but 3 in adapter_config.json"),
    ],
)
def test_import_refuses_unsupported_configs(llama_setup, change, message):
    config, tensors = _llama_files(llama_setup)
    with pytest.raises(ValueError, match=message):
        hf.from_state_dict({**config, **change}, tensors, llama_setup[1], llama.hf_module_name)


def test_import_refuses_incomplete_or_foreign_tensors(llama_setup):
    _, params, _ = llama_setup
    config, tensors = _llama_files(llama_setup)
    fn = llama.hf_module_name
    magnitude = {**tensors, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": np.ones(16)}
    with pytest.raises(ValueError, match=r"q_proj' holds a DoRA `lora_magnitude_vector` but .* no use_dora=true"):
        hf.from_state_dict(config, magnitude, params, fn)
    foreign = {**tensors, "base_model.model.model.layers.0.self_attn.q_proj.lora_E": np.ones(2)}
    with pytest.raises(ValueError, match=r"tensors that are not LoRA or DoRA tensors .*: '.*q_proj.lora_E'"):
        hf.from_state_dict(config, foreign, params, fn)
    partial = {k: v for k, v in tensors.items() if ".layers.1." not in k}
    with pytest.raises(ValueError, match=r"stack into 'model/layers/self_attn/q_proj/kernel' \(3 layers\), .* \[1\]"):
        hf.from_state_dict(config, partial, params, fn)
    one_factor = {k: v for k, v in tensors.items() if not k.endswith("layers.1.self_attn.q_proj.lora_B.weight")}
    with pytest.raises(ValueError, match=r"'model.layers.1.self_attn.q_proj' has only one of its two LoRA factors"):
        hf.from_state_dict(config, one_factor, params, fn)
    renamed = {k.replace("q_proj", "query_proj"): v for k, v in tensors.items()}
    with pytest.raises(ValueError, match=r"HF modules 'model.layers.0.self_attn.query_proj'.* match no parameter"):
        hf.from_state_dict({**config, "target_modules": ["query_proj"]}, renamed, params, fn)
    ia3_config = {"peft_type": "IA3", "target_modules": ["q_proj"], "feedforward_modules": []}
    with pytest.raises(ValueError, match=r"tensors that are not IA3 vectors \(ia3_l\): '.*lora_A"):
        hf.from_state_dict(ia3_config, tensors, params, fn)
    other = llama.abstract_params(llama.LlamaConfig(**{**LLAMA.__dict__, "hidden_size": 32, "head_dim": 8}))
    with pytest.raises(ValueError, match=r"has LoRA factors A \(2, 16\), B \(16, 2\) that do not fit"):
        hf.from_state_dict(config, tensors, other, fn)


def test_dora_import_refusals(llama_setup):
    _, params, layouts = llama_setup
    fn = llama.hf_module_name
    cfg = jaxpeft.DoraConfig(rank=2, targets=["q_proj", "embed_tokens"])
    adapters = _llama_adapters(cfg, llama_setup)
    config, tensors = hf.to_state_dict(adapters, cfg, params, fn, ensure_weight_tying=False)
    cfg2, back = hf.from_state_dict(config, tensors, params, fn, layouts=layouts)
    assert type(cfg2) is jaxpeft.DoraConfig
    _assert_adapters_equal(back, adapters)
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector"
    with pytest.raises(ValueError, match=r"q_proj' has a lora_magnitude_vector of shape \(16, 1\); .* needs \(16,\)"):
        hf.from_state_dict(config, {**tensors, key: tensors[key][:, None]}, params, fn)
    missing = {k: v for k, v in tensors.items() if k != key}
    with pytest.raises(ValueError, match=r"layers.1.self_attn.q_proj' has no `lora_magnitude_vector`"):
        hf.from_state_dict(config, missing, params, fn)
    # PEFT's tied head copy of a DoRA embedding (with a magnitude per vocabulary row) has no jaxpeft equivalent.
    emb = "base_model.model.model.embed_tokens"
    tied = {
        **tensors,
        "base_model.model.head.lora_A.weight": tensors[f"{emb}.lora_embedding_B"].T,
        "base_model.model.head.lora_B.weight": tensors[f"{emb}.lora_embedding_A"].T,
        "base_model.model.head.lora_magnitude_vector": np.ones(LLAMA.vocab_size, np.float32),
    }
    with pytest.raises(ValueError, match=r"'head' is a tied output head's copy of a DoRA embedding; HF PEFT cannot"):
        hf.from_state_dict({**config, "ensure_weight_tying": True}, tied, params, fn)


def test_ia3_import_refusals(llama_setup):
    _, params, layouts = llama_setup
    fn = llama.hf_module_name
    cfg = jaxpeft.IA3Config()  # keys, values and the feed-forward down projection
    config, tensors = hf.to_state_dict(_llama_adapters(cfg, llama_setup), cfg, params, fn)
    with pytest.raises(ValueError, match=r"`feedforward_modules`=None; .* PEFT then takes them from its defaults"):
        hf.from_state_dict({**config, "feedforward_modules": None}, tensors, params, fn, layouts=layouts)
    with pytest.raises(ValueError, match=r"entry 'lm_head'\) makes PEFT wrap HF module 'lm_head' .* no tensors"):
        hf.from_state_dict({**config, "modules_to_save": ["lm_head"]}, tensors, params, fn, layouts=layouts)
    with pytest.raises(ValueError, match=r"down_proj' has ia3_l of shape \(1, 24\), but as a non-feed-forward"):
        hf.from_state_dict({**config, "feedforward_modules": []}, tensors, params, fn, layouts=layouts)
    with pytest.raises(ValueError, match=r"k_proj' has ia3_l of shape \(8, 1\), but as a feed-forward module"):
        hf.from_state_dict({**config, "feedforward_modules": "(?!x).*"}, tensors, params, fn, layouts=layouts)
    partial = {k: v for k, v in tensors.items() if ".layers.2.mlp" not in k}
    with pytest.raises(ValueError, match=r"stack into 'model/layers/mlp/down_proj/kernel' \(3 layers\), .* \[2\]"):
        hf.from_state_dict(config, partial, params, fn, layouts=layouts)
    _, back = hf.from_state_dict(config, tensors, params, fn)  # stacked 2-D kernels need no layouts
    assert dict(jaxpeft.layouts_of(back)) == {p: layouts[p] for p in jaxpeft.layouts_of(back)}


def test_base_embedding_copy_is_checked(llama_setup):
    _, abstract, _ = llama_setup
    params = jax.tree.map(lambda s: jnp.asarray(np.random.default_rng(0).standard_normal(s.shape), s.dtype), abstract)
    config, tensors = _llama_files(llama_setup)
    table = np.asarray(params["model"]["embed_tokens"]["embedding"])
    same = {**tensors, "base_model.model.model.embed_tokens.base_layer.weight": table}
    hf.from_state_dict(config, same, params, llama.hf_module_name)
    changed = {**tensors, "base_model.model.model.embed_tokens.base_layer.weight": table + 1.0}
    with pytest.raises(ValueError, match=r"carries base weight 'model.embed_tokens.base_layer.weight' that differs"):
        hf.from_state_dict(config, changed, params, llama.hf_module_name)
    hf.from_state_dict(config, changed, params, llama.hf_module_name, base_weights="ignore")
    with pytest.raises(ValueError, match=r"`params` are abstract, so it cannot be checked"):
        hf.from_state_dict(config, same, abstract, llama.hf_module_name)


def test_import_directory_errors(tmp_path, llama_setup):
    with pytest.raises(FileNotFoundError, match=r"no adapter_config\.json in"):
        hf.import_adapters(tmp_path, llama_setup[1], llama.hf_module_name)
    (tmp_path / hf.CONFIG_NAME).write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(FileNotFoundError, match=r"pickled adapter_model\.bin, which jaxpeft does not read"):
        hf.import_adapters(tmp_path, llama_setup[1], llama.hf_module_name)


# ----------------------------------------------------------------------------------------------- modules_to_save


def _bert_head_files(head, params=None, **kwargs):
    """A BERT LoRA (query, value) export with ``head`` as the module to save ``classifier``."""
    params = bert.abstract_params(BERT) if params is None else params
    cfg = jaxpeft.LoraConfig(rank=2, targets=["query", "value"])
    adapters = _random_adapters(cfg, params)
    config, tensors = hf.to_state_dict(
        adapters, cfg, params, bert.hf_module_name, modules_to_save={"classifier": head}, **kwargs
    )
    return params, adapters, config, tensors


def _head(seed=1, features=BERT.hidden_size, classes=3):
    rng = np.random.default_rng(seed)
    return {
        "kernel": jnp.asarray(rng.standard_normal((features, classes)), jnp.float32),
        "bias": jnp.asarray(rng.standard_normal(classes), jnp.float32),
    }


def test_modules_to_save_round_trip_in_peft_naming(tmp_path):
    """A head outside the base params travels as PEFT writes it: `base_model.model.classifier.weight` [out, in]."""
    head = _head()
    params, adapters, config, tensors = _bert_head_files(head, task_type="FEATURE_EXTRACTION")
    assert config["modules_to_save"] == ["classifier"]
    np.testing.assert_array_equal(tensors["base_model.model.classifier.weight"], np.asarray(head["kernel"]).T)
    np.testing.assert_array_equal(tensors["base_model.model.classifier.bias"], np.asarray(head["bias"]))
    assert len(tensors) == 2 + 2 * 2 * BERT.num_hidden_layers
    like = {"classifier": jax.eval_shape(lambda: head)}
    _, back, saved = hf.from_state_dict(config, tensors, params, bert.hf_module_name, modules_to_save=like)
    _assert_adapters_equal(back, adapters)
    assert _flat(saved).keys() == {"classifier/kernel", "classifier/bias"}
    for leaf in ("kernel", "bias"):
        np.testing.assert_array_equal(saved["classifier"][leaf], head[leaf])
    # Without `modules_to_save` the file is refused by name, never imported without its head.
    with pytest.raises(ValueError, match=r"holds fully trained modules .*'classifier' \('bias', 'weight'\)\. Pass "):
        hf.from_state_dict(config, tensors, params, bert.hf_module_name)
    # The same for IA3.
    ia3 = jaxpeft.IA3Config(targets=["key", "value"], feedforward=())
    ia3_adapters = _random_adapters(ia3, params)
    config, tensors = hf.to_state_dict(
        ia3_adapters, ia3, params, bert.hf_module_name, modules_to_save={"classifier": head}
    )
    assert config["peft_type"] == "IA3" and config["modules_to_save"] == ["classifier"]
    _, back, saved = hf.from_state_dict(config, tensors, params, bert.hf_module_name, modules_to_save=like)
    _assert_adapters_equal(back, ia3_adapters)
    np.testing.assert_array_equal(saved["classifier"]["kernel"], head["kernel"])

    # Through files: a nested head (submodules, a leaf given in torch layout, a norm's scale) in bfloat16.
    nested = {"dense": _head(2, classes=16), "out": {"weight": jnp.ones((3, 16))}, "norm": {"scale": jnp.ones(16)}}
    nested = jax.tree.map(lambda x: x.astype(jnp.bfloat16), nested)
    cfg = jaxpeft.LoraConfig(rank=2, targets=["query", "value"])
    hf.export_adapters(tmp_path, adapters, cfg, params, bert.hf_module_name, modules_to_save={"head": nested})
    shapes = _tensor_shapes(tmp_path)
    saved_keys = {k: v for k, v in shapes.items() if k.startswith("head.")}
    assert saved_keys == {
        "head.dense.weight": (16, 16),
        "head.dense.bias": (16,),
        "head.out.weight": (3, 16),
        "head.norm.weight": (16,),
    }
    _, back, saved = hf.import_adapters(tmp_path, params, bert.hf_module_name, modules_to_save={"head": nested})
    _assert_adapters_equal(back, adapters)
    assert jax.tree.map(lambda x: x.dtype, saved["head"]) == jax.tree.map(lambda x: x.dtype, nested)
    assert _flat(saved["head"]).keys() == _flat(nested).keys()
    for k, v in _flat(nested).items():
        np.testing.assert_array_equal(_flat(saved["head"])[k], v, err_msg=k)


def test_modules_to_save_export_refusals():
    params = bert.abstract_params(BERT)
    fn = bert.hf_module_name
    cfg = jaxpeft.LoraConfig(rank=2, targets=["query", "value"])
    adapters = _random_adapters(cfg, params)

    def export(modules, params=params, **kwargs):
        return hf.to_state_dict(adapters, cfg, params, fn, modules_to_save=modules, **kwargs)

    with pytest.raises(TypeError, match=r"`modules_to_save` is a list; expected \{HF module name: its trained"):
        export([_head()])
    with pytest.raises(ValueError, match=r"`modules_to_save`\['classifier'\] has a leaf 'mean'; jaxpeft converts"):
        export({"classifier": {**_head(), "mean": jnp.ones(3)}})
    with pytest.raises(ValueError, match=r"leaf 'kernel' has shape \(2, 8, 3\); a `kernel` converts to torch only"):
        export({"classifier": {"kernel": jnp.ones((2, 8, 3))}})
    with pytest.raises(
        ValueError, match=r"`modules_to_save` key 'cls/head' is not a torch module name: expected names"
    ):
        export({"cls/head": _head()})
    with pytest.raises(ValueError, match=r"`modules_to_save` names 'head' and 'head.out' inside it"):
        export({"head": _head(), "head.out": _head()})
    # PEFT adapts nothing inside a module to save: it would drop these adapters.
    with pytest.raises(ValueError, match=r"module 'encoder.layer.0.attention' would hold the adapted modules 'enc"):
        export({"encoder.layer.0.attention": {"output": {"dense": _head(classes=16)}}})
    # PEFT wraps every module whose name ends with an entry: "dense" names many modules of BERT.
    with pytest.raises(ValueError, match=r"entry 'dense' would also wrap HF module 'encoder.layer.0.attention.out"):
        export({"dense": _head()})
    # A module of `params` retrained: the tree must be the whole module, in its shapes.
    cls_params = bert.abstract_params(BERT, with_classifier=True)
    cls_fn = bert.hf_module_name
    cls_adapters = _random_adapters(cfg, cls_params)
    with pytest.raises(ValueError, match=r"gives torch parameters \{weight: \(3, 16\)\}, but `params` hold that"):
        hf.to_state_dict(
            cls_adapters, cfg, cls_params, cls_fn, modules_to_save={"classifier": {"kernel": jnp.ones((16, 3))}}
        )
    with pytest.raises(
        ValueError,
        match=r"\{bias: \(3,\), weight: \(3, 16\)\}, but `params` hold .* \{bias: \(2,\), weight: \(2, 16\)\}",
    ):
        hf.to_state_dict(cls_adapters, cfg, cls_params, cls_fn, modules_to_save={"classifier": _head()})
    # SEQ_CLS makes PEFT wrap `classifier` (and `score`) whatever the config says.
    with pytest.raises(ValueError, match=r"`task_type`='SEQ_CLS' makes PEFT treat modules named like 'classifier'"):
        hf.to_state_dict(cls_adapters, cfg, cls_params, cls_fn, task_type="SEQ_CLS")
    config, _ = hf.to_state_dict(
        cls_adapters, cfg, cls_params, cls_fn, task_type="SEQ_CLS", modules_to_save={"classifier": _head(classes=2)}
    )
    assert config["modules_to_save"] == ["classifier"] and config["task_type"] == "SEQ_CLS"


def test_modules_to_save_import_refusals():
    head = _head()
    params, _, config, tensors = _bert_head_files(head)
    fn = bert.hf_module_name
    like = {"classifier": head}

    def load(config=config, tensors=tensors, like=like, params=params):
        return hf.from_state_dict(config, tensors, params, fn, modules_to_save=like)

    with pytest.raises(ValueError, match=r"`modules_to_save` asks for 'head', but the adapter file saves 'classifier'"):
        load(like={"head": head})
    with pytest.raises(ValueError, match=r"the adapter file also saves 'classifier' .*; add it to `modules_to_save`"):
        load(like={})
    with pytest.raises(ValueError, match=r"module to save 'classifier' also holds 'bias', which .* lacks; PEFT loads"):
        load(like={"classifier": {"kernel": head["kernel"]}})
    with pytest.raises(
        ValueError, match=r"has 'norm/scale', but the adapter file has no tensor classifier.norm.weight"
    ):
        load(like={"classifier": {**head, "norm": {"scale": jnp.ones(3)}}})
    with pytest.raises(ValueError, match=r"classifier.weight has shape \(3, 16\); .*'kernel' of shape \(16, 2\) needs"):
        load(like={"classifier": {"kernel": jnp.ones((16, 2)), "bias": head["bias"]}})
    with pytest.raises(ValueError, match=r"has `modules_to_save`='classifier'; expected a list of module names"):
        load(config={**config, "modules_to_save": "classifier"})
    nan = {**tensors, "base_model.model.classifier.bias": np.full(3, np.nan, np.float32)}
    with pytest.raises(ValueError, match=r"adapter tensor 'base_model.model.classifier.bias' holds NaN"):
        load(tensors=nan)
    # An entry that selects an adapted module: PEFT would not adapt it, so it would ignore those tensors.
    with pytest.raises(ValueError, match=r"adapter tensor '.*layer.0.attention.self.query.lora_A.weight' inside 'enc"):
        load(config={**config, "modules_to_save": ["classifier", "attention"]})
    # SEQ_CLS (PEFT adds classifier/score) on a model whose params hold a classifier the file does not save.
    cls_params = bert.abstract_params(BERT, with_classifier=True)
    cls_cfg = jaxpeft.LoraConfig(rank=2, targets=["query", "value"])
    cls_adapters = _random_adapters(cls_cfg, cls_params)
    plain, plain_tensors = hf.to_state_dict(cls_adapters, cls_cfg, cls_params, fn)
    with pytest.raises(ValueError, match=r"\(`task_type='SEQ_CLS'`, entry 'classifier'\) makes PEFT wrap HF module"):
        hf.from_state_dict({**plain, "task_type": "SEQ_CLS"}, plain_tensors, cls_params, fn)
    no_head = {k: v for k, v in tensors.items() if "classifier" not in k}
    hf.from_state_dict({**config, "modules_to_save": None, "task_type": "SEQ_CLS"}, no_head, params, fn)  # none there
