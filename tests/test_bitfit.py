"""BitFit and LN tuning (leaf methods): formulas vs NumPy, scanned stacks, NNX wrapper, checkpoints, sharding, errors.

The invariants (identity at init, merged ≡ adapted, frozen base, gradients, checkpoints) run for both methods in
tests/test_methods.py over the twin models; this file checks what is specific to training a leaf in place.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import jaxpeft
import jaxpeft.checkpoint
import jaxpeft.hf
import jaxpeft.linen
import jaxpeft.nnx as jnnx
import jaxpeft.sharding

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.standard_normal((3, 5)), jnp.float32)


def _randomize(tree, seed=1, size=0.3):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (x + size * rng.standard_normal(x.shape)).astype(x.dtype), tree)


class DenseNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.LayerNorm(name="ln")(nn.Dense(4, name="lin")(x))


class Stack(nn.Module):
    """A scanned block (LayerNorm + Dense) and a final RMSNorm; biases of a DenseGeneral head."""

    @nn.compact
    def __call__(self, x):
        class Block(nn.Module):
            @nn.compact
            def __call__(self, h, _):
                return h + nn.Dense(5, name="d")(nn.LayerNorm(name="ln")(h)), None

        h, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)(name="layers")(
            x, None
        )
        return nn.DenseGeneral((2, 2), name="head")(nn.RMSNorm(name="norm")(h))


def _init(model):
    return _randomize(model.init(jax.random.key(0), X)["params"], seed=2)


def _layer_norm(x, scale, bias, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


# ----------------------------------------------------------------------------------------------- formulas


@pytest.mark.parametrize("method", ["bitfit", "ln_tuning"])
def test_formula_dense_and_layernorm_vs_numpy(method):
    model = DenseNorm()
    params = _init(model)
    cfg = jaxpeft.BitFitConfig() if method == "bitfit" else jaxpeft.LNTuningConfig()
    adapters = _randomize(jaxpeft.linen.init(cfg, model, params, X, key=jax.random.key(0)), seed=3)
    out = np.asarray(jaxpeft.linen.apply(model, {"params": params}, adapters, X), np.float64)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    d = jax.tree.map(lambda n: np.asarray(n.delta, np.float64), adapters, is_leaf=lambda n: hasattr(n, "delta"))
    if method == "bitfit":
        assert set(d) == {"lin"}  # "all": the Dense bias, not the norm's
        y = X @ p["lin"]["kernel"] + p["lin"]["bias"] + d["lin"]["bias"]
        expected = _layer_norm(y, p["ln"]["scale"], p["ln"]["bias"])
    else:
        assert set(d) == {"ln"} and set(d["ln"]) == {"scale", "bias"}
        y = X @ p["lin"]["kernel"] + p["lin"]["bias"]
        expected = _layer_norm(y, p["ln"]["scale"] + d["ln"]["scale"], p["ln"]["bias"] + d["ln"]["bias"])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(  # merged ≡ adapted bit for bit: the forward *is* the merge arithmetic
        model.apply({"params": jaxpeft.merge(params, adapters)}, X),
        jaxpeft.linen.apply(model, {"params": params}, adapters, X),
    )


def test_bitfit_regex_reaches_norm_biases_and_names_pick_layers():
    model = DenseNorm()
    params = _init(model)
    every = jaxpeft.plan(jaxpeft.BitFitConfig(targets=r"bias$"), params)
    assert [(t.path, t.layout.kind) for t in every.targets] == [("lin/bias", "bias"), ("ln/bias", "norm")]
    named = jaxpeft.plan(jaxpeft.BitFitConfig(targets=["ln"]), params)
    assert [t.path for t in named.targets] == ["ln/bias"]  # a norm's name trains only its bias under BitFit
    ln = jaxpeft.plan(jaxpeft.LNTuningConfig(targets=r"scale$"), params)
    assert [t.path for t in ln.targets] == ["ln/scale"]


def test_scanned_stack_keeps_stack_axes_and_is_exact():
    model = Stack()
    params = _init(model)
    layouts = jaxpeft.linen.infer_layouts(model, X)
    bitfit = jaxpeft.init(jaxpeft.BitFitConfig(), params, key=jax.random.key(0), layouts=layouts)
    node = bitfit["layers"]["d"]["bias"]
    assert node.delta.shape == (3, 5) and node.layout == jaxpeft.Layout(stack=1, fan_in=0, fan_out=1, kind="bias")
    assert bitfit["head"]["bias"].layout == jaxpeft.Layout(stack=0, fan_in=0, fan_out=2, kind="bias")
    ln = jaxpeft.init(jaxpeft.LNTuningConfig(), params, key=jax.random.key(0))  # norms need no layouts
    forward = jax.jit(lambda p, a: jaxpeft.linen.apply(model, {"params": p}, a, X))
    base = jax.jit(lambda p: model.apply({"params": p}, X))
    assert sorted(p for p, _ in jaxpeft.adapter_items(ln)) == ["layers/ln/bias", "layers/ln/scale", "norm/scale"]
    assert ln["layers"]["ln"]["scale"].layout == jaxpeft.Layout(stack=1, fan_in=0, fan_out=1, kind="norm")
    for adapters in (bitfit, ln):
        trained = _randomize(adapters, seed=4)
        adapted = forward(params, trained)
        np.testing.assert_allclose(adapted, base(jaxpeft.merge(params, trained)), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(forward(params, adapters), base(params))
        chex.assert_trees_all_close(jaxpeft.unmerge(jaxpeft.merge(params, trained), trained), params, atol=1e-6)
        path = next(p for p, n in jaxpeft.adapter_items(trained) if n.layout.stack == 1)
        module, leaf = path.rsplit("/", 2)[1:]
        node = trained["layers"][module][leaf]
        zeroed = {"layers": {module: {leaf: jaxpeft.LeafDelta(node.delta.at[1].set(0.0), node.layout)}}}
        merged = jaxpeft.merge(params, zeroed)[  # a stack axis is per layer: layer 1 is untouched
            "layers"
        ][module][leaf]
        np.testing.assert_array_equal(merged[1], params["layers"][module][leaf][1])
        assert not np.array_equal(merged[0], params["layers"][module][leaf][0])


def test_bf16_leaf_keeps_its_dtype_with_float32_delta():
    params = {"lin": {"kernel": jnp.ones((5, 4), jnp.bfloat16), "bias": jnp.ones((4,), jnp.bfloat16)}}
    adapters = jaxpeft.init(jaxpeft.BitFitConfig(), params, key=jax.random.key(0))
    node = adapters["lin"]["bias"]
    assert node.delta.dtype == jnp.float32
    assert node.value(params["lin"]["bias"]).dtype == jnp.bfloat16
    assert jaxpeft.merge(params, adapters)["lin"]["bias"].dtype == jnp.bfloat16


# ----------------------------------------------------------------------------------------------- NNX


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.ln = nnx.LayerNorm(4, rngs=rngs)
        self.lin = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
        return x + self.lin(self.ln(x))


def test_nnx_wrapper_substitutes_without_touching_the_base():
    model = NnxBlock(nnx.Rngs(0))
    x = jnp.asarray(RNG.standard_normal((2, 4)), jnp.float32)
    base = jax.tree.map(jnp.copy, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    adapted = jnnx.adapt(model, jaxpeft.LNTuningConfig(), key=jax.random.key(0))
    assert isinstance(adapted.ln, jnnx.LeafAdapterLayer) and not isinstance(adapted.lin, jnnx.LeafAdapterLayer)
    np.testing.assert_array_equal(adapted(x), model(x))
    jnnx.load_adapters(adapted, _randomize(jnnx.adapters_of(adapted), seed=5))
    y = adapted(x)
    chex.assert_trees_all_equal(jnnx.base_params(adapted), base)  # nnx.Param is the frozen, unchanged base
    assert jax.tree.leaves(nnx.state(adapted, jnnx.AdapterParam))[0].shape == (4,)
    np.testing.assert_array_equal(jnnx.merge(adapted)(x), y)
    d = jnnx.adapters_of(adapted)["ln"]
    expected = x + model.lin(
        _layer_norm(np.asarray(x), model.ln.scale[...] + d["scale"].delta, model.ln.bias[...] + d["bias"].delta)
    )
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    assert not any(isinstance(n, jnnx.LeafAdapterLayer) for _, n in nnx.iter_graph(jnnx.remove(adapted)))
    with pytest.raises(AttributeError, match=r"LeafAdapterLayer \(wrapping LayerNorm\) has no attribute 'scale'"):
        _ = adapted.ln.scale


def test_nnx_errors_name_the_path():
    model = NnxBlock(nnx.Rngs(0))
    wrong = {"ln": {"nope": jaxpeft.LeafDelta(jnp.zeros(4), jaxpeft.Layout(fan_in=0, kind="norm"))}}
    with pytest.raises(ValueError, match=r"adapter 'ln/nope' \(LeafDelta\) names a leaf of a LayerNorm without"):
        jnnx.attach(model, wrong)
    lora = jaxpeft.init(jaxpeft.LoraConfig(targets=["lin"]), jnnx.base_params(model), key=jax.random.key(0))
    bias = jaxpeft.init(jaxpeft.BitFitConfig(), jnnx.base_params(model), key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"'lin/bias' trains a leaf of a layer that also has a kernel adapter"):
        jnnx.attach(model, {"lin": {**lora["lin"], **bias["lin"]}})


# ----------------------------------------------------------------------------------------------- state


def test_checkpoint_round_trip_and_config_json(tmp_path):
    model = Stack()
    params = _init(model)
    cfg = jaxpeft.LNTuningConfig(targets=["ln"], exclude=r"bias$", dtype="bfloat16")
    assert jaxpeft.config_from_dict(cfg.to_dict()) == cfg
    assert jaxpeft.config_from_dict(jaxpeft.BitFitConfig(targets=["d"]).to_dict()) == jaxpeft.BitFitConfig(
        targets=("d",)
    )
    trained = _randomize(jaxpeft.init(cfg, params, key=jax.random.key(0)), seed=6)
    assert [p for p, _ in jaxpeft.adapter_items(trained)] == ["layers/ln/scale"]
    jaxpeft.checkpoint.save_adapters(tmp_path / "ckpt", 1, trained, cfg, params)
    restored = jaxpeft.checkpoint.restore_adapters(tmp_path / "ckpt", cfg, params)
    chex.assert_trees_all_equal(restored.adapters, trained)
    assert jax.tree.structure(restored.adapters) == jax.tree.structure(trained)
    assert jaxpeft.checkpoint.read_config(tmp_path / "ckpt") == cfg


def test_sharding_follows_the_leaf_spec():
    model = Stack()
    params = _init(model)
    adapters = jaxpeft.init(
        jaxpeft.BitFitConfig(), params, key=jax.random.key(0), layouts=jaxpeft.linen.infer_layouts(model, X)
    )
    specs = jax.tree.map(lambda _: P(), params)
    specs["layers"]["d"]["bias"] = P(None, "model")
    specs["head"]["bias"] = P("model", None)
    out = jaxpeft.sharding.adapter_specs(adapters, specs)
    assert out["layers"]["d"]["bias"].delta == P(None, "model")
    assert out["head"]["bias"].delta == P("model", None)


# ----------------------------------------------------------------------------------------------- errors


def test_errors_by_message():
    model = DenseNorm()
    params = _init(model)
    with pytest.raises(
        ValueError, match=r"matched no bias leaf. The model's bias leaves look like 'lin/bias', 'ln/bias'"
    ):
        jaxpeft.init(jaxpeft.BitFitConfig(targets=["nope"]), params, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"`exclude`=\('ln',\) removed all 2 norm leaves"):
        jaxpeft.init(jaxpeft.LNTuningConfig(exclude=["ln"]), params, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r'`exclude`="all" is not allowed'):
        jaxpeft.init(jaxpeft.BitFitConfig(exclude="all"), params, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"`dtype`='int8'; adapters need a floating dtype"):
        jaxpeft.BitFitConfig(dtype="int8")
    stacked = {"blk": {"kernel": jnp.ones((3, 5, 4)), "bias": jnp.ones((3, 4))}}
    with pytest.raises(
        ValueError, match=r"selected 'blk/bias', but the stack axes of 'blk/bias' \(3, 4\) are those of"
    ):
        jaxpeft.init(jaxpeft.BitFitConfig(), stacked, key=jax.random.key(0))
    bad = {"lin": {"bias": jaxpeft.LeafDelta(jnp.zeros(3), jaxpeft.Layout(fan_in=0, kind="bias"))}}
    with pytest.raises(
        ValueError, match=r"adapter 'lin/bias' \(LeafDelta: delta \(3,\)\) does not fit .*leaf's shape \(4,\)"
    ):
        jaxpeft.linen.apply(model, {"params": params}, bad, X)
    node = jaxpeft.LeafDelta(jnp.zeros(3), jaxpeft.Layout(fan_in=0, kind="bias"))
    assert isinstance(node, jaxpeft.LeafAdapter) and not hasattr(node, "forward")  # a leaf hook, no layer stub
    with pytest.raises(ValueError, match=r"'lin/bias' is a bias vector; this method adapts kernels"):
        jaxpeft.init(
            jaxpeft.LoraConfig(targets=r"bias$"),
            params,
            key=jax.random.key(0),
            layouts={"lin/bias": jaxpeft.Layout(fan_in=0, kind="bias")},
        )
    with pytest.raises(ValueError, match=r"fan_in and fan_out >= 1 \(fan_in >= 0 for the vector kinds"):
        jaxpeft.Layout(fan_in=0, kind="dense")
    with pytest.raises(
        TypeError, match=r"`cfg` is a BitFitConfig: jaxpeft.hf does not write bitfit adapters.*modules_to_save"
    ):
        jaxpeft.hf.to_state_dict({}, jaxpeft.BitFitConfig(), params, {})
