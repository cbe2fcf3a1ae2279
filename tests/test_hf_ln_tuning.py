"""jaxpeft.hf for LayerNorm tuning (PEFT ``LN_TUNING``): round trips, HF PEFT logits both ways, refusals.

The PEFT tests need the ``interop`` extra (torch CPU, transformers, peft) and are skipped without it; the rest run
on a tiny scanned Flax model.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpeft
import jaxpeft.hf as hf
import jaxpeft.linen

pytestmark = [
    # PEFT's save_pretrained probes a deprecated transformers API, and its LN tuning warns that a norm has no
    # in/out features when it wraps one; nothing of jaxpeft's.
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Unsupported layer type .*RMSNorm.* encountered:UserWarning"),
]
TOL = 1e-4
IDS = np.random.default_rng(0).integers(1, 60, (2, 9)).astype(np.int64)
LLAMA_NORMS = ["input_layernorm", "post_attention_layernorm", "norm"]
PREFIX = "base_model.model."


def _randomise(adapters, seed, scale=0.3):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape).astype(np.float32) * scale), adapters)


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


# ----------------------------------------------------------------------------------------------- a tiny Flax model


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.LayerNorm(name="ln")(x)
        return x + nn.Dense(8, name="proj")(h), None


class _Net(nn.Module):
    """Two scanned blocks (a LayerNorm with scale and bias, a Dense) and a final RMSNorm."""

    @nn.compact
    def __call__(self, x):
        blocks = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
        x, _ = blocks(name="layers")(x, None)
        return nn.RMSNorm(name="norm")(x)


NAME = hf.module_name_map(stacked="layers")
X = jnp.asarray(np.random.default_rng(1).standard_normal((3, 8)), jnp.float32)


@pytest.fixture(scope="module")
def net():
    model = _Net()
    params = model.init(jax.random.key(0), X)["params"]
    # Non-trivial base norms, so that "saved - base" is really tested.
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(3), p.shape), params)
    return model, params


def _net_adapters(params, cfg, seed=2):
    return _randomise(jax.eval_shape(lambda: jaxpeft.init(cfg, params, key=jax.random.key(0))), seed)


def test_export_writes_base_plus_delta_for_every_norm_parameter(net):
    """Each tuned norm's whole parameter set, per layer of the scan, tuned values; untuned leaves as the base."""
    _, params = net
    cfg = jaxpeft.LNTuningConfig(targets=r"(ln|norm)/scale$")  # the LayerNorm's bias stays untuned
    adapters = _net_adapters(params, cfg)
    config, tensors = hf.to_state_dict(adapters, cfg, params, NAME)
    assert config["peft_type"] == "LN_TUNING" and config["target_modules"] == ["ln", "norm"]
    assert sorted(tensors) == [
        f"{PREFIX}layers.{i}.ln.ln_tuning_layers.{p}" for i in (0, 1) for p in ("bias", "weight")
    ] + [f"{PREFIX}norm.ln_tuning_layers.weight"]
    ln, delta = params["layers"]["ln"], adapters["layers"]["ln"]["scale"].delta
    np.testing.assert_array_equal(tensors[f"{PREFIX}layers.1.ln.ln_tuning_layers.weight"], (ln["scale"] + delta)[1])
    np.testing.assert_array_equal(tensors[f"{PREFIX}layers.1.ln.ln_tuning_layers.bias"], ln["bias"][1])
    np.testing.assert_array_equal(
        tensors[f"{PREFIX}norm.ln_tuning_layers.weight"],
        params["norm"]["scale"] + adapters["norm"]["scale"].delta,
    )


