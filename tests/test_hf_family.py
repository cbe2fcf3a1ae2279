"""jaxpeft.hf for LoHa, LoKr and VeRA: round trips of every layer kind, HF PEFT logits both ways, refusals.

The PEFT tests need the ``interop`` extra (torch CPU, transformers, peft) and are skipped without it.
"""

import copy
import dataclasses
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpeft
import jaxpeft.hf as hf
import jaxpeft.linen
from jaxpeft.methods.vera import shared_projections

pytestmark = [
    # Notices from transformers/peft themselves (PEFT's save_pretrained probes a deprecated transformers API; PEFT's
    # VeRA warns when its random init is kept); nothing of jaxpeft's.
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]
TOL = 1e-4
IDS = np.random.default_rng(0).integers(1, 60, (2, 9)).astype(np.int64)
# LoHa, LoKr and VeRA over Llama's q/v (fan-out 32 and 16) and up/down (fan-in 32 and 48): mixed sizes, scanned.
LLAMA_TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
CONFIGS = {
    "loha": jaxpeft.LohaConfig(rank=4, alpha=6, targets=LLAMA_TARGETS, rank_pattern={"down_proj": 2}),
    "lokr": jaxpeft.LokrConfig(rank=2, alpha=3, targets=LLAMA_TARGETS, decompose_both=True, alpha_pattern={"up": 5}),
    "vera": jaxpeft.VeraConfig(rank=8, targets=LLAMA_TARGETS, projection_prng_key=5, d_initial=0.3),
}


def _randomise(adapters, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape).astype(np.float32) * 0.3), adapters)


def _random_adapters(cfg, params, layouts, seed=0):
    shapes = jax.eval_shape(lambda p: jaxpeft.init(cfg, p, key=jax.random.key(0), layouts=layouts), params)
    return _randomise(shapes, seed)


def _static(node):
    return {f.name: getattr(node, f.name) for f in dataclasses.fields(node) if f.metadata.get("static")}


def _assert_adapters_equal(a, b):
    """Same arrays bit for bit, same node types and the same static fields."""
    na, nb = dict(jaxpeft.adapter_items(a)), dict(jaxpeft.adapter_items(b))
    assert na.keys() == nb.keys()
    for k in na:
        assert type(na[k]) is type(nb[k]), k
        sa, sb = _static(na[k]), _static(nb[k])
        assert sa.pop("scale", 1.0) == pytest.approx(sb.pop("scale", 1.0), rel=1e-9), k
        assert sa == sb, k
        for field in dataclasses.fields(na[k]):
            if not field.metadata.get("static") and getattr(na[k], field.name) is not None:
                np.testing.assert_array_equal(getattr(na[k], field.name), getattr(nb[k], field.name), err_msg=k)


# ----------------------------------------------------------------------------------------------- without torch


class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return nn.Dense(8, name="up")(h), None


class Zoo(nn.Module):
    """DenseGeneral with two fan-out and two fan-in axes, a scanned Dense, an Einsum and a Conv."""

    @nn.compact
    def __call__(self, x, img):
        h = nn.DenseGeneral((2, 4), name="split")(x)
        h = nn.DenseGeneral(12, axis=(-2, -1), name="merge")(h)
        h = nn.Dense(8, name="narrow")(h)
        h, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)(name="layers")(
            h, None
        )
        h = nn.Einsum((8, 2, 4), "btd,dhk->bthk", name="heads")(h)
        return h, nn.Conv(4, (3, 3), name="conv")(img)


@pytest.fixture(scope="module")
def zoo():
    model = Zoo()
    x, img = jnp.ones((1, 3, 6)), jnp.ones((1, 5, 5, 2))
    params = _randomise(jax.eval_shape(model.init, jax.random.key(0), x, img)["params"], seed=1)
    layouts = jaxpeft.linen.infer_layouts(model, x, img)
    return model, params, layouts, (x, img)


