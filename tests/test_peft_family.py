"""LoHa, LoKr and VeRA: each formula against NumPy, against HF PEFT's own layers, and their documented errors."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpeft
import jaxpeft.linen
from jaxpeft.methods.lokr import factorization
from jaxpeft.methods.vera import projection

RNG = np.random.default_rng(0)


class Two(nn.Module):
    """Two Dense layers on the same input (``lin1``: 4 outputs, ``lin2``: ``out`` outputs)."""

    out: int = 8

    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="lin1")(x), nn.Dense(self.out, name="lin2")(x)


def _params(d_in: int, out: int) -> dict:
    def dense(o):
        return {"kernel": jnp.asarray(RNG.standard_normal((d_in, o)), jnp.float32), "bias": jnp.ones(o)}

    return {"lin1": dense(4), "lin2": dense(out)}


def _random(adapters, seed=5, size=0.5):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(size * rng.standard_normal(x.shape), x.dtype), adapters)


def _run(cfg, d_in=6, out=8, batch=3):
    """(params, random adapters, x, our outputs as float64)."""
    params = _params(d_in, out)
    adapters = _random(jaxpeft.init(cfg, params, key=jax.random.key(0)))
    x = jnp.asarray(RNG.standard_normal((batch, d_in)), jnp.float32)
    y1, y2 = jaxpeft.linen.apply(Two(out), {"params": params}, adapters, x)
    return params, adapters, x, (np.asarray(y1, np.float64), np.asarray(y2, np.float64))


def _f64(*arrays):
    return [np.asarray(a, np.float64) for a in arrays]


def _check_merge(params, adapters, node_path, delta):
    """``merge`` adds exactly ``delta`` to the kernel; ``unmerge`` takes it out."""
    merged = jaxpeft.merge(params, adapters)
    w = np.asarray(params[node_path]["kernel"], np.float64)
    np.testing.assert_allclose(np.asarray(merged[node_path]["kernel"]), w + delta, rtol=1e-5, atol=1e-5)
    back = jaxpeft.unmerge(merged, adapters)
    np.testing.assert_allclose(np.asarray(back[node_path]["kernel"]), w, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- formulas


def test_loha_formula():
    params, adapters, x, (_, out) = _run(jaxpeft.LohaConfig(rank=2, alpha=3, targets=["lin2"]))
    ad = adapters["lin2"]["kernel"]
    a1, b1, a2, b2 = _f64(ad.a1, ad.b1, ad.a2, ad.b2)
    delta = 1.5 * (a1 @ b1) * (a2 @ b2)
    np.testing.assert_allclose(np.asarray(ad.delta((6, 8))), delta, rtol=1e-5, atol=1e-6)
    w, bias = _f64(params["lin2"]["kernel"], params["lin2"]["bias"])
    np.testing.assert_allclose(out, np.asarray(x) @ (w + delta) + bias, rtol=1e-5, atol=1e-5)
    _check_merge(params, adapters, "lin2", delta)


@pytest.mark.parametrize(
    ("rank", "both", "fields"),
    [(4, False, {"w1", "w2"}), (1, False, {"w1", "w2_a", "w2_b"}), (1, True, {"w1_a", "w1_b", "w2_a", "w2_b"})],
)
def test_lokr_formula(rank, both, fields):
    # fan-in 12 = 3·4, fan-out 16 = 4·4: W1 (3, 4), W2 (4, 4); rank 1 < 4/2 makes W2 (and with both, W1) low-rank
    cfg = jaxpeft.LokrConfig(rank=rank, alpha=2, targets=["lin2"], decompose_both=both)
    params, adapters, x, (_, out) = _run(cfg, d_in=12, out=16)
    ad = adapters["lin2"]["kernel"]
    assert {f for f in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b") if getattr(ad, f) is not None} == fields
    w1 = _f64(ad.w1)[0] if ad.w1 is not None else np.matmul(*_f64(ad.w1_a, ad.w1_b))
    w2 = _f64(ad.w2)[0] if ad.w2 is not None else np.matmul(*_f64(ad.w2_a, ad.w2_b))
    assert w1.shape == (3, 4) and w2.shape == (4, 4)
    delta = (2 / rank) * np.kron(w1, w2)
    np.testing.assert_allclose(np.asarray(ad.delta((12, 16))), delta, rtol=1e-5, atol=1e-6)
    w, bias = _f64(params["lin2"]["kernel"], params["lin2"]["bias"])
    np.testing.assert_allclose(out, np.asarray(x) @ (w + delta) + bias, rtol=1e-5, atol=1e-5)
    _check_merge(params, adapters, "lin2", delta)


def test_vera_formula_and_shared_sliced_projections():
    cfg = jaxpeft.VeraConfig(rank=4, targets=["lin1", "lin2"], projection_prng_key=3)
    params, adapters, x, outs = _run(cfg)
    b_full = np.asarray(projection(3, 1, 8, 4), np.float64).T * np.sqrt(6 / 4)  # (r, max out)
    a_full = np.asarray(projection(3, 0, 6, 4), np.float64) * np.sqrt(6 / 6)  # (in, r)
    for name, n_out, out in (("lin1", 4, outs[0]), ("lin2", 8, outs[1])):
        ad = adapters[name]["kernel"]
        a, b = _f64(*ad.projections())
        np.testing.assert_array_equal(a, a_full)
        np.testing.assert_allclose(b, b_full[:, :n_out], rtol=1e-7)  # lin1 reads the first 4 columns of the same B
        d, lb = _f64(ad.lambda_d, ad.lambda_b)
        w, bias = _f64(params[name]["kernel"], params[name]["bias"])
        xs = np.asarray(x, np.float64)
        np.testing.assert_allclose(out, xs @ w + bias + (((xs @ a) * d) @ b) * lb, rtol=1e-5, atol=1e-5)
        _check_merge(params, adapters, name, (a * d) @ (b * lb))


def test_vera_projection_is_fixed_and_uniform():
    """The projection is jaxpeft's own hash: these values may never change (saved vectors would mean another model)."""
    np.testing.assert_array_equal(projection(0, 0, 2, 2), projection(0, 0, 5, 3)[:2, :2])
    first = np.asarray(projection(0, 0, 1, 3))
    assert not np.array_equal(first, np.asarray(projection(1, 0, 1, 3)))
    assert not np.array_equal(first, np.asarray(projection(0, 1, 1, 3)))
    np.testing.assert_allclose(first, VERA_GOLDEN, rtol=0, atol=1e-7)
    big = np.asarray(projection(7, 0, 256, 256))
    assert -1 <= big.min() < -0.99 and 0.99 < big.max() < 1
    assert abs(big.mean()) < 0.01 and abs(big.std() - 1 / np.sqrt(3)) < 0.01


