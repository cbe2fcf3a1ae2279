"""PiSSA and OLoRA (``LoraConfig(init="pissa" | "pissa_niter_<n>" | "olora")``): the base-adjusting LoRA inits.

Checked against HF PEFT's own layer (residual base and ``s·A·B``), identity at init over the residual params through
Linen and NNX, merge/unmerge, the conversion to plain rank-2r LoRA over the original weights (and that file loaded
in PEFT), the randomised SVD against the full one, and every refusal.
"""

from __future__ import annotations

import copy

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxpeft
import jaxpeft.hf as hf
import jaxpeft.linen
import jaxpeft.nnx as jnnx

TOL = 1e-5
INITS = ("pissa", "olora", "pissa_niter_4")


def close(x, y, tol=TOL):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=tol, atol=tol)


def perturb(adapters, seed=3, size=0.1):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + size * rng.standard_normal(x.shape).astype(np.float32), adapters)


def delta(node):
    """``s·A·B`` of a LoRA node as a kernel-shaped float64 array (unstacked, 2-D fan axes)."""
    return node.scale * np.asarray(node.a, np.float64) @ np.asarray(node.b, np.float64)


# ----------------------------------------------------------------------------------------------- a small model


class Mlp(nn.Module):
    """Dense -> DenseGeneral (two output axes) -> Dense: plain and multi-axis kernels."""

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(12, name="fc1")(x))
        h = nn.DenseGeneral((2, 5), name="heads")(h)
        return nn.Dense(5, name="fc2")(jnp.tanh(h.reshape(*h.shape[:-2], 10)))


MLP = Mlp()
X = jnp.asarray(np.random.default_rng(2).standard_normal((4, 8)), jnp.float32)
TARGETS = ["fc1", "heads", "fc2"]


@pytest.fixture(scope="module")
def params():
    shapes = jax.eval_shape(MLP.init, jax.random.key(0), X)["params"]
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape).astype(np.float32) * 0.5), shapes)


def linen_out(params, adapters=None):
    if adapters is None:
        return MLP.apply({"params": params}, X)
    return jaxpeft.linen.apply(MLP, {"params": params}, adapters, X)


# ----------------------------------------------------------------------------------------------- against PEFT


@pytest.mark.parametrize(("init", "rslora"), [("pissa", False), ("pissa", True), ("olora", False)])
def test_residual_and_update_match_peft(init, rslora):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(12, 7)

        def forward(self, x):
            return self.lin(x)

    torch.manual_seed(0)
    toy = Toy()
    weight, bias = toy.lin.weight.detach().numpy().copy(), toy.lin.bias.detach().numpy().copy()  # (out, in)
    hf_cfg = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["lin"], init_lora_weights=init, use_rslora=rslora)
    peft_model = peft.get_peft_model(copy.deepcopy(toy), hf_cfg)
    layer = peft_model.base_model.model.lin
    hf_residual = layer.base_layer.weight.detach().numpy()
    a_t, b_t = layer.lora_A["default"].weight.detach().numpy(), layer.lora_B["default"].weight.detach().numpy()
    hf_delta = layer.scaling["default"] * b_t.astype(np.float64) @ a_t.astype(np.float64)  # (out, in)

    cfg = jaxpeft.LoraConfig(rank=3, alpha=5, targets=["lin"], init=init, use_rslora=rslora)
    params = {"lin": {"kernel": jnp.asarray(weight.T), "bias": jnp.asarray(bias)}}
    residual, adapters = jaxpeft.init_adjusted(cfg, params, key=jax.random.key(0))
    node = adapters["lin"]["kernel"]
    assert node.scale == pytest.approx(layer.scaling["default"])
    close(residual["lin"]["kernel"], hf_residual.T)
    close(delta(node), hf_delta.T)
    assert residual["lin"]["bias"] is params["lin"]["bias"]  # untouched leaves are the same arrays
    if init == "olora":  # QR is deterministic (Householder, LAPACK in both): the factors themselves agree
        close(node.a, a_t.T)
        close(node.b, b_t.T)
    with torch.no_grad():  # and so do the adapted models
        x = np.random.default_rng(1).standard_normal((3, 12)).astype(np.float32)
        theirs = peft_model(torch.tensor(x)).numpy()
    ours = jaxpeft.linen.apply(
        nn.Dense(7, name="lin"), {"params": residual["lin"]}, {"kernel": node}, jnp.asarray(x)
    )  # the module is the root: its params and adapters sit at the top level
    close(ours, theirs, 1e-4)