ZOO_CONFIGS = {
    "loha": jaxpeft.LohaConfig(rank=2, alpha=5, targets=["split", "merge", "up", "heads", "conv"]),
    "lokr": jaxpeft.LokrConfig(rank=1, alpha=2, targets=["split", "merge", "narrow", "up", "heads"]),
    "lokr_both": jaxpeft.LokrConfig(rank=1, targets=["merge", "up"], decompose_both=True, decompose_factor=2),
    "vera": jaxpeft.VeraConfig(rank=4, targets=["split", "merge", "narrow", "up", "heads"], dropout=0.1),
}


def test_file_layout_of_each_method(zoo):
    _, params, layouts, _ = zoo
    fn = hf.module_name_map(stacked="layers")
    shapes = {}
    for name in ("loha", "lokr_both", "vera"):
        cfg = ZOO_CONFIGS[name]
        config, tensors = hf.to_state_dict(_random_adapters(cfg, params, layouts), cfg, params, fn, layouts=layouts)
        shapes[name] = {k.removeprefix("base_model.model."): v.shape for k, v in tensors.items()}
        assert json.loads(json.dumps(config)) == config
    loha = shapes["loha"]
    assert loha["conv.hada_w1_a"] == (4, 2) and loha["conv.hada_w1_b"] == (2, 2 * 3 * 3)  # torch (in, kh, kw)
    assert loha["merge.hada_w2_b"] == (2, 8) and loha["layers.1.up.hada_w2_a"] == (8, 2)
    lokr = shapes["lokr_both"]  # merge: in 8 = 2·4, out 12 = 2·6; W1 (2, 2) full, W2 (4, 6) low-rank
    assert (lokr["merge.lokr_w1"], lokr["merge.lokr_w2_a"], lokr["merge.lokr_w2_b"]) == ((2, 2), (6, 1), (1, 4))
    vera = shapes["vera"]
    assert vera["base_model.vera_A"] == (4, 12) and vera["base_model.vera_B"] == (12, 4)  # largest in / out
    assert vera["heads.vera_lambda_b"] == (8,) and vera["layers.0.up.vera_lambda_d"] == (4,)


def test_vera_bound_is_the_largest_fan_in_of_all_targets(zoo):
    """PEFT's shared vera_A is scaled for the largest fan-in; each layer reads its top-left block."""
    _, params, layouts, _ = zoo
    adapters = jaxpeft.init(ZOO_CONFIGS["vera"], params, key=jax.random.key(0), layouts=layouts)
    full_a, full_b = (np.asarray(m) for m in shared_projections(0, 4, 12, 12, 12))
    for path, node in jaxpeft.adapter_items(adapters):
        assert node.shared_fan_in == 12, path
        a, b = node.projections()
        n_in = math.prod(node.fan_in_shape)
        np.testing.assert_array_equal(np.reshape(np.asarray(a), (n_in, 4)), full_a[:n_in])
        np.testing.assert_array_equal(np.reshape(np.asarray(b), (4, -1)), full_b[:, : np.asarray(b)[0].size])
    plan = jaxpeft.plan(ZOO_CONFIGS["vera"], params, layouts=layouts)
    assert {t.node.shared_fan_in for t in plan.targets} == {12}
    assert "largest_fan_in" not in ZOO_CONFIGS["vera"].to_dict()
    # init_target on its own (no selection) treats the weight as the only target.
    one = ZOO_CONFIGS["vera"].init_target(
        "narrow/kernel", params["narrow"]["kernel"], jaxpeft.Layout(), jax.random.key(0)
    )
    assert one.shared_fan_in == 12 and one.bound_fan_in == 12