def test_round_trip_is_exact(net, tmp_path):
    """export -> import gives adapters whose model is the same bit for bit; exporting them again, the same files."""
    model, params = net
    cfg = jaxpeft.LNTuningConfig()
    adapters = _net_adapters(params, cfg)
    hf.export_adapters(tmp_path, adapters, cfg, params, NAME)
    cfg2, back = hf.import_adapters(tmp_path, params, NAME)
    assert isinstance(cfg2, jaxpeft.LNTuningConfig) and cfg2.dtype == "float32"
    assert jax.tree.structure(back) == jax.tree.structure(adapters)
    for (path, a), (_, b) in zip(jaxpeft.adapter_items(adapters), jaxpeft.adapter_items(back), strict=True):
        assert a.layout == b.layout, path
        np.testing.assert_allclose(b.delta, a.delta, atol=1e-6, err_msg=path)
    _assert_trees_equal(jaxpeft.merge(params, back), jaxpeft.merge(params, adapters))
    ours = jaxpeft.linen.apply(model, {"params": params}, adapters, X)
    np.testing.assert_array_equal(jaxpeft.linen.apply(model, {"params": params}, back, X), ours)
    config, tensors = hf.to_state_dict(adapters, cfg, params, NAME)
    config2, tensors2 = hf.to_state_dict(back, cfg2, params, NAME)
    assert config2 == config and tensors2.keys() == tensors.keys()
    for key in tensors:
        np.testing.assert_array_equal(tensors2[key], tensors[key], err_msg=key)
    # The import trains every parameter of each norm in the file, as PEFT does: a scale-only export comes back
    # with a zero delta on the LayerNorm's bias, and the same model.
    scale_only = jaxpeft.LNTuningConfig(targets=r"scale$")
    adapters = _net_adapters(params, scale_only, seed=4)
    _, back = hf.from_state_dict(*hf.to_state_dict(adapters, scale_only, params, NAME), params, NAME)
    assert not np.any(back["layers"]["ln"]["bias"].delta)
    _assert_trees_equal(jaxpeft.merge(params, back), jaxpeft.merge(params, adapters))


def test_bfloat16_base_round_trips_exactly(net):
    """Over a bf16 base the file holds bf16 norms (what the model sees) and the imported model is the same."""
    _, params = net
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    cfg = jaxpeft.LNTuningConfig()
    adapters = _net_adapters(params, cfg)
    config, tensors = hf.to_state_dict(adapters, cfg, params, NAME)
    assert {t.dtype.name for t in tensors.values()} == {"bfloat16"}
    _, back = hf.from_state_dict(config, tensors, params, NAME)
    np.testing.assert_array_equal(
        np.asarray(jaxpeft.merge(params, back)["norm"]["scale"], np.float32),
        np.asarray(jaxpeft.merge(params, adapters)["norm"]["scale"], np.float32),
    )


def _file(params, **config):
    cfg = jaxpeft.LNTuningConfig()
    base_config, tensors = hf.to_state_dict(_net_adapters(params, cfg), cfg, params, NAME)
    return {**base_config, **config}, tensors


def test_import_refusals(net):
    _, params = net
    config, tensors = _file(params)
    # A file tuning a module that is no norm of `params` (PEFT's LN tuning copies any module it targets).
    kernel = np.asarray(params["layers"]["proj"]["kernel"][0]).T
    bad = {**tensors, f"{PREFIX}layers.0.proj.ln_tuning_layers.weight": kernel}
    with pytest.raises(ValueError, match=r"tunes HF module 'layers.0.proj', which in `params` is not a norm layer"):
        hf.from_state_dict({**config, "target_modules": ["ln", "norm", "proj"]}, bad, params, NAME)
    # ... or no module at all.
    bad = {**tensors, f"{PREFIX}head.ln_tuning_layers.weight": np.ones(8, np.float32)}
    with pytest.raises(ValueError, match=r"HF module 'head' matches no norm of `params` through `module_name`"):
        hf.from_state_dict({**config, "target_modules": ["ln", "norm", "head"]}, bad, params, NAME)
    # The base params are needed: the file holds tuned values, not differences.
    with pytest.raises(
        ValueError, match=r"`params` is NoneType with no arrays; importing LN tuning needs the concrete"
    ):
        hf.from_state_dict(config, tensors, None, NAME)
    abstract = jax.eval_shape(lambda: params)
    with pytest.raises(
        ValueError, match=r"`params` hold '.*' as a ShapeDtypeStruct; an LN_TUNING file holds the tuned"
    ):
        hf.from_state_dict(config, tensors, abstract, NAME)
    # A norm parameter the module does not have (RMSNorm has no bias), or one missing (PEFT saves all).
    bad = {**tensors, f"{PREFIX}norm.ln_tuning_layers.bias": np.zeros(8, np.float32)}
    with pytest.raises(ValueError, match=r"holds 'bias', 'weight' for HF module 'norm', but its norm 'norm' in"):
        hf.from_state_dict(config, bad, params, NAME)
    bad = {k: v for k, v in tensors.items() if k != f"{PREFIX}layers.1.ln.ln_tuning_layers.bias"}
    with pytest.raises(ValueError, match=r"holds 'weight' for HF module 'layers.1.ln'.*every parameter"):
        hf.from_state_dict(config, bad, params, NAME)
    # A stack needs every layer.
    bad = {k: v for k, v in tensors.items() if ".1.ln." not in k}
    with pytest.raises(
        ValueError, match=r"tunes the norm 'layers/ln/bias' of 2 stacked layers, but not in layers \[1\]"
    ):
        hf.from_state_dict(config, bad, params, NAME)
    # Shapes, foreign tensors, config/tensor disagreement, unknown fields, peft_type.
    bad = {**tensors, f"{PREFIX}norm.ln_tuning_layers.weight": np.ones(4, np.float32)}
    with pytest.raises(ValueError, match=r"norm.ln_tuning_layers.weight has shape \(4,\), but 'norm/scale' holds"):
        hf.from_state_dict(config, bad, params, NAME)
    bad = {**tensors, f"{PREFIX}norm.lora_A.weight": np.ones((2, 8), np.float32)}
    with pytest.raises(ValueError, match=r"tensors that are not LN tuning norm parameters"):
        hf.from_state_dict(config, bad, params, NAME)
    with pytest.raises(ValueError, match=r"HF modules 'norm', but .* does not select them"):
        hf.from_state_dict({**config, "target_modules": ["ln"]}, tensors, params, NAME)
    with pytest.raises(ValueError, match=r"`layers_to_transform`=\[0\], which PEFT 0.21.2's LNTuningConfig"):
        hf.from_state_dict({**config, "layers_to_transform": [0]}, tensors, params, NAME)
    with pytest.raises(ValueError, match=r"`target_modules`=None; expected the adapted module names"):
        hf.from_state_dict({**config, "target_modules": None}, tensors, params, NAME)
    with pytest.raises(ValueError, match=r"`base_weights`='keep'; expected 'check' or 'ignore'"):
        hf.from_state_dict(config, tensors, params, NAME, base_weights="keep")
    with pytest.raises(ValueError, match=r"`dtype`='nope' is not a dtype"):
        hf.from_state_dict(config, tensors, params, NAME, dtype="nope")
    with pytest.raises(ValueError, match=r"`modules_to_save`='norm'; expected a list"):
        hf.from_state_dict({**config, "modules_to_save": "norm"}, tensors, params, NAME)