# ----------------------------------------------------------------------------------------------- identity at init


@pytest.mark.parametrize("init", INITS)
def test_identity_at_init_through_linen(params, init):
    cfg = jaxpeft.LoraConfig(rank=2, alpha=4, targets=TARGETS, init=init)
    residual, adapters = jaxpeft.linen.init_adjusted(cfg, MLP, params, X, key=jax.random.key(1))
    assert set(jax.tree.leaves(jax.tree.map(lambda a, b: a is b, residual, params))) == {True, False}
    assert float(jnp.max(jnp.abs(linen_out(residual) - linen_out(params)))) > 1e-2  # the base did change
    close(linen_out(residual, adapters), linen_out(params))
    heads = adapters["heads"]["kernel"]
    assert heads.a.shape == (12, 2) and heads.b.shape == (2, 2, 5)  # multi-axis fan-out, flattened for the SVD


@pytest.mark.parametrize("init", ["pissa", "olora"])  # pissa_niter: through Linen above
def test_identity_at_init_through_nnx(init):
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.fc1, self.fc2 = nnx.Linear(8, 6, rngs=rngs), nnx.Linear(6, 3, rngs=rngs)

        def __call__(self, x):
            return self.fc2(jnp.tanh(self.fc1(x)))

    model = Net(nnx.Rngs(0))
    before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
    cfg = jaxpeft.LoraConfig(rank=2, alpha=4, targets=["fc1", "fc2"], init=init)
    adapted = jnnx.adapt(model, cfg, key=jax.random.key(1))
    close(adapted(X), model(X))
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Param), before)  # the original is untouched
    residual, adapters = jaxpeft.init_adjusted(
        cfg, jnnx.base_params(model), key=jax.random.key(1), layouts=jnnx.infer_layouts(model)
    )
    jax.tree.map(np.testing.assert_array_equal, jnnx.base_params(adapted), residual)
    jax.tree.map(np.testing.assert_array_equal, jnnx.adapters_of(adapted), adapters)
    merged = jnnx.merge(adapted)  # residual + s·A0·B0: the original weights again
    close(merged.fc1.kernel.get_value(), model.fc1.kernel.get_value())


# ----------------------------------------------------------------------------------------------- merge


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_merge_gives_original_plus_update_and_matches_unmerged(params, init):
    cfg = jaxpeft.LoraConfig(rank=2, alpha=4, targets=TARGETS, init=init)
    residual, initial = jaxpeft.linen.init_adjusted(cfg, MLP, params, X, key=jax.random.key(1))
    jax.tree.map(close, jaxpeft.merge(residual, initial), params)  # at init: the original weights
    trained = perturb(initial)
    merged = jaxpeft.merge(residual, trained)
    node, node0 = trained["fc1"]["kernel"], initial["fc1"]["kernel"]
    close(merged["fc1"]["kernel"], np.asarray(params["fc1"]["kernel"]) + delta(node) - delta(node0))
    close(linen_out(merged), linen_out(residual, trained))
    jax.tree.map(close, jaxpeft.unmerge(merged, trained), residual)


# ----------------------------------------------------------------------------------------------- conversion


def test_plain_lora_over_original_params_equals_trained_pissa(params):
    cfg = jaxpeft.LoraConfig(rank=2, alpha=4, targets=TARGETS, init="pissa", rank_pattern={"fc2": 1})
    residual, initial = jaxpeft.linen.init_adjusted(cfg, MLP, params, X, key=jax.random.key(1))
    trained = perturb(initial)
    plain_cfg, plain = jaxpeft.to_plain_lora(cfg, trained, initial)
    assert (plain_cfg.rank, plain_cfg.alpha, plain_cfg.init) == (4, 8.0, "kaiming")
    assert dict(plain_cfg.rank_pattern) == {"fc2": 2}
    assert plain["fc2"]["kernel"].rank == 2 and plain["heads"]["kernel"].b.shape == (4, 2, 5)
    for path, node in jaxpeft.adapter_items(plain):
        assert node.scale == pytest.approx(dict(jaxpeft.adapter_items(trained))[path].scale)
    close(linen_out(params, plain), linen_out(residual, trained))
    plan = jaxpeft.linen.plan(plain_cfg, MLP, params, X)  # the config describes the converted adapters
    assert plan.n_params == sum(x.size for x in jax.tree.leaves(plain))