VERA_GOLDEN = [[-0.484752893447876, -0.7565972805023193, 0.8301408290863037]]  # projection(0, 0, 1, 3)


def test_lokr_dense_never_forms_the_kronecker_product():
    params = {
        "lin2": {"kernel": jnp.ones((64, 48)), "bias": jnp.zeros(48)},
        "lin1": {"kernel": jnp.ones((64, 4)), "bias": jnp.zeros(4)},
    }
    adapters = _random(jaxpeft.init(jaxpeft.LokrConfig(rank=2, targets=["lin2"]), params, key=jax.random.key(0)))
    x = jnp.ones((3, 64))
    jaxpr = jax.make_jaxpr(lambda a: jaxpeft.linen.apply(Two(48), {"params": params}, a, x))(adapters)
    sizes = [v.aval.size for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars if hasattr(v.aval, "size")]
    assert sizes and max(sizes) < 64 * 48  # no weight-sized intermediate (x·W is (3, 48))


def test_lokr_dense_general_matches_the_formed_update():
    class Gen(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.DenseGeneral((2, 6), axis=(-2, -1), name="g")(x)

    model, x = Gen(), jnp.asarray(RNG.standard_normal((3, 2, 4)), jnp.float32)
    params = jax.tree.map(lambda s: jnp.asarray(RNG.standard_normal(s.shape), jnp.float32),
                          jax.eval_shape(model.init, jax.random.key(0), x)["params"])  # fmt: skip
    cfg = jaxpeft.LokrConfig(rank=1, alpha=1, targets=["g"])
    adapters = _random(jaxpeft.linen.init(cfg, model, params, x, key=jax.random.key(1)))
    ad = adapters["g"]["kernel"]
    assert (ad.fan_in_shape, ad.fan_out_shape) == ((2, 4), (2, 6))
    out = jaxpeft.linen.apply(model, {"params": params}, adapters, x)
    merged = model.apply({"params": jaxpeft.merge(params, adapters)}, x)
    np.testing.assert_allclose(out, merged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dimension", [1, 2, 7, 12, 64, 96, 127, 128, 256, 768, 1000, 4096, 11008])
@pytest.mark.parametrize("factor", [-1, 1, 2, 3, 4, 8, 16, 64])
def test_factorization_matches_peft(dimension, factor):
    peft_lokr = pytest.importorskip("peft.tuners.lokr.layer")
    assert factorization(dimension, factor) == peft_lokr.factorization(dimension, factor)


# ----------------------------------------------------------------------------------------------- inits


def test_inits_are_identity_with_peft_bounds():
    params = _params(12, 16)
    loha = jaxpeft.init(jaxpeft.LohaConfig(rank=4, targets=["lin2"]), params, key=jax.random.key(0))["lin2"]["kernel"]
    assert not np.any(np.asarray(loha.a2)) and np.asarray(loha.delta((12, 16))).max() == 0
    assert np.abs(loha.a1).max() <= 1 / np.sqrt(12) and np.abs(loha.b1).max() <= 1 / np.sqrt(4)
    lokr = jaxpeft.init(jaxpeft.LokrConfig(rank=1, targets=["lin2"]), params, key=jax.random.key(0))["lin2"]["kernel"]
    assert not np.any(np.asarray(lokr.w1)) and np.abs(lokr.w2_a).max() <= 1 / np.sqrt(4)
    assert np.abs(lokr.w2_b).max() <= 1.0 and np.any(np.asarray(lokr.w2_b))
    vera = jaxpeft.init(jaxpeft.VeraConfig(rank=8, targets=["lin2"]), params, key=jax.random.key(0))["lin2"]["kernel"]
    np.testing.assert_array_equal(vera.lambda_d, np.full(8, 0.1, np.float32))
    np.testing.assert_array_equal(vera.lambda_b, np.zeros(16, np.float32))
    a, b = vera.projections()
    assert np.abs(a).max() <= np.sqrt(6 / 12) and np.abs(b).max() <= np.sqrt(6 / 8)
    assert jax.tree.leaves(vera) == [vera.lambda_d, vera.lambda_b]  # A and B are no leaves: no grads, no state


# ----------------------------------------------------------------------------------------------- against HF PEFT


def _torch_pair(d_in: int, out: int, params: dict):
    torch = pytest.importorskip("torch")

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin1, self.lin2 = torch.nn.Linear(d_in, 4), torch.nn.Linear(d_in, out)

        def forward(self, x):
            return self.lin1(x), self.lin2(x)

    module = M()
    with torch.no_grad():
        for name in ("lin1", "lin2"):
            layer = getattr(module, name)
            layer.weight.copy_(torch.tensor(np.asarray(params[name]["kernel"]).T))
            layer.bias.copy_(torch.tensor(np.asarray(params[name]["bias"])))
    return torch, module


def _set(torch, table, value):
    with torch.no_grad():
        table["default"].copy_(torch.tensor(np.ascontiguousarray(np.asarray(value, np.float32))))


def _peft_outputs(torch, model, x):
    with torch.no_grad():
        return [y.numpy() for y in model(torch.tensor(np.asarray(x)))]


def test_loha_matches_peft():
    peft = pytest.importorskip("peft")
    params, adapters, x, (_, out) = _run(jaxpeft.LohaConfig(rank=2, alpha=3, targets=["lin2"]))
    torch, module = _torch_pair(6, 8, params)
    model = peft.get_peft_model(module, peft.LoHaConfig(r=2, alpha=3, target_modules=["lin2"]))
    layer, ad = model.base_model.model.lin2, adapters["lin2"]["kernel"]
    assert tuple(layer.hada_w1_a["default"].shape) == ad.b1.T.shape and tuple(layer.hada_w2_b["default"].shape) == (
        ad.a2.T.shape
    )
    for name, value in (("hada_w1_a", ad.b1.T), ("hada_w1_b", ad.a1.T), ("hada_w2_a", ad.b2.T), ("hada_w2_b", ad.a2.T)):
        _set(torch, getattr(layer, name), value)
    np.testing.assert_allclose(_peft_outputs(torch, model, x)[1], out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("rank", "both", "factor"), [(4, False, -1), (1, False, -1), (1, True, -1), (2, True, 2)])
def test_lokr_matches_peft(rank, both, factor):
    peft = pytest.importorskip("peft")
    cfg = jaxpeft.LokrConfig(rank=rank, alpha=2, targets=["lin2"], decompose_both=both, decompose_factor=factor)
    params, adapters, x, (_, out) = _run(cfg, d_in=12, out=16)
    torch, module = _torch_pair(12, 16, params)
    peft_cfg = peft.LoKrConfig(r=rank, alpha=2, target_modules=["lin2"], decompose_both=both, decompose_factor=factor)
    model = peft.get_peft_model(module, peft_cfg)
    layer, ad = model.base_model.model.lin2, adapters["lin2"]["kernel"]
    ours = {"lokr_w1": ad.w1, "lokr_w1_a": ad.w1_b, "lokr_w1_b": ad.w1_a, "lokr_w2": ad.w2}
    ours |= {"lokr_w2_a": ad.w2_b, "lokr_w2_b": ad.w2_a}
    theirs = {name for name in ours if "default" in getattr(layer, name)}
    assert theirs == {name for name, v in ours.items() if v is not None}  # same full / low-rank choice
    for name in theirs:
        assert tuple(getattr(layer, name)["default"].shape) == ours[name].T.shape
        _set(torch, getattr(layer, name), ours[name].T)
    np.testing.assert_allclose(_peft_outputs(torch, model, x)[1], out, rtol=1e-5, atol=1e-5)


def test_vera_matches_peft():
    peft = pytest.importorskip("peft")
    cfg = jaxpeft.VeraConfig(rank=4, targets=["lin1", "lin2"], projection_prng_key=0)
    params, adapters, x, outs = _run(cfg)
    torch, module = _torch_pair(6, 8, params)
    model = peft.get_peft_model(module, peft.VeraConfig(r=4, target_modules=["lin1", "lin2"]))
    a, b = adapters["lin2"]["kernel"].projections()  # lin2 is the widest: its A and B are PEFT's whole buffers
    _set(torch, model.base_model.vera_A, a.T)
    _set(torch, model.base_model.vera_B, b.T)
    for name in ("lin1", "lin2"):
        layer, ad = getattr(model.base_model.model, name), adapters[name]["kernel"]
        _set(torch, layer.vera_lambda_d, ad.lambda_d)
        _set(torch, layer.vera_lambda_b, ad.lambda_b)
    for theirs, ours in zip(_peft_outputs(torch, model, x), outs, strict=True):
        np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- configs, errors

CONFIGS = [
    jaxpeft.LohaConfig(rank=4, alpha=2, targets=["q", "v"], rank_pattern={"q": 8}, alpha_pattern={"v": 3}),
    jaxpeft.LokrConfig(rank=2, targets=r"kernel$", exclude=["head"], decompose_factor=4, decompose_both=True),
    jaxpeft.VeraConfig(rank=16, targets=["q"], projection_prng_key=7, d_initial=0.2, dropout=0.1, dtype="bfloat16"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.method)
def test_json_round_trip_and_lookup(cfg):
    assert type(cfg).from_json(cfg.to_json()) == cfg
    assert jaxpeft.config_from_dict(cfg.to_dict()) == cfg
    assert hash(cfg) == hash(type(cfg).from_json(cfg.to_json()))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: jaxpeft.LohaConfig(rank=0), r"`rank`=0; expected a positive integer"),
        (lambda: jaxpeft.LokrConfig(rank=-1), r"`rank`=-1; expected a positive integer"),
        (lambda: jaxpeft.VeraConfig(rank=0), r"`rank`=0; expected a positive integer"),
        (lambda: jaxpeft.LohaConfig(alpha=0), r"`alpha`=0; expected a positive finite number"),
        (lambda: jaxpeft.LokrConfig(decompose_factor=0), r"`decompose_factor`=0; expected -1 .* or a positive"),
        (lambda: jaxpeft.LokrConfig(decompose_both="yes"), r"`decompose_both`='yes'; expected True or False"),
        (lambda: jaxpeft.VeraConfig(projection_prng_key=-1), r"`projection_prng_key`=-1; expected an integer seed"),
        (lambda: jaxpeft.VeraConfig(d_initial="0.1"), r"`d_initial`='0.1'; expected a finite number"),
        (lambda: jaxpeft.LohaConfig(dtype="int8"), r"`dtype`='int8'; adapters need a floating dtype"),
        (lambda: jaxpeft.LokrConfig(rank_pattern={"q": 0}), r"`rank_pattern`\['q'\]=0; expected a positive"),
    ],
)
def test_bad_configs_are_refused_by_name(make, match):
    with pytest.raises(ValueError, match=match):
        make()


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(10, 4, name="embed")(ids)
        return nn.Dense(4, name="lin")(nn.Conv(4, (3,), name="conv")(x))


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (jaxpeft.LokrConfig(targets=r"kernel$"), r"LoKr cannot adapt 'conv/kernel' \(a conv weight\); it adapts"),
        (jaxpeft.VeraConfig(targets=r"kernel$"), r"VeRA cannot adapt 'conv/kernel' \(a conv weight\); it adapts"),
        (jaxpeft.LohaConfig(targets=["embed"]), r"LoHa cannot adapt 'embed/embedding' \(a embed weight\)"),
        (jaxpeft.LohaConfig(targets=["lin"], rank_pattern={"nope": 2}), r"`rank_pattern` key 'nope' matches none"),
    ],
)
def test_unsupported_layers_are_refused_with_path_and_fix(cfg, match):
    ids = jnp.zeros((1, 5), jnp.int32)
    params = jax.eval_shape(ConvNet().init, jax.random.key(0), ids)["params"]
    with pytest.raises(ValueError, match=match + r".*(`exclude`|fix the regex)"):
        jaxpeft.linen.plan(cfg, ConvNet(), params, ids)


