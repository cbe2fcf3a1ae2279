"""jaxpeft.hf without torch: file format, module-name rules, round trips of every layer kind, refusals."""

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
    """Non-zero A and B (B starts at zero), drawn with numpy so no per-shape JAX compile is needed."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape).astype(np.float32) * 0.3), adapters)


def _random_adapters(cfg, params, layouts=None, seed=0):
    """Adapters of ``cfg``'s shapes with random A and B (shapes from an abstract ``jaxpeft.init``)."""
    shapes = jax.eval_shape(lambda: jaxpeft.init(cfg, params, key=jax.random.key(0), layouts=layouts))
    return _randomise(shapes, seed)


def _flat(tree):
    return {jaxpeft.path_str(kp): np.asarray(x) for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_adapters_equal(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)
    la = dict(jaxpeft.methods.lora.adapter_items(a))
    lb = dict(jaxpeft.methods.lora.adapter_items(b))
    for k in la:
        assert la[k].scale == pytest.approx(lb[k].scale, rel=1e-9), k
        assert la[k].dropout == lb[k].dropout


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
        assert hf._hf_pattern_key(list(config["rank_pattern"]), f"model.layers.{i}.mlp.down_proj") is not None
        assert hf._hf_pattern_key(list(config["rank_pattern"]), f"model.layers.{i}.self_attn.q_proj") is None
    cfg2, back = hf.from_state_dict(config, tensors, params, llama.hf_module_name, layouts=layouts)
    _assert_adapters_equal(back, adapters)
    for path in ("model/layers/mlp/down_proj/kernel", "model/layers/self_attn/v_proj/kernel"):
        assert cfg2.rank_for(path) == cfg.rank_for(path) and cfg2.scale_for(path) == pytest.approx(cfg.scale_for(path))
    # The imported config plans exactly the imported adapters (so it can be checkpointed and re-initialised).
    rows = jaxpeft.plan(cfg2, params, layouts=layouts).targets
    assert {t.path: (t.a_shape, t.b_shape) for t in rows} == {
        p: (w.a.shape, w.b.shape) for p, w in jaxpeft.methods.lora.adapter_items(back)
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
    """Embed, DenseGeneral with two fan-out and two fan-in axes, a scanned Dense and a Conv."""

    @nn.compact
    def __call__(self, ids, img):
        h = nn.Embed(10, 8, name="embed")(ids)
        h = nn.DenseGeneral((2, 4), name="split")(h)
        h = nn.DenseGeneral(8, axis=(-2, -1), name="merge")(h)
        h, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)(name="layers")(h)
        return h, nn.Conv(3, (3, 3), name="conv")(img)


@pytest.fixture(scope="module")
def zoo():
    model = Zoo()
    ids, img = jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 5, 5, 2))
    params = _randomise(jax.eval_shape(model.init, jax.random.key(0), ids, img)["params"], seed=1)
    layouts = jaxpeft.linen.infer_layouts(model, ids, img)
    cfg = jaxpeft.LoraConfig(rank=2, alpha=6, targets=["embed", "split", "merge", "up", "conv"])
    adapters = _random_adapters(cfg, params, layouts)
    return model, params, layouts, cfg, adapters, (ids, img)


def test_every_layer_kind_round_trips(zoo, tmp_path):
    model, params, layouts, cfg, adapters, args = zoo
    fn = hf.module_name_map(stacked="layers")
    hf.export_adapters(tmp_path, adapters, cfg, params, fn, layouts=layouts)
    with safe_open(os.path.join(tmp_path, hf.WEIGHTS_NAME), "numpy") as f:
        shapes = {k.removeprefix("base_model.model."): f.get_tensor(k).shape for k in f.keys()}  # noqa: SIM118
    assert shapes == {
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
        "conv.lora_A.weight": (2, 2, 3, 3),  # torch Conv2d [r, in, kh, kw]
        "conv.lora_B.weight": (3, 2, 1, 1),  # 1x1 conv [out, r, 1, 1]
    }
    _, back = hf.import_adapters(tmp_path, params, fn, layouts=layouts)
    _assert_adapters_equal(back, adapters)
    y0 = jaxpeft.linen.apply(model, {"params": params}, adapters, *args)
    y1 = jaxpeft.linen.apply(model, {"params": params}, back, *args)
    jax.tree.map(lambda u, v: np.testing.assert_array_equal(np.asarray(u), np.asarray(v)), y0, y1)
    # Kernels with one axis per side need no layouts on import (the conv and embed factors say what they are).
    sub = {k: v for k, v in back.items() if k in ("embed", "layers", "conv")}
    sub_cfg = jaxpeft.LoraConfig(rank=2, alpha=6, targets=["embed", "up", "conv"])
    _, again = hf.from_state_dict(*hf.to_state_dict(sub, sub_cfg, params, fn, layouts=layouts), params, fn)
    _assert_adapters_equal(again, sub)