def test_plain_lora_with_rslora_keeps_the_scale(params):
    cfg = jaxpeft.LoraConfig(rank=2, alpha=4, targets=["fc1"], init="olora", use_rslora=True, alpha_pattern={"fc1": 3})
    residual, initial = jaxpeft.linen.init_adjusted(cfg, MLP, params, X, key=jax.random.key(1))
    trained = perturb(initial)
    plain_cfg, plain = jaxpeft.to_plain_lora(cfg, trained, initial)
    assert plain_cfg.scale_for("fc1/kernel") == pytest.approx(cfg.scale_for("fc1/kernel"))
    close(linen_out(params, plain), linen_out(residual, trained))


def test_converted_adapters_load_in_peft_over_the_original_base(params, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(8, 12), torch.nn.Linear(12, 5)

        def forward(self, x):
            return self.fc2(torch.tanh(self.fc1(x)))

    class Flax(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(5, name="fc2")(jnp.tanh(nn.Dense(12, name="fc1")(x)))

    toy = Toy().eval()
    original = {
        name: {"kernel": jnp.asarray(m.weight.detach().numpy().T), "bias": jnp.asarray(m.bias.detach().numpy())}
        for name, m in (("fc1", toy.fc1), ("fc2", toy.fc2))
    }
    model = Flax()
    cfg = jaxpeft.LoraConfig(rank=3, alpha=6, targets=["fc1", "fc2"], init="pissa")
    residual, initial = jaxpeft.linen.init_adjusted(cfg, model, original, X, key=jax.random.key(0))
    trained = perturb(initial, size=0.3)
    pissa_out = jaxpeft.linen.apply(model, {"params": residual}, trained, X)
    plain_cfg, plain = jaxpeft.to_plain_lora(cfg, trained, initial)
    hf.export_adapters(tmp_path, plain, plain_cfg, original, hf.module_name_map())
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(toy), tmp_path).eval()
    with torch.no_grad():
        theirs = loaded(torch.tensor(np.asarray(X))).numpy()
        base = toy(torch.tensor(np.asarray(X))).numpy()
    assert float(np.max(np.abs(theirs - base))) > 1e-2
    close(pissa_out, theirs, 1e-4)
    with pytest.raises(ValueError, match=r"`cfg` has init='pissa': its adapters are the identity only over the resid"):
        hf.export_adapters(tmp_path / "no", trained, cfg, residual, hf.module_name_map())


# ----------------------------------------------------------------------------------------------- randomised SVD


def test_pissa_niter_approximates_the_full_svd():
    rng = np.random.default_rng(4)
    u, _ = np.linalg.qr(rng.standard_normal((3, 40, 40)))
    v, _ = np.linalg.qr(rng.standard_normal((3, 24, 24)))
    spectrum = 2.0 ** -np.arange(24)  # a clear gap after each singular value
    w = np.einsum("sik,k,sjk->sij", u[:, :, :24], spectrum, v).astype(np.float32)  # (stack 3, 40, 24)
    params = {"w": {"kernel": jnp.asarray(w)}}
    layouts = {"w/kernel": jaxpeft.Layout(stack=1)}

    def update(init, key):
        cfg = jaxpeft.LoraConfig(rank=3, alpha=6, targets=["w"], init=init)
        _, adapters = jaxpeft.init_adjusted(cfg, params, key=key, layouts=layouts)
        node = adapters["w"]["kernel"]
        return node.scale * np.einsum("sir,sro->sio", np.asarray(node.a, np.float64), np.asarray(node.b, np.float64))

    full = update("pissa", jax.random.key(0))
    close(full, np.einsum("sik,k,sjk->sij", u[:, :, :3], spectrum[:3], v[:, :, :3]), 1e-5)  # per stack slice
    approx = update("pissa_niter_4", jax.random.key(0))
    close(approx, full, 1e-3)
    np.testing.assert_array_equal(approx, update("pissa_niter_4", jax.random.key(0)))  # same key, same factors
    assert not np.array_equal(approx, update("pissa_niter_4", jax.random.key(1)))  # the key seeds the test matrix


def test_factor_dtype_follows_config(params):
    cfg = jaxpeft.LoraConfig(rank=2, alpha=4, targets=["fc1"], init="pissa", dtype="bfloat16")
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    residual, adapters = jaxpeft.linen.init_adjusted(cfg, MLP, bf16, X, key=jax.random.key(0))
    assert adapters["fc1"]["kernel"].a.dtype == jnp.bfloat16 and residual["fc1"]["kernel"].dtype == jnp.bfloat16
    close(jaxpeft.merge(residual, adapters)["fc1"]["kernel"].astype(jnp.float32), bf16["fc1"]["kernel"], 2e-2)


# ----------------------------------------------------------------------------------------------- refusals


def test_init_refuses_a_base_adjusting_config(params):
    cfg = jaxpeft.LoraConfig(rank=2, alpha=4, targets=TARGETS, init="olora")
    assert cfg.adjusts_base and not jaxpeft.LoraConfig().adjusts_base
    message = r"`cfg` \(LoraConfig with init='olora'\) changes the base weights at init.*jaxpeft.init_adjusted"
    with pytest.raises(ValueError, match=message):
        jaxpeft.init(cfg, params, key=jax.random.key(0))
    with pytest.raises(ValueError, match=message):
        jaxpeft.linen.init(cfg, MLP, params, X, key=jax.random.key(0))
    same, adapters = jaxpeft.init_adjusted(jaxpeft.LoraConfig(targets=["fc1"]), params, key=jax.random.key(0))
    assert same is params and adapters["fc1"]["kernel"].b.shape == (8, 12)  # a plain config: init, params as is


def test_refuses_layers_it_cannot_decompose():
    class WithEmbed(nn.Module):
        @nn.compact
        def __call__(self, ids):
            x = nn.Embed(10, 6, name="embed")(ids)
            return nn.Conv(4, (3,), name="conv")(x)

    ids = jnp.zeros((1, 5), jnp.int32)
    model = WithEmbed()
    params = model.init(jax.random.key(0), ids)["params"]
    for target, kind in (("embed", "embed"), ("conv", "conv")):
        cfg = jaxpeft.LoraConfig(rank=2, targets=[target], init="pissa")
        with pytest.raises(ValueError, match=rf"init`='pissa' cannot initialise '{target}/.*', a '{kind}' weight"):
            jaxpeft.linen.init_adjusted(cfg, model, params, ids, key=jax.random.key(0))
        with pytest.raises(ValueError, match=r"decompose linear maps only"):
            jaxpeft.linen.plan(cfg, model, params, ids)


def test_refusals(params):
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"needs rank <= min\(fan_in, fan_out\) = 5 for 'fc2/kernel'"):
        jaxpeft.init_adjusted(jaxpeft.LoraConfig(rank=6, targets=["fc2"], init="pissa"), params, key=key)
    with pytest.raises(ValueError, match=r"`init`='olora' is not supported by DoraConfig"):
        jaxpeft.DoraConfig(init="olora")
    with pytest.raises(ValueError, match=r"`init`='pissa_niter_x'; expected one of .* or 'pissa_niter_<n>'"):
        jaxpeft.LoraConfig(init="pissa_niter_x")
    cfg = jaxpeft.LoraConfig(rank=2, targets=["fc1"], init="pissa")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    with pytest.raises(ValueError, match=r"init='pissa' adjusts the base weight 'fc1/kernel', which is a jax.Shape"):
        jaxpeft.init_adjusted(cfg, abstract, key=key)
    quantised = jaxpeft.quantize(params, ["fc1"], kind="int8")
    with pytest.raises(ValueError, match=r"adjusts the base weight 'fc1/kernel', which is quantised"):
        jaxpeft.init_adjusted(cfg, quantised, key=key)
    shapes = jax.eval_shape(lambda p: jaxpeft.init_adjusted(cfg, p, key=key), params)  # abstract use works
    assert shapes[1]["fc1"]["kernel"].a.shape == (8, 2)


def test_conversion_refusals(params):
    cfg = jaxpeft.LoraConfig(rank=2, alpha=4, targets=TARGETS, init="pissa")
    _, initial = jaxpeft.linen.init_adjusted(cfg, MLP, params, X, key=jax.random.key(0))
    with pytest.raises(TypeError, match=r"`cfg` is a DoraConfig; to_plain_lora converts LoraConfig adapters only"):
        jaxpeft.to_plain_lora(jaxpeft.DoraConfig(rank=2, alpha=4, targets=TARGETS), initial, initial)
    fewer = {k: v for k, v in initial.items() if k != "fc2"}
    with pytest.raises(ValueError, match=r"`trained` and `initial` differ in paths: only in trained \['fc2/kernel'\]"):
        jaxpeft.to_plain_lora(cfg, initial, fewer)
    with pytest.raises(ValueError, match=r"adapter 'fc1/kernel' has rank 2 and scale 2.0, but `cfg` gives rank 3"):
        jaxpeft.to_plain_lora(jaxpeft.LoraConfig(rank=3, alpha=6, targets=TARGETS), initial, initial)