def test_export_refusals(net):
    _, params = net
    cfg = jaxpeft.LNTuningConfig()
    adapters = _net_adapters(params, cfg)
    with pytest.raises(ValueError, match=r"`params` hold '.*' as a ShapeDtypeStruct; .*exporting LN tuning needs"):
        hf.to_state_dict(adapters, cfg, jax.eval_shape(lambda: params), NAME)
    layouts = {"layers/proj/kernel": jaxpeft.Layout(stack=1)}
    lora = jaxpeft.init(jaxpeft.LoraConfig(rank=2, targets=["proj"]), params, key=jax.random.key(0), layouts=layouts)
    with pytest.raises(ValueError, match=r"adapter 'layers/proj/kernel' is a LoraWeights .*LeafDelta nodes on norm"):
        hf.to_state_dict(lora, cfg, params, NAME)
    with pytest.raises(ValueError, match=r"maps norm 'layers/ln' \(1 stack axes\) to 'layers.ln'"):
        hf.to_state_dict(adapters, cfg, params, hf.module_name_map())
    with pytest.raises(ValueError, match=r"maps both norms 'layers/ln' and 'norm' to HF module 'x.0'"):
        hf.to_state_dict(adapters, cfg, params, lambda m: "x.{layer}" if m.startswith("layers") else "x.0")
    with pytest.raises(ValueError, match=r"`target_modules`=\['ln'\] does not select the exported modules 'norm'"):
        hf.to_state_dict(adapters, cfg, params, NAME, target_modules=["ln"])
    with pytest.raises(ValueError, match=r"\['tied_head'\] do not apply to LNTuningConfig adapters"):
        hf.to_state_dict(adapters, cfg, params, NAME, tied_head="head")
    with pytest.raises(TypeError, match=r"`cfg` is a BitFitConfig: jaxpeft.hf does not write bitfit adapters"):
        hf.to_state_dict(adapters, jaxpeft.BitFitConfig(), params, NAME)
    # A tuned norm cannot also be a PEFT module to save (PEFT adapts nothing inside one), either way.
    with pytest.raises(ValueError, match=r"`modules_to_save` module 'norm' would hold the adapted modules 'norm'"):
        hf.to_state_dict(adapters, cfg, params, NAME, modules_to_save={"norm": params["norm"]})
    config, tensors = hf.to_state_dict(adapters, cfg, params, NAME)
    with pytest.raises(
        ValueError, match=r"holds adapter tensor 'base_model.model.norm.ln_tuning_layers.weight' inside"
    ):
        hf.from_state_dict({**config, "modules_to_save": ["norm"]}, tensors, params, NAME)