def test_loha_adapts_a_convolution_exactly():
    ids = jnp.asarray([[1, 2, 3, 4, 5]])
    model = ConvNet()
    params = jax.tree.map(lambda s: jnp.asarray(RNG.standard_normal(s.shape), jnp.float32),
                          jax.eval_shape(model.init, jax.random.key(0), ids)["params"])  # fmt: skip
    adapters = _random(jaxpeft.linen.init(jaxpeft.LohaConfig(rank=2, targets=["conv"]), model, params, ids,
                                          key=jax.random.key(0)))  # fmt: skip
    out = jaxpeft.linen.apply(model, {"params": params}, adapters, ids)
    np.testing.assert_allclose(out, model.apply({"params": jaxpeft.merge(params, adapters)}, ids), rtol=1e-5, atol=1e-5)


def test_weight_axes_shard_like_the_base_weight():
    from jax.sharding import PartitionSpec as P

    params = {"q": {"kernel": jnp.ones((2, 8, 12))}}  # a scan-stacked (layers, in, out) kernel
    layouts = {"q/kernel": jaxpeft.Layout(stack=1)}
    specs = {"q": {"kernel": P("pipe", "data", "model")}}
    for cfg in (jaxpeft.LohaConfig(rank=2, targets=["q"]), jaxpeft.LokrConfig(rank=1, targets=["q"]),
                jaxpeft.VeraConfig(rank=4, targets=["q"])):  # fmt: skip
        node = jaxpeft.sharding.adapter_specs(jaxpeft.init(cfg, params, key=jax.random.key(0), layouts=layouts), specs)
        node = node["q"]["kernel"]
        if cfg.method == "loha":
            assert (node.a1, node.b1) == (P("pipe", "data", None), P("pipe", None, "model"))
        elif cfg.method == "lokr":
            assert node.w1 == P("pipe", None, None) and node.w2_a == P("pipe", None, None)
        else:
            assert (node.lambda_d, node.lambda_b) == (P("pipe", None), P("pipe", "model"))