def test_export_refuses_what_it_cannot_write_exactly(zoo):
    _, params, layouts, cfg, adapters, _ = zoo
    fn = hf.module_name_map(stacked="layers")
    with pytest.raises(ValueError, match=r"'merge/kernel' has 2 fan-in axes .* pass `layouts="):
        hf.to_state_dict(adapters, cfg, params, fn, layouts={"conv/kernel": layouts["conv/kernel"]})
    with pytest.raises(ValueError, match=r"maps 'layers/up/kernel' .* to 'layers.up': a scan-stacked parameter"):
        hf.to_state_dict(adapters, cfg, params, hf.module_name_map(), layouts=layouts)
    with pytest.raises(ValueError, match=r"adapter 'conv/kernel' has rank 2 but `cfg` gives rank 3"):
        hf.to_state_dict(adapters, jaxpeft.LoraConfig(rank=3, targets=["embed"]), params, fn, layouts=layouts)
    with pytest.raises(ValueError, match=r"has scale 3.0 but `cfg` gives 1.0"):
        hf.to_state_dict(adapters, jaxpeft.LoraConfig(rank=2, alpha=2), params, fn, layouts=layouts)

    class DoraWeights(jaxpeft.LoraWeights):
        pass

    dora = {"embed": {"embedding": DoraWeights(*jax.tree.leaves(adapters["embed"]), 3.0)}}
    with pytest.raises(ValueError, match=r"is a DoraWeights; jaxpeft.hf exports plain LoRA"):
        hf.to_state_dict(dora, cfg, params, fn)
    no_embed = {k: v for k, v in adapters.items() if k != "embed"}
    with pytest.raises(ValueError, match=r"`tied_head`='head' needs exactly one adapted, unstacked embedding"):
        hf.to_state_dict(no_embed, cfg, params, fn, layouts=layouts, tied_head="head")
    with pytest.raises(TypeError, match="`cfg` is a dict"):
        hf.to_state_dict(adapters, {"rank": 2}, params, fn)
    with pytest.raises(ValueError, match="maps both 'a/kernel' and 'b/kernel' to HF module 'x'"):
        two = {"a": {"kernel": jnp.zeros((4, 4))}, "b": {"kernel": jnp.zeros((4, 4))}}
        small = jaxpeft.LoraConfig(rank=1)
        hf.to_state_dict(jaxpeft.init(small, two, key=jax.random.key(0)), small, two, lambda m: "x")


# ----------------------------------------------------------------------------------------------- import refusals


def _llama_files(llama_setup):
    _, params, _ = llama_setup
    cfg = jaxpeft.LoraConfig(rank=2, targets=["q_proj"])
    return hf.to_state_dict(_llama_adapters(cfg, llama_setup), cfg, params, llama.hf_module_name)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use_dora": True}, r"use_dora=True: DoRA .* refusing to import"),
        ({"lora_bias": True}, r"lora_bias=True: LoRA bias terms"),
        ({"modules_to_save": ["lm_head"]}, r"modules_to_save=\['lm_head'\]: fully trained modules"),
        ({"bias": "all"}, r"bias='all': trained biases are not LoRA factors"),
        ({"peft_type": "IA3"}, r"peft_type='IA3'; jaxpeft.hf imports 'LORA' adapters only"),
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
    with pytest.raises(ValueError, match=r"not plain LoRA factors: '.*lora_magnitude_vector'"):
        hf.from_state_dict(config, magnitude, params, fn)
    partial = {k: v for k, v in tensors.items() if ".layers.1." not in k}
    with pytest.raises(ValueError, match=r"stack into 'model/layers/self_attn/q_proj/kernel' \(3 layers\), .* \[1\]"):
        hf.from_state_dict(config, partial, params, fn)
    one_factor = {k: v for k, v in tensors.items() if not k.endswith("layers.1.self_attn.q_proj.lora_B.weight")}
    with pytest.raises(ValueError, match=r"'model.layers.1.self_attn.q_proj' has only one of its two LoRA factors"):
        hf.from_state_dict(config, one_factor, params, fn)
    renamed = {k.replace("q_proj", "query_proj"): v for k, v in tensors.items()}
    with pytest.raises(ValueError, match=r"HF modules 'model.layers.0.self_attn.query_proj'.* match no parameter"):
        hf.from_state_dict(config, renamed, params, fn)
    other = llama.abstract_params(llama.LlamaConfig(**{**LLAMA.__dict__, "hidden_size": 32, "head_dim": 8}))
    with pytest.raises(ValueError, match=r"has LoRA factors A \(2, 16\), B \(16, 2\) that do not fit"):
        hf.from_state_dict(config, tensors, other, fn)


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