def test_export_refusals(zoo):
    _, params, layouts, _ = zoo
    fn = hf.module_name_map(stacked="layers")
    cfg = ZOO_CONFIGS["vera"]
    adapters = _random_adapters(cfg, params, layouts)
    part = {k: v for k, v in adapters.items() if k != "narrow"}  # narrow has the largest fan-in (12)
    with pytest.raises(ValueError, match=r"scales its projection A for a largest fan-in of 12, but the largest"):
        hf.to_state_dict(part, cfg, params, fn, layouts=layouts)
    with pytest.raises(ValueError, match=r"has rank 4, projection_prng_key 0 and dropout 0.1, but `cfg` gives 4, 1"):
        hf.to_state_dict(adapters, dataclasses.replace(cfg, projection_prng_key=1), params, fn, layouts=layouts)
    loha = ZOO_CONFIGS["loha"]
    with pytest.raises(ValueError, match=r"adapter 'conv/kernel' has rank 2 but `cfg` gives rank 3; pass its config"):
        hf.to_state_dict(_random_adapters(loha, params, layouts), dataclasses.replace(loha, rank=3), params, fn)
    lokr = ZOO_CONFIGS["lokr_both"]
    with pytest.raises(ValueError, match=r"adapter 'merge/kernel' has LoKr factors .* but `cfg` \(rank 1, deco"):
        other = dataclasses.replace(lokr, decompose_factor=-1)  # 12 = 3·4 instead of 2·6
        hf.to_state_dict(_random_adapters(lokr, params, layouts), other, params, fn, layouts=layouts)
    with pytest.raises(ValueError, match=r"\['tied_head'\] do not apply to LohaConfig adapters"):
        hf.to_state_dict({}, loha, params, fn, tied_head="lm_head")


def _files(zoo, name):
    _, params, layouts, _ = zoo
    cfg = ZOO_CONFIGS[name]
    fn = hf.module_name_map(stacked="layers")
    config, tensors = hf.to_state_dict(_random_adapters(cfg, params, layouts), cfg, params, fn, layouts=layouts)
    return config, tensors, lambda c, t: hf.from_state_dict(c, t, params, fn, layouts=layouts)


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("loha", {"rank_dropout": 0.1}, r"`rank_dropout`=0.1: rank dropout .* set `rank_dropout` to 0 in the file"),
        ("lokr", {"module_dropout": 0.2}, r"`module_dropout`=0.2: module dropout .* not implemented in jaxpeft"),
        ("loha", {"rank_dropout": "0"}, r"`rank_dropout`='0'; expected a rate in \[0, 1\)"),
        ("loha", {"use_effective_conv2d": True}, r"`use_effective_conv2d`=true and 'conv/kernel' is a convolution"),
        ("lokr", {"decompose_factor": 0}, r"`decompose_factor`=0; expected -1 or a positive whole number"),
        ("lokr", {"init_weights": "pissa"}, r"`init_weights`='pissa'; expected true or false or 'lycoris'"),
        ("lokr", {"decompose_factor": -1}, r"HF module 'merge' has LoKr tensors .* gives .* \(PEFT's rule\)"),
        ("loha", {"r": 3}, r"HF module 'conv' has rank 2 in the tensors but 3 in adapter_config.json"),
        ("loha", {"fan_in_fan_out": True}, r"sets `fan_in_fan_out`=True, which PEFT 0.21.2's LoHaConfig does not"),
        ("vera", {"save_projection": False}, r"`save_projection`=false: the file lacks VeRA's shared projections"),
        ("vera", {"bias": "all"}, r"`bias`='all': trained biases are not VeRA vectors"),
        ("vera", {"exclude_modules": ["up"]}, r"sets `exclude_modules`=\['up'\], which PEFT 0.21.2's VeraConfig"),
        ("vera", {"r": 2}, r"HF module 'heads' has vera_lambda_d \(4,\) .* with r=2 needs \(2,\)"),
        ("lokr", {"modules_to_save": ["merge"]}, r"adapter tensor .*merge.lokr_w1' inside 'merge', a module to save"),
    ],
)
def test_import_refusals(zoo, name, change, message):
    config, tensors, read = _files(zoo, "lokr_both" if name == "lokr" else name)
    with pytest.raises(ValueError, match=message):
        read({**config, **change}, tensors)


def test_import_refuses_incomplete_or_foreign_tensors(zoo):
    config, tensors, read = _files(zoo, "vera")
    for key in ("base_model.vera_A", "base_model.model.heads.vera_lambda_b"):
        rest = {k: v for k, v in tensors.items() if k != key}
        with pytest.raises(ValueError, match=r"has no 'base_model.vera_A'|has only one of vera_lambda_d"):
            read(config, rest)
    wrong = {**tensors, "base_model.vera_B": tensors["base_model.vera_B"][:8]}
    with pytest.raises(ValueError, match=r"'base_model.vera_B' has shape \(8, 4\), but PEFT sizes it \(12, 4\)"):
        read(config, wrong)
    config, tensors, read = _files(zoo, "loha")
    with pytest.raises(ValueError, match=r"HF module 'conv' lacks LoHa tensors \['hada_w2_b'\]"):
        read(config, {k: v for k, v in tensors.items() if k != "base_model.model.conv.hada_w2_b"})
    with pytest.raises(ValueError, match=r"CP-decomposed convolution factors \(`use_effective_conv2d`=true"):
        read(config, {**tensors, "base_model.model.conv.hada_t1": np.ones((2, 2, 3, 3), np.float32)})
    bad = {**tensors, "base_model.model.merge.hada_w1_a": np.ones((5, 2), np.float32)}
    with pytest.raises(ValueError, match=r"HF module 'merge' has hada_w1_a \(5, 2\) and hada_w1_b \(2, 8\);"):
        read(config, bad)
    config, tensors, read = _files(zoo, "lokr")
    conv = {"conv/kernel": jaxpeft.Layout(fan_in=3, kind="conv")}
    _, params, layouts, _ = zoo
    extra = {**tensors, "base_model.model.conv.lokr_w1": np.ones((2, 1), np.float32)}
    extra |= {"base_model.model.conv.lokr_w2": np.ones((2, 18), np.float32)}
    with pytest.raises(ValueError, match=r"HF module 'conv' is a LoKr convolution .* Dense, DenseGeneral and Einsum"):
        hf.from_state_dict(
            {**config, "target_modules": [*config["target_modules"], "conv"]},
            extra,
            params,
            hf.module_name_map(stacked="layers"),
            layouts={**layouts, **conv},
        )


# ----------------------------------------------------------------------------------------------- against HF PEFT


def _logits(torch_model):
    import torch

    with torch.no_grad():
        return torch_model(input_ids=torch.tensor(IDS)).logits.numpy()


def _diff(ours, theirs):
    return float(np.max(np.abs(np.asarray(ours, np.float32) - theirs)))


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(4, (3, 3), padding=1, name="conv")(x)


def test_loha_conv_matches_hf_peft(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    class TorchNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(x)

    torch.manual_seed(1)
    torch_model = TorchNet().eval()
    w = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    params = {
        "conv": {"kernel": jnp.asarray(w["conv.weight"].transpose(2, 3, 1, 0)), "bias": jnp.asarray(w["conv.bias"])}
    }
    model = ConvNet()
    x = np.random.default_rng(2).standard_normal((2, 5, 5, 2)).astype(np.float32)
    layouts = jaxpeft.linen.infer_layouts(model, jnp.asarray(x))
    cfg = jaxpeft.LohaConfig(rank=2, alpha=3, targets=["conv"])
    adapters = _random_adapters(cfg, params, layouts, seed=4)
    ours = jaxpeft.linen.apply(model, {"params": params}, adapters, jnp.asarray(x))
    hf.export_adapters(tmp_path, adapters, cfg, params, {"conv": "conv"}, layouts=layouts)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), tmp_path).eval()
    with torch.no_grad():
        theirs = loaded(torch.tensor(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
        base = torch_model(torch.tensor(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    assert _diff(ours, base) > 1e-2 and _diff(ours, theirs) < TOL
